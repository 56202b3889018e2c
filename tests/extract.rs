//! `IdempotencyKey` as an axum extractor.

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryBackend};

fn app() -> Router {
    Router::new()
        .route(
            "/required",
            post(|key: IdempotencyKey| async move { format!("key={key}") }),
        )
        .route(
            "/optional",
            post(|key: Option<IdempotencyKey>| async move {
                key.map_or_else(|| "none".to_owned(), |k| format!("key={k}"))
            }),
        )
        .layer(IdempotencyLayer::new(MemoryBackend::new()))
}

async fn call(path: &str, key: Option<&str>) -> (StatusCode, String, String) {
    let mut req = Request::post(path);
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let res = app()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let content_type = res
        .headers()
        .get("content-type")
        .map_or_else(String::new, |v| v.to_str().unwrap().to_owned());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn handlers_receive_the_validated_key() {
    let (status, _, body) = call("/required", Some("\"order-42\"")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "key=order-42", "unquoted, as the client meant it");
    assert_eq!(call("/optional", Some("order-43")).await.2, "key=order-43");
}

#[tokio::test]
async fn a_missing_key_is_a_400_problem_or_none() {
    let (status, content_type, body) = call("/required", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(content_type, "application/problem+json");
    assert!(body.contains("#missing-key"), "{body}");
    assert_eq!(call("/optional", None).await.2, "none");
}
