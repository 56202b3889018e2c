//! The `maxmemory-policy` check: Redis must not evict locks or records.

use std::sync::atomic::Ordering;

use redis::{RedisError, Value};

use super::connection::{Conn, Pool};
use super::{BackendError, BackendErrorKind, RedisBackend};

impl RedisBackend {
    /// Checks, at start-up, that Redis can be reached and keeps what this
    /// backend writes: its `maxmemory-policy` must be `noeviction` (read with
    /// `CONFIG GET`, or from `INFO memory` where `CONFIG` is disabled, as on
    /// managed services; on Redis Cluster, every node that answers). The same
    /// check runs on its own whenever the backend takes a new connection;
    /// calling this surfaces a misconfiguration before the first request.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_idempotency::RedisBackend;
    ///
    /// let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379")
    ///     .create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
    /// let backend = RedisBackend::new(pool);
    /// backend.verify().await?; // refuse to start on an evicting Redis
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::Misconfigured`] for an evicting policy (unless
    /// [`allow_eviction`](super::RedisBackendBuilder::allow_eviction)) or one that
    /// cannot be read; [`BackendErrorKind::Unavailable`] or
    /// [`BackendErrorKind::Timeout`] when Redis cannot be reached.
    pub async fn verify(&self) -> Result<(), BackendError> {
        let (mut conn, _) = self.connection().await?;
        tokio::time::timeout(self.inner.timeout, self.check_eviction_policy(&mut conn))
            .await
            .map_err(|_| {
                BackendError::new(
                    BackendErrorKind::Timeout,
                    "timed out reading Redis' maxmemory-policy",
                )
            })?
    }

    /// Refuses a Redis that may evict locks or records.
    pub(super) async fn check_eviction_policy(&self, conn: &mut Conn) -> Result<(), BackendError> {
        if self.inner.allow_eviction {
            return Ok(());
        }
        let cluster = matches!(self.inner.pool, Pool::Cluster(_));
        let policies = eviction_policies(conn, cluster).await?;
        let Some(bad) = policies.iter().find(|p| p.as_str() != "noeviction") else {
            return Ok(());
        };
        let message = format!(
            "Redis runs with maxmemory-policy {bad}: it may evict idempotency locks and records, \
             letting a request run twice. Set maxmemory-policy noeviction (or give these keys \
             their own Redis), or accept the risk with RedisBackendBuilder::allow_eviction"
        );
        if self.inner.warned.swap(true, Ordering::Relaxed) {
            tracing::debug!("{message}");
        } else {
            tracing::error!("{message}");
        }
        Err(BackendError::new(BackendErrorKind::Misconfigured, message))
    }
}

/// The `maxmemory-policy` of the server: `CONFIG GET`, else `INFO memory`.
/// On a cluster only `INFO memory`, which is sent to every primary (a
/// cluster client sends `CONFIG GET` to one node picked at random).
async fn eviction_policies(conn: &mut Conn, cluster: bool) -> Result<Vec<String>, BackendError> {
    let config: Result<Value, RedisError> = if cluster {
        Ok(Value::Nil)
    } else {
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(conn)
            .await
    };
    let mut policies = Vec::new();
    if let Ok(value) = &config {
        collect_config_policies(value, &mut policies);
    }
    if policies.is_empty() {
        // CONFIG is disabled or renamed (managed services): INFO tells too.
        let info: Value = redis::cmd("INFO")
            .arg("memory")
            .query_async(conn)
            .await
            .map_err(|e| {
                let cause = config
                    .as_ref()
                    .err()
                    .map_or_else(String::new, |c| format!("{c}; "));
                BackendError::new(
                    BackendErrorKind::Misconfigured,
                    format!("cannot read Redis' maxmemory-policy ({cause}INFO: {e})"),
                )
                .with_source(e)
            })?;
        collect_info_policies(&info, &mut policies);
    }
    if policies.is_empty() {
        return Err(BackendError::new(
            BackendErrorKind::Misconfigured,
            "Redis did not report its maxmemory-policy (neither CONFIG GET nor INFO memory)",
        ));
    }
    Ok(policies)
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Some(s.clone()),
        _ => None,
    }
}

/// `CONFIG GET` answers `[name, value]` (RESP2) or `{name: value}` (RESP3);
/// a cluster may answer one of those per node.
fn collect_config_policies(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => {
            if let [name, policy] = items.as_slice()
                && text(name).is_some_and(|n| n.eq_ignore_ascii_case("maxmemory-policy"))
                && let Some(policy) = text(policy)
            {
                out.push(policy);
                return;
            }
            for item in items {
                collect_config_policies(item, out);
            }
        }
        Value::Map(pairs) => {
            for (name, policy) in pairs {
                match (text(name), text(policy)) {
                    (Some(n), Some(p)) if n.eq_ignore_ascii_case("maxmemory-policy") => out.push(p),
                    _ => collect_config_policies(policy, out),
                }
            }
        }
        _ => {}
    }
}

/// The `maxmemory_policy:` lines of `INFO` text (one per node on a cluster).
fn collect_info_policies(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| collect_info_policies(v, out)),
        Value::Map(pairs) => pairs
            .iter()
            .for_each(|(_, v)| collect_info_policies(v, out)),
        other => {
            if let Some(info) = text(other) {
                out.extend(
                    info.lines()
                        .filter_map(|l| l.strip_prefix("maxmemory_policy:"))
                        .map(|p| p.trim().to_owned()),
                );
            }
        }
    }
}
