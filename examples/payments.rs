//! A payments API protected by `tower-idempotency` (memory backend).
//!
//! Run it:
//!
//! ```sh
//! cargo run --example payments
//! ```
//!
//! Then create a payment twice with the same key — the handler runs once and
//! both answers carry the same id (the second with `Idempotent-Replayed: true`):
//!
//! ```sh
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! curl localhost:3000/stats      # {"handler_runs":1}
//! curl localhost:3000/payments   # the one payment
//! ```
//!
//! The same key with another body is answered `422`; a malformed key `400`.
//! To see a concurrent duplicate answered `409`, slow the handler down:
//! `PAYMENT_DELAY_MS=3000 cargo run --example payments`, then send the same
//! request from two terminals.
//!
//! Environment: `ADDR` (default `127.0.0.1:3000`; `127.0.0.1:0` picks a free
//! port, and the bound address is printed as `listening on <addr>`),
//! `PAYMENT_DELAY_MS` (default 0).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_idempotency::{IdempotencyLayer, MemoryBackend};

#[derive(Deserialize)]
struct NewPayment {
    amount: i64,
    currency: String,
}

#[derive(Clone, Serialize)]
struct Payment {
    id: String,
    amount: i64,
    currency: String,
}

#[derive(Default)]
struct Payments {
    handler_runs: AtomicU64,
    created: Mutex<Vec<Payment>>,
    delay: Duration,
}

type AppState = Arc<Payments>;

async fn create_payment(
    State(state): State<AppState>,
    Json(new): Json<NewPayment>,
) -> (StatusCode, Json<Payment>) {
    let run = state.handler_runs.fetch_add(1, Ordering::SeqCst) + 1;
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let payment = Payment {
        id: format!("pay_{run:06}"),
        amount: new.amount,
        currency: new.currency,
    };
    state
        .created
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(payment.clone());
    (StatusCode::CREATED, Json(payment))
}

async fn list_payments(State(state): State<AppState>) -> Json<Vec<Payment>> {
    let created = state
        .created
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Json(created.clone())
}

async fn stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let runs = state.handler_runs.load(Ordering::SeqCst);
    Json(serde_json::json!({ "handler_runs": runs }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let delay_ms: u64 = match std::env::var("PAYMENT_DELAY_MS") {
        Ok(v) => v.parse()?,
        Err(_) => 0,
    };
    let state = Arc::new(Payments {
        delay: Duration::from_millis(delay_ms),
        ..Payments::default()
    });

    let backend = MemoryBackend::builder().max_entries(100_000).build();
    let app = Router::new()
        .route("/payments", post(create_payment).get(list_payments))
        .route("/stats", get(stats))
        .layer(IdempotencyLayer::new(backend).ttl(Duration::from_hours(24)))
        .with_state(state);

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
