//! [`PostgresLock`]: what a request holds between `begin` and `complete` or
//! `release`, in each mode, and how a connection that may hold a lock or a
//! transaction is closed rather than pooled.

use std::fmt;

use deadpool_postgres::Object;

use super::super::late::Lapse;
use super::{BackendError, BackendErrorKind, PostgresMode, RequestTransaction};
use crate::{FencingToken, StorageKey};

/// Proof of holding a key in a [`PostgresBackend`](super::PostgresBackend): a lease token, or the
/// pooled connection whose session or transaction holds the advisory lock.
///
/// Dropped while it may still hold a connection's lock or transaction, it
/// closes that connection (detached from the pool), so the server frees the
/// lock and rolls the transaction back. A dropped lease lapses on its own;
/// the layer releases it.
///
/// The layer handles locks; a caller of the [`Backend`](crate::Backend) API
/// holds one between `begin` and `complete` or `release`:
///
/// ```no_run
/// # async fn run(backend: tower_idempotency::PostgresBackend) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_idempotency::{Backend, Begin, Fingerprint, StorageKey};
///
/// let key = StorageKey::from_bytes([1; 32]);
/// let fp = Fingerprint::from_bytes([2; 32]);
/// if let Begin::Acquired(lock) = backend.begin(&key, &fp, Duration::from_secs(30)).await? {
///     backend.release(lock).await?;
/// }
/// # Ok(())
/// # }
/// ```
pub struct PostgresLock {
    pub(super) key: StorageKey,
    pub(super) lock_id: i64,
    pub(super) held: Held,
    /// Drawn from the table's sequence when the lock was granted.
    pub(super) fence: Option<FencingToken>,
}

pub(super) enum Held {
    Lease {
        token: [u8; 16],
        lapse: Lapse,
    },
    Session {
        /// Boxed: a pooled connection is large, and a lease lock is not.
        conn: Option<Box<Object>>,
        /// Whether the session may hold the lock; then the connection must
        /// not return to the pool.
        locked: bool,
    },
    Transaction(RequestTransaction),
}

impl fmt::Debug for PostgresLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.held {
            Held::Lease { .. } => PostgresMode::Lease,
            Held::Session { .. } => PostgresMode::Advisory,
            Held::Transaction(_) => PostgresMode::Transaction,
        };
        f.debug_struct("PostgresLock")
            .field("key", &self.key)
            .field("lock_id", &self.lock_id)
            .field("mode", &mode)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresLock {
    fn drop(&mut self) {
        match &mut self.held {
            Held::Session { conn, locked } => {
                if let Some(conn) = conn.take()
                    && *locked
                {
                    // Closing the session is the one sure unlock without a
                    // round trip.
                    detach(*conn);
                }
            }
            // Whoever drops the last handle of an unfinished transaction
            // closes its connection: the server rolls it back.
            Held::Transaction(tx) => tx.abort(),
            Held::Lease { .. } => {}
        }
    }
}

/// Closes a connection that may hold a lock or be inside a transaction,
/// instead of returning it to the pool.
pub(super) fn detach(conn: Object) {
    drop(Object::take(conn));
}

/// A pooled connection with a statement that may still run on the server:
/// dropped before [`done`](Self::done) (a timeout, a dropped future), it is
/// closed rather than pooled, so that no other request queues behind that
/// statement on it.
pub(super) struct Busy(Option<Object>);

impl Busy {
    pub(super) const fn new(conn: Object) -> Self {
        Self(Some(conn))
    }

    pub(super) fn get(&self) -> Result<&Object, BackendError> {
        self.0
            .as_ref()
            .ok_or_else(|| BackendError::new(BackendErrorKind::Other, "no connection"))
    }

    /// The statement finished: the connection goes back to the pool.
    pub(super) fn done(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            detach(conn);
        }
    }
}

pub(super) fn lock_id(key: &StorageKey) -> i64 {
    let b = key.as_bytes();
    i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}
