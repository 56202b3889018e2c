//! The connection shared by all requests: taken from the user's pool once,
//! given up after an error, and every script run on it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value};

use super::scripts::{Call, Lua};
use super::{BackendError, BackendErrorKind, RedisBackend};

pub(super) enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

/// A connection checked out of the pool and shared by all requests.
pub(super) struct Held {
    conn: Conn,
    generation: u64,
    pooled: Option<Pooled>,
}

enum Pooled {
    Single(deadpool_redis::Connection),
    Cluster(deadpool_redis::cluster::Connection),
}

impl Drop for Held {
    fn drop(&mut self) {
        // Only dropped when given up after an error: detach it so the pool
        // never hands a broken connection to anyone else.
        match self.pooled.take() {
            Some(Pooled::Single(c)) => drop(deadpool_redis::Connection::take(c)),
            Some(Pooled::Cluster(c)) => drop(deadpool_redis::cluster::Connection::take(c)),
            None => {}
        }
    }
}

/// A cheap handle on the held connection: both kinds multiplex.
#[derive(Clone)]
pub(super) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisBackend {
    /// The shared connection, taking one from the pool if none is held.
    pub(super) async fn connection(&self) -> Result<(Conn, u64), BackendError> {
        if let Some(held) = &*self.inner.held.load() {
            return Ok((held.conn.clone(), held.generation));
        }
        // The wait for another task's attempt counts against the timeout
        // too: against a silent server, requests must not queue behind one
        // another's attempts. Boxed: taking a connection from the pool is a
        // future of about 7 KB that every script call would otherwise carry
        // (and copy) for a path it takes once per connection.
        tokio::time::timeout(self.inner.timeout, Box::pin(self.connect()))
            .await
            .map_err(|_| {
                BackendError::new(
                    BackendErrorKind::Timeout,
                    "timed out taking a Redis connection from the pool",
                )
            })?
    }

    async fn connect(&self) -> Result<(Conn, u64), BackendError> {
        // One task connects; the others wait for it instead of draining
        // the pool.
        let _connecting = self.inner.connecting.lock().await;
        if let Some(held) = &*self.inner.held.load() {
            return Ok((held.conn.clone(), held.generation));
        }
        let pooled = self.checkout().await?;
        let mut conn = match &pooled {
            Pooled::Single(c) => Conn::Single((**c).clone()),
            Pooled::Cluster(c) => Conn::Cluster((**c).clone()),
        };
        // Every new connection may lead to another server (a restart with
        // another configuration, a failover): check it before using it.
        self.check_eviction_policy(&mut conn).await?;
        let generation = self.inner.generations.fetch_add(1, Ordering::Relaxed) + 1;
        self.inner.held.store(Some(Arc::new(Held {
            conn: conn.clone(),
            generation,
            pooled: Some(pooled),
        })));
        Ok((conn, generation))
    }

    async fn checkout(&self) -> Result<Pooled, BackendError> {
        let unavailable = |e: &dyn fmt::Display| {
            BackendError::new(
                BackendErrorKind::Unavailable,
                format!("no Redis connection from the pool: {e}"),
            )
        };
        match &self.inner.pool {
            Pool::Single(pool) => pool
                .get()
                .await
                .map(Pooled::Single)
                .map_err(|e| unavailable(&e).with_source(e)),
            Pool::Cluster(pool) => pool
                .get()
                .await
                .map(Pooled::Cluster)
                .map_err(|e| unavailable(&e).with_source(e)),
        }
    }

    /// Gives up the connection of `generation`, unless it was already
    /// replaced.
    pub(super) fn discard(&self, generation: u64) {
        self.inner.held.rcu(|current| match current {
            Some(held) if held.generation == generation => None,
            other => other.clone(),
        });
    }

    /// Runs one script on the shared connection, bounded by the timeout:
    /// `EVALSHA`, and after a `SCRIPT FLUSH` or restart (`NOSCRIPT`) one
    /// `EVAL` with the source, which also caches it again. (`SCRIPT LOAD`
    /// then `EVALSHA` would cost a round trip more and fail again if another
    /// flush came in between.)
    pub(super) async fn invoke(&self, lua: &Lua, call: Call) -> Result<Value, BackendError> {
        let (conn, generation) = self.connection().await?;
        self.invoke_on(conn, generation, lua, call).await
    }

    /// [`invoke`](Self::invoke) on a connection taken before.
    pub(super) async fn invoke_on(
        &self,
        mut conn: Conn,
        generation: u64,
        lua: &Lua,
        call: Call,
    ) -> Result<Value, BackendError> {
        let run = async {
            match call
                .command("EVALSHA", &lua.sha)
                .query_async(&mut conn)
                .await
            {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    call.command("EVAL", lua.source)
                        .query_async(&mut conn)
                        .await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.inner.timeout, run).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                if connection_broken(&error) {
                    self.discard(generation);
                }
                Err(map_error(error))
            }
            Err(_) => {
                // A silent peer: replace the connection so a server that
                // comes back is found again.
                self.discard(generation);
                Err(BackendError::new(
                    BackendErrorKind::Timeout,
                    format!("Redis did not answer within {:?}", self.inner.timeout),
                ))
            }
        }
    }
}

/// Whether the connection that gave this error must be replaced.
pub(super) fn connection_broken(error: &RedisError) -> bool {
    error.is_unrecoverable_error()
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_timeout()
}

pub(super) fn map_error(error: RedisError) -> BackendError {
    let kind = if error.is_timeout() {
        BackendErrorKind::Timeout
    } else if error.is_connection_refusal() || connection_broken(&error) {
        BackendErrorKind::Unavailable
    } else {
        match error.code() {
            Some("OOM") => BackendErrorKind::Rejected,
            Some("WRONGTYPE") => BackendErrorKind::Corrupt,
            Some("NOPERM" | "NOAUTH" | "WRONGPASS") => BackendErrorKind::Misconfigured,
            Some("LOADING" | "READONLY" | "MASTERDOWN" | "CLUSTERDOWN" | "TRYAGAIN" | "BUSY") => {
                BackendErrorKind::Unavailable
            }
            _ => BackendErrorKind::Other,
        }
    };
    BackendError::new(kind, format!("Redis: {error}")).with_source(error)
}
