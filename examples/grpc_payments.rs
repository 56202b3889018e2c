//! The payments API as a gRPC service (tonic), behind the same layer: a
//! retried `Create` is charged once and answered with the first `Payment`.
//!
//! ```sh
//! cargo run --features grpc --example grpc_payments
//! ```
//!
//! Any gRPC client sends the key as metadata; with `grpcurl` and the proto
//! in `examples/grpc/payments.rs`:
//!
//! ```sh
//! grpcurl -plaintext -proto payments.proto -H 'idempotency-key: "k1"' \
//!     -d '{"amount":5,"currency":"EUR"}' 127.0.0.1:50051 payments.v1.Payments/Create
//! ```
//!
//! Run it again and the same payment comes back, with `idempotent-replayed:
//! true` in the response headers; `Stats` shows the handler ran once. The
//! same key with another amount is `FAILED_PRECONDITION`; a retry while the
//! first call still runs is `ABORTED` (`PAYMENT_DELAY_MS=2000` to try it).
//!
//! Environment: `ADDR` (default `127.0.0.1:50051`), `PAYMENT_DELAY_MS`,
//! `SHUTDOWN_GRACE_SECS`, `RUST_LOG`, `IDEMPOTENCY=off` (serve without the
//! layer, the benchmark's baseline), and `REDIS_URL` (with the `redis`
//! feature) or `DATABASE_URL` (with the `postgres` feature) to use that
//! backend instead of memory (`REDIS_URL` first; an empty one counts as
//! unset). On `SIGTERM` or Ctrl-C it shuts down
//! gracefully, like the HTTP examples: calls in flight finish and are
//! stored, new keyed calls are answered `UNAVAILABLE`.

#[path = "grpc/payments.rs"]
mod payments;
#[path = "support/payments_app.rs"]
mod payments_app;

use std::time::Duration;

use tower_idempotency::{Backend, IdempotencyLayer, MemoryBackend};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // An empty variable counts as unset.
    let set = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    if let Some(url) = set("REDIS_URL") {
        return redis(url).await;
    }
    if let Some(url) = set("DATABASE_URL") {
        return postgres(url).await;
    }
    serve(MemoryBackend::new()).await
}

#[cfg(feature = "redis")]
async fn redis(url: String) -> Result<(), Box<dyn std::error::Error>> {
    use tower_idempotency::deadpool_redis::{Config, Runtime};

    let pool = Config::from_url(url).create_pool(Some(Runtime::Tokio1))?;
    serve(tower_idempotency::RedisBackend::new(pool)).await
}

#[cfg(not(feature = "redis"))]
async fn redis(_: String) -> Result<(), Box<dyn std::error::Error>> {
    Err("REDIS_URL is set: build with --features grpc,redis".into())
}

#[cfg(feature = "postgres")]
async fn postgres(url: String) -> Result<(), Box<dyn std::error::Error>> {
    use tower_idempotency::deadpool_postgres::{self, tokio_postgres};

    let mut config = deadpool_postgres::Config::new();
    config.url = Some(url);
    config.application_name = Some("grpc_payments".to_owned());
    let pool = config.create_pool(
        Some(deadpool_postgres::Runtime::Tokio1),
        tokio_postgres::NoTls,
    )?;
    let backend = tower_idempotency::PostgresBackend::new(pool);
    backend.migrate().await?;
    serve(backend).await
}

#[cfg(not(feature = "postgres"))]
async fn postgres(_: String) -> Result<(), Box<dyn std::error::Error>> {
    Err("DATABASE_URL is set: build with --features grpc,postgres".into())
}

/// Serves `payments.v1.Payments` on `$ADDR` behind the layer on `backend`,
/// printing `listening on <addr>` once it accepts connections.
async fn serve<B: Backend>(backend: B) -> Result<(), Box<dyn std::error::Error>> {
    // First: a signal from now on shuts down gracefully instead of killing.
    let signal = payments_app::terminated()?;
    payments_app::init_logging();
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:50051".to_owned());
    let grace = payments_app::shutdown_grace()?;
    let service = payments::PaymentsServer::new(payments_app::payment_delay()?);

    let layer = IdempotencyLayer::new(backend).ttl(Duration::from_hours(24));
    let shutdown = layer.shutdown_handle();
    // `IDEMPOTENCY=off` serves the same service without the layer: the
    // baseline of the benchmark. Both answer with tonic's body type.
    let off = std::env::var("IDEMPOTENCY").is_ok_and(|v| v == "off");
    let layer = (!off).then(|| {
        tower::ServiceBuilder::new()
            .map_response(|res: http::Response<_>| res.map(tonic::body::Body::new))
            .layer(layer)
    });
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let serve = tonic::transport::Server::builder()
        .layer(tower::util::option_layer(layer))
        .add_service(service)
        .serve_with_incoming_shutdown(
            // As `Server::serve` would: a stored response's trailers leave
            // in a write of their own, once the record is stored, and
            // Nagle's algorithm would hold them for the client's delayed ACK.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.started(),
        );
    // The layer's shutdown starts with the signal, beside tonic's: new keyed
    // calls are refused, calls in flight finish and are stored.
    payments_app::serve_until_shut_down(serve, &shutdown, signal, grace).await
}
