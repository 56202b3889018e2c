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

mod connection;
mod lock;
mod policy;
mod scripts;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::Value;

use tokio::time::Instant;

use super::late::{self, Lapse};
use super::{Backend, BackendError, BackendErrorKind, Begin, Completion};
use crate::{FencingToken, Fingerprint, Record, RecordCodec, StorageKey};
use connection::{Held, Pool, connection_broken, map_error};
pub use lock::RedisLock;
use lock::{Unsettled, token};
use scripts::{
    BEGIN, COMPLETE, Call, EXTEND, FENCE_OUTLIVES_LOCK_MS, Lua, RELEASE, as_flag, millis,
    parse_fence, unexpected,
};

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

    /// The Redis keys of a storage key: (record, lock, fence).
    fn keys(&self, key: &StorageKey) -> (String, String, String) {
        // Built by hand: three `format!`s cost more than the script call's
        // own encoding.
        let hex = key.to_hex();
        let prefix = &self.inner.prefix;
        let named = |suffix: &str| {
            let mut name = String::with_capacity(prefix.len() + hex.len() + 2 + suffix.len());
            name.push_str(prefix);
            name.push('{');
            name.push_str(&hex);
            name.push('}');
            name.push_str(suffix);
            name
        };
        (named(":rec"), named(":lock"), named(":fence"))
    }
}

impl RedisBackend {
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
