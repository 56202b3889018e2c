//! Redis commands per request, counted by Redis itself (`MONITOR`): two for
//! a fresh request, one for a replay. Its own test binary, so no other test
//! talks to the server meanwhile.

mod common;
mod redis_monitor;
mod redis_support;

use common::{Runs, counting, post, send};
use redis_monitor::{Monitor, mark};
use redis_support::{admin, backend, redis_url};
use tower::Layer;
use tower_idempotency::IdempotencyLayer;

async fn calls(admin: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap();
    info.lines()
        .find(|l| l.starts_with(&format!("cmdstat_{command}:")))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn two_commands_fresh_one_command_replay() {
    let url = redis_url();
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend().await).layer(counting(runs.clone()));
    // Warm up: the connection is taken from the pool and the scripts cached.
    send(&mut svc, post("/p", Some("warm-up"), "x")).await;
    send(&mut svc, post("/p", Some("warm-up"), "x")).await;

    let mut admin = admin(&url).await;
    let mut monitor = Monitor::start(&url).await;
    let evalsha_before = calls(&mut admin, "evalsha").await;

    mark(&mut admin, "start").await;
    monitor.until("start").await;
    let fresh = send(&mut svc, post("/p", Some("counted"), "x")).await;
    assert!(!fresh.replayed());
    mark(&mut admin, "fresh-done").await;
    let fresh_commands = monitor.until("fresh-done").await;
    let evalsha_fresh = calls(&mut admin, "evalsha").await - evalsha_before;

    let replay = send(&mut svc, post("/p", Some("counted"), "x")).await;
    assert!(replay.replayed());
    mark(&mut admin, "replay-done").await;
    let replay_commands = monitor.until("replay-done").await;
    let evalsha_replay = calls(&mut admin, "evalsha").await - evalsha_before - evalsha_fresh;

    println!("fresh request: {fresh_commands:?} (commandstats evalsha +{evalsha_fresh})");
    println!("replay: {replay_commands:?} (commandstats evalsha +{evalsha_replay})");
    // The INFO calls of this test sit between the markers too.
    let ours = |cmds: &[(String, bool)]| {
        cmds.iter()
            .filter(|(c, in_script)| !in_script && c.as_str() != "INFO")
            .map(|(c, _)| c.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ours(&fresh_commands),
        ["EVALSHA", "EVALSHA"],
        "a fresh request costs begin + complete"
    );
    assert_eq!(
        ours(&replay_commands),
        ["EVALSHA"],
        "a replay costs begin only"
    );
    assert_eq!(evalsha_fresh, 2);
    assert_eq!(evalsha_replay, 1);
    assert_eq!(runs.get(), 2);
}
