//! Record decoding: never panics, never allocates past its limit, and what it
//! accepts re-encodes to an equal record.
//!
//! The first input byte chooses the flags and the rest is the payload; the
//! header and checksum are made valid, so the fuzzer reaches the inflate and
//! MessagePack decoders instead of stopping at the CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency::RecordCodec;

fuzz_target!(|data: &[u8]| {
    let codec = RecordCodec::new().max_record_size(1 << 20);
    // Raw, as stored bytes could be.
    let _ = codec.decode(data);
    // Framed with a valid checksum.
    let Some((&flags, payload)) = data.split_first() else {
        return;
    };
    let flags = flags & 0b11;
    let mut h = crc32fast::Hasher::new();
    h.update(&[flags]);
    h.update(payload);
    let mut framed = vec![1, flags];
    framed.extend_from_slice(&h.finalize().to_le_bytes());
    framed.extend_from_slice(payload);
    if let Ok(record) = codec.decode(&framed) {
        let bytes = codec.encode(&record).expect("a decoded record re-encodes");
        assert_eq!(codec.decode(&bytes).expect("and decodes again"), record);
    }
});
