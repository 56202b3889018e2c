//! The fault suite (`tests/common/faults.rs`) on the memory backend; on
//! Redis and PostgreSQL in `tests/fault_suite_redis.rs` and
//! `tests/fault_suite_postgres.rs`. Each test prints its counts.

mod common;

use common::faults::{self, report, tag};

mod memory {
    use super::*;
    use tower_idempotency::MemoryBackend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_key_across_three_instances() {
        let backend = MemoryBackend::new();
        let counts = faults::same_key_across_instances(
            [backend.clone(), backend.clone(), backend],
            &tag("same"),
        )
        .await;
        report("memory: 200 same-key requests, 3 instances", counts);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retries_and_cancellations() {
        let counts = faults::retries_and_cancellations(MemoryBackend::new(), &tag("mix")).await;
        report(
            "memory: 1000 requests, 50 keys, retries and cancellations",
            counts,
        );
    }
}
