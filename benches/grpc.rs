//! Unary gRPC through the layer against the same tonic service without it,
//! in one run: `examples/grpc_payments` with `IDEMPOTENCY=off` (`none`), on
//! the memory backend (`memory`) and on Redis (`redis`), driven by tonic
//! clients over TCP.
//!
//! ```sh
//! cargo build --release --features grpc,redis --example grpc_payments
//! cargo bench --features grpc,redis --bench grpc -- 5 32    # seconds per run, calls in flight
//! ```
//!
//! Each round runs every mode on every configuration in turn (A B C A B C
//! …); a row gives the median over `GRPC_ROUNDS` rounds (default 3) of
//! calls per second, of its ratio to `none` in the same round (with the
//! range), the server's CPU time per call (from `/proc`: counts that a
//! neighbour's load moves less than throughput) and the p99 latency. The
//! server is pinned to CPU 0 and this client to CPU 1 when `taskset` is
//! there.
//!
//! - `fresh`: every call a new key (the handler runs; the record is stored);
//! - `replay`: each client's one stored key again and again (`none` runs
//!   the handler every time: that is what a retry costs without the layer).

#![allow(clippy::cast_precision_loss, reason = "call counts far below 2^52")]

#[path = "../examples/grpc/payments.rs"]
mod payments;
#[path = "servers/mod.rs"]
mod servers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use payments::{CreatePayment, PaymentsClient};
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fresh,
    Replay,
}

impl Mode {
    const fn name(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Replay => "replay",
        }
    }
}

struct Config {
    name: &'static str,
    env: Vec<(&'static str, String)>,
}

struct Run {
    calls: u64,
    seconds: f64,
    cpu: Duration,
    p99: Duration,
}

fn example() -> PathBuf {
    // target/release/deps/grpc-<hash> → target/release/examples/grpc_payments
    let exe = std::env::current_exe().expect("the bench's path");
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("examples").join("grpc_payments"))
        .expect("a target directory");
    assert!(
        bin.exists(),
        "{} is missing: cargo build --release --features grpc,redis --example grpc_payments",
        bin.display()
    );
    bin
}

static KEYS: AtomicU64 = AtomicU64::new(0);

fn new_key() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "\"bench-{}-{nanos}-{}\"",
        std::process::id(),
        KEYS.fetch_add(1, Ordering::Relaxed)
    )
}

fn keyed(key: &str) -> Request<CreatePayment> {
    let mut req = Request::new(CreatePayment {
        amount: 500,
        currency: "EUR".to_owned(),
    });
    req.metadata_mut().insert(
        "idempotency-key",
        MetadataValue::try_from(key).expect("an ASCII key"),
    );
    req
}

/// `in_flight` clients on `in_flight / 8` connections (HTTP/2 streams
/// multiplex), each calling in a loop for `seconds`.
async fn drive(
    addr: SocketAddr,
    mode: Mode,
    in_flight: usize,
    seconds: f64,
) -> (u64, Vec<Duration>) {
    let mut channels = Vec::new();
    for _ in 0..in_flight.div_ceil(8) {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a URI")
            .connect()
            .await
            .expect("connect");
        channels.push(channel);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..in_flight {
        let mut client = PaymentsClient::new(channels[i % channels.len()].clone());
        tasks.spawn(async move {
            let own = new_key();
            if mode == Mode::Replay {
                client.create(keyed(&own)).await.expect("the first call");
            }
            let mut latencies = Vec::new();
            let end = Instant::now() + Duration::from_secs_f64(seconds);
            while Instant::now() < end {
                let key = match mode {
                    Mode::Fresh => new_key(),
                    Mode::Replay => own.clone(),
                };
                let started = Instant::now();
                client.create(keyed(&key)).await.expect("a payment");
                latencies.push(started.elapsed());
            }
            latencies
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("a client task"));
    }
    (all.len() as u64, all)
}

async fn measure(config: &Config, mode: Mode, in_flight: usize, seconds: f64, pin: bool) -> Run {
    let mut env = config.env.clone();
    env.push(("RUST_LOG", "warn".to_owned()));
    let (child, addr) = servers::start(&example(), &env, pin).await;
    let pid = child.id().expect("a running server");
    // Warm up: connections, the server's pools, the backend's connection.
    drive(addr, mode, in_flight, 0.5).await;
    let cpu_before = servers::cpu_time(pid);
    let started = Instant::now();
    let (calls, mut latencies) = drive(addr, mode, in_flight, seconds).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = servers::cpu_time(pid)
        .zip(cpu_before)
        .and_then(|(after, before)| after.checked_sub(before))
        .unwrap_or_default();
    drop(child);
    latencies.sort_unstable();
    let p99 = latencies
        .get(latencies.len().saturating_mul(99) / 100)
        .copied()
        .unwrap_or_default();
    Run {
        calls,
        seconds: elapsed,
        cpu,
        p99,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let seconds: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let in_flight: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(32);
    let rounds: usize = std::env::var("GRPC_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let configs = [
        // `DATABASE_URL` emptied: the example would pick PostgreSQL.
        Config {
            name: "none",
            env: vec![
                ("IDEMPOTENCY", "off".to_owned()),
                ("REDIS_URL", String::new()),
                ("DATABASE_URL", String::new()),
            ],
        },
        Config {
            name: "memory",
            env: vec![
                ("REDIS_URL", String::new()),
                ("DATABASE_URL", String::new()),
            ],
        },
        Config {
            name: "redis",
            env: vec![("REDIS_URL", redis_url), ("DATABASE_URL", String::new())],
        },
    ];
    let modes = [Mode::Fresh, Mode::Replay];
    let pin = servers::pin_this_process();
    println!(
        "grpc: {seconds}s per run, {in_flight} calls in flight, {rounds} rounds, server pinned: {pin}"
    );
    // runs[mode][config][round]
    let mut runs: Vec<Vec<Vec<Run>>> = modes
        .iter()
        .map(|_| configs.iter().map(|_| Vec::new()).collect())
        .collect();
    for _ in 0..rounds {
        for (m, mode) in modes.iter().enumerate() {
            for (c, config) in configs.iter().enumerate() {
                runs[m][c].push(measure(config, *mode, in_flight, seconds, pin).await);
            }
        }
    }
    println!();
    println!("| config | mode | calls/s | vs none (range) | server CPU µs/call | p99 |");
    println!("|---|---|---:|---:|---:|---:|");
    for (m, mode) in modes.iter().enumerate() {
        for (c, config) in configs.iter().enumerate() {
            let rate = |r: &Run| r.calls as f64 / r.seconds;
            let mut rates: Vec<f64> = runs[m][c].iter().map(rate).collect();
            let mut ratios: Vec<f64> = runs[m][c]
                .iter()
                .zip(&runs[m][0])
                .map(|(r, none)| rate(r) / rate(none))
                .collect();
            let mut cpu: Vec<f64> = runs[m][c]
                .iter()
                .map(|r| r.cpu.as_secs_f64() * 1e6 / r.calls.max(1) as f64)
                .collect();
            let mut p99: Vec<f64> = runs[m][c]
                .iter()
                .map(|r| r.p99.as_secs_f64() * 1e3)
                .collect();
            let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let high = ratios.iter().copied().fold(0.0, f64::max);
            println!(
                "| {} | {} | {:.0} | {:.2}× ({low:.2}–{high:.2}) | {:.0} | {:.1} ms |",
                config.name,
                mode.name(),
                median(&mut rates),
                median(&mut ratios),
                median(&mut cpu),
                median(&mut p99),
            );
        }
    }
}
