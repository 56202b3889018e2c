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
//! [`Backend`] states the whole contract; the conformance suite (feature
//! `conformance`, `tower_idempotency::conformance`) checks it against any
//! backend with one call, and every backend of this crate runs it unchanged.

#[cfg(any(feature = "redis", feature = "postgres"))]
mod late;
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub mod memory;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod token;

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::{BoxError, FencingToken, Fingerprint, Record, StorageKey};

/// What [`Backend::begin`] found.
///
/// ```
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http::{HeaderMap, StatusCode};
/// use tower_idempotency::{Backend, Begin, Completion, Fingerprint, MemoryBackend, Record, StorageKey};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_idempotency::BackendError> {
/// let backend = MemoryBackend::new();
/// let key = StorageKey::from_bytes([1; 32]);
/// let fp = Fingerprint::from_bytes([2; 32]);
/// let ttl = Duration::from_secs(30);
/// match backend.begin(&key, &fp, ttl).await? {
///     Begin::Acquired(lock) => {
///         let record = Record::new(StatusCode::CREATED, HeaderMap::new(), Bytes::from("ok"), fp);
///         let saved = backend.complete(lock, record, Duration::from_hours(24)).await?;
///         assert_eq!(saved, Completion::Saved);
///     }
///     Begin::Completed(_) | Begin::Busy { .. } => unreachable!("the key is new"),
/// }
/// // The next `begin` finds the record.
/// assert!(matches!(backend.begin(&key, &fp, ttl).await?, Begin::Completed(r) if r.body == "ok"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
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
///
/// See [`Begin`] for `complete` in context.
///
/// ```
/// use tower_idempotency::Completion;
///
/// fn log(completion: Completion) -> &'static str {
///     match completion {
///         Completion::Saved => "stored",
///         Completion::Lost => "lock lost; nothing written",
///         Completion::NotKept => "a \"not kept\" marker stored",
///         Completion::Aborted => "the handler's transaction failed; nothing stored",
///     }
/// }
/// assert_eq!(log(Completion::Lost), "lock lost; nothing written");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The record is stored and the lock released.
    Saved,
    /// The lock had expired or was taken over; nothing was written, so a
    /// record made under a newer lock is never overwritten.
    Lost,
    /// The record is larger than this backend keeps (a memory shard's share
    /// of the byte bound, the codec's `max_record_size`): a
    /// [`Record::not_kept`] marker with its status was stored in its place,
    /// so a retry does not run the handler again. The lock is released.
    NotKept,
    /// The handler's own transaction failed (PostgreSQL's transaction mode:
    /// one of its statements failed, `25P02`, and it carried on without
    /// rolling back to a savepoint; or a deferred constraint of its writes
    /// failed at `COMMIT`). Nothing was stored,
    /// the handler's writes were rolled back, and the key is free. The layer
    /// passes a `4xx` the handler answered on to the client, and answers
    /// anything else with the
    /// [transaction aborted](crate::problem#transaction-aborted) problem:
    /// never a success whose writes did not happen.
    Aborted,
}

/// A storage backend for idempotency records and in-flight locks.
///
/// # The contract
///
/// A key is, at any moment, in one of three states: **free**, **held** by
/// one lock (until the lock's expiry), or **completed** with a record (until
/// the record's expiry). Every rule below is what the layer relies on for
/// "the handler runs once"; the crate's conformance suite checks them.
///
/// - **`begin` is atomic per key.** It looks the key up and, if it is free,
///   holds it, in one indivisible step: of any number of concurrent `begin`
///   calls on a free key (from any number of processes sharing the store)
///   exactly one returns [`Begin::Acquired`]; the others see
///   [`Begin::Busy`] (or the record, once stored). `Busy::retry_after` is at
///   most the time until the holder's lock expires; the layer sends it as
///   `Retry-After`.
/// - **Visibility.** A record stored by `complete` is returned by every
///   `begin` that starts after `complete` returned `Ok`, on every process.
/// - **Expiry.** A record is returned until its `ttl` has passed and never
///   after (the key is then free); a lock not extended expires `lock_ttl`
///   after `begin` (or after its last `extend`), and the key is then free
///   for the next `begin`. Durations up to [`MAX_TTL`](crate::MAX_TTL) must
///   be accepted (shorten longer ones to it), never refused.
/// - **Lapse.** `complete` stores only while its lock is still the key's
///   current, unexpired holder. A lock that expired makes `complete` return
///   [`Completion::Lost`] and write nothing, *even if nobody took the key
///   over*; `extend` of such a lock returns `Ok(false)`; `release` of it
///   does nothing and never touches a newer holder's lock.
/// - **Fencing.** [`fencing_token`](Self::fencing_token), if the backend
///   gives one, is larger than the token of every lock granted on the same
///   key before it — after a release, a lapse, or an expired record too.
/// - **Cancellation.** The future of every method may be dropped at any
///   `.await` (the client left, a timeout fired, the runtime shut down).
///   A dropped `begin` must not leave a lock nobody holds for longer than
///   its `lock_ttl` (better: release it at once, as the built-in backends
///   do); a dropped `complete` has stored the whole record or nothing, and
///   its lock is released or left to expire; a dropped `release` or
///   `extend` leaves the lock as it was or as asked. Nothing may be half
///   written.
/// - **Errors.** A method that fails returns a [`BackendError`] whose
///   [`kind`](BackendError::kind) decides the layer's answer (below). `begin`
///   must not fail after it has taken the key without releasing it (or
///   leaving it to expire); `complete` that fails must not have stored a
///   record it reports as not stored — if it cannot know, the layer treats
///   the outcome as unknown and never answers the client as if nothing was
///   done.
/// - **`extend`.** `Ok(true)`: the lock now expires `lock_ttl` from now.
///   `Ok(false)`: it was lost; the layer stops extending and will not store
///   (the handler's response still reaches its client). `Err`: the layer
///   logs it and tries again at the next heartbeat (every `lock_ttl / 3`),
///   so one failed extension does not lose the lock.
/// - **`abandon`** is called from `Drop`, outside any `.await`: it must not
///   block. It should free the key soon (the default spawns `release`); if
///   it cannot, the lock must still expire after `lock_ttl`.
///
/// What the layer answers for each error kind, on `begin` (on `complete`,
/// the handler has run: the client gets its response, and the key is
/// released or left to expire):
///
/// | [`BackendErrorKind`] | answer |
/// |---|---|
/// | `Unavailable`, `Timeout`, `Rejected`, `Misconfigured`, `Other` | `503` with `Retry-After` (or the handler unprotected with [`fail_open`](crate::IdempotencyLayer::fail_open)) |
/// | `Corrupt` | `500` ([stored response unreadable](crate::problem#stored-response-unreadable)); never runs the handler, not even fail-open |
/// | `Incompatible` | `503` ([stored response incompatible](crate::problem#stored-response-incompatible)); never runs the handler, not even fail-open |
///
/// [`Begin`] and [`Completion`] are exhaustive: they are the protocol
/// between a backend and the layer, so a new variant is a breaking change
/// (a major version), and a backend or wrapper that matches them is told by
/// the compiler about every case. [`BackendErrorKind`] stays
/// `#[non_exhaustive]`: a kind this crate does not know is answered like
/// `Other`.
///
/// A backend that wraps another one, here to count lookups; a backend of your
/// own (a different database, say) implements the same methods.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::time::Duration;
/// use tower_idempotency::{
///     Backend, BackendError, Begin, Completion, Fingerprint, IdempotencyLayer, Record, StorageKey,
/// };
///
/// #[derive(Clone)]
/// struct Counted<B> {
///     inner: B,
///     lookups: Arc<AtomicU64>,
/// }
///
/// impl<B: Backend> Backend for Counted<B> {
///     type Lock = B::Lock;
///
///     async fn begin(
///         &self,
///         key: &StorageKey,
///         fingerprint: &Fingerprint,
///         lock_ttl: Duration,
///     ) -> Result<Begin<B::Lock>, BackendError> {
///         self.lookups.fetch_add(1, Ordering::Relaxed);
///         self.inner.begin(key, fingerprint, lock_ttl).await
///     }
///
///     async fn complete(&self, lock: B::Lock, record: Record, ttl: Duration) -> Result<Completion, BackendError> {
///         self.inner.complete(lock, record, ttl).await
///     }
///
///     async fn release(&self, lock: B::Lock) -> Result<(), BackendError> {
///         self.inner.release(lock).await
///     }
///
///     async fn extend(&self, lock: &B::Lock, lock_ttl: Duration) -> Result<bool, BackendError> {
///         self.inner.extend(lock, lock_ttl).await
///     }
///
///     fn abandon(&self, lock: B::Lock) {
///         self.inner.abandon(lock);
///     }
///
///     fn prepare_request(&self, lock: &B::Lock, extensions: &mut http::Extensions) {
///         self.inner.prepare_request(lock, extensions);
///     }
///
///     fn fencing_token(&self, lock: &B::Lock) -> Option<tower_idempotency::FencingToken> {
///         self.inner.fencing_token(lock)
///     }
///
///     fn commits_handler_effects(&self) -> bool {
///         self.inner.commits_handler_effects()
///     }
/// }
///
/// let backend = Counted { inner: tower_idempotency::MemoryBackend::new(), lookups: Arc::default() };
/// let layer = IdempotencyLayer::new(backend);
/// # let _ = layer;
/// ```
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
    ///
    /// A record too large for the backend must not make the handler run
    /// again on a retry: store [`Record::not_kept`] with its status and
    /// fingerprint instead and answer [`Completion::NotKept`].
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

    /// Lends the handler what it needs from the lock, through the request's
    /// extensions, just before the handler is called: PostgreSQL's
    /// transaction mode puts the
    /// [`RequestTransaction`](crate::RequestTransaction) there. The default
    /// lends nothing. A backend that wraps another must forward this.
    #[allow(unused_variables)]
    fn prepare_request(&self, lock: &Self::Lock, extensions: &mut http::Extensions) {}

    /// The lock's [`FencingToken`]: larger than the token of every lock
    /// granted on the same key before it. The layer puts it into the
    /// request's extensions for the handler to fence its own writes with.
    /// The default gives none. A backend that wraps another must forward
    /// this.
    #[allow(unused_variables)]
    fn fencing_token(&self, lock: &Self::Lock) -> Option<FencingToken> {
        None
    }

    /// Whether `complete` commits the handler's own effects together with
    /// the record (PostgreSQL's transaction mode). Then a `complete` that
    /// fails or finds its lock lost means those effects were undone, and the
    /// layer answers `503` instead of the handler's response; responses are
    /// buffered, not streamed, until they are committed. The default is
    /// `false`. A backend that wraps another must forward this.
    fn commits_handler_effects(&self) -> bool {
        false
    }

    /// Releases a lock from a synchronous context: the layer calls this when
    /// the task that holds the key is dropped before it could complete or
    /// release it — the handler panicked, or the runtime is shutting down.
    ///
    /// It must not block. The default spawns [`Backend::release`] on the
    /// current Tokio runtime, as a task that a graceful shutdown
    /// ([`ShutdownHandle`](crate::ShutdownHandle)) waits for; outside a
    /// runtime the lock is left to expire.
    fn abandon(&self, lock: Self::Lock) {
        let backend = self.clone();
        crate::shutdown::spawn(async move {
            if let Err(error) = backend.release(lock).await {
                tracing::warn!(%error, "releasing an abandoned idempotency lock failed");
            }
        });
    }
}

/// What kind of failure a [`BackendError`] is, for matching without parsing
/// messages.
///
/// ```
/// use tower_idempotency::{BackendError, BackendErrorKind};
///
/// fn worth_retrying(error: &BackendError) -> bool {
///     matches!(error.kind(), BackendErrorKind::Unavailable | BackendErrorKind::Timeout)
/// }
/// assert!(worth_retrying(&BackendError::new(BackendErrorKind::Timeout, "no answer in 2 s")));
/// assert!(!worth_retrying(&BackendError::new(BackendErrorKind::Corrupt, "bad checksum")));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The backend could not be reached (connection refused or lost).
    Unavailable,
    /// The backend did not answer in time.
    Timeout,
    /// The backend refused the write (for example Redis out of memory).
    Rejected,
    /// Stored data could not be decoded: altered, truncated, or not a
    /// record at all. The layer answers `500` (the request was processed;
    /// its response is unreadable) and never runs the handler again.
    Corrupt,
    /// Stored data was written by another version or configuration of this
    /// crate that this instance cannot read (a newer format during a
    /// rollback, a record larger than this instance's `max_record_size`).
    /// The layer answers `503`: another instance may read it.
    Incompatible,
    /// The backend is misconfigured (for example a missing table).
    Misconfigured,
    /// Anything else.
    Other,
}

/// A backend failure. The layer answers `503 Service Unavailable` (or runs
/// the handler unprotected with
/// [`fail_open`](crate::IdempotencyLayer::fail_open)).
///
/// ```
/// use std::error::Error;
/// use tower_idempotency::{BackendError, BackendErrorKind};
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// let error = BackendError::new(BackendErrorKind::Unavailable, "cannot reach the store").with_source(io);
/// assert_eq!(error.kind(), BackendErrorKind::Unavailable);
/// assert!(error.to_string().contains("cannot reach the store"));
/// assert!(error.source().is_some());
/// ```
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
        use crate::CodecError;
        match error {
            CodecError::UnsupportedVersion(_)
            | CodecError::UnknownFlags(_)
            | CodecError::TooLarge { .. } => Self::new(
                BackendErrorKind::Incompatible,
                format!("stored record cannot be read by this instance: {error}"),
            ),
            _ => Self::new(
                BackendErrorKind::Corrupt,
                format!("stored record is corrupt: {error}"),
            ),
        }
        .with_source(error)
    }
}
