//! The PostgreSQL backend against the real server on `DATABASE_URL`.

mod common;
mod conformance;
mod postgres_support;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{Runs, counting, gated, post, send, slow_payment};
use http::{Response, StatusCode};
use http_body_util::Full;
use postgres_support::{
    TABLE, admin, backend, database_url, holders, lock_id, pool, pool_for, wait_unlocked,
};
use tower::{Layer, ServiceExt};
use tower_idempotency::{
    Backend, BackendErrorKind, Begin, Completion, IdempotencyKey, IdempotencyLayer,
    PostgresBackend, ScopeValue, StorageKey,
};

backend_conformance!(#[tokio::test], backend().await, Session);

fn storage_key(key: &str) -> StorageKey {
    StorageKey::derive(
        &ScopeValue::anonymous(),
        &IdempotencyKey::parse(&key.parse().unwrap()).unwrap(),
    )
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
        let backend = PostgresBackend::builder(pool().await)
            .table(TABLE)
            .build()
            .unwrap();
        backend.migrate().await.unwrap();
        instances.push(IdempotencyLayer::new(backend).layer(handler.clone()));
    }
    let key = format!("\"{}\"", unique("hot"));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let mut svc = instances[i % 2].clone();
        let key = key.clone();
        tasks.spawn(async move { send(&mut svc, post("/payments", Some(&key), "{}")).await });
    }
    for a in tasks.join_all().await {
        match a.status {
            StatusCode::CREATED => assert_eq!(a.body, "payment 1"),
            StatusCode::CONFLICT => assert_eq!(a.problem_type(), "request-in-flight"),
            other => panic!("unexpected {other}: {:?}", a.body),
        }
    }
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

/// The holder stores and unlocks while other requests spin on `begin`. A
/// `begin` whose lookup ran in a snapshot taken before the holder's commit,
/// but whose lock came after the holder's unlock, would acquire the key and
/// run the handler a second time; it must see the record instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_sees_the_record_committed_just_before_its_lock() {
    let backend = backend().await;
    let fp = conformance::fingerprint(1);
    for round in 0..150 {
        let key = conformance::fresh_key();
        let Begin::Acquired(lock) = backend
            .begin(&key, &fp, Duration::from_secs(30))
            .await
            .unwrap()
        else {
            panic!("fresh key");
        };
        let spinning = Arc::new(AtomicBool::new(false));
        let mut spinners = tokio::task::JoinSet::new();
        for _ in 0..2 {
            let (backend, spinning) = (backend.clone(), spinning.clone());
            spinners.spawn(async move {
                loop {
                    spinning.store(true, Ordering::SeqCst);
                    match backend
                        .begin(&key, &fp, Duration::from_secs(30))
                        .await
                        .unwrap()
                    {
                        Begin::Busy { .. } => {}
                        Begin::Completed(_) => return true,
                        Begin::Acquired(lock) => {
                            backend.release(lock).await.unwrap();
                            return false;
                        }
                        _ => unreachable!(),
                    }
                }
            });
        }
        while !spinning.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        let saved = backend
            .complete(lock, conformance::record(fp, b"{}"), Duration::from_mins(5))
            .await
            .unwrap();
        assert_eq!(saved, Completion::Saved);
        for seen in spinners.join_all().await {
            assert!(
                seen,
                "round {round}: a begin took the key although its record was committed"
            );
        }
    }
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

/// The holder's server process is killed while the handler runs.
#[tokio::test]
async fn terminated_holder_frees_the_key_and_stores_nothing() {
    let backend = backend().await;
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
    gate.finish.send(()).unwrap();
    let first = first.await.unwrap().unwrap();
    // The handler ran: its answer is delivered; storing it failed with the
    // session, so nothing (corrupt or otherwise) was stored.
    assert_eq!(first.status(), StatusCode::OK);
    let rows: i64 = admin
        .query_one(
            &format!("SELECT count(*) FROM {TABLE} WHERE key = $1"),
            &[&&storage_key(&key).as_bytes()[..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    let retry = send(&mut svc.clone(), post("/p", Some(&key), "x")).await;
    assert_eq!(retry.body, "run 2", "the key is free for the next request");
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
    let backend = backend().await;
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
