//! Fingerprint modes: a retry whose JSON was re-serialised replays under
//! canonical JSON (and is `422` under raw bytes); a function of the user's
//! leaves out what changes between retries; what cannot be fingerprinted is
//! `400` before anything is looked up or run.

mod common;

use common::{Runs, counting, post, send};
use http::StatusCode;
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, MemoryBackend};

const FIRST: &str =
    r#"{"amount": 500, "currency": "EUR", "card": {"last4": "4242", "exp": "12/30"}}"#;
const REWRITTEN: &str = "{\"card\":{\"exp\":\"12\\/30\",\"last4\":\"4242\"},\n \"currency\":\"\\u0045UR\",\"amount\":500}";

#[tokio::test]
async fn canonical_json_replays_a_re_serialised_retry() {
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(MemoryBackend::new())
        .fingerprint_json()
        .layer(counting(runs.clone()));
    let first = send(&mut svc, post("/pay", Some("json-1"), FIRST)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&mut svc, post("/pay", Some("json-1"), REWRITTEN)).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.body);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.get(), 1);

    // Another amount, or the same amount written otherwise, is another request.
    for other in [
        r#"{"amount": 501, "currency": "EUR", "card": {"last4": "4242", "exp": "12/30"}}"#,
        r#"{"amount": 500.0, "currency": "EUR", "card": {"last4": "4242", "exp": "12/30"}}"#,
    ] {
        let answer = send(&mut svc, post("/pay", Some("json-1"), other)).await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{other}");
        assert_eq!(answer.problem_type(), "fingerprint-mismatch");
    }
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn raw_bytes_stay_the_default() {
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(MemoryBackend::new()).layer(counting(runs.clone()));
    send(&mut svc, post("/pay", Some("raw-1"), FIRST)).await;
    let retry = send(&mut svc, post("/pay", Some("raw-1"), REWRITTEN)).await;
    assert_eq!(retry.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_400_and_nothing_runs() {
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(MemoryBackend::new())
        .fingerprint_json()
        .layer(counting(runs.clone()));
    for bad in [
        "amount=500",
        r#"{"amount": 500,}"#,
        r#"{"amount": 500, "amount": 5}"#,
        &("[".repeat(300) + &"]".repeat(300)),
    ] {
        let answer = send(&mut svc, post("/pay", Some("bad-json"), bad)).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(answer.problem_type(), "invalid-body");
    }
    assert_eq!(runs.get(), 0, "nothing ran");
    // Nothing was stored or locked: the key serves a valid request.
    let fixed = send(&mut svc, post("/pay", Some("bad-json"), FIRST)).await;
    assert_eq!(fixed.status, StatusCode::CREATED);
    assert!(!fixed.replayed());
    // An empty body is fingerprinted as empty, not refused.
    let empty = send(&mut svc, post("/pay", Some("empty"), "")).await;
    assert_eq!(empty.status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_function_leaves_out_what_changes_between_retries() {
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(MemoryBackend::new())
        .fingerprint_body_with(|_req: &http::request::Parts, body: &[u8]| {
            let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_owned())?;
            if text.contains("forbidden") {
                return Err("this operation is not retried".to_owned());
            }
            Ok(text
                .lines()
                .filter(|line| !line.starts_with("sent_at="))
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes())
        })
        .layer(counting(runs.clone()));
    let first = send(&mut svc, post("/pay", Some("fn-1"), "amount=5\nsent_at=1")).await;
    let retry = send(&mut svc, post("/pay", Some("fn-1"), "amount=5\nsent_at=2")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    let other = send(&mut svc, post("/pay", Some("fn-1"), "amount=6\nsent_at=3")).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    let refused = send(&mut svc, post("/pay", Some("fn-2"), "forbidden")).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.problem_type(), "invalid-body");
    let detail: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(detail["detail"], "this operation is not retried");
    assert_eq!(runs.get(), 1);
}

/// The payments example fingerprints JSON when asked to, from its
/// environment.
#[tokio::test]
async fn the_payments_example_reads_idempotency_fingerprint() {
    let (_server, addr) =
        common::spawn_example("payments", &[("IDEMPOTENCY_FINGERPRINT", "json")]).await;
    let headers = [
        ("idempotency-key", "\"example-json\""),
        ("content-type", "application/json"),
    ];
    let first = common::request(
        addr,
        "POST",
        "/payments",
        &headers,
        r#"{"amount":5,"currency":"EUR"}"#,
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = common::request(
        addr,
        "POST",
        "/payments",
        &headers,
        r#"{ "currency": "EUR", "amount": 5 }"#,
    )
    .await;
    assert!(retry.replayed(), "{}: {:?}", retry.status, retry.body);
    assert_eq!(retry.body, first.body);
}
