//! The in-memory backend: the embedded default, no server needed.
//!
//! Records and in-flight locks live in one table split into shards, each a
//! mutex over its records (kept in the order they were stored) and its locks
//! (each carrying a unique token). `begin` and `complete` take one shard's
//! mutex once: the lookup and the lock it takes are a single step, so no
//! holder can complete in between. Expired records are never replayed; their
//! memory is reclaimed as newer records arrive. Expiry is judged with
//! [`tokio::time::Instant`], so tests can drive it with `tokio::time::pause`
//! and `advance`.
//!
//! # Bounded, and never forgetting a young record
//!
//! The table is bounded by records (default 500 000) **and** by their bytes
//! (default 512 MiB, weighed by body and headers). At the bound, room is made
//! from the oldest end: expired records first, then records older than the
//! [minimum retention](MemoryBackendBuilder::min_retention) (default one
//! hour, longer than any client's retry loop). A record younger than that,
//! and a held lock, are never evicted: a request with a **new** key that
//! finds no room is answered `503` (the backend reports
//! [`BackendErrorKind::Rejected`], "store full") and its handler does not
//! run — the memory analogue of Redis' `noeviction`. Replays and requests in
//! flight are not affected. (With
//! [`fail_open`](crate::IdempotencyLayer::fail_open) such a request runs
//! unprotected instead, as on any backend failure.) A record larger than a
//! shard's share of the byte bound is replaced by a "not kept" marker, so a
//! retry of it does not run the handler again. The promise: a record is kept at least the
//! minimum retention, and up to its TTL while memory allows. (A lock counts
//! as a record against the record bound; the byte bound may be passed by the
//! responses of requests already in flight.)
//!
//! One caller sending many new keys can fill the table and make everybody's
//! *new* keys wait — it can no longer wipe anybody's stored responses. Bound
//! each caller in front of this layer with a rate limit, for example
//! [`tower_governor`](https://docs.rs/tower_governor) keyed by the same
//! identity as the idempotency scope:
//!
//! ```ignore
//! use tower_governor::{GovernorLayer, governor::GovernorConfigBuilder};
//!
//! // 20 keyed requests a second per client IP, bursts of 50.
//! let governor = GovernorConfigBuilder::default().per_second(20).burst_size(50).finish().unwrap();
//! let app = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(IdempotencyLayer::new(MemoryBackend::new()))
//!     .layer(GovernorLayer::new(governor)); // outside: limits before the table
//! ```
//!
//! It protects **one process** only: two instances of a service each have
//! their own memory and would both run a retried request. Use the Redis or
//! PostgreSQL backend when more than one instance serves the same clients.
//!
//! ```
//! use std::time::Duration;
//! use tower_idempotency::{IdempotencyLayer, MemoryBackend};
//!
//! let backend = MemoryBackend::builder()
//!     .max_entries(100_000)
//!     .max_bytes(256 << 20)
//!     .min_retention(Duration::from_hours(1))
//!     .build();
//! let layer = IdempotencyLayer::new(backend);
//! # let _ = layer;
//! ```

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Backend, BackendError, BackendErrorKind, Begin, Completion};
use crate::config::clamp_ttl;
use crate::{FencingToken, Fingerprint, Record, StorageKey};

/// The most shards a backend is split into.
const MAX_SHARDS: u64 = 64;
/// Below this many records per shard, fewer shards are used, so that a small
/// bound is kept exactly.
const MIN_ENTRIES_PER_SHARD: u64 = 1024;
/// The same for the byte bound: a shard holds at least this much.
const MIN_BYTES_PER_SHARD: u64 = 4 << 20;
const DEFAULT_MAX_ENTRIES: u64 = 500_000;
const DEFAULT_MAX_BYTES: u64 = 512 << 20;
const DEFAULT_MIN_RETENTION: Duration = Duration::from_hours(1);
/// A full shard looks through all its records for expired ones (out of
/// store order) at most this often, so a flood cannot make every request
/// pay for a scan.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A bounded in-memory [`Backend`] for a single process.
///
/// Cloning is cheap and clones share the same storage.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
///
/// // At most 64 MiB of stored responses, kept for an hour.
/// let backend = MemoryBackend::builder().max_bytes(64 << 20).build();
/// let layer = IdempotencyLayer::new(backend.clone()).ttl(Duration::from_hours(1));
/// assert_eq!(backend.stored_count(), 0);
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

struct Inner {
    // Randomly keyed per backend, both for choosing a shard and inside each
    // map: a client knows its own scope and could otherwise grind keys that
    // all land in one shard or one bucket.
    hasher: KeyHash,
    shards: Box<[Mutex<Shard>]>,
    /// Mask over a key's hash that picks its shard (shard count − 1).
    shard_mask: u64,
    /// What one shard may hold.
    limits: Limits,
    next_token: AtomicU64,
}

/// Hashes a [`StorageKey`] for the shard and the maps: a SHA-256 output
/// already, so mixing its four words with four secret ones is enough, at a
/// fraction of what `SipHash` costs (three hashes per `begin` and per
/// `complete`).
///
/// The keys are random per backend and the hashes never leave the process,
/// so a client that grinds its keys' SHA-256 values still cannot choose
/// where they land: each word is combined with a secret by a folded 128-bit
/// multiplication (the mixing step of foldhash, hashbrown's default hasher),
/// which makes every output bit depend on every input bit and on the
/// secrets.
#[derive(Clone, Copy)]
struct KeyHash {
    secrets: [u64; 4],
}

impl KeyHash {
    fn new() -> Self {
        // Four words from std's per-process randomness, as `RandomState`
        // draws them.
        let random = RandomState::new();
        let secrets = [0u8, 1, 2, 3].map(|i| random.hash_one(i) | 1);
        Self { secrets }
    }
}

impl BuildHasher for KeyHash {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher {
            secrets: self.secrets,
            hash: 0,
        }
    }
}

/// See [`KeyHash`].
struct KeyHasher {
    secrets: [u64; 4],
    hash: u64,
}

/// The high and low halves of the 128-bit product, folded together.
fn fold(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    // Truncation is the point: the two halves.
    #[allow(clippy::cast_possible_truncation)]
    let folded = (product as u64) ^ ((product >> 64) as u64);
    folded
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        // A storage key is 32 bytes; anything else (the array's length
        // prefix, should `Hash` write one) is mixed in word by word.
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            let secret = self.secrets[i % 4];
            self.hash = fold(
                u64::from_le_bytes(word) ^ secret,
                self.hash ^ self.secrets[(i + 1) % 4],
            )
            .rotate_left(23);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.write(&n.to_le_bytes());
    }

    fn finish(&self) -> u64 {
        fold(self.hash, self.secrets[2])
    }
}

/// The shard of a key's hash. The maps inside a shard start their probes at
/// the hash's low bits and tag entries with its top seven: the shard comes
/// from bits in between, or every key of a shard would start its probe in
/// the same sixty-fourth of the table. The mask keeps the index below the
/// shard count, which is ≤ 64.
fn shard_index(hash: u64, shard_mask: u64) -> usize {
    #[allow(clippy::cast_possible_truncation)]
    let index = ((hash >> 32) & shard_mask) as usize;
    index
}

/// One shard's share of the bounds, and the retention promise.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Records plus held locks.
    entries: u64,
    /// Bytes of records.
    bytes: u64,
    min_retention: Duration,
}

struct Shard {
    records: HashMap<StorageKey, Stored, KeyHash>,
    /// Keys in the order they were stored, each with the sequence number of
    /// that store: an entry whose number no longer matches the record's is
    /// stale (the record was removed or stored again) and is skipped.
    order: VecDeque<(StorageKey, u64)>,
    locks: HashMap<StorageKey, LockState, KeyHash>,
    /// Bytes of the records held.
    bytes: u64,
    next_seq: u64,
    /// When the shard last looked through all its records for expired ones.
    last_sweep: Option<Instant>,
}

struct Stored {
    record: Arc<Record>,
    kept_since: Instant,
    expires_at: Instant,
    seq: u64,
    size: u64,
}

impl Stored {
    /// Whether making room may remove it: expired, or kept for at least the
    /// minimum retention.
    fn evictable(&self, now: Instant, min_retention: Duration) -> bool {
        self.expires_at <= now || self.kept_since + min_retention <= now
    }
}

#[derive(Clone, Copy)]
struct LockState {
    token: u64,
    expires_at: Instant,
}

/// Proof of holding a key in a [`MemoryBackend`].
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{Backend, Begin, Fingerprint, MemoryBackend, StorageKey};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_idempotency::BackendError> {
/// let backend = MemoryBackend::new();
/// let key = StorageKey::from_bytes([7; 32]);
/// let fp = Fingerprint::from_bytes([1; 32]);
/// let Begin::Acquired(lock) = backend.begin(&key, &fp, Duration::from_secs(30)).await? else {
///     unreachable!("a new backend holds nothing");
/// };
/// // Holding the lock: a second `begin` is told the key is busy.
/// assert!(matches!(backend.begin(&key, &fp, Duration::from_secs(30)).await?, Begin::Busy { .. }));
/// backend.release(lock).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryLock {
    key: StorageKey,
    token: u64,
}

/// Builds a [`MemoryBackend`].
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::MemoryBackend;
///
/// let backend = MemoryBackend::builder()
///     .max_entries(10_000)
///     .max_bytes(64 << 20)
///     .min_retention(Duration::from_mins(30))
///     .build();
/// # let _ = backend;
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct MemoryBackendBuilder {
    max_entries: u64,
    max_bytes: u64,
    min_retention: Duration,
}

impl MemoryBackendBuilder {
    /// Keep at most `n` records (default 500 000); held locks count too.
    ///
    /// Large bounds are spread over up to 64 shards of equal share, so the
    /// table may be full a little before the total reaches `n`; it never
    /// exceeds it.
    pub const fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }

    /// Keep at most about `bytes` of records (default 512 MiB), weighed by
    /// body and header size. Both bounds hold at once.
    ///
    /// Large bounds are spread over up to 64 shards of at least 4 MiB each;
    /// a record heavier than one shard's share is refused (the layer still
    /// answers, and a retry runs the handler again), so keep `bytes` well
    /// above the layer's
    /// [`max_stored_response`](crate::IdempotencyLayer::max_stored_response).
    pub const fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// How long a record is kept at the least (default one hour, capped by
    /// its own TTL): at the bound, younger records are never evicted to make
    /// room, and new keys are refused instead (see the
    /// [module documentation](self)). `Duration::ZERO` evicts the oldest
    /// records whatever their age.
    pub const fn min_retention(mut self, min_retention: Duration) -> Self {
        self.min_retention = min_retention;
        self
    }

    /// Builds the backend.
    #[must_use]
    pub fn build(self) -> MemoryBackend {
        // The largest power of two of shards, at most 64, each holding at
        // least the floor of both bounds.
        let fit = (self.max_entries / MIN_ENTRIES_PER_SHARD)
            .min(self.max_bytes / MIN_BYTES_PER_SHARD)
            .clamp(1, MAX_SHARDS);
        let shards = 1u64 << fit.ilog2();
        let hasher = KeyHash::new();
        MemoryBackend {
            inner: Arc::new(Inner {
                hasher,
                shards: (0..shards)
                    .map(|_| Mutex::new(Shard::new(hasher)))
                    .collect(),
                shard_mask: shards - 1,
                limits: Limits {
                    entries: self.max_entries / shards,
                    bytes: self.max_bytes / shards,
                    min_retention: self.min_retention,
                },
                next_token: AtomicU64::new(1),
            }),
        }
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
            .field("shards", &self.inner.shards.len())
            .field("records", &self.stored_count())
            .finish_non_exhaustive()
    }
}

impl MemoryBackend {
    /// A backend with the default bounds: 500 000 records, 512 MiB, each
    /// record kept at least an hour.
    #[must_use]
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts a builder.
    pub const fn builder() -> MemoryBackendBuilder {
        MemoryBackendBuilder {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            min_retention: DEFAULT_MIN_RETENTION,
        }
    }

    /// How many records are held in memory, including expired ones not yet
    /// reclaimed (never replayed). With the locks held, it never exceeds the
    /// [`max_entries`](MemoryBackendBuilder::max_entries) bound.
    #[must_use]
    pub fn stored_count(&self) -> u64 {
        self.inner
            .shards
            .iter()
            .map(|shard| lock(shard).records.len() as u64)
            .sum()
    }

    /// How many keys are locked by requests in flight right now (lapsed
    /// locks not yet replaced are not counted).
    #[must_use]
    pub fn in_flight_count(&self) -> usize {
        let now = Instant::now();
        self.inner
            .shards
            .iter()
            .map(|shard| {
                lock(shard)
                    .locks
                    .values()
                    .filter(|l| l.expires_at > now)
                    .count()
            })
            .sum()
    }

    /// Drops the record stored under `key`, if any (an operator removing a
    /// record that must not be replayed); a held lock is left alone. Returns
    /// whether a record was dropped.
    ///
    /// ```
    /// use tower_idempotency::{MemoryBackend, StorageKey};
    ///
    /// let backend = MemoryBackend::new();
    /// assert!(!backend.forget(&StorageKey::from_bytes([1; 32])));
    /// ```
    pub fn forget(&self, key: &StorageKey) -> bool {
        let mut shard = self.shard(key);
        let had = shard.records.contains_key(key);
        shard.remove(key);
        had
    }

    fn shard(&self, key: &StorageKey) -> MutexGuard<'_, Shard> {
        let index = shard_index(self.inner.hasher.hash_one(key), self.inner.shard_mask);
        lock(&self.inner.shards[index])
    }

    fn release_now(&self, lock_: &MemoryLock) {
        let mut shard = self.shard(&lock_.key);
        if let Entry::Occupied(held) = shard.locks.entry(lock_.key)
            && held.get().token == lock_.token
        {
            held.remove();
        }
    }
}

fn store_full(limits: &Limits) -> BackendError {
    BackendError::new(
        BackendErrorKind::Rejected,
        format!(
            "the memory backend is full (store full): every record in this shard is younger \
             than the minimum retention of {:?}; new keys wait until records age or expire",
            limits.min_retention
        ),
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while a shard is held; recover rather than propagate.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shard {
    fn new(hasher: KeyHash) -> Self {
        Self {
            records: HashMap::with_hasher(hasher),
            order: VecDeque::new(),
            locks: HashMap::with_hasher(hasher),
            bytes: 0,
            next_seq: 0,
            last_sweep: None,
        }
    }

    /// The live record under `key`; an expired one is removed.
    fn lookup(&mut self, key: &StorageKey, now: Instant) -> Option<Arc<Record>> {
        let stored = self.records.get(key)?;
        if stored.expires_at > now {
            return Some(Arc::clone(&stored.record));
        }
        self.remove(key);
        None
    }

    fn remove(&mut self, key: &StorageKey) {
        if let Some(gone) = self.records.remove(key) {
            self.bytes -= gone.size;
        }
    }

    /// Whether one more lock (a new key) would pass a bound.
    fn full(&self, limits: &Limits) -> bool {
        (self.records.len() + self.locks.len()) as u64 >= limits.entries
            || self.bytes >= limits.bytes
    }

    /// Removes records from the oldest end while the shard is `over` its
    /// bounds: stale order entries, then records that are expired or older
    /// than the minimum retention. Stops at the first young record.
    fn evict_oldest(&mut self, limits: &Limits, now: Instant, over: fn(&Self, &Limits) -> bool) {
        while let Some(&(oldest, seq)) = self.order.front() {
            let is_over = over(self, limits);
            // One probe per queue entry: the oldest records are cold in the
            // CPU caches, so a second lookup would cost another miss.
            if let Entry::Occupied(entry) = self.records.entry(oldest)
                && entry.get().seq == seq
            {
                let stored = entry.get();
                let expired = stored.expires_at <= now;
                if !expired && (!is_over || !stored.evictable(now, limits.min_retention)) {
                    break;
                }
                self.bytes -= entry.remove().size;
            }
            // Evicted, expired, or stale (the record it stood for is gone).
            self.order.pop_front();
        }
        // Records removed out of order (expired at lookup, stored again)
        // leave stale entries behind a live oldest one: compact when they
        // outnumber the records, so the queue stays proportional to them.
        if self.order.len() > 2 * self.records.len() + 64 {
            let records = &self.records;
            self.order
                .retain(|(k, seq)| records.get(k).is_some_and(|s| s.seq == *seq));
        }
    }

    /// Makes room for one more lock if it can without evicting a young
    /// record or a live lock; says whether there is room now.
    fn make_room(&mut self, limits: &Limits, now: Instant) -> bool {
        self.evict_oldest(limits, now, Self::full);
        if !self.full(limits) {
            return true;
        }
        // The oldest record is young: expired records (shorter TTLs, out of
        // store order) and lapsed locks may still be found further in, at
        // most once per `SWEEP_EVERY`.
        if self.last_sweep.is_none_or(|at| at + SWEEP_EVERY <= now) {
            self.last_sweep = Some(now);
            let mut freed = 0;
            self.records.retain(|_, stored| {
                let keep = stored.expires_at > now;
                if !keep {
                    freed += stored.size;
                }
                keep
            });
            self.bytes -= freed;
            self.locks.retain(|_, lock| lock.expires_at > now);
        }
        !self.full(limits)
    }

    /// Stores `stored`, then evicts what may go while over a bound (a young
    /// record never goes; the entry bound was checked when the key was
    /// locked).
    fn store(&mut self, key: StorageKey, mut stored: Stored, limits: &Limits, now: Instant) {
        self.remove(&key);
        self.next_seq += 1;
        stored.seq = self.next_seq;
        self.bytes += stored.size;
        self.order.push_back((key, stored.seq));
        self.records.insert(key, stored);
        self.evict_oldest(limits, now, |shard, limits| {
            (shard.records.len() + shard.locks.len()) as u64 > limits.entries
                || shard.bytes > limits.bytes
        });
    }
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
        let mut shard = self.shard(key);
        if let Some(record) = shard.lookup(key, now) {
            drop(shard);
            return Ok(Begin::Completed(Arc::unwrap_or_clone(record)));
        }
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let fresh = LockState {
            token,
            expires_at: now + clamp_ttl(lock_ttl),
        };
        match shard.locks.get_mut(key) {
            Some(held) if held.expires_at > now => {
                return Ok(Begin::Busy {
                    retry_after: held.expires_at - now,
                });
            }
            // A lapsed lock is taken over: its holder's `complete` finds
            // another token and stores nothing.
            Some(lapsed) => *lapsed = fresh,
            None => {
                let limits = self.inner.limits;
                if shard.full(&limits) && !shard.make_room(&limits, now) {
                    return Err(store_full(&limits));
                }
                shard.locks.insert(*key, fresh);
            }
        }
        Ok(Begin::Acquired(MemoryLock { key: *key, token }))
    }

    async fn complete(
        &self,
        lock_: MemoryLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        let limits = self.inner.limits;
        let (record, completion) = if record.size() as u64 > limits.bytes {
            tracing::warn!(
                size = record.size(),
                share = limits.bytes,
                "record larger than a memory backend shard's share of max_bytes; keeping a not-kept marker"
            );
            let marker = Record::not_kept(record.status, record.fingerprint);
            (marker, Completion::NotKept)
        } else {
            (record, Completion::Saved)
        };
        let size = record.size() as u64;
        let now = Instant::now();
        let mut shard = self.shard(&lock_.key);
        let held = match shard.locks.entry(lock_.key) {
            Entry::Occupied(held) if held.get().token == lock_.token => held.remove(),
            _ => return Ok(Completion::Lost),
        };
        if held.expires_at <= now {
            return Ok(Completion::Lost);
        }
        let stored = Stored {
            record: Arc::new(record),
            kept_since: now,
            expires_at: now + clamp_ttl(ttl),
            seq: 0,
            size,
        };
        shard.store(lock_.key, stored, &limits, now);
        Ok(completion)
    }

    async fn release(&self, lock_: MemoryLock) -> Result<(), BackendError> {
        self.release_now(&lock_);
        Ok(())
    }

    async fn extend(&self, lock_: &MemoryLock, lock_ttl: Duration) -> Result<bool, BackendError> {
        let now = Instant::now();
        let mut shard = self.shard(&lock_.key);
        match shard.locks.get_mut(&lock_.key) {
            Some(held) if held.token == lock_.token && held.expires_at > now => {
                held.expires_at = now + clamp_ttl(lock_ttl);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The lock's sequence number: the backend counts every lock it grants,
    /// across all keys, so a later lock on a key always has a larger one.
    fn fencing_token(&self, lock: &MemoryLock) -> Option<FencingToken> {
        Some(FencingToken::new(lock.token))
    }

    fn abandon(&self, lock_: MemoryLock) {
        self.release_now(&lock_);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> StorageKey {
        StorageKey::from_bytes({
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&n.to_le_bytes());
            b
        })
    }

    /// Keys that share all but a few bits (as a client grinding SHA-256
    /// outputs could make them) still spread over the shards and buckets,
    /// and two backends place the same key independently.
    #[test]
    fn key_hash_spreads_keys_that_differ_in_few_bits() {
        // Per starting bucket (the low bits), per shard (bits from 32) and
        // per hashbrown control byte (the top ones): 100 keys expected in
        // each of 64.
        let counts = |hasher: KeyHash, vary: usize, shift: u32| {
            let mut counts = [0u32; 64];
            for n in 0..6400u32 {
                let mut bytes = [0xa5u8; 32];
                bytes[vary..vary + 2].copy_from_slice(&n.to_le_bytes()[..2]);
                let hash = hasher.hash_one(StorageKey::from_bytes(bytes));
                counts[usize::try_from((hash >> shift) & 63).unwrap()] += 1;
            }
            counts
        };
        for vary in [0, 7, 8, 30] {
            for shift in [0, 32, 58] {
                let counts = counts(KeyHash::new(), vary, shift);
                let (low, high) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                assert!(
                    *low >= 50 && *high <= 150,
                    "keys varying at byte {vary}, bits from {shift}: {low}..{high} of 100 expected"
                );
            }
        }
        // Within one shard, the keys' probes still start all over the
        // table: the shard is not read from the bits the table uses.
        let hasher = KeyHash::new();
        let mut starts = std::collections::HashSet::new();
        for n in 0..6400u32 {
            let hash = hasher.hash_one(key(n));
            if shard_index(hash, 63) == 0 {
                starts.insert(hash & 63);
            }
        }
        assert!(
            starts.len() >= 35,
            "the keys of one shard start their probes at {} of 64 places",
            starts.len()
        );
        let (a, b) = (KeyHash::new(), KeyHash::new());
        let same = (0..1000u32)
            .filter(|n| {
                shard_index(a.hash_one(key(*n)), 63) == shard_index(b.hash_one(key(*n)), 63)
            })
            .count();
        assert!(
            same < 60,
            "{same} of 1000 keys in the same shard in two backends"
        );
    }

    /// Records removed out of order leave stale entries in the order queue;
    /// it is compacted, so it stays proportional to the records held.
    #[tokio::test(start_paused = true)]
    async fn order_queue_stays_proportional_to_records() {
        let backend = MemoryBackend::builder().max_entries(1000).build();
        let fp = Fingerprint::from_bytes([0; 32]);
        let record = Record::new(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            bytes::Bytes::new(),
            fp,
        );
        // One long-lived record at the oldest end keeps the front live.
        let pinned = key(0);
        let Begin::Acquired(l) = backend
            .begin(&pinned, &fp, Duration::from_secs(1))
            .await
            .unwrap()
        else {
            panic!()
        };
        backend
            .complete(l, record.clone(), Duration::from_hours(1))
            .await
            .unwrap();
        for round in 0..10_000u32 {
            let k = key(1 + round % 3);
            match backend
                .begin(&k, &fp, Duration::from_secs(1))
                .await
                .unwrap()
            {
                Begin::Acquired(l) => {
                    backend
                        .complete(l, record.clone(), Duration::from_millis(1))
                        .await
                        .unwrap();
                }
                _ => panic!("short-lived record replayed after expiry"),
            }
            tokio::time::advance(Duration::from_millis(2)).await;
        }
        let shard = backend.shard(&pinned);
        assert!(
            shard.order.len() <= 2 * shard.records.len() + 65,
            "queue grew to {}",
            shard.order.len()
        );
        // Compacting kept the live records' entries: they can still be evicted.
        for (k, stored) in &shard.records {
            assert!(
                shard.order.contains(&(*k, stored.seq)),
                "a live record fell out of the order queue"
            );
        }
    }

    fn fp() -> Fingerprint {
        Fingerprint::from_bytes([0; 32])
    }

    fn record() -> Record {
        Record::new(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            bytes::Bytes::from_static(b"x"),
            fp(),
        )
    }

    async fn locked(b: &MemoryBackend, k: &StorageKey, ttl: Duration) -> MemoryLock {
        match b.begin(k, &fp(), ttl).await.unwrap() {
            Begin::Acquired(lock) => lock,
            Begin::Completed(_) => panic!("expected to acquire, found a record"),
            Begin::Busy { .. } => panic!("expected to acquire, found it busy"),
        }
    }

    async fn stored(b: &MemoryBackend, k: &StorageKey, ttl: Duration) {
        let lock = locked(b, k, Duration::from_secs(30)).await;
        assert_eq!(
            b.complete(lock, record(), ttl).await.unwrap(),
            Completion::Saved
        );
    }

    /// Whether `k` replays a record (a lock taken instead is released).
    async fn replayed(b: &MemoryBackend, k: &StorageKey) -> bool {
        match b.begin(k, &fp(), Duration::from_secs(30)).await.unwrap() {
            Begin::Completed(_) => true,
            Begin::Acquired(lock) => {
                b.release(lock).await.unwrap();
                false
            }
            Begin::Busy { .. } => panic!("busy"),
        }
    }

    fn refused<T>(result: Result<T, BackendError>) -> bool {
        matches!(result, Err(e) if e.kind() == BackendErrorKind::Rejected)
    }

    fn bytes_of(b: &MemoryBackend, k: &StorageKey) -> u64 {
        b.shard(k).bytes
    }

    #[test]
    fn build_spreads_the_bounds_over_shards() {
        let limits = |b: MemoryBackend| {
            (
                b.inner.shards.len(),
                b.inner.limits.entries,
                b.inner.limits.bytes,
            )
        };
        assert_eq!(
            limits(MemoryBackend::new()),
            (64, 500_000 / 64, (512 << 20) / 64)
        );
        assert_eq!(
            limits(
                MemoryBackend::builder()
                    .max_entries(4096)
                    .max_bytes(1 << 30)
                    .build()
            ),
            (4, 1024, 1 << 28)
        );
        assert_eq!(
            limits(MemoryBackend::builder().max_entries(10).build()),
            (1, 10, 512 << 20)
        );
    }

    #[tokio::test]
    async fn debug_shows_shards_and_records() {
        let b = MemoryBackend::builder().max_entries(10).build();
        stored(&b, &key(1), Duration::from_mins(1)).await;
        assert_eq!(
            format!("{b:?}"),
            "MemoryBackend { shards: 1, records: 1, .. }"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn locks_and_records_end_exactly_at_their_ttl() {
        let b = MemoryBackend::new();
        let ttl = Duration::from_secs(1);
        let first = locked(&b, &key(1), ttl).await;
        assert_eq!(b.in_flight_count(), 1);
        tokio::time::advance(ttl).await;
        assert_eq!(b.in_flight_count(), 0, "lapsed at its TTL");
        assert!(!b.extend(&first, ttl).await.unwrap(), "a lapsed lock");
        let second = locked(&b, &key(1), ttl).await;
        assert_eq!(
            b.complete(first, record(), ttl).await.unwrap(),
            Completion::Lost
        );
        assert_eq!(
            b.complete(second, record(), ttl).await.unwrap(),
            Completion::Saved
        );
        assert!(replayed(&b, &key(1)).await);
        tokio::time::advance(ttl).await;
        assert!(!replayed(&b, &key(1)).await, "expired at its TTL");
    }

    #[tokio::test]
    async fn forget_drops_a_record_and_its_bytes_but_not_a_lock() {
        let b = MemoryBackend::builder().max_entries(10).build();
        let k = key(1);
        assert!(!b.forget(&k));
        stored(&b, &k, Duration::from_mins(1)).await;
        assert_eq!(bytes_of(&b, &k), record().size() as u64);
        assert!(b.forget(&k));
        assert_eq!(bytes_of(&b, &k), 0);
        assert!(!b.forget(&k), "already gone");
        let held = locked(&b, &k, Duration::from_mins(1)).await;
        assert!(!b.forget(&k));
        assert!(matches!(
            b.begin(&k, &fp(), Duration::from_mins(1)).await.unwrap(),
            Begin::Busy { .. }
        ));
        b.abandon(held);
        locked(&b, &k, Duration::from_mins(1)).await;
    }

    /// A full shard whose oldest record is young looks through all its
    /// records for expired ones, at most once a second.
    #[tokio::test(start_paused = true)]
    async fn a_full_shard_sweeps_out_of_order_expiries_once_a_second() {
        let b = MemoryBackend::builder().max_entries(3).build();
        stored(&b, &key(1), Duration::from_hours(2)).await;
        stored(&b, &key(2), Duration::from_millis(500)).await;
        stored(&b, &key(3), Duration::from_secs(1)).await;
        let (k4, f) = (key(4), fp());
        let new = || b.begin(&k4, &f, Duration::from_mins(1));
        assert!(refused(new().await), "full, and the sweep found nothing");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(refused(new().await), "swept less than a second ago");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(matches!(new().await.unwrap(), Begin::Acquired(_)));
        // Key 2 expired half a second ago, key 3 just now: both swept.
        assert_eq!(b.stored_count(), 1);
        assert_eq!(bytes_of(&b, &key(1)), record().size() as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_frees_lapsed_locks_and_keeps_live_ones() {
        let b = MemoryBackend::builder().max_entries(3).build();
        stored(&b, &key(1), Duration::from_hours(2)).await;
        let _live = locked(&b, &key(2), Duration::from_secs(10)).await;
        let _lapsing = locked(&b, &key(3), Duration::from_secs(1)).await;
        let (k4, f) = (key(4), fp());
        let new = || b.begin(&k4, &f, Duration::from_secs(10));
        assert!(refused(new().await), "full: a record and two live locks");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(new().await.unwrap(), Begin::Acquired(_)));
        assert!(matches!(
            b.begin(&key(2), &fp(), Duration::from_secs(10))
                .await
                .unwrap(),
            Begin::Busy { .. }
        ));
        assert_eq!(b.in_flight_count(), 2);
    }

    /// Held locks count toward the entry bound; at exactly the bound a
    /// shard keeps every record, even evictable ones.
    #[tokio::test]
    async fn a_shard_at_its_entry_bound_keeps_every_record() {
        let b = MemoryBackend::builder()
            .max_entries(5)
            .min_retention(Duration::ZERO)
            .build();
        stored(&b, &key(1), Duration::from_hours(1)).await;
        let mut held = Vec::new();
        for n in 2..=4 {
            held.push(locked(&b, &key(n), Duration::from_mins(1)).await);
        }
        stored(&b, &key(5), Duration::from_hours(1)).await;
        assert_eq!(
            b.stored_count(),
            2,
            "two records and three locks: at the bound"
        );
        assert!(replayed(&b, &key(1)).await);
        assert!(replayed(&b, &key(5)).await);
    }

    #[tokio::test]
    async fn the_byte_bound_evicts_the_oldest_only_once_passed() {
        let size = record().size() as u64;
        for (max_bytes, kept) in [(3 * size, 3), (3 * size - 1, 2)] {
            let b = MemoryBackend::builder()
                .max_bytes(max_bytes)
                .min_retention(Duration::ZERO)
                .build();
            for n in 1..=3 {
                stored(&b, &key(n), Duration::from_hours(1)).await;
            }
            assert_eq!(b.stored_count(), kept, "max_bytes {max_bytes}");
            assert_eq!(bytes_of(&b, &key(1)), kept * size);
            assert_eq!(replayed(&b, &key(1)).await, kept == 3);
        }
        // A record of exactly a shard's share is kept whole.
        let b = MemoryBackend::builder().max_bytes(size).build();
        stored(&b, &key(1), Duration::from_hours(1)).await;
    }
}
