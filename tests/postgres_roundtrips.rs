//! Round trips and statements per request, counted on the wire by a proxy
//! that reads the PostgreSQL frontend protocol between the pool and the
//! server.

mod common;
mod postgres_support;
mod postgres_wire;

use std::sync::Arc;

use common::{Runs, counting, post, send};
use postgres_support::{TABLE, database_url, pool_for};
use postgres_wire::Wire;
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, PostgresBackend};

#[tokio::test]
async fn two_round_trips_fresh_one_replay() {
    let wire = Arc::new(Wire::default());
    let port = postgres_wire::proxy(Arc::clone(&wire), &database_url()).await;
    let url = postgres_wire::via(&database_url(), port);
    // One connection: it is reused, so its prepared statements are too.
    let backend = PostgresBackend::builder(pool_for(&url, 1))
        .table(TABLE)
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend).layer(counting(runs.clone()));
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // Warm up: statements prepared on the one connection.
    send(&mut svc, post("/p", Some(&format!("warm-{nonce}")), "x")).await;
    send(&mut svc, post("/p", Some(&format!("warm-{nonce}")), "x")).await;

    let before = wire.snapshot();
    let fresh = send(&mut svc, post("/p", Some(&format!("counted-{nonce}")), "x")).await;
    assert!(!fresh.replayed());
    let after_fresh = wire.snapshot();
    let replay = send(&mut svc, post("/p", Some(&format!("counted-{nonce}")), "x")).await;
    assert!(replay.replayed());
    let after_replay = wire.snapshot();

    let fresh = (after_fresh.0 - before.0, after_fresh.1 - before.1);
    let replay = (
        after_replay.0 - after_fresh.0,
        after_replay.1 - after_fresh.1,
    );
    println!(
        "fresh request: {} round trips, {} statements",
        fresh.0, fresh.1
    );
    println!("replay: {} round trips, {} statements", replay.0, replay.1);
    assert_eq!(fresh, (2, 3), "begin; upsert + unlock pipelined");
    assert_eq!(replay, (1, 1), "begin only");
    assert_eq!(runs.get(), 2);
}
