//! The in-memory backend: the embedded default, no server needed.
//!
//! Records live in a bounded [`moka`] cache (by entry count or by bytes) and
//! expire at their TTL; in-flight locks live in a sharded map, each lock
//! carrying a unique token. Expiry is judged with [`tokio::time::Instant`], so
//! tests can drive it with `tokio::time::pause` and `advance`.
//!
//! It protects **one process** only: two instances of a service each have
//! their own memory and would both run a retried request. Use the Redis or
//! PostgreSQL backend when more than one instance serves the same clients.
//!
//! ```
//! use tower_idempotency::{IdempotencyLayer, MemoryBackend};
//!
//! let backend = MemoryBackend::builder().max_entries(100_000).build();
//! let layer = IdempotencyLayer::new(backend);
//! # let _ = layer;
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use moka::Expiry;
use tokio::time::Instant;

use super::{Backend, BackendError, Begin, Completion};
use crate::{Fingerprint, Record, StorageKey};

const SHARDS: usize = 64;

/// A bounded in-memory [`Backend`] for a single process.
///
/// Cloning is cheap and clones share the same storage.
#[derive(Clone)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

struct Inner {
    // Std's randomly keyed SipHash, not a shortcut over the SHA-256 bytes:
    // a client knows its own scope and could grind keys whose storage keys
    // collide in a fixed hash, degrading the maps to lists.
    records: moka::sync::Cache<StorageKey, Arc<Stored>>,
    locks: Box<[Mutex<HashMap<StorageKey, LockState>>]>,
    next_token: AtomicU64,
}

struct Stored {
    record: Record,
    expires_at: Instant,
    ttl: Duration,
}

#[derive(Clone, Copy)]
struct LockState {
    token: u64,
    expires_at: Instant,
}

/// Proof of holding a key in a [`MemoryBackend`].
#[derive(Debug)]
pub struct MemoryLock {
    key: StorageKey,
    token: u64,
}

/// How a [`MemoryBackend`] bounds its size.
#[derive(Clone, Copy, Debug)]
enum Capacity {
    Entries(u64),
    Bytes(u64),
}

/// Builds a [`MemoryBackend`].
#[derive(Clone, Debug)]
#[must_use]
pub struct MemoryBackendBuilder {
    capacity: Capacity,
}

impl MemoryBackendBuilder {
    /// Keep at most `n` records (default 100 000); the least recently used
    /// are evicted first. Replaces a [`max_bytes`](Self::max_bytes) bound.
    pub const fn max_entries(mut self, n: u64) -> Self {
        self.capacity = Capacity::Entries(n);
        self
    }

    /// Keep at most about `bytes` of records, weighed by body and header
    /// size. Replaces a [`max_entries`](Self::max_entries) bound.
    pub const fn max_bytes(mut self, bytes: u64) -> Self {
        self.capacity = Capacity::Bytes(bytes);
        self
    }

    /// Builds the backend.
    #[must_use]
    pub fn build(self) -> MemoryBackend {
        // LRU, not moka's default TinyLFU: TinyLFU may refuse to admit a new
        // entry when full, and the record just stored is the one a retry is
        // about to ask for.
        let builder = moka::sync::Cache::builder()
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(StoredExpiry);
        let records = match self.capacity {
            Capacity::Entries(n) => builder.max_capacity(n),
            Capacity::Bytes(n) => builder
                .weigher(|_, v: &Arc<Stored>| u32::try_from(v.record.size()).unwrap_or(u32::MAX))
                .max_capacity(n),
        }
        .build();
        MemoryBackend {
            inner: Arc::new(Inner {
                records,
                locks: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                next_token: AtomicU64::new(1),
            }),
        }
    }
}

/// Lets moka reclaim memory of records at their TTL (in real time; the
/// layer's own expiry check uses Tokio's clock).
struct StoredExpiry;

impl Expiry<StorageKey, Arc<Stored>> for StoredExpiry {
    fn expire_after_create(
        &self,
        _key: &StorageKey,
        value: &Arc<Stored>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("records", &self.inner.records.entry_count())
            .finish_non_exhaustive()
    }
}

impl MemoryBackend {
    /// A backend holding at most 100 000 records.
    #[must_use]
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts a builder.
    pub const fn builder() -> MemoryBackendBuilder {
        MemoryBackendBuilder {
            capacity: Capacity::Entries(100_000),
        }
    }

    /// How many records are stored (expired ones may count until the cache
    /// reclaims them).
    #[must_use]
    pub fn stored_count(&self) -> u64 {
        self.inner.records.run_pending_tasks();
        self.inner.records.entry_count()
    }

    /// How many keys are locked by requests in flight right now (lapsed
    /// locks not yet replaced are not counted).
    #[must_use]
    pub fn in_flight_count(&self) -> usize {
        let now = Instant::now();
        self.inner
            .locks
            .iter()
            .map(|shard| lock(shard).values().filter(|l| l.expires_at > now).count())
            .sum()
    }

    fn shard(&self, key: &StorageKey) -> MutexGuard<'_, HashMap<StorageKey, LockState>> {
        let index = usize::from(key.as_bytes()[31]) % SHARDS;
        lock(&self.inner.locks[index])
    }

    fn lookup(&self, key: &StorageKey, now: Instant) -> Option<Record> {
        let stored = self.inner.records.get(key)?;
        // An expired record is absent; it is left for the cache to reclaim,
        // because removing it here could race with a fresh record's insert.
        (stored.expires_at > now).then(|| stored.record.clone())
    }

    fn release_now(&self, lock_: &MemoryLock) {
        let mut shard = self.shard(&lock_.key);
        if shard
            .get(&lock_.key)
            .is_some_and(|l| l.token == lock_.token)
        {
            shard.remove(&lock_.key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while a shard is held; recover rather than propagate.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Backend for MemoryBackend {
    type Lock = MemoryLock;

    async fn begin(
        &self,
        key: &StorageKey,
        _fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin<MemoryLock>, BackendError> {
        let now = Instant::now();
        if let Some(record) = self.lookup(key, now) {
            return Ok(Begin::Completed(record));
        }
        let mut shard = self.shard(key);
        if let Some(held) = shard.get(key).filter(|l| l.expires_at > now) {
            return Ok(Begin::Busy {
                retry_after: held.expires_at - now,
            });
        }
        // A holder may have completed between the lookup and taking the
        // shard; `complete` stores under the shard, so this look is final.
        if let Some(record) = self.lookup(key, now) {
            return Ok(Begin::Completed(record));
        }
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        shard.insert(
            *key,
            LockState {
                token,
                expires_at: now + lock_ttl,
            },
        );
        Ok(Begin::Acquired(MemoryLock { key: *key, token }))
    }

    async fn complete(
        &self,
        lock_: MemoryLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        let now = Instant::now();
        let mut shard = self.shard(&lock_.key);
        let Some(held) = shard.get(&lock_.key).copied() else {
            return Ok(Completion::Lost);
        };
        if held.token != lock_.token {
            return Ok(Completion::Lost);
        }
        shard.remove(&lock_.key);
        if held.expires_at <= now {
            return Ok(Completion::Lost);
        }
        let stored = Stored {
            record,
            expires_at: now + ttl,
            ttl,
        };
        self.inner.records.insert(lock_.key, Arc::new(stored));
        Ok(Completion::Saved)
    }

    async fn release(&self, lock_: MemoryLock) -> Result<(), BackendError> {
        self.release_now(&lock_);
        Ok(())
    }

    async fn extend(&self, lock_: &MemoryLock, lock_ttl: Duration) -> Result<bool, BackendError> {
        let now = Instant::now();
        let mut shard = self.shard(&lock_.key);
        match shard.get_mut(&lock_.key) {
            Some(held) if held.token == lock_.token && held.expires_at > now => {
                held.expires_at = now + lock_ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn abandon(&self, lock_: MemoryLock) {
        self.release_now(&lock_);
    }
}
