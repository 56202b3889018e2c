//! A proxy that reads the PostgreSQL frontend protocol between a client and
//! the server and counts round trips, statements and `Parse` messages, for
//! `tests/postgres_roundtrips.rs` and the load benchmark.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
pub struct Wire {
    round_trips: AtomicU64,
    statements: AtomicU64,
    /// `Parse` messages that name their statement (a prepared statement,
    /// kept on the session) and that do not (the unnamed statement).
    named_parses: AtomicU64,
    unnamed_parses: AtomicU64,
    server_spoke: AtomicBool,
}

impl Wire {
    /// Round trips and statements so far.
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.round_trips.load(Ordering::SeqCst),
            self.statements.load(Ordering::SeqCst),
        )
    }

    /// `Parse` messages so far: named (prepared statements), unnamed.
    #[allow(dead_code, reason = "the load benchmark does not count them")]
    pub fn parses(&self) -> (u64, u64) {
        (
            self.named_parses.load(Ordering::SeqCst),
            self.unnamed_parses.load(Ordering::SeqCst),
        )
    }
}

/// Splits the client's byte stream into protocol messages and counts the
/// statements (`Execute`, simple `Query`) and the `Parse` messages, by
/// whether they name the statement.
struct Frontend {
    buf: Vec<u8>,
    started: bool,
}

impl Frontend {
    fn feed(&mut self, bytes: &[u8], wire: &Wire) {
        self.buf.extend_from_slice(bytes);
        loop {
            if !self.started {
                // Startup-phase messages have no type byte: length, code.
                if self.buf.len() < 8 {
                    return;
                }
                let len = u32::from_be_bytes(self.buf[0..4].try_into().unwrap()) as usize;
                let code = u32::from_be_bytes(self.buf[4..8].try_into().unwrap());
                if self.buf.len() < len {
                    return;
                }
                self.buf.drain(..len);
                // SSLRequest / GSSENCRequest come before the real startup.
                if code != 80_877_103 && code != 80_877_104 {
                    self.started = true;
                }
                continue;
            }
            if self.buf.len() < 5 {
                return;
            }
            let kind = self.buf[0];
            let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
            if self.buf.len() < len + 1 {
                return;
            }
            if kind == b'E' || kind == b'Q' {
                wire.statements.fetch_add(1, Ordering::SeqCst);
            }
            // Parse: the statement's name (a C string, empty for the
            // unnamed statement) comes first.
            if kind == b'P' {
                let parses = if self.buf[5] == 0 {
                    &wire.unnamed_parses
                } else {
                    &wire.named_parses
                };
                parses.fetch_add(1, Ordering::SeqCst);
            }
            self.buf.drain(..=len);
        }
    }
}

/// The `host:port` part of a `postgres://user@host:port/db` URL.
pub fn host_port(url: &str) -> &str {
    url.split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5432")
}

/// `url` with its server replaced by `127.0.0.1:port`.
pub fn via(url: &str, port: u16) -> String {
    url.replacen(host_port(url), &format!("127.0.0.1:{port}"), 1)
}

/// A counting proxy to the server of `url`; returns the port it listens on.
/// Round trips are counted as the client speaking again after the server
/// answered, so they are exact for one client sending one request at a time.
pub async fn proxy(wire: Arc<Wire>, url: &str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let host_port = host_port(url).to_owned();
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let server = tokio::net::TcpStream::connect(&host_port).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = Arc::clone(&wire);
            tokio::spawn(async move {
                let mut frontend = Frontend {
                    buf: Vec::new(),
                    started: false,
                };
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if up.server_spoke.swap(false, Ordering::SeqCst) {
                        up.round_trips.fetch_add(1, Ordering::SeqCst);
                    }
                    frontend.feed(&buf[..n], &up);
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let down = Arc::clone(&wire);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    // Counted as the reply arrives, before the client can
                    // read it: set after the write, a client quick to answer
                    // could speak again before the flag was up.
                    down.server_spoke.store(true, Ordering::SeqCst);
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}
