//! Transaction mode: the handler writes through the transaction that holds
//! the key, and the record is written and committed in it.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{ClientWrapper, Object};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use super::{
    BackendError, BackendErrorKind, Begin, Completion, Held, Param, PostgresBackend, PostgresLock,
    detach, encode, fence, lock_id, map_error, sql::FENCED_STATE, ttl_ms,
};
use crate::{Record, StorageKey};

/// The transaction that holds a request's key in
/// [transaction mode](super::PostgresMode::Transaction), lent to the handler
/// through the request's extensions (and, with the `axum` feature, as an
/// extractor). Writes made through it commit together with the stored
/// response, or not at all. See the [module documentation](super#transaction-mode).
///
/// Cloning is cheap; clones share the transaction. Once the layer has
/// committed or rolled it back, [`client`](Self::client) returns an error.
///
/// ```no_run
/// use http::{Request, Response, StatusCode};
/// use tower_idempotency::RequestTransaction;
///
/// async fn handler(req: Request<String>) -> Result<Response<String>, Box<dyn std::error::Error>> {
///     let Some(tx) = req.extensions().get::<RequestTransaction>() else {
///         // No key on this request (or not in transaction mode).
///         return Ok(Response::builder().status(StatusCode::BAD_REQUEST).body(String::new())?);
///     };
///     let client = tx.client().await?;
///     let row = client
///         .query_one("INSERT INTO payments (amount) VALUES (1000) RETURNING id", &[])
///         .await?;
///     let id: i64 = row.get(0);
///     Ok(Response::builder().status(StatusCode::CREATED).body(id.to_string())?)
/// }
/// # let _ = handler;
/// ```
#[derive(Clone)]
pub struct RequestTransaction {
    slot: Arc<Mutex<Slot>>,
}

impl fmt::Debug for RequestTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestTransaction")
            .field("alive", &self.is_alive())
            .finish_non_exhaustive()
    }
}

/// The connection of an open transaction. Dropped while it still holds the
/// connection (a panic, a dropped future, an error), it closes it: the
/// server rolls the transaction back and frees the lock. Only a clean
/// `COMMIT` or `ROLLBACK` hands the connection back to the pool.
struct Slot {
    conn: Option<Object>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            detach(conn);
        }
    }
}

impl Slot {
    /// The transaction ended cleanly: the connection may be reused.
    fn into_pool(self) {
        drop(self.take());
    }

    /// The connection, no longer closed on drop.
    fn take(mut self) -> Option<Object> {
        self.conn.take()
    }
}

/// The request transaction's connection, borrowed for some statements: a
/// [`ClientWrapper`] (and through it a [`tokio_postgres::Client`]). Drop it
/// before the handler returns: the layer waits for it to commit.
pub struct TransactionClient {
    guard: OwnedMappedMutexGuard<Slot, Object>,
}

impl fmt::Debug for TransactionClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionClient").finish_non_exhaustive()
    }
}

impl Deref for TransactionClient {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.guard
    }
}

impl RequestTransaction {
    fn new(conn: Object) -> Self {
        Self {
            slot: Arc::new(Mutex::new(Slot { conn: Some(conn) })),
        }
    }

    /// The transaction's connection, waiting while another part of the
    /// handler uses it (one statement sequence at a time).
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::Unavailable`] once the transaction has ended: the
    /// layer committed or rolled it back, or its connection was closed.
    pub async fn client(&self) -> Result<TransactionClient, BackendError> {
        let guard = Arc::clone(&self.slot).lock_owned().await;
        OwnedMutexGuard::try_map(guard, |slot| slot.conn.as_mut())
            .map(|guard| TransactionClient { guard })
            .map_err(|_| ended())
    }

    /// Whether the transaction is still open on a live connection, as far as
    /// can be seen without waiting (in use by the handler counts as alive).
    pub(super) fn is_alive(&self) -> bool {
        self.slot.try_lock().map_or(true, |slot| {
            slot.conn.as_ref().is_some_and(|c| !c.is_closed())
        })
    }

    /// Closes the connection now if nobody is using it (the lock was dropped
    /// unfinished); otherwise it is closed when the last user lets go.
    pub(super) fn abort(&self) {
        if let Ok(mut slot) = self.slot.try_lock()
            && let Some(conn) = slot.conn.take()
        {
            detach(conn);
        }
    }

    /// Takes the connection out for the final statements; the handler's
    /// clones see an ended transaction from now on.
    async fn finish(&self) -> Result<Slot, BackendError> {
        let mut slot = self.slot.lock().await;
        match slot.conn.take() {
            Some(conn) => Ok(Slot { conn: Some(conn) }),
            None => Err(ended()),
        }
    }
}

fn ended() -> BackendError {
    BackendError::new(
        BackendErrorKind::Unavailable,
        "the request's transaction has ended (committed, rolled back, or its connection closed)",
    )
}

impl PostgresBackend {
    pub(super) async fn xact_begin(
        &self,
        key: &StorageKey,
    ) -> Result<Begin<PostgresLock>, BackendError> {
        // Held in a slot from the start: dropped or failed anywhere below,
        // the connection is closed and the server rolls back.
        let slot = Slot {
            conn: Some(self.connection().await?),
        };
        let Some(conn) = slot.conn.as_ref() else {
            return Err(ended());
        };
        let id = lock_id(key);
        let key_bytes = &key.as_bytes()[..];
        let params: [Param<'_>; 2] = [(&id, Type::INT8), (&key_bytes, Type::BYTEA)];
        // One round trip: the lookup runs after BEGIN, inside the transaction.
        let ((), row) = tokio::try_join!(
            conn.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED"),
            self.query_one(conn, &self.sql.begin_xact_call, &params),
        )
        .map_err(map_error)?;
        let state: i32 = row.get(0);
        if state == 0 {
            let conn = slot.take().ok_or_else(ended)?;
            return Ok(Begin::Acquired(PostgresLock {
                key: *key,
                lock_id: id,
                held: Held::Transaction(RequestTransaction::new(conn)),
                fence: Some(fence(&row, 2)?),
            }));
        }
        // A record or busy: this transaction has nothing to keep.
        conn.batch_execute("ROLLBACK").await.map_err(map_error)?;
        slot.into_pool();
        self.begun(state, row.get(1), Duration::from_secs(1))?
            .ok_or_else(ended)
    }

    pub(super) async fn xact_complete(
        &self,
        lock: PostgresLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        let Held::Transaction(tx) = &lock.held else {
            return Err(not_a_transaction());
        };
        let (blob, completion) = encode(&self.codec, &record)?;
        let slot = tx.finish().await?;
        let Some(conn) = slot.conn.as_ref() else {
            return Err(ended());
        };
        let ttl_ms = ttl_ms(ttl);
        let id = lock.lock_id;
        let key = &lock.key.as_bytes()[..];
        let fingerprint = &record.fingerprint.as_bytes()[..];
        let params: [Param<'_>; 5] = [
            (&id, Type::INT8),
            (&key, Type::BYTEA),
            (&fingerprint, Type::BYTEA),
            (&blob, Type::BYTEA),
            (&ttl_ms, Type::INT8),
        ];
        // Prepared first, if statements are prepared: a statement still
        // being prepared would let the COMMIT below overtake it.
        if let Err(error) = self
            .prepare_ahead(conn, &self.sql.complete_xact_call, &params)
            .await
        {
            if !is_aborted(&error) {
                return Err(map_error(error));
            }
            conn.batch_execute("ROLLBACK").await.map_err(map_error)?;
            slot.into_pool();
            return Ok(handler_aborted());
        }
        // One round trip. If the write fails, the transaction is aborted and
        // the COMMIT rolls it back: handler writes and record together.
        let (written, committed) = tokio::join!(
            self.query_one(conn, &self.sql.complete_xact_call, &params),
            conn.batch_execute("COMMIT"),
        );
        match (written, committed) {
            (Ok(_), Ok(())) => {
                slot.into_pool();
                Ok(completion)
            }
            (Err(error), Ok(())) if error.code().is_some_and(|c| c.code() == FENCED_STATE) => {
                // Rolled back cleanly: a live row held the key.
                slot.into_pool();
                Ok(Completion::Lost)
            }
            (Err(error), Ok(())) if is_aborted(&error) => {
                // The handler's transaction was aborted before the write:
                // the COMMIT rolled it back. Not a failure to retry.
                slot.into_pool();
                Ok(handler_aborted())
            }
            (Ok(_), Err(error)) if is_constraint_violation(&error) => {
                // A deferred constraint of the handler's writes failed at
                // COMMIT: rolled back, and it fails the same way every time.
                slot.into_pool();
                Ok(handler_aborted())
            }
            (Err(error), Ok(())) => {
                // The COMMIT rolled back; the session is idle and clean.
                slot.into_pool();
                Err(rolled_back(&map_error(error)))
            }
            (_, Err(error)) => Err(rolled_back(&map_error(error))),
        }
    }

    pub(super) async fn xact_release(&self, lock: PostgresLock) -> Result<(), BackendError> {
        let Held::Transaction(tx) = &lock.held else {
            return Err(not_a_transaction());
        };
        let slot = tx.finish().await?;
        let Some(conn) = slot.conn.as_ref() else {
            return Err(ended());
        };
        conn.batch_execute("ROLLBACK").await.map_err(map_error)?;
        slot.into_pool();
        Ok(())
    }
}

/// Whether a statement was refused because the transaction is aborted: a
/// statement of the handler failed (`25P02`).
fn is_aborted(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION)
}

/// An integrity constraint violation (SQLSTATE class 23), as a deferred
/// constraint reports it at `COMMIT`.
fn is_constraint_violation(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|c| c.code().starts_with("23"))
}

fn handler_aborted() -> Completion {
    tracing::warn!(
        "a statement of the request's transaction failed and the handler carried on: nothing \
         was committed or stored, and the key is free; wrap statements that may fail in a \
         SAVEPOINT and roll back to it"
    );
    Completion::Aborted
}

fn rolled_back(error: &BackendError) -> BackendError {
    BackendError::new(
        error.kind(),
        format!("the request's transaction was not committed: {error}"),
    )
}

fn not_a_transaction() -> BackendError {
    BackendError::new(BackendErrorKind::Other, "not a transaction-mode lock")
}

#[cfg(feature = "axum")]
mod extractor {
    use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
    use axum_core::response::{IntoResponse, Response};
    use http::request::Parts;

    use super::RequestTransaction;
    use crate::IdempotencyKey;

    /// The rejection of the [`RequestTransaction`] extractor. Without an
    /// `Idempotency-Key` it answers `400` with the layer's "missing key"
    /// problem; with a key but no transaction (the backend is not in
    /// transaction mode, or a fail-open request ran unprotected) `500`.
    ///
    /// ```
    /// use axum_core::response::IntoResponse;
    /// use tower_idempotency::NoRequestTransaction;
    ///
    /// let response = NoRequestTransaction::default().into_response();
    /// assert_eq!(response.status(), 400);
    /// ```
    #[derive(Debug, Clone, Copy, Default)]
    #[non_exhaustive]
    pub struct NoRequestTransaction {
        keyed: bool,
    }

    impl IntoResponse for NoRequestTransaction {
        fn into_response(self) -> Response {
            crate::extract::not_lent(
                self.keyed,
                "a handler asked for the request transaction, but the idempotency backend \
                 is not in transaction mode (or ran the request unprotected)",
                "no request transaction: the idempotency backend is not in transaction mode",
            )
        }
    }

    /// For handlers that need the transaction: rejects requests without one.
    ///
    /// ```
    /// use tower_idempotency::RequestTransaction;
    ///
    /// async fn create_payment(tx: RequestTransaction) -> Result<String, String> {
    ///     let client = tx.client().await.map_err(|e| e.to_string())?;
    ///     client
    ///         .execute("INSERT INTO payments (amount) VALUES (1000)", &[])
    ///         .await
    ///         .map_err(|e| e.to_string())?;
    ///     Ok("created".to_owned())
    /// }
    /// # let _ = create_payment;
    /// ```
    impl<S: Send + Sync> FromRequestParts<S> for RequestTransaction {
        type Rejection = NoRequestTransaction;

        async fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<Self>()
                .cloned()
                .ok_or(NoRequestTransaction {
                    keyed: parts.extensions.get::<IdempotencyKey>().is_some(),
                })
        }
    }

    /// For routes that also serve requests without a key: `None` there.
    impl<S: Send + Sync> OptionalFromRequestParts<S> for RequestTransaction {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<Self>().cloned())
        }
    }
}

#[cfg(feature = "axum")]
pub use extractor::NoRequestTransaction;
