//! What a client that retries meets (`tests/retry_scenarios/`), on the
//! PostgreSQL backend (the server on `DATABASE_URL`). Needs the `postgres`
//! feature.

mod common;
mod postgres_support;
mod retry_scenarios;

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use common::Runs;
use http::StatusCode;
use http_body_util::BodyExt;
use retry_scenarios::*;
use tower::ServiceExt;
use tower_idempotency::IdempotencyLayer;

/// PostgreSQL. (A crashed holder's session lock ends with its session: see
/// tests/postgres.rs.)
mod postgres {
    use super::*;
    use crate::postgres_support::{backend, backend_in};
    use tower_idempotency::PostgresMode;

    // Lease mode, the default.
    scenarios!(backend().await);

    /// Lease mode: a crashed holder's lease lapses after the lock TTL (real
    /// time: a 2 s lease).
    #[tokio::test]
    async fn crashed_holder() {
        a_crashed_holder_blocks_the_key_at_most_the_lock_ttl(
            backend().await,
            Duration::from_secs(2),
        )
        .await;
    }

    mod advisory {
        use super::*;
        scenarios!(backend_in(PostgresMode::Advisory).await);
    }

    /// Transaction mode holds a response back until its transaction
    /// committed: nothing reaches the client that could still be rolled
    /// back. A chunked body arrives whole, after the handler finished.
    #[tokio::test]
    async fn transaction_mode_sends_a_chunked_body_only_once_committed() {
        let runs = Runs::default();
        let (mut txs, feed) = feeds(1);
        let app = fed_stream(
            IdempotencyLayer::new(backend_in(PostgresMode::Transaction).await),
            runs.clone(),
            "application/json",
            feed,
        );
        let key = unique_key("tx-chunked");
        let pending = tokio::spawn(app.clone().oneshot(keyed(&key, &[], "{}")));
        let tx = txs.remove(0);
        tx.send(Bytes::from_static(b"[1,")).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !pending.is_finished(),
            "a response was delivered before its transaction committed"
        );
        tx.send(Bytes::from_static(b"2]")).unwrap();
        drop(tx);
        let res = pending.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "[1,2]");
        let replay = call(&app, keyed(&key, &[], "{}")).await;
        assert!(replay.replayed());
        assert_eq!(replay.body, "[1,2]");
        assert_eq!(runs.get(), 1);
    }

    /// Transaction mode commits an unstorable response with a "not kept"
    /// marker even under `Unstorable::Release`: releasing would roll back
    /// the writes of a response the client is about to get.
    #[tokio::test]
    async fn transaction_mode_keeps_a_marker_whatever_unstorable_says() {
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
                .layer(
                    IdempotencyLayer::new(backend_in(PostgresMode::Transaction).await)
                        .max_stored_response(1024)
                        .unstorable(tower_idempotency::Unstorable::Release),
                )
        };
        let key = unique_key("tx-oversize");
        let first = call(&app, keyed(&key, &[], "{}")).await;
        assert_eq!(first.status, StatusCode::ACCEPTED);
        let retry = call(&app, keyed(&key, &[], "{}")).await;
        assert_eq!(retry.status, StatusCode::ACCEPTED);
        assert_eq!(retry.problem_type(), "response-not-kept");
        assert_eq!(runs.get(), 1);
    }
}
