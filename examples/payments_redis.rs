//! The payments API of `examples/payments.rs` on the Redis backend: run two
//! of them and they share one record of what ran.
//!
//! ```sh
//! cargo run --features redis --example payments_redis
//! ADDR=127.0.0.1:3001 cargo run --features redis --example payments_redis   # a second instance
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3001/payments   # replayed
//! ```
//!
//! (Both instances run their own handler counter, so `/stats` and
//! `GET /payments` show what each one ran.)
//!
//! Environment: `REDIS_URL` (default `redis://127.0.0.1:6379`),
//! `REDIS_PREFIX` (the keys' prefix; default the crate's), `ADDR`,
//! `PAYMENT_DELAY_MS`, `IDEMPOTENCY_FINGERPRINT`, `IDEMPOTENCY_WAIT_MS`, `IDEMPOTENCY_RETENTION_HEADER`, `SHUTDOWN_GRACE_SECS`, `RUST_LOG` and `IDEMPOTENCY=off` as in `payments`. Configure the
//! Redis server with `maxmemory-policy noeviction`.

#[path = "support/payments_app.rs"]
mod payments_app;

use std::time::Duration;

use tower_idempotency::deadpool_redis::{Config, Runtime};
use tower_idempotency::{IdempotencyLayer, RedisBackend};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    // Through the crate's re-export: the pool is of the type it takes.
    let pool = Config::from_url(url).create_pool(Some(Runtime::Tokio1))?;
    let backend = match std::env::var("REDIS_PREFIX") {
        Ok(prefix) => RedisBackend::builder(pool).prefix(prefix).build()?,
        Err(_) => RedisBackend::new(pool),
    };
    payments_app::serve(IdempotencyLayer::new(backend).ttl(Duration::from_hours(24))).await
}
