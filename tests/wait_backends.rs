//! `wait_for_in_flight` across instances on the real Redis and PostgreSQL,
//! and on a SQLite file two backends share:
//! 20 duplicates of a 600 ms request split over two instances (two pools,
//! two backends, two layers) all get the same `201` and the handler runs
//! once; waiting requests hold no pooled connection.

mod common;
mod postgres_support;
mod redis_support;

use std::time::Duration;

use common::{Answer, Runs, post, send, slow_payment};
use http::StatusCode;
use tower::Layer;
use tower_idempotency::{Backend, IdempotencyLayer, PostgresMode, RedisBackend, SqliteBackend};

const WAIT: Duration = Duration::from_secs(10);

/// 20 duplicates over `a` and `b`, the first sent a little ahead so that
/// the others find it in flight.
async fn twenty_duplicates<B: Backend>(a: B, b: B, tag: &str) {
    let runs = Runs::default();
    let handler = slow_payment(runs.clone(), Duration::from_millis(600));
    let instances = [
        IdempotencyLayer::new(a)
            .wait_for_in_flight(WAIT)
            .layer(handler.clone()),
        IdempotencyLayer::new(b)
            .wait_for_in_flight(WAIT)
            .layer(handler),
    ];
    let key = common::unique_key(tag);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut svc = instances[i % 2].clone();
        let key = key.clone();
        tasks.spawn(async move {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            send(&mut svc, post("/p", Some(&key), "{}")).await
        });
    }
    let answers: Vec<Answer> = tasks.join_all().await;
    assert_eq!(runs.get(), 1, "{tag}");
    for a in &answers {
        assert_eq!(a.status, StatusCode::CREATED, "{tag}: {:?}", a.body);
        assert_eq!(a.body, "payment 1", "{tag}");
    }
    assert_eq!(answers.iter().filter(|a| a.replayed()).count(), 19, "{tag}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_twenty_duplicates_over_two_instances_get_one_answer() {
    let prefix = redis_support::unique_prefix();
    let make = || async {
        RedisBackend::builder(redis_support::pool().await)
            .prefix(prefix.clone())
            .build()
            .unwrap()
    };
    twenty_duplicates(make().await, make().await, "wait-redis").await;
}

/// Two processes' backends on one SQLite file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_twenty_duplicates_over_two_instances_get_one_answer() {
    let db = common::TempDb::new("wait");
    let a = SqliteBackend::open(db.path()).await.unwrap();
    let b = SqliteBackend::open(db.path()).await.unwrap();
    twenty_duplicates(a, b, "wait-sqlite").await;
}

/// In every mode. Instance `b` has a pool of two connections for its ten
/// requests: a waiting request that held one would starve the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_twenty_duplicates_over_two_instances_get_one_answer() {
    for mode in [
        PostgresMode::Lease,
        PostgresMode::Advisory,
        PostgresMode::Transaction,
    ] {
        let a = postgres_support::backend_in(mode).await;
        let b = postgres_support::backend_named(mode, "wait_backends", 2).await;
        twenty_duplicates(a, b, &format!("wait-pg-{mode:?}")).await;
    }
}
