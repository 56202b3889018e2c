//! The PostgreSQL backend against the real server on `DATABASE_URL`.

mod common;
mod conformance;
mod postgres_support;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{Runs, counting, gated, post, send, slow_payment};
use http::{Response, StatusCode};
use http_body_util::Full;
use postgres_support::{
    TABLE, admin, backend, backend_in, backend_named, database_url, holders, lock_id, pool,
    pool_for, wait_unlocked,
};
use tower::{Layer, ServiceExt};
use tower_idempotency::{
    Backend, BackendErrorKind, Begin, Completion, IdempotencyKey, IdempotencyLayer,
    PostgresBackend, PostgresMode, RequestTransaction, ScopeValue, StorageKey,
};

mod lease {
    use super::*;
    backend_conformance!(#[tokio::test], backend_in(PostgresMode::Lease).await, Lapse);
}

mod lease_prepared {
    use super::*;
    use postgres_support::backend_prepared;
    backend_conformance!(#[tokio::test], backend_prepared(PostgresMode::Lease).await, Lapse);
}

mod advisory {
    use super::*;
    backend_conformance!(#[tokio::test], backend_in(PostgresMode::Advisory).await, Session);
}

mod transaction_prepared {
    use super::*;
    use postgres_support::backend_prepared;
    backend_conformance!(#[tokio::test], backend_prepared(PostgresMode::Transaction).await, Session);
}

mod transaction {
    use super::*;
    backend_conformance!(#[tokio::test], backend_in(PostgresMode::Transaction).await, Session);
}

fn storage_key(key: &str) -> StorageKey {
    StorageKey::derive(
        &ScopeValue::anonymous(),
        &IdempotencyKey::parse(&key.parse().unwrap()).unwrap(),
    )
}

/// A table name no other test uses (a plain identifier).
fn private_table() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("idem_private_{}_{nanos}", std::process::id())
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// Two instances (two pools) on one database: the handler runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_run_a_hundred_duplicates_once() {
    let runs = Runs::default();
    let handler = slow_payment(runs.clone(), Duration::from_millis(200));
    let mut instances = Vec::new();
    for _ in 0..2 {
        // Small pools and a generous wait: the tests of this binary share
        // the server's 100 connections.
        let backend = PostgresBackend::builder(pool_for(&database_url(), 8))
            .table(TABLE)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        backend.migrate().await.unwrap();
        instances.push(IdempotencyLayer::new(backend).layer(handler.clone()));
    }
    let key = format!("\"{}\"", unique("hot"));
    common::hundred_at_once(&instances, &key).await;
    assert_eq!(
        runs.get(),
        1,
        "the handler must run once across both instances"
    );
    for svc in &mut instances {
        let again = send(svc, post("/payments", Some(&key), "{}")).await;
        assert!(again.replayed());
        assert_eq!(again.body, "payment 1");
    }
}

/// A `begin` looks for a record, takes the key, and looks again: a record
/// the holder committed after the first look (when the key was not yet
/// taken, so that look found nothing live) must be seen by the second and
/// replayed, never acquired. Here the holder's write — an expired row
/// turned into a live record — waits uncommitted until the `begin` has
/// looked once, taken the key and reached that row; then it commits.
/// Every mode: advisory and transaction begins take an advisory lock before
/// their second look; a lease begin meets the row with its upsert.
#[tokio::test]
async fn begin_sees_the_record_committed_just_before_its_lock() {
    let admin = admin().await;
    let writer = postgres_support::admin().await;
    let writer_pid = postgres_support::pid_of(&writer).await;
    // A table of its own: its begin functions are this test's alone.
    let table = format!("idem_recheck_{}", std::process::id());
    let fp = conformance::fingerprint(1);
    let blob = tower_idempotency::RecordCodec::new()
        .encode(&conformance::record(fp, b"committed"))
        .unwrap();
    for mode in [
        PostgresMode::Lease,
        PostgresMode::Advisory,
        PostgresMode::Transaction,
    ] {
        let app = unique(&format!("recheck-{mode}"));
        let backend = postgres_support::backend_on_table(&table, mode, &app).await;
        let key = conformance::fresh_key();
        let key_bytes = &key.as_bytes()[..];
        admin
            .execute(
                &format!(
                    "INSERT INTO {table} (key, fingerprint, record, expires_at) \
                     VALUES ($1, '\\x00', '\\x00', now() - interval '1 hour')"
                ),
                &[&key_bytes],
            )
            .await
            .unwrap();
        // The holder's complete, caught between its write and its commit.
        writer.batch_execute("BEGIN").await.unwrap();
        writer
            .execute(
                &format!(
                    "UPDATE {table} SET fingerprint = $2, record = $3, lock_token = NULL, \
                     expires_at = now() + interval '1 hour' WHERE key = $1"
                ),
                &[&key_bytes, &&fp.as_bytes()[..], &blob],
            )
            .await
            .unwrap();
        let begin = {
            let backend = backend.clone();
            tokio::spawn(async move { backend.begin(&key, &fp, Duration::from_secs(30)).await })
        };
        // Its first look found nothing live; it now waits for the row.
        postgres_support::wait_until_finished_or_blocked_by(&admin, &app, writer_pid, &begin).await;
        writer.batch_execute("COMMIT").await.unwrap();
        match begin.await.unwrap().unwrap() {
            Begin::Completed(record) => assert_eq!(record.body, "committed", "{mode}"),
            Begin::Acquired(lock) => {
                backend.release(lock).await.unwrap();
                panic!("{mode}: a begin took the key although its record was committed");
            }
            other @ Begin::Busy { .. } => panic!("{mode}: {other:?}"),
        }
    }
    admin
        .batch_execute(&format!(
            "DROP TABLE {table}; DROP FUNCTION {table}_begin; DROP FUNCTION {table}_begin_xact; \
             DROP FUNCTION {table}_lease; DROP FUNCTION {table}_complete_session; \
             DROP FUNCTION {table}_complete_xact"
        ))
        .await
        .unwrap();
}

/// Drops the response future at its n-th suspension point.
struct DropAfter<F> {
    fut: Pin<Box<F>>,
    suspensions_left: usize,
}

impl<F: Future> Future for DropAfter<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.fut.as_mut().poll(cx) {
            Poll::Ready(out) => Poll::Ready(Some(out)),
            Poll::Pending if self.suspensions_left == 0 => Poll::Ready(None),
            Poll::Pending => {
                self.suspensions_left -= 1;
                Poll::Pending
            }
        }
    }
}

/// Cancellation at every await point of the flow: afterwards no advisory
/// lock is held by the pool's sessions and the key is usable.
#[tokio::test]
async fn cancellation_at_every_await_point_leaves_no_lock_in_the_pool() {
    let app = unique("cancel");
    let url = format!("{}?application_name={app}", database_url());
    let backend = PostgresBackend::builder(pool_for(&url, 4))
        .table(TABLE)
        .mode(PostgresMode::Advisory)
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    let admin = admin().await;
    let handler = tower::service_fn(|_req: common::InnerReq| async {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
    });
    let svc = IdempotencyLayer::new(backend).layer(handler);
    let mut completions = 0;
    for n in 0..60 {
        let key = unique(&format!("cancel-{n}"));
        let first = DropAfter {
            fut: Box::pin(svc.clone().oneshot(post("/p", Some(&key), "x"))),
            suspensions_left: n,
        }
        .await;
        let completed = first.is_some();
        wait_unlocked(&admin, lock_id(&storage_key(&key))).await;
        let again = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
        assert_eq!(
            again.status,
            StatusCode::OK,
            "after {n} suspensions: {:?}",
            again.body
        );
        assert_eq!(again.body, "done");
        // Finished: replayed. Dropped mid-way: free — or, when the drop came
        // after the upsert was already on the wire, replayed: the server
        // still commits it, and the record is the handler's own response.
        if completed {
            assert!(again.replayed(), "after {n} suspensions");
        }
        if completed {
            completions += 1;
            if completions == 3 {
                break;
            }
        }
    }
    assert_eq!(
        completions, 3,
        "the flow never completed within the suspension budget"
    );
    // No pooled session of this test holds any advisory lock.
    let held: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "a pooled connection still holds an advisory lock");
}

/// Advisory mode's documented failure: the holder's server process is
/// killed while the handler runs, the key is free at once and a duplicate
/// runs beside the first; the first request's store fails with its session.
#[tokio::test]
async fn advisory_terminated_holder_frees_the_key_while_its_handler_runs() {
    let backend = backend_in(PostgresMode::Advisory).await;
    let admin = admin().await;
    let runs = Runs::default();
    let (handler, gate) = gated(runs.clone());
    let svc = IdempotencyLayer::new(backend).layer(handler);
    let key = unique("killed");
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some(&key), "x")));
    gate.started.await.unwrap();
    let id = lock_id(&storage_key(&key));
    let pids = holders(&admin, id).await;
    assert_eq!(pids.len(), 1, "exactly one session holds the key");
    let killed: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    wait_unlocked(&admin, id).await;
    // The documented failure mode: the first handler still runs, and a
    // duplicate runs beside it.
    let duplicate = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
    assert_eq!(duplicate.status, StatusCode::OK);
    assert_eq!(duplicate.body, "run 2", "the duplicate ran concurrently");
    gate.finish.send(()).unwrap();
    let first = first.await.unwrap().unwrap();
    // The first handler's answer is delivered; storing it failed with its
    // session, and the duplicate's record is the one kept.
    assert_eq!(first.status(), StatusCode::OK);
    let retry = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, "run 2", "never overwritten by the stale first");
    assert_eq!(runs.get(), 2);
}

/// Lease mode: a handler slower than the lock TTL keeps its lease through
/// the heartbeat; duplicates meanwhile are told to wait.
#[tokio::test]
async fn lease_heartbeat_keeps_a_slow_handler_s_key() {
    let backend = backend().await;
    let runs = Runs::default();
    let (handler, gate) = gated(runs.clone());
    // A 3 s lease extended every second: each extension may come 2 s late
    // on a loaded machine and the lease still holds.
    let svc = IdempotencyLayer::new(backend)
        .lock_ttl(Duration::from_secs(3))
        .layer(handler);
    let key = unique("lease-slow");
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some(&key), "x")));
    gate.started.await.unwrap();
    // Past two lock TTLs: alive only through the heartbeat.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let duplicate = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
    assert_eq!(
        duplicate.status,
        StatusCode::CONFLICT,
        "{:?}",
        duplicate.body
    );
    gate.finish.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    let retry = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
    assert!(retry.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn purge_expired_removes_only_expired_rows() {
    let table = format!("idem_purge_{}", std::process::id());
    let backend = PostgresBackend::builder(pool().await)
        .table(table.clone())
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    let fp = conformance::fingerprint(1);
    let mut keep = Vec::new();
    for i in 0..12 {
        let key = conformance::fresh_key();
        let Begin::Acquired(lock) = backend
            .begin(&key, &fp, Duration::from_secs(5))
            .await
            .unwrap()
        else {
            panic!("fresh key");
        };
        let ttl = if i % 2 == 0 {
            Duration::from_millis(50)
        } else {
            Duration::from_hours(1)
        };
        backend
            .complete(lock, conformance::record(fp, b"{}"), ttl)
            .await
            .unwrap();
        if i % 2 == 1 {
            keep.push(key);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        backend.purge_expired(4).await.unwrap(),
        6,
        "in batches of 4"
    );
    assert_eq!(backend.purge_expired(4).await.unwrap(), 0);
    let admin = admin().await;
    let left: i64 = admin
        .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 6);
    for key in keep {
        assert!(matches!(
            backend
                .begin(&key, &fp, Duration::from_secs(5))
                .await
                .unwrap(),
            Begin::Completed(_)
        ));
    }
    admin
        .batch_execute(&format!(
            "DROP TABLE \"{table}\"; DROP FUNCTION \"{table}_begin\""
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn corrupt_rows_are_500_never_replayed_never_run_again() {
    let backend = backend().await;
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(counting(runs.clone()));
    let key = unique("corrupt");
    send(&mut svc, post("/p", Some(&key), "x")).await;
    let admin = admin().await;
    admin
        .execute(
            &format!("UPDATE {TABLE} SET record = set_byte(record, length(record) - 1, get_byte(record, length(record) - 1) # 1) WHERE key = $1"),
            &[&&storage_key(&key).as_bytes()[..]],
        )
        .await
        .unwrap();
    let answer = send(&mut svc, post("/p", Some(&key), "x")).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.problem_type(), "stored-response-unreadable");
    assert_eq!(runs.get(), 1);
    // The operator drops the unreadable record: the next request runs.
    assert!(backend.forget(&storage_key(&key)).await.unwrap());
    let again = send(&mut svc, post("/p", Some(&key), "x")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn table_names_are_validated() {
    for bad in [
        "",
        "1abc",
        "bad name",
        "x;drop table y",
        "a.b.c",
        "quote\"d",
        &"x".repeat(51),
    ] {
        let error = PostgresBackend::builder(pool().await)
            .table(bad)
            .build()
            .unwrap_err();
        assert_eq!(error.kind(), BackendErrorKind::Misconfigured, "{bad:?}");
    }
    let ok = PostgresBackend::builder(pool().await)
        .table("public.idem_valid_name")
        .build()
        .unwrap();
    assert_eq!(ok.table(), "\"public\".\"idem_valid_name\"");
}

#[tokio::test]
async fn missing_table_is_a_misconfiguration() {
    let backend = PostgresBackend::builder(pool().await)
        .table("idem_never_migrated")
        .build()
        .unwrap();
    let error = backend
        .begin(
            &conformance::fresh_key(),
            &conformance::fingerprint(1),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind(), BackendErrorKind::Misconfigured, "{error}");
}

/// Two processes of `examples/payments_postgres.rs` share one database: a
/// retry sent to the other instance is replayed with the same payment id.
#[tokio::test]
async fn payments_postgres_example_instances_share_one_record() {
    let key = format!("\"{}\"", unique("example"));
    common::example_instances_share_one_record(
        "payments_postgres",
        ("DATABASE_URL", &database_url()),
        &key,
    )
    .await;
}

/// A client that closes its socket mid-handler, then retries: one run.
#[tokio::test]
async fn payments_postgres_example_survives_a_client_that_gives_up() {
    common::example_survives_a_client_that_gives_up(
        "payments_postgres",
        &[("DATABASE_URL", &database_url())],
    )
    .await;
}

/// Two storage keys whose 64-bit lock ids collide: the second waits (a
/// false 409) while the first is held, and never sees the first's record.
#[tokio::test]
async fn lock_id_collisions_only_delay_never_replay_the_wrong_record() {
    for mode in [PostgresMode::Advisory, PostgresMode::Transaction] {
        collisions_only_delay(backend_in(mode).await).await;
    }
}

async fn collisions_only_delay(backend: PostgresBackend) {
    let fp = conformance::fingerprint(1);
    let a = conformance::fresh_key();
    let mut b_bytes = *conformance::fresh_key().as_bytes();
    b_bytes[..8].copy_from_slice(&a.as_bytes()[..8]);
    let b = StorageKey::from_bytes(b_bytes);
    assert_ne!(a, b);
    assert_eq!(lock_id(&a), lock_id(&b));

    let Begin::Acquired(lock_a) = backend
        .begin(&a, &fp, Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("fresh key");
    };
    assert!(
        matches!(
            backend
                .begin(&b, &fp, Duration::from_secs(5))
                .await
                .unwrap(),
            Begin::Busy { .. }
        ),
        "a colliding key waits while the other holds the id"
    );
    backend
        .complete(
            lock_a,
            conformance::record(fp, b"a's response"),
            Duration::from_mins(5),
        )
        .await
        .unwrap();
    let Begin::Acquired(lock_b) = backend
        .begin(&b, &fp, Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("b has no record of its own: it must acquire, not replay a's");
    };
    backend
        .complete(
            lock_b,
            conformance::record(fp, b"b's response"),
            Duration::from_mins(5),
        )
        .await
        .unwrap();
    let Begin::Completed(record) = backend
        .begin(&b, &fp, Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("b's record");
    };
    assert_eq!(record.body, "b's response");
}

async fn record_rows(admin: &tokio_postgres::Client, key: &StorageKey) -> i64 {
    admin
        .query_one(
            &format!("SELECT count(*) FROM {TABLE} WHERE key = $1 AND record IS NOT NULL"),
            &[&&key.as_bytes()[..]],
        )
        .await
        .unwrap()
        .get(0)
}

/// Lease mode: killing the session that ran `begin` (and every other
/// session of the pool) while the handler runs changes nothing. The
/// duplicate is told to wait, never run; the first request stores.
#[tokio::test]
async fn lease_survives_its_sessions_being_terminated_mid_handler() {
    let app = unique("lease-kill");
    let backend = backend_named(PostgresMode::Lease, &app, 4).await;
    let admin = admin().await;
    let runs = Runs::default();
    let (handler, gate) = gated(runs.clone());
    let svc = IdempotencyLayer::new(backend).layer(handler);
    let key = unique("lease-killed");
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some(&key), "x")));
    gate.started.await.unwrap();
    let pids = postgres_support::sessions_of(&admin, &app).await;
    assert!(!pids.is_empty(), "the pool has sessions to kill");
    postgres_support::terminate(&admin, &pids).await;
    while !postgres_support::sessions_of(&admin, &app).await.is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Duplicates while the handler still runs: 409, never a second run.
    for _ in 0..3 {
        let dup = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
        assert_eq!(dup.status, StatusCode::CONFLICT, "{:?}", dup.body);
        assert_eq!(dup.problem_type(), "request-in-flight");
    }
    gate.finish.send(()).unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(record_rows(&admin, &storage_key(&key)).await, 1);
    let retry = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, "run 1");
    assert_eq!(runs.get(), 1);
}

/// Waits (up to 5 s) until `begin` acquires `key`, then releases it: the key
/// is free again long before its lease's 60 s TTL.
async fn freed_within_seconds(backend: &PostgresBackend, key: &StorageKey) {
    let fp = conformance::fingerprint(6);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match backend
            .begin(key, &fp, Duration::from_mins(1))
            .await
            .unwrap()
        {
            Begin::Acquired(lock) => return backend.release(lock).await.unwrap(),
            Begin::Busy { .. } => {}
            other @ Begin::Completed(_) => panic!("{other:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the key is still held: the lease was left to its 60 s TTL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lease mode: a `begin` dropped after its statement reached the server
/// (the client left, an outer timeout) deletes the lease that statement
/// writes — on the same connection, after it — so the key is free within
/// seconds, not after the lock TTL. The statement is held up by another
/// session's uncommitted insert of the key, so it writes its lease only
/// after the `begin` was dropped.
#[tokio::test]
async fn a_dropped_lease_begin_leaves_no_lease_behind() {
    let admin = admin().await;
    let writer = postgres_support::admin().await;
    let writer_pid = postgres_support::pid_of(&writer).await;
    let app = unique("dropped-begin");
    // A table of its own: the row lock held below would queue a concurrent
    // `migrate()` of the shared table, and this test's statement behind it.
    let table = private_table();
    let backend = postgres_support::backend_on_table(&table, PostgresMode::Lease, &app).await;
    let key = conformance::fresh_key();
    writer.batch_execute("BEGIN").await.unwrap();
    writer
        .execute(
            &format!(
                "INSERT INTO {table} (key, fingerprint, expires_at) \
                 VALUES ($1, '\\x00', now() - interval '1 hour')"
            ),
            &[&&key.as_bytes()[..]],
        )
        .await
        .unwrap();
    let fp = conformance::fingerprint(6);
    let mut begin = Box::pin(backend.begin(&key, &fp, Duration::from_mins(1)));
    tokio::select! {
        answered = &mut begin => panic!("the begin answered past a held row: {answered:?}"),
        () = postgres_support::wait_until_blocked_by(&admin, &app, writer_pid) => {}
    }
    drop(begin);
    // The insert goes away: the dropped begin's statement writes its lease.
    writer.batch_execute("ROLLBACK").await.unwrap();
    freed_within_seconds(&backend, &key).await;
}

/// Lease mode: a `complete` whose statement fails (here it is cancelled
/// while it waits for a row another session holds) deletes its lease on the
/// same connection: the key is free within seconds, not after the lock TTL.
#[tokio::test]
async fn a_failed_lease_complete_leaves_no_lease_behind() {
    let admin = admin().await;
    let writer = postgres_support::admin().await;
    let writer_pid = postgres_support::pid_of(&writer).await;
    let app = unique("failed-complete");
    // A table of its own: the row lock held below would queue a concurrent
    // `migrate()` of the shared table, and this test's statement behind it.
    let table = private_table();
    let backend = postgres_support::backend_on_table(&table, PostgresMode::Lease, &app).await;
    let key = conformance::fresh_key();
    let fp = conformance::fingerprint(6);
    let Begin::Acquired(lock) = backend
        .begin(&key, &fp, Duration::from_mins(1))
        .await
        .unwrap()
    else {
        panic!("fresh key");
    };
    writer.batch_execute("BEGIN").await.unwrap();
    writer
        .execute(
            &format!("SELECT 1 FROM {table} WHERE key = $1 FOR UPDATE"),
            &[&&key.as_bytes()[..]],
        )
        .await
        .unwrap();
    let mut complete =
        Box::pin(backend.complete(lock, conformance::record(fp, b"{}"), Duration::from_mins(5)));
    tokio::select! {
        answered = &mut complete => panic!("the complete answered past a held row: {answered:?}"),
        () = postgres_support::wait_until_blocked_by(&admin, &app, writer_pid) => {}
    }
    admin
        .execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND $2 = ANY(pg_blocking_pids(pid))",
            &[&app, &writer_pid],
        )
        .await
        .unwrap();
    let error = complete.await.unwrap_err();
    let code = std::error::Error::source(&error)
        .and_then(|e| e.downcast_ref::<tokio_postgres::Error>())
        .and_then(tokio_postgres::Error::code);
    assert_eq!(
        code,
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{error:?}"
    );
    writer.batch_execute("ROLLBACK").await.unwrap();
    freed_within_seconds(&backend, &key).await;
}

/// Every mode: a holder whose lock was lost (its lease lapsed, its session
/// was killed) never overwrites the record of the request that took over.
#[tokio::test]
async fn a_stale_complete_never_overwrites_a_live_record() {
    let fp = conformance::fingerprint(3);
    let admin = admin().await;
    for mode in [
        PostgresMode::Lease,
        PostgresMode::Advisory,
        PostgresMode::Transaction,
    ] {
        let app = unique(&format!("stale-{mode}"));
        let stale_backend = backend_named(mode, &app, 2).await;
        let backend = backend_in(mode).await;
        let key = conformance::fresh_key();
        let ttl = Duration::from_millis(300);
        let Begin::Acquired(stale) = stale_backend.begin(&key, &fp, ttl).await.unwrap() else {
            panic!("{mode}: fresh key");
        };
        if mode == PostgresMode::Lease {
            tokio::time::sleep(ttl * 2).await; // the lease lapses
        } else {
            let pids = postgres_support::sessions_of(&admin, &app).await;
            postgres_support::terminate(&admin, &pids).await;
            wait_unlocked(&admin, lock_id(&key)).await;
        }
        let Begin::Acquired(fresh) = backend
            .begin(&key, &fp, Duration::from_secs(10))
            .await
            .unwrap()
        else {
            panic!("{mode}: the lost lock's key is free");
        };
        let saved = backend
            .complete(
                fresh,
                conformance::record(fp, b"live"),
                Duration::from_mins(5),
            )
            .await
            .unwrap();
        assert_eq!(saved, Completion::Saved, "{mode}");
        let stale = stale_backend
            .complete(
                stale,
                conformance::record(fp, b"stale"),
                Duration::from_mins(5),
            )
            .await;
        assert!(
            matches!(stale, Ok(Completion::Lost) | Err(_)),
            "{mode}: a stale complete reported {stale:?}"
        );
        let Begin::Completed(record) = backend
            .begin(&key, &fp, Duration::from_secs(10))
            .await
            .unwrap()
        else {
            panic!("{mode}: the live record is there");
        };
        assert_eq!(record.body, "live", "{mode}");
    }
}

/// Advisory mode's fenced write, called by a session that does not hold the
/// key's lock (a pooler handed the statement to another session): it writes
/// nothing.
#[tokio::test]
async fn advisory_complete_without_the_session_lock_writes_nothing() {
    let _ = backend_in(PostgresMode::Advisory).await;
    let admin = admin().await;
    let key = conformance::fresh_key();
    let written: i32 = admin
        .query_one(
            &format!("SELECT {TABLE}_complete_session($1, $2, $3, $4, $5)"),
            &[
                &lock_id(&key),
                &&key.as_bytes()[..],
                &&[1_u8; 32][..],
                &&b"blob"[..],
                &60_000_i64,
            ],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, 0);
    assert_eq!(record_rows(&admin, &key).await, 0);
}

/// Lease and transaction modes: a pool of two shared by the layer and the
/// handlers, ten concurrent keyed requests. Nothing holds a connection the
/// handler needs, so all are answered. (Advisory mode would hold both
/// connections across the handlers and wait: documented.)
#[tokio::test]
async fn a_pool_of_two_shared_with_the_handlers_never_starves() {
    for mode in [PostgresMode::Lease, PostgresMode::Transaction] {
        let pool = pool_for(&database_url(), 2);
        let backend = PostgresBackend::builder(pool.clone())
            .table(TABLE)
            .mode(mode)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        backend.migrate().await.unwrap();
        let handler = tower::service_fn(move |req: common::InnerReq| {
            let pool = pool.clone();
            async move {
                let n: i32 = if let Some(tx) = req.extensions().get::<RequestTransaction>() {
                    let client = tx.client().await.unwrap();
                    client.query_one("SELECT 1", &[]).await.unwrap().get(0)
                } else {
                    let conn = pool.get().await.unwrap();
                    conn.query_one("SELECT 1", &[]).await.unwrap().get(0)
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(n.to_string()))))
            }
        });
        let svc = IdempotencyLayer::new(backend).layer(handler);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..10 {
            let mut svc = svc.clone();
            let key = unique(&format!("starve-{mode}-{i}"));
            tasks.spawn(async move { send(&mut svc, post("/p", Some(&key), "x")).await });
        }
        let answers = tokio::time::timeout(Duration::from_mins(1), tasks.join_all())
            .await
            .unwrap_or_else(|_| panic!("{mode}: a request hangs"));
        for a in answers {
            assert_eq!(a.status, StatusCode::OK, "{mode}: {:?}", a.body);
            assert_eq!(a.body, "1");
        }
    }
}

/// A table of payments for the transaction-mode tests, and a handler that
/// writes one row through the request's transaction.
async fn payments_table(admin: &tokio_postgres::Client, name: &str) -> String {
    let table = format!("payments_{}", name.replace(['-', '.'], "_"));
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigserial PRIMARY KEY, note text)"
        ))
        .await
        .unwrap();
    table
}

async fn payment_rows(admin: &tokio_postgres::Client, table: &str) -> i64 {
    admin
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// A handler that writes one row of `table` through the request's
/// transaction, then answers what `answer` makes of its run number (from
/// 1); `answer` may panic.
fn writes_then(
    table: String,
    answer: impl Fn(usize) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
) -> impl common::Handler {
    let runs = Runs::default();
    tower::service_fn(move |req: common::InnerReq| {
        let (table, answer, run) = (table.clone(), answer.clone(), runs.bump());
        async move {
            let tx = req
                .extensions()
                .get::<RequestTransaction>()
                .cloned()
                .expect("transaction mode lends the transaction");
            let client = tx.client().await.unwrap();
            client
                .execute(&format!("INSERT INTO {table} (note) VALUES ('x')"), &[])
                .await
                .unwrap();
            drop(client);
            Ok::<_, Infallible>(answer(run))
        }
    })
}

/// Writes a payment row through the request's transaction; the first call
/// then waits on the gate. A failed write answers 500.
fn transactional_payment(
    table: String,
    runs: Runs,
    gate: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Receiver<()>,
    )>,
    delay: Duration,
) -> impl common::Handler {
    let gate = Arc::new(std::sync::Mutex::new(gate));
    tower::service_fn(move |req: common::InnerReq| {
        let table = table.clone();
        let gate = gate.lock().unwrap().take();
        runs.bump();
        async move {
            let tx = req
                .extensions()
                .get::<RequestTransaction>()
                .cloned()
                .expect("transaction mode lends the transaction");
            let written = async {
                let client = tx.client().await.map_err(|e| e.to_string())?;
                let row = client
                    .query_one(
                        &format!("INSERT INTO {table} (note) VALUES ('x') RETURNING id"),
                        &[],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<i64, String>(row.get(0))
            }
            .await;
            if let Some((started, finish)) = gate {
                started.send(()).unwrap();
                finish.await.unwrap();
            }
            tokio::time::sleep(delay).await;
            let response = match written {
                Ok(id) => Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Full::new(Bytes::from(format!("payment {id}")))),
                Err(error) => Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .body(Full::new(Bytes::from(error))),
            };
            Ok::<_, Infallible>(response.unwrap())
        }
    })
}

/// Transaction mode: the connection is killed while the handler runs.
/// Neither the payment row nor the record survives; the client is told
/// 503, not the handler's 201; the retry writes exactly one row and is
/// replayed afterwards.
#[tokio::test]
async fn transaction_killed_mid_handler_rolls_back_payment_and_record() {
    let app = unique("tx-kill");
    let backend = backend_named(PostgresMode::Transaction, &app, 4).await;
    let admin = admin().await;
    let table = payments_table(&admin, &app).await;
    let runs = Runs::default();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let (finish, finish_rx) = tokio::sync::oneshot::channel();
    let handler = transactional_payment(
        table.clone(),
        runs.clone(),
        Some((started_tx, finish_rx)),
        Duration::ZERO,
    );
    let svc = IdempotencyLayer::new(backend).layer(handler);
    let key = unique("tx-killed");
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some(&key), "x")));
    started.await.unwrap();
    let pids = postgres_support::sessions_of(&admin, &app).await;
    postgres_support::terminate(&admin, &pids).await;
    wait_unlocked(&admin, lock_id(&storage_key(&key))).await;
    finish.send(()).unwrap();
    let first = common::Answer::read(first.await.unwrap().unwrap()).await;
    assert_eq!(
        first.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        first.body
    );
    assert_eq!(
        payment_rows(&admin, &table).await,
        0,
        "the payment rolled back"
    );
    assert_eq!(record_rows(&admin, &storage_key(&key)).await, 0);

    let retry = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.body);
    assert!(!retry.replayed());
    let again = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
    assert!(again.replayed());
    assert_eq!(again.body, retry.body);
    assert_eq!(payment_rows(&admin, &table).await, 1);
    assert_eq!(runs.get(), 2);
}

/// A backend that reports each `extend` that found its lock lost: the
/// heartbeat's verdict, which the test waits for.
#[derive(Clone)]
struct ReportsLoss {
    inner: PostgresBackend,
    lost: Arc<tokio::sync::Notify>,
}

impl Backend for ReportsLoss {
    type Lock = tower_idempotency::PostgresLock;

    async fn begin(
        &self,
        key: &StorageKey,
        fp: &tower_idempotency::Fingerprint,
        ttl: Duration,
    ) -> Result<Begin<Self::Lock>, tower_idempotency::BackendError> {
        self.inner.begin(key, fp, ttl).await
    }

    async fn complete(
        &self,
        lock: Self::Lock,
        record: tower_idempotency::Record,
        ttl: Duration,
    ) -> Result<Completion, tower_idempotency::BackendError> {
        self.inner.complete(lock, record, ttl).await
    }

    async fn release(&self, lock: Self::Lock) -> Result<(), tower_idempotency::BackendError> {
        self.inner.release(lock).await
    }

    async fn extend(
        &self,
        lock: &Self::Lock,
        ttl: Duration,
    ) -> Result<bool, tower_idempotency::BackendError> {
        let kept = self.inner.extend(lock, ttl).await;
        if matches!(kept, Ok(false)) {
            self.lost.notify_one();
        }
        kept
    }

    fn abandon(&self, lock: Self::Lock) {
        self.inner.abandon(lock);
    }

    fn prepare_request(&self, lock: &Self::Lock, extensions: &mut http::Extensions) {
        self.inner.prepare_request(lock, extensions);
    }

    fn fencing_token(&self, lock: &Self::Lock) -> Option<tower_idempotency::FencingToken> {
        self.inner.fencing_token(lock)
    }

    fn commits_handler_effects(&self) -> bool {
        self.inner.commits_handler_effects()
    }
}

/// Transaction mode: the request's connection is killed while the handler
/// runs, and the heartbeat — not the final commit — is what notices. The
/// handler's writes went with the connection, so its 201 becomes a 503;
/// the retry runs again.
#[tokio::test]
async fn transaction_lost_to_the_heartbeat_answers_503_not_the_handler_s_201() {
    let admin = admin().await;
    let lost = Arc::new(tokio::sync::Notify::new());
    let backend = ReportsLoss {
        inner: backend_in(PostgresMode::Transaction).await,
        lost: lost.clone(),
    };
    let runs = Runs::default();
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel::<i32>();
    let first_call = Arc::new(std::sync::Mutex::new(Some(pid_tx)));
    let handler = {
        let runs = runs.clone();
        tower::service_fn(move |req: common::InnerReq| {
            let n = runs.bump();
            let first = first_call.lock().unwrap().take();
            let lost = lost.clone();
            async move {
                if let Some(pid_tx) = first {
                    let tx = req
                        .extensions()
                        .get::<RequestTransaction>()
                        .cloned()
                        .expect("transaction mode lends the transaction");
                    let pid: i32 = tx
                        .client()
                        .await
                        .unwrap()
                        .query_one("SELECT pg_backend_pid()", &[])
                        .await
                        .unwrap()
                        .get(0);
                    pid_tx.send(pid).unwrap();
                    // Answer only once the heartbeat found the connection
                    // gone.
                    lost.notified().await;
                }
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .body(Full::new(Bytes::from(format!("run {n}"))))
                        .unwrap(),
                )
            }
        })
    };
    // A heartbeat every 100 ms.
    let svc = IdempotencyLayer::new(backend)
        .lock_ttl(Duration::from_millis(300))
        .layer(handler);
    let key = unique("tx-heartbeat");
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some(&key), "x")));
    let pid = pid_rx.await.unwrap();
    postgres_support::terminate(&admin, &[pid]).await;
    let first = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("the heartbeat never reported the lost connection")
        .unwrap()
        .unwrap();
    let first = common::Answer::read(first).await;
    assert_eq!(
        first.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the handler's answer for rolled-back writes: {:?}",
        first.body
    );
    let retry = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.body);
    assert_eq!(retry.body, "run 2");
    assert!(
        send(&mut svc.clone(), post("/p", Some(&key), "x"))
            .await
            .replayed()
    );
    assert_eq!(runs.get(), 2);
}

/// Transaction mode: a handler that answers 500 after writing rolls its
/// write back; the retry runs on a clean slate.
#[tokio::test]
async fn transaction_error_status_rolls_back_the_handler_writes() {
    let backend = backend_in(PostgresMode::Transaction).await;
    let admin = admin().await;
    let name = unique("tx-500");
    let table = payments_table(&admin, &name).await;
    let handler = writes_then(table.clone(), |run| {
        let status = if run == 1 {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::CREATED
        };
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .unwrap()
    });
    let mut svc = IdempotencyLayer::new(backend).layer(handler);
    let key = unique("tx-500");
    let first = send(&mut svc, post("/p", Some(&key), "x")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(payment_rows(&admin, &table).await, 0, "a 500 rolls back");
    let retry = send(&mut svc, post("/p", Some(&key), "x")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(payment_rows(&admin, &table).await, 1);
    assert!(send(&mut svc, post("/p", Some(&key), "x")).await.replayed());
    assert_eq!(payment_rows(&admin, &table).await, 1);
}

/// Transaction mode: a hundred concurrent duplicates across two instances
/// write one payment row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_hundred_duplicates_write_one_row() {
    let admin = admin().await;
    let name = unique("tx-dups");
    let table = payments_table(&admin, &name).await;
    let runs = Runs::default();
    let handler = transactional_payment(
        table.clone(),
        runs.clone(),
        None,
        Duration::from_millis(200),
    );
    let mut instances = Vec::new();
    for _ in 0..2 {
        let backend = PostgresBackend::builder(pool_for(&database_url(), 8))
            .table(TABLE)
            .mode(PostgresMode::Transaction)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        instances.push(IdempotencyLayer::new(backend).layer(handler.clone()));
    }
    let key = unique("tx-hot");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let mut svc = instances[i % 2].clone();
        let key = key.clone();
        tasks.spawn(async move { send(&mut svc, post("/p", Some(&key), "x")).await });
    }
    let mut created = 0;
    for a in tasks.join_all().await {
        match a.status {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => assert_eq!(a.problem_type(), "request-in-flight"),
            other => panic!("unexpected {other}: {:?}", a.body),
        }
    }
    assert!(created >= 1);
    assert_eq!(runs.get(), 1, "the handler ran once");
    assert_eq!(payment_rows(&admin, &table).await, 1);
}

/// `examples/payments_postgres.rs` with `PG_MODE=transaction`: the session
/// of a running payment is killed (as the example's docs show); the client
/// gets 503 and no payment row exists; the retry writes exactly one row,
/// which `GET /payments` lists, and is replayed afterwards.
#[tokio::test]
async fn payments_postgres_example_in_transaction_mode_commits_rows_with_records() {
    let table = format!("payments_{}", unique("ex").replace('-', "_"));
    let (_server, addr) = common::spawn_example(
        "payments_postgres",
        &[
            ("DATABASE_URL", &database_url()),
            ("PG_MODE", "transaction"),
            ("PAYMENTS_TABLE", &table),
            ("PAYMENT_DELAY_MS", "1500"),
        ],
    )
    .await;
    let admin = admin().await;
    let key = format!("\"{}\"", unique("ex-tx"));
    let headers = [
        ("idempotency-key", key.as_str()),
        ("content-type", "application/json"),
    ];
    let body = r#"{"amount":5,"currency":"EUR"}"#;
    let first = {
        let headers = headers.map(|(k, v)| (k, v.to_owned()));
        tokio::spawn(async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            common::request(addr, "POST", "/payments", &headers, body).await
        })
    };
    // The session that wrote the row and now waits in its transaction.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let rows = admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' \
                 AND query LIKE $1",
                &[&format!("%INSERT INTO {table}%")],
            )
            .await
            .unwrap();
        if let Some(row) = rows.first() {
            break row.get::<_, i32>(0);
        }
        assert!(std::time::Instant::now() < deadline, "no payment in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    postgres_support::terminate(&admin, &[pid]).await;
    let first = first.await.unwrap();
    assert_eq!(
        first.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        first.body
    );
    let listed = common::request(addr, "GET", "/payments", &[], "").await;
    assert_eq!(listed.body, "[]", "the killed payment left no row");

    let retry = common::request(addr, "POST", "/payments", &headers, body).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.body);
    let again = common::request(addr, "POST", "/payments", &headers, body).await;
    assert!(again.replayed());
    assert_eq!(again.body, retry.body);
    assert_eq!(payment_rows(&admin, &table).await, 1);
    let listed = common::request(addr, "GET", "/payments", &[], "").await;
    assert!(
        listed.body.starts_with(b"[{\"") && !listed.body.windows(3).any(|w| w == b"},{"),
        "one row: {:?}",
        listed.body
    );
    let stats = common::request(addr, "GET", "/stats", &[], "").await;
    assert_eq!(stats.body, r#"{"handler_runs":2}"#);
    admin
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// A migration that fails half-way (here: the table name is taken by a
/// view, which cannot be altered) leaves its transaction aborted: that
/// connection is closed, never handed to the next borrower.
#[tokio::test]
async fn a_failed_migration_closes_its_connection() {
    let admin = admin().await;
    let name = format!("idem_view_{}", std::process::id());
    admin
        .batch_execute(&format!(
            "DROP VIEW IF EXISTS {name}; CREATE VIEW {name} AS SELECT 1 AS key"
        ))
        .await
        .unwrap();
    let pool = pool_for(&database_url(), 1);
    let backend = PostgresBackend::builder(pool.clone())
        .table(&name)
        .build()
        .unwrap();
    assert!(backend.migrate().await.is_err());
    assert_eq!(pool.status().size, 0, "the failed connection was detached");
    // The pool's next connection is a clean one.
    let conn = pool.get().await.unwrap();
    let one: i32 = conn.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    admin
        .batch_execute(&format!("DROP VIEW {name}"))
        .await
        .unwrap();
}

/// Transaction mode: a response marked `Persist::Never` is not stored, so
/// its transaction rolls back, handler writes included (documented).
#[tokio::test]
async fn transaction_persist_never_rolls_back() {
    let backend = backend_in(PostgresMode::Transaction).await;
    let admin = admin().await;
    let name = unique("tx-never");
    let table = payments_table(&admin, &name).await;
    let handler = writes_then(table.clone(), |_| {
        let mut response = Response::new(Full::new(Bytes::from_static(b"quote")));
        response
            .extensions_mut()
            .insert(tower_idempotency::Persist::Never);
        response
    });
    let mut svc = IdempotencyLayer::new(backend).layer(handler);
    let answer = send(&mut svc, post("/p", Some(&unique("tx-never")), "x")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(payment_rows(&admin, &table).await, 0);
}

/// `purge_expired` racing a takeover: a writer turns an expired row into a
/// live one (a new lease, a new record) while the purge runs. The purge
/// must leave it alone: it skips rows a writer holds, and checks the expiry
/// again on the row it reaches.
#[tokio::test]
async fn purge_never_deletes_a_row_taken_over_while_it_runs() {
    let app = unique("purge-race");
    let backend = backend_named(PostgresMode::Lease, &app, 1).await;
    let admin = admin().await;
    let writer = postgres_support::admin().await;
    let writer_pid = postgres_support::pid_of(&writer).await;
    let key = conformance::fresh_key();
    admin
        .execute(
            &format!(
                "INSERT INTO {TABLE} (key, fingerprint, record, expires_at) \
                 VALUES ($1, '\\x00', '\\x00', now() - interval '1 hour')"
            ),
            &[&&key.as_bytes()[..]],
        )
        .await
        .unwrap();
    writer.batch_execute("BEGIN").await.unwrap();
    writer
        .execute(
            &format!(
                "UPDATE {TABLE} SET expires_at = now() + interval '1 hour', record = NULL, \
                 lock_token = '\\x01' WHERE key = $1"
            ),
            &[&&key.as_bytes()[..]],
        )
        .await
        .unwrap();
    let purge = tokio::spawn(async move { backend.purge_expired(1000).await });
    // The purge has met the row while the writer holds it: it skipped the
    // row and finished, or it waits for the writer.
    postgres_support::wait_until_finished_or_blocked_by(&admin, &app, writer_pid, &purge).await;
    writer.batch_execute("COMMIT").await.unwrap();
    purge.await.unwrap().unwrap();
    let rows: i64 = admin
        .query_one(
            &format!("SELECT count(*) FROM {TABLE} WHERE key = $1"),
            &[&&key.as_bytes()[..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "the live lease was purged");
}

/// An advisory (or transaction) begin meets a lapsed lease whose extension
/// is still committing: it waits for the row and sees the lease live,
/// rather than taking the key from a holder that is still running.
#[tokio::test]
async fn a_lease_extension_in_flight_keeps_other_modes_out() {
    let lease = backend().await;
    let admin = admin().await;
    let writer = postgres_support::admin().await;
    let writer_pid = postgres_support::pid_of(&writer).await;
    for mode in [PostgresMode::Advisory, PostgresMode::Transaction] {
        let app = unique(&format!("extension-{mode}"));
        let other = backend_named(mode, &app, 2).await;
        let key = conformance::fresh_key();
        let fp = conformance::fingerprint(5);
        let Begin::Acquired(held) = lease
            .begin(&key, &fp, Duration::from_millis(200))
            .await
            .unwrap()
        else {
            panic!("fresh key");
        };
        tokio::time::sleep(Duration::from_millis(400)).await; // lapsed
        // The heartbeat's extension, caught between its update and commit.
        writer.batch_execute("BEGIN").await.unwrap();
        writer
            .execute(
                &format!(
                    "UPDATE {TABLE} SET expires_at = clock_timestamp() + interval '1 minute' \
                     WHERE key = $1"
                ),
                &[&&key.as_bytes()[..]],
            )
            .await
            .unwrap();
        let begin = {
            let other = other.clone();
            tokio::spawn(async move { other.begin(&key, &fp, Duration::from_secs(5)).await })
        };
        // The begin has taken the key and waits for the row (or, wrongly,
        // answered without waiting).
        postgres_support::wait_until_finished_or_blocked_by(&admin, &app, writer_pid, &begin).await;
        writer.batch_execute("COMMIT").await.unwrap();
        match begin.await.unwrap().unwrap() {
            Begin::Busy { .. } => {}
            Begin::Acquired(_) => panic!("{mode}: took a key whose lease was being extended"),
            other @ Begin::Completed(_) => panic!("{mode}: {other:?}"),
        }
        lease.release(held).await.unwrap();
    }
}

/// Transaction mode: a handler that commits the request's transaction
/// itself ends the lock with it; the layer stores nothing and answers 503
/// rather than claim a record it no longer holds the key for.
#[tokio::test]
async fn transaction_committed_by_the_handler_stores_nothing() {
    let backend = backend_in(PostgresMode::Transaction).await;
    let admin = admin().await;
    let handler = tower::service_fn(|req: common::InnerReq| async move {
        let tx = req
            .extensions()
            .get::<RequestTransaction>()
            .cloned()
            .unwrap();
        tx.client()
            .await
            .unwrap()
            .batch_execute("COMMIT")
            .await
            .unwrap();
        Ok::<_, Infallible>(
            Response::builder()
                .status(StatusCode::CREATED)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    });
    let mut svc = IdempotencyLayer::new(backend).layer(handler);
    let key = unique("tx-self-commit");
    let answer = send(&mut svc, post("/p", Some(&key), "x")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(record_rows(&admin, &storage_key(&key)).await, 0);
}

/// Lease mode: a handler that panics; the default `Backend::abandon`
/// deletes the lease in the background, and the retry runs within seconds.
#[tokio::test]
async fn lease_panicked_handler_frees_the_key_within_seconds() {
    common::a_panicked_handler_frees_the_key(backend().await, &unique("lease-panic")).await;
}

/// Transaction mode: a handler that panics after writing leaves no row and
/// no record, and the key is free for the retry at once.
#[tokio::test]
async fn transaction_panic_rolls_back_and_frees_the_key() {
    let backend = backend_in(PostgresMode::Transaction).await;
    let admin = admin().await;
    let name = unique("tx-panic");
    let table = payments_table(&admin, &name).await;
    let handler = writes_then(table.clone(), |run| {
        assert!(run > 1, "the handler fails after its write");
        Response::builder()
            .status(StatusCode::CREATED)
            .body(Full::new(Bytes::new()))
            .unwrap()
    });
    let svc = IdempotencyLayer::new(backend).layer(handler);
    let key = unique("tx-panic");
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some(&key), "x"))).await;
    assert!(first.unwrap_err().is_panic());
    assert_eq!(payment_rows(&admin, &table).await, 0);
    // The key is released in the background; the retry runs once it is.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let retry = loop {
        let answer = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
        if answer.status != StatusCode::CONFLICT {
            break answer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the key stayed locked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.body);
    assert_eq!(payment_rows(&admin, &table).await, 1);
}

/// The axum extractors (feature `axum`): a handler takes the request's
/// transaction as `RequestTransaction`, and its write commits with the
/// record; without a key, the required extractor answers the layer's
/// "missing key" problem and `Option<RequestTransaction>` is `None`.
#[cfg(feature = "axum")]
#[tokio::test]
async fn axum_handlers_extract_the_request_transaction() {
    use axum::Router;
    use axum::routing::post as route_post;

    let backend = backend_in(PostgresMode::Transaction).await;
    let admin = admin().await;
    let name = unique("tx-axum");
    let table = payments_table(&admin, &name).await;
    let insert = format!("INSERT INTO {table} (note) VALUES ('x') RETURNING id");
    let app = Router::new()
        .route(
            "/payments",
            route_post(move |tx: RequestTransaction| async move {
                let client = tx.client().await.map_err(|e| e.to_string())?;
                let row = client
                    .query_one(&insert, &[])
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((
                    StatusCode::CREATED,
                    format!("payment {}", row.get::<_, i64>(0)),
                ))
            }),
        )
        .route(
            "/maybe",
            route_post(|tx: Option<RequestTransaction>| async move {
                if tx.is_some() { "with" } else { "without" }
            }),
        )
        .layer(IdempotencyLayer::new(backend));
    let mut svc = app.into_service();
    let key = unique("tx-axum");
    let created = send(&mut svc, post("/payments", Some(&key), "{}")).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let replayed = send(&mut svc, post("/payments", Some(&key), "{}")).await;
    assert!(replayed.replayed());
    assert_eq!(replayed.body, created.body);
    assert_eq!(payment_rows(&admin, &table).await, 1);

    let unkeyed = send(&mut svc, post("/payments", None, "{}")).await;
    assert_eq!(unkeyed.status, StatusCode::BAD_REQUEST);
    assert_eq!(unkeyed.problem_type(), "missing-key");
    assert_eq!(payment_rows(&admin, &table).await, 1);
    assert_eq!(
        send(&mut svc, post("/maybe", None, "{}")).await.body,
        "without"
    );
    assert_eq!(
        send(&mut svc, post("/maybe", Some(&unique("tx-maybe")), "{}"))
            .await
            .body,
        "with"
    );

    // A keyed request to a backend in another mode has no transaction to
    // lend: a server error, logged, not a silent write outside it.
    let mut lease_app = Router::new()
        .route(
            "/payments",
            route_post(|_tx: RequestTransaction| async { "unreachable" }),
        )
        .layer(IdempotencyLayer::new(backend_in(PostgresMode::Lease).await))
        .into_service();
    let refused = send(
        &mut lease_app,
        post("/payments", Some(&unique("lease-tx")), "{}"),
    )
    .await;
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
}

/// The `5xx` policies in each PostgreSQL mode.
#[tokio::test]
async fn server_error_policies_in_every_mode() {
    for mode in [
        PostgresMode::Lease,
        PostgresMode::Advisory,
        PostgresMode::Transaction,
    ] {
        common::server_error_policies(backend_in(mode).await, &format!("postgres-{mode}")).await;
    }
}
