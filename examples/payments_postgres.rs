//! The payments API of `examples/payments.rs` on the PostgreSQL backend: run
//! two of them and they share one record of what ran.
//!
//! ```sh
//! cargo run --features postgres --example payments_postgres
//! ADDR=127.0.0.1:3001 cargo run --features postgres --example payments_postgres   # a second instance
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3000/payments
//! curl -i -H 'Idempotency-Key: "k1"' -H 'content-type: application/json' \
//!      -d '{"amount":5,"currency":"EUR"}' localhost:3001/payments   # replayed
//! ```
//!
//! `PG_MODE` picks how a key is held while the handler runs (see
//! `PostgresMode`): `lease` (the default), `advisory` or `transaction`.
//!
//! - **lease**: kill the session of a running request and its duplicate is
//!   still told to wait. With `PAYMENT_DELAY_MS=3000`, send the POST above,
//!   then within three seconds
//!   `psql test -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'payments_postgres'"`
//!   and send the POST again: `409`, and `/stats` shows one handler run.
//! - **advisory**: the same steps run the duplicate (a second `201`, two
//!   handler runs): a session lock dies with its session.
//! - **transaction**: every payment is a row of `$PAYMENTS_TABLE` (default
//!   `payments`), written through the request's transaction and committed
//!   with its idempotency record. `GET /payments` lists that table. Kill the
//!   session mid-request as above: the first client gets `503`, no row was
//!   written, and the retry writes exactly one.
//!
//! ```sh
//! PG_MODE=transaction PAYMENT_DELAY_MS=3000 cargo run --features postgres --example payments_postgres
//! curl -i -H 'Idempotency-Key: "k2"' -H 'content-type: application/json' \
//!      -d '{"amount":7,"currency":"EUR"}' localhost:3000/payments
//! curl localhost:3000/payments   # the rows of the payments table
//! curl localhost:3000/stats      # {"handler_runs": …}
//! ```
//!
//! At start-up it creates the idempotency table (`migrate`) and, in
//! transaction mode, the payments table; every five minutes it deletes
//! expired records (`purge_expired`).
//!
//! Environment: `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), `IDEMPOTENCY_TABLE` (default
//! `idempotency_records`), `PG_MODE`, `PAYMENTS_TABLE`, `PG_PREPARED=1`
//! (prepared statements: a direct connection, no transaction pooler), `ADDR`,
//! `PAYMENT_DELAY_MS`, `IDEMPOTENCY_FINGERPRINT`, `IDEMPOTENCY_WAIT_MS`, `IDEMPOTENCY_RETENTION_HEADER`, `SHUTDOWN_GRACE_SECS`, `RUST_LOG` and `IDEMPOTENCY=off` as in `payments`. The pool has
//! `PG_POOL_SIZE` connections (default 64); in advisory and transaction
//! modes each request in flight holds one.

#[path = "support/payments_app.rs"]
mod payments_app;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
// The pool crates through the crate's re-export: the pool is of the type
// the backend takes.
use tower_idempotency::deadpool_postgres::{self, tokio_postgres};
use tower_idempotency::{IdempotencyLayer, PostgresBackend, PostgresMode, RequestTransaction};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let mode: PostgresMode = match std::env::var("PG_MODE") {
        Ok(mode) => mode.parse()?,
        Err(_) => PostgresMode::default(),
    };
    let mut config = deadpool_postgres::Config::new();
    config.url = Some(url);
    config.application_name = Some("payments_postgres".to_owned());
    let pool_size = match std::env::var("PG_POOL_SIZE") {
        Ok(v) => v.parse()?,
        Err(_) => 64,
    };
    config.pool = Some(deadpool_postgres::PoolConfig::new(pool_size));
    let pool = config.create_pool(
        Some(deadpool_postgres::Runtime::Tokio1),
        tokio_postgres::NoTls,
    )?;
    let prepared = std::env::var("PG_PREPARED").is_ok_and(|v| v == "1");
    let mut builder = PostgresBackend::builder(pool.clone())
        .mode(mode)
        .prepared_statements(prepared);
    if let Ok(table) = std::env::var("IDEMPOTENCY_TABLE") {
        builder = builder.table(table);
    }
    let backend = builder.build()?;
    backend.migrate().await?;

    let purger = backend.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_mins(5));
        loop {
            every.tick().await;
            if let Err(error) = purger.purge_expired(1000).await {
                tracing::warn!(%error, "purging expired idempotency records failed");
            }
        }
    });

    let layer = IdempotencyLayer::new(backend).ttl(Duration::from_hours(24));
    if mode != PostgresMode::Transaction {
        return payments_app::serve(layer).await;
    }
    let table = std::env::var("PAYMENTS_TABLE").unwrap_or_else(|_| "payments".to_owned());
    let plain = |p: &str| {
        p.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if !table.split('.').all(plain) || table.split('.').count() > 2 {
        return Err(format!("PAYMENTS_TABLE {table:?} is not a plain table name").into());
    }
    pool.get()
        .await?
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (id bigserial PRIMARY KEY, \
             amount bigint NOT NULL, currency text NOT NULL)"
        ))
        .await?;
    let state = Arc::new(Ledger {
        pool,
        insert: format!("INSERT INTO {table} (amount, currency) VALUES ($1, $2) RETURNING id"),
        list: format!("SELECT id, amount, currency FROM {table} ORDER BY id"),
        handler_runs: AtomicU64::new(0),
        delay: payments_app::payment_delay()?,
    });
    let routes = Router::new()
        .route("/payments", post(create_payment).get(list_payments))
        .route("/stats", get(stats))
        .with_state(state);
    let layer = payments_app::configured(layer)?;
    let shutdown = layer.shutdown_handle();
    payments_app::serve_routes(routes, |routes| routes.layer(layer), Some(shutdown)).await
}

/// Transaction mode's payments: rows of a table.
struct Ledger {
    pool: deadpool_postgres::Pool,
    insert: String,
    list: String,
    handler_runs: AtomicU64,
    delay: Duration,
}

#[derive(Deserialize)]
struct NewPayment {
    amount: i64,
    currency: String,
}

type Answer = (StatusCode, Json<serde_json::Value>);

fn failed(error: impl std::fmt::Display) -> Answer {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(serde_json::json!({ "error": error.to_string() })),
    )
}

/// Writes the payment through the request's transaction: it commits with
/// the stored response, or not at all. A request without a key has no
/// transaction and writes directly.
async fn create_payment(
    State(ledger): State<Arc<Ledger>>,
    // With this crate's `axum` feature, `Option<RequestTransaction>` works too.
    tx: Option<Extension<RequestTransaction>>,
    Json(new): Json<NewPayment>,
) -> Answer {
    ledger.handler_runs.fetch_add(1, Ordering::SeqCst);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&new.amount, &new.currency];
    let row = match tx {
        Some(Extension(tx)) => match tx.client().await {
            Ok(client) => client.query_one(&ledger.insert, &params).await,
            Err(error) => return failed(error),
        },
        None => match ledger.pool.get().await {
            Ok(client) => client.query_one(&ledger.insert, &params).await,
            Err(error) => return failed(error),
        },
    };
    let id: i64 = match row {
        Ok(row) => row.get(0),
        Err(error) => return failed(error),
    };
    if !ledger.delay.is_zero() {
        tokio::time::sleep(ledger.delay).await;
    }
    (
        StatusCode::CREATED,
        Json(serde_json::json!({
            "id": format!("pay_{id:06}"),
            "amount": new.amount,
            "currency": new.currency,
        })),
    )
}

async fn list_payments(State(ledger): State<Arc<Ledger>>) -> Answer {
    let rows = match ledger.pool.get().await {
        Ok(client) => client.query(&ledger.list, &[]).await,
        Err(error) => return failed(error),
    };
    match rows {
        Ok(rows) => {
            let payments: Vec<_> = rows
                .iter()
                .map(|row| {
                    let id: i64 = row.get(0);
                    let amount: i64 = row.get(1);
                    let currency: String = row.get(2);
                    serde_json::json!({ "id": format!("pay_{id:06}"), "amount": amount, "currency": currency })
                })
                .collect();
            (StatusCode::OK, Json(serde_json::Value::from(payments)))
        }
        Err(error) => failed(error),
    }
}

async fn stats(State(ledger): State<Arc<Ledger>>) -> Json<serde_json::Value> {
    let runs = ledger.handler_runs.load(Ordering::SeqCst);
    Json(serde_json::json!({ "handler_runs": runs }))
}
