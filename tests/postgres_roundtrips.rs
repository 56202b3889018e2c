//! Round trips and statements per request, counted on the wire by a proxy
//! that reads the PostgreSQL frontend protocol between the pool and the
//! server.

mod common;
mod postgres_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{Runs, counting, post, send};
use postgres_support::{TABLE, database_url, pool_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, PostgresBackend};

#[derive(Default)]
struct Wire {
    round_trips: AtomicU64,
    statements: AtomicU64,
    server_spoke: AtomicBool,
}

impl Wire {
    fn snapshot(&self) -> (u64, u64) {
        (
            self.round_trips.load(Ordering::SeqCst),
            self.statements.load(Ordering::SeqCst),
        )
    }
}

/// Splits the client's byte stream into protocol messages and counts the
/// statements (`Execute`, simple `Query`).
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
            self.buf.drain(..=len);
        }
    }
}

async fn proxy(wire: Arc<Wire>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = database_url();
    let host_port = target
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5432")
        .to_owned();
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
                    // The client forwards only after we set this and it reads.
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    down.server_spoke.store(true, Ordering::SeqCst);
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn two_round_trips_fresh_one_replay() {
    let wire = Arc::new(Wire::default());
    let port = proxy(Arc::clone(&wire)).await;
    let url = database_url().replacen(
        database_url()
            .split('@')
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap(),
        &format!("127.0.0.1:{port}"),
        1,
    );
    // One connection: it is reused, so its prepared statements are too.
    let backend = PostgresBackend::builder(pool_for(&url, 1))
        .table(TABLE)
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend).layer(counting(runs.clone()));
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // Warm up: statements prepared on the one connection.
    send(&mut svc, post("/p", Some(&format!("warm-{nonce}")), "x")).await;
    send(&mut svc, post("/p", Some(&format!("warm-{nonce}")), "x")).await;

    let before = wire.snapshot();
    let fresh = send(&mut svc, post("/p", Some(&format!("counted-{nonce}")), "x")).await;
    assert!(!fresh.replayed());
    let after_fresh = wire.snapshot();
    let replay = send(&mut svc, post("/p", Some(&format!("counted-{nonce}")), "x")).await;
    assert!(replay.replayed());
    let after_replay = wire.snapshot();

    let fresh = (after_fresh.0 - before.0, after_fresh.1 - before.1);
    let replay = (
        after_replay.0 - after_fresh.0,
        after_replay.1 - after_fresh.1,
    );
    println!(
        "fresh request: {} round trips, {} statements",
        fresh.0, fresh.1
    );
    println!("replay: {} round trips, {} statements", replay.0, replay.1);
    assert_eq!(fresh, (2, 3), "begin; upsert + unlock pipelined");
    assert_eq!(replay, (1, 1), "begin only");
    assert_eq!(runs.get(), 2);
}
