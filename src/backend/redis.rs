//! The Redis backend: several service instances share one Redis (standalone
//! or Redis Cluster) through the user's [`deadpool_redis`] pool.
//!
//! ```no_run
//! use tower_idempotency::{IdempotencyLayer, RedisBackend};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379")
//!     .create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
//! let layer = IdempotencyLayer::new(RedisBackend::new(pool));
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! # Round trips
//!
//! A fresh request costs **two** Redis commands and a replay **one**, each a
//! Lua script run with `EVALSHA`:
//!
//! - *begin*: `GET` the record; if there is none, `SET lock token NX PX ttl`;
//!   if that fails, answer busy with the lock's `PTTL`; if it succeeds, draw
//!   the lock's [fencing token](crate::fence) (`TIME`, and the key's last
//!   token, kept in a third key).
//! - *complete*: only while `GET lock == token`, `SET` the record with its TTL
//!   and `DEL` the lock; otherwise report the lock lost and write nothing.
//! - *release* (compare-and-delete) and *extend* (compare-and-`PEXPIRE`, the
//!   heartbeat of slow handlers) are only spent when needed.
//!
//! Scripts run by hash; after a `SCRIPT FLUSH` or a server restart
//! (`NOSCRIPT`) the call is repeated once as `EVAL` with the source, which
//! caches the script again.
//!
//! A pool checkout is a round trip too: deadpool-redis pings every recycled
//! connection (`UNWATCH` + `PING`) on `get()`. So the backend checks one
//! connection out of your pool **once** and multiplexes every request over
//! it (Redis connections pipeline concurrent commands). It gives the
//! connection up — detached from the pool, never returned broken — on an I/O
//! error or a timeout, and takes a fresh one from the pool on the next
//! request. Size your pool for this one connection on top of your own use.
//!
//! # Keys
//!
//! For a storage key `<hex>` and the prefix (default `idem:`), the record is
//! `idem:{<hex>}:rec`, the lock `idem:{<hex>}:lock`, and the last fencing
//! token `idem:{<hex>}:fence` (kept for the lock's TTL and ten minutes more,
//! so that a server clock stepped back cannot hand out a smaller token). The
//! braces are a hash tag: the keys of a request live in one slot, so the
//! scripts run on Redis Cluster. Records are encoded with [`RecordCodec`] (MessagePack, deflated
//! when large, checksummed) and expire with Redis' own `PX`.
//!
//! # Configure Redis with `maxmemory-policy noeviction`
//!
//! Redis must not evict these keys. An evicted *lock* lets a duplicate run
//! the handler concurrently; an evicted *record* makes a later retry run the
//! handler again. With `noeviction`, Redis refuses writes when full instead:
//! begin then fails with [`BackendErrorKind::Rejected`] and the layer answers
//! `503` (fail closed) — an outage, never a duplicate charge. If your Redis
//! must use an evicting policy, give these keys their own instance.
//!
//! The backend checks this itself: every connection it takes (the first,
//! and each replacement after an error, which may lead to a restarted or
//! failed-over server) first reads `maxmemory-policy` — with `CONFIG GET`,
//! or from `INFO memory` where `CONFIG` is disabled, as on managed services;
//! on a cluster, from `INFO memory` of every primary. Any policy but `noeviction`
//! is refused: requests fail with [`BackendErrorKind::Misconfigured`] (the
//! layer answers `503`, counted in the metrics), and the first refusal is
//! logged at `ERROR`. Call [`RedisBackend::verify`] at start-up to fail
//! before serving; choose [`allow_eviction`](RedisBackendBuilder::allow_eviction)
//! only if you accept the risk. A policy changed at run time with `CONFIG
//! SET` is seen when the connection is next replaced; on Redis Cluster, the
//! cluster client follows failovers and resharding on its own connection,
//! so call `verify` again (for example from a periodic health check) to
//! cover nodes that joined later.
//!
//! # Cancellation
//!
//! Every call is safe to drop. A lock token exists before `begin` sends its
//! script; if the future is dropped (client gone, timeout layer) or times out
//! before the reply is read, the token's lock is released by
//! compare-and-delete from a task of its own, so the key is free within
//! milliseconds rather than after the lock TTL. That release goes on the
//! connection the `begin` went out on: Redis runs one connection's commands
//! in order, so it cannot overtake a `begin` stalled on the way and leave
//! the lock to a token nobody holds (a fresh connection is used only once
//! that one is broken, when what it carried has run or never will). `complete` and `release` do
//! the same until their reply is read; releasing by token never touches
//! another request's lock, and a save that did happen has already removed
//! the lock.
//!
//! # Failures
//!
//! Every command is bounded by [`timeout`](RedisBackendBuilder::timeout)
//! (default 1 second). Refused or dropped connections, timeouts, `OOM`,
//! wrong-type values and corrupt records become a [`BackendError`] with a
//! [`kind`](BackendError::kind); the layer answers `503`. A corrupt record is
//! never replayed.
//!
//! A `complete` that cannot reach Redis (down, restarting, timed out) is
//! tried again from a task of its own — backing off up to once a second —
//! until the lock would lapse: the complete script checks the token, so it
//! stores only while the lock is still this request's. A Redis that comes
//! back with the lock (persistence, a replica promoted in time) gets the
//! record and the retry replays; one that lost the lock gets nothing
//! written. A refused store (`OOM`) releases the lock at once.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, ToRedisArgs, Value,
};

use tokio::time::Instant;

use super::late::{self, Lapse};
use super::{Backend, BackendError, BackendErrorKind, Begin, Completion};
use crate::{FencingToken, Fingerprint, Record, RecordCodec, StorageKey};

const BEGIN: &str = r"
-- KEYS[1] record, KEYS[2] lock, KEYS[3] fence; ARGV[1] token,
-- ARGV[2] lock TTL (ms), ARGV[3] how long the fence outlives it (ms)
local record = redis.call('GET', KEYS[1])
if record then
  return {1, record}
end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, redis.call('PTTL', KEYS[2])}
end
-- The fencing token: the server clock in microseconds, and past the key's
-- last token should the clock have stepped back.
local now = redis.call('TIME')
local fence = tonumber(now[1]) * 1000000 + tonumber(now[2])
local last = tonumber(redis.call('GET', KEYS[3]))
if last and last >= fence then
  fence = last + 1
end
fence = string.format('%.0f', fence)
redis.call('SET', KEYS[3], fence, 'PX', ARGV[2] + ARGV[3])
return {0, fence}
";

const COMPLETE: &str = r"
-- KEYS[1] record, KEYS[2] lock; ARGV[1] token, ARGV[2] record, ARGV[3] TTL (ms)
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
";

const RELEASE: &str = r"
-- KEYS[1] lock; ARGV[1] token
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

const EXTEND: &str = r"
-- KEYS[1] lock; ARGV[1] token, ARGV[2] lock TTL (ms)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// A [`Backend`] on Redis (standalone or Cluster), for services with more
/// than one instance. See the [module documentation](self).
///
/// Cloning is cheap; clones share the held connection.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency::{IdempotencyLayer, RedisBackend};
///
/// let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379")
///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
/// let layer = IdempotencyLayer::new(RedisBackend::new(pool));
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    held: ArcSwapOption<Held>,
    connecting: tokio::sync::Mutex<()>,
    generations: AtomicU64,
    prefix: String,
    timeout: Duration,
    codec: RecordCodec,
    /// Skip the eviction-policy check (the user accepts the risk).
    allow_eviction: bool,
    /// Whether a refused eviction policy was already logged loudly.
    warned: AtomicBool,
    begin: Lua,
    complete: Lua,
    release: Lua,
    extend: Lua,
}

/// A Lua script and its SHA-1, for `EVALSHA`.
struct Lua {
    source: &'static str,
    sha: String,
}

impl Lua {
    fn new(source: &'static str) -> Self {
        let sha = redis::Script::new(source).get_hash().to_owned();
        Self { source, sha }
    }
}

/// The keys and arguments of one script call.
struct Call {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Call {
    fn new(keys: &[&str]) -> Self {
        Self {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            args: Vec::new(),
        }
    }

    fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// `EVALSHA <sha> …` or `EVAL <source> …`.
    fn command(&self, verb: &str, script: &str) -> Cmd {
        let mut cmd = redis::cmd(verb);
        cmd.arg(script)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }
}

enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

/// A connection checked out of the pool and shared by all requests.
struct Held {
    conn: Conn,
    generation: u64,
    pooled: Option<Pooled>,
}

enum Pooled {
    Single(deadpool_redis::Connection),
    Cluster(deadpool_redis::cluster::Connection),
}

impl Drop for Held {
    fn drop(&mut self) {
        // Only dropped when given up after an error: detach it so the pool
        // never hands a broken connection to anyone else.
        match self.pooled.take() {
            Some(Pooled::Single(c)) => drop(deadpool_redis::Connection::take(c)),
            Some(Pooled::Cluster(c)) => drop(deadpool_redis::cluster::Connection::take(c)),
            None => {}
        }
    }
}

/// A cheap handle on the held connection: both kinds multiplex.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Proof of holding a key in a [`RedisBackend`]: the lock key and the
/// 128-bit random token stored in it.
///
/// ```no_run
/// # async fn run(backend: tower_idempotency::RedisBackend) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_idempotency::{Backend, Begin, Fingerprint, StorageKey};
///
/// let key = StorageKey::from_bytes([1; 32]);
/// let fp = Fingerprint::from_bytes([2; 32]);
/// if let Begin::Acquired(lock) = backend.begin(&key, &fp, Duration::from_secs(30)).await? {
///     // Only this lock's token can save or release the key.
///     backend.release(lock).await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RedisLock {
    record_key: String,
    lock_key: String,
    token: String,
    lapse: Lapse,
    fence: FencingToken,
}

/// Builds a [`RedisBackend`].
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_idempotency::RedisBackend;
///
/// let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379")
///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
/// let backend = RedisBackend::builder(pool)
///     .prefix("billing:idem:")
///     .timeout(Duration::from_millis(500))
///     .build()?;
/// # let _ = backend;
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct RedisBackendBuilder {
    pool: Pool,
    prefix: String,
    timeout: Duration,
    codec: RecordCodec,
    allow_eviction: bool,
}

impl fmt::Debug for RedisBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackendBuilder")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisBackendBuilder {
    /// The prefix of every key (default `idem:`). It may not contain `{` or
    /// `}`, which would break the hash tag.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The bound on each Redis operation, including taking a connection
    /// from the pool (default 1 second).
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How records are encoded: deflate threshold and the largest record
    /// accepted (see [`RecordCodec`]). Keep `max_record_size` above the
    /// layer's `max_stored_response` plus headers.
    pub const fn codec(mut self, codec: RecordCodec) -> Self {
        self.codec = codec;
        self
    }

    /// Runs on a Redis whose `maxmemory-policy` is not `noeviction`,
    /// accepting the risk: under memory pressure such a Redis may evict a
    /// lock (a duplicate then runs concurrently) or a record (a retry then
    /// runs again). Without this the backend refuses such a server (see
    /// [`RedisBackend::verify`]).
    pub const fn allow_eviction(mut self) -> Self {
        self.allow_eviction = true;
        self
    }

    /// Builds the backend. No connection is made until the first request.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::Misconfigured`] when the prefix holds `{` or `}`.
    pub fn build(self) -> Result<RedisBackend, BackendError> {
        if self.prefix.contains(['{', '}']) {
            return Err(BackendError::new(
                BackendErrorKind::Misconfigured,
                "the Redis key prefix may not contain '{' or '}' (they form the hash tag)",
            ));
        }
        Ok(self.into_backend())
    }

    fn into_backend(self) -> RedisBackend {
        RedisBackend {
            inner: Arc::new(Inner {
                pool: self.pool,
                held: ArcSwapOption::empty(),
                connecting: tokio::sync::Mutex::new(()),
                generations: AtomicU64::new(0),
                prefix: self.prefix,
                timeout: self.timeout,
                codec: self.codec,
                allow_eviction: self.allow_eviction,
                warned: AtomicBool::new(false),
                begin: Lua::new(BEGIN),
                complete: Lua::new(COMPLETE),
                release: Lua::new(RELEASE),
                extend: Lua::new(EXTEND),
            }),
        }
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner.pool {
            Pool::Single(_) => "standalone",
            Pool::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisBackend")
            .field("kind", &kind)
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A backend on a standalone Redis, with the default settings.
    #[must_use]
    pub fn new(pool: deadpool_redis::Pool) -> Self {
        Self::builder_for(Pool::Single(pool)).into_backend()
    }

    /// A backend on Redis Cluster, with the default settings.
    #[must_use]
    pub fn new_cluster(pool: deadpool_redis::cluster::Pool) -> Self {
        Self::builder_for(Pool::Cluster(pool)).into_backend()
    }

    /// Starts a builder for a standalone Redis.
    pub fn builder(pool: deadpool_redis::Pool) -> RedisBackendBuilder {
        Self::builder_for(Pool::Single(pool))
    }

    /// Starts a builder for Redis Cluster.
    pub fn cluster_builder(pool: deadpool_redis::cluster::Pool) -> RedisBackendBuilder {
        Self::builder_for(Pool::Cluster(pool))
    }

    fn builder_for(pool: Pool) -> RedisBackendBuilder {
        RedisBackendBuilder {
            pool,
            prefix: "idem:".to_owned(),
            timeout: Duration::from_secs(1),
            codec: RecordCodec::new(),
            allow_eviction: false,
        }
    }

    /// Checks, at start-up, that Redis can be reached and keeps what this
    /// backend writes: its `maxmemory-policy` must be `noeviction` (read with
    /// `CONFIG GET`, or from `INFO memory` where `CONFIG` is disabled, as on
    /// managed services; on Redis Cluster, every node that answers). The same
    /// check runs on its own whenever the backend takes a new connection;
    /// calling this surfaces a misconfiguration before the first request.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_idempotency::RedisBackend;
    ///
    /// let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379")
    ///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
    /// let backend = RedisBackend::new(pool);
    /// backend.verify().await?; // refuse to start on an evicting Redis
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::Misconfigured`] for an evicting policy (unless
    /// [`allow_eviction`](RedisBackendBuilder::allow_eviction)) or one that
    /// cannot be read; [`BackendErrorKind::Unavailable`] or
    /// [`BackendErrorKind::Timeout`] when Redis cannot be reached.
    pub async fn verify(&self) -> Result<(), BackendError> {
        let (mut conn, _) = self.connection().await?;
        tokio::time::timeout(self.inner.timeout, self.check_eviction_policy(&mut conn))
            .await
            .map_err(|_| {
                BackendError::new(
                    BackendErrorKind::Timeout,
                    "timed out reading Redis' maxmemory-policy",
                )
            })?
    }

    /// Drops the record stored under `key`, if any: an operator removing a
    /// record that must not be replayed, or that cannot be read (a request
    /// then gets `500` until it expires). A lock held by a request in flight
    /// is left alone. Returns whether a record was dropped. The same by hand:
    /// `DEL <prefix>{<hex>}:rec`, with the hex storage key the logs show.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when Redis cannot be reached or refuses.
    pub async fn forget(&self, key: &StorageKey) -> Result<bool, BackendError> {
        let (record_key, _, _) = self.keys(key);
        let (mut conn, generation) = self.connection().await?;
        let deleted = tokio::time::timeout(
            self.inner.timeout,
            redis::cmd("DEL")
                .arg(&record_key)
                .query_async::<i64>(&mut conn),
        )
        .await
        .map_err(|_| {
            BackendError::new(
                BackendErrorKind::Timeout,
                format!("Redis did not answer within {:?}", self.inner.timeout),
            )
        })?
        .map_err(|error| {
            if connection_broken(&error) {
                self.discard(generation);
            }
            map_error(error)
        })?;
        Ok(deleted > 0)
    }

    /// Refuses a Redis that may evict locks or records.
    async fn check_eviction_policy(&self, conn: &mut Conn) -> Result<(), BackendError> {
        if self.inner.allow_eviction {
            return Ok(());
        }
        let cluster = matches!(self.inner.pool, Pool::Cluster(_));
        let policies = eviction_policies(conn, cluster).await?;
        let Some(bad) = policies.iter().find(|p| p.as_str() != "noeviction") else {
            return Ok(());
        };
        let message = format!(
            "Redis runs with maxmemory-policy {bad}: it may evict idempotency locks and records, \
             letting a request run twice. Set maxmemory-policy noeviction (or give these keys \
             their own Redis), or accept the risk with RedisBackendBuilder::allow_eviction"
        );
        if self.inner.warned.swap(true, Ordering::Relaxed) {
            tracing::debug!("{message}");
        } else {
            tracing::error!("{message}");
        }
        Err(BackendError::new(BackendErrorKind::Misconfigured, message))
    }

    /// The Redis keys of a storage key: (record, lock, fence).
    fn keys(&self, key: &StorageKey) -> (String, String, String) {
        let hex = key.to_hex();
        let prefix = &self.inner.prefix;
        (
            format!("{prefix}{{{hex}}}:rec"),
            format!("{prefix}{{{hex}}}:lock"),
            format!("{prefix}{{{hex}}}:fence"),
        )
    }

    /// The shared connection, taking one from the pool if none is held.
    async fn connection(&self) -> Result<(Conn, u64), BackendError> {
        if let Some(held) = &*self.inner.held.load() {
            return Ok((held.conn.clone(), held.generation));
        }
        // The wait for another task's attempt counts against the timeout
        // too: against a silent server, requests must not queue behind one
        // another's attempts.
        tokio::time::timeout(self.inner.timeout, self.connect())
            .await
            .map_err(|_| {
                BackendError::new(
                    BackendErrorKind::Timeout,
                    "timed out taking a Redis connection from the pool",
                )
            })?
    }

    async fn connect(&self) -> Result<(Conn, u64), BackendError> {
        // One task connects; the others wait for it instead of draining
        // the pool.
        let _connecting = self.inner.connecting.lock().await;
        if let Some(held) = &*self.inner.held.load() {
            return Ok((held.conn.clone(), held.generation));
        }
        let pooled = self.checkout().await?;
        let mut conn = match &pooled {
            Pooled::Single(c) => Conn::Single((**c).clone()),
            Pooled::Cluster(c) => Conn::Cluster((**c).clone()),
        };
        // Every new connection may lead to another server (a restart with
        // another configuration, a failover): check it before using it.
        self.check_eviction_policy(&mut conn).await?;
        let generation = self.inner.generations.fetch_add(1, Ordering::Relaxed) + 1;
        self.inner.held.store(Some(Arc::new(Held {
            conn: conn.clone(),
            generation,
            pooled: Some(pooled),
        })));
        Ok((conn, generation))
    }

    async fn checkout(&self) -> Result<Pooled, BackendError> {
        let unavailable = |e: &dyn fmt::Display| {
            BackendError::new(
                BackendErrorKind::Unavailable,
                format!("no Redis connection from the pool: {e}"),
            )
        };
        match &self.inner.pool {
            Pool::Single(pool) => pool
                .get()
                .await
                .map(Pooled::Single)
                .map_err(|e| unavailable(&e).with_source(e)),
            Pool::Cluster(pool) => pool
                .get()
                .await
                .map(Pooled::Cluster)
                .map_err(|e| unavailable(&e).with_source(e)),
        }
    }

    /// Gives up the connection of `generation`, unless it was already
    /// replaced.
    fn discard(&self, generation: u64) {
        self.inner.held.rcu(|current| match current {
            Some(held) if held.generation == generation => None,
            other => other.clone(),
        });
    }

    /// Runs one script on the shared connection, bounded by the timeout:
    /// `EVALSHA`, and after a `SCRIPT FLUSH` or restart (`NOSCRIPT`) one
    /// `EVAL` with the source, which also caches it again. (`SCRIPT LOAD`
    /// then `EVALSHA` would cost a round trip more and fail again if another
    /// flush came in between.)
    async fn invoke(&self, lua: &Lua, call: Call) -> Result<Value, BackendError> {
        let (conn, generation) = self.connection().await?;
        self.invoke_on(conn, generation, lua, call).await
    }

    /// [`invoke`](Self::invoke) on a connection taken before.
    async fn invoke_on(
        &self,
        mut conn: Conn,
        generation: u64,
        lua: &Lua,
        call: Call,
    ) -> Result<Value, BackendError> {
        let run = async {
            match call
                .command("EVALSHA", &lua.sha)
                .query_async(&mut conn)
                .await
            {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    call.command("EVAL", lua.source)
                        .query_async(&mut conn)
                        .await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.inner.timeout, run).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                if connection_broken(&error) {
                    self.discard(generation);
                }
                Err(map_error(error))
            }
            Err(_) => {
                // A silent peer: replace the connection so a server that
                // comes back is found again.
                self.discard(generation);
                Err(BackendError::new(
                    BackendErrorKind::Timeout,
                    format!("Redis did not answer within {:?}", self.inner.timeout),
                ))
            }
        }
    }
}

impl RedisBackend {
    /// Compare-and-delete of the lock `lock_key` held by `token`, on `conn`
    /// when given (after the command it must follow), else on the shared
    /// connection.
    async fn release_token(
        &self,
        lock_key: &str,
        token: &str,
        conn: Option<(Conn, u64)>,
    ) -> Result<(), BackendError> {
        let call = Call::new(&[lock_key]).arg(token);
        let (conn, generation) = match conn {
            Some(held) => held,
            None => self.connection().await?,
        };
        self.invoke_on(conn, generation, &self.inner.release, call)
            .await
            .map(drop)
    }

    /// The complete script: `Ok(true)` stored, `Ok(false)` the lock is not
    /// this token's (nothing written).
    async fn complete_script(
        &self,
        record_key: &str,
        lock_key: &str,
        token: &str,
        blob: &[u8],
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        let call = Call::new(&[record_key, lock_key])
            .arg(token)
            .arg(blob)
            .arg(millis(ttl));
        let reply = self.invoke(&self.inner.complete, call).await?;
        as_flag(&reply, "complete")
    }

    /// Tries the complete script again in the background until the lock
    /// would lapse (see [`late`](super::late)).
    fn complete_late(&self, lock: RedisLock, blob: Vec<u8>, ttl: Duration, completion: Completion) {
        let deadline = lock.lapse.at();
        let lock = Arc::new(lock);
        let blob: Arc<[u8]> = blob.into();
        let (backend, releaser, held) = (self.clone(), self.clone(), Arc::clone(&lock));
        late::complete_late(
            deadline,
            move || {
                let (backend, lock, blob) = (backend.clone(), Arc::clone(&lock), Arc::clone(&blob));
                Box::pin(async move {
                    let stored = backend
                        .complete_script(&lock.record_key, &lock.lock_key, &lock.token, &blob, ttl)
                        .await?;
                    Ok(if stored { completion } else { Completion::Lost })
                })
            },
            move || {
                Box::pin(async move {
                    releaser
                        .release_token(&held.lock_key, &held.token, None)
                        .await
                })
            },
        );
    }
}

/// A lock token whose fate is not known yet: a `begin` whose script may
/// have taken the lock, a `complete` or `release` that may not have freed
/// it. Dropped before [`settled`](Self::settled) — the future was dropped
/// (client gone, timeout layer) or the call failed after the script may have
/// run — it releases the token from a task of its own, so the key is free in
/// milliseconds instead of after the lock's TTL. Releasing by token never
/// touches another holder's lock.
///
/// The release goes on the connection the script was sent on, when known:
/// Redis runs one connection's commands in order, so it cannot overtake a
/// slow script (which would then take a lock nobody holds).
struct Unsettled<'a> {
    lock: Option<(&'a RedisBackend, &'a str, &'a str)>,
    conn: Option<(Conn, u64)>,
}

impl<'a> Unsettled<'a> {
    const fn new(backend: &'a RedisBackend, lock_key: &'a str, token: &'a str) -> Self {
        Self {
            lock: Some((backend, lock_key, token)),
            conn: None,
        }
    }

    /// The script goes on `conn`: so does the release.
    fn on(mut self, conn: Conn, generation: u64) -> Self {
        self.conn = Some((conn, generation));
        self
    }

    /// The reply was read: nothing to clean up.
    fn settled(mut self) {
        self.lock = None;
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        let Some((backend, lock_key, token)) = self.lock.take() else {
            return;
        };
        let (backend, lock_key, token) = (backend.clone(), lock_key.to_owned(), token.to_owned());
        let conn = self.conn.take();
        // Without a runtime the lock expires by its TTL.
        crate::shutdown::spawn(async move {
            let mut released = backend.release_token(&lock_key, &token, conn).await;
            if let Err(error) = &released
                && error.kind() != BackendErrorKind::Timeout
            {
                // That connection is broken: what it carried has run or
                // never will, so a fresh connection cannot overtake it.
                released = backend.release_token(&lock_key, &token, None).await;
            }
            if let Err(error) = released {
                tracing::warn!(%error, "releasing an unsettled Redis lock failed; it expires by its TTL");
            }
        });
    }
}

/// The `maxmemory-policy` of the server: `CONFIG GET`, else `INFO memory`.
/// On a cluster only `INFO memory`, which is sent to every primary (a
/// cluster client sends `CONFIG GET` to one node picked at random).
async fn eviction_policies(conn: &mut Conn, cluster: bool) -> Result<Vec<String>, BackendError> {
    let config: Result<Value, RedisError> = if cluster {
        Ok(Value::Nil)
    } else {
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(conn)
            .await
    };
    let mut policies = Vec::new();
    if let Ok(value) = &config {
        collect_config_policies(value, &mut policies);
    }
    if policies.is_empty() {
        // CONFIG is disabled or renamed (managed services): INFO tells too.
        let info: Value = redis::cmd("INFO")
            .arg("memory")
            .query_async(conn)
            .await
            .map_err(|e| {
                let cause = config
                    .as_ref()
                    .err()
                    .map_or_else(String::new, |c| format!("{c}; "));
                BackendError::new(
                    BackendErrorKind::Misconfigured,
                    format!("cannot read Redis' maxmemory-policy ({cause}INFO: {e})"),
                )
                .with_source(e)
            })?;
        collect_info_policies(&info, &mut policies);
    }
    if policies.is_empty() {
        return Err(BackendError::new(
            BackendErrorKind::Misconfigured,
            "Redis did not report its maxmemory-policy (neither CONFIG GET nor INFO memory)",
        ));
    }
    Ok(policies)
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Some(s.clone()),
        _ => None,
    }
}

/// `CONFIG GET` answers `[name, value]` (RESP2) or `{name: value}` (RESP3);
/// a cluster may answer one of those per node.
fn collect_config_policies(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => {
            if let [name, policy] = items.as_slice()
                && text(name).is_some_and(|n| n.eq_ignore_ascii_case("maxmemory-policy"))
                && let Some(policy) = text(policy)
            {
                out.push(policy);
                return;
            }
            for item in items {
                collect_config_policies(item, out);
            }
        }
        Value::Map(pairs) => {
            for (name, policy) in pairs {
                match (text(name), text(policy)) {
                    (Some(n), Some(p)) if n.eq_ignore_ascii_case("maxmemory-policy") => out.push(p),
                    _ => collect_config_policies(policy, out),
                }
            }
        }
        _ => {}
    }
}

/// The `maxmemory_policy:` lines of `INFO` text (one per node on a cluster).
fn collect_info_policies(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| collect_info_policies(v, out)),
        Value::Map(pairs) => pairs
            .iter()
            .for_each(|(_, v)| collect_info_policies(v, out)),
        other => {
            if let Some(info) = text(other) {
                out.extend(
                    info.lines()
                        .filter_map(|l| l.strip_prefix("maxmemory_policy:"))
                        .map(|p| p.trim().to_owned()),
                );
            }
        }
    }
}

/// How long a key's last fencing token is kept after its lock's TTL (ms):
/// long enough to outlast a server clock that stepped back.
const FENCE_OUTLIVES_LOCK_MS: u64 = 10 * 60 * 1000;

/// The fencing token the begin script answered, as text.
fn parse_fence(value: &Value) -> Result<FencingToken, BackendError> {
    let fence = match value {
        Value::BulkString(text) => std::str::from_utf8(text)
            .ok()
            .and_then(|text| text.parse::<u64>().ok()),
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    fence
        .filter(|fence| *fence > 0)
        .map(FencingToken::new)
        .ok_or_else(|| unexpected("begin (fencing token)"))
}

/// Milliseconds for `PX` / `PEXPIRE`, within [`MAX_TTL`](crate::MAX_TTL)
/// (Redis refuses expiries past its clock's range).
fn millis(d: Duration) -> u64 {
    u64::try_from(crate::config::clamp_ttl(d).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn token() -> Result<String, BackendError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| {
        BackendError::new(
            BackendErrorKind::Other,
            format!("no randomness for a lock token: {e}"),
        )
    })?;
    Ok(crate::key::hex(&bytes))
}

/// Whether the connection that gave this error must be replaced.
fn connection_broken(error: &RedisError) -> bool {
    error.is_unrecoverable_error()
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_timeout()
}

fn map_error(error: RedisError) -> BackendError {
    let kind = if error.is_timeout() {
        BackendErrorKind::Timeout
    } else if error.is_connection_refusal() || connection_broken(&error) {
        BackendErrorKind::Unavailable
    } else {
        match error.code() {
            Some("OOM") => BackendErrorKind::Rejected,
            Some("WRONGTYPE") => BackendErrorKind::Corrupt,
            Some("NOPERM" | "NOAUTH" | "WRONGPASS") => BackendErrorKind::Misconfigured,
            Some("LOADING" | "READONLY" | "MASTERDOWN" | "CLUSTERDOWN" | "TRYAGAIN" | "BUSY") => {
                BackendErrorKind::Unavailable
            }
            _ => BackendErrorKind::Other,
        }
    };
    BackendError::new(kind, format!("Redis: {error}")).with_source(error)
}

fn unexpected(what: &str) -> BackendError {
    BackendError::new(
        BackendErrorKind::Corrupt,
        format!("unexpected reply from the {what} script"),
    )
}

fn as_flag(value: &Value, what: &str) -> Result<bool, BackendError> {
    match value {
        Value::Int(n) => Ok(*n != 0),
        _ => Err(unexpected(what)),
    }
}

impl Backend for RedisBackend {
    type Lock = RedisLock;

    async fn begin(
        &self,
        key: &StorageKey,
        _fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin<RedisLock>, BackendError> {
        let (record_key, lock_key, fence_key) = self.keys(key);
        let token = token()?;
        let call = Call::new(&[&record_key, &lock_key, &fence_key])
            .arg(&token)
            .arg(millis(lock_ttl))
            .arg(FENCE_OUTLIVES_LOCK_MS);
        // From here until the reply is read, the lock may exist in Redis
        // with this token and no `RedisLock` to release it.
        let (conn, generation) = self.connection().await?;
        let unsettled = Unsettled::new(self, &lock_key, &token).on(conn.clone(), generation);
        let sent = Instant::now();
        let reply = self
            .invoke_on(conn, generation, &self.inner.begin, call)
            .await?;
        unsettled.settled();
        let Value::Array(items) = reply else {
            return Err(unexpected("begin"));
        };
        match items.as_slice() {
            [Value::Int(0), fence] => Ok(Begin::Acquired(RedisLock {
                record_key,
                lock_key,
                token,
                lapse: Lapse::after(sent, lock_ttl),
                fence: parse_fence(fence)?,
            })),
            [Value::Int(1), Value::BulkString(blob)] => {
                Ok(Begin::Completed(self.inner.codec.decode(blob)?))
            }
            [Value::Int(2), Value::Int(ms)] => Ok(Begin::Busy {
                retry_after: Duration::from_millis(u64::try_from(*ms).unwrap_or(0)),
            }),
            _ => Err(unexpected("begin")),
        }
    }

    async fn complete(
        &self,
        lock: RedisLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        // Until the reply is read (or if it never is), the lock is released
        // by token when this is dropped: a completed save already removed
        // it, so that is harmless.
        let unsettled = Unsettled::new(self, &lock.lock_key, &lock.token);
        let (blob, completion) = match self.inner.codec.encode(&record) {
            Err(crate::CodecError::TooLarge { max }) => {
                tracing::warn!(
                    max,
                    "record larger than the codec's max_record_size; keeping a not-kept marker"
                );
                let marker = Record::not_kept(record.status, record.fingerprint);
                (self.inner.codec.encode(&marker), Completion::NotKept)
            }
            other => (other, Completion::Saved),
        };
        let refused = match blob {
            Ok(blob) => {
                let saved = self
                    .complete_script(&lock.record_key, &lock.lock_key, &lock.token, &blob, ttl)
                    .await;
                match saved {
                    Ok(stored) => {
                        unsettled.settled();
                        return Ok(if stored { completion } else { Completion::Lost });
                    }
                    Err(error) if late::is_transient(&error) => {
                        // Redis may come back while the lock lives (a restart
                        // with persistence, a failover): the token still
                        // fences the write.
                        unsettled.settled();
                        self.complete_late(lock, blob, ttl, completion);
                        return Err(error);
                    }
                    Err(error) => error,
                }
            }
            Err(error) => BackendError::new(
                BackendErrorKind::Other,
                "the response cannot be encoded within the backend's max_record_size",
            )
            .with_source(error),
        };
        // Refused (e.g. OOM) or not encodable: nothing stored, so free the
        // key for a retry; a DEL is still allowed. If that fails too,
        // `unsettled` tries once more in the background.
        if self
            .release_token(&lock.lock_key, &lock.token, None)
            .await
            .is_ok()
        {
            unsettled.settled();
        }
        Err(refused)
    }

    async fn release(&self, lock: RedisLock) -> Result<(), BackendError> {
        let unsettled = Unsettled::new(self, &lock.lock_key, &lock.token);
        self.release_token(&lock.lock_key, &lock.token, None)
            .await?;
        unsettled.settled();
        Ok(())
    }

    fn fencing_token(&self, lock: &RedisLock) -> Option<FencingToken> {
        Some(lock.fence)
    }

    async fn extend(&self, lock: &RedisLock, lock_ttl: Duration) -> Result<bool, BackendError> {
        let call = Call::new(&[&lock.lock_key])
            .arg(&lock.token)
            .arg(millis(lock_ttl));
        let sent = Instant::now();
        let reply = self.invoke(&self.inner.extend, call).await?;
        let kept = as_flag(&reply, "extend")?;
        if kept {
            lock.lapse.extended(sent, lock_ttl);
        }
        Ok(kept)
    }
}
