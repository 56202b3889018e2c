//! The fault suite (`tests/common/faults.rs`) on every backend: memory,
//! Redis and PostgreSQL; for the servers through a fault-injecting proxy
//! (`tests/common/fault_proxy.rs`), so only this test's connections suffer.
//! Each test prints its counts.

mod common;
#[cfg(feature = "postgres")]
mod postgres_support;
#[cfg(feature = "redis")]
mod redis_support;

use std::time::Duration;

use common::fault_proxy::FaultProxy;
use common::faults::{self, Counts};

fn report(name: &str, counts: Counts) {
    println!(
        "{name}: {} requests, {} handler runs, {} keys run more than once, {} panics",
        counts.requests, counts.handler_runs, counts.duplicates, counts.panics
    );
}

fn tag(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

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

#[cfg(feature = "redis")]
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
        )
        .await;
        report("redis: lost between handler and save", counts);
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::postgres_support::{TABLE, database_url, pool, pool_for};
    use tower_idempotency::{PostgresBackend, PostgresMode};

    const MODES: [PostgresMode; 3] = [
        PostgresMode::Lease,
        PostgresMode::Advisory,
        PostgresMode::Transaction,
    ];

    /// A backend with a short timeout (outages are answered fast) or a
    /// generous one (many requests wait for a pooled connection).
    fn backend_with(
        pool: deadpool_postgres::Pool,
        timeout: Duration,
        mode: PostgresMode,
    ) -> PostgresBackend {
        PostgresBackend::builder(pool)
            .table(TABLE)
            .timeout(timeout)
            .mode(mode)
            .build()
            .unwrap()
    }

    fn backend(pool: deadpool_postgres::Pool, mode: PostgresMode) -> PostgresBackend {
        backend_with(pool, Duration::from_millis(500), mode)
    }

    /// The server's address from `DATABASE_URL`, and a URL through a proxy.
    async fn proxied() -> (FaultProxy, String) {
        let url = database_url();
        let (head, rest) = url
            .split_once('@')
            .expect("DATABASE_URL with user@host:port/db");
        let (hostport, db) = rest.split_once('/').expect("DATABASE_URL with a database");
        let target = hostport.parse().expect("DATABASE_URL with host:port");
        let proxy = FaultProxy::start(target).await;
        let url = format!("{head}@127.0.0.1:{}/{db}", proxy.port());
        (proxy, url)
    }

    async fn migrated() {
        backend(pool().await, PostgresMode::Lease)
            .migrate()
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_key_across_three_instances() {
        migrated().await;
        let url = database_url();
        for mode in MODES {
            let counts = faults::same_key_across_instances(
                // 24 connections for 200 requests: most wait for one.
                [0, 1, 2].map(|_| backend_with(pool_for(&url, 8), Duration::from_secs(5), mode)),
                &tag(&format!("same-{mode}")),
            )
            .await;
            report(
                &format!("postgres {mode}: 200 same-key requests, 3 instances"),
                counts,
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retries_and_cancellations() {
        migrated().await;
        for mode in MODES {
            let counts = faults::retries_and_cancellations(
                backend_with(pool_for(&database_url(), 24), Duration::from_secs(5), mode),
                &tag(&format!("mix-{mode}")),
            )
            .await;
            report(
                &format!("postgres {mode}: 1000 requests, 50 keys, retries and cancellations"),
                counts,
            );
        }
    }

    #[tokio::test]
    async fn blackholed_reset_and_slow() {
        migrated().await;
        for mode in MODES {
            let (proxy, url) = proxied().await;
            let counts = faults::outages(
                backend(pool_for(&url, 8), mode),
                &proxy,
                Duration::from_secs(3),
                &tag(&format!("outage-{mode}")),
            )
            .await;
            report(
                &format!("postgres {mode}: blackhole, reset, latency"),
                counts,
            );
        }
    }

    /// Lease and advisory modes: the client still gets its response and the
    /// retry runs again. (Transaction mode answers 503 there, as its writes
    /// rolled back: `tests/postgres.rs` kills its session mid-handler.)
    #[tokio::test]
    async fn lost_between_handler_and_save() {
        migrated().await;
        for mode in [PostgresMode::Lease, PostgresMode::Advisory] {
            let (proxy, url) = proxied().await;
            let counts = faults::lost_between_handler_and_save(
                backend(pool_for(&url, 8), mode),
                &proxy,
                &tag(&format!("lost-{mode}")),
            )
            .await;
            report(
                &format!("postgres {mode}: lost between handler and save"),
                counts,
            );
        }
    }
}
