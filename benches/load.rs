//! End-to-end load: the payments example under each configuration, driven
//! over real sockets, reported as ratios to the no-layer baseline of the
//! same run.
//!
//! Run with `scripts/load.sh [seconds] [connections]` (it builds the
//! examples first). Configurations: `none` (`IDEMPOTENCY=off`), `memory`,
//! `redis` (`REDIS_URL`, default 127.0.0.1:6379) and `postgres`
//! (`DATABASE_URL`, default the `test` database on 127.0.0.1:5432). Modes:
//! `fresh` (a new key per request), `replay` (one key per connection, created
//! in the warm-up), `mixed` (half and half) and `hot` (every connection on one
//! key). The server is pinned to CPU 0 and this generator to CPU 1 when
//! `taskset` is available, so the generator does not steal the server's core.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncBufReadExt;

const BODY: &str = r#"{"amount":500,"currency":"EUR"}"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Fresh,
    Replay,
    Mixed,
    Hot,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Replay => "replay",
            Self::Mixed => "mixed",
            Self::Hot => "hot",
        }
    }
}

struct Config {
    name: &'static str,
    example: &'static str,
    env: Vec<(&'static str, String)>,
}

#[derive(Default)]
struct Outcome {
    latencies_us: Vec<u32>,
    ok: u64,
    conflict: u64,
    other: u64,
}

struct Row {
    config: &'static str,
    mode: Mode,
    rps: f64,
    p50_us: u32,
    p99_us: u32,
    conflict: u64,
    other: u64,
    server_cpu_us_per_req: Option<f64>,
}

fn examples_dir() -> PathBuf {
    // target/release/deps/load-<hash> → target/release/examples
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples")
}

fn has_taskset() -> bool {
    std::process::Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// CPU time (user + system) a process has used, from `/proc`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in USER_HZ, 100 on every common configuration.
    Some(Duration::from_millis(ticks * 10))
}

async fn start(config: &Config, pin: bool) -> (tokio::process::Child, SocketAddr) {
    let bin = examples_dir().join(config.example);
    assert!(
        bin.exists(),
        "{} is missing: run scripts/load.sh",
        bin.display()
    );
    let mut cmd = if pin {
        let mut c = tokio::process::Command::new("taskset");
        c.arg("-c").arg("0").arg(&bin);
        c
    } else {
        tokio::process::Command::new(&bin)
    };
    cmd.env("ADDR", "127.0.0.1:0")
        .envs(config.env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("start the example");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the example printed no address")
        .expect("read stdout")
        .expect("an address line");
    let addr = line
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    (child, addr)
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn post(sender: &mut Sender, key: &str) -> StatusCode {
    let req = Request::post("/payments")
        .header("host", "bench")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .expect("request");
    sender.ready().await.expect("connection ready");
    let res = sender.send_request(req).await.expect("response");
    let status = res.status();
    res.into_body().collect().await.expect("body");
    status
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// Drives `connections` keep-alive connections for `seconds`.
async fn drive(addr: SocketAddr, mode: Mode, connections: usize, seconds: u64) -> Outcome {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let hot_key = Arc::new(format!("\"hot-{nonce}-{run}\""));
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..connections {
        let hot_key = Arc::clone(&hot_key);
        tasks.spawn(async move {
            let mut sender = connect(addr).await;
            let own = format!("\"replay-{nonce}-{run}-{conn}\"");
            // Warm-up: create the key this connection replays.
            post(&mut sender, &own).await;
            let mut out = Outcome::default();
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let fresh = || format!("\"fresh-{nonce}-{run}-{conn}-{i}\"");
                let key = match mode {
                    Mode::Fresh => fresh(),
                    Mode::Mixed if i.is_multiple_of(2) => fresh(),
                    Mode::Replay | Mode::Mixed => own.clone(),
                    Mode::Hot => (*hot_key).clone(),
                };
                let started = Instant::now();
                let status = post(&mut sender, &key).await;
                let took = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                out.latencies_us.push(took);
                match status {
                    s if s.is_success() => out.ok += 1,
                    StatusCode::CONFLICT => out.conflict += 1,
                    _ => out.other += 1,
                }
            }
            out
        });
    }
    let mut total = Outcome::default();
    while let Some(done) = tasks.join_next().await {
        let out = done.expect("load task");
        total.latencies_us.extend(out.latencies_us);
        total.ok += out.ok;
        total.conflict += out.conflict;
        total.other += out.other;
    }
    total
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn arg(args: &[String], i: usize, default: u64) -> u64 {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; positional numbers are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let seconds = arg(&args, 0, 10);
    let connections = usize::try_from(arg(&args, 1, 32)).unwrap_or(32);
    let pin = has_taskset();
    if pin {
        let pid = std::process::id().to_string();
        let _ = std::process::Command::new("taskset")
            .args(["-p", "-c", "1", &pid])
            .stdout(Stdio::null())
            .status();
    }
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let configs = [
        Config {
            name: "none",
            example: "payments",
            env: vec![("IDEMPOTENCY", "off".to_owned())],
        },
        Config {
            name: "memory",
            example: "payments",
            env: vec![],
        },
        Config {
            name: "redis",
            example: "payments_redis",
            env: vec![("REDIS_URL", redis_url)],
        },
        Config {
            name: "postgres",
            example: "payments_postgres",
            env: vec![("DATABASE_URL", database_url)],
        },
    ];
    let modes = [Mode::Fresh, Mode::Replay, Mode::Mixed, Mode::Hot];
    println!(
        "load: {seconds}s per run, {connections} connections, server pinned: {pin}, {} configs x {} modes",
        configs.len(),
        modes.len()
    );
    let mut rows = Vec::new();
    for config in &configs {
        let (child, addr) = start(config, pin).await;
        let pid = child.id().expect("server pid");
        for mode in modes {
            let cpu_before = cpu_time(pid);
            let started = Instant::now();
            let mut out = drive(addr, mode, connections, seconds).await;
            let elapsed = started.elapsed().as_secs_f64();
            let cpu = cpu_time(pid)
                .zip(cpu_before)
                .and_then(|(after, before)| after.checked_sub(before));
            out.latencies_us.sort_unstable();
            #[allow(clippy::cast_precision_loss)]
            let requests = out.latencies_us.len() as f64;
            rows.push(Row {
                config: config.name,
                mode,
                rps: requests / elapsed,
                p50_us: percentile(&out.latencies_us, 0.50),
                p99_us: percentile(&out.latencies_us, 0.99),
                conflict: out.conflict,
                other: out.other,
                server_cpu_us_per_req: cpu.map(|c| c.as_secs_f64() * 1e6 / requests),
            });
            eprintln!("done: {} / {} ({} ok)", config.name, mode.name(), out.ok);
        }
        drop(child);
    }
    print_table(&rows, &modes);
}

/// The results as a markdown table, each mode against its `none` baseline.
fn print_table(rows: &[Row], modes: &[Mode]) {
    println!();
    println!(
        "| mode | config | req/s | vs none | p50 | p99 | server CPU/req | 409 | other non-2xx |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &mode in modes {
        let base = rows
            .iter()
            .find(|r| r.mode == mode && r.config == "none")
            .map(|r| r.rps);
        for row in rows.iter().filter(|r| r.mode == mode) {
            let ratio = base.map_or_else(|| "-".to_owned(), |b| format!("{:.2}x", row.rps / b));
            let cpu = row
                .server_cpu_us_per_req
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.0} µs"));
            println!(
                "| {} | {} | {:.0} | {} | {:.2} ms | {:.2} ms | {} | {} | {} |",
                mode.name(),
                row.config,
                row.rps,
                ratio,
                f64::from(row.p50_us) / 1000.0,
                f64::from(row.p99_us) / 1000.0,
                cpu,
                row.conflict,
                row.other,
            );
        }
    }
}
