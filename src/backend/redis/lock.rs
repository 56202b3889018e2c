//! [`RedisLock`]: what a request holds between `begin` and `complete` or
//! `release`, and how a lock token whose fate is not known is released.

use super::super::late::Lapse;
use super::connection::Conn;
use super::scripts::Call;
use super::{BackendError, BackendErrorKind, RedisBackend};
use crate::FencingToken;

/// Proof of holding a key in a [`RedisBackend`]: the lock key and the
/// 128-bit random token stored in it.
///
/// ```no_run
/// # async fn run(backend: tower_idempotency::RedisBackend) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_idempotency::{Backend, Begin, Fingerprint, StorageKey};
///
/// let key = StorageKey::from_bytes([1; 32]);
/// let fp = Fingerprint::from_bytes([2; 32]);
/// if let Begin::Acquired(lock) = backend.begin(&key, &fp, Duration::from_secs(30)).await? {
///     // Only this lock's token can save or release the key.
///     backend.release(lock).await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RedisLock {
    pub(super) record_key: String,
    pub(super) lock_key: String,
    pub(super) token: String,
    pub(super) lapse: Lapse,
    pub(super) fence: FencingToken,
}

impl RedisBackend {
    /// Compare-and-delete of the lock `lock_key` held by `token`, on `conn`
    /// when given (after the command it must follow), else on the shared
    /// connection.
    pub(super) async fn release_token(
        &self,
        lock_key: &str,
        token: &str,
        conn: Option<(Conn, u64)>,
    ) -> Result<(), BackendError> {
        let call = Call::new(&[lock_key]).arg(token);
        let (conn, generation) = match conn {
            Some(held) => held,
            None => self.connection().await?,
        };
        self.invoke_on(conn, generation, &self.inner.release, call)
            .await
            .map(drop)
    }
}

/// A lock token whose fate is not known yet: a `begin` whose script may
/// have taken the lock, a `complete` or `release` that may not have freed
/// it. Dropped before [`settled`](Self::settled) — the future was dropped
/// (client gone, timeout layer) or the call failed after the script may have
/// run — it releases the token from a task of its own, so the key is free in
/// milliseconds instead of after the lock's TTL. Releasing by token never
/// touches another holder's lock.
///
/// The release goes on the connection the script was sent on, when known:
/// Redis runs one connection's commands in order, so it cannot overtake a
/// slow script (which would then take a lock nobody holds).
pub(super) struct Unsettled<'a> {
    lock: Option<(&'a RedisBackend, &'a str, &'a str)>,
    conn: Option<(Conn, u64)>,
}

impl<'a> Unsettled<'a> {
    pub(super) const fn new(backend: &'a RedisBackend, lock_key: &'a str, token: &'a str) -> Self {
        Self {
            lock: Some((backend, lock_key, token)),
            conn: None,
        }
    }

    /// The script goes on `conn`: so does the release.
    pub(super) fn on(mut self, conn: Conn, generation: u64) -> Self {
        self.conn = Some((conn, generation));
        self
    }

    /// The reply was read: nothing to clean up.
    pub(super) fn settled(mut self) {
        self.lock = None;
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        let Some((backend, lock_key, token)) = self.lock.take() else {
            return;
        };
        let (backend, lock_key, token) = (backend.clone(), lock_key.to_owned(), token.to_owned());
        let conn = self.conn.take();
        // Without a runtime the lock expires by its TTL.
        crate::shutdown::spawn(async move {
            let mut released = backend.release_token(&lock_key, &token, conn).await;
            if let Err(error) = &released
                && error.kind() != BackendErrorKind::Timeout
            {
                // That connection is broken: what it carried has run or
                // never will, so a fresh connection cannot overtake it.
                released = backend.release_token(&lock_key, &token, None).await;
            }
            if let Err(error) = released {
                tracing::warn!(%error, "releasing an unsettled Redis lock failed; it expires by its TTL");
            }
        });
    }
}

pub(super) fn token() -> Result<String, BackendError> {
    Ok(crate::key::hex(&crate::backend::token::next()?))
}
