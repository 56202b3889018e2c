//! The backend conformance suite: every backend runs it unchanged.
//!
//! A backend's test file invokes [`backend_conformance!`] with an expression
//! that makes a backend and the test attribute to use. Time passes through
//! `tokio::time::sleep`, so an in-process backend can run the suite under a
//! paused clock while a remote backend runs it in real time.
//!
//! Every case uses its own random keys, so cases run in parallel and on a
//! shared server.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::sleep;
use tower_idempotency::{Backend, Begin, Completion, Fingerprint, Record, StorageKey};

/// A storage key no other case (or test run) uses.
pub fn fresh_key() -> StorageKey {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 32];
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    bytes[..16].copy_from_slice(&nanos.to_le_bytes());
    bytes[16..24].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    bytes[24..28].copy_from_slice(&std::process::id().to_le_bytes());
    // Mix, so keys spread over shards and slots.
    let mut mixed = [0u8; 32];
    for (i, b) in bytes.iter().enumerate() {
        mixed[(i * 7) % 32] = b.wrapping_mul(31).wrapping_add(u8::try_from(i).unwrap());
    }
    mixed[31] ^= bytes[16];
    StorageKey::from_bytes(mixed)
}

pub fn fingerprint(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

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
        if let Begin::Acquired(lock) = b.begin(key, fp, LOCK_TTL).await.unwrap() {
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

pub async fn begin_locks_a_free_key<B: Backend>(b: B) {
    let key = fresh_key();
    let lock = acquired(b.begin(&key, &fingerprint(1), LOCK_TTL).await.unwrap());
    let retry_after = busy(b.begin(&key, &fingerprint(1), LOCK_TTL).await.unwrap());
    assert!(retry_after > Duration::ZERO, "{retry_after:?}");
    b.release(lock).await.unwrap();
}

/// Locks that lapse: the busy hint is the time left on the holder's lock.
pub async fn busy_hint_is_within_the_lock_ttl<B: Backend>(b: B) {
    let key = fresh_key();
    let lock = acquired(b.begin(&key, &fingerprint(12), LOCK_TTL).await.unwrap());
    let retry_after = busy(b.begin(&key, &fingerprint(12), LOCK_TTL).await.unwrap());
    assert!(
        retry_after > Duration::ZERO && retry_after <= LOCK_TTL,
        "{retry_after:?}"
    );
    b.release(lock).await.unwrap();
}

/// Session locks: a lock lives as long as its holder, whatever `lock_ttl`
/// says, and its holder can still store.
pub async fn session_lock_outlives_its_ttl<B: Backend>(b: B) {
    let key = fresh_key();
    let short = Duration::from_millis(200);
    let lock = acquired(b.begin(&key, &fingerprint(13), short).await.unwrap());
    sleep(short * 3).await;
    busy(b.begin(&key, &fingerprint(13), short).await.unwrap());
    assert!(b.extend(&lock, short).await.unwrap());
    assert_eq!(
        b.complete(lock, record(fingerprint(13), b"late"), TTL)
            .await
            .unwrap(),
        Completion::Saved
    );
    completed(b.begin(&key, &fingerprint(13), short).await.unwrap());
}

pub async fn complete_stores_and_unlocks<B: Backend>(b: B) {
    let key = fresh_key();
    let rec = record(fingerprint(2), br#"{"id":42}"#);
    let lock = acquired(b.begin(&key, &fingerprint(2), LOCK_TTL).await.unwrap());
    assert_eq!(
        b.complete(lock, rec.clone(), TTL).await.unwrap(),
        Completion::Saved
    );
    let stored = completed(b.begin(&key, &fingerprint(2), LOCK_TTL).await.unwrap());
    assert_eq!(stored.status, rec.status);
    assert_eq!(stored.headers, rec.headers);
    assert_eq!(stored.body, rec.body);
    assert_eq!(stored.fingerprint, rec.fingerprint);
    // A lookup with another fingerprint still finds the record (the layer answers 422).
    let other = completed(b.begin(&key, &fingerprint(9), LOCK_TTL).await.unwrap());
    assert_eq!(other.fingerprint, fingerprint(2));
}

pub async fn large_records_round_trip<B: Backend>(b: B) {
    let key = fresh_key();
    let body: Vec<u8> = (0..300_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect();
    let lock = acquired(b.begin(&key, &fingerprint(3), LOCK_TTL).await.unwrap());
    let rec = record(fingerprint(3), &body);
    assert_eq!(b.complete(lock, rec, TTL).await.unwrap(), Completion::Saved);
    let stored = completed(b.begin(&key, &fingerprint(3), LOCK_TTL).await.unwrap());
    assert_eq!(stored.body.as_ref(), body.as_slice());
}

pub async fn release_frees_without_storing<B: Backend>(b: B) {
    let key = fresh_key();
    let lock = acquired(b.begin(&key, &fingerprint(4), LOCK_TTL).await.unwrap());
    b.release(lock).await.unwrap();
    let lock = acquired(b.begin(&key, &fingerprint(4), LOCK_TTL).await.unwrap());
    b.release(lock).await.unwrap();
}

pub async fn keys_are_independent<B: Backend>(b: B) {
    let (k1, k2) = (fresh_key(), fresh_key());
    let l1 = acquired(b.begin(&k1, &fingerprint(5), LOCK_TTL).await.unwrap());
    let l2 = acquired(b.begin(&k2, &fingerprint(5), LOCK_TTL).await.unwrap());
    assert_eq!(
        b.complete(l1, record(fingerprint(5), b"one"), TTL)
            .await
            .unwrap(),
        Completion::Saved
    );
    busy(b.begin(&k2, &fingerprint(5), LOCK_TTL).await.unwrap());
    b.release(l2).await.unwrap();
    acquired(b.begin(&k2, &fingerprint(5), LOCK_TTL).await.unwrap());
}

pub async fn extend_keeps_the_lock<B: Backend>(b: B) {
    let key = fresh_key();
    // Extended every third of its TTL: each extension may come two thirds
    // of a TTL late and still find the lock.
    let ttl = Duration::from_secs(2);
    let begun = tokio::time::Instant::now();
    let lock = acquired(b.begin(&key, &fingerprint(6), ttl).await.unwrap());
    for _ in 0..4 {
        sleep(ttl / 3).await;
        assert!(
            b.extend(&lock, ttl).await.unwrap(),
            "extend of a live lock failed"
        );
    }
    // More than a lock TTL has passed since begin: only the extensions kept it.
    assert!(begun.elapsed() > ttl);
    busy(b.begin(&key, &fingerprint(6), LOCK_TTL).await.unwrap());
    assert_eq!(
        b.complete(lock, record(fingerprint(6), b"slow"), TTL)
            .await
            .unwrap(),
        Completion::Saved
    );
}

pub async fn lapsed_lock_is_lost<B: Backend>(b: B) {
    let key = fresh_key();
    let short = Duration::from_millis(200);
    let first = acquired(b.begin(&key, &fingerprint(7), short).await.unwrap());
    sleep(short * 2).await;
    assert!(
        !b.extend(&first, short).await.unwrap(),
        "a lapsed lock was extended"
    );
    let medium = Duration::from_secs(2);
    let second = acquired(b.begin(&key, &fingerprint(7), medium).await.unwrap());
    // The first holder may neither store nor unlock the second holder's key.
    assert_eq!(
        b.complete(first, record(fingerprint(7), b"stale"), TTL)
            .await
            .unwrap(),
        Completion::Lost
    );
    busy(b.begin(&key, &fingerprint(7), LOCK_TTL).await.unwrap());
    let third = acquired_once_lapsed(&b, &key, &fingerprint(7), medium * 5).await;
    b.release(third).await.unwrap();
    assert_eq!(
        b.complete(second, record(fingerprint(7), b"fresh"), TTL)
            .await
            .unwrap(),
        Completion::Lost,
        "the second lock lapsed and was taken over by a third"
    );
    let lock = acquired(b.begin(&key, &fingerprint(7), LOCK_TTL).await.unwrap());
    assert_eq!(
        b.complete(lock, record(fingerprint(7), b"final"), TTL)
            .await
            .unwrap(),
        Completion::Saved
    );
    assert_eq!(
        completed(b.begin(&key, &fingerprint(7), LOCK_TTL).await.unwrap()).body,
        Bytes::from_static(b"final")
    );
}

pub async fn release_of_a_lost_lock_spares_the_new_holder<B: Backend>(b: B) {
    let key = fresh_key();
    let short = Duration::from_millis(200);
    let first = acquired(b.begin(&key, &fingerprint(8), short).await.unwrap());
    sleep(short * 2).await;
    let second = acquired(b.begin(&key, &fingerprint(8), LOCK_TTL).await.unwrap());
    b.release(first).await.unwrap();
    busy(b.begin(&key, &fingerprint(8), LOCK_TTL).await.unwrap());
    b.release(second).await.unwrap();
}

pub async fn records_expire<B: Backend>(b: B) {
    let key = fresh_key();
    let lock = acquired(b.begin(&key, &fingerprint(10), LOCK_TTL).await.unwrap());
    // Long enough to be read back at once on a loaded machine.
    let ttl = Duration::from_secs(2);
    assert_eq!(
        b.complete(lock, record(fingerprint(10), b"short-lived"), ttl)
            .await
            .unwrap(),
        Completion::Saved
    );
    completed(b.begin(&key, &fingerprint(10), LOCK_TTL).await.unwrap());
    let lock = acquired_once_lapsed(&b, &key, &fingerprint(10), ttl * 5).await;
    b.release(lock).await.unwrap();
}

pub async fn concurrent_begin_has_one_winner<B: Backend>(b: B) {
    let key = fresh_key();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let b = b.clone();
        tasks.spawn(async move {
            match b.begin(&key, &fingerprint(11), LOCK_TTL).await.unwrap() {
                Begin::Acquired(lock) => Some(lock),
                Begin::Busy { .. } => None,
                Begin::Completed(_) => panic!("nothing was stored yet"),
            }
        });
    }
    let mut winners = Vec::new();
    while let Some(res) = tasks.join_next().await {
        winners.extend(res.unwrap());
    }
    assert_eq!(winners.len(), 1, "exactly one begin may acquire the key");
    let lock = winners.pop().unwrap();
    assert_eq!(
        b.complete(lock, record(fingerprint(11), b"winner"), TTL)
            .await
            .unwrap(),
        Completion::Saved
    );
    for _ in 0..8 {
        completed(b.begin(&key, &fingerprint(11), LOCK_TTL).await.unwrap());
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
pub async fn fencing_tokens_grow_with_every_grant<B: Backend>(b: B) {
    let key = fresh_key();
    let first = acquired(b.begin(&key, &fingerprint(12), LOCK_TTL).await.unwrap());
    let f1 = fence_of(&b, &first);
    assert!(f1 > 0);
    b.release(first).await.unwrap();
    let second = acquired(b.begin(&key, &fingerprint(12), LOCK_TTL).await.unwrap());
    let f2 = fence_of(&b, &second);
    assert!(f2 > f1, "after a release: {f2} <= {f1}");
    let ttl = Duration::from_secs(2);
    assert_eq!(
        b.complete(second, record(fingerprint(12), b"short-lived"), ttl)
            .await
            .unwrap(),
        Completion::Saved
    );
    let third = acquired_once_lapsed(&b, &key, &fingerprint(12), ttl * 5).await;
    let f3 = fence_of(&b, &third);
    assert!(f3 > f2, "after the record expired: {f3} <= {f2}");
    b.release(third).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let b = b.clone();
        tasks.spawn(async move {
            match b.begin(&key, &fingerprint(12), LOCK_TTL).await.unwrap() {
                Begin::Acquired(lock) => Some((b.fencing_token(&lock), lock)),
                _ => None,
            }
        });
    }
    let mut winners = Vec::new();
    while let Some(res) = tasks.join_next().await {
        winners.extend(res.unwrap());
    }
    let (f4, lock) = winners.pop().expect("one begin wins");
    assert!(f4.unwrap().get() > f3, "the race's winner: {f4:?} <= {f3}");
    b.release(lock).await.unwrap();
}

/// A lock taken over after its holder's lapsed carries a larger token, so
/// the stale holder's own writes can be fenced off.
pub async fn a_takeover_carries_a_larger_fence<B: Backend>(b: B) {
    let key = fresh_key();
    let short = Duration::from_millis(200);
    let stale = acquired(b.begin(&key, &fingerprint(13), short).await.unwrap());
    let old = fence_of(&b, &stale);
    let newer = acquired_once_lapsed(&b, &key, &fingerprint(13), Duration::from_secs(10)).await;
    assert!(fence_of(&b, &newer) > old);
    b.release(newer).await.unwrap();
    b.release(stale).await.unwrap();
}

/// How a backend's locks end when their holder goes quiet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locks {
    /// After `lock_ttl` unless extended (memory, Redis).
    Lapse,
    /// With the holder's session (PostgreSQL advisory locks).
    Session,
}

/// `Duration::MAX` for every duration is accepted (shortened to the crate's
/// `MAX_TTL`): no panic, no refused write; a "not kept" marker round-trips.
pub async fn the_longest_durations_are_accepted<B: Backend>(b: B) {
    let key = fresh_key();
    let lock = acquired(b.begin(&key, &fingerprint(1), Duration::MAX).await.unwrap());
    assert!(b.extend(&lock, Duration::MAX).await.unwrap());
    assert_eq!(
        b.complete(lock, record(fingerprint(1), b"forever"), Duration::MAX)
            .await
            .unwrap(),
        Completion::Saved
    );
    assert_eq!(
        completed(b.begin(&key, &fingerprint(1), LOCK_TTL).await.unwrap()).body,
        "forever"
    );
    let key = fresh_key();
    let lock = acquired(b.begin(&key, &fingerprint(2), LOCK_TTL).await.unwrap());
    let marker = Record::not_kept(StatusCode::ACCEPTED, fingerprint(2));
    b.complete(lock, marker, Duration::MAX).await.unwrap();
    let back = completed(b.begin(&key, &fingerprint(2), LOCK_TTL).await.unwrap());
    assert!(!back.kept);
    assert_eq!(back.status, StatusCode::ACCEPTED);
}

/// Every case, one after another, on one backend (for set-ups too costly to
/// repeat per test, such as a cluster started by the test itself).
pub async fn run_all<B: Backend>(b: B, locks: Locks) {
    begin_locks_a_free_key(b.clone()).await;
    complete_stores_and_unlocks(b.clone()).await;
    large_records_round_trip(b.clone()).await;
    release_frees_without_storing(b.clone()).await;
    keys_are_independent(b.clone()).await;
    extend_keeps_the_lock(b.clone()).await;
    records_expire(b.clone()).await;
    concurrent_begin_has_one_winner(b.clone()).await;
    the_longest_durations_are_accepted(b.clone()).await;
    fencing_tokens_grow_with_every_grant(b.clone()).await;
    match locks {
        Locks::Lapse => {
            busy_hint_is_within_the_lock_ttl(b.clone()).await;
            a_takeover_carries_a_larger_fence(b.clone()).await;
            lapsed_lock_is_lost(b.clone()).await;
            release_of_a_lost_lock_spares_the_new_holder(b).await;
        }
        Locks::Session => session_lock_outlives_its_ttl(b).await,
    }
}

/// Generates one `#[test]` per conformance case (the same lists as
/// [`run_all`]).
///
/// `backend_conformance!(#[tokio::test(start_paused = true)], MemoryBackend::new(), Lapse);`
#[macro_export]
macro_rules! backend_conformance {
    (#[$attr:meta], $make:expr, Lapse) => {
        $crate::backend_conformance!(@cases #[$attr], $make;
            busy_hint_is_within_the_lock_ttl,
            a_takeover_carries_a_larger_fence,
            lapsed_lock_is_lost,
            release_of_a_lost_lock_spares_the_new_holder,
        );
        $crate::backend_conformance!(@common #[$attr], $make);
    };
    (#[$attr:meta], $make:expr, Session) => {
        $crate::backend_conformance!(@cases #[$attr], $make; session_lock_outlives_its_ttl);
        $crate::backend_conformance!(@common #[$attr], $make);
    };
    (@common #[$attr:meta], $make:expr) => {
        $crate::backend_conformance!(@cases #[$attr], $make;
            begin_locks_a_free_key,
            complete_stores_and_unlocks,
            large_records_round_trip,
            release_frees_without_storing,
            keys_are_independent,
            extend_keeps_the_lock,
            records_expire,
            concurrent_begin_has_one_winner,
            the_longest_durations_are_accepted,
            fencing_tokens_grow_with_every_grant,
        );
    };
    (@cases #[$attr:meta], $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[$attr]
            async fn $case() {
                conformance::$case($make).await;
            }
        )*
    };
}
