//! Malformed keys and the key parser.

mod common;

use bytes::Bytes;
use common::{Runs, counting, post, send};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::Full;
use proptest::prelude::*;
use tower::Layer;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, KeyError, MemoryBackend};

async fn rejected(raw_values: &[&[u8]]) {
    let runs = Runs::default();
    let backend = MemoryBackend::new();
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(counting(runs.clone()));
    let mut req = Request::post("/p")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    for raw in raw_values {
        req.headers_mut()
            .append("idempotency-key", HeaderValue::from_bytes(raw).unwrap());
    }
    let answer = send(&mut svc, req).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{raw_values:?}");
    assert_eq!(answer.problem_type(), "invalid-key");
    assert_eq!(runs.get(), 0, "the handler must not run");
    assert_eq!(backend.stored_count(), 0, "nothing may be stored");
    assert_eq!(backend.in_flight_count(), 0, "no lock may be taken");
}

#[tokio::test]
async fn malformed_keys_are_400() {
    let long = [b'k'; 256];
    let long_quoted = [&b"\""[..], &[b'k'; 256][..], &b"\""[..]].concat();
    for raw in [
        &b""[..],
        b"\"\"",
        b"   ",
        &long,
        &long_quoted,
        b"a\tb",
        b"\"a\tb\"",
        b"\"\xff\"",
        b"with space",
        b"\"unterminated",
        b"\"trailing\" garbage",
        b"\"bad\\escape\"",
        b"caf\xc3\xa9",
    ] {
        rejected(&[raw]).await;
    }
}

#[tokio::test]
async fn repeated_header_is_400() {
    rejected(&[b"\"k1\"", b"\"k1\""]).await;
    rejected(&[b"k1", b"k2"]).await;
}

#[tokio::test]
async fn key_of_255_bytes_is_accepted() {
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(MemoryBackend::new()).layer(counting(runs.clone()));
    let key = "k".repeat(255);
    send(&mut svc, post("/p", Some(&key), "x")).await;
    assert!(
        send(&mut svc, post("/p", Some(&format!("\"{key}\"")), "x"))
            .await
            .replayed()
    );
    assert_eq!(runs.get(), 1);
}

fn quote(key: &str) -> String {
    let mut out = String::from("\"");
    for c in key.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

proptest! {
    #[test]
    fn parser_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(value) = HeaderValue::from_bytes(&raw)
            && let Ok(key) = IdempotencyKey::parse(&value)
        {
            prop_assert!(!key.as_str().is_empty());
            prop_assert!(key.as_str().len() <= 255);
            prop_assert!(key.as_str().bytes().all(|b| (0x20..=0x7e).contains(&b)));
        }
    }

    #[test]
    fn quoted_keys_round_trip(key in "[ -~]{1,255}") {
        let value = HeaderValue::from_str(&quote(&key)).unwrap();
        let parsed = IdempotencyKey::parse(&value).unwrap();
        prop_assert_eq!(parsed.as_str(), key.as_str());
    }

    #[test]
    fn bare_tokens_round_trip(key in "[!#-+\\--~]{1,255}") {
        let value = HeaderValue::from_str(&key).unwrap();
        let parsed = IdempotencyKey::parse(&value).unwrap();
        prop_assert_eq!(parsed.as_str(), key.as_str());
        let quoted = HeaderValue::from_str(&quote(&key)).unwrap();
        prop_assert_eq!(IdempotencyKey::parse(&quoted).unwrap(), IdempotencyKey::parse(&value).unwrap());
    }

    #[test]
    fn bare_keys_with_a_comma_are_a_repeated_header(a in "[!#-+\\--~]{1,50}", b in "[!#-+\\--~]{1,50}") {
        // What a proxy makes of two Idempotency-Key headers.
        let joined = HeaderValue::from_str(&format!("{a},{b}")).unwrap();
        prop_assert_eq!(IdempotencyKey::parse(&joined), Err(KeyError::Repeated));
        let quoted = HeaderValue::from_str(&quote(&format!("{a},{b}"))).unwrap();
        let parsed = IdempotencyKey::parse(&quoted).unwrap();
        prop_assert_eq!(parsed.as_str(), format!("{a},{b}"));
    }

    #[test]
    fn overlong_keys_are_rejected(key in "[!#-+\\--~]{256,300}") {
        let value = HeaderValue::from_str(&key).unwrap();
        prop_assert_eq!(IdempotencyKey::parse(&value), Err(KeyError::TooLong { len: key.len() }));
    }
}
