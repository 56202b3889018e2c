//! The backend conformance suite (feature `conformance`): every rule of the
//! [`Backend`] contract, checked against a backend of yours with one call.
//!
//! ```no_run
//! use tower_idempotency::MemoryBackend;
//! use tower_idempotency::conformance::{self, Locks};
//!
//! # #[tokio::main]
//! # async fn main() {
//! // In a test of your backend (here the crate's own memory backend):
//! let report = conformance::run(MemoryBackend::new(), Locks::Lapse).await;
//! assert!(report.is_passed(), "{report}");
//! # }
//! ```
//!
//! [`run`] runs the cases one after another, each in a task of its own with
//! keys of its own, so a backend with a small pool is not flooded; against a
//! remote store it takes some twenty seconds (some cases wait for short
//! locks and records to expire). A case that panics or fails an assertion
//! is reported by name with its message; the others still run. The crate's memory, Redis and PostgreSQL backends run
//! this same suite in the crate's tests.
//!
//! Run it on a multi-threaded or current-thread Tokio runtime; time passes
//! through `tokio::time`, so a backend that keeps its clock in Tokio (like
//! the memory backend) can run it under a paused clock
//! (`#[tokio::test(start_paused = true)]`), and a remote one in real time.
//! Keys are random per case and run, so the suite can run against a shared
//! server, beside other tests.
//!
//! # The cases
//!
//! Every [`CASES`] entry, by what it checks:
//!
//! - atomic `begin`: `begin_locks_a_free_key`, `concurrent_begin_has_one_winner`,
//!   `keys_are_independent`;
//! - `complete` and visibility: `complete_stores_and_unlocks`,
//!   `large_records_round_trip`, `trailers_round_trip`,
//!   `the_longest_durations_are_accepted`;
//! - `release`: `release_frees_without_storing`;
//! - expiry and lapse: `records_expire`, `extend_keeps_the_lock`, and for
//!   [`Locks::Lapse`] `busy_hint_is_within_the_lock_ttl`,
//!   `lapsed_lock_is_lost`, `release_of_a_lost_lock_spares_the_new_holder`,
//!   `a_takeover_carries_a_larger_fence`; for [`Locks::Session`]
//!   `session_lock_outlives_its_ttl`;
//! - fencing: `fencing_tokens_grow_with_every_grant` (skipped for a backend
//!   that gives no tokens);
//! - cancellation at every `.await`: `cancelled_begin_frees_the_key`,
//!   `cancelled_complete_stores_all_or_nothing`,
//!   `cancelled_release_frees_the_key`, `cancelled_extend_keeps_the_lock`.
//!   Each drives the method's future until its first `Pending` (the
//!   request sent, no answer read), drops it and checks the key, then until
//!   its second, and so on, until the method completes undisturbed.
//!
//! A case that takes longer than two minutes fails.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::sleep;

use crate::{Backend, Begin, Completion, Fingerprint, Record, StorageKey};

/// The message of a backend call that failed where the case expected it
/// to succeed.
const FAILED: &str = "a backend call failed";

/// How a backend's locks end when their holder goes quiet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Locks {
    /// After `lock_ttl` unless extended (memory, Redis, PostgreSQL's lease
    /// mode).
    Lapse,
    /// With the holder's session, whatever `lock_ttl` says (PostgreSQL's
    /// advisory and transaction modes).
    Session,
}

/// Every case, by name, in the order [`run`] reports them.
pub const CASES: &[&str] = &[
    "begin_locks_a_free_key",
    "complete_stores_and_unlocks",
    "large_records_round_trip",
    "trailers_round_trip",
    "release_frees_without_storing",
    "keys_are_independent",
    "extend_keeps_the_lock",
    "records_expire",
    "concurrent_begin_has_one_winner",
    "the_longest_durations_are_accepted",
    "fencing_tokens_grow_with_every_grant",
    "cancelled_begin_frees_the_key",
    "cancelled_complete_stores_all_or_nothing",
    "cancelled_release_frees_the_key",
    "cancelled_extend_keeps_the_lock",
    "busy_hint_is_within_the_lock_ttl",
    "a_takeover_carries_a_larger_fence",
    "lapsed_lock_is_lost",
    "release_of_a_lost_lock_spares_the_new_holder",
    "session_lock_outlives_its_ttl",
];

/// How long one case may take before it is reported as failed (a backend
/// call that never answers, say).
const CASE_TIMEOUT: Duration = Duration::from_mins(2);

/// What became of one case.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Every check held.
    Passed,
    /// A check failed (or the case panicked), with its message.
    Failed(String),
    /// The case does not apply to this backend, and why.
    Skipped(&'static str),
}

/// What [`run`] found: each case's name and [`Outcome`].
#[derive(Clone, Debug)]
#[must_use]
pub struct Report {
    /// Each case, in the order of [`CASES`].
    pub cases: Vec<(&'static str, Outcome)>,
}

impl Report {
    /// Whether no case failed.
    pub fn is_passed(&self) -> bool {
        self.failures().next().is_none()
    }

    /// The failed cases with their messages.
    pub fn failures(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.cases
            .iter()
            .filter_map(|(name, outcome)| match outcome {
                Outcome::Failed(message) => Some((*name, message.as_str())),
                _ => None,
            })
    }

    /// Panics with every failure, by name, unless all cases passed: for a
    /// test of your backend.
    ///
    /// # Panics
    ///
    /// If a case failed.
    pub fn assert_passed(&self) {
        assert!(self.is_passed(), "{self}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failed = self.failures().count();
        writeln!(
            f,
            "backend conformance: {} cases, {failed} failed",
            self.cases.len()
        )?;
        for (name, outcome) in &self.cases {
            match outcome {
                Outcome::Passed => writeln!(f, "  ok      {name}")?,
                Outcome::Skipped(why) => writeln!(f, "  skipped {name}: {why}")?,
                Outcome::Failed(message) => writeln!(f, "  FAILED  {name}: {message}")?,
            }
        }
        Ok(())
    }
}

/// Runs every case against `backend`, one after another; see the
/// [module documentation](self).
pub async fn run<B: Backend>(backend: B, locks: Locks) -> Report {
    run_only(backend, locks, CASES).await
}

/// Runs the cases named in `names` (from [`CASES`]; an unknown name is
/// reported as failed).
pub async fn run_only<B: Backend>(backend: B, locks: Locks, names: &[&str]) -> Report {
    let mut cases = Vec::new();
    for name in CASES.iter().copied().filter(|n| names.contains(n)) {
        let b = backend.clone();
        let mut task = tokio::spawn(async move { case(name, b, locks).await });
        let outcome = match tokio::time::timeout(CASE_TIMEOUT, &mut task).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) if error.is_panic() => {
                Outcome::Failed(panic_message(&error.into_panic()))
            }
            Ok(Err(error)) => Outcome::Failed(error.to_string()),
            Err(_) => {
                task.abort();
                Outcome::Failed(format!("did not finish within {CASE_TIMEOUT:?}"))
            }
        };
        cases.push((name, outcome));
    }
    for name in names {
        if !CASES.contains(name) {
            cases.push((
                "unknown case",
                Outcome::Failed(format!("no case is named {name:?}")),
            ));
        }
    }
    Report { cases }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "the case panicked".to_owned())
}

/// Runs one case; `Skipped` when it does not apply.
async fn case<B: Backend>(name: &str, b: B, locks: Locks) -> Outcome {
    let lapse = locks == Locks::Lapse;
    match name {
        "begin_locks_a_free_key" => begin_locks_a_free_key(b).await,
        "complete_stores_and_unlocks" => complete_stores_and_unlocks(b).await,
        "large_records_round_trip" => large_records_round_trip(b).await,
        "trailers_round_trip" => trailers_round_trip(b).await,
        "release_frees_without_storing" => release_frees_without_storing(b).await,
        "keys_are_independent" => keys_are_independent(b).await,
        "extend_keeps_the_lock" => extend_keeps_the_lock(b).await,
        "records_expire" => records_expire(b).await,
        "concurrent_begin_has_one_winner" => concurrent_begin_has_one_winner(b).await,
        "the_longest_durations_are_accepted" => the_longest_durations_are_accepted(b).await,
        "fencing_tokens_grow_with_every_grant" => {
            return fencing_tokens_grow_with_every_grant(b).await;
        }
        "cancelled_begin_frees_the_key" => cancelled_begin_frees_the_key(b).await,
        "cancelled_complete_stores_all_or_nothing" => {
            cancelled_complete_stores_all_or_nothing(b).await;
        }
        "cancelled_release_frees_the_key" => cancelled_release_frees_the_key(b).await,
        "cancelled_extend_keeps_the_lock" => cancelled_extend_keeps_the_lock(b).await,
        "busy_hint_is_within_the_lock_ttl" if lapse => busy_hint_is_within_the_lock_ttl(b).await,
        "a_takeover_carries_a_larger_fence" if lapse => {
            return a_takeover_carries_a_larger_fence(b).await;
        }
        "lapsed_lock_is_lost" if lapse => lapsed_lock_is_lost(b).await,
        "release_of_a_lost_lock_spares_the_new_holder" if lapse => {
            release_of_a_lost_lock_spares_the_new_holder(b).await;
        }
        "session_lock_outlives_its_ttl" if !lapse => session_lock_outlives_its_ttl(b).await,
        "session_lock_outlives_its_ttl" => return Outcome::Skipped("locks lapse (Locks::Lapse)"),
        _ => return Outcome::Skipped("locks end with their session (Locks::Session)"),
    }
    Outcome::Passed
}

/// A storage key no other case (or run, or process) uses.
#[must_use]
pub fn fresh_key() -> StorageKey {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 32];
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    bytes[..16].copy_from_slice(&nanos.to_le_bytes());
    bytes[16..24].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    bytes[24..28].copy_from_slice(&std::process::id().to_le_bytes());
    // Mixed, so keys spread over shards and slots.
    let mut mixed = [0u8; 32];
    for (i, b) in (0u8..).zip(bytes.iter()) {
        mixed[(usize::from(i) * 7) % 32] = b.wrapping_mul(31).wrapping_add(i);
    }
    mixed[31] ^= bytes[16];
    StorageKey::from_bytes(mixed)
}

/// The fingerprint `[n; 32]`.
#[must_use]
pub const fn fingerprint(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// A `201` record for `fp` with `body`, a JSON content type and a header
/// given twice (order and multiplicity must round-trip).
#[must_use]
pub fn record(fp: Fingerprint, body: &[u8]) -> Record {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.append("x-multi", HeaderValue::from_static("1"));
    headers.append("x-multi", HeaderValue::from_static("2"));
    Record::new(
        StatusCode::CREATED,
        headers,
        Bytes::copy_from_slice(body),
        fp,
    )
}

/// A lock that must hold for the rest of a case: long enough that a loaded
/// machine's slow round trips cannot outlast it. Cases about locks that end
/// use short TTLs of their own and wait for the end.
const LOCK_TTL: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_mins(1);

/// Begins `key` until it is free again (a lock or record of `key` has
/// lapsed), for at most `within`; returns the new lock.
async fn acquired_once_lapsed<B: Backend>(
    b: &B,
    key: &StorageKey,
    fp: &Fingerprint,
    within: Duration,
) -> B::Lock {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Begin::Acquired(lock) = b.begin(key, fp, LOCK_TTL).await.expect(FAILED) {
            return lock;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still taken after {within:?}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

fn acquired<L>(begin: Begin<L>) -> L {
    match begin {
        Begin::Acquired(lock) => lock,
        Begin::Completed(_) => panic!("expected Acquired, got Completed"),
        Begin::Busy { retry_after } => panic!("expected Acquired, got Busy({retry_after:?})"),
    }
}

fn completed<L>(begin: Begin<L>) -> Record {
    match begin {
        Begin::Completed(record) => record,
        Begin::Acquired(_) => panic!("expected Completed, got Acquired"),
        Begin::Busy { .. } => panic!("expected Completed, got Busy"),
    }
}

#[allow(clippy::needless_pass_by_value)] // consumes like its siblings, for uniform call sites
fn busy<L>(begin: Begin<L>) -> Duration {
    match &begin {
        Begin::Busy { retry_after } => *retry_after,
        Begin::Acquired(_) => panic!("expected Busy, got Acquired"),
        Begin::Completed(_) => panic!("expected Busy, got Completed"),
    }
}

async fn begin_locks_a_free_key<B: Backend>(b: B) {
    let key = fresh_key();
    let lock = acquired(
        b.begin(&key, &fingerprint(1), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    let retry_after = busy(
        b.begin(&key, &fingerprint(1), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    assert!(retry_after > Duration::ZERO, "{retry_after:?}");
    b.release(lock).await.expect(FAILED);
}

/// Locks that lapse: the busy hint is the time left on the holder's lock.
async fn busy_hint_is_within_the_lock_ttl<B: Backend>(b: B) {
    let key = fresh_key();
    let lock = acquired(
        b.begin(&key, &fingerprint(12), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    let retry_after = busy(
        b.begin(&key, &fingerprint(12), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    assert!(
        retry_after > Duration::ZERO && retry_after <= LOCK_TTL,
        "{retry_after:?}"
    );
    b.release(lock).await.expect(FAILED);
}

/// Session locks: a lock lives as long as its holder, whatever `lock_ttl`
/// says, and its holder can still store.
async fn session_lock_outlives_its_ttl<B: Backend>(b: B) {
    let key = fresh_key();
    let short = Duration::from_millis(200);
    let lock = acquired(b.begin(&key, &fingerprint(13), short).await.expect(FAILED));
    sleep(short * 3).await;
    busy(b.begin(&key, &fingerprint(13), short).await.expect(FAILED));
    assert!(b.extend(&lock, short).await.expect(FAILED));
    assert_eq!(
        b.complete(lock, record(fingerprint(13), b"late"), TTL)
            .await
            .expect(FAILED),
        Completion::Saved
    );
    completed(b.begin(&key, &fingerprint(13), short).await.expect(FAILED));
}

/// Locks a fresh key, stores `rec` under it (which must be `Saved`), and
/// returns the key with the record a lookup then finds.
async fn stored_and_read<B: Backend>(b: &B, rec: Record) -> (StorageKey, Record) {
    let key = fresh_key();
    let fp = rec.fingerprint;
    let lock = acquired(b.begin(&key, &fp, LOCK_TTL).await.expect(FAILED));
    assert_eq!(
        b.complete(lock, rec, TTL).await.expect(FAILED),
        Completion::Saved
    );
    let stored = completed(b.begin(&key, &fp, LOCK_TTL).await.expect(FAILED));
    (key, stored)
}

async fn complete_stores_and_unlocks<B: Backend>(b: B) {
    let rec = record(fingerprint(2), br#"{"id":42}"#);
    let (key, stored) = stored_and_read(&b, rec.clone()).await;
    assert_eq!(stored.status, rec.status);
    assert_eq!(stored.headers, rec.headers);
    assert_eq!(stored.body, rec.body);
    assert_eq!(stored.fingerprint, rec.fingerprint);
    // A lookup with another fingerprint still finds the record (the layer answers 422).
    let other = completed(
        b.begin(&key, &fingerprint(9), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    assert_eq!(other.fingerprint, fingerprint(2));
}

async fn large_records_round_trip<B: Backend>(b: B) {
    let body: Vec<u8> = (0..300_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect();
    let (_, stored) = stored_and_read(&b, record(fingerprint(3), &body)).await;
    assert_eq!(stored.body.as_ref(), body.as_slice());
}

/// A record's trailers (a gRPC answer's `grpc-status`) come back in order,
/// each value, and an empty trailer block is not taken for none.
async fn trailers_round_trip<B: Backend>(b: B) {
    let mut trailers = http::HeaderMap::new();
    trailers.append("grpc-status", http::HeaderValue::from_static("0"));
    trailers.append("x-note", http::HeaderValue::from_static("first"));
    trailers.append("x-note", http::HeaderValue::from_static("second"));
    for trailers in [trailers, http::HeaderMap::new()] {
        let rec = record(fingerprint(4), b"\0\0\0\0\x01\x08").with_trailers(trailers.clone());
        let (_, stored) = stored_and_read(&b, rec).await;
        let stored = stored.trailers.expect("trailers kept, an empty block too");
        assert_eq!(
            stored.iter().collect::<Vec<_>>(),
            trailers.iter().collect::<Vec<_>>(),
            "trailers in order, each value"
        );
    }
}

async fn release_frees_without_storing<B: Backend>(b: B) {
    let key = fresh_key();
    let lock = acquired(
        b.begin(&key, &fingerprint(4), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    b.release(lock).await.expect(FAILED);
    let lock = acquired(
        b.begin(&key, &fingerprint(4), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    b.release(lock).await.expect(FAILED);
}

async fn keys_are_independent<B: Backend>(b: B) {
    let (k1, k2) = (fresh_key(), fresh_key());
    let l1 = acquired(b.begin(&k1, &fingerprint(5), LOCK_TTL).await.expect(FAILED));
    let l2 = acquired(b.begin(&k2, &fingerprint(5), LOCK_TTL).await.expect(FAILED));
    assert_eq!(
        b.complete(l1, record(fingerprint(5), b"one"), TTL)
            .await
            .expect(FAILED),
        Completion::Saved
    );
    busy(b.begin(&k2, &fingerprint(5), LOCK_TTL).await.expect(FAILED));
    b.release(l2).await.expect(FAILED);
    acquired(b.begin(&k2, &fingerprint(5), LOCK_TTL).await.expect(FAILED));
}

async fn extend_keeps_the_lock<B: Backend>(b: B) {
    let key = fresh_key();
    // Extended every third of its TTL: each extension may come two thirds
    // of a TTL late and still find the lock.
    let ttl = Duration::from_secs(2);
    let begun = tokio::time::Instant::now();
    let lock = acquired(b.begin(&key, &fingerprint(6), ttl).await.expect(FAILED));
    for _ in 0..4 {
        sleep(ttl / 3).await;
        assert!(
            b.extend(&lock, ttl).await.expect(FAILED),
            "extend of a live lock failed"
        );
    }
    // More than a lock TTL has passed since begin: only the extensions kept it.
    assert!(begun.elapsed() > ttl);
    busy(
        b.begin(&key, &fingerprint(6), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    assert_eq!(
        b.complete(lock, record(fingerprint(6), b"slow"), TTL)
            .await
            .expect(FAILED),
        Completion::Saved
    );
}

async fn lapsed_lock_is_lost<B: Backend>(b: B) {
    let key = fresh_key();
    let short = Duration::from_millis(200);
    let first = acquired(b.begin(&key, &fingerprint(7), short).await.expect(FAILED));
    sleep(short * 2).await;
    assert!(
        !b.extend(&first, short).await.expect(FAILED),
        "a lapsed lock was extended"
    );
    let medium = Duration::from_secs(2);
    let second = acquired(b.begin(&key, &fingerprint(7), medium).await.expect(FAILED));
    // The first holder may neither store nor unlock the second holder's key.
    assert_eq!(
        b.complete(first, record(fingerprint(7), b"stale"), TTL)
            .await
            .expect(FAILED),
        Completion::Lost
    );
    busy(
        b.begin(&key, &fingerprint(7), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    let third = acquired_once_lapsed(&b, &key, &fingerprint(7), medium * 5).await;
    b.release(third).await.expect(FAILED);
    assert_eq!(
        b.complete(second, record(fingerprint(7), b"fresh"), TTL)
            .await
            .expect(FAILED),
        Completion::Lost,
        "the second lock lapsed and was taken over by a third"
    );
    let lock = acquired(
        b.begin(&key, &fingerprint(7), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    assert_eq!(
        b.complete(lock, record(fingerprint(7), b"final"), TTL)
            .await
            .expect(FAILED),
        Completion::Saved
    );
    assert_eq!(
        completed(
            b.begin(&key, &fingerprint(7), LOCK_TTL)
                .await
                .expect(FAILED)
        )
        .body,
        Bytes::from_static(b"final")
    );
}

async fn release_of_a_lost_lock_spares_the_new_holder<B: Backend>(b: B) {
    let key = fresh_key();
    let short = Duration::from_millis(200);
    let first = acquired(b.begin(&key, &fingerprint(8), short).await.expect(FAILED));
    sleep(short * 2).await;
    let second = acquired(
        b.begin(&key, &fingerprint(8), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    b.release(first).await.expect(FAILED);
    busy(
        b.begin(&key, &fingerprint(8), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    b.release(second).await.expect(FAILED);
}

async fn records_expire<B: Backend>(b: B) {
    let key = fresh_key();
    let lock = acquired(
        b.begin(&key, &fingerprint(10), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    // Long enough to be read back at once on a loaded machine.
    let ttl = Duration::from_secs(2);
    assert_eq!(
        b.complete(lock, record(fingerprint(10), b"short-lived"), ttl)
            .await
            .expect(FAILED),
        Completion::Saved
    );
    completed(
        b.begin(&key, &fingerprint(10), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    let lock = acquired_once_lapsed(&b, &key, &fingerprint(10), ttl * 5).await;
    b.release(lock).await.expect(FAILED);
}

async fn concurrent_begin_has_one_winner<B: Backend>(b: B) {
    let key = fresh_key();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let b = b.clone();
        tasks.spawn(async move {
            match b
                .begin(&key, &fingerprint(11), LOCK_TTL)
                .await
                .expect(FAILED)
            {
                Begin::Acquired(lock) => Some(lock),
                Begin::Busy { .. } => None,
                Begin::Completed(_) => panic!("nothing was stored yet"),
            }
        });
    }
    let mut winners = Vec::new();
    while let Some(res) = tasks.join_next().await {
        winners.extend(res.expect("a begin panicked"));
    }
    assert_eq!(winners.len(), 1, "exactly one begin may acquire the key");
    let lock = winners.pop().expect(FAILED);
    assert_eq!(
        b.complete(lock, record(fingerprint(11), b"winner"), TTL)
            .await
            .expect(FAILED),
        Completion::Saved
    );
    for _ in 0..8 {
        completed(
            b.begin(&key, &fingerprint(11), LOCK_TTL)
                .await
                .expect(FAILED),
        );
    }
}

/// The fencing token of `lock`, which every built-in backend gives.
fn fence_of<B: Backend>(b: &B, lock: &B::Lock) -> u64 {
    b.fencing_token(lock)
        .expect("every lock carries a fencing token")
        .get()
}

/// Every lock granted on a key carries a larger fencing token than the one
/// before it: after a release, after the key's record expired, and for the
/// winner of a race.
async fn fencing_tokens_grow_with_every_grant<B: Backend>(b: B) -> Outcome {
    let key = fresh_key();
    let first = acquired(
        b.begin(&key, &fingerprint(12), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    if b.fencing_token(&first).is_none() {
        b.release(first).await.expect(FAILED);
        return Outcome::Skipped("the backend gives no fencing tokens");
    }
    let f1 = fence_of(&b, &first);
    assert!(f1 > 0);
    b.release(first).await.expect(FAILED);
    let second = acquired(
        b.begin(&key, &fingerprint(12), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    let f2 = fence_of(&b, &second);
    assert!(f2 > f1, "after a release: {f2} <= {f1}");
    let ttl = Duration::from_secs(2);
    assert_eq!(
        b.complete(second, record(fingerprint(12), b"short-lived"), ttl)
            .await
            .expect(FAILED),
        Completion::Saved
    );
    let third = acquired_once_lapsed(&b, &key, &fingerprint(12), ttl * 5).await;
    let f3 = fence_of(&b, &third);
    assert!(f3 > f2, "after the record expired: {f3} <= {f2}");
    b.release(third).await.expect(FAILED);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let b = b.clone();
        tasks.spawn(async move {
            match b
                .begin(&key, &fingerprint(12), LOCK_TTL)
                .await
                .expect(FAILED)
            {
                Begin::Acquired(lock) => Some((b.fencing_token(&lock), lock)),
                _ => None,
            }
        });
    }
    let mut winners = Vec::new();
    while let Some(res) = tasks.join_next().await {
        winners.extend(res.expect("a begin panicked"));
    }
    let (f4, lock) = winners.pop().expect("one begin wins");
    let f4 = f4.expect("every lock carries a fencing token").get();
    assert!(f4 > f3, "the race's winner: {f4} <= {f3}");
    b.release(lock).await.expect(FAILED);
    Outcome::Passed
}

/// A lock taken over after its holder's lapsed carries a larger token, so
/// the stale holder's own writes can be fenced off.
async fn a_takeover_carries_a_larger_fence<B: Backend>(b: B) -> Outcome {
    let key = fresh_key();
    let short = Duration::from_millis(200);
    let stale = acquired(b.begin(&key, &fingerprint(13), short).await.expect(FAILED));
    if b.fencing_token(&stale).is_none() {
        return Outcome::Skipped("the backend gives no fencing tokens");
    }
    let old = fence_of(&b, &stale);
    let newer = acquired_once_lapsed(&b, &key, &fingerprint(13), Duration::from_secs(10)).await;
    assert!(
        fence_of(&b, &newer) > old,
        "a takeover's token is not larger"
    );
    b.release(newer).await.expect(FAILED);
    b.release(stale).await.expect(FAILED);
    Outcome::Passed
}

/// `Duration::MAX` for every duration is accepted (shortened to the crate's
/// `MAX_TTL`): no panic, no refused write; a "not kept" marker round-trips.
async fn the_longest_durations_are_accepted<B: Backend>(b: B) {
    let key = fresh_key();
    let lock = acquired(
        b.begin(&key, &fingerprint(1), Duration::MAX)
            .await
            .expect(FAILED),
    );
    assert!(b.extend(&lock, Duration::MAX).await.expect(FAILED));
    assert_eq!(
        b.complete(lock, record(fingerprint(1), b"forever"), Duration::MAX)
            .await
            .expect(FAILED),
        Completion::Saved
    );
    assert_eq!(
        completed(
            b.begin(&key, &fingerprint(1), LOCK_TTL)
                .await
                .expect(FAILED)
        )
        .body,
        "forever"
    );
    let key = fresh_key();
    let lock = acquired(
        b.begin(&key, &fingerprint(2), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    let marker = Record::not_kept(StatusCode::ACCEPTED, fingerprint(2));
    b.complete(lock, marker, Duration::MAX).await.expect(FAILED);
    let back = completed(
        b.begin(&key, &fingerprint(2), LOCK_TTL)
            .await
            .expect(FAILED),
    );
    assert!(!back.kept);
    assert_eq!(back.status, StatusCode::ACCEPTED);
}

/// How long a lock of the cancellation cases lasts: a key a cancelled call
/// left locked is free again after it.
const CUT_LOCK_TTL: Duration = Duration::from_secs(5);

/// Drives `work` until it has answered `Pending` `polls` times, then drops
/// it at once — the request sent, its answer not read yet: `Some` of its
/// output if it finished first, `None` if it was dropped.
async fn cut<F: Future>(work: F, polls: usize) -> Option<F::Output> {
    struct Cut<F> {
        work: Pin<Box<F>>,
        left: usize,
    }
    impl<F: Future> Future for Cut<F> {
        type Output = Option<F::Output>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.work.as_mut().poll(cx) {
                Poll::Ready(output) => Poll::Ready(Some(output)),
                Poll::Pending => {
                    self.left -= 1;
                    if self.left == 0 {
                        Poll::Ready(None)
                    } else {
                        Poll::Pending
                    }
                }
            }
        }
    }
    Cut {
        work: Box::pin(work),
        left: polls.max(1),
    }
    .await
}

/// The most `.await`s a method is cut at.
const MAX_CUTS: usize = 64;

/// The key is free, or comes free once `CUT_LOCK_TTL` has passed (a lock
/// a cancelled call left behind expires): returns the new lock.
async fn free_again<B: Backend>(b: &B, key: &StorageKey, fp: &Fingerprint, what: &str) -> B::Lock {
    let deadline = tokio::time::Instant::now() + CUT_LOCK_TTL * 3;
    loop {
        match b.begin(key, fp, CUT_LOCK_TTL).await {
            Ok(Begin::Acquired(lock)) => return lock,
            Ok(Begin::Completed(_)) => panic!("{what}: a record appeared"),
            Ok(Begin::Busy { .. }) => {}
            Err(error) => panic!("{what}: the next begin failed: {error}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the key is still locked {:?} later",
            CUT_LOCK_TTL * 3
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// A `begin` dropped at any `.await` leaves the key free within its lock
/// TTL, with nothing stored.
async fn cancelled_begin_frees_the_key<B: Backend>(b: B) {
    let fp = fingerprint(14);
    for polls in 1..=MAX_CUTS {
        let key = fresh_key();
        if let Some(begun) = cut(b.begin(&key, &fp, CUT_LOCK_TTL), polls).await {
            b.release(acquired(begun.expect(FAILED)))
                .await
                .expect(FAILED);
            return;
        }
        let lock = free_again(&b, &key, &fp, &format!("begin cut at await {polls}")).await;
        b.release(lock).await.expect(FAILED);
    }
}

/// A `complete` dropped at any `.await` stored the whole record or
/// nothing; if nothing, the key is free within its lock TTL.
async fn cancelled_complete_stores_all_or_nothing<B: Backend>(b: B) {
    let fp = fingerprint(15);
    let body: Vec<u8> = (0..20_000u32).map(|i| i.to_le_bytes()[0]).collect();
    for polls in 1..=MAX_CUTS {
        let key = fresh_key();
        let lock = acquired(b.begin(&key, &fp, CUT_LOCK_TTL).await.expect(FAILED));
        let done = cut(b.complete(lock, record(fp, &body), TTL), polls).await;
        let what = format!("complete cut at await {polls}");
        if let Some(done) = done {
            assert_eq!(done.expect(FAILED), Completion::Saved, "{what}");
            let stored = completed(b.begin(&key, &fp, LOCK_TTL).await.expect(FAILED));
            assert_eq!(stored.body.as_ref(), body.as_slice(), "{what}");
            return;
        }
        let deadline = tokio::time::Instant::now() + CUT_LOCK_TTL * 3;
        loop {
            match b.begin(&key, &fp, CUT_LOCK_TTL).await {
                Ok(Begin::Completed(stored)) => {
                    assert_eq!(
                        stored.body.as_ref(),
                        body.as_slice(),
                        "{what}: a partial record"
                    );
                    break;
                }
                Ok(Begin::Acquired(lock)) => {
                    b.release(lock).await.expect(FAILED);
                    break;
                }
                Ok(Begin::Busy { .. }) | Err(_) => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: the key stayed locked"
            );
            sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A `release` dropped at any `.await` leaves the key free within its lock
/// TTL.
async fn cancelled_release_frees_the_key<B: Backend>(b: B) {
    let fp = fingerprint(16);
    for polls in 1..=MAX_CUTS {
        let key = fresh_key();
        let lock = acquired(b.begin(&key, &fp, CUT_LOCK_TTL).await.expect(FAILED));
        if cut(b.release(lock), polls).await.is_some() {
            let lock = acquired(b.begin(&key, &fp, LOCK_TTL).await.expect(FAILED));
            b.release(lock).await.expect(FAILED);
            return;
        }
        let lock = free_again(&b, &key, &fp, &format!("release cut at await {polls}")).await;
        b.release(lock).await.expect(FAILED);
    }
}

/// An `extend` dropped at any `.await` leaves the lock held: its holder
/// still stores.
async fn cancelled_extend_keeps_the_lock<B: Backend>(b: B) {
    let fp = fingerprint(17);
    for polls in 1..=MAX_CUTS {
        let key = fresh_key();
        let lock = acquired(b.begin(&key, &fp, LOCK_TTL).await.expect(FAILED));
        let extended = cut(b.extend(&lock, LOCK_TTL), polls).await;
        let what = format!("extend cut at await {polls}");
        busy(b.begin(&key, &fp, LOCK_TTL).await.expect(FAILED));
        assert_eq!(
            b.complete(lock, record(fp, b"kept"), TTL)
                .await
                .expect(FAILED),
            Completion::Saved,
            "{what}"
        );
        if let Some(extended) = extended {
            assert!(
                extended.expect(FAILED),
                "{what}: extend of a live lock failed"
            );
            return;
        }
    }
}
