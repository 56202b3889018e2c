//! The storage contract behind the layer, and the backends that implement it.
//!
//! A [`Backend`] does four things, each safe under concurrency:
//!
//! 1. [`begin`](Backend::begin): look the key up and, if nothing is stored and
//!    nobody holds it, lock it, in one atomic step (one round trip for remote
//!    backends).
//! 2. [`complete`](Backend::complete): store the record *only while still
//!    holding the lock*, then unlock.
//! 3. [`release`](Backend::release): unlock without storing.
//! 4. [`extend`](Backend::extend): push the lock's expiry further out (the
//!    layer's heartbeat while a slow handler runs).
//!
//! The crate's own conformance suite (`tests/conformance/`) checks those
//! semantics and runs unchanged against every backend.

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub mod memory;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::{BoxError, Fingerprint, Record, StorageKey};

/// What [`Backend::begin`] found.
#[derive(Debug)]
#[non_exhaustive]
pub enum Begin<L> {
    /// Nothing was stored and nobody held the key: the caller now holds it
    /// and must pass the lock to [`Backend::complete`] or [`Backend::release`].
    Acquired(L),
    /// A response is stored for the key. The layer replays it if the
    /// fingerprints match, and answers `422` if they do not.
    Completed(Record),
    /// Another request holds the key.
    Busy {
        /// How long until the holder's lock expires at the latest.
        retry_after: Duration,
    },
}

/// What [`Backend::complete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Completion {
    /// The record is stored and the lock released.
    Saved,
    /// The lock had expired or was taken over; nothing was written, so a
    /// record made under a newer lock is never overwritten.
    Lost,
}

/// A storage backend for idempotency records and in-flight locks.
///
/// Implementations must make `begin` atomic per key: of many concurrent
/// `begin` calls on a free key, exactly one returns [`Begin::Acquired`].
/// A record stored by `complete` must be visible to every `begin` that starts
/// after `complete` returned, and `complete` must store only while the lock
/// it is given is still the current holder of the key.
pub trait Backend: Clone + Send + Sync + 'static {
    /// Proof of holding a key, handed back to `complete`, `release` and
    /// `extend`.
    type Lock: Send + Sync + 'static;

    /// Looks the key up and, when nothing is stored and the key is free,
    /// locks it for `lock_ttl`.
    fn begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<Begin<Self::Lock>, BackendError>> + Send;

    /// Stores `record` for `ttl` if `lock` still holds its key, then unlocks.
    fn complete(
        &self,
        lock: Self::Lock,
        record: Record,
        ttl: Duration,
    ) -> impl Future<Output = Result<Completion, BackendError>> + Send;

    /// Unlocks without storing anything. Releasing a lock that was lost is
    /// not an error and never touches the newer holder's lock.
    fn release(&self, lock: Self::Lock) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Extends the lock to expire `lock_ttl` from now. `Ok(false)` means the
    /// lock was lost (expired or taken over).
    fn extend(
        &self,
        lock: &Self::Lock,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Releases a lock from a synchronous context: the layer calls this when
    /// its response future is dropped (client gone, timeout layer) or the
    /// handler panicked while the key was held.
    ///
    /// It must not block. The default spawns [`Backend::release`] on the
    /// current Tokio runtime; outside a runtime the lock is left to expire.
    fn abandon(&self, lock: Self::Lock) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let backend = self.clone();
            handle.spawn(async move {
                if let Err(error) = backend.release(lock).await {
                    tracing::warn!(%error, "releasing an abandoned idempotency lock failed");
                }
            });
        }
    }
}

/// What kind of failure a [`BackendError`] is, for matching without parsing
/// messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The backend could not be reached (connection refused or lost).
    Unavailable,
    /// The backend did not answer in time.
    Timeout,
    /// The backend refused the write (for example Redis out of memory).
    Rejected,
    /// Stored data could not be decoded.
    Corrupt,
    /// The backend is misconfigured (for example a missing table).
    Misconfigured,
    /// Anything else.
    Other,
}

/// A backend failure. The layer answers `503 Service Unavailable` (or runs
/// the handler unprotected with
/// [`fail_open`](crate::IdempotencyLayer::fail_open)).
#[derive(Debug)]
pub struct BackendError {
    kind: BackendErrorKind,
    message: String,
    source: Option<BoxError>,
}

impl BackendError {
    /// A new error of `kind` with a human-readable message.
    #[must_use]
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What kind of failure this is.
    #[must_use]
    pub const fn kind(&self) -> BackendErrorKind {
        self.kind
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "idempotency backend error ({:?}): {}",
            self.kind, self.message
        )
    }
}

impl StdError for BackendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl From<crate::CodecError> for BackendError {
    fn from(error: crate::CodecError) -> Self {
        Self::new(BackendErrorKind::Corrupt, "stored record is corrupt").with_source(error)
    }
}
