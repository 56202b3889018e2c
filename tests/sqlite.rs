//! The SQLite backend: the published conformance suite, instances sharing
//! one file, records that survive a reopen and a process killed
//! mid-handler, and files that are corrupt or locked.

mod common;
mod conformance;

use std::time::Duration;

use common::{Runs, TempDb, post, send, slow_payment};
use http::StatusCode;
use tower::Layer;
use tower_idempotency::{
    Backend, BackendErrorKind, Begin, Completion, IdempotencyLayer, SqliteBackend,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes() {
    let db = TempDb::new("conformance");
    let backend = SqliteBackend::open(db.path()).await.unwrap();
    conformance::run_all(backend, conformance::Locks::Lapse).await;
}

/// Two backends on one file (as two processes would open it), a hundred
/// concurrent duplicates: the handler runs once, every answer is its.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_file_run_a_hundred_duplicates_once() {
    let db = TempDb::new("instances");
    let runs = Runs::default();
    let handler = slow_payment(runs.clone(), Duration::from_millis(200));
    let mut instances = Vec::new();
    for _ in 0..2 {
        let backend = SqliteBackend::open(db.path()).await.unwrap();
        instances.push(IdempotencyLayer::new(backend).layer(handler.clone()));
    }
    common::hundred_at_once(&instances, "\"sqlite-hot\"").await;
    assert_eq!(runs.get(), 1);
}

/// A stored record is still there when the file is opened again (a
/// restart), and its expiry is kept.
#[tokio::test]
async fn records_survive_a_reopen() {
    let db = TempDb::new("reopen");
    let key = conformance::fresh_key();
    let fp = conformance::fingerprint(1);
    {
        let backend = SqliteBackend::open(db.path()).await.unwrap();
        let Begin::Acquired(lock) = backend
            .begin(&key, &fp, Duration::from_secs(5))
            .await
            .unwrap()
        else {
            panic!("fresh key");
        };
        let saved = backend
            .complete(
                lock,
                conformance::record(fp, b"kept"),
                Duration::from_hours(1),
            )
            .await
            .unwrap();
        assert_eq!(saved, Completion::Saved);
    }
    let backend = SqliteBackend::open(db.path()).await.unwrap();
    match backend
        .begin(&key, &fp, Duration::from_secs(5))
        .await
        .unwrap()
    {
        Begin::Completed(record) => assert_eq!(record.body, "kept"),
        other => panic!("{other:?}"),
    }
    assert!(backend.forget(&key).await.unwrap());
    assert!(matches!(
        backend
            .begin(&key, &fp, Duration::from_secs(5))
            .await
            .unwrap(),
        Begin::Acquired(_)
    ));
}

/// `purge_expired` deletes what expired, and only that.
#[tokio::test]
async fn purge_deletes_only_what_expired() {
    let db = TempDb::new("purge");
    let backend = SqliteBackend::open(db.path()).await.unwrap();
    let fp = conformance::fingerprint(2);
    let (short, long) = (conformance::fresh_key(), conformance::fresh_key());
    for (key, ttl) in [
        (&short, Duration::from_millis(100)),
        (&long, Duration::from_hours(1)),
    ] {
        let Begin::Acquired(lock) = backend
            .begin(key, &fp, Duration::from_secs(5))
            .await
            .unwrap()
        else {
            panic!("fresh key");
        };
        backend
            .complete(lock, conformance::record(fp, b"x"), ttl)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backend.purge_expired(100).await.unwrap(), 1);
    assert!(matches!(
        backend
            .begin(&long, &fp, Duration::from_secs(5))
            .await
            .unwrap(),
        Begin::Completed(_)
    ));
}

/// A file that is not a database is refused with a clear, typed error.
#[tokio::test]
async fn a_file_that_is_not_a_database_is_misconfigured() {
    let db = TempDb::new("garbage");
    std::fs::write(db.path(), vec![0x5a_u8; 8192]).unwrap();
    let error = SqliteBackend::open(db.path()).await.unwrap_err();
    assert_eq!(error.kind(), BackendErrorKind::Misconfigured);
    assert!(
        error.to_string().contains(&db.path().display().to_string()),
        "{error}"
    );
}

/// A file another process holds locked longer than the busy timeout: the
/// call fails as a timeout (the layer answers `503`), nothing runs.
#[tokio::test]
async fn a_locked_file_times_out_with_503() {
    let db = TempDb::new("locked");
    let backend = SqliteBackend::builder(db.path())
        .busy_timeout(Duration::from_millis(200))
        .open()
        .await
        .unwrap();
    let holder = rusqlite::Connection::open(db.path()).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(backend).layer(common::counting(runs.clone()));
    let answer = send(&mut svc.clone(), post("/p", Some("\"locked\""), "{}")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.get(), 0);
    holder.execute_batch("ROLLBACK").unwrap();
    let answer = send(&mut svc.clone(), post("/p", Some("\"locked\""), "{}")).await;
    assert_eq!(answer.status, StatusCode::CREATED);
}

/// A stored record whose bytes were altered is a typed error (`Corrupt`,
/// or `Incompatible` for bytes that look like another format version),
/// never a panic and never a second run.
#[tokio::test]
async fn an_altered_record_is_corrupt_never_run_again() {
    let db = TempDb::new("altered");
    let backend = SqliteBackend::open(db.path()).await.unwrap();
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(backend).layer(common::counting(runs.clone()));
    let first = send(&mut svc.clone(), post("/p", Some("\"altered\""), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let admin = rusqlite::Connection::open(db.path()).unwrap();
    // Bytes flipped in place, then bytes of another type altogether.
    for alteration in [
        "UPDATE idempotency_records SET record = CAST(substr(record, 1, length(record) - 3) || x'000000' AS BLOB)",
        "UPDATE idempotency_records SET record = 'not a record'",
        "UPDATE idempotency_records SET record = 42",
    ] {
        admin.execute_batch(alteration).unwrap();
        let retry = send(&mut svc.clone(), post("/p", Some("\"altered\""), "{}")).await;
        // Unreadable (`500`), or in a format this version does not know
        // (`503`: another instance may read it): never run again.
        let kind = retry.problem_type();
        assert!(
            matches!(
                (retry.status.as_u16(), kind.as_str()),
                (500, "stored-response-unreadable") | (503, "stored-response-incompatible")
            ),
            "{alteration}: {} {kind}",
            retry.status
        );
    }
    assert_eq!(runs.get(), 1);
}

/// Two example processes on one file share records, and a record survives
/// the process: killed (`SIGKILL`) and started again, it replays.
#[tokio::test]
async fn example_processes_share_one_file_and_survive_a_kill() {
    let db = TempDb::new("example");
    let path = db.path().display().to_string();
    common::example_instances_share_one_record(
        "payments_sqlite",
        ("SQLITE_PATH", &path),
        "\"sqlite-example\"",
    )
    .await;
    let (mut first, addr) =
        common::spawn_example("payments_sqlite", &[("SQLITE_PATH", &path)]).await;
    let headers = [
        ("idempotency-key", "\"sqlite-kill\""),
        ("content-type", "application/json"),
    ];
    let body = r#"{"amount":7,"currency":"EUR"}"#;
    let created = common::request(addr, "POST", "/payments", &headers, body).await;
    assert_eq!(created.status, StatusCode::CREATED);
    first.kill().await.unwrap();
    let (_again, addr) = common::spawn_example("payments_sqlite", &[("SQLITE_PATH", &path)]).await;
    let retry = common::request(addr, "POST", "/payments", &headers, body).await;
    assert!(retry.replayed(), "{}: {:?}", retry.status, retry.body);
    assert_eq!(retry.body, created.body);
}

/// A process killed while its handler runs leaves a lease, never a stuck
/// key: another process answers `409` until the lease lapses
/// (`lock_ttl`, 10 s), then runs the payment.
#[tokio::test]
async fn a_process_killed_mid_handler_leaves_the_key_free_after_the_lease() {
    let db = TempDb::new("killed");
    let path = db.path().display().to_string();
    let env = [
        ("SQLITE_PATH", path.as_str()),
        ("PAYMENT_DELAY_MS", "30000"),
    ];
    let (mut doomed, addr) = common::spawn_example("payments_sqlite", &env).await;
    let headers = [
        ("idempotency-key", "\"sqlite-killed\""),
        ("content-type", "application/json"),
    ];
    let body = r#"{"amount":9,"currency":"EUR"}"#;
    let inflight =
        tokio::spawn(
            async move { common::request(addr, "POST", "/payments", &headers, body).await },
        );
    tokio::time::sleep(Duration::from_millis(500)).await;
    doomed.kill().await.unwrap();
    let _ = inflight.await;
    let (_other, addr) = common::spawn_example(
        "payments_sqlite",
        &[("SQLITE_PATH", path.as_str()), ("PAYMENT_DELAY_MS", "0")],
    )
    .await;
    let busy = common::request(addr, "POST", "/payments", &headers, body).await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    let wait: u64 = busy.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait <= 10, "{wait}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let answer = common::request(addr, "POST", "/payments", &headers, body).await;
        if answer.status == StatusCode::CREATED {
            assert!(!answer.replayed());
            break;
        }
        assert_eq!(answer.status, StatusCode::CONFLICT);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key stayed locked"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A `begin` dropped while its write waits (the client left, a timeout
/// fired) gives back the lease it takes, at once: the key does not wait out
/// a minute-long lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_begin_releases_its_lease_at_once() {
    let db = TempDb::new("dropped");
    let backend = SqliteBackend::builder(db.path())
        .busy_timeout(Duration::from_secs(10))
        .open()
        .await
        .unwrap();
    let fp = conformance::fingerprint(3);
    let long = Duration::from_mins(1);
    for _ in 0..3 {
        let key = conformance::fresh_key();
        // Another process holds the write lock: the begin's write waits.
        let holder = rusqlite::Connection::open(db.path()).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let dropped =
            tokio::time::timeout(Duration::from_millis(300), backend.begin(&key, &fp, long)).await;
        assert!(
            dropped.is_err(),
            "the begin did not wait for the write lock"
        );
        holder.execute_batch("COMMIT").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match backend.begin(&key, &fp, long).await.unwrap() {
                Begin::Acquired(lock) => {
                    backend.release(lock).await.unwrap();
                    break;
                }
                Begin::Busy { .. } => {}
                Begin::Completed(_) => panic!("nothing was stored"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the lease was left to lapse"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The fault cases that apply to a file (the network ones do not): three
/// instances on one key, and retries with cancellations.
mod faults {
    use super::*;
    use common::faults::{self, report, tag};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_key_across_three_instances() {
        let db = TempDb::new("faults-same");
        let mut instances = Vec::new();
        for _ in 0..3 {
            instances.push(SqliteBackend::open(db.path()).await.unwrap());
        }
        let instances: [SqliteBackend; 3] = instances.try_into().unwrap();
        let counts = faults::same_key_across_instances(instances, &tag("sqlite-same")).await;
        report("sqlite: 200 same-key requests, 3 instances", counts);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retries_and_cancellations() {
        let db = TempDb::new("faults-mix");
        let backend = SqliteBackend::open(db.path()).await.unwrap();
        let counts = faults::retries_and_cancellations(backend, &tag("sqlite-mix")).await;
        report(
            "sqlite: 1000 requests, 50 keys, retries and cancellations",
            counts,
        );
    }
}

/// An in-memory database would be private to each pooled connection: it
/// is refused with a clear error.
#[tokio::test]
async fn an_in_memory_database_is_refused() {
    for path in ["", ":memory:", "file::memory:?cache=shared"] {
        let error = SqliteBackend::open(path).await.unwrap_err();
        assert_eq!(error.kind(), BackendErrorKind::Misconfigured, "{path:?}");
    }
}

/// A client that closes its socket while its payment runs does not cause a
/// second run: the handler finishes, its response is stored in the file,
/// and the retry gets it.
#[tokio::test]
async fn the_example_survives_a_client_that_gives_up() {
    let db = TempDb::new("gives-up");
    let path = db.path().display().to_string();
    common::example_survives_a_client_that_gives_up("payments_sqlite", &[("SQLITE_PATH", &path)])
        .await;
}
