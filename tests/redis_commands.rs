//! Redis commands per request, counted by Redis itself (`MONITOR`): two for
//! a fresh request, one for a replay. Its own test binary, so no other test
//! talks to the server meanwhile.

mod common;
mod redis_support;

use common::{Runs, counting, post, send};
use redis_support::{admin, backend, redis_url};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tower::Layer;
use tower_idempotency::IdempotencyLayer;

/// A `MONITOR` session on the server, read line by line.
struct Monitor {
    lines: tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
}

impl Monitor {
    async fn start(url: &str) -> Self {
        let addr = url.trim_start_matches("redis://").trim_end_matches('/');
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"MONITOR\r\n").await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
        Self { lines }
    }

    /// Client commands up to the `ECHO marker`: commands run inside Lua
    /// scripts (`[0 lua]`) are not round trips and are left out.
    async fn until(&mut self, marker: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line =
                tokio::time::timeout(std::time::Duration::from_secs(10), self.lines.next_line())
                    .await
                    .expect("MONITOR went silent")
                    .unwrap()
                    .expect("MONITOR closed");
            if line.contains("\"ECHO\"") && line.contains(marker) {
                return seen;
            }
            if line.contains(" lua] ") {
                continue;
            }
            let command = line.split('"').nth(1).unwrap_or_default().to_owned();
            seen.push(command);
        }
    }
}

async fn mark(admin: &mut redis::aio::MultiplexedConnection, marker: &str) {
    let _: String = redis::cmd("ECHO")
        .arg(marker)
        .query_async(admin)
        .await
        .unwrap();
}

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
    let ours = |cmds: &[String]| {
        cmds.iter()
            .filter(|c| c.as_str() != "INFO")
            .cloned()
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
