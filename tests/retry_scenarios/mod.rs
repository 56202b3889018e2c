//! What a client that retries meets, on every backend: a client that gives
//! up mid-handler, blank credentials, a corrected request, streams,
//! unstorable responses, extreme TTLs, header order, a crashed holder.
//!
//! The scenarios, and [`scenarios!`] that makes one test of each: run on the
//! memory backend by `tests/retry.rs`, on Redis by `tests/retry_redis.rs`
//! and on PostgreSQL by `tests/retry_postgres.rs` (which need their
//! features: without them they are not built, rather than passing empty).
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Json;
use axum::routing::post;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use tokio::io::AsyncWriteExt;
use tower::ServiceExt;
use tower_idempotency::{
    Backend, Begin, Fingerprint, IdempotencyKey, IdempotencyLayer, Persist, ScopeValue, StorageKey,
};

use crate::common::{self, Answer, Runs};

/// A unique key per call, so tests on shared servers never meet.
pub fn unique_key(name: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn keyed(key: &str, headers: &[(&str, &str)], body: &str) -> Request<Body> {
    let mut req = Request::post("/payments").header("idempotency-key", key);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Body::from(body.to_owned())).unwrap()
}

pub async fn call(app: &Router, req: Request<Body>) -> Answer {
    Answer::read(app.clone().oneshot(req).await.unwrap()).await
}

/// `201 payment <n>`, counting runs.
pub fn payments<B: Backend>(layer: IdempotencyLayer<B>, runs: Runs) -> Router {
    Router::new()
        .route(
            "/payments",
            post(move || {
                let n = runs.bump();
                async move { (StatusCode::CREATED, format!("payment {n}")) }
            }),
        )
        .layer(layer)
}

// ---------------------------------------------------------------------------
// A client that closes its socket mid-handler, over real TCP with axum.

/// Counts response futures dropped before they finished: proof that the
/// server really cancelled the request when the client left.
#[derive(Clone, Default)]
struct Abandoned(Arc<AtomicUsize>);

struct DropWatch {
    abandoned: Abandoned,
    finished: bool,
}

impl Drop for DropWatch {
    fn drop(&mut self) {
        if !self.finished {
            self.abandoned.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

pub async fn client_closes_the_socket_mid_handler_and_the_retry_replays<B: Backend>(backend: B) {
    let runs = Runs::default();
    let abandoned = Abandoned::default();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
    let go = Arc::new(tokio::sync::Notify::new());
    let app = {
        let runs = runs.clone();
        let go = go.clone();
        Router::new()
            .route(
                "/payments",
                post(move || {
                    let n = runs.bump();
                    let started = started_tx.clone();
                    let go = go.clone();
                    async move {
                        started.send(()).unwrap();
                        if n == 1 {
                            go.notified().await;
                        }
                        (StatusCode::CREATED, format!("payment {n}"))
                    }
                }),
            )
            .layer(IdempotencyLayer::new(backend))
    };
    let watched = {
        let abandoned = abandoned.clone();
        tower::service_fn(move |req: Request<axum::body::Body>| {
            let app = app.clone();
            let watch = DropWatch {
                abandoned: abandoned.clone(),
                finished: false,
            };
            async move {
                let mut watch = watch;
                let res = app.oneshot(req).await;
                watch.finished = true;
                res
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, tower::make::Shared::new(watched)).await });

    let key = unique_key("tcp");
    let raw = format!(
        "POST /payments HTTP/1.1\r\nhost: {addr}\r\nidempotency-key: {key}\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(raw.as_bytes()).await.unwrap();
    started.recv().await.unwrap();
    drop(socket);
    // Wait until the server has given the request up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while abandoned.0.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never noticed the closed socket"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    go.notify_one();
    let headers = [("idempotency-key", key.as_str())];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let retry = loop {
        let answer = common::request(addr, "POST", "/payments", &headers, "{}").await;
        if answer.status != StatusCode::CONFLICT {
            break answer;
        }
        assert!(tokio::time::Instant::now() < deadline, "still in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "the retry replays the finished handler");
    assert_eq!(retry.body, "payment 1");
    assert_eq!(runs.get(), 1, "the handler ran once");
}

/// tower-http's `TimeoutLayer` outside: the timeout answers the client, the
/// handler finishes in the background, and the retry replays it.
pub async fn an_outer_timeout_does_not_cancel_the_handler<B: Backend>(backend: B) {
    let runs = Runs::default();
    let go = Arc::new(tokio::sync::Notify::new());
    let app = {
        let runs = runs.clone();
        let go = go.clone();
        Router::new()
            .route(
                "/payments",
                post(move || {
                    let n = runs.bump();
                    let go = go.clone();
                    async move {
                        go.notified().await;
                        (StatusCode::CREATED, format!("payment {n}"))
                    }
                }),
            )
            .layer(IdempotencyLayer::new(backend))
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(50),
            ))
    };
    let key = unique_key("timeout");
    let first = call(&app, keyed(&key, &[], "{}")).await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(runs.get(), 1);
    let during = call(&app, keyed(&key, &[], "{}")).await;
    assert_eq!(
        during.status,
        StatusCode::CONFLICT,
        "the handler still runs"
    );
    go.notify_one();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let retry = loop {
        let answer = call(&app, keyed(&key, &[], "{}")).await;
        if answer.status != StatusCode::CONFLICT {
            break answer;
        }
        assert!(tokio::time::Instant::now() < deadline, "still in flight");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(retry.replayed());
    assert_eq!(retry.body, "payment 1");
    assert_eq!(runs.get(), 1);
}

// ---------------------------------------------------------------------------
// Scopes.

pub async fn blank_authorization_never_shares_a_response<B: Backend>(backend: B) {
    let runs = Runs::default();
    let app = payments(IdempotencyLayer::new(backend), runs.clone());
    let key = unique_key("blank-auth");
    for (auth, cookie) in [("", "sid=user-one"), ("  ", "sid=user-two")] {
        let answer = call(
            &app,
            keyed(&key, &[("authorization", auth), ("cookie", cookie)], "{}"),
        )
        .await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(!answer.replayed(), "{cookie} got another caller's response");
    }
    assert_eq!(runs.get(), 2);
    // Each caller still replays its own.
    let again = call(
        &app,
        keyed(
            &key,
            &[("authorization", ""), ("cookie", "sid=user-one")],
            "{}",
        ),
    )
    .await;
    assert!(again.replayed());
    assert_eq!(again.body, "payment 1");
}

#[derive(Clone)]
struct UserId(&'static str);

pub fn principal_scope<B: Backend>(layer: IdempotencyLayer<B>) -> IdempotencyLayer<B> {
    layer.scope(|req: &http::request::Parts| req.extensions.get::<UserId>().map(|u| u.0))
}

pub async fn unidentified_callers_are_refused_unless_shared_is_chosen<B: Backend>(backend: B) {
    let runs = Runs::default();
    let app = payments(
        principal_scope(IdempotencyLayer::new(backend.clone())),
        runs.clone(),
    );
    let key = unique_key("unscoped");
    // No principal in the extensions (authentication inside, by mistake).
    for _ in 0..2 {
        let answer = call(&app, keyed(&key, &[("authorization", "Bearer a")], "{}")).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert_eq!(answer.problem_type(), "unidentified-caller");
    }
    assert_eq!(runs.get(), 0, "nothing ran");
    // With a principal, it runs.
    let mut req = keyed(&key, &[], "{}");
    req.extensions_mut().insert(UserId("u1"));
    assert_eq!(call(&app, req).await.status, StatusCode::CREATED);
    // The explicit opt-in: one shared scope for unidentified requests.
    let shared = payments(
        principal_scope(IdempotencyLayer::new(backend)).shared_anonymous_scope(),
        runs.clone(),
    );
    let first = call(&shared, keyed(&key, &[("authorization", "Bearer a")], "{}")).await;
    let second = call(&shared, keyed(&key, &[("authorization", "Bearer b")], "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(second.replayed(), "shared on purpose");
    assert_eq!(runs.get(), 2);
}

// ---------------------------------------------------------------------------
// The fingerprint covers what changes a body's meaning.

#[derive(serde::Deserialize)]
struct Payment {
    amount: u64,
}

pub async fn a_corrected_content_type_is_422_not_the_stale_415<B: Backend>(backend: B) {
    let runs = Runs::default();
    let app = {
        let runs = runs.clone();
        Router::new()
            .route(
                "/payments",
                post(move |Json(p): Json<Payment>| {
                    let n = runs.bump();
                    async move { (StatusCode::CREATED, format!("payment {n} of {}", p.amount)) }
                }),
            )
            .layer(IdempotencyLayer::new(backend))
    };
    let key = unique_key("415");
    let body = r#"{"amount":5}"#;
    let without = call(&app, keyed(&key, &[], body)).await;
    assert_eq!(without.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let corrected = call(
        &app,
        keyed(&key, &[("content-type", "application/json")], body),
    )
    .await;
    assert_eq!(corrected.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(corrected.problem_type(), "fingerprint-mismatch");
    // The same bytes with and without Content-Encoding are two requests.
    let key = unique_key("encoding");
    let json = [("content-type", "application/json")];
    let gzip = [
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ];
    assert_eq!(
        call(&app, keyed(&key, &json, body)).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        call(&app, keyed(&key, &gzip, body)).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert!(call(&app, keyed(&key, &json, body)).await.replayed());
    assert_eq!(
        runs.get(),
        1,
        "the handler ran for the one well-formed request"
    );
}

// ---------------------------------------------------------------------------
// Streams.

use tokio_stream_frames::Frames;

/// A minimal stream of frames fed from a channel.
mod tokio_stream_frames {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::Frame;

    pub struct Frames(pub tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl futures_core::Stream for Frames {
        type Item = Result<Frame<Bytes>, std::convert::Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }
}

/// A handler answering with a body fed by the test, with `content_type`
/// and no length.
pub fn fed_stream<B: Backend>(
    layer: IdempotencyLayer<B>,
    runs: Runs,
    content_type: &'static str,
    feed: Arc<std::sync::Mutex<Vec<tokio::sync::mpsc::UnboundedReceiver<Bytes>>>>,
) -> Router {
    Router::new()
        .route(
            "/payments",
            post(move || {
                runs.bump();
                let rx = feed.lock().unwrap().remove(0);
                async move {
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .header(header::CONTENT_TYPE, content_type)
                        .header("x-a", "1")
                        .header(header::SET_COOKIE, "s=1")
                        .header("x-b", "2")
                        .header("x-c", "3")
                        .header("x-b", "4")
                        .body(Body::new(StreamBody::new(Frames(rx))))
                        .unwrap()
                }
            }),
        )
        .layer(layer)
}

pub type Feed = Arc<std::sync::Mutex<Vec<tokio::sync::mpsc::UnboundedReceiver<Bytes>>>>;

pub fn feeds(n: usize) -> (Vec<tokio::sync::mpsc::UnboundedSender<Bytes>>, Feed) {
    let (txs, rxs) = (0..n)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    (txs, Arc::new(std::sync::Mutex::new(rxs)))
}

/// Server-sent events pass straight through: the first frame reaches the
/// client while the handler is still streaming, and nothing is stored; a
/// retry gets the "not kept" answer (the handler ran).
pub async fn an_event_stream_is_never_held_back<B: Backend>(backend: B) {
    let runs = Runs::default();
    let (mut txs, feed) = feeds(1);
    let app = fed_stream(
        IdempotencyLayer::new(backend),
        runs.clone(),
        "text/event-stream",
        feed,
    );
    let key = unique_key("sse");
    let res = app.clone().oneshot(keyed(&key, &[], "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let tx = txs.remove(0);
    tx.send(Bytes::from_static(b"data: one\n\n")).unwrap();
    let mut body = res.into_body();
    let first = tokio::time::timeout(Duration::from_millis(100), body.frame())
        .await
        .expect("the first event must arrive at once")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "data: one\n\n");
    tx.send(Bytes::from_static(b"data: two\n\n")).unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: two\n\n");
    let retry = call(&app, keyed(&key, &[], "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.problem_type(), "response-not-kept");
    assert_eq!(runs.get(), 1);
}

/// A chunked body without `Content-Length` is forwarded as it arrives and
/// stored at its end; the replay is byte-identical, with the headers in
/// the order the handler set them (`Set-Cookie` dropped from the middle).
pub async fn a_chunked_body_is_forwarded_then_stored_and_replayed_identically<B: Backend>(
    backend: B,
) {
    let runs = Runs::default();
    let (mut txs, feed) = feeds(1);
    let app = fed_stream(
        IdempotencyLayer::new(backend),
        runs.clone(),
        "application/json",
        feed,
    );
    let key = unique_key("chunked");
    let res = app.clone().oneshot(keyed(&key, &[], "{}")).await.unwrap();
    let tx = txs.remove(0);
    let (parts, mut body) = res.into_parts();
    assert!(!parts.headers.contains_key(header::CONTENT_LENGTH));
    tx.send(Bytes::from_static(b"[1,")).unwrap();
    let first = tokio::time::timeout(Duration::from_millis(100), body.frame())
        .await
        .expect("the first chunk must arrive at once")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "[1,");
    tx.send(Bytes::from_static(b"2,")).unwrap();
    tx.send(Bytes::from_static(b"3]")).unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "2,3]");
    let replay = call(&app, keyed(&key, &[], "{}")).await;
    assert!(
        replay.replayed(),
        "stored by the time the client saw the end"
    );
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.body, "[1,2,3]");
    let seen: Vec<String> = replay
        .headers
        .iter()
        .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            "content-type: application/json",
            "x-a: 1",
            "x-b: 2",
            "x-b: 4",
            "x-c: 3",
            "content-length: 7",
            "idempotent-replayed: true"
        ]
    );
    assert_eq!(runs.get(), 1);
}

// ---------------------------------------------------------------------------
// Responses that cannot be stored.

pub async fn an_unstorable_response_is_never_run_again<B: Backend>(backend: B) {
    let runs = Runs::default();
    let app = {
        let runs = runs.clone();
        Router::new()
            .route(
                "/payments",
                post(move || {
                    let n = runs.bump();
                    async move { (StatusCode::ACCEPTED, format!("{n}").repeat(4096)) }
                }),
            )
            .layer(IdempotencyLayer::new(backend).max_stored_response(1024))
    };
    let key = unique_key("oversize");
    let first = call(&app, keyed(&key, &[], "{}")).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(first.body.len(), 4096);
    let retry = call(&app, keyed(&key, &[], "{}")).await;
    assert_eq!(retry.status, StatusCode::ACCEPTED, "the original status");
    assert!(retry.replayed());
    assert_eq!(retry.problem_type(), "response-not-kept");
    assert_eq!(runs.get(), 1);
}

// ---------------------------------------------------------------------------
// Durations.

pub async fn the_longest_ttls_store_and_never_panic<B: Backend>(backend: B) {
    let runs = Runs::default();
    for persist in [false, true] {
        let app = {
            let runs = runs.clone();
            Router::new()
                .route(
                    "/payments",
                    post(move || {
                        let n = runs.bump();
                        async move {
                            let persist = persist.then_some(Persist::For(Duration::MAX));
                            (
                                StatusCode::CREATED,
                                axum::Extension(persist),
                                format!("payment {n}"),
                            )
                        }
                    }),
                )
                .layer(
                    IdempotencyLayer::new(backend.clone())
                        .ttl(Duration::MAX)
                        .lock_ttl(Duration::MAX),
                )
        };
        let key = unique_key("max-ttl");
        let first = call(&app, keyed(&key, &[], "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let retry = call(&app, keyed(&key, &[], "{}")).await;
        assert!(retry.replayed(), "stored (Persist::For(MAX): {persist})");
        assert_eq!(retry.body, first.body);
    }
    assert_eq!(runs.get(), 2);
}

// ---------------------------------------------------------------------------
// A crashed holder.

/// A holder that took the key and died: its lock is never released. The key
/// answers `409` with a `Retry-After` that covers the wait, and is free once
/// the lock TTL has passed.
pub async fn a_crashed_holder_blocks_the_key_at_most_the_lock_ttl<B: Backend>(
    backend: B,
    lock_ttl: Duration,
) {
    let runs = Runs::default();
    let app = payments(
        IdempotencyLayer::new(backend.clone()).lock_ttl(lock_ttl),
        runs.clone(),
    );
    let key = unique_key("crashed");
    let storage = StorageKey::derive(
        &ScopeValue::anonymous(),
        &IdempotencyKey::parse(&key.parse().unwrap()).unwrap(),
    );
    let Begin::Acquired(lock) = backend
        .begin(&storage, &Fingerprint::from_bytes([0; 32]), lock_ttl)
        .await
        .unwrap()
    else {
        panic!("a new key is free");
    };
    std::mem::forget(lock); // the holder's process died
    let busy = call(&app, keyed(&key, &[], "{}")).await;
    // Retry-After counts from when the answer arrives, as a client reads it.
    let answered = tokio::time::Instant::now();
    assert_eq!(busy.status, StatusCode::CONFLICT);
    let retry_after: u64 = busy.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The time left on the lock, rounded up: at most the lock TTL.
    assert!(
        retry_after >= 1 && retry_after <= lock_ttl.as_secs(),
        "Retry-After {retry_after} for a {lock_ttl:?} lock"
    );
    tokio::time::sleep_until(answered + Duration::from_secs(retry_after)).await;
    let after = call(&app, keyed(&key, &[], "{}")).await;
    assert_eq!(after.status, StatusCode::CREATED, "free after Retry-After");
    assert_eq!(runs.get(), 1);
}

// ---------------------------------------------------------------------------
// Every scenario, for every backend.

/// One test per scenario, each with a backend made by `$make`. The
/// invoking module has `common` and this module's items in scope.
#[macro_export]
macro_rules! scenarios {
    ($make:expr) => {
        #[tokio::test]
        async fn client_closes_the_socket_mid_handler() {
            client_closes_the_socket_mid_handler_and_the_retry_replays($make).await;
        }

        #[tokio::test]
        async fn client_leaves_at_every_await_point() {
            common::stepped::never_twice(&$make, &unique_key("leave")).await;
        }

        #[tokio::test]
        async fn with_cancel_client_leaves_at_every_await_point() {
            common::stepped::cancel_leaves_no_lock(&$make, &unique_key("cancel")).await;
        }

        #[tokio::test]
        async fn outer_timeout() {
            an_outer_timeout_does_not_cancel_the_handler($make).await;
        }

        #[tokio::test]
        async fn blank_authorization() {
            blank_authorization_never_shares_a_response($make).await;
        }

        #[tokio::test]
        async fn unidentified_callers() {
            unidentified_callers_are_refused_unless_shared_is_chosen($make).await;
        }

        #[tokio::test]
        async fn corrected_content_type() {
            a_corrected_content_type_is_422_not_the_stale_415($make).await;
        }

        #[tokio::test]
        async fn event_stream() {
            an_event_stream_is_never_held_back($make).await;
        }

        #[tokio::test]
        async fn chunked_body() {
            a_chunked_body_is_forwarded_then_stored_and_replayed_identically($make).await;
        }

        #[tokio::test]
        async fn unstorable_response() {
            an_unstorable_response_is_never_run_again($make).await;
        }

        #[tokio::test]
        async fn longest_ttls() {
            the_longest_ttls_store_and_never_panic($make).await;
        }
    };
}
