//! A `MONITOR` session on a Redis server, for `tests/redis_commands.rs` and
//! the load benchmark.

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A `MONITOR` session on the server, read line by line.
pub struct Monitor {
    lines: tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
}

impl Monitor {
    /// Starts monitoring the server at `url` (`redis://host:port`).
    pub async fn start(url: &str) -> Self {
        let addr = url.trim_start_matches("redis://").trim_end_matches('/');
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"MONITOR\r\n").await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
        Self { lines }
    }

    /// Commands up to the `ECHO marker`, each with whether it ran inside a
    /// Lua script (`[0 lua]`: not a round trip, but counted by
    /// `INFO commandstats`).
    pub async fn until(&mut self, marker: &str) -> Vec<(String, bool)> {
        let mut seen = Vec::new();
        loop {
            let line =
                tokio::time::timeout(std::time::Duration::from_secs(10), self.lines.next_line())
                    .await
                    .expect("MONITOR went silent")
                    .unwrap()
                    .expect("MONITOR closed");
            if line.contains("\"ECHO\"") && line.contains(marker) {
                return seen;
            }
            let command = line.split('"').nth(1).unwrap_or_default().to_owned();
            seen.push((command, line.contains(" lua] ")));
        }
    }
}

/// Sends `ECHO marker`, which [`Monitor::until`] waits for.
pub async fn mark(admin: &mut redis::aio::MultiplexedConnection, marker: &str) {
    let _: String = redis::cmd("ECHO")
        .arg(marker)
        .query_async(admin)
        .await
        .unwrap();
}
