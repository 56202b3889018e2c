//! A deflate bomb is refused without inflating it all: the decoder stops at
//! the configured maximum, which the memory it allocates shows. Its own test
//! binary, so that no other test allocates while it measures.

use std::io::Write;

use cap::Cap;
use tower_idempotency::{CodecError, RecordCodec};

#[global_allocator]
static ALLOCATOR: Cap<std::alloc::System> = Cap::new(std::alloc::System, usize::MAX);

/// A record frame (version 1, deflate flag) around `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut h = crc32fast::Hasher::new();
    h.update(&[1]);
    h.update(payload);
    let mut out = vec![1, 1];
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

#[test]
fn deflate_bomb_is_refused_without_inflating_it_all() {
    // 256 MiB of zeros deflate to about a megabyte, fast.
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1024 * 1024];
    for _ in 0..256 {
        enc.write_all(&zeros).unwrap();
    }
    let bomb = frame(&enc.finish().unwrap());
    drop(zeros);
    let codec = RecordCodec::new().max_record_size(1024 * 1024);

    let before = ALLOCATOR.allocated();
    let allocated_before = ALLOCATOR.total_allocated();
    let result = codec.decode(&bomb);
    let allocated = ALLOCATOR.total_allocated() - allocated_before;
    assert!(
        matches!(result, Err(CodecError::TooLarge { max }) if max == 1024 * 1024),
        "{result:?}"
    );
    // Inflating stops just past the 1 MiB maximum: a few megabytes in all
    // (the output buffer doubles as it grows), not 256 MiB.
    assert!(
        allocated < 8 * 1024 * 1024,
        "decoding allocated {allocated} bytes"
    );
    assert!(
        ALLOCATOR.max_allocated() < before + 8 * 1024 * 1024 + bomb.len() * 4,
        "peak {} bytes over the {before} held before",
        ALLOCATOR.max_allocated().saturating_sub(before)
    );
}
