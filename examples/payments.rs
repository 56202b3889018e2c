//! A payments API protected by `tower-idempotency` (memory backend).
//!
//! Run it:
//!
//! ```sh
//! cargo run --example payments
//! ```
//!
//! Then create a payment twice with the same key — the handler runs once and
//! both answers carry the same id (the second with `Idempotent-Replayed: true`):
//!
//! ```sh
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! curl localhost:3000/stats      # {"handler_runs":1}
//! curl localhost:3000/payments   # the one payment
//! ```
//!
//! The same key with another body is answered `422`; a malformed key `400`.
//! With `IDEMPOTENCY_FINGERPRINT=json` the body counts by its JSON, not its
//! bytes: a retry whose client wrote the members in another order replays.
//!
//! ```sh
//! IDEMPOTENCY_FINGERPRINT=json cargo run --example payments
//! curl -i -H 'Idempotency-Key: "k2"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! curl -i -H 'Idempotency-Key: "k2"' -H 'content-type: application/json' \
//!      -d '{ "currency": "EUR", "amount": 5 }' localhost:3000/payments   # replayed
//! ```
//! To see a concurrent duplicate answered `409`, slow the handler down:
//! `PAYMENT_DELAY_MS=3000 cargo run --example payments`, then send the same
//! request from two terminals. With `IDEMPOTENCY_WAIT_MS` the duplicate
//! waits (up to that long) for the first one's response and replays it:
//!
//! ```sh
//! PAYMENT_DELAY_MS=3000 IDEMPOTENCY_WAIT_MS=10000 cargo run --example payments
//! curl -i -H 'Idempotency-Key: "k3"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments &
//! curl -i -H 'Idempotency-Key: "k3"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments   # 201, replayed
//! ```
//!
//! With `IDEMPOTENCY_RETENTION_HEADER=1` every answer to a keyed request
//! says how long its key is kept, in seconds:
//!
//! ```sh
//! IDEMPOTENCY_RETENTION_HEADER=1 cargo run --example payments
//! curl -si -H 'Idempotency-Key: "k4"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments | grep -i idempotency-ttl
//! # idempotency-ttl: 86400
//! ```
//!
//! Environment: `ADDR` (default `127.0.0.1:3000`; `127.0.0.1:0` picks a free
//! port, and the bound address is printed as `listening on <addr>`),
//! `PAYMENT_DELAY_MS` (default 0), `IDEMPOTENCY_FINGERPRINT` (`raw`, the
//! default, or `json`), `IDEMPOTENCY_WAIT_MS` (default: no wait),
//! `IDEMPOTENCY_RETENTION_HEADER` (`1`; default off), `SHUTDOWN_GRACE_SECS` (how long a `SIGTERM` waits
//! for payments in flight; default 10), `RUST_LOG` (default `info`),
//! `IDEMPOTENCY=off` (no layer: the baseline
//! for load comparisons), `MIN_RETENTION_SECS` (how long a record is kept at
//! the least; default one hour: past 100 000 young records, new keys are
//! answered `503` — `0` evicts the oldest instead, as load runs need).

#[path = "support/payments_app.rs"]
mod payments_app;

use std::time::Duration;

use tower_idempotency::{IdempotencyLayer, MemoryBackend};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut backend = MemoryBackend::builder().max_entries(100_000);
    if let Some(secs) = std::env::var("MIN_RETENTION_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        backend = backend.min_retention(Duration::from_secs(secs));
    }
    let backend = backend.build();
    payments_app::serve(IdempotencyLayer::new(backend).ttl(Duration::from_hours(24))).await
}
