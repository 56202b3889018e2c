//! The shared PostgreSQL is stopped and started again mid-run: requests get
//! `503` during the outage and the same service recovers afterwards. Its own
//! test binary, as it takes the server away from everything else.

mod common;
mod postgres_support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Runs, counting, gated, post, send, until_settled};
use http::StatusCode;
use postgres_support::{TABLE, database_url, pool_for};
use tower::Layer;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, PostgresBackend, PostgresMode};

fn cluster_version() -> String {
    let versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL installation (/etc/postgresql)")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert_eq!(
        versions.len(),
        1,
        "one PostgreSQL cluster version: {versions:?}"
    );
    versions[0].clone()
}

fn pg_ctl(action: &str) {
    let status = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &cluster_version(),
            "main",
            action,
        ])
        .args(if action == "stop" {
            &["-m", "fast"][..]
        } else {
            &[][..]
        })
        .status()
        .expect("pg_ctlcluster is installed");
    assert!(status.success(), "pg_ctlcluster {action} failed");
}

/// Starts the server again even if the test fails half-way.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = Command::new("pg_ctlcluster")
            .args([
                "--skip-systemctl-redirect",
                &cluster_version(),
                "main",
                "start",
            ])
            .status();
    }
}

/// The tests of this binary take the server away: one at a time.
static SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn outage_is_503_and_the_service_recovers() {
    let _server = SERVER.lock().await;
    let backend = PostgresBackend::builder(pool_for(&database_url(), 8))
        .table(TABLE)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend).layer(counting(runs.clone()));
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    assert_eq!(
        send(&mut svc, post("/p", Some(&format!("before-{nonce}")), "x"))
            .await
            .status,
        StatusCode::CREATED
    );

    let _restart = Restart;
    pg_ctl("stop");
    for i in 0..3 {
        let started = Instant::now();
        let answer = send(
            &mut svc,
            post("/p", Some(&format!("down-{nonce}-{i}")), "x"),
        )
        .await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.problem_type(), "backend-unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "no hang: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(runs.get(), 1, "fail closed");
    pg_ctl("start");

    // The pool drops its dead connections; allow the server a moment to
    // accept connections again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let key = format!("after-{nonce}");
    loop {
        let answer = send(&mut svc, post("/p", Some(&key), "x")).await;
        if answer.status == StatusCode::CREATED {
            break;
        }
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "no recovery after the restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(send(&mut svc, post("/p", Some(&key), "x")).await.replayed());
}

/// Lease mode: the server restarts while the handler runs. The lease is a
/// committed row, so it outlives every session: the duplicate after the
/// restart is told to wait, never run, and the first request stores its
/// record once the server is back.
#[tokio::test]
async fn lease_outlives_a_server_restart_mid_handler() {
    let _server = SERVER.lock().await;
    let backend = PostgresBackend::builder(pool_for(&database_url(), 8))
        .table(TABLE)
        .mode(PostgresMode::Lease)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    let runs = Runs::default();
    let (handler, gate) = gated(runs.clone());
    let svc = IdempotencyLayer::new(backend)
        .lock_ttl(Duration::from_mins(1))
        .layer(handler);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let key = format!("restarted-{nonce}");
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some(&key), "x")));
    gate.started.await.unwrap();
    {
        let _restart = Restart;
        pg_ctl("restart");
    }
    // Until the server accepts connections again: 503, never a run.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dup = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
        match dup.status {
            StatusCode::CONFLICT => break,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(Instant::now() < deadline, "the server did not come back");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("a duplicate got {other}: {:?}", dup.body),
        }
    }
    assert_eq!(runs.get(), 1, "the duplicate never ran");
    gate.finish.send(()).unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let retry = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
    assert!(retry.replayed(), "{:?}", retry.body);
    assert_eq!(retry.body, "run 1");
    assert_eq!(runs.get(), 1);
}

/// Lease mode: the server stops while the handler runs and is started
/// again within the lock TTL. The handler's `complete` cannot reach it, so
/// the client still gets its response and the store is tried again in the
/// background, fenced by the lease's token: once the server is back the
/// record lands, and the retry replays instead of waiting for the lease to
/// lapse and running the handler a second time.
#[tokio::test]
async fn a_store_that_failed_during_an_outage_lands_when_the_server_is_back() {
    let _server = SERVER.lock().await;
    let backend = PostgresBackend::builder(pool_for(&database_url(), 8))
        .table(TABLE)
        .mode(PostgresMode::Lease)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    let runs = Runs::default();
    let (handler, gate) = gated(runs.clone());
    let svc = IdempotencyLayer::new(backend)
        .lock_ttl(Duration::from_mins(1))
        .layer(handler);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let key = format!("late-{nonce}");
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some(&key), "x")));
    gate.started.await.unwrap();
    let restart = Restart;
    pg_ctl("stop");
    gate.finish.send(()).unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        first.status(),
        StatusCode::OK,
        "the client gets its response although it could not be stored yet"
    );
    pg_ctl("start");
    drop(restart);

    // Well within the minute the lock would hold the key.
    let retry = until_settled(
        &svc,
        || post("/p", Some(&key), "x"),
        Duration::from_secs(30),
    )
    .await;
    assert!(retry.replayed(), "{}: {:?}", retry.status, retry.body);
    assert_eq!(retry.body, "run 1");
    assert_eq!(runs.get(), 1, "the handler ran once");
}
