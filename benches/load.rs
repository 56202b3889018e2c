//! End-to-end load: the payments example under each configuration, driven
//! over real sockets, reported as ratios to the no-layer baseline of the
//! same run.
//!
//! Run with `scripts/load.sh [seconds] [connections]` (it builds the
//! examples and the peers first). Configurations: `none`
//! (`IDEMPOTENCY=off`), `memory`, `redis` (`REDIS_URL`, default
//! 127.0.0.1:6379), `sqlite` and `sqlite-relaxed` (`synchronous = FULL`
//! and `NORMAL`; files in the temporary directory, removed after),
//! `postgres`, `postgres-prepared`, `postgres-advisory`
//! and `postgres-transaction` (the `PG_MODE`s, and lease mode with
//! `PG_PREPARED=1`; `DATABASE_URL`, default the `test` database on
//! 127.0.0.1:5432), and the same handler behind the peer crates
//! `idempotent` and `axum-idempotent` (built from `bench/peers`).
//! `LOAD_CONFIGS=none,memory` and `LOAD_MODES=fresh,hot` run subsets. Modes:
//! `fresh` (a new key per request), `replay` (one key per connection, created
//! in the warm-up), `mixed` (half and half), `hot` (every connection on one
//! key) and `nokey` (no `Idempotency-Key`: the pass-through path). Every
//! configuration's server is started first and they are driven in turn, mode
//! by mode, so one mode's rows are measured back to back. The servers are
//! pinned to CPU 0 and this generator to CPU 1 when `taskset` is available,
//! so the generator does not steal the server's core.
//!
//! `LOAD_ROUNDS=n` repeats that whole sequence `n` times, each round starting
//! the configurations at another one, and reports, per configuration and
//! mode, the median of the rounds (req/s, latencies, CPU) and the sums of the
//! counts. "vs none" is the ratio to the baseline measured in the same round
//! and mode (neighbouring runs, so the machine's drift between rounds
//! cancels out), as the median of the rounds with their range.
//!
//! `redis-limit` and `postgres-limit` are not servers: they drive Redis and
//! PostgreSQL directly with the `redis` and `postgres` configurations' own
//! scripts and statements (see `load_limits`), in the same rounds, and the
//! last table shows each backend's rate as a share of its limit.
//!
//! `LOAD_BEFORE_BIN=<path>` adds the configuration `memory-before`: another
//! build of the memory example (an earlier version of the crate, built by
//! `scripts/before-after.sh`), measured in the same run as `memory`.
//!
//! Every request carries the same session cookie (`axum-idempotent` caches
//! only for a request with a session; the others ignore it). After each run
//! the handler's own count (`GET /stats`) says how often it really ran.
//!
//! Then a probe of overlapping duplicates (32 connections of one client
//! send one new key at once to a 200 ms handler: how often does it run?),
//! and, for Redis and PostgreSQL, the backend's cost per request: one
//! client sends fresh requests and replays one at a time, and the harness
//! counts Redis commands (`INFO commandstats` deltas) and PostgreSQL round
//! trips and statements (a protocol-reading proxy in front of the server).

#[path = "load_limits/mod.rs"]
mod load_limits;
#[path = "../tests/postgres_wire/mod.rs"]
mod postgres_wire;
#[path = "../tests/redis_monitor/mod.rs"]
mod redis_monitor;
#[path = "servers/mod.rs"]
mod servers;
#[path = "../tests/sqlite_files/mod.rs"]
mod sqlite_files;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const BODY: &str = r#"{"amount":500,"currency":"EUR"}"#;
/// Where the Redis and PostgreSQL configurations keep their records; the
/// harness removes them before and after a run.
const REDIS_PREFIX: &str = "load-bench:";
const TABLE: &str = "load_bench_records";
/// A session cookie as `ruts` issues them (22 canonical base64url
/// characters, so the last one carries no spare bits): one client per
/// connection, or one client on every connection (`hot`).
fn session_cookie(client: usize) -> String {
    format!("session=client{client:015}A")
}

/// The client of `hot` and of the duplicates probe.
const ONE_CLIENT: usize = 999_999_999_999_999;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Fresh,
    Replay,
    Mixed,
    Hot,
    NoKey,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Replay => "replay",
            Self::Mixed => "mixed",
            Self::Hot => "hot",
            Self::NoKey => "nokey",
        }
    }
}

struct Config {
    name: &'static str,
    bin: PathBuf,
    env: Vec<(&'static str, String)>,
    cost: Cost,
}

/// How to count a configuration's backend work.
enum Cost {
    None,
    Redis(String),
    Postgres(String),
    /// A SQLite file (with its WAL files), removed before and after.
    File(PathBuf),
    /// Not a server: what Redis allows for the scripts of the `redis`
    /// configuration (see `load_limits`).
    RedisLimit(String),
    /// Not a server: what PostgreSQL allows for the statements of the
    /// `postgres` configuration (lease mode).
    PostgresLimit(String),
}

impl Cost {
    fn is_limit(&self) -> bool {
        matches!(self, Self::RedisLimit(_) | Self::PostgresLimit(_))
    }
}

#[derive(Default)]
struct Outcome {
    latencies_us: Vec<u32>,
    ok: u64,
    conflict: u64,
    other: u64,
    replayed: u64,
}

struct Row {
    config: &'static str,
    mode: Mode,
    rps: f64,
    p50_us: u32,
    p99_us: u32,
    conflict: u64,
    other: u64,
    replayed: u64,
    handler_runs: u64,
    server_cpu_us_per_req: Option<f64>,
    /// req/s over the `none` configuration's in the same round and mode,
    /// one per round.
    ratios: Vec<f64>,
    /// For `redis` and `postgres`: req/s over the backend's limit measured
    /// in the same round and mode, one per round.
    of_limit: Vec<f64>,
}

fn peers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/peers/target/release")
}

fn examples_dir() -> PathBuf {
    // target/release/deps/load-<hash> → target/release/examples
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples")
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

/// Sends one payment; returns its status and whether it was a replay (each
/// crate marks one with a header: `Idempotent-Replayed` or
/// `Idempotency-Replayed`).
async fn post(sender: &mut Sender, key: Option<&str>, cookie: &str) -> (StatusCode, bool) {
    let mut req = Request::post("/payments")
        .header("host", "bench")
        .header("content-type", "application/json")
        .header("cookie", cookie);
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let req = req
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .expect("request");
    sender.ready().await.expect("connection ready");
    let res = sender.send_request(req).await.expect("response");
    let status = res.status();
    let replayed = res
        .headers()
        .keys()
        .any(|name| name.as_str().ends_with("-replayed"));
    res.into_body().collect().await.expect("body");
    (status, replayed)
}

/// How often the handler has run, from the example's `GET /stats`.
async fn handler_runs(addr: SocketAddr) -> u64 {
    let mut sender = connect(addr).await;
    let req = Request::get("/stats")
        .header("host", "bench")
        .body(Full::new(Bytes::new()))
        .expect("request");
    sender.ready().await.expect("connection ready");
    let res = sender.send_request(req).await.expect("response");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&body);
    text.split("\"handler_runs\":")
        .nth(1)
        .and_then(|rest| rest.trim_end_matches('}').trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected /stats answer {text:?}"))
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// Makes this run's keys differ from any earlier run's.
fn nonce() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Drives `connections` keep-alive connections for `seconds`.
async fn drive(addr: SocketAddr, mode: Mode, connections: usize, seconds: u64) -> Outcome {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let nonce = nonce();
    let hot_key = Arc::new(format!("\"hot-{nonce}-{run}\""));
    let mut tasks = tokio::task::JoinSet::new();
    for conn in 0..connections {
        let hot_key = Arc::clone(&hot_key);
        tasks.spawn(async move {
            let mut sender = connect(addr).await;
            let own = format!("\"replay-{nonce}-{run}-{conn}\"");
            // Warm-up: create the key this connection replays.
            // One client per connection; `hot` is one client on them all.
            let cookie = session_cookie(if mode == Mode::Hot { ONE_CLIENT } else { conn });
            post(&mut sender, Some(&own), &cookie).await;
            let mut out = Outcome::default();
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let fresh = || format!("\"fresh-{nonce}-{run}-{conn}-{i}\"");
                let key = match mode {
                    Mode::Fresh => Some(fresh()),
                    Mode::Mixed if i.is_multiple_of(2) => Some(fresh()),
                    Mode::Replay | Mode::Mixed => Some(own.clone()),
                    Mode::Hot => Some((*hot_key).clone()),
                    Mode::NoKey => None,
                };
                let started = Instant::now();
                let (status, replayed) = post(&mut sender, key.as_deref(), &cookie).await;
                let took = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                out.latencies_us.push(took);
                out.replayed += u64::from(replayed);
                match status {
                    s if s.is_success() => out.ok += 1,
                    StatusCode::CONFLICT => out.conflict += 1,
                    _ => out.other += 1,
                }
            }
            out
        });
    }
    gather(tasks).await
}

/// The connections' outcomes as one.
async fn gather(mut tasks: tokio::task::JoinSet<Outcome>) -> Outcome {
    let mut total = Outcome::default();
    while let Some(done) = tasks.join_next().await {
        let out = done.expect("load task");
        total.latencies_us.extend(out.latencies_us);
        total.ok += out.ok;
        total.conflict += out.conflict;
        total.other += out.other;
        total.replayed += out.replayed;
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
    let pin = servers::pin_this_process();
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let configs = configs(redis_url, database_url);
    let only = std::env::var("LOAD_CONFIGS").ok();
    let configs: Vec<Config> = configs
        .into_iter()
        .filter(|c| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == c.name))
        })
        .collect();
    let only_modes = std::env::var("LOAD_MODES").ok();
    let modes: Vec<Mode> = [
        Mode::Fresh,
        Mode::Replay,
        Mode::Mixed,
        Mode::Hot,
        Mode::NoKey,
    ]
    .into_iter()
    .filter(|m| {
        only_modes
            .as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == m.name()))
    })
    .collect();
    println!(
        "load: {seconds}s per run, {connections} connections, server pinned: {pin}, {} configs x {} modes",
        configs.len(),
        modes.len()
    );
    for config in &configs {
        clean(config).await;
    }
    let rows = measure(&configs, &modes, connections, seconds, pin).await;
    print_table(&rows, &modes, connections);
    print_limits(&rows, &modes);
    let mut costs = Vec::new();
    for config in &configs {
        match &config.cost {
            Cost::None | Cost::File(_) | Cost::RedisLimit(_) | Cost::PostgresLimit(_) => {}
            Cost::Redis(url) => costs.push(redis_cost(config, url).await),
            Cost::Postgres(url) => costs.push(postgres_cost(config, url).await),
        }
    }
    let mut probes = Vec::new();
    for config in configs
        .iter()
        .filter(|c| c.name != "none" && !c.cost.is_limit())
    {
        probes.push(duplicates(config).await);
    }
    for config in &configs {
        clean(config).await;
    }
    if !probes.is_empty() {
        println!();
        println!(
            "{DUPLICATES} overlapping duplicates (one client, one new key, a {SLOW_HANDLER_MS} ms handler):"
        );
        println!();
        println!("| config | handler runs | answers |");
        println!("|---|---|---|");
        for line in probes {
            println!("{line}");
        }
    }
    if !costs.is_empty() {
        println!();
        println!("| backend | per fresh request | per replay |");
        println!("|---|---|---|");
        for line in costs {
            println!("{line}");
        }
    }
}

/// Starts every configuration's server, then drives them mode by mode, one
/// configuration after another within a mode.
async fn measure(
    configs: &[Config],
    modes: &[Mode],
    connections: usize,
    seconds: u64,
    pin: bool,
) -> Vec<Row> {
    let mut servers = Vec::new();
    for config in configs {
        servers.push(if config.cost.is_limit() {
            None
        } else {
            Some(servers::start(&config.bin, &config.env, pin).await)
        });
    }
    let limits = Limits::prepare(configs, &servers).await;
    let rounds: usize = std::env::var("LOAD_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let mut rows: Vec<Vec<Row>> = (0..modes.len() * configs.len())
        .map(|_| Vec::new())
        .collect();
    for round in 0..rounds {
        for (m, &mode) in modes.iter().enumerate() {
            // Each round starts with another configuration, so none is always
            // measured first (or last) after the machine's state changed.
            for i in 0..configs.len() {
                let c = (i + round) % configs.len();
                let config = &configs[c];
                let row = match &servers[c] {
                    Some((child, addr)) => {
                        measure_one(config, child, *addr, mode, connections, seconds).await
                    }
                    // What a request without a key costs the backend: nothing.
                    None if mode == Mode::NoKey => continue,
                    None => limits.measure(config, mode, connections, seconds).await,
                };
                eprintln!(
                    "done: round {} / {} / {} ({:.0} req/s)",
                    round + 1,
                    config.name,
                    mode.name(),
                    row.rps
                );
                rows[m * configs.len() + c].push(row);
            }
        }
    }
    // Each round's ratio to the baseline measured in that same round and
    // mode: the machine's state drifts between rounds, and a ratio of two
    // neighbouring runs drifts less than either figure.
    if let Some(base) = configs.iter().position(|c| c.name == "none") {
        for m in 0..modes.len() {
            let base_rps: Vec<f64> = rows[m * configs.len() + base]
                .iter()
                .map(|r| r.rps)
                .collect();
            for c in 0..configs.len() {
                for (row, base) in rows[m * configs.len() + c].iter_mut().zip(&base_rps) {
                    row.ratios = vec![row.rps / base];
                }
            }
        }
    }
    // The same for each backend against its limit.
    for (backend, limit) in LIMITS {
        let find = |name| configs.iter().position(|c| c.name == name);
        let (Some(b), Some(l)) = (find(backend), find(limit)) else {
            continue;
        };
        for m in 0..modes.len() {
            let limit_rps: Vec<f64> = rows[m * configs.len() + l].iter().map(|r| r.rps).collect();
            for (row, limit) in rows[m * configs.len() + b].iter_mut().zip(&limit_rps) {
                row.of_limit = vec![row.rps / limit];
            }
        }
    }
    rows.into_iter()
        .filter(|rounds| !rounds.is_empty())
        .map(median_row)
        .collect()
}

/// One configuration's rounds as one row: medians of the rates and
/// latencies, sums of the counts.
fn median_row(mut rounds: Vec<Row>) -> Row {
    fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    }
    let rps = median(rounds.iter().map(|r| r.rps).collect());
    let p50_us = median(rounds.iter().map(|r| r.p50_us).collect());
    let p99_us = median(rounds.iter().map(|r| r.p99_us).collect());
    let cpu: Option<Vec<f64>> = rounds.iter().map(|r| r.server_cpu_us_per_req).collect();
    let ratios: Vec<f64> = rounds
        .iter()
        .flat_map(|r| r.ratios.iter().copied())
        .collect();
    let of_limit: Vec<f64> = rounds
        .iter()
        .flat_map(|r| r.of_limit.iter().copied())
        .collect();
    let mut row = rounds.pop().expect("at least one round");
    row.ratios = ratios;
    row.of_limit = of_limit;
    for other in &rounds {
        row.conflict += other.conflict;
        row.other += other.other;
        row.replayed += other.replayed;
        row.handler_runs += other.handler_runs;
    }
    row.rps = rps;
    row.p50_us = p50_us;
    row.p99_us = p99_us;
    row.server_cpu_us_per_req = cpu.map(median);
    row
}

/// Drives one configuration's running server in one mode.
async fn measure_one(
    config: &Config,
    child: &tokio::process::Child,
    addr: SocketAddr,
    mode: Mode,
    connections: usize,
    seconds: u64,
) -> Row {
    let pid = child.id().expect("server pid");
    let runs_before = handler_runs(addr).await;
    let cpu_before = servers::cpu_time(pid);
    let started = Instant::now();
    let mut out = drive(addr, mode, connections, seconds).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = servers::cpu_time(pid)
        .zip(cpu_before)
        .and_then(|(after, before)| after.checked_sub(before));
    let runs = handler_runs(addr).await - runs_before;
    out.latencies_us.sort_unstable();
    #[allow(clippy::cast_precision_loss)]
    let requests = out.latencies_us.len() as f64;
    Row {
        config: config.name,
        mode,
        rps: requests / elapsed,
        p50_us: percentile(&out.latencies_us, 0.50),
        p99_us: percentile(&out.latencies_us, 0.99),
        conflict: out.conflict,
        other: out.other,
        replayed: out.replayed,
        handler_runs: runs,
        server_cpu_us_per_req: cpu.map(|c| c.as_secs_f64() * 1e6 / requests),
        ratios: Vec::new(),
        of_limit: Vec::new(),
    }
}

/// Each backend configuration and the one that measures its server's limit.
const LIMITS: [(&str, &str); 2] = [("redis", "redis-limit"), ("postgres", "postgres-limit")];

/// The limit configurations' drivers, prepared once the servers run.
#[derive(Default)]
struct Limits {
    redis: Option<load_limits::RedisLimit>,
    postgres: Option<load_limits::PostgresLimit>,
}

impl Limits {
    /// Each limit needs a record its backend's configuration stored: one
    /// request with a new key to that server first.
    async fn prepare(
        configs: &[Config],
        servers: &[Option<(tokio::process::Child, SocketAddr)>],
    ) -> Self {
        let mut limits = Self::default();
        for config in configs {
            let backend = match &config.cost {
                Cost::RedisLimit(_) => "redis",
                Cost::PostgresLimit(_) => "postgres",
                _ => continue,
            };
            let Some((_, addr)) = configs
                .iter()
                .position(|c| c.name == backend)
                .and_then(|i| servers[i].as_ref())
            else {
                panic!(
                    "{} measures the {backend} configuration's work: run it too",
                    config.name
                )
            };
            let mut sender = connect(*addr).await;
            let key = format!("\"limit-{}\"", nonce());
            let (status, _) = post(&mut sender, Some(&key), &session_cookie(0)).await;
            assert!(status.is_success(), "{backend} answered {status}");
            match &config.cost {
                Cost::RedisLimit(url) => {
                    let limit = load_limits::RedisLimit::prepare(url, REDIS_PREFIX).await;
                    eprintln!("redis-limit: a {}-byte record", limit.record_len());
                    limits.redis = Some(limit);
                }
                Cost::PostgresLimit(url) => {
                    let clients = PG_POOL_SIZE.parse().expect("a pool size");
                    let limit = load_limits::PostgresLimit::prepare(url, TABLE, clients).await;
                    eprintln!(
                        "postgres-limit: a {}-byte record, table {}",
                        limit.record_len(),
                        limit.table()
                    );
                    limits.postgres = Some(limit);
                }
                _ => {}
            }
        }
        limits
    }

    /// One limit configuration in one mode: Redis at the connections the
    /// HTTP load uses, PostgreSQL at the example's pool size.
    async fn measure(&self, config: &Config, mode: Mode, connections: usize, seconds: u64) -> Row {
        let started = Instant::now();
        let (mut out, rps) = match &config.cost {
            Cost::RedisLimit(_) => {
                let limit = self.redis.as_ref().expect("prepared");
                let run = RUN.fetch_add(1, Ordering::Relaxed);
                let out = limit.drive(run, mode, connections, seconds).await;
                #[allow(clippy::cast_precision_loss)]
                let rps = out.latencies_us.len() as f64 / started.elapsed().as_secs_f64();
                (out, rps)
            }
            Cost::PostgresLimit(_) => {
                let limit = self.postgres.as_ref().expect("prepared");
                let clients = PG_POOL_SIZE.parse().expect("a pool size");
                // Blocks this single-threaded generator, which has nothing
                // else to drive meanwhile.
                let out = limit.drive(mode, clients, seconds);
                // pgbench's own clock: its run, without connecting.
                #[allow(clippy::cast_precision_loss)]
                let rps = out.latencies_us.len() as f64 / seconds as f64;
                (out, rps)
            }
            _ => unreachable!("not a limit"),
        };
        out.latencies_us.sort_unstable();
        Row {
            config: config.name,
            mode,
            rps,
            p50_us: percentile(&out.latencies_us, 0.50),
            p99_us: percentile(&out.latencies_us, 0.99),
            conflict: out.conflict,
            other: out.other,
            replayed: out.replayed,
            handler_runs: 0,
            server_cpu_us_per_req: None,
            ratios: Vec::new(),
            of_limit: Vec::new(),
        }
    }
}

/// Connections per PostgreSQL server: the four PostgreSQL configurations
/// run side by side against a server that accepts 100.
const PG_POOL_SIZE: &str = "20";

/// The SQLite configurations: `synchronous = FULL` (the default) and
/// `NORMAL`, each on a file of its own in the temporary directory.
fn sqlite_configs(examples: &std::path::Path) -> Vec<Config> {
    let file = |tag: &str| {
        std::env::temp_dir().join(format!(
            "tower-idempotency-load{tag}-{}.sqlite3",
            std::process::id()
        ))
    };
    let (sqlite_path, relaxed_path) = (file(""), file("-relaxed"));
    vec![
        Config {
            name: "sqlite",
            bin: examples.join("payments_sqlite"),
            env: vec![("SQLITE_PATH", sqlite_path.display().to_string())],
            cost: Cost::File(sqlite_path),
        },
        Config {
            name: "sqlite-relaxed",
            bin: examples.join("payments_sqlite"),
            env: vec![
                ("SQLITE_PATH", relaxed_path.display().to_string()),
                ("SQLITE_SYNCHRONOUS", "normal".to_owned()),
            ],
            cost: Cost::File(relaxed_path),
        },
    ]
}

/// Every configuration, in the order they run.
fn configs(redis_url: String, database_url: String) -> Vec<Config> {
    let examples = examples_dir();
    let peers = peers_dir();
    let before = std::env::var_os("LOAD_BEFORE_BIN").map(|bin| Config {
        name: "memory-before",
        bin: PathBuf::from(bin),
        env: vec![("MIN_RETENTION_SECS", "0".to_owned())],
        cost: Cost::None,
    });
    let mut configs = vec![
        Config {
            name: "none",
            bin: examples.join("payments"),
            env: vec![("IDEMPOTENCY", "off".to_owned())],
            cost: Cost::None,
        },
        Config {
            name: "memory",
            bin: examples.join("payments"),
            // Millions of fresh keys: evict the oldest at the bound instead
            // of refusing new keys for an hour.
            env: vec![("MIN_RETENTION_SECS", "0".to_owned())],
            cost: Cost::None,
        },
        Config {
            name: "redis",
            bin: examples.join("payments_redis"),
            env: vec![
                ("REDIS_URL", redis_url.clone()),
                ("REDIS_PREFIX", REDIS_PREFIX.to_owned()),
            ],
            cost: Cost::Redis(redis_url),
        },
        Config {
            name: "postgres",
            bin: examples.join("payments_postgres"),
            env: vec![
                ("DATABASE_URL", database_url.clone()),
                // Four servers share PostgreSQL's 100 connections.
                ("PG_POOL_SIZE", PG_POOL_SIZE.to_owned()),
                ("IDEMPOTENCY_TABLE", TABLE.to_owned()),
            ],
            cost: Cost::Postgres(database_url.clone()),
        },
        Config {
            name: "postgres-prepared",
            bin: examples.join("payments_postgres"),
            env: vec![
                ("DATABASE_URL", database_url.clone()),
                // Four servers share PostgreSQL's 100 connections.
                ("PG_POOL_SIZE", PG_POOL_SIZE.to_owned()),
                ("IDEMPOTENCY_TABLE", format!("{TABLE}_prepared")),
                ("PG_PREPARED", "1".to_owned()),
            ],
            cost: Cost::Postgres(database_url.clone()),
        },
        Config {
            name: "postgres-advisory",
            bin: examples.join("payments_postgres"),
            env: vec![
                ("DATABASE_URL", database_url.clone()),
                // Four servers share PostgreSQL's 100 connections.
                ("PG_POOL_SIZE", PG_POOL_SIZE.to_owned()),
                ("IDEMPOTENCY_TABLE", format!("{TABLE}_advisory")),
                ("PG_MODE", "advisory".to_owned()),
            ],
            cost: Cost::Postgres(database_url.clone()),
        },
        Config {
            name: "postgres-transaction",
            bin: examples.join("payments_postgres"),
            env: vec![
                ("DATABASE_URL", database_url.clone()),
                // Four servers share PostgreSQL's 100 connections.
                ("PG_POOL_SIZE", PG_POOL_SIZE.to_owned()),
                ("IDEMPOTENCY_TABLE", format!("{TABLE}_transaction")),
                ("PAYMENTS_TABLE", format!("{TABLE}_payments")),
                ("PG_MODE", "transaction".to_owned()),
            ],
            cost: Cost::Postgres(database_url),
        },
        Config {
            name: "idempotent",
            bin: peers.join("idempotent"),
            env: vec![],
            cost: Cost::None,
        },
        Config {
            name: "axum-idempotent",
            bin: peers.join("axum_idempotent"),
            env: vec![],
            cost: Cost::None,
        },
    ];
    add_limits(&mut configs);
    // After Redis and its limit, in the order the tables list the backends.
    let after_redis = configs
        .iter()
        .position(|c| c.name == "redis-limit")
        .map_or(0, |i| i + 1);
    configs.splice(after_redis..after_redis, sqlite_configs(&examples));
    configs.extend(before);
    configs
}

/// Each limit configuration beside its backend's.
fn add_limits(configs: &mut Vec<Config>) {
    for (backend, limit) in LIMITS {
        let at = configs
            .iter()
            .position(|c| c.name == backend)
            .expect("a backend configuration");
        let cost = match &configs[at].cost {
            Cost::Redis(url) => Cost::RedisLimit(url.clone()),
            Cost::Postgres(url) => Cost::PostgresLimit(url.clone()),
            _ => unreachable!("a backend's cost"),
        };
        configs.insert(
            at + 1,
            Config {
                name: limit,
                bin: PathBuf::new(),
                env: Vec::new(),
                cost,
            },
        );
    }
}

/// Removes what earlier runs stored: keys under [`REDIS_PREFIX`], the
/// [`TABLE`] and its function.
async fn clean(config: &Config) {
    match &config.cost {
        // Their keys and rows are under the `redis` and `postgres`
        // configurations' prefix and table.
        Cost::None | Cost::RedisLimit(_) | Cost::PostgresLimit(_) => {}
        Cost::File(path) => {
            sqlite_files::remove(path);
        }
        Cost::Redis(url) => {
            let client = redis::Client::open(url.as_str()).expect("REDIS_URL");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to Redis");
            let pattern = format!("{REDIS_PREFIX}*");
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(10_000)
                    .query_async(&mut conn)
                    .await
                    .expect("SCAN");
                if !keys.is_empty() {
                    let _: u64 = redis::cmd("UNLINK")
                        .arg(&keys)
                        .query_async(&mut conn)
                        .await
                        .expect("remove the benchmark's Redis keys");
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Cost::Postgres(url) => {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect to PostgreSQL");
            tokio::spawn(conn);
            for (name, table) in &config.env {
                if matches!(*name, "IDEMPOTENCY_TABLE" | "PAYMENTS_TABLE") {
                    client
                        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
                        .await
                        .expect("drop the benchmark's table");
                }
            }
        }
    }
}

/// How many connections send the same new key at once in the duplicates
/// probe, and how long its handler takes.
const DUPLICATES: usize = 32;
const SLOW_HANDLER_MS: u64 = 200;

/// Overlapping duplicates: [`DUPLICATES`] connections of one client send
/// the same new key at the same moment to a handler that takes
/// [`SLOW_HANDLER_MS`]. A layer that deduplicates under concurrency runs the
/// handler once and tells the others to wait.
async fn duplicates(config: &Config) -> String {
    let mut env = config.env.clone();
    env.push(("PAYMENT_DELAY_MS", SLOW_HANDLER_MS.to_string()));
    let slow = Config {
        name: config.name,
        bin: config.bin.clone(),
        env,
        cost: Cost::None,
    };
    let (child, addr) = servers::start(&slow.bin, &slow.env, false).await;
    let mut senders = Vec::new();
    for _ in 0..DUPLICATES {
        senders.push(connect(addr).await);
    }
    let nonce = nonce();
    let key = Arc::new(format!("\"duplicate-{nonce}\""));
    let cookie = Arc::new(session_cookie(ONE_CLIENT));
    let before = handler_runs(addr).await;
    let mut tasks = tokio::task::JoinSet::new();
    for mut sender in senders {
        let (key, cookie) = (Arc::clone(&key), Arc::clone(&cookie));
        tasks.spawn(async move { post(&mut sender, Some(&key), &cookie).await });
    }
    let mut answers = BTreeMap::<String, usize>::new();
    while let Some(done) = tasks.join_next().await {
        let (status, replayed) = done.expect("duplicate request");
        let answer = if replayed {
            format!("{} replayed", status.as_u16())
        } else {
            status.as_u16().to_string()
        };
        *answers.entry(answer).or_default() += 1;
    }
    let runs = handler_runs(addr).await - before;
    drop(child);
    let answers: Vec<String> = answers
        .iter()
        .map(|(status, n)| format!("{n} × {status}"))
        .collect();
    format!("| {} | {runs} | {} |", config.name, answers.join(", "))
}

/// Requests sent one at a time by the cost phase, after as many to warm up.
const COUNTED: u64 = 200;

/// Sends `COUNTED` fresh requests, then replays each of them once, over one
/// connection; `snapshot` is taken before, between and after.
async fn counted_requests<T>(addr: SocketAddr, mut snapshot: impl AsyncFnMut() -> T) -> [T; 3] {
    let mut sender = connect(addr).await;
    let cookie = session_cookie(0);
    let nonce = nonce();
    for i in 0..COUNTED {
        let key = format!("\"warm-{nonce}-{i}\"");
        post(&mut sender, Some(&key), &cookie).await;
        post(&mut sender, Some(&key), &cookie).await;
    }
    let keys: Vec<String> = (0..COUNTED)
        .map(|i| format!("\"counted-{nonce}-{i}\""))
        .collect();
    let before = snapshot().await;
    for key in &keys {
        let (status, replayed) = post(&mut sender, Some(key), &cookie).await;
        assert!(status.is_success() && !replayed, "fresh request: {status}");
    }
    let fresh = snapshot().await;
    for key in &keys {
        let (status, replayed) = post(&mut sender, Some(key), &cookie).await;
        assert!(status.is_success() && replayed, "replay: {status}");
    }
    [before, fresh, snapshot().await]
}

/// Calls per command from `INFO commandstats`, without the harness' own
/// `INFO` and `ECHO`.
async fn commandstats(conn: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            (name != "info" && name != "echo").then(|| (name.to_owned(), calls))
        })
        .collect()
}

/// What Redis saw up to one point of the cost phase.
struct RedisSnapshot {
    stats: BTreeMap<String, u64>,
    /// `MONITOR` lines since the previous snapshot: command, inside a script.
    since_last: Vec<(String, bool)>,
}

/// Commands per request between two snapshots: those clients sent (from
/// `MONITOR`), those the scripts ran, and whether `INFO commandstats`
/// counted the same total.
fn per_request(before: &RedisSnapshot, after: &RedisSnapshot) -> String {
    let mut sent = BTreeMap::<&str, u64>::new();
    let mut scripted = BTreeMap::<&str, u64>::new();
    for (command, in_script) in &after.since_last {
        if !in_script && (command == "INFO" || command == "ECHO") {
            continue;
        }
        *if *in_script { &mut scripted } else { &mut sent }
            .entry(command.as_str())
            .or_default() += 1;
    }
    let stats: u64 = after
        .stats
        .iter()
        .map(|(name, calls)| calls - before.stats.get(name).copied().unwrap_or(0))
        .sum();
    let monitored: u64 = sent.values().chain(scripted.values()).sum();
    #[allow(clippy::cast_precision_loss)]
    let per = |n: u64| n as f64 / COUNTED as f64;
    let list = |counts: &BTreeMap<&str, u64>| {
        counts
            .iter()
            .map(|(name, n)| format!("`{name}` {:.2}", per(*n)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{:.2} commands: {} (run inside the scripts: {}; `INFO commandstats` {})",
        per(sent.values().sum()),
        list(&sent),
        list(&scripted),
        if stats == monitored {
            "agrees".to_owned()
        } else {
            format!("counted {stats}, MONITOR {monitored}")
        }
    )
}

async fn redis_cost(config: &Config, url: &str) -> String {
    let (child, addr) = servers::start(&config.bin, &config.env, false).await;
    let client = redis::Client::open(url).expect("REDIS_URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let mut monitor = redis_monitor::Monitor::start(url).await;
    let mut marks = 0u32;
    let [before, fresh, replay] = counted_requests(addr, async || {
        marks += 1;
        let marker = format!("load-cost-{}-{marks}", std::process::id());
        let stats = commandstats(&mut conn).await;
        redis_monitor::mark(&mut conn, &marker).await;
        RedisSnapshot {
            stats,
            since_last: monitor.until(&marker).await,
        }
    })
    .await;
    drop(child);
    format!(
        "| Redis (`MONITOR`, `INFO commandstats`) | {} | {} |",
        per_request(&before, &fresh),
        per_request(&fresh, &replay)
    )
}

async fn postgres_cost(config: &Config, url: &str) -> String {
    let wire = Arc::new(postgres_wire::Wire::default());
    let port = postgres_wire::proxy(Arc::clone(&wire), url).await;
    let mut env: Vec<_> = config
        .env
        .iter()
        .filter(|(name, _)| *name != "DATABASE_URL")
        .cloned()
        .collect();
    env.push(("DATABASE_URL", postgres_wire::via(url, port)));
    let proxied = Config {
        name: config.name,
        bin: config.bin.clone(),
        env,
        cost: Cost::None,
    };
    let (child, addr) = servers::start(&proxied.bin, &proxied.env, false).await;
    let [before, fresh, replay] = counted_requests(addr, async || wire.snapshot()).await;
    drop(child);
    #[allow(clippy::cast_precision_loss)]
    let per = |a: (u64, u64), b: (u64, u64)| {
        format!(
            "{:.2} round trips, {:.2} statements",
            (b.0 - a.0) as f64 / COUNTED as f64,
            (b.1 - a.1) as f64 / COUNTED as f64
        )
    };
    format!(
        "| PostgreSQL {} (wire proxy) | {} | {} |",
        config.name,
        per(before, fresh),
        per(fresh, replay)
    )
}

/// The results as a markdown table, each mode against its `none` baseline.
/// The median of the per-round ratios, and their range when there were
/// several rounds: `0.62x (0.60–0.65)`.
fn ratio_cell(ratios: &[f64]) -> String {
    let mut sorted = ratios.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.as_slice() {
        [] => "-".to_owned(),
        [one] => format!("{one:.2}x"),
        [low, .., high] => format!("{:.2}x ({low:.2}–{high:.2})", sorted[sorted.len() / 2]),
    }
}

/// Each backend's throughput as a share of what its server allows, per
/// mode, beside the bare server (no configuration can beat either), and
/// the application's CPU per request over the bare server's.
fn print_limits(rows: &[Row], modes: &[Mode]) {
    let find = |name: &str, mode: Mode| rows.iter().find(|r| r.config == name && r.mode == mode);
    let mut lines = Vec::new();
    for &mode in modes {
        for (backend, limit) in LIMITS {
            let (Some(b), Some(l)) = (find(backend, mode), find(limit, mode)) else {
                continue;
            };
            let none = find("none", mode);
            let cpu = b
                .server_cpu_us_per_req
                .zip(none.and_then(|n| n.server_cpu_us_per_req))
                .map_or_else(|| "-".to_owned(), |(b, n)| format!("{:+.0} µs", b - n));
            lines.push(format!(
                "| {} | {backend} | {:.0} | {:.0} | {} | {} | {cpu} |",
                mode.name(),
                b.rps,
                l.rps,
                none.map_or_else(|| "-".to_owned(), |n| format!("{:.0}", n.rps)),
                ratio_cell(&b.of_limit).replace('x', ""),
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    println!();
    println!(
        "| mode | backend | through the layer, req/s | the server's limit, req/s | bare handler, req/s | share of the limit | server CPU/req over none |"
    );
    println!("|---|---|---|---|---|---|---|");
    for line in lines {
        println!("{line}");
    }
}

fn print_table(rows: &[Row], modes: &[Mode], connections: usize) {
    println!();
    println!(
        "| mode | config | req/s | vs none | p50 | p99 | server CPU/req | handler runs | replayed | 409 | other non-2xx |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");

    for &mode in modes {
        for row in rows.iter().filter(|r| r.mode == mode) {
            let ratio = ratio_cell(&row.ratios);
            let cpu = row
                .server_cpu_us_per_req
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.0} µs"));
            println!(
                "| {} | {} | {:.0} | {} | {:.2} ms | {:.2} ms | {} | {} | {} | {} | {} |",
                mode.name(),
                row.config,
                row.rps,
                ratio,
                f64::from(row.p50_us) / 1000.0,
                f64::from(row.p99_us) / 1000.0,
                cpu,
                row.handler_runs,
                row.replayed,
                row.conflict,
                row.other,
            );
        }
    }
    println!();
    println!(
        "Handler runs are summed over the rounds and include each connection's warm-up request ({connections} per run and round): in `hot`, a layer that deduplicates runs the handler {connections} + 1 times per round."
    );
}
