//! The PostgreSQL backend: session advisory locks and one table, through the
//! user's [`deadpool_postgres`] pool.
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
//! let backend = PostgresBackend::new(pool);
//! backend.migrate().await?; // the table, its index and the begin function
//! let layer = IdempotencyLayer::new(backend);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! # How it works
//!
//! - **begin** is one statement: a `VOLATILE` PL/pgSQL function (made by
//!   [`migrate`](PostgresBackend::migrate)) looks the key up; only when
//!   nothing is stored does it take `pg_try_advisory_lock(id)` and look up
//!   *again, in a later statement*. Under `READ COMMITTED` every statement of
//!   a volatile function takes a fresh snapshot, so the second look sees a
//!   row that the previous holder committed just before our lock was
//!   granted. (A lock and a lookup in one snapshot could miss it and run the
//!   handler twice.) A replay takes no lock at all.
//! - The lock is a **session** lock held on a pooled connection that stays
//!   checked out for the request. The lock object owns that connection.
//! - **complete** sends the upsert and `pg_advisory_unlock` together (one
//!   round trip, two statements, each its own transaction): the row is
//!   committed *before* the lock is released. Unlocking inside the upsert's
//!   transaction would let the next holder look before the row is visible.
//! - **release** unlocks. Whenever the lock might still be held — a dropped
//!   future, a timeout, an error — the connection is **detached from the pool
//!   and closed** instead of returned: the server ends the session and frees
//!   the lock. deadpool's fast recycling does not unlock, so a connection
//!   holding a lock never goes back to the pool.
//!
//! Round trips: a fresh request costs two (begin; upsert + unlock) and a
//! replay one, plus one per connection the first time each statement is
//! prepared. Checking a connection out costs none with deadpool's default
//! `RecyclingMethod::Fast`.
//!
//! Lock ids are 64 bits of the SHA-256 storage key. Two keys sharing an id
//! only make one of them wait (a false `409`); records are keyed by the full
//! storage key, so a collision never replays the wrong response.
//!
//! # Requirements
//!
//! - **No transaction-mode pooler.** Session advisory locks need a session:
//!   PgBouncer in `pool_mode = transaction` (or statement) runs each
//!   transaction on whichever server session is free, so a lock taken by one
//!   request could be held by — and released by — another. Connect directly
//!   or through session pooling. [`migrate`](PostgresBackend::migrate) probes
//!   for this (one connection takes a lock, a second asks whether its own
//!   session holds it, which only a pooler makes possible) and fails with
//!   [`BackendErrorKind::Misconfigured`]. The probe needs a pool of at least
//!   two connections and is tested against PgBouncer in transaction mode.
//! - **`READ COMMITTED`** (the PostgreSQL default) for the pool's sessions;
//!   the begin function refuses to run under another isolation level.
//! - **Pool size bounds concurrency.** Every request in flight holds one
//!   connection until its response is stored. When the pool is exhausted a
//!   request waits up to the [`timeout`](PostgresBackendBuilder::timeout),
//!   then gets `503`.
//! - **Crashed holders.** A holder's lock ends with its session. A process
//!   that dies closes its sockets and the key is free at once; a holder cut
//!   off by the network keeps its lock until the server notices the dead
//!   connection (TCP keepalive: set `tcp_keepalives_idle` on the server, or
//!   `keepalives_idle` on the client, to bound that). `lock_ttl` does not
//!   apply to session locks.
//! - Expired rows are never replayed; [`purge_expired`](PostgresBackend::purge_expired)
//!   deletes them in batches — run it periodically.

use std::fmt;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};

use super::{Backend, BackendError, BackendErrorKind, Begin, Completion};
use crate::{Fingerprint, Record, RecordCodec, StorageKey};

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
    sql: std::sync::Arc<Sql>,
    timeout: Duration,
    codec: RecordCodec,
}

const DEFAULT_TABLE: &str = "idempotency_records";

/// The statements, made once from the validated table name.
struct Sql {
    table: String,
    function: String,
    begin: String,
    upsert: String,
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("table", &self.sql.table)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Builds a [`PostgresBackend`].
///
/// ```no_run
/// # fn run(pool: deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_idempotency::PostgresBackend;
///
/// let backend = PostgresBackend::builder(pool)
///     .table("billing_idempotency")
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
}

impl fmt::Debug for PostgresBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackendBuilder")
            .field("table", &self.table)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl PostgresBackendBuilder {
    /// The table (default `idempotency_records`), optionally
    /// schema-qualified (`app.idempotency`). Each part must be a plain
    /// identifier: ASCII letters, digits and `_`, not starting with a digit,
    /// at most 50 bytes (the begin function's name adds a suffix).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
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
            sql: std::sync::Arc::new(sql),
            timeout: self.timeout,
            codec: self.codec,
        }
    }
}

fn valid_identifier(part: &str) -> bool {
    let mut bytes = part.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && part.len() <= 50
}

impl Sql {
    fn new(table: &str) -> Result<Self, BackendError> {
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| valid_identifier(p)) {
            return Err(BackendError::new(
                BackendErrorKind::Misconfigured,
                format!(
                    "{table:?} is not a valid table name (letters, digits, '_', optionally schema.table)"
                ),
            ));
        }
        Ok(Self::from_parts(&parts))
    }

    /// From parts that passed [`valid_identifier`]; quoted anyway so that
    /// reserved words work.
    fn from_parts(parts: &[&str]) -> Self {
        let quote = |p: &str| format!("\"{p}\"");
        let (schema, name) = match parts {
            [schema, name] => (Some(quote(schema)), *name),
            [name] => (None, *name),
            _ => (None, DEFAULT_TABLE),
        };
        let qualify = |n: String| {
            schema
                .as_ref()
                .map_or_else(|| n.clone(), |s| format!("{s}.{n}"))
        };
        let table = qualify(quote(name));
        let function = qualify(quote(&format!("{name}_begin")));
        Self {
            begin: format!("SELECT state, record FROM {function}($1, $2)"),
            upsert: format!(
                "INSERT INTO {table} (key, fingerprint, record, expires_at) \
                 VALUES ($1, $2, $3, now() + $4::bigint * interval '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, \
                 record = EXCLUDED.record, expires_at = EXCLUDED.expires_at"
            ),
            table,
            function,
        }
    }

    fn migration(&self) -> String {
        let table = &self.table;
        let function = &self.function;
        let index = format!("\"{}_expires_at_idx\"", table.replace(['"', '.'], ""));
        format!(
            r"
CREATE TABLE IF NOT EXISTS {table} (
    key bytea PRIMARY KEY,
    fingerprint bytea NOT NULL,
    record bytea NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
CREATE OR REPLACE FUNCTION {function}(lock_id bigint, lookup bytea)
RETURNS TABLE (state integer, record bytea)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    found_record bytea;
BEGIN
    -- Each statement below takes a fresh snapshot only under READ COMMITTED.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'tower-idempotency needs READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    SELECT t.record INTO found_record FROM {table} t
        WHERE t.key = lookup AND t.expires_at > clock_timestamp();
    IF found_record IS NOT NULL THEN
        RETURN QUERY SELECT 1, found_record;
        RETURN;
    END IF;
    IF NOT pg_try_advisory_lock(lock_id) THEN
        RETURN QUERY SELECT 2, NULL::bytea;
        RETURN;
    END IF;
    -- A new statement, so a new snapshot: it sees what the previous holder
    -- committed before our lock was granted.
    SELECT t.record INTO found_record FROM {table} t
        WHERE t.key = lookup AND t.expires_at > clock_timestamp();
    IF found_record IS NOT NULL THEN
        PERFORM pg_advisory_unlock(lock_id);
        RETURN QUERY SELECT 1, found_record;
        RETURN;
    END IF;
    RETURN QUERY SELECT 0, NULL::bytea;
END
$fn$;
"
        )
    }
}

/// Proof of holding a key in a [`PostgresBackend`]: the pooled connection
/// whose session holds the advisory lock.
///
/// Dropped while it may still hold the lock, it closes the connection
/// (detached from the pool) so the server frees the lock.
///
/// The layer handles locks; a caller of the [`Backend`] API
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
///     // The lock owns its pooled connection until it is handed back.
///     backend.release(lock).await?;
/// }
/// # Ok(())
/// # }
/// ```
pub struct PostgresLock {
    conn: Option<Object>,
    lock_id: i64,
    key: StorageKey,
    /// Whether the session may hold the lock; then the connection must not
    /// return to the pool.
    held: bool,
}

impl fmt::Debug for PostgresLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLock")
            .field("lock_id", &self.lock_id)
            .field("key", &self.key)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.held
        {
            // Closing the session is the one sure unlock without a round trip.
            drop(Object::take(conn));
        }
    }
}

impl PostgresLock {
    fn client(&self) -> Result<&Object, BackendError> {
        self.conn
            .as_ref()
            .ok_or_else(|| BackendError::new(BackendErrorKind::Other, "the lock has no connection"))
    }
}

fn lock_id(key: &StorageKey) -> i64 {
    let b = key.as_bytes();
    i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
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

impl PostgresBackend {
    /// A backend on the `idempotency_records` table with the defaults.
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
        }
    }

    /// The quoted table name.
    #[must_use]
    pub fn table(&self) -> &str {
        &self.sql.table
    }

    async fn connection(&self) -> Result<Object, BackendError> {
        match tokio::time::timeout(self.timeout, self.pool.get()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(error)) => Err(BackendError::new(
                BackendErrorKind::Unavailable,
                format!("no PostgreSQL connection from the pool: {error}"),
            )
            .with_source(error)),
            Err(_) => Err(timed_out("connection checkout", self.timeout)),
        }
    }

    /// Creates the table, its index and the begin function if they do not
    /// exist (safe to run on every start, from several instances at once),
    /// then probes that advisory locks survive from one statement to the
    /// next (no transaction-mode pooler in between).
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the database is unreachable, the DDL fails, or
    /// [`BackendErrorKind::Misconfigured`] when the probe finds session
    /// locks do not hold.
    pub async fn migrate(&self) -> Result<(), BackendError> {
        let conn = self.connection().await?;
        // Serialise concurrent migrations of several instances.
        let ddl = format!(
            "SELECT pg_advisory_xact_lock(7245102291457368); {}",
            self.sql.migration()
        );
        conn.batch_execute(&format!("BEGIN; {ddl} COMMIT;"))
            .await
            .map_err(map_error)?;
        drop(conn);
        self.check_session_locks().await
    }

    /// Probes that the pool's connections are sessions of their own.
    ///
    /// Connection A takes a probe lock; connection B then asks whether *its*
    /// session holds that lock. Connected directly, it never can. Behind a
    /// transaction-mode pooler, B's statement runs on whichever server
    /// session is free — typically the one A's statement just used — and
    /// finds the lock. The simple-query protocol is used so the probe also
    /// works through poolers that cannot carry prepared statements.
    async fn check_session_locks(&self) -> Result<(), BackendError> {
        let status = self.pool.status();
        if status.max_size < 2 {
            return Ok(());
        }
        for probe in 0..4_i64 {
            let id = i64::MIN + 7 + probe;
            let first = self.connection().await?;
            let second = self.connection().await?;
            // A: take the lock (its own statement, its own transaction).
            let taken = simple_value(&first, &format!("SELECT pg_try_advisory_lock({id})")).await?;
            if taken != "t" {
                continue; // another instance is probing with this id right now
            }
            // B: does my session hold A's lock?
            let seen = simple_value(
                &second,
                &format!(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                     AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = {id}"
                ),
            )
            .await?;
            let unlocked = simple_value(&first, &format!("SELECT pg_advisory_unlock({id})")).await;
            if seen != "0" {
                // A's connection cannot be trusted with locks: close it.
                drop(Object::take(first));
                return Err(BackendError::new(
                    BackendErrorKind::Misconfigured,
                    "two pooled connections share one server session: PostgreSQL is behind a \
                     transaction-mode pooler (e.g. PgBouncer pool_mode=transaction), where \
                     session advisory locks cannot work; connect directly or in session mode",
                ));
            }
            if unlocked? != "t" {
                drop(Object::take(first));
            }
        }
        Ok(())
    }

    /// Deletes expired records, `batch` rows per statement, until none are
    /// left; returns how many were deleted. Run it periodically (for example
    /// every few minutes from one instance): expired rows are never replayed,
    /// but they take space until purged.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the database fails.
    pub async fn purge_expired(&self, batch: u32) -> Result<u64, BackendError> {
        let batch = i64::from(batch.max(1));
        let sql = format!(
            "DELETE FROM {t} WHERE key IN \
             (SELECT key FROM {t} WHERE expires_at <= clock_timestamp() LIMIT $1)",
            t = self.sql.table
        );
        let mut total = 0;
        loop {
            let conn = self.connection().await?;
            let deleted = conn.execute(&sql, &[&batch]).await.map_err(map_error)?;
            total += deleted;
            if deleted < batch.unsigned_abs() {
                return Ok(total);
            }
        }
    }

    /// Drops the record stored under `key`, if any: an operator removing a
    /// record that must not be replayed, or that cannot be read (a request
    /// then gets `500` until it expires). Returns whether a row was deleted.
    /// The same by hand: `DELETE FROM <table> WHERE key = '\x<hex>'`, with
    /// the hex storage key the logs show.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the database cannot be reached or refuses.
    pub async fn forget(&self, key: &StorageKey) -> Result<bool, BackendError> {
        let sql = format!("DELETE FROM {} WHERE key = $1", self.sql.table);
        let conn = self.connection().await?;
        let deleted = conn
            .execute(&sql, &[&&key.as_bytes()[..]])
            .await
            .map_err(map_error)?;
        Ok(deleted > 0)
    }

    async fn begin_inner(&self, key: &StorageKey) -> Result<Begin<PostgresLock>, BackendError> {
        let conn = self.connection().await?;
        // Pessimistic until the reply says otherwise: if this future is
        // dropped or fails mid-statement, the connection is closed, not
        // pooled.
        let mut lock = PostgresLock {
            conn: Some(conn),
            lock_id: lock_id(key),
            key: *key,
            held: true,
        };
        let client = lock.client()?;
        let statement = client
            .prepare_cached(&self.sql.begin)
            .await
            .map_err(map_error)?;
        let row = client
            .query_one(&statement, &[&lock.lock_id, &&key.as_bytes()[..]])
            .await
            .map_err(map_error)?;
        let state: i32 = row.get(0);
        match state {
            0 => Ok(Begin::Acquired(lock)),
            1 => {
                lock.held = false;
                let blob: Vec<u8> = row.get(1);
                Ok(Begin::Completed(self.codec.decode(&blob)?))
            }
            2 => {
                lock.held = false;
                // Session locks have no TTL to report; most requests finish
                // sooner than this.
                Ok(Begin::Busy {
                    retry_after: Duration::from_secs(1),
                })
            }
            other => Err(BackendError::new(
                BackendErrorKind::Corrupt,
                format!("unexpected begin state {other}"),
            )),
        }
    }

    async fn complete_inner(
        &self,
        mut lock: PostgresLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        let (blob, completion) = match self.codec.encode(&record) {
            Err(crate::CodecError::TooLarge { max }) => {
                tracing::warn!(
                    max,
                    "record larger than the codec's max_record_size; keeping a not-kept marker"
                );
                let marker = Record::not_kept(record.status, record.fingerprint);
                (self.codec.encode(&marker)?, Completion::NotKept)
            }
            other => (other?, Completion::Saved),
        };
        let client = lock.client()?;
        let (upsert, unlock) = tokio::try_join!(
            client.prepare_cached(&self.sql.upsert),
            client.prepare_cached("SELECT pg_advisory_unlock($1)"),
        )
        .map_err(map_error)?;
        // Within MAX_TTL, so `now() + interval` stays a valid timestamp.
        let ttl_ms = i64::try_from(crate::config::clamp_ttl(ttl).as_millis()).unwrap_or(i64::MAX);
        let fingerprint = &record.fingerprint.as_bytes()[..];
        let key = &lock.key.as_bytes()[..];
        // Pipelined: both are sent at once, and each is its own transaction,
        // so the row is committed before the lock is released.
        let upsert_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&key, &fingerprint, &blob, &ttl_ms];
        let unlock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&lock.lock_id];
        let (stored, unlocked) = tokio::join!(
            client.execute(&upsert, &upsert_params),
            client.query_one(&unlock, &unlock_params),
        );
        let unlocked: bool = unlocked.map_err(map_error)?.get(0);
        // Unlocked (or never held): the connection may go back to the pool.
        lock.held = !unlocked;
        stored.map_err(map_error)?;
        Ok(if unlocked {
            completion
        } else {
            Completion::Lost
        })
    }

    async fn release_inner(&self, mut lock: PostgresLock) -> Result<(), BackendError> {
        let client = lock.client()?;
        let unlock = client
            .prepare_cached("SELECT pg_advisory_unlock($1)")
            .await
            .map_err(map_error)?;
        let row = client
            .query_one(&unlock, &[&lock.lock_id])
            .await
            .map_err(map_error)?;
        lock.held = !row.get::<_, bool>(0);
        Ok(())
    }
}

impl Backend for PostgresBackend {
    type Lock = PostgresLock;

    async fn begin(
        &self,
        key: &StorageKey,
        _fingerprint: &Fingerprint,
        _lock_ttl: Duration,
    ) -> Result<Begin<PostgresLock>, BackendError> {
        tokio::time::timeout(self.timeout, self.begin_inner(key))
            .await
            .unwrap_or_else(|_| Err(timed_out("begin", self.timeout)))
    }

    async fn complete(
        &self,
        lock: PostgresLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        tokio::time::timeout(self.timeout, self.complete_inner(lock, record, ttl))
            .await
            .unwrap_or_else(|_| Err(timed_out("complete", self.timeout)))
    }

    async fn release(&self, lock: PostgresLock) -> Result<(), BackendError> {
        tokio::time::timeout(self.timeout, self.release_inner(lock))
            .await
            .unwrap_or_else(|_| Err(timed_out("release", self.timeout)))
    }

    /// Session locks do not expire; the lock is alive while its session is.
    async fn extend(&self, lock: &PostgresLock, _lock_ttl: Duration) -> Result<bool, BackendError> {
        Ok(lock.conn.as_ref().is_some_and(|c| !c.is_closed()))
    }
}
