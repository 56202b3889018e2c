//! Set-up and upkeep: [`migrate`](PostgresBackend::migrate),
//! [`verify`](PostgresBackend::verify) and its pooler probe,
//! [`purge_expired`](PostgresBackend::purge_expired) and
//! [`forget`](PostgresBackend::forget).

use std::time::Duration;

use deadpool_postgres::Object;

use super::{
    BackendError, BackendErrorKind, PostgresBackend, PostgresMode, detach, map_error, simple_value,
    sql, timed_out,
};
use crate::StorageKey;

impl PostgresBackend {
    /// Creates the table, its index, the functions and the sequence the
    /// [fencing tokens](crate::fence) are drawn from (`<table>_fence`) if they
    /// do not exist,
    /// upgrades a table made by an earlier version (safe to run on every
    /// start, from several instances at once), then runs
    /// [`verify`](Self::verify).
    ///
    /// The DDL runs in one transaction; if any of it fails, the connection
    /// is closed rather than returned to the pool.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the database is unreachable, the DDL fails, or
    /// `verify` fails.
    pub async fn migrate(&self) -> Result<(), BackendError> {
        let conn = self.connection().await?;
        let ddl = format!(
            "BEGIN; SELECT pg_advisory_xact_lock({}); {} COMMIT;",
            sql::MIGRATION_LOCK,
            self.sql.migration()
        );
        match tokio::time::timeout(
            self.timeout.max(Duration::from_secs(30)),
            conn.batch_execute(&ddl),
        )
        .await
        {
            Ok(Ok(())) => drop(conn),
            Ok(Err(error)) => {
                // Inside an aborted transaction: never hand it to the pool.
                detach(conn);
                return Err(map_error(error));
            }
            Err(_) => {
                detach(conn);
                return Err(timed_out(
                    "migration",
                    self.timeout.max(Duration::from_secs(30)),
                ));
            }
        }
        self.verify().await
    }

    /// Checks that this backend can work: the table exists (run
    /// [`migrate`](Self::migrate) first), and in [advisory
    /// mode](PostgresMode::Advisory) that the pool's connections are sessions
    /// of their own, with no transaction-mode pooler in between. Run it at
    /// start-up when migrations run elsewhere.
    ///
    /// The pooler probe: connection A takes a probe lock; connection B then
    /// asks whether *its* session holds that lock. Connected directly, it
    /// never can. Behind a transaction-mode pooler, B's statement runs on
    /// whichever server session is free — typically the one A's statement
    /// just used — and finds the lock. The probe needs a pool of at least two
    /// connections (with one, it is skipped).
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::Misconfigured`] for a missing table or a
    /// transaction-mode pooler in advisory mode; another [`BackendError`]
    /// when the database cannot be reached.
    pub async fn verify(&self) -> Result<(), BackendError> {
        let conn = self.connection().await?;
        conn.simple_query(&self.sql.exists)
            .await
            .map_err(map_error)?;
        drop(conn);
        if (self.mode == PostgresMode::Advisory || self.prepared) && self.shares_sessions().await? {
            return Err(BackendError::new(
                BackendErrorKind::Misconfigured,
                if self.mode == PostgresMode::Advisory {
                    "two pooled connections share one server session: PostgreSQL is behind \
                     a transaction-mode pooler (e.g. PgBouncer pool_mode=transaction), where \
                     session advisory locks cannot work; connect directly or in session \
                     mode, or use PostgresMode::Lease"
                } else {
                    "two pooled connections share one server session: PostgreSQL is behind \
                     a transaction-mode pooler (e.g. PgBouncer pool_mode=transaction), where \
                     named prepared statements can run on another client's session; turn \
                     prepared_statements off"
                },
            ));
        }
        Ok(())
    }

    /// Whether two pooled connections share one server session (a
    /// transaction-mode pooler): the probe of [`verify`](Self::verify).
    async fn shares_sessions(&self) -> Result<bool, BackendError> {
        let status = self.pool.status();
        if status.max_size < 2 {
            return Ok(false);
        }
        for probe in 0..4_i64 {
            let id = i64::MIN + 7 + probe;
            let first = self.connection().await?;
            let second = self.connection().await?;
            match Self::probe_once(&first, &second, id).await {
                // Unlocked, both connections clean; or another instance is
                // probing with this id right now.
                Ok(Probe::Separate | Probe::Busy) => {}
                Ok(Probe::Shared) => {
                    detach(first);
                    return Ok(true);
                }
                Err(error) => {
                    // The probe lock may still be held by `first`.
                    detach(first);
                    return Err(error);
                }
            }
        }
        Ok(false)
    }

    async fn probe_once(first: &Object, second: &Object, id: i64) -> Result<Probe, BackendError> {
        // A: take the lock (its own statement, its own transaction).
        let taken = simple_value(first, &format!("SELECT pg_try_advisory_lock({id})")).await?;
        if taken != "t" {
            return Ok(Probe::Busy);
        }
        // B: does my session hold A's lock?
        let seen = simple_value(
            second,
            &format!(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = {id}"
            ),
        )
        .await?;
        let unlocked = simple_value(first, &format!("SELECT pg_advisory_unlock({id})")).await?;
        if seen != "0" {
            return Ok(Probe::Shared);
        }
        if unlocked != "t" {
            return Err(BackendError::new(
                BackendErrorKind::Misconfigured,
                "the probe lock was not held by the session that took it",
            ));
        }
        Ok(Probe::Separate)
    }

    /// Deletes expired records and lapsed leases, `batch` rows per
    /// statement, until none are left; returns how many were deleted. Run it
    /// periodically (for example every few minutes from one instance):
    /// expired rows are never replayed, but they take space until purged.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the database fails.
    pub async fn purge_expired(&self, batch: u32) -> Result<u64, BackendError> {
        let batch = i64::from(batch.max(1));
        let mut total = 0;
        loop {
            let conn = self.connection().await?;
            let deleted = conn
                .execute_typed(
                    &self.sql.purge,
                    &[(&batch, tokio_postgres::types::Type::INT8)],
                )
                .await
                .map_err(map_error)?;
            total += deleted;
            if deleted < batch.unsigned_abs() {
                return Ok(total);
            }
        }
    }

    /// Drops the record stored under `key`, if any: an operator removing a
    /// record that must not be replayed, or that cannot be read (a request
    /// then gets `500` until it expires). Returns whether a record was
    /// deleted. A lease (a request in flight) is left alone. The same by
    /// hand: `DELETE FROM <table> WHERE key = '\x<hex>'`, with the hex
    /// storage key the logs show.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] when the database cannot be reached or refuses.
    pub async fn forget(&self, key: &StorageKey) -> Result<bool, BackendError> {
        let conn = self.connection().await?;
        let deleted = conn
            .execute_typed(
                &self.sql.forget,
                &[(&&key.as_bytes()[..], tokio_postgres::types::Type::BYTEA)],
            )
            .await
            .map_err(map_error)?;
        Ok(deleted > 0)
    }
}

enum Probe {
    Separate,
    Shared,
    Busy,
}
