//! The record codec: round trips and hostile input.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use tower_idempotency::{CodecError, Fingerprint, Record, RecordCodec};

fn arb_record() -> impl Strategy<Value = Record> {
    (
        100u16..1000,
        proptest::collection::vec(
            (
                "[a-z][a-z0-9-]{0,20}",
                proptest::collection::vec(0x20u8..0x7f, 0..40),
            ),
            0..8,
        ),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..4096),
            (any::<u8>(), 0usize..100_000).prop_map(|(b, n)| vec![b; n]),
        ],
        any::<[u8; 32]>(),
        0u64..4_000_000_000_000,
    )
        .prop_map(|(status, headers, body, fp, ms)| {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(&value).unwrap(),
                );
            }
            let mut r = Record::new(
                StatusCode::from_u16(status).unwrap(),
                map,
                Bytes::from(body),
                Fingerprint::from_bytes(fp),
            );
            r.created_at = UNIX_EPOCH + Duration::from_millis(ms);
            r
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn records_round_trip(record in arb_record(), threshold in prop_oneof![Just(0usize), Just(1024), Just(usize::MAX)]) {
        let codec = RecordCodec::new().compress_above(threshold);
        let bytes = codec.encode(&record).unwrap();
        prop_assert_eq!(codec.decode(&bytes).unwrap(), record);
    }

    #[test]
    fn every_truncation_is_an_error(record in arb_record(), cut in any::<prop::sample::Index>()) {
        let codec = RecordCodec::new();
        let bytes = codec.encode(&record).unwrap();
        let cut = cut.index(bytes.len());
        prop_assert!(codec.decode(&bytes[..cut]).is_err());
    }

    #[test]
    fn every_bit_flip_is_an_error(record in arb_record(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let codec = RecordCodec::new();
        let mut bytes = codec.encode(&record).unwrap();
        let at = at.index(bytes.len());
        bytes[at] ^= 1 << bit;
        prop_assert!(codec.decode(&bytes).is_err(), "flip at {} bit {} was accepted", at, bit);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = RecordCodec::new().decode(&bytes);
    }

    /// Random payloads behind a valid header and checksum reach the
    /// MessagePack and inflate decoders themselves.
    #[test]
    fn garbage_with_a_valid_checksum_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..2048), deflate in any::<bool>()) {
        let flags = u8::from(deflate);
        let _ = RecordCodec::new().decode(&frame(flags, &payload));
    }
}

fn frame(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = crc32fast::Hasher::new();
    h.update(&[flags]);
    h.update(payload);
    let mut out = vec![1, flags];
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

// The deflate bomb has a test binary of its own (tests/codec_bomb.rs): it
// measures the memory the decoder allocates.

#[test]
fn typed_errors_for_each_kind_of_damage() {
    let codec = RecordCodec::new();
    let record = Record::new(
        StatusCode::OK,
        HeaderMap::new(),
        Bytes::from_static(b"ok"),
        Fingerprint::from_bytes([1; 32]),
    );
    let good = codec.encode(&record).unwrap();
    assert!(matches!(
        codec.decode(&good[..3]),
        Err(CodecError::Truncated { len: 3 })
    ));
    let mut v = good.clone();
    v[0] = 9;
    assert!(matches!(
        codec.decode(&v),
        Err(CodecError::UnsupportedVersion(9))
    ));
    let mut v = good.clone();
    *v.last_mut().unwrap() ^= 0xff;
    assert!(matches!(
        codec.decode(&v),
        Err(CodecError::ChecksumMismatch)
    ));
    assert!(matches!(
        codec.decode(&frame(0x80, b"")),
        Err(CodecError::UnknownFlags(0x80))
    ));
    assert!(matches!(
        codec.decode(&frame(0, b"\xc1")),
        Err(CodecError::Malformed(_))
    ));
    assert!(matches!(
        codec.decode(&frame(1, b"\xff\xff\xff")),
        Err(CodecError::Inflate(_))
    ));
}

/// The records the fixtures hold: a small plain one, a deflated one, a
/// "not kept" marker and one with trailers (format version 2), with fixed
/// times.
fn fixture_records() -> [(&'static str, Record); 4] {
    let at = UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
    let mut headers = HeaderMap::new();
    headers.append("content-type", "application/json".parse().unwrap());
    headers.append("x-multi", "1".parse().unwrap());
    headers.append("x-multi", "2".parse().unwrap());
    let mut plain = Record::new(
        StatusCode::CREATED,
        headers.clone(),
        Bytes::from_static(br#"{"id":"pay_000001"}"#),
        Fingerprint::from_bytes([7; 32]),
    );
    plain.created_at = at;
    let mut deflated = Record::new(
        StatusCode::OK,
        headers,
        Bytes::from("compressible ".repeat(400)),
        Fingerprint::from_bytes([8; 32]),
    );
    deflated.created_at = at;
    let mut marker = Record::not_kept(StatusCode::ACCEPTED, Fingerprint::from_bytes([9; 32]));
    marker.created_at = at;
    let mut trailers = HeaderMap::new();
    trailers.append("grpc-status", "0".parse().unwrap());
    trailers.append("x-multi", "1".parse().unwrap());
    trailers.append("x-multi", "2".parse().unwrap());
    let mut grpc_headers = HeaderMap::new();
    grpc_headers.append("content-type", "application/grpc".parse().unwrap());
    let mut with_trailers = Record::new(
        StatusCode::OK,
        grpc_headers,
        Bytes::from_static(b"\0\0\0\0\x02\x08\x01"),
        Fingerprint::from_bytes([10; 32]),
    )
    .with_trailers(trailers);
    with_trailers.created_at = at;
    [
        ("plain", plain),
        ("deflated", deflated),
        ("marker", marker),
        ("trailers", with_trailers),
    ]
}

/// Stored bytes of the current format, kept as files: every later version
/// must read them (a rolling upgrade), and this version must write them
/// byte for byte (so a rollback to a version that reads them works).
/// `REGENERATE_RECORD_FIXTURES=1` writes them again — only for a deliberate
/// format change, which then needs a new format version.
#[test]
fn stored_records_of_the_current_format_stay_readable() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/records");
    let codec = RecordCodec::new();
    for (name, record) in fixture_records() {
        let path = dir.join(format!("{name}.bin"));
        let encoded = codec.encode(&record).unwrap();
        if std::env::var_os("REGENERATE_RECORD_FIXTURES").is_some() {
            std::fs::write(&path, &encoded).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(codec.decode(&stored).unwrap(), record, "{name} decodes");
        assert_eq!(encoded, stored, "{name} is still written the same way");
    }
}
