//! End to end over real TCP sockets: axum `Router::layer`,
//! `tower::ServiceBuilder`, a bare hyper 1 server, and the `payments` example.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use common::{Answer as Reply, request, spawn_example};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower::{Layer, ServiceBuilder};
use tower_idempotency::{IdempotencyBody, IdempotencyLayer, MemoryBackend};

async fn post_key(addr: SocketAddr, key: &str, body: &str) -> Reply {
    request(
        addr,
        "POST",
        "/orders",
        &[
            ("idempotency-key", key),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}

async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Serves a tower service with hyper 1, one task per connection.
fn serve_hyper<S>(listener: tokio::net::TcpListener, service: S)
where
    S: tower::Service<
            Request<Incoming>,
            Response = Response<IdempotencyBody<Full<Bytes>>>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn assert_exactly_once(addr: SocketAddr, runs: &AtomicUsize) {
    let first = post_key(addr, "\"order-1\"", r#"{"item":"book"}"#).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = post_key(addr, "\"order-1\"", r#"{"item":"book"}"#).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body, first.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(
        again.headers["content-length"],
        first.body.len().to_string()
    );
    assert!(!again.headers.contains_key("set-cookie"));
    let mismatch = post_key(addr, "\"order-1\"", r#"{"item":"car"}"#).await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(mismatch.headers["content-type"], "application/problem+json");
    let bad = post_key(addr, "\"\"", "{}").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Concurrent duplicates over separate connections.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        tasks.spawn(async move { post_key(addr, "\"order-2\"", "{}").await });
    }
    let replies = tasks.join_all().await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let originals = replies
        .iter()
        .filter(|r| {
            r.status == StatusCode::CREATED && !r.headers.contains_key("idempotent-replayed")
        })
        .count();
    assert_eq!(originals, 1);
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::CREATED || r.status == StatusCode::CONFLICT)
    );
}

#[tokio::test]
async fn axum_router_layer() {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler_runs = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move |body: String| {
                let n = handler_runs.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    (
                        StatusCode::CREATED,
                        [("set-cookie", "seen=1")],
                        format!("{{\"order\":{n},\"body\":{body}}}"),
                    )
                }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryBackend::new()));
    let (listener, addr) = listener().await;
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    assert_exactly_once(addr, &runs).await;
    // Routes without a key, and GETs, are untouched.
    let get = request(addr, "GET", "/orders", &[], "").await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
}

fn counting_handler(
    runs: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<IdempotencyBody<Incoming>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<IdempotencyBody<Incoming>>| {
        let runs = runs.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let body = req.into_body().collect().await.unwrap().to_bytes();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut res = Response::new(Full::new(Bytes::from(format!("order {n}: {body:?}"))));
            *res.status_mut() = StatusCode::CREATED;
            res.headers_mut()
                .insert("set-cookie", "seen=1".parse().unwrap());
            Ok::<_, Infallible>(res)
        }
    })
}

#[tokio::test]
async fn tower_service_builder_with_another_layer() {
    let runs = Arc::new(AtomicUsize::new(0));
    let service = ServiceBuilder::new()
        .concurrency_limit(64)
        .layer(IdempotencyLayer::new(MemoryBackend::new()).required())
        .service(counting_handler(runs.clone()));
    let (listener, addr) = listener().await;
    serve_hyper(listener, service);
    assert_exactly_once(addr, &runs).await;
    let missing = request(addr, "POST", "/orders", &[], "{}").await;
    assert_eq!(
        missing.status,
        StatusCode::BAD_REQUEST,
        "required() over TCP"
    );
}

#[tokio::test]
async fn bare_hyper_server() {
    let runs = Arc::new(AtomicUsize::new(0));
    let service = IdempotencyLayer::new(MemoryBackend::new()).layer(counting_handler(runs.clone()));
    let (listener, addr) = listener().await;
    serve_hyper(listener, service);
    assert_exactly_once(addr, &runs).await;
}

/// Runs the built `payments` example the way the README tells a new user to.
#[tokio::test]
async fn payments_example_answers_twice_with_the_same_id() {
    let (mut child, addr) = spawn_example("payments", &[]).await;
    let payment = |body: &'static str| async move {
        request(
            addr,
            "POST",
            "/payments",
            &[
                ("idempotency-key", "\"k1\""),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
    };
    let first = payment(r#"{"amount":5,"currency":"EUR"}"#).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let second = payment(r#"{"amount":5,"currency":"EUR"}"#).await;
    assert_eq!(second.status, StatusCode::CREATED);
    let id =
        |r: &Reply| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["id"].clone();
    assert_eq!(id(&first), id(&second));
    assert_eq!(second.headers["idempotent-replayed"], "true");
    assert_eq!(
        payment(r#"{"amount":6,"currency":"EUR"}"#).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    let stats = request(addr, "GET", "/stats", &[], "").await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&stats.body).unwrap(),
        serde_json::json!({"handler_runs": 1})
    );
    let list = request(addr, "GET", "/payments", &[], "").await;
    let list: serde_json::Value = serde_json::from_slice(&list.body).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id(&first));
    child.kill().await.unwrap();
}

/// A client that closes its socket mid-handler, then retries: one run.
#[tokio::test]
async fn payments_example_survives_a_client_that_gives_up() {
    common::example_survives_a_client_that_gives_up("payments", &[]).await;
}
