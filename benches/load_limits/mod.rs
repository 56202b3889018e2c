//! What Redis and PostgreSQL themselves allow for the layer's work, measured
//! in the same run as the layer: the backend's own statements, driven as
//! fast as the server takes them, with no application in between.
//!
//! - **Redis**: the crate's own Lua scripts (the files the backend includes),
//!   loaded with `SCRIPT LOAD` and run by `EVALSHA` exactly as the backend
//!   calls them: a fresh request is the begin script on a new key then the
//!   complete script with a real stored record; a replay is the begin script
//!   on a stored key. The client is written for this: commands encoded once
//!   per request by hand, one in flight per connection, replies parsed in
//!   place, so it costs the generator's core a small part of what the
//!   server spends (as `redis-benchmark -c N -P 1` does, which cannot chain
//!   the complete script to the begin script's reply). The backend pipelines
//!   its requests over one shared connection instead, which costs Redis
//!   less per command: this limit is what Redis allows 32 clients that wait
//!   for each answer, and a layer may exceed it.
//! - **PostgreSQL**: `pgbench` (extended protocol, unnamed statements, as
//!   the backend sends them by default) with lease mode's two statements
//!   per fresh request and its one per replay, against the table and
//!   functions the example's `migrate()` made, with a real stored record.
//!
//! Both run on the generator's core (the harness's own affinity, inherited
//! by `pgbench`), while the idle example servers keep theirs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Mode, Outcome};

const BEGIN: &str = include_str!("../../src/backend/redis/lua/begin.lua");
const COMPLETE: &str = include_str!("../../src/backend/redis/lua/complete.lua");
/// The layer's default lock TTL, how long a fence key outlives it (the
/// backend's `FENCE_OUTLIVES_LOCK_MS`), and the examples' record TTL.
const LOCK_TTL_MS: &str = "10000";
const FENCE_OUTLIVES_MS: &str = "600000";
const RECORD_TTL_MS: &str = "86400000";

/// A RESP2 reply, as far as the scripts' replies need.
#[derive(Debug)]
enum Reply {
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
    Status,
    /// Read only through `Debug`, in the message of a failed run.
    #[allow(dead_code)]
    Error(String),
}

/// Parses one reply from the front of `buf`: the reply and the bytes it
/// took, or `None` if it is not complete yet.
fn parse(buf: &[u8]) -> Option<(Reply, usize)> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..line_end]).ok()?;
    let after = line_end + 2;
    match buf.first()? {
        b':' => Some((Reply::Int(line.parse().ok()?), after)),
        b'+' => Some((Reply::Status, after)),
        b'-' => Some((Reply::Error(line.to_owned()), after)),
        b'$' => {
            let len: i64 = line.parse().ok()?;
            let Ok(len) = usize::try_from(len) else {
                return Some((Reply::Bulk(None), after));
            };
            let end = after + len;
            (buf.len() >= end + 2).then(|| (Reply::Bulk(Some(buf[after..end].to_vec())), end + 2))
        }
        b'*' => {
            let n: i64 = line.parse().ok()?;
            let mut at = after;
            let mut items = Vec::new();
            for _ in 0..n.max(0) {
                let (item, used) = parse(&buf[at..])?;
                items.push(item);
                at += used;
            }
            Some((Reply::Array(items), at))
        }
        _ => panic!("not a RESP2 reply: {:?}", String::from_utf8_lossy(buf)),
    }
}

/// `args` as a RESP command.
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.clear();
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// One connection with one command in flight.
struct Conn {
    stream: TcpStream,
    out: Vec<u8>,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect to Redis");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        Self {
            stream,
            out: Vec::with_capacity(1024),
            buf: Vec::with_capacity(4096),
        }
    }

    async fn call(&mut self, args: &[&[u8]]) -> Reply {
        encode(&mut self.out, args);
        self.stream
            .write_all(&self.out)
            .await
            .expect("write to Redis");
        self.buf.clear();
        loop {
            if let Some((reply, _)) = parse(&self.buf) {
                return reply;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.expect("read from Redis");
            assert!(n > 0, "Redis closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// `host:port` of a `redis://host:port[/db]` URL.
fn redis_addr(url: &str) -> String {
    let rest = url.strip_prefix("redis://").unwrap_or(url);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// What the Redis limit runs need: the scripts' SHAs and a stored record.
pub struct RedisLimit {
    addr: String,
    begin: String,
    complete: String,
    record: Vec<u8>,
    prefix: String,
}

impl RedisLimit {
    /// Loads the scripts and takes one record the layer stored under
    /// `prefix` (the caller made one).
    pub async fn prepare(url: &str, prefix: &str) -> Self {
        let addr = redis_addr(url);
        let mut conn = Conn::open(&addr).await;
        let mut sha =
            async |source: &str| match conn.call(&[b"SCRIPT", b"LOAD", source.as_bytes()]).await {
                Reply::Bulk(Some(sha)) => String::from_utf8(sha).expect("a hex SHA"),
                other => panic!("SCRIPT LOAD: {other:?}"),
            };
        let begin = sha(BEGIN).await;
        let complete = sha(COMPLETE).await;
        let pattern = format!("{prefix}*:rec");
        let mut cursor = b"0".to_vec();
        let record = loop {
            let reply = conn
                .call(&[
                    b"SCAN",
                    &cursor,
                    b"MATCH",
                    pattern.as_bytes(),
                    b"COUNT",
                    b"1000",
                ])
                .await;
            let Reply::Array(mut parts) = reply else {
                panic!("SCAN: {reply:?}")
            };
            let (Reply::Array(keys), Reply::Bulk(Some(next))) = (parts.remove(1), parts.remove(0))
            else {
                panic!("SCAN reply")
            };
            if let Some(Reply::Bulk(Some(key))) = keys.first() {
                match conn.call(&[b"GET", key]).await {
                    Reply::Bulk(Some(record)) => break record,
                    other => panic!("GET {}: {other:?}", String::from_utf8_lossy(key)),
                }
            }
            assert!(
                next != b"0",
                "no record stored under {prefix} to measure with"
            );
            cursor = next;
        };
        Self {
            addr,
            begin,
            complete,
            record,
            prefix: format!("{prefix}limit:"),
        }
    }

    /// Size of the stored record the runs write and read.
    pub fn record_len(&self) -> usize {
        self.record.len()
    }

    /// Drives `connections` connections for `seconds` in `mode`.
    pub async fn drive(&self, run: u64, mode: Mode, connections: usize, seconds: u64) -> Outcome {
        let mut tasks = tokio::task::JoinSet::new();
        for conn in 0..connections {
            let addr = self.addr.clone();
            let (begin, complete) = (self.begin.clone(), self.complete.clone());
            let record = self.record.clone();
            let prefix = self.prefix.clone();
            tasks.spawn(async move {
                let mut redis = Conn::open(&addr).await;
                // Keys as the backend names them: a 64-digit hex storage key
                // in a hash tag.
                let keys = |id: u128| {
                    let hex = format!("{id:064x}");
                    [
                        format!("{prefix}{{{hex}}}:rec"),
                        format!("{prefix}{{{hex}}}:lock"),
                        format!("{prefix}{{{hex}}}:fence"),
                    ]
                };
                let base = (u128::from(run) << 96) | ((conn as u128) << 64);
                let hot = keys(u128::from(run) << 96 | (u128::MAX >> 32 & 0xffff_ffff_ffff_ffff));
                let own = keys(base);
                let mut token = 0u64;
                let mut request = async |redis: &mut Conn, keys: &[String; 3]| -> (bool, bool) {
                    token += 1;
                    let token = format!("{:032x}", base | u128::from(token));
                    let reply = redis
                        .call(&[
                            b"EVALSHA",
                            begin.as_bytes(),
                            b"3",
                            keys[0].as_bytes(),
                            keys[1].as_bytes(),
                            keys[2].as_bytes(),
                            token.as_bytes(),
                            LOCK_TTL_MS.as_bytes(),
                            FENCE_OUTLIVES_MS.as_bytes(),
                        ])
                        .await;
                    let Reply::Array(parts) = reply else {
                        panic!("begin script: {reply:?}")
                    };
                    match parts.first() {
                        Some(Reply::Int(0)) => {
                            let stored = redis
                                .call(&[
                                    b"EVALSHA",
                                    complete.as_bytes(),
                                    b"2",
                                    keys[0].as_bytes(),
                                    keys[1].as_bytes(),
                                    token.as_bytes(),
                                    &record,
                                    RECORD_TTL_MS.as_bytes(),
                                ])
                                .await;
                            assert!(
                                matches!(stored, Reply::Int(1)),
                                "complete script: {stored:?}"
                            );
                            (true, false)
                        }
                        Some(Reply::Int(1)) => (true, true),
                        Some(Reply::Int(2)) => (false, false),
                        other => panic!("begin script: {other:?}"),
                    }
                };
                // Warm-up: the key this connection replays, and the hot one.
                request(&mut redis, &own).await;
                request(&mut redis, &hot).await;
                let mut out = Outcome::default();
                let deadline = Instant::now() + Duration::from_secs(seconds);
                let mut i = 0u128;
                while Instant::now() < deadline {
                    i += 1;
                    let fresh = || keys(base | (1 << 40) | i);
                    let started = Instant::now();
                    let (ok, replayed) = match mode {
                        Mode::Fresh => request(&mut redis, &fresh()).await,
                        Mode::Mixed if i.is_multiple_of(2) => request(&mut redis, &fresh()).await,
                        Mode::Replay | Mode::Mixed => request(&mut redis, &own).await,
                        Mode::Hot => request(&mut redis, &hot).await,
                        Mode::NoKey => unreachable!("no limit for requests without a key"),
                    };
                    let took = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                    out.latencies_us.push(took);
                    out.replayed += u64::from(replayed);
                    if ok {
                        out.ok += 1;
                    } else {
                        out.conflict += 1;
                    }
                }
                out
            });
        }
        super::gather(tasks).await
    }
}

/// What the PostgreSQL limit runs need: the lease-mode table and a record.
pub struct PostgresLimit {
    url: String,
    dir: PathBuf,
    table: String,
    record_len: usize,
}

impl PostgresLimit {
    /// Writes pgbench's scripts for `table` (migrated, in lease mode, with a
    /// record the layer stored) and stores the records its replays read.
    pub async fn prepare(url: &str, table: &str, clients: usize) -> Self {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        tokio::spawn(conn);
        let row = client
            .query_one(
                &format!(
                    "SELECT fingerprint, record FROM {table} WHERE record IS NOT NULL LIMIT 1"
                ),
                &[],
            )
            .await
            .expect("a record the layer stored, to measure with");
        let fingerprint: Vec<u8> = row.get(0);
        let record: Vec<u8> = row.get(1);
        let hex = |bytes: &[u8]| {
            use std::fmt::Write;
            bytes.iter().fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
        };
        let (fp, blob) = (hex(&fingerprint), hex(&record));
        // Stored records for the replays: key 0 (hot) and one per client
        // (pgbench's client ids count from 0).
        let key = |k: &str| format!("decode(lpad(to_hex({k}::bigint), 64, '0'), 'hex')");
        client
            .batch_execute(&format!(
                "INSERT INTO {table} (key, fingerprint, record, lock_token, expires_at) \
                 SELECT {}, '\\x{fp}', '\\x{blob}', NULL, now() + interval '1 day' \
                 FROM generate_series(0, {}) AS i \
                 ON CONFLICT (key) DO UPDATE SET record = EXCLUDED.record, \
                 fingerprint = EXCLUDED.fingerprint, lock_token = NULL, \
                 expires_at = EXCLUDED.expires_at",
                key("i + 1000000000000000000"),
                clients + 1
            ))
            .await
            .expect("store the records pgbench replays");
        let dir = std::env::temp_dir().join(format!("load-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for pgbench's scripts");
        let token = "\\x000102030405060708090a0b0c0d0e0f";
        // The backend's statements (see `src/backend/postgres/sql.rs`): the
        // begin call with its fencing token, and the fenced record write.
        let begin = |k: &str| {
            format!(
                "SELECT state, record, wait_ms, CASE WHEN state = 0 THEN nextval('{table}_fence') END \
                 FROM {table}_lease({k}::bigint, {}, '\\x{fp}'::bytea, '{token}'::bytea, {LOCK_TTL_MS});\n",
                key(k)
            )
        };
        let fresh = format!(
            "\\set k random(1, 999999999999999999)\n{}UPDATE {table} SET fingerprint = '\\x{fp}', \
             record = '\\x{blob}', lock_token = NULL, \
             expires_at = now() + {RECORD_TTL_MS}::bigint * interval '1 millisecond' \
             WHERE key = {} AND lock_token = '{token}' AND record IS NULL \
             AND expires_at > clock_timestamp();\n",
            begin(":k"),
            key(":k")
        );
        let replay = format!("\\set k :client_id + 1000000000000000001\n{}", begin(":k"));
        let hot = format!("\\set k 1000000000000000000\n{}", begin(":k"));
        for (name, text) in [("fresh", fresh), ("replay", replay), ("hot", hot)] {
            std::fs::write(dir.join(format!("{name}.sql")), text).expect("write a pgbench script");
        }
        Self {
            url: url.to_owned(),
            dir,
            table: table.to_owned(),
            record_len: record.len(),
        }
    }

    /// Size of the stored record the runs write and read.
    pub fn record_len(&self) -> usize {
        self.record_len
    }

    /// The table the runs write to.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Runs pgbench with `clients` connections for `seconds` in `mode`.
    pub fn drive(&self, mode: Mode, clients: usize, seconds: u64) -> Outcome {
        let scripts: &[&str] = match mode {
            Mode::Fresh => &["fresh.sql"],
            Mode::Replay => &["replay.sql"],
            Mode::Mixed => &["fresh.sql@1", "replay.sql@1"],
            Mode::Hot => &["hot.sql"],
            Mode::NoKey => unreachable!("no limit for requests without a key"),
        };
        let logs = self.dir.join(format!("log-{}", mode.name()));
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&logs).expect("a directory for pgbench's log");
        let mut cmd = std::process::Command::new("pgbench");
        cmd.args(["-n", "-M", "extended", "-j", "1", "-l"])
            .arg(format!("--log-prefix={}", logs.join("tx").display()))
            .arg(format!("-c{clients}"))
            .arg(format!("-T{seconds}"));
        for script in scripts {
            cmd.arg("-f").arg(self.dir.join(script));
        }
        let out = cmd.arg(&self.url).output().expect("run pgbench");
        assert!(
            out.status.success(),
            "pgbench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // One line per transaction: client, number, latency (µs), script, …
        let mut outcome = Outcome::default();
        for entry in std::fs::read_dir(&logs).expect("pgbench's log") {
            let text = std::fs::read_to_string(entry.expect("a log file").path())
                .expect("read pgbench's log");
            for line in text.lines() {
                let latency: u32 = line
                    .split_whitespace()
                    .nth(2)
                    .and_then(|f| f.parse().ok())
                    .expect("a latency in pgbench's log");
                outcome.latencies_us.push(latency);
                outcome.ok += 1;
            }
        }
        let _ = std::fs::remove_dir_all(&logs);
        outcome
    }
}

impl Drop for PostgresLimit {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
