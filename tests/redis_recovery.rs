//! Redis after a timeout or an outage, on private servers: the release of a
//! timed-out `begin` never overtakes it, and a store that failed while Redis
//! was down lands once Redis is back within the lock's TTL.

mod common;
mod redis_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Runs, gated, post, until_settled};
use http::StatusCode;
use redis_support::{RedisProcess, admin, pool_for};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_idempotency::{Backend, Fingerprint, IdempotencyLayer, RedisBackend, StorageKey};

fn backend_on(url: &str, timeout: Duration) -> RedisBackend {
    RedisBackend::builder(pool_for(url))
        .timeout(timeout)
        .build()
        .unwrap()
}

/// A proxy whose connections, once frozen, pass nothing from client to
/// server until thawed — only the connections that exist when it is frozen:
/// new ones pass at once. (One slow connection, as a congested path or a
/// stalled peer makes it, beside fast new ones.)
struct Freezer {
    port: u16,
    /// Connections numbered below this are frozen.
    frozen_below: Arc<AtomicUsize>,
    opened: Arc<AtomicUsize>,
}

impl Freezer {
    async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen_below = Arc::new(AtomicUsize::new(0));
        let opened = Arc::new(AtomicUsize::new(0));
        let (below, count) = (Arc::clone(&frozen_below), Arc::clone(&opened));
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let number = count.fetch_add(1, Ordering::SeqCst);
                let below = Arc::clone(&below);
                tokio::spawn(async move {
                    let server = tokio::net::TcpStream::connect(("127.0.0.1", target))
                        .await
                        .unwrap();
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            while number < below.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut sr, &mut cw);
                    tokio::select! {
                        () = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Self {
            port,
            frozen_below,
            opened,
        }
    }

    /// Freezes every connection open now.
    fn freeze(&self) {
        self.frozen_below
            .store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn thaw(&self) {
        self.frozen_below.store(0, Ordering::SeqCst);
    }
}

/// A `begin` whose connection stalls times out; the release of its token is
/// sent on that same connection, behind the `begin`, not on a fresh one
/// that would reach Redis first. So when the stalled `begin` finally runs
/// and takes the lock, the release follows and frees it at once — instead
/// of the lock staying for its whole TTL with a token nobody holds.
#[tokio::test]
async fn the_release_of_a_timed_out_begin_never_overtakes_it() {
    let server = RedisProcess::start(&[]);
    let freezer = Freezer::start(server.port).await;
    let backend = backend_on(
        &format!("redis://127.0.0.1:{}", freezer.port),
        Duration::from_millis(300),
    );
    let fp = Fingerprint::from_bytes([1; 32]);
    // Warm the connection and the script cache.
    let warm = StorageKey::from_bytes([7; 32]);
    match backend
        .begin(&warm, &fp, Duration::from_mins(1))
        .await
        .unwrap()
    {
        tower_idempotency::Begin::Acquired(lock) => backend.release(lock).await.unwrap(),
        other => panic!("fresh key: {other:?}"),
    }

    let key = StorageKey::from_bytes([8; 32]);
    let mut admin = admin(&server.url()).await;
    let scripts_before = scripts_run(&mut admin).await;
    freezer.freeze();
    let error = backend
        .begin(&key, &fp, Duration::from_mins(1))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), tower_idempotency::BackendErrorKind::Timeout);
    // Room for a release on a fresh connection to reach Redis first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    freezer.thaw();

    // The stalled begin runs now, and the release (both scripts) after it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while scripts_run(&mut admin).await < scripts_before + 2 {
        assert!(
            Instant::now() < deadline,
            "the begin and its release never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lock_key = format!("idem:{{{}}}:lock", key.to_hex());
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&lock_key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        exists, 0,
        "the release overtook the begin: a lock nobody holds"
    );
    // A new request for the key is not told to wait for it.
    match backend
        .begin(&key, &fp, Duration::from_mins(1))
        .await
        .unwrap()
    {
        tower_idempotency::Begin::Acquired(_) => {}
        other => panic!("the key is free: {other:?}"),
    }
}

/// How many scripts Redis ran (`EVALSHA` and `EVAL` calls).
async fn scripts_run(admin: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Redis with an append-only file (so the lock survives a restart) is
/// killed while the handler runs and started again within the lock TTL.
/// The `complete` that failed is tried again until Redis answers: the
/// retry replays, and the handler ran once.
#[tokio::test]
async fn a_store_that_failed_while_redis_was_down_lands_when_it_is_back() {
    let mut server = RedisProcess::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let backend = backend_on(&server.url(), Duration::from_millis(500));
    let runs = Runs::default();
    let (handler, gate) = gated(runs.clone());
    let svc = IdempotencyLayer::new(backend)
        .lock_ttl(Duration::from_mins(1))
        .layer(handler);
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some("late"), "x")));
    gate.started.await.unwrap();
    server.stop();
    gate.finish.send(()).unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        first.status(),
        StatusCode::OK,
        "delivered although not stored yet"
    );
    server.restart();

    // Well within the minute the lock would hold the key.
    let retry = until_settled(
        &svc,
        || post("/p", Some("late"), "x"),
        Duration::from_secs(20),
    )
    .await;
    assert!(retry.replayed(), "{}: {:?}", retry.status, retry.body);
    assert_eq!(retry.body, "run 1");
    assert_eq!(runs.get(), 1);
}
