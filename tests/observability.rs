//! What the layer logs: every decision, with the hashed storage key — and
//! never the client's key or credentials.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{Runs, counting, post, send, with_header};
use http::StatusCode;
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, MemoryBackend};

/// Collects everything the fmt subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

const SECRET_KEY: &str = "k-7f3a-secret-idempotency-key";
const TOKEN: &str = "Bearer tok_live_5eC39HqLyjWDarjt";

#[tokio::test]
async fn decisions_are_logged_with_the_hashed_key_only() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(MemoryBackend::new()).layer(counting(runs.clone()));
    let req = |body: &str| {
        with_header(
            post("/payments", Some(SECRET_KEY), body),
            "authorization",
            TOKEN,
        )
    };

    assert_eq!(send(&mut svc, req("{}")).await.status, StatusCode::CREATED);
    assert!(send(&mut svc, req("{}")).await.replayed());
    assert_eq!(
        send(&mut svc, req("{\"other\":1}")).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let malformed = with_header(
        post("/payments", Some("secret with spaces"), "{}"),
        "authorization",
        TOKEN,
    );
    assert_eq!(
        send(&mut svc, malformed).await.status,
        StatusCode::BAD_REQUEST
    );

    let logs = captured.text();
    for expected in [
        "key acquired; running the handler",
        "response stored",
        "replaying stored response",
        "key reused with a different request",
        "rejected malformed Idempotency-Key",
        "idempotency{key=",
    ] {
        assert!(logs.contains(expected), "missing {expected:?} in:\n{logs}");
    }
    // Every decision names the key by its SHA-256 storage key: 64 hex digits.
    let decisions = logs.lines().filter(|l| l.contains("idempotency{key="));
    for line in decisions {
        let hex: String = line
            .split("idempotency{key=")
            .nth(1)
            .unwrap()
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        assert_eq!(hex.len(), 64, "not a storage key: {line}");
    }
    for secret in [
        SECRET_KEY,
        "tok_live_5eC39HqLyjWDarjt",
        "secret with spaces",
    ] {
        assert!(
            !logs.contains(secret),
            "{secret:?} leaked into the logs:\n{logs}"
        );
    }
}
