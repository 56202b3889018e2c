//! The PostgreSQL backend behind PgBouncer: `migrate()` refuses a
//! transaction-mode pooler and works through a session-mode one. Each test
//! starts its own `pgbouncer` (installed by `scripts/test`).

mod common;
mod conformance;
mod postgres_support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::{Runs, slow_payment};
use postgres_support::{database_url, pool_for};
use tower::Layer;
use tower_idempotency::{BackendErrorKind, IdempotencyLayer, PostgresBackend, PostgresMode};

struct PgBouncer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl PgBouncer {
    fn start(pool_mode: &str) -> Self {
        let upstream = tokio_postgres::Config::from_str(&database_url()).unwrap();
        let host = match &upstream.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(_) => "127.0.0.1".to_owned(),
        };
        let port_up = upstream.get_ports().first().copied().unwrap_or(5432);
        let db = upstream.get_dbname().unwrap_or("test").to_owned();
        let user = upstream.get_user().unwrap_or("postgres").to_owned();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!(
            "tower-idem-pgbouncer-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("userlist.txt"), format!("\"{user}\" \"\"\n")).unwrap();
        let ini = format!(
            "[databases]\n{db} = host={host} port={port_up} dbname={db}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {dir}/userlist.txt\n\
             pool_mode = {pool_mode}\ndefault_pool_size = 4\nmax_client_conn = 100\n\
             logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
        // PgBouncer refuses to run as root: it switches to `postgres`.
        let _ = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status();
        let child = Command::new("pgbouncer")
            .args(["-u", "postgres"])
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "pgbouncer is not installed: scripts/test installs it (apt-get install pgbouncer)",
            );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not start; see {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port, dir }
    }

    fn url(&self) -> String {
        let upstream = tokio_postgres::Config::from_str(&database_url()).unwrap();
        let db = upstream.get_dbname().unwrap_or("test");
        let user = upstream.get_user().unwrap_or("postgres");
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Advisory mode needs sessions: `migrate` (through `verify`) refuses a
/// transaction-mode pooler.
#[tokio::test]
async fn transaction_mode_pooler_is_refused_in_advisory_mode() {
    let bouncer = PgBouncer::start("transaction");
    let backend = PostgresBackend::builder(pool_for(&bouncer.url(), 4))
        .table(postgres_support::TABLE)
        .mode(PostgresMode::Advisory)
        .build()
        .unwrap();
    let error = backend.migrate().await.unwrap_err();
    assert_eq!(error.kind(), BackendErrorKind::Misconfigured, "{error}");
    assert!(
        error.to_string().contains("transaction-mode pooler"),
        "{error}"
    );
}

#[tokio::test]
async fn session_mode_pooler_works_in_advisory_mode() {
    let bouncer = PgBouncer::start("session");
    let backend = PostgresBackend::builder(pool_for(&bouncer.url(), 4))
        .table(postgres_support::TABLE)
        .mode(PostgresMode::Advisory)
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    conformance::run_only(
        backend,
        conformance::Locks::Session,
        &[
            "complete_stores_and_unlocks",
            "concurrent_begin_has_one_winner",
        ],
    )
    .await;
}

fn behind(bouncer: &PgBouncer, mode: PostgresMode) -> PostgresBackend {
    PostgresBackend::builder(pool_for(&bouncer.url(), 8))
        .table(postgres_support::TABLE)
        .mode(mode)
        .build()
        .unwrap()
}

/// Lease mode behind PgBouncer in transaction mode: the whole conformance
/// suite, then two instances and a hundred duplicates run the handler once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_works_behind_a_transaction_mode_pooler() {
    let bouncer = PgBouncer::start("transaction");
    let backend = behind(&bouncer, PostgresMode::Lease);
    backend.migrate().await.unwrap();
    conformance::run_all(backend, conformance::Locks::Lapse).await;
    hundred_duplicates_run_once(&bouncer, PostgresMode::Lease).await;
}

/// Transaction mode holds its transaction on one server connection, so it
/// works behind a transaction-mode pooler too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_works_behind_a_transaction_mode_pooler() {
    let bouncer = PgBouncer::start("transaction");
    let backend = behind(&bouncer, PostgresMode::Transaction);
    backend.migrate().await.unwrap();
    conformance::run_all(backend, conformance::Locks::Session).await;
    hundred_duplicates_run_once(&bouncer, PostgresMode::Transaction).await;
}

async fn hundred_duplicates_run_once(bouncer: &PgBouncer, mode: PostgresMode) {
    let runs = Runs::default();
    let handler = slow_payment(runs.clone(), Duration::from_millis(200));
    let instances: Vec<_> = (0..2)
        .map(|_| IdempotencyLayer::new(behind(bouncer, mode)).layer(handler.clone()))
        .collect();
    let key = format!(
        "\"bouncer-{mode}-{}-{:?}\"",
        std::process::id(),
        Instant::now()
    )
    .replace(' ', "");
    common::hundred_at_once(&instances, &key).await;
    assert_eq!(runs.get(), 1, "{mode}: the handler must run once");
}

/// Named prepared statements need real sessions: `verify` refuses them
/// behind a transaction-mode pooler, in lease mode as in transaction mode.
#[tokio::test]
async fn prepared_statements_are_refused_behind_a_transaction_mode_pooler() {
    let bouncer = PgBouncer::start("transaction");
    for mode in [PostgresMode::Lease, PostgresMode::Transaction] {
        let backend = PostgresBackend::builder(pool_for(&bouncer.url(), 4))
            .table(postgres_support::TABLE)
            .mode(mode)
            .prepared_statements(true)
            .build()
            .unwrap();
        let error = backend.migrate().await.unwrap_err();
        assert_eq!(error.kind(), BackendErrorKind::Misconfigured, "{error}");
        assert!(error.to_string().contains("prepared_statements"), "{error}");
    }
}
