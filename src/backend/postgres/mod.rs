//! The PostgreSQL backend: one table through the user's [`deadpool_postgres`]
//! pool, in one of three [modes](PostgresMode).
//!
//! ```no_run
//! use tower_idempotency::{IdempotencyLayer, PostgresBackend};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = deadpool_postgres::Config::new();
//! config.url = Some("postgres://postgres@127.0.0.1:5432/test".to_owned());
//! let pool = config.create_pool(
//!     Some(deadpool_postgres::Runtime::Tokio1),
//!     tokio_postgres::NoTls,
//! )?;
//! let backend = PostgresBackend::new(pool); // lease mode
//! backend.migrate().await?; // the table, its index and the functions
//! let layer = IdempotencyLayer::new(backend);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! # Which mode
//!
//! | | [`Lease`](PostgresMode::Lease) (default) | [`Advisory`](PostgresMode::Advisory) | [`Transaction`](PostgresMode::Transaction) |
//! |---|---|---|---|
//! | the key's lock | a row: token and expiry | a session advisory lock | a transaction advisory lock |
//! | connection held while the handler runs | none | one per request | one per request (the handler's own) |
//! | lost session (killed backend, network cut, restart) | nothing changes while the heartbeat reaches the database within `lock_ttl` | **the key is free while the handler still runs** | the transaction rolls back, handler writes included |
//! | behind PgBouncer `pool_mode = transaction` | works | refused by [`verify`](PostgresBackend::verify) | works |
//! | writes per fresh request | 2 (lease, record) | 1 (record) | 1, in the handler's transaction |
//! | handler's own writes | separate | separate | **committed with the record, or not at all** |
//!
//! - **Lease** is the default: a killed session, a dropped connection or a
//!   server restart does not free the key, and no connection is held across
//!   the handler, so a handler that uses the same pool cannot starve it. The
//!   key is freed only when the lease lapses: `lock_ttl` (10 s by default)
//!   after the last heartbeat reached the database — a crashed process, or
//!   an outage longer than that (or the heartbeat turned off and a slower
//!   handler).
//! - **Advisory** writes the least (the measured difference is in
//!   `BENCHMARKS.md`), at the price of its failure mode: a session lock dies
//!   with its connection, and a duplicate can then run concurrently with a
//!   handler that is still running. Every request in flight holds a pooled
//!   connection, so a handler that takes another one from the same pool can
//!   wait for ever once the pool is exhausted (deadpool waits without limit
//!   unless you set `PoolConfig::timeouts.wait`).
//! - **Transaction** makes the handler's database writes and the stored
//!   response one atomic commit: see [Transaction mode](#transaction-mode).
//!
//! Instances in different modes may share one table (while switching modes,
//! say): every mode's `begin` respects the others' locks.
//!
//! **Upgrading from a version without modes** (which had only advisory
//! locks, and a `begin` function that knows nothing of leases): first
//! deploy this version with [`PostgresMode::Advisory`] everywhere, then
//! switch to lease mode. An older binary that runs `migrate()` again puts
//! back its own `begin` function, which would not see a lease.
//!
//! # How it works
//!
//! All modes:
//!
//! - **begin** is one statement: a `VOLATILE` PL/pgSQL function (made by
//!   [`migrate`](PostgresBackend::migrate)) looks the key up and only when
//!   nothing live is stored takes the key, then looks again *in a later
//!   statement*. Under `READ COMMITTED` every statement of a volatile
//!   function takes a fresh snapshot, so the second look sees a row that the
//!   previous holder committed just before the key was taken. A replay takes
//!   no lock at all.
//! - **complete is fenced**: it writes only while its lock is still the
//!   key's holder, and never over a live record. A stale `complete` answers
//!   [`Completion::Lost`] and writes nothing.
//! - Every error path, timeout and dropped future **detaches** a connection
//!   that may be inside a transaction or hold a lock: it is closed, not
//!   returned to the pool.
//!
//! **Lease mode.** `begin` writes a row with a random 128-bit token and an
//! expiry of `lock_ttl`; the layer's heartbeat extends it (`UPDATE … WHERE
//! lock_token = $token`); `complete` turns that row into the record with
//! `UPDATE … WHERE lock_token = $token` while the lease is unexpired, so a
//! lapsed lease never writes (and one taken over never could). Each call
//! borrows a connection for one statement and returns it; statements are
//! unnamed (`query_typed`), so transaction poolers work — or prepared, with
//! [`prepared_statements`](PostgresBackendBuilder::prepared_statements),
//! where sessions are real. A `begin` or `complete` dropped before its reply
//! was read deletes its lease from a task of its own, on the same
//! connection, after the statement it follows. A connection whose statement
//! timed out is closed rather than pooled, so no request queues behind a
//! statement still waiting on the server.
//!
//! A `complete` that cannot reach the server (stopped, restarting, timed
//! out) is tried again from a task of its own until the lease would lapse,
//! with a statement fenced by the token: an unchanged token proves that no
//! lease-mode request took the key over (a takeover writes a new token, a
//! purge deletes the row), and the statement also takes the key's
//! transaction advisory lock, which an advisory- or transaction-mode holder
//! keeps while it runs. So the record is stored even if the lease lapsed
//! meanwhile, and the retry replays; a key taken over in any mode is never
//! written.
//!
//! **Advisory mode.** The lock is `pg_try_advisory_lock(id)` on a pooled
//! connection that stays checked out for the request. `complete` sends the
//! fenced write (which first checks, in `pg_locks`, that this session still
//! holds the lock) and `pg_advisory_unlock` together: one round trip, two
//! statements, each its own transaction, so the row is committed *before*
//! the lock is released. Unlocking inside the write's transaction would let
//! the next holder look before the row is visible.
//!
//! Lock ids are 64 bits of the SHA-256 storage key. Two keys sharing an id
//! only make one of them wait (a false `409`); records are keyed by the full
//! storage key, so a collision never replays the wrong response.
//!
//! Round trips (after each connection prepared its statements once):
//!
//! | | fresh request | replay |
//! |---|---|---|
//! | lease | 2 (+ one per heartbeat) | 1 |
//! | advisory | 2 | 1 |
//! | transaction | 2 | 2 (`ROLLBACK`) |
//!
//! # Transaction mode
//!
//! `begin` opens a `READ COMMITTED` transaction on a pooled connection and
//! takes `pg_try_advisory_xact_lock(id)` in it. The layer puts that
//! transaction into the request's extensions as a [`RequestTransaction`]
//! (an axum extractor too, with the `axum` feature); the handler writes
//! through it. The layer then writes the record **in the same transaction**
//! and commits:
//!
//! - a stored response commits the handler's writes and the record together;
//! - a response that is not stored — a `5xx` or `429` under the default
//!   policy, a handler error, a response marked
//!   [`Persist::Never`](crate::Persist::Never), a panic, a client that left
//!   under [`OnDisconnect::Cancel`](crate::OnDisconnect::Cancel) — **rolls
//!   back** the handler's writes with it: the retry runs on a clean slate;
//! - a crash, a killed connection or a failed commit rolls back both, and
//!   the client is answered `503` — retry with the same key — never the
//!   handler's success response for writes that did not happen (when the
//!   connection dies with the `COMMIT` in flight, the outcome is unknown,
//!   and the same key is still the right retry: it replays if the commit
//!   happened). The lock ends with the transaction, so no key is left stuck.
//!
//! Database effects therefore happen exactly once, even across crashes.
//! Effects outside the database (an e-mail, a call to a payment provider)
//! are at most once per committed attempt, as in the other modes.
//!
//! A handler opts out per write by using a connection of its own from the
//! pool instead of the request's transaction: those writes commit on their
//! own. The handler must not `COMMIT` or `ROLLBACK` the request's
//! transaction itself (use `SAVEPOINT`s for partial rollbacks); if it does,
//! the record is not stored (the write checks that the transaction still
//! holds the key) and the client gets `503`. A handler must not keep the
//! [`RequestTransaction`] or its [`TransactionClient`] beyond its response:
//! while a clone is borrowed the layer cannot end the transaction, and a
//! clone kept for ever keeps the connection (set the server's
//! `idle_in_transaction_session_timeout` as a backstop).
//!
//! **A failed statement aborts the transaction.** PostgreSQL refuses every
//! later statement of a transaction in which one failed (`25P02`) and rolls
//! it back at `COMMIT`. A handler that catches such an error — a unique
//! violation it answers with `409`, say — and carries on has lost its
//! writes: the layer recognises the aborted transaction
//! ([`Completion::Aborted`]), stores nothing, frees the key and logs a
//! warning; a `4xx` answer (or a gRPC answer with a definite error status,
//! such as `ALREADY_EXISTS`) reaches the client as the handler made it, and
//! anything else is replaced by `500`
//! ([transaction aborted](crate::problem#transaction-aborted)) — never a
//! success for writes that were rolled back, and never "retry with the same
//! key" for a request that fails the same way every time. To recover inside
//! the transaction, put a `SAVEPOINT` around the statement that may fail:
//!
//! ```no_run
//! use tokio_postgres::error::SqlState;
//! use tower_idempotency::RequestTransaction;
//!
//! # async fn charge(tx: RequestTransaction) -> Result<u16, Box<dyn std::error::Error>> {
//! let client = tx.client().await?;
//! client.batch_execute("SAVEPOINT new_order").await?;
//! match client.execute("INSERT INTO orders (ref) VALUES ($1)", &[&"r-1"]).await {
//!     Ok(_) => {
//!         client.batch_execute("RELEASE SAVEPOINT new_order").await?;
//!         Ok(201)
//!     }
//!     Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
//!         // The transaction goes on; this 409 is stored and replayed.
//!         client.batch_execute("ROLLBACK TO SAVEPOINT new_order").await?;
//!         Ok(409)
//!     }
//!     Err(e) => Err(e.into()),
//! }
//! # }
//! ```
//!
//! Responses are buffered before they are committed (a response without a
//! length is not streamed while it is stored, as in the other modes): the
//! client sees nothing that could still be rolled back. Responses that
//! cannot be stored commit with a "not kept" marker whatever
//! [`Unstorable`](crate::Unstorable) says. Requests without an
//! `Idempotency-Key` get no transaction: take
//! `Option<RequestTransaction>` and fall back to the pool, or make the key
//! [`required`](crate::IdempotencyLayer::required).
//!
//! ```no_run
//! use tower_idempotency::RequestTransaction;
//!
//! # async fn charge(tx: RequestTransaction) -> Result<(), Box<dyn std::error::Error>> {
//! let client = tx.client().await?;
//! client
//!     .execute("INSERT INTO payments (amount) VALUES ($1)", &[&1000_i64])
//!     .await?;
//! // Committed with the stored response, after the handler returns.
//! # Ok(())
//! # }
//! ```
//!
//! # Requirements
//!
//! - **`READ COMMITTED`** (the PostgreSQL default) for the pool's sessions;
//!   the begin functions refuse to run under another isolation level.
//! - **Advisory mode: no transaction-mode pooler.** Session advisory locks
//!   need a session: PgBouncer in `pool_mode = transaction` runs each
//!   transaction on whichever server session is free. [`verify`](PostgresBackend::verify)
//!   (run by [`migrate`](PostgresBackend::migrate)) probes for this and
//!   fails with [`BackendErrorKind::Misconfigured`].
//! - **Advisory and transaction modes: pool size bounds concurrency.**
//!   Every request in flight holds one connection until its response is
//!   stored; past `max_size` a request waits up to the
//!   [`timeout`](PostgresBackendBuilder::timeout), then gets `503`.
//! - **Crashed holders.** Lease mode: the key is free when the lease lapses,
//!   `lock_ttl` (10 s by default) after the last heartbeat. Advisory and
//!   transaction modes: when the server notices the session is gone — at
//!   once for a process that died, after TCP keepalive for a network cut
//!   (set `tcp_keepalives_idle` on the server to bound that).
//! - Expired rows are never replayed; [`purge_expired`](PostgresBackend::purge_expired)
//!   deletes them (and lapsed leases) in batches — run it periodically.

mod advisory;
mod lease;
mod lock;
mod maintenance;
mod mode;
mod sql;
mod transaction;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};

use super::{Backend, BackendError, BackendErrorKind, Begin, Completion};
use crate::{FencingToken, Fingerprint, Record, RecordCodec, StorageKey};
pub use lock::PostgresLock;
use lock::{Held, detach, lock_id};
pub use mode::{PostgresMode, UnknownPostgresMode};
use sql::{DEFAULT_TABLE, Sql};
#[cfg(feature = "axum")]
pub use transaction::NoRequestTransaction;
pub use transaction::{RequestTransaction, TransactionClient};
/// A [`Backend`] on PostgreSQL. See the [module documentation](self).
///
/// Cloning is cheap; clones share the pool.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency::{IdempotencyLayer, PostgresBackend};
///
/// let mut config = deadpool_postgres::Config::new();
/// config.url = Some("postgres://postgres@127.0.0.1:5432/app".to_owned());
/// let pool = config.create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)?;
/// let backend = PostgresBackend::new(pool);
/// backend.migrate().await?; // once per deployment; safe to repeat
/// let layer = IdempotencyLayer::new(backend);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresBackend {
    pool: Pool,
    sql: Arc<Sql>,
    timeout: Duration,
    codec: RecordCodec,
    mode: PostgresMode,
    prepared: bool,
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("table", &self.sql.table)
            .field("mode", &self.mode)
            .field("prepared_statements", &self.prepared)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Builds a [`PostgresBackend`].
///
/// ```no_run
/// # fn run(pool: deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_idempotency::{PostgresBackend, PostgresMode};
///
/// let backend = PostgresBackend::builder(pool)
///     .table("billing_idempotency")
///     .mode(PostgresMode::Transaction)
///     .timeout(Duration::from_secs(1))
///     .build()?;
/// # let _ = backend;
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct PostgresBackendBuilder {
    pool: Pool,
    table: String,
    timeout: Duration,
    codec: RecordCodec,
    mode: PostgresMode,
    prepared: bool,
}

impl fmt::Debug for PostgresBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackendBuilder")
            .field("table", &self.table)
            .field("mode", &self.mode)
            .field("prepared_statements", &self.prepared)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl PostgresBackendBuilder {
    /// The table (default `idempotency_records`), optionally
    /// schema-qualified (`app.idempotency`). Each part must be a plain
    /// identifier: ASCII letters, digits and `_`, not starting with a digit,
    /// at most 50 bytes (the functions' names add a suffix).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// How a key is held while the handler runs (default
    /// [`PostgresMode::Lease`]).
    pub const fn mode(mut self, mode: PostgresMode) -> Self {
        self.mode = mode;
        self
    }

    /// Whether lease and transaction modes use named prepared statements,
    /// cached per connection, instead of unnamed ones (default `false`).
    ///
    /// Prepared statements save the server parsing and planning every
    /// statement (measured in `BENCHMARKS.md`), but they need real sessions:
    /// connect directly, through a session-mode pooler, or through a pooler
    /// that tracks prepared statements itself (PgBouncer 1.21 or later with
    /// `max_prepared_statements`). Behind a transaction-mode pooler that does
    /// not, a statement prepared on one server session can be executed on
    /// another — another client's statement of the same name.
    /// [`verify`](PostgresBackend::verify) refuses this setting when it
    /// detects such a pooler. Advisory mode always prepares its statements
    /// (it needs sessions anyway).
    pub const fn prepared_statements(mut self, prepared: bool) -> Self {
        self.prepared = prepared;
        self
    }

    /// The bound on each operation, including waiting for a pooled
    /// connection (default 2 seconds).
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How records are encoded (see [`RecordCodec`]).
    pub const fn codec(mut self, codec: RecordCodec) -> Self {
        self.codec = codec;
        self
    }

    /// Builds the backend. No connection is made until it is used.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::Misconfigured`] for a table name that is not a
    /// plain identifier.
    pub fn build(self) -> Result<PostgresBackend, BackendError> {
        let sql = Sql::new(&self.table)?;
        Ok(self.with_sql(sql))
    }

    fn with_sql(self, sql: Sql) -> PostgresBackend {
        PostgresBackend {
            pool: self.pool,
            sql: Arc::new(sql),
            timeout: self.timeout,
            codec: self.codec,
            mode: self.mode,
            prepared: self.prepared,
        }
    }
}
fn map_error(error: tokio_postgres::Error) -> BackendError {
    use tokio_postgres::error::SqlState;
    let kind = match error.code() {
        _ if error.is_closed() => BackendErrorKind::Unavailable,
        Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::UNDEFINED_FUNCTION => {
            BackendErrorKind::Misconfigured
        }
        Some(c) if *c == SqlState::RAISE_EXCEPTION => BackendErrorKind::Misconfigured,
        Some(c)
            if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS =>
        {
            BackendErrorKind::Unavailable
        }
        Some(c) if *c == SqlState::DISK_FULL || *c == SqlState::OUT_OF_MEMORY => {
            BackendErrorKind::Rejected
        }
        Some(_) => BackendErrorKind::Other,
        None => BackendErrorKind::Unavailable,
    };
    BackendError::new(kind, format!("PostgreSQL: {error}")).with_source(error)
}

/// The first column of the first row of a simple (unprepared) query.
async fn simple_value(conn: &Object, sql: &str) -> Result<String, BackendError> {
    let messages = conn.simple_query(sql).await.map_err(map_error)?;
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| BackendError::new(BackendErrorKind::Other, "the probe returned no row"))
}

fn timed_out(what: &str, after: Duration) -> BackendError {
    BackendError::new(
        BackendErrorKind::Timeout,
        format!("PostgreSQL {what} did not finish within {after:?}"),
    )
}

/// Milliseconds of a TTL, within [`MAX_TTL`](crate::MAX_TTL) so that
/// `now() + interval` stays a valid timestamp.
fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(crate::config::clamp_ttl(ttl).as_millis()).unwrap_or(i64::MAX)
}

/// Encodes `record`, or a "not kept" marker in its place when it is larger
/// than the codec keeps.
fn encode(codec: &RecordCodec, record: &Record) -> Result<(Vec<u8>, Completion), BackendError> {
    match codec.encode(record) {
        Err(crate::CodecError::TooLarge { max }) => {
            tracing::warn!(
                max,
                "record larger than the codec's max_record_size; keeping a not-kept marker"
            );
            let marker = Record::not_kept(record.status, record.fingerprint);
            Ok((codec.encode(&marker)?, Completion::NotKept))
        }
        other => Ok((other?, Completion::Saved)),
    }
}

impl PostgresBackend {
    /// A backend in [lease mode](PostgresMode::Lease) on the
    /// `idempotency_records` table with the defaults.
    #[must_use]
    pub fn new(pool: Pool) -> Self {
        // The default name is a valid identifier: no validation needed.
        Self::builder(pool).with_sql(Sql::from_parts(&[DEFAULT_TABLE]))
    }

    /// Starts a builder.
    pub fn builder(pool: Pool) -> PostgresBackendBuilder {
        PostgresBackendBuilder {
            pool,
            table: DEFAULT_TABLE.to_owned(),
            timeout: Duration::from_secs(2),
            codec: RecordCodec::new(),
            mode: PostgresMode::default(),
            prepared: false,
        }
    }

    /// The quoted table name.
    #[must_use]
    pub fn table(&self) -> &str {
        &self.sql.table
    }

    /// The mode this backend holds keys in.
    #[must_use]
    pub const fn mode(&self) -> PostgresMode {
        self.mode
    }

    /// A pooled connection. One the server closed while it sat in the pool
    /// (a restart, a terminated backend) is dropped and the next is taken,
    /// rather than failing a request that never reached the server.
    async fn connection(&self) -> Result<Object, BackendError> {
        let checkout = async {
            loop {
                match self.pool.get().await {
                    Ok(conn) if conn.is_closed() => detach(conn),
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(self.timeout, checkout).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(error)) => Err(BackendError::new(
                BackendErrorKind::Unavailable,
                format!("no PostgreSQL connection from the pool: {error}"),
            )
            .with_source(error)),
            Err(_) => Err(timed_out("connection checkout", self.timeout)),
        }
    }
    /// Decodes what a begin function returned: 0 acquired, 1 a record, 2
    /// busy.
    fn begun(
        &self,
        state: i32,
        record: Option<Vec<u8>>,
        retry_after: Duration,
    ) -> Result<Option<Begin<PostgresLock>>, BackendError> {
        match (state, record) {
            (0, _) => Ok(None),
            (1, Some(blob)) => Ok(Some(Begin::Completed(self.codec.decode(&blob)?))),
            (2, _) => Ok(Some(Begin::Busy { retry_after })),
            (other, _) => Err(BackendError::new(
                BackendErrorKind::Corrupt,
                format!("unexpected begin state {other}"),
            )),
        }
    }

    /// `work`, failing with a timeout after the backend's timeout. A future
    /// of its own, not an `async fn`: one that awaits a future it was given
    /// keeps room for it twice.
    fn bounded<F: Future>(&self, what: &'static str, work: F) -> Bounded<F> {
        Bounded {
            work: tokio::time::timeout(self.timeout, work),
            what,
            timeout: self.timeout,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`PostgresBackend::bounded`].
    struct Bounded<F> {
        #[pin]
        work: tokio::time::Timeout<F>,
        what: &'static str,
        timeout: Duration,
    }
}

impl<T, F: Future<Output = Result<T, BackendError>>> Future for Bounded<F> {
    type Output = Result<T, BackendError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        this.work
            .poll(cx)
            .map(|done| done.unwrap_or_else(|_| Err(timed_out(this.what, *this.timeout))))
    }
}

/// The fencing token a begin statement drew for an acquired key, in
/// column `index`.
pub(super) fn fence(row: &tokio_postgres::Row, index: usize) -> Result<FencingToken, BackendError> {
    let drawn: Option<i64> = row.try_get(index).map_err(map_error)?;
    drawn
        .and_then(|fence| u64::try_from(fence).ok())
        .filter(|fence| *fence > 0)
        .map(FencingToken::new)
        .ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Misconfigured,
                "the begin statement drew no fencing token; run `migrate()` of this version",
            )
        })
}

/// A statement parameter with its type, for unnamed statements.
type Param<'a> = (
    &'a (dyn tokio_postgres::types::ToSql + Sync),
    tokio_postgres::types::Type,
);

impl PostgresBackend {
    /// One row of `sql`: prepared (cached per connection) or unnamed, as
    /// [`prepared_statements`](PostgresBackendBuilder::prepared_statements)
    /// says.
    async fn query_one(
        &self,
        conn: &Object,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
        if self.prepared {
            let statement = prepare(conn, sql, params).await?;
            let values: Vec<_> = params.iter().map(|(v, _)| *v).collect();
            conn.query_one(&statement, &values).await
        } else {
            conn.query_typed_one(sql, params).await
        }
    }

    /// Prepares `sql` now if statements are prepared, so that a later
    /// [`query_one`](Self::query_one) sends it at once: a statement pipelined
    /// after another one must not wait for its own preparation, or the
    /// other would overtake it.
    async fn prepare_ahead(
        &self,
        conn: &Object,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<(), tokio_postgres::Error> {
        if self.prepared {
            prepare(conn, sql, params).await?;
        }
        Ok(())
    }

    /// Rows changed by `sql`, as [`query_one`](Self::query_one) runs it.
    async fn execute(
        &self,
        conn: &Object,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<u64, tokio_postgres::Error> {
        if self.prepared {
            let statement = prepare(conn, sql, params).await?;
            let values: Vec<_> = params.iter().map(|(v, _)| *v).collect();
            conn.execute(&statement, &values).await
        } else {
            conn.execute_typed(sql, params).await
        }
    }
}
/// `sql` prepared with the types of `params`, cached per connection.
async fn prepare(
    conn: &Object,
    sql: &str,
    params: &[Param<'_>],
) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
    let types: Vec<_> = params.iter().map(|(_, t)| t.clone()).collect();
    conn.prepare_typed_cached(sql, &types).await
}

impl Backend for PostgresBackend {
    type Lock = PostgresLock;

    async fn begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin<PostgresLock>, BackendError> {
        match self.mode {
            PostgresMode::Lease => {
                self.bounded("begin", self.lease_begin(key, fingerprint, lock_ttl))
                    .await
            }
            // The other modes' futures are boxed (here and in `complete`
            // and `release`): the largest of the three would otherwise set
            // the size of every request's future, in every mode.
            PostgresMode::Advisory => {
                Box::pin(self.bounded("begin", self.session_begin(key))).await
            }
            PostgresMode::Transaction => {
                Box::pin(self.bounded("begin", self.xact_begin(key))).await
            }
        }
    }

    async fn complete(
        &self,
        lock: PostgresLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        match lock.held {
            // Bounds its statement itself: a timeout there is an outage to
            // come back from, not only an error.
            Held::Lease { .. } => self.lease_complete(lock, record, ttl).await,
            Held::Session { .. } => {
                Box::pin(self.bounded("complete", self.session_complete(lock, record, ttl))).await
            }
            Held::Transaction(_) => {
                Box::pin(self.bounded("complete", self.xact_complete(lock, record, ttl))).await
            }
        }
    }

    async fn release(&self, lock: PostgresLock) -> Result<(), BackendError> {
        match lock.held {
            Held::Lease { .. } => self.bounded("release", self.lease_release(lock)).await,
            Held::Session { .. } => {
                Box::pin(self.bounded("release", self.session_release(lock))).await
            }
            Held::Transaction(_) => {
                Box::pin(self.bounded("release", self.xact_release(lock))).await
            }
        }
    }

    async fn extend(&self, lock: &PostgresLock, lock_ttl: Duration) -> Result<bool, BackendError> {
        match &lock.held {
            Held::Lease { token, lapse } => {
                self.bounded(
                    "extend",
                    self.lease_extend(&lock.key, token, lapse, lock_ttl),
                )
                .await
            }
            // Advisory locks do not expire: alive while the session is.
            Held::Session { conn, .. } => Ok(conn.as_ref().is_some_and(|c| !c.is_closed())),
            Held::Transaction(tx) => Ok(tx.is_alive()),
        }
    }

    fn prepare_request(&self, lock: &PostgresLock, extensions: &mut http::Extensions) {
        if let Held::Transaction(tx) = &lock.held {
            extensions.insert(tx.clone());
        }
    }

    fn fencing_token(&self, lock: &PostgresLock) -> Option<FencingToken> {
        lock.fence
    }

    fn commits_handler_effects(&self) -> bool {
        self.mode == PostgresMode::Transaction
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for mode in [
            PostgresMode::Lease,
            PostgresMode::Advisory,
            PostgresMode::Transaction,
        ] {
            assert_eq!(mode.to_string().parse::<PostgresMode>(), Ok(mode));
        }
        assert_eq!(" Lease ".parse::<PostgresMode>(), Ok(PostgresMode::Lease));
        assert!("".parse::<PostgresMode>().is_err());
    }

    #[test]
    fn lock_ids_are_the_first_eight_bytes() {
        let mut bytes = [0; 32];
        bytes[0] = 1;
        bytes[7] = 0x80;
        assert_eq!(
            lock_id(&StorageKey::from_bytes(bytes)),
            i64::from_le_bytes([1, 0, 0, 0, 0, 0, 0, 0x80])
        );
    }

    #[test]
    fn ttls_are_clamped_to_whole_milliseconds() {
        assert_eq!(ttl_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(
            ttl_ms(Duration::MAX),
            i64::try_from(crate::MAX_TTL.as_millis()).unwrap()
        );
    }
}
