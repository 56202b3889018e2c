//! Waiting for a request in flight instead of answering `409`
//! ([`wait_for_in_flight`](crate::IdempotencyLayer::wait_for_in_flight)).
//!
//! The duplicates of one key that wait in one process share a *room*. One
//! of them at a time polls the backend for the key — with the same `begin`
//! the request would make, so the poll can find the stored response, find
//! the key free (the holder released it without storing, or died) and take
//! it, or find it still busy — and shares what it found: a stored record
//! goes to every waiter of the room, and the poll's schedule is the room's,
//! not each waiter's. Between polls the waiters sleep without a backend
//! connection. When the holder runs in this same process (the same layer),
//! its store or release wakes the room at once and the next poll happens
//! immediately.
//!
//! The poll interval starts at 25 ms and grows by half each time up to
//! 500 ms, with ±25 % jitter so that instances polling the same key spread
//! out. The backend therefore sees at most one `begin` per interval per key
//! per instance, however many requests wait.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::{Backend, Begin};
use crate::observe;
use crate::{Fingerprint, Record, StorageKey};

/// The first poll interval.
const FIRST_POLL: Duration = Duration::from_millis(25);
/// The longest poll interval.
const LONGEST_POLL: Duration = Duration::from_millis(500);

/// The waiting rooms of one layer, by storage key.
#[derive(Debug)]
pub(crate) struct Waiting {
    /// How long a duplicate waits at most.
    pub(crate) max: Duration,
    /// Each room with the number of waiters seated in it.
    rooms: Mutex<HashMap<StorageKey, (Arc<Room>, usize)>>,
}

/// The duplicates of one key waiting in this process.
#[derive(Debug, Default)]
struct Room {
    state: Mutex<RoomState>,
    changed: Notify,
}

#[derive(Debug)]
struct RoomState {
    /// Whether a waiter holds the poller's role.
    polling: bool,
    /// When the poller polls next.
    next_poll: Instant,
    interval: Duration,
    /// What a poll found stored, for every waiter of the room.
    record: Option<Record>,
    /// When the holder's lock runs out, as the last poll saw it.
    busy_until: Instant,
    /// How often a holder in this process settled the key: one that did
    /// during a poll makes the next poll happen at once.
    settles: u64,
}

impl Default for RoomState {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            polling: false,
            next_poll: now + jittered(FIRST_POLL),
            interval: FIRST_POLL,
            record: None,
            busy_until: now,
            settles: 0,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing below panics while holding the lock; a poisoned one still
    // holds consistent state.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `interval` ±25 %.
fn jittered(interval: Duration) -> Duration {
    let random = RandomState::new().hash_one(0_u8);
    // 0..=50, as a per cent of the interval, then shifted by -25.
    let per_cent = u32::try_from(random % 51).unwrap_or(25);
    interval * (75 + per_cent) / 100
}

/// A waiter's place in its room; leaving the last place closes the room.
struct Seat<'a> {
    waiting: &'a Waiting,
    key: StorageKey,
    room: Arc<Room>,
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        let mut rooms = lock(&self.waiting.rooms);
        if let Some((_, seated)) = rooms.get_mut(&self.key) {
            *seated -= 1;
            if *seated == 0 {
                rooms.remove(&self.key);
            }
        }
    }
}

/// The poller's role, given back (and the room told) when it is dropped:
/// also when the waiter that holds it is cancelled mid-poll, so that
/// another waiter takes over.
struct Role<'a>(&'a Room);

impl Drop for Role<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).polling = false;
        self.0.changed.notify_waiters();
    }
}

enum Next {
    Poll,
    Sleep(Instant),
}

impl Waiting {
    pub(crate) fn new(max: Duration) -> Self {
        Self {
            max,
            rooms: Mutex::default(),
        }
    }

    fn enter(&self, key: &StorageKey) -> Seat<'_> {
        let mut rooms = lock(&self.rooms);
        let (room, seated) = rooms.entry(*key).or_default();
        *seated += 1;
        let room = Arc::clone(room);
        drop(rooms);
        Seat {
            waiting: self,
            key: *key,
            room,
        }
    }

    /// The holder of `key` in this process stored or released it: the
    /// room's next poll happens now.
    pub(crate) fn settled(&self, key: &StorageKey) {
        let Some(room) = lock(&self.rooms).get(key).map(|(room, _)| Arc::clone(room)) else {
            return;
        };
        {
            let mut state = lock(&room.state);
            state.next_poll = Instant::now();
            state.interval = FIRST_POLL;
            state.settles += 1;
        }
        room.changed.notify_waiters();
    }

    /// Waits for `key`, busy with another request until `busy_for`, to be
    /// stored or freed, up to [`max`](Self::max) or until `stop` resolves.
    /// Answers what the last look found: `Completed` (shared by the room),
    /// `Acquired` (this request now holds the key), or `Busy` (the bound
    /// was reached, or a shutdown started). A poll that fails counts as
    /// busy: the wait goes on.
    pub(crate) async fn wait<B: Backend>(
        &self,
        backend: &B,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
        busy_for: Duration,
        stop: impl Future<Output = ()>,
    ) -> Begin<B::Lock> {
        let started = Instant::now();
        let deadline = started + self.max;
        let seat = self.enter(key);
        let room = &*seat.room;
        {
            let mut state = lock(&room.state);
            state.busy_until = state.busy_until.max(started + busy_for);
        }
        let mut stop = std::pin::pin!(stop);
        let mut role = None;
        loop {
            let changed = room.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let next = {
                let mut state = lock(&room.state);
                if let Some(record) = &state.record {
                    observe::wait("replayed");
                    return Begin::Completed(record.clone());
                }
                let now = Instant::now();
                if now >= deadline {
                    observe::wait("exhausted");
                    return Begin::Busy {
                        retry_after: state.busy_until.saturating_duration_since(now),
                    };
                }
                if role.is_none() && !state.polling {
                    state.polling = true;
                    role = Some(Role(room));
                }
                match role {
                    Some(_) if now >= state.next_poll => Next::Poll,
                    Some(_) => Next::Sleep(state.next_poll.min(deadline)),
                    None => Next::Sleep(deadline),
                }
            };
            match next {
                Next::Sleep(until) => {
                    tokio::select! {
                        () = &mut changed => {}
                        () = tokio::time::sleep_until(until) => {}
                        () = &mut stop => {
                            observe::wait("exhausted");
                            let state = lock(&room.state);
                            return Begin::Busy {
                                retry_after: state.busy_until.saturating_duration_since(Instant::now()),
                            };
                        }
                    }
                }
                Next::Poll => {
                    let settles = lock(&room.state).settles;
                    let polled =
                        observe::backend("begin", backend.begin(key, fingerprint, lock_ttl));
                    // A slow poll ends with the wait; the backend releases
                    // what a dropped `begin` may have taken.
                    let found = tokio::time::timeout_at(deadline, polled).await;
                    let now = Instant::now();
                    let mut state = lock(&room.state);
                    let busy_for = match found {
                        Ok(Ok(Begin::Busy { retry_after })) => Some(retry_after),
                        Ok(Ok(Begin::Completed(record))) => {
                            observe::wait("replayed");
                            state.record = Some(record.clone());
                            drop(state);
                            drop(role);
                            return Begin::Completed(record);
                        }
                        Ok(Ok(Begin::Acquired(lock))) => {
                            observe::wait("acquired");
                            // The others wait for this request now; it wakes
                            // them when it settles.
                            state.interval = FIRST_POLL;
                            state.next_poll = now + LONGEST_POLL;
                            drop(state);
                            drop(role);
                            return Begin::Acquired(lock);
                        }
                        // The key was busy a moment ago: a poll that failed
                        // (or timed out) changes nothing about that, and is
                        // never a reason to run the handler (not even with
                        // fail-open). The wait goes on, backing off.
                        Ok(Err(error)) => {
                            tracing::debug!(%error, "polling a key in flight failed; still waiting");
                            None
                        }
                        Err(_) => None,
                    };
                    if let Some(busy_for) = busy_for {
                        state.busy_until = now + busy_for;
                    }
                    state.interval = (state.interval * 3 / 2).min(LONGEST_POLL);
                    state.next_poll = if state.settles == settles {
                        now + jittered(state.interval)
                    } else {
                        now
                    };
                }
            }
        }
    }
}
