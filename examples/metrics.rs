//! A payments API with everything wired up: the layer, the `IdempotencyKey`
//! extractor (the key is passed on to the payment provider), a `Persist`
//! response extension, and metrics exported for Prometheus on `/metrics`.
//!
//! Run it:
//!
//! ```sh
//! cargo run --example metrics --features axum,metrics
//! ```
//!
//! Then:
//!
//! ```sh
//! # created once, replayed on the retry
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! # declined (amount over 1000): remembered for one minute only
//! curl -i -H 'Idempotency-Key: "k2"' -H 'content-type: application/json' \
//!      -d '{"amount":5000,"currency":"EUR"}' localhost:3000/payments
//! # without a key: 400 from the extractor, with a problem document
//! curl -i -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! curl localhost:3000/metrics
//! ```
//!
//! `/metrics` shows `idempotency_requests_total{outcome="fresh"}`,
//! `{outcome="replayed"}`, `idempotency_stores_total{result="stored"}`,
//! `idempotency_backend_duration_seconds` and the rest (see the crate docs,
//! "Metrics"). Environment: `ADDR` (default `127.0.0.1:3000`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryBackend, Persist};

#[derive(Deserialize)]
struct NewPayment {
    amount: i64,
    currency: String,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The key arrives through the extractor: a request without one is
/// answered `400` before this runs.
async fn create_payment(key: IdempotencyKey, Json(new): Json<NewPayment>) -> impl IntoResponse {
    // A real handler would send `key` to its payment provider as that
    // provider's idempotency key, so a retry is deduplicated there too.
    let provider_key = format!("shop-{key}");
    if new.amount > 1000 {
        // A decline is replayed for a minute, then a retry runs again (the
        // customer may have topped up their card).
        let declined = Json(serde_json::json!({
            "status": "declined",
            "provider_key": provider_key,
        }));
        return (
            StatusCode::PAYMENT_REQUIRED,
            Extension(Persist::For(Duration::from_mins(1))),
            declined,
        )
            .into_response();
    }
    let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
    let payment = Json(serde_json::json!({
        "id": format!("pay_{id:06}"),
        "amount": new.amount,
        "currency": new.currency,
        "provider_key": provider_key,
    }));
    (StatusCode::CREATED, payment).into_response()
}

async fn metrics(State(handle): State<PrometheusHandle>) -> String {
    handle.render()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    tower_idempotency::describe_metrics();

    let backend = MemoryBackend::builder().max_entries(100_000).build();
    let idempotency = IdempotencyLayer::new(backend).ttl(Duration::from_hours(24));
    let app = Router::new()
        .route("/payments", post(create_payment))
        .layer(idempotency)
        // After `layer`: the exporter's own route is not guarded.
        .route("/metrics", get(metrics))
        .with_state(handle);

    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
