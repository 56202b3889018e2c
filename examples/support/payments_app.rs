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
use tower_idempotency::{Backend, IdempotencyLayer, ShutdownHandle};

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
/// baseline of the load benchmarks). On `SIGTERM` or Ctrl-C it shuts down
/// gracefully (see [`serve_routes`]).
#[allow(dead_code, reason = "the peers of the load benchmark use `serve_with`")]
pub async fn serve<B: Backend>(
    layer: IdempotencyLayer<B>,
) -> Result<(), Box<dyn std::error::Error>> {
    let layer = configured(layer)?;
    let shutdown = layer.shutdown_handle();
    serve_routes(
        payment_routes()?,
        |routes| routes.layer(layer),
        Some(shutdown),
    )
    .await
}

/// `layer` with the settings the environment asks for:
///
/// - `IDEMPOTENCY_FINGERPRINT=json` fingerprints bodies as canonical JSON (a
///   retry whose JSON was re-serialised replays), `raw` (the default) by
///   their bytes;
/// - `IDEMPOTENCY_WAIT_MS=<ms>` lets a duplicate of a payment in flight wait
///   that long for its response instead of the immediate `409`;
/// - `IDEMPOTENCY_RETENTION_HEADER=1` adds `Idempotency-TTL` (seconds the
///   key is kept) to every answer to a keyed request.
pub fn configured<B>(
    layer: IdempotencyLayer<B>,
) -> Result<IdempotencyLayer<B>, Box<dyn std::error::Error>> {
    let mut layer = match std::env::var("IDEMPOTENCY_FINGERPRINT").as_deref() {
        Err(_) | Ok("raw") => layer,
        Ok("json") => layer.fingerprint_json(),
        Ok(other) => {
            return Err(format!("IDEMPOTENCY_FINGERPRINT={other:?}: use raw or json").into());
        }
    };
    if let Ok(wait) = std::env::var("IDEMPOTENCY_WAIT_MS") {
        let ms: u64 = wait
            .parse()
            .map_err(|_| format!("IDEMPOTENCY_WAIT_MS={wait:?}: not a number of milliseconds"))?;
        layer = layer.wait_for_in_flight(Duration::from_millis(ms));
    }
    match std::env::var("IDEMPOTENCY_RETENTION_HEADER").as_deref() {
        Err(_) | Ok("0" | "") => {}
        Ok("1") => layer = layer.retention_header(),
        Ok(other) => {
            return Err(format!("IDEMPOTENCY_RETENTION_HEADER={other:?}: use 1 or 0").into());
        }
    }
    Ok(layer)
}

/// Serves the payments API with `protect` wrapped around its routes (unless
/// `IDEMPOTENCY=off`), as [`serve`] does with this crate's layer.
#[allow(dead_code, reason = "the examples use `serve`")]
pub async fn serve_with(
    protect: impl FnOnce(Router) -> Router,
) -> Result<(), Box<dyn std::error::Error>> {
    serve_routes(payment_routes()?, protect, None).await
}

fn payment_routes() -> Result<Router, Box<dyn std::error::Error>> {
    let state = Arc::new(Payments {
        delay: payment_delay()?,
        ..Payments::default()
    });
    Ok(Router::new()
        .route("/payments", post(create_payment).get(list_payments))
        .route("/stats", get(stats))
        .with_state(state))
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
/// `listening on <addr>` once bound. Logs go to standard error through
/// `tracing-subscriber` (`RUST_LOG`, default `info`).
///
/// On `SIGTERM` or Ctrl-C it stops accepting connections and lets the
/// requests of connected clients finish (axum's graceful shutdown), while
/// `shutdown` refuses new keyed requests and waits for the keyed work —
/// connected or not: handlers whose clients left, their stores — for up to
/// `SHUTDOWN_GRACE_SECS` (default 10) before it cuts off what still runs.
/// The process then exits by itself.
pub async fn serve_routes(
    routes: Router,
    protect: impl FnOnce(Router) -> Router,
    shutdown: Option<ShutdownHandle>,
) -> Result<(), Box<dyn std::error::Error>> {
    // First: a signal from now on shuts down gracefully instead of killing.
    let signal = terminated()?;
    init_logging();
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let grace = shutdown_grace()?;
    let app = if std::env::var("IDEMPOTENCY").is_ok_and(|v| v == "off") {
        routes
    } else {
        protect(routes)
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let shutdown = shutdown.unwrap_or_else(|| IdempotencyLayer::new(()).shutdown_handle());
    let serve = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.started())
        .into_future();
    serve_until_shut_down(serve, &shutdown, signal, grace).await
}

/// How long a shutdown waits for the keyed work: `SHUTDOWN_GRACE_SECS`
/// (default 10).
pub fn shutdown_grace() -> Result<Duration, Box<dyn std::error::Error>> {
    Ok(Duration::from_secs(
        match std::env::var("SHUTDOWN_GRACE_SECS") {
            Ok(v) => v.parse()?,
            Err(_) => 10,
        },
    ))
}

/// Runs `serve`, a server whose own graceful shutdown waits for
/// `shutdown.started()`, until it has shut down. The layer's shutdown starts
/// with `signal`, beside the server's: its grace period bounds the keyed
/// requests of connected clients too.
///
/// The server waits for every open connection; one whose client sends
/// slowly (half a request) would keep the process up for ever. The layer's
/// work is settled within its two waits: connections still open after that
/// are closed.
pub async fn serve_until_shut_down<E>(
    serve: impl Future<Output = Result<(), E>>,
    shutdown: &ShutdownHandle,
    signal: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), Box<dyn std::error::Error>>
where
    E: Into<Box<dyn std::error::Error>>,
{
    let finished = shutdown.shutdown_on(signal, grace);
    let bound = async {
        shutdown.started().await;
        tokio::time::sleep(2 * grace.max(Duration::from_secs(5)) + Duration::from_secs(1)).await;
    };
    tokio::select! {
        served = serve => served.map_err(Into::into)?,
        () = bound => tracing::warn!("connections still open after the grace period are closed"),
    }
    let report = finished.await;
    tracing::info!(?report, "idempotency work finished");
    tracing::info!("shut down");
    Ok(())
}

/// Resolves on `SIGTERM` (a deploy, `kill`) or Ctrl-C (`SIGINT`). The
/// handlers are installed when this is called, not when it is first
/// awaited: a signal that comes right after start-up is not lost (nor does
/// it kill the process).
pub fn terminated() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::info!("shutting down: finishing requests in flight");
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: finishing requests in flight");
    })
}

/// `RUST_LOG` (default `info`) to standard error: the layer's warnings (a
/// refused Redis eviction policy, a lost lock, a failed store) show up
/// where the operator looks.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
