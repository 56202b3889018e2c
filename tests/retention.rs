//! The retention header (`Idempotency-TTL`): what each answer to a keyed
//! request says, on memory, Redis and PostgreSQL.

mod common;
mod postgres_support;
mod redis_support;

use std::time::Duration;

use bytes::Bytes;
use common::{Answer, InnerReq, post, send};
use http::{HeaderName, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::Layer;
use tower_idempotency::{Backend, IdempotencyLayer, MemoryBackend, Persist};

const TTL: Duration = Duration::from_hours(2);

/// Answers by the request body: `fail` → `500`, `short` → `201` kept for a
/// minute (`Persist::For`), `slow` → `201` after 500 ms, else `201`.
fn handler() -> impl common::Handler {
    tower::service_fn(|req: InnerReq| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let mut res = Response::new(Full::new(Bytes::from_static(b"done")));
        *res.status_mut() = StatusCode::CREATED;
        match &body[..] {
            b"fail" => *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
            b"short" => {
                res.extensions_mut()
                    .insert(Persist::For(Duration::from_mins(1)));
            }
            b"slow" => tokio::time::sleep(Duration::from_millis(500)).await,
            _ => {}
        }
        Ok(res)
    })
}

fn seconds(answer: &Answer, name: &str) -> Option<u64> {
    answer
        .headers
        .get(name)
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

async fn every_answer_says_how_long_the_key_is_kept<B: Backend>(backend: B, tag: &str) {
    let svc = IdempotencyLayer::new(backend)
        .ttl(TTL)
        .retention_header()
        .layer(handler());
    let call = |key: String, body: &'static str| {
        let mut svc = svc.clone();
        async move { send(&mut svc, post("/p", Some(&key), body)).await }
    };
    let header = "idempotency-ttl";

    // Fresh and stored: the TTL. Replayed: what is left of it, counted
    // from when the response was recorded.
    let key = common::unique_key(&format!("{tag}-stored"));
    let fresh = call(key.clone(), "{}").await;
    assert_eq!(fresh.status, StatusCode::CREATED);
    assert_eq!(seconds(&fresh, header), Some(TTL.as_secs()));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let replay = call(key.clone(), "{}").await;
    assert!(replay.replayed());
    let left = seconds(&replay, header).unwrap();
    assert!(
        (TTL.as_secs() - 10..TTL.as_secs()).contains(&left),
        "{left}"
    );
    // The same key with another request: how long it stays bound to the
    // first one.
    let mismatch = call(key, "{\"other\":1}").await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(seconds(&mismatch, header).unwrap() <= left);

    // A response kept for its own TTL: announced and counted down from it.
    let key = common::unique_key(&format!("{tag}-short"));
    assert_eq!(seconds(&call(key.clone(), "short").await, header), Some(60));
    let replay = call(key, "short").await;
    assert!(replay.replayed());
    assert!(seconds(&replay, header).unwrap() <= 60);

    // Not stored: 0, a retry runs again.
    let key = common::unique_key(&format!("{tag}-fail"));
    let failed = call(key, "fail").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(seconds(&failed, header), Some(0));

    // In flight: the TTL its response will be kept for.
    let key = common::unique_key(&format!("{tag}-busy"));
    let first = tokio::spawn(call(key.clone(), "slow"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let busy = call(key, "slow").await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert_eq!(seconds(&busy, header), Some(TTL.as_secs()));
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
}

#[tokio::test]
async fn memory_every_answer_says_how_long_the_key_is_kept() {
    every_answer_says_how_long_the_key_is_kept(MemoryBackend::new(), "memory").await;
}

#[tokio::test]
async fn redis_every_answer_says_how_long_the_key_is_kept() {
    every_answer_says_how_long_the_key_is_kept(redis_support::backend().await, "redis").await;
}

#[tokio::test]
async fn postgres_every_answer_says_how_long_the_key_is_kept() {
    every_answer_says_how_long_the_key_is_kept(postgres_support::backend().await, "pg").await;
}

/// Off by default; a replay of a response stored while it was on does not
/// carry the stale count; another name can be chosen.
#[tokio::test]
async fn the_header_is_opt_in_and_can_be_renamed() {
    let backend = MemoryBackend::new();
    let on = IdempotencyLayer::new(backend.clone())
        .retention_header()
        .layer(handler());
    let off = IdempotencyLayer::new(backend.clone()).layer(handler());
    let key = common::unique_key("opt-in");
    let fresh = send(&mut on.clone(), post("/p", Some(&key), "{}")).await;
    assert!(fresh.headers.contains_key("idempotency-ttl"));
    let replay = send(&mut off.clone(), post("/p", Some(&key), "{}")).await;
    assert!(replay.replayed());
    assert!(!replay.headers.contains_key("idempotency-ttl"));
    let fresh = send(
        &mut off.clone(),
        post("/p", Some(&common::unique_key("off")), "{}"),
    )
    .await;
    assert!(!fresh.headers.contains_key("idempotency-ttl"));

    let renamed = IdempotencyLayer::new(backend)
        .retention_header_named(HeaderName::from_static("x-key-retention"))
        .layer(handler());
    let fresh = send(
        &mut renamed.clone(),
        post("/p", Some(&common::unique_key("renamed")), "{}"),
    )
    .await;
    assert_eq!(seconds(&fresh, "x-key-retention"), Some(86_400));
    assert!(!fresh.headers.contains_key("idempotency-ttl"));
}

/// A body of one chunk that does not say its length: the layer streams it.
struct Unsized(Option<Bytes>);

impl http_body::Body for Unsized {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.take().map(|data| Ok(http_body::Frame::data(data))))
    }
}

/// A streamed response is sent before it is stored, so it carries no
/// promise; its replay does, counted from the TTL it was stored for. A
/// record stored while the header was off gets none when it is turned on:
/// no guess.
#[tokio::test]
async fn no_promise_before_it_is_known() {
    let backend = MemoryBackend::new();
    let streaming = IdempotencyLayer::new(backend.clone())
        .retention_header()
        .layer(tower::service_fn(|_req: InnerReq| async {
            let mut res = Response::new(Unsized(Some(Bytes::from_static(b"streamed"))));
            *res.status_mut() = StatusCode::CREATED;
            Ok::<_, std::convert::Infallible>(res)
        }));
    let key = common::unique_key("streamed");
    let fresh = send(&mut streaming.clone(), post("/p", Some(&key), "{}")).await;
    assert_eq!(
        (fresh.status, &fresh.body[..]),
        (StatusCode::CREATED, &b"streamed"[..])
    );
    assert!(!fresh.headers.contains_key("idempotency-ttl"));
    let replay = send(&mut streaming.clone(), post("/p", Some(&key), "{}")).await;
    assert!(replay.replayed());
    assert!(seconds(&replay, "idempotency-ttl").unwrap() <= 86_400);

    let off = IdempotencyLayer::new(backend.clone()).layer(handler());
    let on = IdempotencyLayer::new(backend)
        .retention_header()
        .layer(handler());
    let key = common::unique_key("stored-off");
    send(&mut off.clone(), post("/p", Some(&key), "{}")).await;
    let replay = send(&mut on.clone(), post("/p", Some(&key), "{}")).await;
    assert!(replay.replayed());
    assert!(!replay.headers.contains_key("idempotency-ttl"));
}
