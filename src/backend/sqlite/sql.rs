//! The schema and the statements, each run on a pooled connection in a
//! blocking task. Times are milliseconds since the Unix epoch, from the
//! host's clock, which every process sharing the file reads.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// The schema: one table of records and leases, and the counter fencing
/// tokens (which are also the leases' tokens) are drawn from.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS idempotency_records (
    key BLOB PRIMARY KEY,
    fingerprint BLOB NOT NULL,
    record BLOB,
    lock_token INTEGER,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_records_expires_at
    ON idempotency_records (expires_at);
CREATE TABLE IF NOT EXISTS idempotency_fence (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
INSERT OR IGNORE INTO idempotency_fence (id, last) VALUES (1, 0);
";

const LOOK: &str = "SELECT record, expires_at FROM idempotency_records WHERE key = ?1";
const DRAW_FENCE: &str = "UPDATE idempotency_fence SET last = last + 1 WHERE id = 1 RETURNING last";
/// Takes a free key, an expired record or a lapsed lease.
const LEASE: &str =
    "INSERT INTO idempotency_records (key, fingerprint, record, lock_token, expires_at)
    VALUES (?1, ?2, NULL, ?3, ?4)
    ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, record = NULL,
        lock_token = excluded.lock_token, expires_at = excluded.expires_at";
const COMPLETE: &str = "UPDATE idempotency_records
    SET fingerprint = ?3, record = ?4, lock_token = NULL, expires_at = ?5
    WHERE key = ?1 AND lock_token = ?2 AND record IS NULL AND expires_at > ?6";
const RELEASE: &str =
    "DELETE FROM idempotency_records WHERE key = ?1 AND lock_token = ?2 AND record IS NULL";
const EXTEND: &str = "UPDATE idempotency_records SET expires_at = ?3
    WHERE key = ?1 AND lock_token = ?2 AND record IS NULL AND expires_at > ?4";
const FORGET: &str = "DELETE FROM idempotency_records WHERE key = ?1 AND record IS NOT NULL";
const PURGE: &str = "DELETE FROM idempotency_records WHERE key IN
    (SELECT key FROM idempotency_records WHERE expires_at <= ?1 LIMIT ?2)";

/// Now, in milliseconds since the epoch.
pub(super) fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// `now + d` in milliseconds, `d` already bounded by the caller.
pub(super) fn after(now: i64, d: Duration) -> i64 {
    now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What `begin` found.
pub(super) enum Found {
    /// A record's bytes.
    Record(Vec<u8>),
    /// A live lease, and when it ends.
    Busy(i64),
    /// The key is now held under this token.
    Acquired(i64),
}

/// A live row of `key`, read without taking the write lock.
fn look(conn: &Connection, key: &[u8], now: i64) -> rusqlite::Result<Option<Found>> {
    // The record as whatever the column holds: bytes of any other type
    // (written by other code, or altered) are handed on as they are and
    // fail to decode as a record (`Corrupt`), rather than fail the query.
    let row: Option<(Option<Vec<u8>>, i64)> = conn
        .prepare_cached(LOOK)?
        .query_row([key], |r| {
            let record = match r.get_ref(0)? {
                ValueRef::Null => None,
                ValueRef::Blob(bytes) | ValueRef::Text(bytes) => Some(bytes.to_vec()),
                ValueRef::Integer(_) | ValueRef::Real(_) => Some(Vec::new()),
            };
            Ok((record, r.get(1)?))
        })
        .optional()?;
    Ok(match row {
        Some((Some(blob), expires)) if expires > now => Some(Found::Record(blob)),
        Some((None, expires)) if expires > now => Some(Found::Busy(expires)),
        _ => None,
    })
}

/// A live row of `key` now, without taking the write lock (a replay, a
/// key in flight).
pub(super) fn peek(conn: &Connection, key: &[u8]) -> rusqlite::Result<Option<Found>> {
    look(conn, key, now_ms())
}

/// Takes the key if it is still free, in a write transaction that looks
/// again (another process may have taken it since the peek).
pub(super) fn take(
    conn: &mut Connection,
    key: &[u8],
    fingerprint: &[u8],
    lock_ttl: Duration,
) -> rusqlite::Result<Found> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // The clock is read under the write lock: every lease and record this
    // transaction compares with was written before it.
    let now = now_ms();
    if let Some(found) = look(&tx, key, now)? {
        return Ok(found);
    }
    let token: i64 = tx.prepare_cached(DRAW_FENCE)?.query_row([], |r| r.get(0))?;
    tx.prepare_cached(LEASE)?
        .execute(params![key, fingerprint, token, after(now, lock_ttl)])?;
    tx.commit()?;
    Ok(Found::Acquired(token))
}

/// Stores `blob` while the lease `token` holds `key`; whether it did.
pub(super) fn complete(
    conn: &mut Connection,
    key: &[u8],
    token: i64,
    fingerprint: &[u8],
    blob: &[u8],
    ttl: Duration,
) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Read under the write lock: a lease that lapsed while this write
    // waited for the lock is seen as lapsed.
    let now = now_ms();
    let stored = tx.prepare_cached(COMPLETE)?.execute(params![
        key,
        token,
        fingerprint,
        blob,
        after(now, ttl),
        now
    ])?;
    tx.commit()?;
    Ok(stored == 1)
}

pub(super) fn release(conn: &Connection, key: &[u8], token: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(RELEASE)?.execute(params![key, token])?;
    Ok(())
}

pub(super) fn extend(
    conn: &mut Connection,
    key: &[u8],
    token: i64,
    lock_ttl: Duration,
) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now = now_ms();
    let kept =
        tx.prepare_cached(EXTEND)?
            .execute(params![key, token, after(now, lock_ttl), now])?;
    tx.commit()?;
    Ok(kept == 1)
}

pub(super) fn forget(conn: &Connection, key: &[u8]) -> rusqlite::Result<bool> {
    Ok(conn.prepare_cached(FORGET)?.execute([key])? > 0)
}

pub(super) fn purge(conn: &Connection, limit: usize) -> rusqlite::Result<u64> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let purged = conn
        .prepare_cached(PURGE)?
        .execute(params![now_ms(), limit])?;
    Ok(u64::try_from(purged).unwrap_or(u64::MAX))
}
