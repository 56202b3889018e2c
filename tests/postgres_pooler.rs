//! The PostgreSQL backend behind PgBouncer: `migrate()` refuses a
//! transaction-mode pooler and works through a session-mode one. Each test
//! starts its own `pgbouncer` (installed by `scripts/test`).

mod conformance;
mod postgres_support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use postgres_support::{database_url, pool_for};
use tower_idempotency::{BackendErrorKind, PostgresBackend};

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

#[tokio::test]
async fn transaction_mode_pooler_is_refused_at_migrate() {
    let bouncer = PgBouncer::start("transaction");
    let backend = PostgresBackend::builder(pool_for(&bouncer.url(), 4))
        .table(postgres_support::TABLE)
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
async fn session_mode_pooler_works() {
    let bouncer = PgBouncer::start("session");
    let backend = PostgresBackend::builder(pool_for(&bouncer.url(), 4))
        .table(postgres_support::TABLE)
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    conformance::complete_stores_and_unlocks(backend.clone()).await;
    conformance::concurrent_begin_has_one_winner(backend).await;
}
