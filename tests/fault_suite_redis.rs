//! The fault suite (`tests/common/faults.rs`) on Redis, the shared server
//! on `REDIS_URL`: for outages through a fault-injecting proxy
//! (`tests/common/fault_proxy.rs`), so only this test's connections suffer.
//! Needs the `redis` feature. Each test prints its counts.

mod common;
mod redis_support;

use std::time::Duration;

use common::fault_proxy::FaultProxy;
use common::faults::{self, report, tag};

mod redis {
    use super::*;
    use crate::redis_support::{pool_for, redis_url, unique_prefix};
    use tower_idempotency::RedisBackend;

    fn backend(url: &str, prefix: &str) -> RedisBackend {
        RedisBackend::builder(pool_for(url))
            .prefix(prefix)
            .timeout(Duration::from_millis(500))
            .build()
            .unwrap()
    }

    async fn proxied() -> (FaultProxy, String) {
        let url = redis_url();
        let target = url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .parse()
            .expect("REDIS_URL of the form redis://host:port");
        let proxy = FaultProxy::start(target).await;
        let url = format!("redis://127.0.0.1:{}", proxy.port());
        (proxy, url)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_key_across_three_instances() {
        let prefix = unique_prefix();
        let url = redis_url();
        let counts = faults::same_key_across_instances(
            [
                backend(&url, &prefix),
                backend(&url, &prefix),
                backend(&url, &prefix),
            ],
            &tag("same"),
        )
        .await;
        report("redis: 200 same-key requests, 3 instances", counts);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retries_and_cancellations() {
        let counts =
            faults::retries_and_cancellations(backend(&redis_url(), &unique_prefix()), &tag("mix"))
                .await;
        report(
            "redis: 1000 requests, 50 keys, retries and cancellations",
            counts,
        );
    }

    #[tokio::test]
    async fn blackholed_reset_and_slow() {
        let (proxy, url) = proxied().await;
        let counts = faults::outages(
            backend(&url, &unique_prefix()),
            &proxy,
            Duration::from_secs(3),
            &tag("outage"),
        )
        .await;
        report("redis: blackhole, reset, latency", counts);
    }

    #[tokio::test]
    async fn lost_between_handler_and_save() {
        let (proxy, url) = proxied().await;
        let counts = faults::lost_between_handler_and_save(
            backend(&url, &unique_prefix()),
            &proxy,
            &tag("lost"),
            true,
        )
        .await;
        report("redis: lost between handler and save", counts);
    }
}
