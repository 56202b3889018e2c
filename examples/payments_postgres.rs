//! The payments API of `examples/payments.rs` on the PostgreSQL backend: run
//! two of them and they share one record of what ran.
//!
//! ```sh
//! cargo run --features postgres --example payments_postgres
//! ADDR=127.0.0.1:3001 cargo run --features postgres --example payments_postgres   # a second instance
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3001/payments   # replayed
//! ```
//!
//! At start-up it creates the table (`migrate`), and every five minutes it
//! deletes expired records (`purge_expired`).
//!
//! Environment: `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), `IDEMPOTENCY_TABLE` (default
//! `idempotency_records`), `ADDR`, `PAYMENT_DELAY_MS` and
//! `IDEMPOTENCY=off` as in `payments`. Each request in flight holds one pooled
//! connection; connect directly or through a session-mode pooler, never a
//! transaction-mode one.

#[path = "support/payments_app.rs"]
mod payments_app;

use std::time::Duration;

use tower_idempotency::{IdempotencyLayer, PostgresBackend};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let mut config = deadpool_postgres::Config::new();
    config.url = Some(url);
    config.pool = Some(deadpool_postgres::PoolConfig::new(64));
    let pool = config.create_pool(
        Some(deadpool_postgres::Runtime::Tokio1),
        tokio_postgres::NoTls,
    )?;
    let backend = match std::env::var("IDEMPOTENCY_TABLE") {
        Ok(table) => PostgresBackend::builder(pool).table(table).build()?,
        Err(_) => PostgresBackend::new(pool),
    };
    backend.migrate().await?;

    let purger = backend.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_mins(5));
        loop {
            every.tick().await;
            if let Err(error) = purger.purge_expired(1000).await {
                eprintln!("purging expired idempotency records failed: {error}");
            }
        }
    });

    payments_app::serve(IdempotencyLayer::new(backend).ttl(Duration::from_hours(24))).await
}
