//! What a client that retries meets (`tests/retry_scenarios/`), on the
//! Redis backend (the shared server on `REDIS_URL`). Needs the `redis`
//! feature.

mod common;
mod redis_support;
mod retry_scenarios;

use std::time::Duration;

use retry_scenarios::*;

mod redis {
    use super::*;
    use crate::redis_support::backend;

    scenarios!(backend().await);

    /// Real time: a 2 s lock.
    #[tokio::test]
    async fn crashed_holder() {
        a_crashed_holder_blocks_the_key_at_most_the_lock_ttl(
            backend().await,
            Duration::from_secs(2),
        )
        .await;
    }
}
