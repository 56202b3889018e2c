//! The fault suite (`tests/common/faults.rs`) on PostgreSQL, the server on
//! `DATABASE_URL`, in every mode: for outages through a fault-injecting
//! proxy (`tests/common/fault_proxy.rs`), so only this test's connections
//! suffer. Needs the `postgres` feature. Each test prints its counts.

mod common;
mod postgres_support;

use std::time::Duration;

use common::fault_proxy::FaultProxy;
use common::faults::{self, report, tag};

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

    /// Lease and advisory modes: the client still gets its response; in
    /// lease mode the save is made up once the server is back and the retry
    /// replays, in advisory mode the retry runs again. (Transaction mode
    /// answers 503 there, as its writes rolled back: `tests/postgres.rs`
    /// kills its session mid-handler.)
    #[tokio::test]
    async fn lost_between_handler_and_save() {
        migrated().await;
        for mode in [PostgresMode::Lease, PostgresMode::Advisory] {
            let (proxy, url) = proxied().await;
            let counts = faults::lost_between_handler_and_save(
                backend(pool_for(&url, 8), mode),
                &proxy,
                &tag(&format!("lost-{mode}")),
                mode == PostgresMode::Lease,
            )
            .await;
            report(
                &format!("postgres {mode}: lost between handler and save"),
                counts,
            );
        }
    }
}
