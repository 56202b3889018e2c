//! Redis outages: a stopped server, a silent (black-holed) peer, and a full
//! server. Each test runs its own `redis-server` (or proxy), never the
//! shared one.

mod common;
mod redis_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fault_proxy::{Fault, FaultProxy};
use common::{Runs, counting, gated, post, send, until_settled};
use http::StatusCode;
use redis_support::{RedisProcess, admin, pool_for};
use tower::{Layer, ServiceExt};
use tower_idempotency::{Backend, BackendErrorKind, Begin, IdempotencyLayer, RedisBackend};

fn backend_on(url: &str, timeout: Duration) -> RedisBackend {
    RedisBackend::builder(pool_for(url))
        .timeout(timeout)
        .build()
        .unwrap()
}

#[tokio::test]
async fn stopped_server_is_503_quickly_and_recovery_needs_no_restart() {
    let mut server = RedisProcess::start(&[]);
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend_on(&server.url(), Duration::from_millis(500)))
        .layer(counting(runs.clone()));
    assert_eq!(
        send(&mut svc, post("/p", Some("before"), "x")).await.status,
        StatusCode::CREATED
    );

    server.stop();
    for i in 0..3 {
        let started = Instant::now();
        let answer = send(&mut svc, post("/p", Some(&format!("down-{i}")), "x")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.problem_type(), "backend-unavailable");
        assert!(answer.headers.contains_key("retry-after"));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "no hang: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(runs.get(), 1, "fail closed: the handler did not run");

    server.restart();
    let back = send(&mut svc, post("/p", Some("after"), "x")).await;
    assert_eq!(
        back.status,
        StatusCode::CREATED,
        "the same service recovers: {:?}",
        back.body
    );
    assert!(
        send(&mut svc, post("/p", Some("after"), "x"))
            .await
            .replayed()
    );
}

#[tokio::test]
async fn server_lost_while_the_handler_runs_still_answers_the_client() {
    // The server survives; the backend loses it (every connection reset)
    // while the handler runs, so what was stored can be checked afterwards.
    let server = RedisProcess::start(&[]);
    let proxy = FaultProxy::start(([127, 0, 0, 1], server.port).into()).await;
    let runs = Runs::default();
    let (handler, gate) = gated(runs.clone());
    let svc = IdempotencyLayer::new(backend_on(
        &format!("redis://127.0.0.1:{}", proxy.port()),
        Duration::from_millis(500),
    ))
    .lock_ttl(Duration::from_secs(2))
    .layer(handler);
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some("k"), "x")));
    gate.started.await.unwrap();
    proxy.set(Fault::Down);
    gate.finish.send(()).unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        first.status(),
        StatusCode::OK,
        "the handler ran: its answer is delivered"
    );
    let storage = StorageKey::derive(
        &tower_idempotency::ScopeValue::anonymous(),
        &tower_idempotency::IdempotencyKey::parse(&"k".parse().unwrap()).unwrap(),
    );
    let mut admin = admin(&server.url()).await;
    let stored: i64 = redis::cmd("EXISTS")
        .arg(format!("idem:{{{}}}:rec", storage.to_hex()))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing could be stored");
    proxy.set(Fault::None);
    // Redis is reachable again within the lock TTL: the save is made up in
    // the background (fenced by the lock's token) and the retry replays.
    let retry = until_settled(&svc, || post("/p", Some("k"), "x"), Duration::from_secs(10)).await;
    assert!(retry.replayed(), "{}: {:?}", retry.status, retry.body);
    assert_eq!(retry.body, "run 1");
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn full_server_refuses_writes_and_the_layer_fails_closed() {
    let server = RedisProcess::start(&["--maxmemory-policy", "noeviction"]);
    let backend = backend_on(&server.url(), Duration::from_secs(2));
    let mut admin = admin(&server.url()).await;
    let key = StorageKey::from_bytes([42; 32]);
    let fp = tower_idempotency::Fingerprint::from_bytes([1; 32]);
    let Begin::Acquired(lock) = backend
        .begin(&key, &fp, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("fresh key");
    };
    // A limit below what the server already holds: with `noeviction` every
    // write is now refused with OOM (DEL still works).
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut admin)
        .await
        .unwrap();

    let record = tower_idempotency::Record::new(
        StatusCode::OK,
        http::HeaderMap::new(),
        Bytes::from_static(b"{}"),
        fp,
    );
    let error = backend
        .complete(lock, record, Duration::from_mins(1))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), BackendErrorKind::Rejected, "{error}");
    let lock_key = format!("idem:{{{}}}:lock", key.to_hex());
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&lock_key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(exists, 0, "a refused save still frees the key");

    let error = backend
        .begin(
            &StorageKey::from_bytes([43; 32]),
            &fp,
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind(), BackendErrorKind::Rejected, "{error}");
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(counting(runs.clone()));
    let answer = send(&mut svc, post("/p", Some("full"), "x")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.problem_type(), "backend-unavailable");
    assert_eq!(runs.get(), 0, "fail closed");

    // Room again: everything works, and the refused save left nothing behind.
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        send(&mut svc, post("/p", Some("full"), "x")).await.status,
        StatusCode::CREATED
    );
    let Begin::Acquired(lock) = backend
        .begin(&key, &fp, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("the key must be free");
    };
    backend.release(lock).await.unwrap();
}

use tower_idempotency::StorageKey;

/// A TCP proxy that can be frozen: it keeps connections open but forwards
/// nothing, like a peer behind a dead network path.
async fn freezable_proxy(target: u16) -> (u16, Arc<AtomicBool>) {
    let (port, frozen, _, _) = proxy(target).await;
    (port, frozen)
}

/// The same proxy with a second switch that holds back only the replies
/// (commands reach the server and run, their answers wait), and a count of
/// the connections it made to the server.
async fn proxy(target: u16) -> (u16, Arc<AtomicBool>, Arc<AtomicBool>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let frozen = Arc::new(AtomicBool::new(false));
    let replies = Arc::new(AtomicBool::new(false));
    let upstream = Arc::new(AtomicUsize::new(0));
    let (both, back, count) = (frozen.clone(), replies.clone(), upstream.clone());
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let (both, back) = (both.clone(), back.clone());
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(
                    pump(cr, sw, both.clone(), None),
                    pump(sr, cw, both, Some(back))
                );
            });
        }
    });
    (port, frozen, replies, upstream)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    also: Option<Arc<AtomicBool>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        while frozen.load(Ordering::SeqCst)
            || also.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn silent_peer_times_out_and_the_connection_is_replaced() {
    let server = RedisProcess::start(&[]);
    let (port, frozen, _, connections) = proxy(server.port).await;
    let runs = Runs::default();
    // Long enough for a loaded machine's round trips to the live server.
    let timeout = Duration::from_secs(1);
    let mut svc = IdempotencyLayer::new(backend_on(&format!("redis://127.0.0.1:{port}"), timeout))
        .layer(counting(runs.clone()));
    assert_eq!(
        send(&mut svc, post("/p", Some("a"), "x")).await.status,
        StatusCode::CREATED
    );
    let before = connections.load(Ordering::SeqCst);

    frozen.store(true, Ordering::SeqCst);
    for i in 0..2 {
        let started = Instant::now();
        let answer = tokio::time::timeout(
            timeout * 5,
            send(&mut svc, post("/p", Some(&format!("frozen-{i}")), "x")),
        )
        .await
        .expect("bounded by the backend's timeout");
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        let took = started.elapsed();
        assert!(
            took >= timeout && took < timeout * 5,
            "bounded by the timeout: {took:?}"
        );
    }
    assert_eq!(runs.get(), 1);

    frozen.store(false, Ordering::SeqCst);
    let back = send(&mut svc, post("/p", Some("b"), "x")).await;
    assert_eq!(back.status, StatusCode::CREATED, "{:?}", back.body);
    assert!(
        connections.load(Ordering::SeqCst) > before,
        "the silent connection was given up and a new one made"
    );
    assert!(send(&mut svc, post("/p", Some("a"), "x")).await.replayed());
}

/// Many requests arrive while the peer is silent and no connection is held:
/// each one is answered within its own timeout, none queues behind the
/// others' connection attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_to_a_silent_peer_are_each_bounded() {
    let server = RedisProcess::start(&[]);
    let (port, frozen) = freezable_proxy(server.port).await;
    // Queued behind one another's attempts, the last would wait 20 timeouts.
    let timeout = Duration::from_secs(1);
    let svc = IdempotencyLayer::new(backend_on(&format!("redis://127.0.0.1:{port}"), timeout))
        .layer(counting(Runs::default()));
    frozen.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut svc = svc.clone();
        tasks.spawn(async move {
            let t = Instant::now();
            let answer = send(&mut svc, post("/p", Some(&format!("c-{i}")), "x")).await;
            (answer.status, t.elapsed())
        });
    }
    let answers = tokio::time::timeout(timeout * 3, tasks.join_all())
        .await
        .expect("every request bounded by its own timeout");
    for (status, took) in answers {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            took < timeout * 3,
            "a request waited {took:?} (timeout {timeout:?})"
        );
    }
    assert!(
        started.elapsed() < timeout * 3,
        "all answered in {:?}",
        started.elapsed()
    );
}

/// A `begin` whose reply never arrives (the client left, an outer timeout)
/// after its script took the lock: the lock is released by its token within
/// milliseconds, not after its TTL.
#[tokio::test]
async fn a_dropped_begin_leaves_no_lock_behind() {
    let server = RedisProcess::start(&[]);
    let (port, _, replies, _) = proxy(server.port).await;
    let backend = backend_on(&format!("redis://127.0.0.1:{port}"), Duration::from_secs(5));
    let direct = backend_on(&server.url(), Duration::from_secs(5));
    let fp = tower_idempotency::Fingerprint::from_bytes([1; 32]);
    // Warm the connection (and the script cache) first.
    let warm = StorageKey::from_bytes([7; 32]);
    let Begin::Acquired(lock) = backend
        .begin(&warm, &fp, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("fresh key");
    };
    backend.release(lock).await.unwrap();

    let key = StorageKey::from_bytes([8; 32]);
    let lock_key = format!("idem:{{{}}}:lock", key.to_hex());
    let mut admin = admin(&server.url()).await;
    replies.store(true, Ordering::SeqCst);
    let mut begin = Box::pin(backend.begin(&key, &fp, Duration::from_secs(30)));
    // The script ran and took the lock; its reply is held back.
    let taken = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if lock_exists(&mut admin, &lock_key).await {
                return;
            }
            assert!(Instant::now() < deadline, "the begin never took the lock");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        answered = &mut begin => panic!("the reply is held back, yet begin answered {answered:?}"),
        () = taken => {}
    }
    // Nobody will read the reply: the lock's holder is gone.
    drop(begin);
    let dropped = Instant::now();
    // Released by its token at once: far within the lock's 30 s TTL.
    while lock_exists(&mut admin, &lock_key).await {
        assert!(
            dropped.elapsed() < Duration::from_secs(2),
            "the dropped begin's lock is still there after {:?}",
            dropped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    replies.store(false, Ordering::SeqCst);
    let Begin::Acquired(lock) = direct
        .begin(&key, &fp, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("the key must be free");
    };
    direct.release(lock).await.unwrap();
}

async fn lock_exists(admin: &mut redis::aio::MultiplexedConnection, lock_key: &str) -> bool {
    let exists: i64 = redis::cmd("EXISTS")
        .arg(lock_key)
        .query_async(admin)
        .await
        .unwrap();
    exists == 1
}

/// Redis with an evicting memory policy may drop a lock (a duplicate runs
/// concurrently) or a record (a retry runs again): the backend refuses it,
/// `verify` says so, and the layer answers `503` without running the handler
/// — unless the user accepts the risk with `allow_eviction`.
#[tokio::test]
async fn an_evicting_redis_is_refused_unless_allowed() {
    for policy in ["allkeys-lru", "volatile-lru"] {
        let server = RedisProcess::start(&["--maxmemory-policy", policy]);
        let backend = backend_on(&server.url(), Duration::from_secs(2));
        let error = backend.verify().await.unwrap_err();
        assert_eq!(error.kind(), BackendErrorKind::Misconfigured, "{error}");
        assert!(error.to_string().contains(policy), "{error}");
        let runs = Runs::default();
        let mut svc = IdempotencyLayer::new(backend.clone()).layer(counting(runs.clone()));
        let answer = send(&mut svc, post("/p", Some("k"), "x")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(runs.get(), 0, "fail closed on {policy}");

        let allowed = RedisBackend::builder(pool_for(&server.url()))
            .allow_eviction()
            .build()
            .unwrap();
        allowed.verify().await.unwrap();
        let mut svc = IdempotencyLayer::new(allowed).layer(counting(runs.clone()));
        assert_eq!(
            send(&mut svc, post("/p", Some("k"), "x")).await.status,
            StatusCode::CREATED
        );
    }
    let server = RedisProcess::start(&["--maxmemory-policy", "noeviction"]);
    backend_on(&server.url(), Duration::from_secs(2))
        .verify()
        .await
        .unwrap();
}

/// Managed services disable `CONFIG`: the policy is read from `INFO memory`.
#[tokio::test]
async fn the_policy_is_read_from_info_where_config_is_disabled() {
    for (policy, ok) in [("noeviction", true), ("allkeys-lru", false)] {
        let server = RedisProcess::start(&[
            "--maxmemory-policy",
            policy,
            "--rename-command",
            "CONFIG",
            "",
        ]);
        let result = backend_on(&server.url(), Duration::from_secs(2))
            .verify()
            .await;
        assert_eq!(result.is_ok(), ok, "{policy}: {result:?}");
    }
}

/// The policy is checked again when the connection is replaced: a server
/// that comes back with an evicting policy is refused.
#[tokio::test]
async fn a_replaced_connection_is_checked_again() {
    let mut server = RedisProcess::start(&["--maxmemory-policy", "noeviction"]);
    let backend = backend_on(&server.url(), Duration::from_secs(2));
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(counting(runs.clone()));
    assert_eq!(
        send(&mut svc, post("/p", Some("a"), "x")).await.status,
        StatusCode::CREATED
    );
    server.stop();
    assert_eq!(
        send(&mut svc, post("/p", Some("b"), "x")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    server.restart();
    let mut admin = admin(&server.url()).await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut admin)
        .await
        .unwrap();
    let answer = send(&mut svc, post("/p", Some("c"), "x")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.get(), 1);
}
