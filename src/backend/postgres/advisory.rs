//! Advisory mode: a session advisory lock on a connection held for the
//! request.

use std::time::Duration;

use deadpool_postgres::Object;

use super::{
    BackendError, BackendErrorKind, Begin, Completion, Held, PostgresBackend, PostgresLock, encode,
    fence, lock_id, map_error, ttl_ms,
};
use crate::{Record, StorageKey};

/// Session locks have no TTL to report as `Retry-After`; most requests
/// finish sooner than this.
const BUSY_RETRY: Duration = Duration::from_secs(1);

impl PostgresBackend {
    pub(super) async fn session_begin(
        &self,
        key: &StorageKey,
    ) -> Result<Begin<PostgresLock>, BackendError> {
        let conn = self.connection().await?;
        // Pessimistic until the reply says otherwise: if this future is
        // dropped or fails mid-statement, the connection is closed, not
        // pooled.
        let mut lock = PostgresLock {
            key: *key,
            lock_id: lock_id(key),
            held: Held::Session {
                conn: Some(Box::new(conn)),
                locked: true,
            },
            fence: None,
        };
        let id = lock.lock_id;
        let (client, locked) = lock.session().ok_or_else(no_connection)?;
        let statement = client
            .prepare_cached(&self.sql.begin_session_call)
            .await
            .map_err(map_error)?;
        let row = client
            .query_one(&statement, &[&id, &&key.as_bytes()[..]])
            .await
            .map_err(map_error)?;
        let state: i32 = row.get(0);
        if state != 0 {
            *locked = false;
        }
        if let Some(other) = self.begun(state, row.get(1), BUSY_RETRY)? {
            return Ok(other);
        }
        lock.fence = Some(fence(&row, 2)?);
        Ok(Begin::Acquired(lock))
    }

    pub(super) async fn session_complete(
        &self,
        mut lock: PostgresLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        let (blob, completion) = encode(&self.codec, &record)?;
        let key = lock.key;
        let id = lock.lock_id;
        let (client, locked) = lock.session().ok_or_else(no_connection)?;
        let (write, unlock) = tokio::try_join!(
            client.prepare_cached(&self.sql.complete_session_call),
            client.prepare_cached("SELECT pg_advisory_unlock($1)"),
        )
        .map_err(map_error)?;
        let ttl_ms = ttl_ms(ttl);
        let fingerprint = &record.fingerprint.as_bytes()[..];
        let key = &key.as_bytes()[..];
        // Pipelined: both are sent at once, and each is its own transaction,
        // so the row is committed before the lock is released.
        let write_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&id, &key, &fingerprint, &blob, &ttl_ms];
        let unlock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
        let (stored, unlocked) = tokio::join!(
            client.query_one(&write, &write_params),
            client.query_one(&unlock, &unlock_params),
        );
        let unlocked: bool = unlocked.map_err(map_error)?.get(0);
        // Unlocked (or never held): the connection may go back to the pool.
        *locked = !unlocked;
        let stored: i32 = stored.map_err(map_error)?.get(0);
        // 1: written while this session held the lock. 0: fenced off.
        Ok(if stored == 1 {
            completion
        } else {
            Completion::Lost
        })
    }

    pub(super) async fn session_release(&self, mut lock: PostgresLock) -> Result<(), BackendError> {
        let id = lock.lock_id;
        let (client, locked) = lock.session().ok_or_else(no_connection)?;
        let unlock = client
            .prepare_cached("SELECT pg_advisory_unlock($1)")
            .await
            .map_err(map_error)?;
        let row = client.query_one(&unlock, &[&id]).await.map_err(map_error)?;
        *locked = !row.get::<_, bool>(0);
        Ok(())
    }
}

impl PostgresLock {
    /// The connection and its "may hold the lock" flag, in advisory mode.
    fn session(&mut self) -> Option<(&Object, &mut bool)> {
        match &mut self.held {
            Held::Session {
                conn: Some(conn),
                locked,
            } => Some((&**conn, locked)),
            _ => None,
        }
    }
}

fn no_connection() -> BackendError {
    BackendError::new(
        BackendErrorKind::Other,
        "not an advisory-mode lock with a connection",
    )
}
