//! Lease mode: the lock is a row with a token and an expiry; no connection
//! is held while the handler runs. Statements are unnamed (`query_typed`),
//! so they work through transaction-mode poolers, unless prepared
//! statements are chosen.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Object;
use tokio::time::Instant;
use tokio_postgres::types::Type;

use super::super::late::{self, Lapse};
use super::lock::Busy;
use super::{
    BackendError, BackendErrorKind, Begin, Completion, Held, Param, PostgresBackend, PostgresLock,
    detach, encode, fence, lock_id, map_error, ttl_ms,
};
use crate::{Fingerprint, Record, StorageKey};

impl PostgresBackend {
    pub(super) async fn lease_begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin<PostgresLock>, BackendError> {
        let token = crate::backend::token::next()?;
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
        let sent = Instant::now();
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
                held: Held::Lease {
                    token,
                    lapse: Lapse::after(sent, lock_ttl),
                },
                fence: Some(fence(&row, 3)?),
            })),
        }
    }

    pub(super) async fn lease_complete(
        &self,
        lock: PostgresLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        let Held::Lease { token, lapse } = &lock.held else {
            return Err(not_a_lease());
        };
        let (blob, completion) = encode(&self.codec, &record)?;
        let ttl_ms = ttl_ms(ttl);
        let late = |blob| LateRecord {
            fingerprint: record.fingerprint,
            blob,
            ttl_ms,
            completion,
        };
        let conn = match self.connection().await {
            Ok(conn) => conn,
            Err(error) if late::is_transient(&error) => {
                self.lease_complete_late(lock.key, *token, lapse.at(), late(blob));
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        // Dropped before the reply: the lease is released rather than left
        // to lapse (the update, if it ran, cleared the token first).
        let unsettled = Unsettled::new(self, lock.key, *token, conn);
        let conn = unsettled.conn()?;
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
            .bounded("complete", async {
                self.execute(conn, &self.sql.complete_lease, &params)
                    .await
                    .map_err(map_error)
            })
            .await;
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
            Err(error) if late::is_transient(&error) => {
                // The server may come back while the lease lives. The
                // statement may still run on this connection: it is closed,
                // and the token fences the two writes against each other.
                unsettled.abandon();
                self.lease_complete_late(lock.key, *token, lapse.at(), late(blob));
                Err(error)
            }
            // Refused: the lease is deleted on the same connection.
            Err(error) => Err(error),
        }
    }

    /// Tries the completion again in the background until the lease would
    /// lapse (see [`late`](super::super::late)), with a statement that
    /// stores as long as the token is unchanged.
    fn lease_complete_late(
        &self,
        key: StorageKey,
        token: [u8; 16],
        deadline: tokio::time::Instant,
        record: LateRecord,
    ) {
        let record = Arc::new(record);
        let (backend, releaser) = (self.clone(), self.clone());
        late::complete_late(
            deadline,
            move || {
                let (backend, record) = (backend.clone(), Arc::clone(&record));
                Box::pin(async move {
                    let conn = Busy::new(backend.connection().await?);
                    let id = lock_id(&key);
                    let key = &key.as_bytes()[..];
                    let token = &token[..];
                    let fingerprint = &record.fingerprint.as_bytes()[..];
                    let params: [Param<'_>; 6] = [
                        (&key, Type::BYTEA),
                        (&token, Type::BYTEA),
                        (&fingerprint, Type::BYTEA),
                        (&record.blob, Type::BYTEA),
                        (&record.ttl_ms, Type::INT8),
                        (&id, Type::INT8),
                    ];
                    let row = backend
                        .bounded("complete", async {
                            backend
                                .query_one(conn.get()?, &backend.sql.complete_lease_late, &params)
                                .await
                                .map_err(map_error)
                        })
                        .await?;
                    conn.done();
                    let (got, updated): (bool, i64) = (row.get(0), row.get(1));
                    if !got {
                        // A holder in another mode runs under the key now.
                        return Err(BackendError::new(
                            BackendErrorKind::Unavailable,
                            "the key's advisory lock is held by another session",
                        ));
                    }
                    Ok(if updated == 1 {
                        record.completion
                    } else {
                        Completion::Lost
                    })
                })
            },
            move || Box::pin(async move { releaser.delete_lease(&key, &token).await }),
        );
    }

    pub(super) async fn lease_release(&self, lock: PostgresLock) -> Result<(), BackendError> {
        let Held::Lease { token, .. } = &lock.held else {
            return Err(not_a_lease());
        };
        self.delete_lease(&lock.key, token).await
    }

    pub(super) async fn lease_extend(
        &self,
        key: &StorageKey,
        token: &[u8; 16],
        lapse: &Lapse,
        lock_ttl: Duration,
    ) -> Result<bool, BackendError> {
        let conn = Busy::new(self.connection().await?);
        let lease_ms = ttl_ms(lock_ttl).max(1);
        let key = &key.as_bytes()[..];
        let token = &token[..];
        let params: [Param<'_>; 3] = [
            (&key, Type::BYTEA),
            (&token, Type::BYTEA),
            (&lease_ms, Type::INT8),
        ];
        let sent = Instant::now();
        let updated = self
            .execute(conn.get()?, &self.sql.extend_lease, &params)
            .await
            .map_err(map_error)?;
        conn.done();
        if updated == 1 {
            lapse.extended(sent, lock_ttl);
        }
        Ok(updated == 1)
    }

    /// Deletes the lease `token` holds, if it is still there. Never touches
    /// a record or another token's lease.
    async fn delete_lease(&self, key: &StorageKey, token: &[u8; 16]) -> Result<(), BackendError> {
        let conn = Busy::new(self.connection().await?);
        self.delete_lease_on(conn.get()?, key, token).await?;
        conn.done();
        Ok(())
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

/// What a late completion writes.
struct LateRecord {
    fingerprint: Fingerprint,
    blob: Vec<u8>,
    ttl_ms: i64,
    completion: Completion,
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

    /// Nothing to clean up here (a late completion takes over), but the
    /// statement may still run: the connection is closed, not pooled.
    fn abandon(mut self) {
        self.lease = None;
        if let Some(conn) = self.conn.take() {
            detach(conn);
        }
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        let Some((key, token)) = self.lease.take() else {
            return;
        };
        let backend = self.backend.clone();
        let conn = self.conn.take().map(Busy::new);
        // Without a runtime the lease lapses by its TTL.
        crate::shutdown::spawn(async move {
            let deleted = match conn {
                Some(conn) => {
                    let deleted = backend
                        .bounded("release", async {
                            backend.delete_lease_on(conn.get()?, &key, &token).await
                        })
                        .await;
                    // Still waiting on the server after a timeout: closed.
                    if deleted.is_ok() {
                        conn.done();
                    }
                    deleted
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
