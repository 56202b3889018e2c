//! What each PostgreSQL mode costs per request, counted rather than timed:
//! round trips, statements and `Parse` messages on the wire (a proxy that
//! reads the PostgreSQL frontend protocol between the pool and the server:
//! a prepared statement is parsed once per connection, under a name; an
//! unnamed one with every use), WAL bytes
//! (`pg_current_wal_insert_lsn`) and write transactions (transaction ids
//! assigned: each is a WAL flush that its commit waits for, with the default
//! `synchronous_commit = on`).
//! `cargo test --all-features --test postgres_roundtrips -- --nocapture`
//! prints the table BENCHMARKS.md quotes.

mod common;
mod postgres_support;
mod postgres_wire;

use std::sync::Arc;

use common::{Runs, counting, post, send};
use postgres_support::{TABLE, admin, database_url, pool_for};
use postgres_wire::Wire;
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, PostgresBackend, PostgresMode};

/// Fresh requests per mode for the WAL figures.
const COUNTED: u64 = 50;

struct Cost {
    fresh: (u64, u64),
    replay: (u64, u64),
    /// `Parse` messages (named, unnamed): in the two warm-up requests, then
    /// in the counted fresh request and in its replay.
    warm_parses: (u64, u64),
    fresh_parses: (u64, u64),
    replay_parses: (u64, u64),
    wal_bytes: f64,
    writes: f64,
}

/// The WAL insert position and the next transaction id: read-only
/// transactions never take one.
async fn wal(admin: &tokio_postgres::Client) -> (i64, i64) {
    let row = admin
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint, \
             pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn cost(mode: PostgresMode, prepared: bool, admin: &tokio_postgres::Client) -> Cost {
    let wire = Arc::new(Wire::default());
    let port = postgres_wire::proxy(Arc::clone(&wire), &database_url()).await;
    let url = postgres_wire::via(&database_url(), port);
    // One connection: it is reused, so its prepared statements are too.
    let backend = PostgresBackend::builder(pool_for(&url, 1))
        .table(TABLE)
        .mode(mode)
        .prepared_statements(prepared)
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
    send(
        &mut svc,
        post("/p", Some(&format!("warm-{mode}-{nonce}")), "x"),
    )
    .await;
    send(
        &mut svc,
        post("/p", Some(&format!("warm-{mode}-{nonce}")), "x"),
    )
    .await;

    let warm_parses = wire.parses();

    let key = format!("counted-{mode}-{nonce}");
    let before = wire.snapshot();
    let fresh = send(&mut svc, post("/p", Some(&key), "x")).await;
    assert!(!fresh.replayed());
    let after_fresh = wire.snapshot();
    let fresh_parses = wire.parses();
    let replay = send(&mut svc, post("/p", Some(&key), "x")).await;
    assert!(replay.replayed());
    let after_replay = wire.snapshot();
    let replay_parses = wire.parses();

    let (bytes_before, syncs_before) = wal(admin).await;
    for i in 0..COUNTED {
        let answer = send(
            &mut svc,
            post("/p", Some(&format!("wal-{mode}-{nonce}-{i}")), "x"),
        )
        .await;
        assert!(!answer.replayed());
    }
    let (bytes_after, syncs_after) = wal(admin).await;
    #[allow(clippy::cast_precision_loss)]
    let per = |a: i64, b: i64| (b - a) as f64 / COUNTED as f64;
    Cost {
        fresh: (after_fresh.0 - before.0, after_fresh.1 - before.1),
        replay: (
            after_replay.0 - after_fresh.0,
            after_replay.1 - after_fresh.1,
        ),
        warm_parses,
        fresh_parses: (
            fresh_parses.0 - warm_parses.0,
            fresh_parses.1 - warm_parses.1,
        ),
        replay_parses: (
            replay_parses.0 - fresh_parses.0,
            replay_parses.1 - fresh_parses.1,
        ),
        wal_bytes: per(bytes_before, bytes_after),
        writes: per(syncs_before, syncs_after),
    }
}

#[tokio::test]
async fn what_each_mode_costs_per_request() {
    let admin = admin().await;
    println!(
        "| mode | fresh: round trips, statements | replay: round trips, statements | WAL bytes per fresh request | write transactions (WAL flushes) per fresh request |"
    );
    println!("|---|---|---|---|---|");
    for (mode, prepared, fresh, replay, writes) in [
        // begin (lease write); complete (record write)
        (PostgresMode::Lease, false, (2, 2), (1, 1), 2.0),
        (PostgresMode::Lease, true, (2, 2), (1, 1), 2.0),
        // begin; fenced write + unlock pipelined
        (PostgresMode::Advisory, false, (2, 3), (1, 1), 1.0),
        // BEGIN + begin pipelined; write + COMMIT pipelined. A replay
        // rolls its transaction back.
        (PostgresMode::Transaction, false, (2, 4), (2, 3), 1.0),
        (PostgresMode::Transaction, true, (2, 4), (2, 3), 1.0),
    ] {
        // Prepared statements (advisory mode always prepares) are parsed
        // by the warm-up only; unnamed ones with every use: begin and
        // complete (BEGIN, COMMIT and ROLLBACK are simple queries).
        let named = prepared || mode == PostgresMode::Advisory;
        let parses = if named {
            ((0, 0), (0, 0))
        } else {
            ((0, 2), (0, 1))
        };
        let cost = cost(mode, prepared, &admin).await;
        let mode = if prepared {
            format!("{mode}, prepared statements")
        } else {
            mode.to_string()
        };
        println!(
            "| {mode} | {}, {} | {}, {} | {:.0} | {:.2} |",
            cost.fresh.0, cost.fresh.1, cost.replay.0, cost.replay.1, cost.wal_bytes, cost.writes
        );
        assert_eq!(cost.fresh, fresh, "{mode}: fresh request");
        assert_eq!(cost.replay, replay, "{mode}: replay");
        assert_eq!(
            (cost.fresh_parses, cost.replay_parses),
            parses,
            "{mode}: Parse messages (named, unnamed) of a fresh request and a replay"
        );
        if named {
            assert!(
                cost.warm_parses.0 > 0 && cost.warm_parses.1 == 0,
                "{mode}: the warm-up prepares named statements, and only those: {:?}",
                cost.warm_parses
            );
        } else {
            assert_eq!(cost.warm_parses.0, 0, "{mode}: no statement is named");
        }
        // Other tests do not run beside this binary; the server's own
        // background work may take the odd transaction id.
        assert!(
            (writes..writes + 0.1).contains(&cost.writes),
            "{mode}: {:.2} write transactions per fresh request, {writes} expected",
            cost.writes
        );
    }
}
