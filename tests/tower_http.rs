//! The layer beside tower-http's layers and axum's body limit: which order
//! does what.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tower_idempotency::{
    Backend, BackendError, Begin, Completion, Fingerprint, IdempotencyLayer, MemoryBackend,
    MemoryLock, OnDisconnect, Record, StorageKey,
};

const JSON: &str = r#"{"id":"pay_000001","amount":500,"currency":"EUR","status":"succeeded","note":"compressible compressible compressible"}"#;

fn payments(runs: Arc<AtomicUsize>, delay: Duration) -> Router {
    Router::new().route(
        "/payments",
        post(move |body: Bytes| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                let _ = body;
                (
                    StatusCode::CREATED,
                    [(header::CONTENT_TYPE, "application/json")],
                    JSON,
                )
            }
        }),
    )
}

fn request(key: &str, accept_gzip: bool) -> Request<Body> {
    let mut b = Request::post("/payments")
        .header("idempotency-key", key)
        .header(header::CONTENT_TYPE, "application/json");
    if accept_gzip {
        b = b.header(header::ACCEPT_ENCODING, "gzip");
    }
    b.body(Body::from(r#"{"amount":500}"#)).unwrap()
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn call(app: &Router, req: Request<Body>) -> Reply {
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn gunzip(bytes: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut out)
        .unwrap();
    out
}

/// `TimeoutLayer` outside: the timeout drops our response future, but the
/// handler that started goes on to the end and its response is stored, so
/// the client's retry gets it (no second run, no stored timeout).
#[tokio::test(start_paused = true)]
async fn timeout_outside_lets_the_handler_finish_and_the_retry_replays() {
    let runs = Arc::new(AtomicUsize::new(0));
    let backend = MemoryBackend::new();
    let app = payments(runs.clone(), Duration::from_secs(10))
        .layer(IdempotencyLayer::new(backend.clone()))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(1),
        ));
    let first = call(&app, request("k", false)).await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    // The handler goes on under its lock: a retry now is told to wait.
    let during = call(&app, request("k", false)).await;
    assert_eq!(during.status, StatusCode::CONFLICT);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(backend.in_flight_count(), 0);
    let retry = call(&app, request("k", false)).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(retry.body, JSON);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
}

/// With `OnDisconnect::Cancel` the timeout cancels the handler and frees
/// the key: the retry runs again.
#[tokio::test(start_paused = true)]
async fn timeout_outside_with_cancel_releases_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let backend = MemoryBackend::new();
    let app = payments(runs.clone(), Duration::from_secs(10))
        .layer(IdempotencyLayer::new(backend.clone()).on_disconnect(OnDisconnect::Cancel))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(1),
        ));
    let first = call(&app, request("k", false)).await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    tokio::task::yield_now().await;
    assert_eq!(
        backend.in_flight_count(),
        0,
        "the timeout released the lock"
    );
    assert_eq!(backend.stored_count(), 0);
    let fast = payments(runs.clone(), Duration::ZERO).layer(IdempotencyLayer::new(backend.clone()));
    let retry = call(&fast, request("k", false)).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.headers.contains_key("idempotent-replayed"));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// `CompressionLayer` outside (recommended): the plain response is stored
/// and each replay is compressed, or not, for the client asking.
#[tokio::test]
async fn compression_outside_stores_plain_bytes_and_encodes_per_request() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = payments(runs.clone(), Duration::ZERO)
        .layer(IdempotencyLayer::new(MemoryBackend::new()))
        .layer(CompressionLayer::new());
    let first = call(&app, request("k", true)).await;
    assert_eq!(first.headers[header::CONTENT_ENCODING], "gzip");
    assert_eq!(gunzip(&first.body), JSON);

    let plain = call(&app, request("k", false)).await;
    assert_eq!(plain.headers["idempotent-replayed"], "true");
    assert!(!plain.headers.contains_key(header::CONTENT_ENCODING));
    assert_eq!(plain.body, JSON);

    let gzip = call(&app, request("k", true)).await;
    assert_eq!(gzip.headers["idempotent-replayed"], "true");
    assert_eq!(gzip.headers[header::CONTENT_ENCODING], "gzip");
    assert_eq!(gunzip(&gzip.body), JSON);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `CompressionLayer` inside: the *compressed* bytes are stored, with their
/// `Content-Encoding` and `Vary`, and replayed as they are — also to a client
/// that did not ask for gzip. Adding `Accept-Encoding` to the fingerprint
/// turns that into a 422 instead.
#[tokio::test]
async fn compression_inside_replays_the_stored_encoding() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = payments(runs.clone(), Duration::ZERO)
        .layer(CompressionLayer::new())
        .layer(IdempotencyLayer::new(MemoryBackend::new()));
    call(&app, request("k", true)).await;
    let replay = call(&app, request("k", false)).await;
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(
        replay.headers[header::CONTENT_ENCODING],
        "gzip",
        "stored encoding, whatever was asked"
    );
    assert!(
        replay.headers[header::VARY]
            .to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("accept-encoding")
    );
    assert_eq!(
        replay.headers[header::CONTENT_LENGTH],
        replay.body.len().to_string()
    );
    assert_eq!(gunzip(&replay.body), JSON);

    let guarded = payments(runs.clone(), Duration::ZERO)
        .layer(CompressionLayer::new())
        .layer(
            IdempotencyLayer::new(MemoryBackend::new())
                .fingerprint_headers([header::ACCEPT_ENCODING]),
        );
    call(&guarded, request("k", true)).await;
    assert_eq!(
        call(&guarded, request("k", false)).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        call(&guarded, request("k", true)).await.headers["idempotent-replayed"],
        "true"
    );
}

/// A memory backend that counts `begin` calls.
#[derive(Clone, Default)]
struct CountingBackend {
    inner: MemoryBackend,
    begins: Arc<AtomicUsize>,
}

impl Backend for CountingBackend {
    type Lock = MemoryLock;

    async fn begin(
        &self,
        key: &StorageKey,
        fp: &Fingerprint,
        ttl: Duration,
    ) -> Result<Begin<MemoryLock>, BackendError> {
        self.begins.fetch_add(1, Ordering::SeqCst);
        self.inner.begin(key, fp, ttl).await
    }

    async fn complete(
        &self,
        lock: MemoryLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        self.inner.complete(lock, record, ttl).await
    }

    async fn release(&self, lock: MemoryLock) -> Result<(), BackendError> {
        self.inner.release(lock).await
    }

    async fn extend(&self, lock: &MemoryLock, ttl: Duration) -> Result<bool, BackendError> {
        self.inner.extend(lock, ttl).await
    }
}

/// `RequestBodyLimitLayer` outside with a smaller limit: a request that
/// declares its length is answered `413` by tower-http itself, before this
/// layer looks at the key (its answer is not our problem document, and
/// `begin` never runs); a streamed body hits the limit while this layer
/// buffers it, and this layer answers `413` — still before `begin`. Inside,
/// our own limit answers first.
#[tokio::test]
async fn request_body_limits() {
    let runs = Arc::new(AtomicUsize::new(0));
    let backend = CountingBackend::default();
    let outside = payments(runs.clone(), Duration::ZERO)
        .layer(IdempotencyLayer::new(backend.clone()))
        .layer(RequestBodyLimitLayer::new(4));

    let mut declared = request("k", false);
    declared
        .headers_mut()
        .insert(header::CONTENT_LENGTH, "14".parse().unwrap());
    let answer = call(&outside, declared).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_ne!(
        answer
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap()),
        Some("application/problem+json"),
        "tower-http answered, not this layer"
    );
    assert_eq!(
        backend.begins.load(Ordering::SeqCst),
        0,
        "the key was never looked up"
    );

    let streamed = Request::post("/payments")
        .header("idempotency-key", "k")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(futures_stream_of(r#"{"amount":500}"#)))
        .unwrap();
    let answer = call(&outside, streamed).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        answer.headers[header::CONTENT_TYPE],
        "application/problem+json",
        "this layer reports the outer limit it hit"
    );
    assert_eq!(backend.begins.load(Ordering::SeqCst), 0);

    let ours = payments(runs.clone(), Duration::ZERO)
        .layer(IdempotencyLayer::new(backend.clone()).max_request_body(4));
    let answer = call(&ours, request("k", false)).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        answer.headers[header::CONTENT_TYPE],
        "application/problem+json"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(backend.begins.load(Ordering::SeqCst), 0);
}

/// A body of one chunk with no length known up front.
fn futures_stream_of(
    text: &'static str,
) -> impl futures_core::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    struct Once(Option<Bytes>);
    impl futures_core::Stream for Once {
        type Item = Result<Bytes, std::convert::Infallible>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.take().map(Ok))
        }
        fn size_hint(&self) -> (usize, Option<usize>) {
            (0, None)
        }
    }
    Once(Some(Bytes::from_static(text.as_bytes())))
}

/// axum's `DefaultBodyLimit` applies in the handler's extractor, after our
/// layer buffered the body: its 413 is the handler's answer, and like any
/// 4xx it is stored and replayed for the same request.
#[tokio::test]
async fn axum_default_body_limit_answer_is_stored() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = payments(runs.clone(), Duration::ZERO)
        .layer(DefaultBodyLimit::max(4))
        .layer(IdempotencyLayer::new(MemoryBackend::new()));
    assert_eq!(
        call(&app, request("k", false)).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let again = call(&app, request("k", false)).await;
    assert_eq!(again.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the extractor refused before the handler body ran"
    );
}

/// `TraceLayer` around it: requests flow as usual.
#[tokio::test]
async fn trace_layer_outside() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = payments(runs.clone(), Duration::ZERO)
        .layer(IdempotencyLayer::new(MemoryBackend::new()))
        .layer(TraceLayer::new_for_http());
    call(&app, request("k", false)).await;
    assert_eq!(
        call(&app, request("k", false)).await.headers["idempotent-replayed"],
        "true"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
