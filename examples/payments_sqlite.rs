//! The payments API of `examples/payments.rs` on the SQLite backend: the
//! records live in a file, so they survive a restart, and two processes on
//! one host that open the same file share them.
//!
//! ```sh
//! cargo run --features sqlite --example payments_sqlite
//! ADDR=127.0.0.1:3001 cargo run --features sqlite --example payments_sqlite   # a second process
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3001/payments   # replayed
//! ```
//!
//! Stop the first one (Ctrl-C) and start it again: the retry still replays.
//! (Each process runs its own handler counter, so `/stats` and
//! `GET /payments` show what each one ran.)
//!
//! Environment: `SQLITE_PATH` (the file; default
//! `payments-idempotency.sqlite3` in the working directory),
//! `SQLITE_SYNCHRONOUS` (`full`, the default: every stored record is on
//! disk before it is answered; `normal`: fewer flushes, a record may be lost
//! with the machine but not with the process), `ADDR`,
//! `PAYMENT_DELAY_MS`, `IDEMPOTENCY_FINGERPRINT`, `IDEMPOTENCY_WAIT_MS`,
//! `IDEMPOTENCY_RETENTION_HEADER`, `SHUTDOWN_GRACE_SECS`, `RUST_LOG` and
//! `IDEMPOTENCY=off` as in `payments`.

#[path = "support/payments_app.rs"]
mod payments_app;

use std::time::Duration;

use tower_idempotency::{IdempotencyLayer, SqliteBackend};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path =
        std::env::var("SQLITE_PATH").unwrap_or_else(|_| "payments-idempotency.sqlite3".to_owned());
    let mut builder = SqliteBackend::builder(&path);
    match std::env::var("SQLITE_SYNCHRONOUS").as_deref() {
        Err(_) | Ok("full") => {}
        Ok("normal") => builder = builder.relaxed_durability(),
        Ok(other) => return Err(format!("SQLITE_SYNCHRONOUS={other:?}: use full or normal").into()),
    }
    let backend = builder.open().await?;
    // Expired rows are never answered; deleting them keeps the file small.
    let purging = backend.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_mins(5));
        loop {
            every.tick().await;
            if let Err(error) = purging.purge_expired(10_000).await {
                tracing::warn!(%error, "purging expired idempotency records failed");
            }
        }
    });
    payments_app::serve(IdempotencyLayer::new(backend).ttl(Duration::from_hours(24))).await
}
