//! Lease mode: the lock is a row with a token and an expiry; no connection
//! is held while the handler runs. Statements are unnamed (`query_typed`),
//! so they work through transaction-mode poolers, unless prepared
//! statements are chosen.

use std::time::Duration;

use deadpool_postgres::Object;
use tokio_postgres::types::Type;

use super::{
    BackendError, BackendErrorKind, Begin, Completion, Held, Param, PostgresBackend, PostgresLock,
    encode, lock_id, map_error, ttl_ms,
};
use crate::{Fingerprint, Record, StorageKey};

impl PostgresBackend {
    pub(super) async fn lease_begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin<PostgresLock>, BackendError> {
        let token = new_token()?;
        // From here until the reply is read, a lease may exist on the
        // server that nobody will use: delete it if this future is dropped
        // or fails.
        let unsettled = Unsettled::new(self, *key, token, self.connection().await?);
        let conn = unsettled.conn()?;
        let id = lock_id(key);
        let lease_ms = ttl_ms(lock_ttl).max(1);
        let key_bytes = &key.as_bytes()[..];
        let fingerprint = &fingerprint.as_bytes()[..];
        let token_bytes = &token[..];
        let params: [Param<'_>; 5] = [
            (&id, Type::INT8),
            (&key_bytes, Type::BYTEA),
            (&fingerprint, Type::BYTEA),
            (&token_bytes, Type::BYTEA),
            (&lease_ms, Type::INT8),
        ];
        let row = self
            .query_one(conn, &self.sql.begin_lease_call, &params)
            .await
            .map_err(map_error)?;
        unsettled.settled();
        let state: i32 = row.get(0);
        let wait_ms: i64 = row.get(2);
        let retry_after = Duration::from_millis(wait_ms.clamp(1, i64::MAX).unsigned_abs());
        match self.begun(state, row.get(1), retry_after)? {
            Some(other) => Ok(other),
            None => Ok(Begin::Acquired(PostgresLock {
                key: *key,
                lock_id: id,
                held: Held::Lease { token },
            })),
        }
    }

    pub(super) async fn lease_complete(
        &self,
        lock: PostgresLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        let Held::Lease { token } = lock.held else {
            return Err(not_a_lease());
        };
        let (blob, completion) = encode(&self.codec, &record)?;
        // Dropped before the reply: the lease is released rather than left
        // to lapse (the update, if it ran, cleared the token first).
        let unsettled = Unsettled::new(self, lock.key, token, self.connection().await?);
        let conn = unsettled.conn()?;
        let ttl_ms = ttl_ms(ttl);
        let key = &lock.key.as_bytes()[..];
        let fingerprint = &record.fingerprint.as_bytes()[..];
        let token_bytes = &token[..];
        let params: [Param<'_>; 5] = [
            (&key, Type::BYTEA),
            (&token_bytes, Type::BYTEA),
            (&fingerprint, Type::BYTEA),
            (&blob, Type::BYTEA),
            (&ttl_ms, Type::INT8),
        ];
        let updated = self
            .execute(conn, &self.sql.complete_lease, &params)
            .await
            .map_err(map_error);
        match updated {
            Ok(updated) => {
                unsettled.settled();
                // Fenced by the token: 0 rows means the lease was taken over
                // (or purged after it lapsed), and nothing was written.
                Ok(if updated == 1 {
                    completion
                } else {
                    Completion::Lost
                })
            }
            Err(error) => Err(error),
        }
    }

    pub(super) async fn lease_release(&self, lock: PostgresLock) -> Result<(), BackendError> {
        let Held::Lease { token } = lock.held else {
            return Err(not_a_lease());
        };
        self.delete_lease(&lock.key, &token).await
    }

    pub(super) async fn lease_extend(
        &self,
        key: &StorageKey,
        token: &[u8; 16],
        lock_ttl: Duration,
    ) -> Result<bool, BackendError> {
        let conn = self.connection().await?;
        let lease_ms = ttl_ms(lock_ttl).max(1);
        let key = &key.as_bytes()[..];
        let token = &token[..];
        let params: [Param<'_>; 3] = [
            (&key, Type::BYTEA),
            (&token, Type::BYTEA),
            (&lease_ms, Type::INT8),
        ];
        let updated = self
            .execute(&conn, &self.sql.extend_lease, &params)
            .await
            .map_err(map_error)?;
        Ok(updated == 1)
    }

    /// Deletes the lease `token` holds, if it is still there. Never touches
    /// a record or another token's lease.
    async fn delete_lease(&self, key: &StorageKey, token: &[u8; 16]) -> Result<(), BackendError> {
        self.delete_lease_on(&self.connection().await?, key, token)
            .await
    }

    async fn delete_lease_on(
        &self,
        conn: &Object,
        key: &StorageKey,
        token: &[u8; 16],
    ) -> Result<(), BackendError> {
        let key = &key.as_bytes()[..];
        let token = &token[..];
        let params: [Param<'_>; 2] = [(&key, Type::BYTEA), (&token, Type::BYTEA)];
        self.execute(conn, &self.sql.release_lease, &params)
            .await
            .map_err(map_error)?;
        Ok(())
    }
}

fn new_token() -> Result<[u8; 16], BackendError> {
    let mut token = [0; 16];
    getrandom::fill(&mut token).map_err(|e| {
        BackendError::new(
            BackendErrorKind::Other,
            format!("no randomness for a lease token: {e}"),
        )
    })?;
    Ok(token)
}

fn not_a_lease() -> BackendError {
    BackendError::new(BackendErrorKind::Other, "not a lease-mode lock")
}

/// A lease whose statement was sent but whose reply was not read: dropped
/// armed, it deletes the lease from a task of its own, so a cancelled
/// `begin` does not hold the key for its whole TTL. The delete goes on the
/// same connection, after the statement it follows, so it sees what that
/// statement committed.
struct Unsettled<'a> {
    backend: &'a PostgresBackend,
    lease: Option<(StorageKey, [u8; 16])>,
    conn: Option<Object>,
}

impl<'a> Unsettled<'a> {
    const fn new(
        backend: &'a PostgresBackend,
        key: StorageKey,
        token: [u8; 16],
        conn: Object,
    ) -> Self {
        Self {
            backend,
            lease: Some((key, token)),
            conn: Some(conn),
        }
    }

    fn conn(&self) -> Result<&Object, BackendError> {
        self.conn
            .as_ref()
            .ok_or_else(|| BackendError::new(BackendErrorKind::Other, "no connection"))
    }

    /// The reply was read: nothing to clean up; the connection goes back to
    /// the pool.
    fn settled(mut self) {
        self.lease = None;
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        let Some((key, token)) = self.lease.take() else {
            return;
        };
        let backend = self.backend.clone();
        let conn = self.conn.take();
        // Without a runtime the lease lapses by its TTL.
        crate::shutdown::spawn(async move {
            let deleted = match conn {
                Some(conn) => {
                    backend
                        .bounded("release", backend.delete_lease_on(&conn, &key, &token))
                        .await
                }
                None => {
                    backend
                        .bounded("release", backend.delete_lease(&key, &token))
                        .await
                }
            };
            if let Err(error) = deleted {
                tracing::warn!(%error, "deleting an unsettled lease failed; it lapses by its TTL");
            }
        });
    }
}
