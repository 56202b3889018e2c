//! What a client that retries meets (`tests/retry_scenarios/`), on the
//! memory backend. `tests/retry_redis.rs` and `tests/retry_postgres.rs` run
//! the same scenarios on Redis and PostgreSQL.

mod common;
mod retry_scenarios;

use std::time::Duration;

use common::Runs;
use http::StatusCode;
use retry_scenarios::*;
use tower_idempotency::{IdempotencyLayer, MemoryBackend};

mod memory {
    use super::*;

    scenarios!(MemoryBackend::new());

    /// A bare key holding a `,` is two keys joined by a proxy: `400`.
    #[tokio::test]
    async fn joined_keys() {
        let runs = Runs::default();
        let app = payments(IdempotencyLayer::new(MemoryBackend::new()), runs.clone());
        for key in ["a,b", "a, b"] {
            let answer = call(&app, keyed(key, &[], "{}")).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST);
            assert_eq!(answer.problem_type(), "invalid-key");
        }
        let quoted = call(&app, keyed("\"a,b\"", &[], "{}")).await;
        assert_eq!(quoted.status, StatusCode::CREATED);
        assert_eq!(runs.get(), 1);
    }

    /// With the default lock TTL (10 s), in paused time.
    #[tokio::test(start_paused = true)]
    async fn crashed_holder() {
        a_crashed_holder_blocks_the_key_at_most_the_lock_ttl(
            MemoryBackend::new(),
            Duration::from_secs(10),
        )
        .await;
    }
}
