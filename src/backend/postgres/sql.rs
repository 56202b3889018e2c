//! The table, the functions [`migrate`](super::PostgresBackend::migrate)
//! creates, and the statements of every mode, made once from the validated
//! table name.
//!
//! One table serves all three modes. A row is either a **record** (`record`
//! set) or a **lease** (`record` null, `lock_token` set); `expires_at` is the
//! record's expiry or the lease's. Every mode's `begin` respects the others'
//! locks — a session or transaction advisory lock on the key's id, or a live
//! lease row — so instances in different modes can share the table, as they
//! do during a rolling upgrade that changes the mode.

use super::{BackendError, BackendErrorKind};

pub(super) const DEFAULT_TABLE: &str = "idempotency_records";

/// The id that serialises concurrent migrations of several instances.
pub(super) const MIGRATION_LOCK: i64 = 7_245_102_291_457_368;

/// The SQLSTATE the transaction-mode completion raises when its write is
/// fenced off: the whole transaction, handler writes included, rolls back.
pub(super) const FENCED_STATE: &str = "P0I01";

pub(super) struct Sql {
    pub(super) table: String,
    /// `<name>_fence`: the sequence fencing tokens are drawn from.
    fence_sequence: String,
    /// `<name>_begin`: session advisory lock, then lookup.
    begin_session: String,
    /// `<name>_begin_xact`: transaction advisory lock, then lookup.
    begin_xact: String,
    /// `<name>_lease`: lookup, then a lease row.
    begin_lease: String,
    /// `<name>_complete_session` / `_complete_xact`: the fenced writes.
    complete_session: String,
    complete_xact: String,
    pub(super) begin_session_call: String,
    pub(super) begin_xact_call: String,
    pub(super) begin_lease_call: String,
    pub(super) complete_session_call: String,
    pub(super) complete_xact_call: String,
    pub(super) complete_lease: String,
    pub(super) complete_lease_late: String,
    pub(super) release_lease: String,
    pub(super) extend_lease: String,
    pub(super) forget: String,
    pub(super) purge: String,
    pub(super) exists: String,
}

fn valid_identifier(part: &str) -> bool {
    let mut bytes = part.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && part.len() <= 50
}

impl Sql {
    pub(super) fn new(table: &str) -> Result<Self, BackendError> {
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
    pub(super) fn from_parts(parts: &[&str]) -> Self {
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
        let function = |suffix: &str| qualify(quote(&format!("{name}_{suffix}")));
        let begin_session = function("begin");
        let begin_xact = function("begin_xact");
        let begin_lease = function("lease");
        let complete_session = function("complete_session");
        let complete_xact = function("complete_xact");
        let fence_sequence = function("fence");
        // The fencing token is drawn in the call, not the function, so the
        // functions keep the signature instances of earlier versions
        // prepared.
        let fence = format!(
            "CASE WHEN state = 0 THEN nextval('{}') END",
            fence_sequence.replace('\'', "''")
        );
        Self {
            begin_session_call: format!(
                "SELECT state, record, {fence} FROM {begin_session}($1, $2)"
            ),
            begin_xact_call: format!("SELECT state, record, {fence} FROM {begin_xact}($1, $2)"),
            begin_lease_call: format!(
                "SELECT state, record, wait_ms, {fence} FROM {begin_lease}($1, $2, $3, $4, $5)"
            ),
            complete_session_call: format!("SELECT {complete_session}($1, $2, $3, $4, $5)"),
            complete_xact_call: format!("SELECT {complete_xact}($1, $2, $3, $4, $5)"),
            complete_lease: format!(
                "UPDATE {table} SET fingerprint = $3, record = $4, lock_token = NULL, \
                 expires_at = now() + $5::bigint * interval '1 millisecond' \
                 WHERE key = $1 AND lock_token = $2 AND record IS NULL \
                 AND expires_at > clock_timestamp()"
            ),
            // After an outage: an unchanged token proves that no lease-mode
            // request took the key over (a takeover writes a new token, a
            // purge deletes the row), so a lease that lapsed meanwhile may
            // still be completed. Advisory and transaction modes take a
            // lapsed lease's key without writing the row: the transaction
            // advisory lock they hold keeps this write out while they run
            // (`got` false: try again), and a record they stored fails
            // `record IS NULL`. Materialized: the lock is tried once,
            // before the row is written.
            complete_lease_late: format!(
                "WITH l AS MATERIALIZED (SELECT pg_try_advisory_xact_lock($6) AS got), \
                 u AS (UPDATE {table} AS t SET fingerprint = $3, record = $4, lock_token = NULL, \
                 expires_at = now() + $5::bigint * interval '1 millisecond' \
                 FROM l WHERE l.got AND t.key = $1 AND t.lock_token = $2 AND t.record IS NULL \
                 RETURNING 1) \
                 SELECT (SELECT got FROM l), (SELECT count(*) FROM u)"
            ),
            release_lease: format!(
                "DELETE FROM {table} WHERE key = $1 AND lock_token = $2 AND record IS NULL"
            ),
            extend_lease: format!(
                "UPDATE {table} SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond' \
                 WHERE key = $1 AND lock_token = $2 AND record IS NULL \
                 AND expires_at > clock_timestamp()"
            ),
            forget: format!("DELETE FROM {table} WHERE key = $1 AND record IS NOT NULL"),
            // The expiry is checked again on the row the DELETE reaches: a
            // row taken over (a new lease, a new record) after the subquery
            // chose it is live and stays. Rows locked by a writer are
            // skipped, not waited for.
            purge: format!(
                "DELETE FROM {table} WHERE key IN \
                 (SELECT key FROM {table} WHERE expires_at <= clock_timestamp() \
                  LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 AND expires_at <= clock_timestamp()"
            ),
            // The table, and the sequence of this version's fencing tokens.
            exists: format!(
                "SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT 1) AS probe; \
                 SELECT last_value FROM {fence_sequence}"
            ),
            table,
            fence_sequence,
            begin_session,
            begin_xact,
            begin_lease,
            complete_session,
            complete_xact,
        }
    }

    /// The DDL: idempotent, and upgrades a table made by an earlier version
    /// (adds `lock_token`, lets `record` be null) without taking a table
    /// lock when there is nothing to change.
    #[allow(clippy::too_many_lines, reason = "one SQL script")]
    pub(super) fn migration(&self) -> String {
        let table = &self.table;
        let index_name = format!("{}_expires_at_idx", table.replace(['"', '.'], ""));
        let index = format!("\"{index_name}\"");
        // A string literal naming the table, for `to_regclass`.
        let literal = table.replace('\'', "''");
        let lookup = "SELECT t.record, t.expires_at INTO found_record, found_expiry";
        let live = "WHERE t.key = lookup AND t.expires_at > clock_timestamp()";
        let recheck = format!("{lookup} FROM {table} t WHERE t.key = lookup FOR SHARE;");
        let isolation = r"
    -- Each statement below takes a fresh snapshot only under READ COMMITTED.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'tower-idempotency needs READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;";
        let table_lookups = Lookups {
            first: format!("{lookup} FROM {table} t {live};"),
            recheck: recheck.clone(),
            isolation,
        };
        // The advisory and transaction begins differ only in the lock they
        // take, and whether it must be given back when the key is not free.
        let advisory_begin = lock_then_look(
            &self.begin_session,
            &table_lookups,
            "pg_try_advisory_lock(lock_id)",
            "PERFORM pg_advisory_unlock(lock_id);",
        );
        let xact_begin = lock_then_look(
            &self.begin_xact,
            &table_lookups,
            "pg_try_advisory_xact_lock(lock_id)",
            "-- The lock ends with the transaction, which the caller rolls back.",
        );
        format!(
            r"
CREATE TABLE IF NOT EXISTS {table} (
    key bytea PRIMARY KEY,
    fingerprint bytea NOT NULL,
    record bytea,
    lock_token bytea,
    expires_at timestamptz NOT NULL
);
DO $upgrade$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('{literal}')
                   AND attname = 'lock_token' AND NOT attisdropped) THEN
        ALTER TABLE {table} ADD COLUMN lock_token bytea;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('{literal}')
               AND attname = 'record' AND attnotnull) THEN
        ALTER TABLE {table} ALTER COLUMN record DROP NOT NULL;
    END IF;
END
$upgrade$;
-- Looked up first: CREATE INDEX IF NOT EXISTS takes a SHARE lock on the
-- table even when the index exists, so it would wait for every transaction
-- writing a row, and every later write would queue behind it.
DO $index$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                   WHERE i.indrelid = to_regclass('{literal}') AND c.relname = '{index_name}') THEN
        CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
    END IF;
END
$index$;
-- Fencing tokens of every mode: one sequence, so a token drawn later is
-- larger on every key, whatever happened to the key's row.
CREATE SEQUENCE IF NOT EXISTS {fence_sequence} AS bigint;

-- Advisory mode. Returns 0 acquired (the session now holds the lock),
-- 1 a record, 2 busy.
{advisory_begin}
-- Transaction mode: the same with a lock that ends with the transaction.
{xact_begin}
-- Lease mode. The transaction advisory lock (held only during this call)
-- keeps out holders of the other modes; rows do the rest. Returns 0 with the
-- lease written, 1 a record, 2 busy and how long the holder's lease lasts.
CREATE OR REPLACE FUNCTION {begin_lease}(lock_id bigint, lookup bytea, fp bytea,
                                        token bytea, lease_ms bigint)
RETURNS TABLE (state integer, record bytea, wait_ms bigint)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    found_record bytea;
    found_expiry timestamptz;
BEGIN{isolation}
    {lookup} FROM {table} t {live};
    IF found_expiry IS NULL THEN
        IF NOT pg_try_advisory_xact_lock(lock_id) THEN
            RETURN QUERY SELECT 2, NULL::bytea, 1000::bigint;
            RETURN;
        END IF;
        -- Takes a free key, an expired record or a lapsed lease. A live row
        -- is left alone (and locked until this call ends).
        INSERT INTO {table} AS t (key, fingerprint, record, lock_token, expires_at)
        VALUES (lookup, fp, NULL, token, clock_timestamp() + lease_ms * interval '1 millisecond')
        ON CONFLICT (key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, record = NULL,
            lock_token = EXCLUDED.lock_token, expires_at = EXCLUDED.expires_at
        WHERE t.expires_at <= clock_timestamp();
        IF FOUND THEN
            RETURN QUERY SELECT 0, NULL::bytea, 0::bigint;
            RETURN;
        END IF;
        -- Someone committed a live row since the first look: see it.
        {lookup} FROM {table} t {live};
    END IF;
    IF found_record IS NOT NULL THEN
        RETURN QUERY SELECT 1, found_record, 0::bigint;
    ELSE
        RETURN QUERY SELECT 2, NULL::bytea, GREATEST(1, CEIL(EXTRACT(EPOCH FROM
            (COALESCE(found_expiry, clock_timestamp()) - clock_timestamp())) * 1000))::bigint;
    END IF;
END
$fn$;

-- Advisory mode's fenced write: only while this session still holds the
-- lock, and never over a live row. Returns 1 stored, 0 fenced off.
CREATE OR REPLACE FUNCTION {complete_session}(lock_id bigint, lookup bytea, fp bytea,
                                              blob bytea, ttl_ms bigint)
RETURNS integer
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                   AND pid = pg_backend_pid() AND objsubid = 1
                   AND ((classid::bigint << 32) | objid::bigint) = lock_id) THEN
        RETURN 0;
    END IF;
    INSERT INTO {table} AS t (key, fingerprint, record, lock_token, expires_at)
    VALUES (lookup, fp, blob, NULL, now() + ttl_ms * interval '1 millisecond')
    ON CONFLICT (key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint,
        record = EXCLUDED.record, lock_token = NULL, expires_at = EXCLUDED.expires_at
    WHERE t.expires_at <= clock_timestamp();
    RETURN CASE WHEN FOUND THEN 1 ELSE 0 END;
END
$fn$;

-- Transaction mode's write, inside the handler's transaction: fenced off, it
-- raises, so the COMMIT that follows rolls everything back.
CREATE OR REPLACE FUNCTION {complete_xact}(lock_id bigint, lookup bytea, fp bytea,
                                           blob bytea, ttl_ms bigint)
RETURNS integer
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
BEGIN
    -- Still the transaction that took the key (a handler that ran COMMIT
    -- through the request's transaction ended it, and the lock with it).
    IF NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                   AND pid = pg_backend_pid() AND objsubid = 1
                   AND ((classid::bigint << 32) | objid::bigint) = lock_id) THEN
        RAISE EXCEPTION 'the transaction no longer holds this key; nothing is stored'
            USING ERRCODE = '{FENCED_STATE}';
    END IF;
    -- clock_timestamp(), not now(): now() is when the handler's transaction
    -- began.
    INSERT INTO {table} AS t (key, fingerprint, record, lock_token, expires_at)
    VALUES (lookup, fp, blob, NULL, clock_timestamp() + ttl_ms * interval '1 millisecond')
    ON CONFLICT (key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint,
        record = EXCLUDED.record, lock_token = NULL, expires_at = EXCLUDED.expires_at
    WHERE t.expires_at <= clock_timestamp();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'a live row holds this key; the transaction is rolled back'
            USING ERRCODE = '{FENCED_STATE}';
    END IF;
    RETURN 1;
END
$fn$;
",
            begin_lease = self.begin_lease,
            fence_sequence = self.fence_sequence,
            complete_session = self.complete_session,
            complete_xact = self.complete_xact,
        )
    }
}

/// The statements a begin function reads the key with.
struct Lookups {
    /// The unlocked look for a live row.
    first: String,
    /// The look after the lock, which locks the row it reads.
    recheck: String,
    /// The isolation check every begin function starts with.
    isolation: &'static str,
}

/// A begin function that looks, takes `lock`, and looks again: 0 acquired,
/// 1 a record, 2 busy. `give_back` runs when the second look finds the key
/// taken after all.
fn lock_then_look(name: &str, lookups: &Lookups, lock: &str, give_back: &str) -> String {
    let Lookups {
        first,
        recheck,
        isolation,
    } = lookups;
    format!(
        r"CREATE OR REPLACE FUNCTION {name}(lock_id bigint, lookup bytea)
RETURNS TABLE (state integer, record bytea)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    found_record bytea;
    found_expiry timestamptz;
BEGIN{isolation}
    {first}
    IF found_record IS NOT NULL THEN
        RETURN QUERY SELECT 1, found_record;
        RETURN;
    END IF;
    -- Nested, not `OR`: SQL does not promise to evaluate `OR` left to right,
    -- and a lock taken here would never be released.
    IF found_expiry IS NOT NULL THEN
        RETURN QUERY SELECT 2, NULL::bytea;
        RETURN;
    END IF;
    IF NOT {lock} THEN
        RETURN QUERY SELECT 2, NULL::bytea;
        RETURN;
    END IF;
    -- A new statement, so a new snapshot: it sees what the previous holder
    -- committed before our lock was granted (a record, or a lease). The row
    -- is locked to read it: a lease whose extension or completion is still
    -- committing is waited for and seen as it ends up.
    {recheck}
    IF found_expiry > clock_timestamp() THEN
        {give_back}
        RETURN QUERY SELECT CASE WHEN found_record IS NULL THEN 2 ELSE 1 END, found_record;
        RETURN;
    END IF;
    RETURN QUERY SELECT 0, NULL::bytea;
END
$fn$;
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated_and_quoted() {
        assert!(Sql::new("app.idem").is_ok());
        assert!(Sql::new("_x9").is_ok());
        for bad in ["", "9a", "a-b", "a.b.c", "a;drop", "\"a\"", &"x".repeat(51)] {
            assert!(Sql::new(bad).is_err(), "{bad:?}");
        }
        let sql = Sql::new("app.idem").unwrap();
        assert_eq!(sql.table, "\"app\".\"idem\"");
        assert!(sql.begin_lease_call.contains("\"app\".\"idem_lease\"("));
    }
}
