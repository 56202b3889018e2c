//! The payments API shared by the `payments*` examples: only the backend
//! differs between them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_idempotency::{Backend, IdempotencyLayer};

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
        .unwrap_or_else(PoisonError::into_inner)
        .push(payment.clone());
    (StatusCode::CREATED, Json(payment))
}

async fn list_payments(State(state): State<AppState>) -> Json<Vec<Payment>> {
    let created = state.created.lock().unwrap_or_else(PoisonError::into_inner);
    Json(created.clone())
}

async fn stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let runs = state.handler_runs.load(Ordering::SeqCst);
    Json(serde_json::json!({ "handler_runs": runs }))
}

/// Serves the payments API on `$ADDR` (default `127.0.0.1:3000`) behind
/// `layer`, printing `listening on <addr>` once bound. `PAYMENT_DELAY_MS`
/// slows the handler down; `IDEMPOTENCY=off` serves without the layer (the
/// baseline of the load benchmarks).
#[allow(dead_code, reason = "the peers of the load benchmark use `serve_with`")]
pub async fn serve<B: Backend>(
    layer: IdempotencyLayer<B>,
) -> Result<(), Box<dyn std::error::Error>> {
    serve_with(|routes| routes.layer(layer)).await
}

/// Serves the payments API with `protect` wrapped around its routes (unless
/// `IDEMPOTENCY=off`), as [`serve`] does with this crate's layer.
pub async fn serve_with(
    protect: impl FnOnce(Router) -> Router,
) -> Result<(), Box<dyn std::error::Error>> {
    let state = Arc::new(Payments {
        delay: payment_delay()?,
        ..Payments::default()
    });
    let routes = Router::new()
        .route("/payments", post(create_payment).get(list_payments))
        .route("/stats", get(stats))
        .with_state(state);
    serve_routes(routes, protect).await
}

/// How long a payment takes: `PAYMENT_DELAY_MS` (default none).
pub fn payment_delay() -> Result<Duration, Box<dyn std::error::Error>> {
    Ok(Duration::from_millis(
        match std::env::var("PAYMENT_DELAY_MS") {
            Ok(v) => v.parse()?,
            Err(_) => 0,
        },
    ))
}

/// Serves `routes` on `$ADDR` (default `127.0.0.1:3000`) with `protect`
/// wrapped around them unless `IDEMPOTENCY=off`, printing
/// `listening on <addr>` once bound.
pub async fn serve_routes(
    routes: Router,
    protect: impl FnOnce(Router) -> Router,
) -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let app = if std::env::var("IDEMPOTENCY").is_ok_and(|v| v == "off") {
        routes
    } else {
        protect(routes)
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
