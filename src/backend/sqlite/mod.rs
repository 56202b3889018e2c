//! The SQLite backend (feature `sqlite`): records and leases in one file,
//! for a service on one host that must not forget across restarts — without
//! running Redis or PostgreSQL for it.
//!
//! ```no_run
//! use tower_idempotency::{IdempotencyLayer, SqliteBackend};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = SqliteBackend::open("idempotency.sqlite3").await?;
//! let layer = IdempotencyLayer::new(backend);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! It is written against this crate's public API only, as a backend of
//! your own would be: the [`Backend`] contract and [`RecordCodec`], checked
//! by the published conformance suite (feature `conformance`).
//!
//! # What it keeps, and how
//!
//! - One table, `idempotency_records`: a row is a **record** (its encoded
//!   response) or a **lease** (a token and an expiry), keyed by the storage
//!   key, as in the PostgreSQL backend's lease mode. A second table holds
//!   the counter that lease tokens and [fencing tokens](crate::fence) are
//!   drawn from (one number, growing with every lock granted).
//! - The file is opened in WAL mode: readers do not wait for the writer.
//!   A replay is one read; a fresh request is one read, one write
//!   transaction (`BEGIN IMMEDIATE`: look again, draw the token, write the
//!   lease) and one write to store the record.
//! - **Several processes on one host** can share the file: SQLite's file
//!   locks make each write transaction atomic across processes, and a
//!   writer that finds the file locked waits up to the
//!   [`busy_timeout`](SqliteBackendBuilder::busy_timeout) (5 s by default),
//!   then fails with [`BackendErrorKind::Timeout`] (`503`). Do not put the
//!   file on a network file system: SQLite's locks are not reliable there.
//! - **Durable by default**: `synchronous = FULL`, so a stored record
//!   survives a crash of the process *and* of the machine. With
//!   [`relaxed_durability`](SqliteBackendBuilder::relaxed_durability)
//!   (`synchronous = NORMAL`), a record survives the process crashing but
//!   the last ones may be lost with the machine (power loss): a retry then
//!   runs again.
//! - Each call runs on one of a few pooled connections in a blocking task
//!   (`spawn_blocking`), never on the async workers.
//! - A process killed mid-handler leaves its lease, which lapses after
//!   `lock_ttl`: the key is free again, never stuck. A `begin` whose future
//!   is dropped while its statement runs releases the lease it took.
//! - Expired rows are never answered; [`purge_expired`](SqliteBackend::purge_expired)
//!   deletes them (call it periodically, as the example does).
//!
//! # Failures
//!
//! A file that is not a database or is corrupt, that cannot be opened or
//! written (permissions, a read-only file system) is
//! [`BackendErrorKind::Misconfigured`]; a file locked longer than the busy
//! timeout is [`BackendErrorKind::Timeout`]; a full disk is
//! [`BackendErrorKind::Rejected`]. The layer answers each with `503`, and
//! the message names the file. A stored record that does not decode is
//! [`BackendErrorKind::Corrupt`] (`500`, never run again), as on every
//! backend. Nothing here panics on what the file holds.

mod sql;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::ffi::ErrorCode;
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

// Only what the crate exports: this backend is built the way a backend in
// another crate would be.
use crate as tower_idempotency;
use tower_idempotency::{
    Backend, BackendError, BackendErrorKind, Begin, CodecError, Completion, FencingToken,
    Fingerprint, MAX_TTL, Record, RecordCodec, StorageKey,
};

use sql::Found;

/// A [`Backend`] in a SQLite file. See the [module documentation](self).
#[derive(Clone)]
pub struct SqliteBackend {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    codec: RecordCodec,
    busy_timeout: Duration,
    synchronous: &'static str,
    max_connections: usize,
    /// Idle connections, at most `max_connections`.
    idle: Mutex<Vec<Connection>>,
    /// Bounds the connections in use to `max_connections`. A permit is
    /// held by the blocking task, so a cancelled call keeps it until its
    /// statement ends.
    permits: Arc<Semaphore>,
    /// One write at a time from this process: SQLite runs one anyway, and
    /// writers queued here do not spin in its busy handler (which sleeps
    /// up to tens of milliseconds between tries). Held by the blocking
    /// task, like a permit; waited for at most the busy timeout. Other
    /// processes' writes still meet SQLite's busy timeout.
    writer: Arc<tokio::sync::Mutex<()>>,
}

/// Which calls queue behind this process's writer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Queue {
    /// Writes that may wait their turn.
    Writer,
    /// Reads, and the heartbeat's `extend` (it must not wait behind a
    /// queue of stores until its lock lapses).
    Direct,
}

/// What a blocking task holds until its statement ends.
struct Slots {
    _permit: OwnedSemaphorePermit,
    _writing: Option<OwnedMutexGuard<()>>,
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.inner.path)
            .field("busy_timeout", &self.inner.busy_timeout)
            .field("synchronous", &self.inner.synchronous)
            .field("max_connections", &self.inner.max_connections)
            .finish_non_exhaustive()
    }
}

/// Proof of holding a key in a [`SqliteBackend`]: the key and the lease's
/// token (also its [`FencingToken`]).
#[derive(Debug)]
pub struct SqliteLock {
    key: StorageKey,
    token: i64,
}

/// Builds a [`SqliteBackend`].
///
/// ```no_run
/// use std::time::Duration;
/// use tower_idempotency::SqliteBackend;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = SqliteBackend::builder("/var/lib/payments/idempotency.sqlite3")
///     .busy_timeout(Duration::from_secs(2))
///     .max_connections(8)
///     .open()
///     .await?;
/// # let _ = backend;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct SqliteBackendBuilder {
    path: PathBuf,
    codec: RecordCodec,
    busy_timeout: Duration,
    relaxed: bool,
    max_connections: usize,
}

impl SqliteBackendBuilder {
    /// How long a call waits for a file another connection or process has
    /// locked, before it fails with [`BackendErrorKind::Timeout`] (default
    /// 5 seconds).
    pub const fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How many connections (and blocking tasks) run calls at once
    /// (default 4, at least 1). SQLite runs one write at a time per file;
    /// more connections let reads (replays) run beside it.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// `synchronous = NORMAL` instead of `FULL`: fewer disk flushes per
    /// write; a record then survives the process crashing, but not
    /// necessarily the machine losing power.
    pub const fn relaxed_durability(mut self) -> Self {
        self.relaxed = true;
        self
    }

    /// How records are encoded (default [`RecordCodec::new`]).
    pub const fn codec(mut self, codec: RecordCodec) -> Self {
        self.codec = codec;
        self
    }

    /// Opens (or creates) the file, switches it to WAL mode and creates the
    /// tables it lacks.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::Misconfigured`] for a file that cannot be opened
    /// or created, is not a database, or is corrupt; another
    /// [`BackendError`] as for every call.
    pub async fn open(self) -> Result<SqliteBackend, BackendError> {
        let name = self.path.as_os_str();
        if name.is_empty()
            || name == ":memory:"
            || name.to_string_lossy().starts_with("file::memory:")
        {
            // Each pooled connection would get a database of its own.
            return Err(BackendError::new(
                BackendErrorKind::Misconfigured,
                "an in-memory SQLite database is private to one connection; give a file path",
            ));
        }
        let backend = SqliteBackend {
            inner: Arc::new(Inner {
                synchronous: if self.relaxed { "NORMAL" } else { "FULL" },
                permits: Arc::new(Semaphore::new(self.max_connections)),
                path: self.path,
                codec: self.codec,
                busy_timeout: self.busy_timeout,
                max_connections: self.max_connections,
                idle: Mutex::default(),
                writer: Arc::new(tokio::sync::Mutex::new(())),
            }),
        };
        backend
            .call(Queue::Writer, |conn| conn.execute_batch(sql::SCHEMA))
            .await?;
        Ok(backend)
    }
}

impl SqliteBackend {
    /// [`builder`](Self::builder)`(path).open()`: the defaults.
    ///
    /// # Errors
    ///
    /// As [`SqliteBackendBuilder::open`].
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, BackendError> {
        Self::builder(path).open().await
    }

    /// A builder for the file at `path`.
    pub fn builder(path: impl AsRef<Path>) -> SqliteBackendBuilder {
        SqliteBackendBuilder {
            path: path.as_ref().to_path_buf(),
            codec: RecordCodec::new(),
            busy_timeout: Duration::from_secs(5),
            relaxed: false,
            max_connections: 4,
        }
    }

    /// Deletes up to `limit` expired records and lapsed leases; how many it
    /// deleted. Expired rows are never answered, so this only frees space:
    /// call it periodically.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] as for every call.
    pub async fn purge_expired(&self, limit: usize) -> Result<u64, BackendError> {
        self.call(Queue::Writer, move |conn| sql::purge(conn, limit))
            .await
    }

    /// Deletes the record stored for `key` (not a lease in flight), so the
    /// next request with that key runs the handler; whether there was one.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] as for every call.
    pub async fn forget(&self, key: &StorageKey) -> Result<bool, BackendError> {
        let key = *key;
        self.call(Queue::Writer, move |conn| sql::forget(conn, key.as_bytes()))
            .await
    }

    /// A connection for one call: an idle one, or a new one.
    fn connect(inner: &Inner) -> rusqlite::Result<Connection> {
        if let Some(conn) = inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
        {
            return Ok(conn);
        }
        let conn = Connection::open(&inner.path)?;
        conn.busy_timeout(inner.busy_timeout)?;
        // WAL is a property of the file: set once, kept by every opener.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %inner.path.display(), mode, "SQLite file not in WAL mode");
        }
        conn.pragma_update(None, "synchronous", inner.synchronous)?;
        Ok(conn)
    }

    /// The slots a call on `queue` needs: this process's writer turn (for
    /// at most the busy timeout) and a connection permit.
    async fn slots(&self, queue: Queue) -> Result<Slots, BackendError> {
        let writing = match queue {
            Queue::Direct => None,
            Queue::Writer => {
                let turn = Arc::clone(&self.inner.writer).lock_owned();
                Some(
                    tokio::time::timeout(self.inner.busy_timeout, turn)
                        .await
                        .map_err(|_| {
                            BackendError::new(
                                BackendErrorKind::Timeout,
                                format!(
                                    "SQLite file {}: this process's writes queued past the busy timeout",
                                    self.inner.path.display()
                                ),
                            )
                        })?,
                )
            }
        };
        let permit = Arc::clone(&self.inner.permits)
            .acquire_owned()
            .await
            .map_err(|_| BackendError::new(BackendErrorKind::Other, "backend closed"))?;
        Ok(Slots {
            _permit: permit,
            _writing: writing,
        })
    }

    /// Runs `work` on a pooled connection in a blocking task that holds
    /// `slots` until it ends.
    fn blocking<T, F>(
        inner: Arc<Inner>,
        slots: Slots,
        work: F,
    ) -> tokio::task::JoinHandle<Result<T, BackendError>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        tokio::task::spawn_blocking(move || {
            let _slots = slots;
            let mut conn = Self::connect(&inner).map_err(|e| map_error(&inner.path, e))?;
            let done = work(&mut conn).map_err(|e| map_error(&inner.path, e));
            // A connection that failed, or is left inside a transaction, is
            // closed, not reused.
            if done.is_ok() && conn.is_autocommit() {
                let mut idle = inner.idle.lock().unwrap_or_else(PoisonError::into_inner);
                if idle.len() < inner.max_connections {
                    idle.push(conn);
                }
            }
            done
        })
    }

    /// Runs `work` on a pooled connection in a blocking task.
    async fn call<T, F>(&self, queue: Queue, work: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let slots = self.slots(queue).await?;
        Self::blocking(Arc::clone(&self.inner), slots, work)
            .await
            .map_err(panicked)?
    }

    /// Takes a free key in a write transaction. If the caller is gone by
    /// the time the lease is written (its future dropped while the
    /// statement ran), the lease is given back at once: by the task itself,
    /// or from the dropped future through [`Backend::abandon`].
    async fn take(
        &self,
        key: &StorageKey,
        fp: [u8; 32],
        lock_ttl: Duration,
    ) -> Result<Found, BackendError> {
        let slots = self.slots(Queue::Writer).await?;
        let key_bytes = *key.as_bytes();
        let claim = Arc::new(Mutex::new(Claim::Waiting));
        let task = {
            let claim = Arc::clone(&claim);
            Self::blocking(Arc::clone(&self.inner), slots, move |conn| {
                let found = sql::take(conn, &key_bytes, &fp, lock_ttl)?;
                if let Found::Acquired(token) = found {
                    let mut claim = claim.lock().unwrap_or_else(PoisonError::into_inner);
                    if *claim == Claim::Gone {
                        sql::release(conn, &key_bytes, token)?;
                    } else {
                        *claim = Claim::Taken(token);
                    }
                }
                Ok(found)
            })
        };
        let mut unclaimed = Unclaimed {
            backend: Some(self.clone()),
            claim,
            key: *key,
        };
        let found = task.await.map_err(panicked)?;
        unclaimed.backend = None;
        found
    }

    fn decode(&self, blob: &[u8]) -> Result<Record, BackendError> {
        self.inner.codec.decode(blob).map_err(BackendError::from)
    }
}

/// A duration for the file: at most [`MAX_TTL`].
fn bounded(d: Duration) -> Duration {
    d.min(MAX_TTL)
}

fn map_error(path: &Path, error: rusqlite::Error) -> BackendError {
    let file = path.display();
    let (kind, what) = match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => (
            BackendErrorKind::Timeout,
            "is locked by another connection or process (past the busy timeout)",
        ),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => (
            BackendErrorKind::Misconfigured,
            "is not a database, or is corrupt",
        ),
        Some(
            ErrorCode::CannotOpen
            | ErrorCode::PermissionDenied
            | ErrorCode::ReadOnly
            | ErrorCode::NoLargeFileSupport,
        ) => (
            BackendErrorKind::Misconfigured,
            "cannot be opened or written",
        ),
        Some(ErrorCode::DiskFull) => (BackendErrorKind::Rejected, "is on a full disk"),
        Some(ErrorCode::SystemIoFailure) => {
            (BackendErrorKind::Unavailable, "failed to read or write")
        }
        _ => (BackendErrorKind::Other, "failed a statement"),
    };
    BackendError::new(kind, format!("SQLite file {file} {what}: {error}")).with_source(error)
}

/// Whether a `take` still has a caller to hand its lease to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// The statement runs; the caller waits.
    Waiting,
    /// The caller is gone: the task gives a lease back itself.
    Gone,
    /// The lease is written, under this token.
    Taken(i64),
}

/// Gives back the lease of a `take` whose caller is gone (the `begin`
/// future was dropped while the statement ran), unless disarmed.
struct Unclaimed {
    backend: Option<SqliteBackend>,
    claim: Arc<Mutex<Claim>>,
    key: StorageKey,
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        let Some(backend) = self.backend.take() else {
            return;
        };
        let mut claim = self.claim.lock().unwrap_or_else(PoisonError::into_inner);
        match *claim {
            // Released here, while the dropped request is still being
            // dropped: a graceful shutdown counts the release it spawns.
            Claim::Taken(token) => backend.abandon(SqliteLock {
                key: self.key,
                token,
            }),
            Claim::Waiting => *claim = Claim::Gone,
            Claim::Gone => {}
        }
    }
}

fn panicked(error: tokio::task::JoinError) -> BackendError {
    BackendError::new(BackendErrorKind::Other, "a SQLite call panicked").with_source(error)
}

impl Backend for SqliteBackend {
    type Lock = SqliteLock;

    async fn begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin<SqliteLock>, BackendError> {
        let (key_bytes, fp) = (*key.as_bytes(), *fingerprint.as_bytes());
        // A replay, or a key in flight: one read, beside the writer.
        let peeked = self
            .call(Queue::Direct, move |conn| sql::peek(conn, &key_bytes))
            .await?;
        let found = match peeked {
            Some(found) => found,
            None => self.take(key, fp, bounded(lock_ttl)).await?,
        };
        Ok(match found {
            Found::Record(blob) => Begin::Completed(self.decode(&blob)?),
            Found::Busy(expires_at) => Begin::Busy {
                retry_after: Duration::from_millis(
                    u64::try_from(expires_at.saturating_sub(sql::now_ms())).unwrap_or(0),
                )
                .max(Duration::from_millis(1)),
            },
            Found::Acquired(token) => Begin::Acquired(SqliteLock { key: *key, token }),
        })
    }

    async fn complete(
        &self,
        lock: SqliteLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        let (blob, completion) = match self.inner.codec.encode(&record) {
            Err(CodecError::TooLarge { max }) => {
                tracing::warn!(
                    max,
                    "record larger than the codec's max_record_size; keeping a not-kept marker"
                );
                let marker = Record::not_kept(record.status, record.fingerprint);
                (self.inner.codec.encode(&marker)?, Completion::NotKept)
            }
            other => (other?, Completion::Saved),
        };
        let (key, token, fp) = (
            *lock.key.as_bytes(),
            lock.token,
            *record.fingerprint.as_bytes(),
        );
        let ttl = bounded(ttl);
        let stored = self
            .call(Queue::Writer, move |conn| {
                sql::complete(conn, &key, token, &fp, &blob, ttl)
            })
            .await?;
        Ok(if stored { completion } else { Completion::Lost })
    }

    async fn release(&self, lock: SqliteLock) -> Result<(), BackendError> {
        let (key, token) = (*lock.key.as_bytes(), lock.token);
        self.call(Queue::Writer, move |conn| sql::release(conn, &key, token))
            .await
    }

    async fn extend(&self, lock: &SqliteLock, lock_ttl: Duration) -> Result<bool, BackendError> {
        let (key, token, lock_ttl) = (*lock.key.as_bytes(), lock.token, bounded(lock_ttl));
        self.call(Queue::Direct, move |conn| {
            sql::extend(conn, &key, token, lock_ttl)
        })
        .await
    }

    /// The lease's token: drawn from the file's counter, which grows with
    /// every lock granted on any key.
    fn fencing_token(&self, lock: &SqliteLock) -> Option<FencingToken> {
        u64::try_from(lock.token).ok().map(FencingToken::new)
    }
}

#[cfg(test)]
mod tests {
    /// The backend uses what any crate could: no `crate::` path but the
    /// alias of the public root, no `pub(crate)` item, no sibling module.
    #[test]
    fn only_the_public_api_is_used() {
        for source in [include_str!("mod.rs"), include_str!("sql.rs")] {
            let code = source.split("#[cfg(test)]").next().unwrap_or(source);
            for (n, line) in code.lines().enumerate() {
                let line = line.trim_start();
                if line.starts_with("//") {
                    continue;
                }
                let uses_private = line.contains("crate::")
                    || line.contains("super::super")
                    || line.contains("pub(crate)");
                assert!(!uses_private, "line {}: {line}", n + 1);
            }
        }
    }
}
