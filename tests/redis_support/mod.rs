//! Helpers for the tests that run against a real Redis.
//!
//! `REDIS_URL` (default `redis://127.0.0.1:6379`) names the shared server.
//! The tests fail, loudly, when it cannot be reached. Tests that stop or
//! fill a server start a private `redis-server` of their own.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tower_idempotency::RedisBackend;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A pool on `url` whose connections never time a reply out themselves
/// (redis-rs would after 500 ms, and connecting after 1 s): the backend's
/// own timeout is the one the tests set and measure, and a loaded machine
/// does not trip the client's.
pub fn pool_for(url: &str) -> deadpool_redis::Pool {
    let connection = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(None)
        .set_response_timeout(None);
    let manager =
        deadpool_redis::Manager::new_with_config(url, connection).expect("a valid Redis URL");
    deadpool_redis::Pool::builder(manager)
        .config(deadpool_redis::Config::from_url(url).get_pool_config())
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .expect("a pool")
}

/// A pool on the shared server, after checking it answers.
pub async fn pool() -> deadpool_redis::Pool {
    let url = redis_url();
    let pool = pool_for(&url);
    let mut conn = pool.get().await.unwrap_or_else(|e| {
        panic!(
            "Redis is not reachable at {url} ({e}); start it (scripts/test does) or set REDIS_URL"
        )
    });
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
    pool
}

/// A backend on the shared server, with a prefix no other test uses.
pub async fn backend() -> RedisBackend {
    RedisBackend::builder(pool().await)
        .prefix(unique_prefix())
        .build()
        .unwrap()
}

pub fn unique_prefix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "test:{}:{nanos}:{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A plain connection for test set-up and inspection.
pub async fn admin(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis is not reachable at {url}: {e}"))
}

/// A port that is free now, with its cluster-bus port (+10000) free too.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let Ok(listener) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let port = listener.local_addr().unwrap().port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair found");
}

/// A private `redis-server`, stopped (and its files removed) on drop.
pub struct RedisProcess {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisProcess {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tower-idem-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut process = Self {
            child: None,
            port,
            dir,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        process.restart();
        process
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (after [`stop`](Self::stop)) on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server; clients see refused connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
