//! Helpers for the tests that run against a real PostgreSQL.
//!
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`) names
//! the server. The tests fail, loudly, when it cannot be reached.
#![allow(dead_code)]

use tower_idempotency::{PostgresBackend, PostgresMode};

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub fn pool_for(url: &str, max_size: usize) -> deadpool_postgres::Pool {
    let mut config = deadpool_postgres::Config::new();
    config.url = Some(url.to_owned());
    config.pool = Some(deadpool_postgres::PoolConfig::new(max_size));
    config
        .create_pool(
            Some(deadpool_postgres::Runtime::Tokio1),
            tokio_postgres::NoTls,
        )
        .expect("a valid DATABASE_URL")
}

/// A pool on the server, after checking it answers.
pub async fn pool() -> deadpool_postgres::Pool {
    let url = database_url();
    // Small: the tests of a binary run side by side on a server with 100
    // connections.
    let pool = pool_for(&url, 8);
    let conn = pool.get().await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at {url} ({e}); start it (scripts/test does) or set DATABASE_URL"
        )
    });
    conn.simple_query("SELECT 1").await.unwrap();
    pool
}

/// The table the tests share; every test uses its own random keys.
pub const TABLE: &str = "idempotency_test_records";

/// A migrated backend in the default (lease) mode on the shared test table.
pub async fn backend() -> PostgresBackend {
    backend_in(PostgresMode::Lease).await
}

/// A migrated backend in `mode` on the shared test table.
pub async fn backend_in(mode: PostgresMode) -> PostgresBackend {
    migrated(PostgresBackend::builder(pool().await).mode(mode)).await
}

/// A migrated backend in `mode` with prepared statements.
pub async fn backend_prepared(mode: PostgresMode) -> PostgresBackend {
    migrated(
        PostgresBackend::builder(pool().await)
            .mode(mode)
            .prepared_statements(true),
    )
    .await
}

/// A migrated backend in `mode` whose sessions carry
/// `application_name = app`, so a test can find (and kill) exactly its own
/// server processes.
pub async fn backend_named(mode: PostgresMode, app: &str, max_size: usize) -> PostgresBackend {
    let url = format!("{}?application_name={app}", database_url());
    migrated(PostgresBackend::builder(pool_for(&url, max_size)).mode(mode)).await
}

/// `builder` on the shared test table, built and migrated.
async fn migrated(builder: tower_idempotency::PostgresBackendBuilder) -> PostgresBackend {
    let backend = builder.table(TABLE).build().unwrap();
    backend.migrate().await.unwrap();
    backend
}

/// The server pid of every session whose `application_name` is `app`.
pub async fn sessions_of(admin: &tokio_postgres::Client, app: &str) -> Vec<i32> {
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Kills the server processes of `pids`.
pub async fn terminate(admin: &tokio_postgres::Client, pids: &[i32]) {
    for pid in pids {
        admin
            .execute("SELECT pg_terminate_backend($1)", &[pid])
            .await
            .unwrap();
    }
}

/// A plain client for set-up and inspection.
pub async fn admin() -> tokio_postgres::Client {
    let url = database_url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is not reachable at {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// The advisory lock id the backend uses for a storage key.
pub fn lock_id(key: &tower_idempotency::StorageKey) -> i64 {
    let b = key.as_bytes();
    i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Backends holding the advisory lock `id` (`pg_locks` splits it in two).
pub async fn holders(admin: &tokio_postgres::Client, id: i64) -> Vec<i32> {
    admin
        .query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND ((classid::bigint << 32) | objid::bigint) = $1",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits (up to 10 s) until nobody holds the advisory lock `id`: a closed
/// session's locks go when the server has noticed the close.
pub async fn wait_unlocked(admin: &tokio_postgres::Client, id: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !holders(admin, id).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "advisory lock {id} is still held"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The server pid of `client`'s session.
pub async fn pid_of(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Whether a session whose `application_name` is `app` waits for a lock
/// (a row, a transaction) that the session `holder` holds.
pub async fn blocked_by(admin: &tokio_postgres::Client, app: &str, holder: i32) -> bool {
    let waiting: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND wait_event_type = 'Lock' AND $2 = ANY(pg_blocking_pids(pid))",
            &[&app, &holder],
        )
        .await
        .unwrap()
        .get(0);
    waiting > 0
}

/// Waits (up to 10 s) until a session of `app` waits for a lock that the
/// session `holder` holds: its statement has reached the row `holder` is
/// writing.
pub async fn wait_until_blocked_by(admin: &tokio_postgres::Client, app: &str, holder: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !blocked_by(admin, app, holder).await {
        assert!(
            std::time::Instant::now() < deadline,
            "no session of {app} waits for a lock of session {holder}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// A backend in `mode` on `table` (migrated), whose sessions carry
/// `application_name = app`, with a timeout long enough that only the test
/// ends its calls.
pub async fn backend_on_table(table: &str, mode: PostgresMode, app: &str) -> PostgresBackend {
    let url = format!("{}?application_name={app}", database_url());
    let backend = PostgresBackend::builder(pool_for(&url, 2))
        .table(table)
        .mode(mode)
        .timeout(std::time::Duration::from_mins(1))
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    backend
}

/// Waits (up to 10 s) until `task` has finished or a session of `app` waits
/// for a lock that the session `holder` holds: the statement got past the
/// row `holder` is writing, or reached it.
pub async fn wait_until_finished_or_blocked_by<T>(
    admin: &tokio_postgres::Client,
    app: &str,
    holder: i32,
    task: &tokio::task::JoinHandle<T>,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !task.is_finished() && !blocked_by(admin, app, holder).await {
        assert!(
            std::time::Instant::now() < deadline,
            "{app}: neither finished nor waits for a lock of session {holder}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
