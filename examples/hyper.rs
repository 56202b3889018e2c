//! `tower-idempotency` on a bare hyper 1 server, without axum.
//!
//! ```sh
//! cargo run --example hyper
//! curl -i -H 'Idempotency-Key: "k1"' -d 'hello' localhost:3001/orders
//! curl -i -H 'Idempotency-Key: "k1"' -d 'hello' localhost:3001/orders   # replayed
//! ```
//!
//! Environment: `ADDR` (default `127.0.0.1:3001`).
//!
//! It shuts down gracefully on `SIGTERM` or Ctrl-C: connected clients get
//! their answers (`hyper_util`'s `GracefulShutdown`), then the layer's
//! [`ShutdownHandle`](tower_idempotency::ShutdownHandle) finishes the
//! handlers whose clients left and stores their responses.

use std::convert::Infallible;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyBody, IdempotencyLayer, MemoryBackend};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let signal = terminated()?;
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3001".to_owned());
    let orders = Arc::new(AtomicU64::new(0));

    let handler = tower::service_fn(move |req: Request<IdempotencyBody<Incoming>>| {
        let orders = Arc::clone(&orders);
        async move {
            let body = match req.into_body().collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => Bytes::new(),
            };
            let n = orders.fetch_add(1, Ordering::SeqCst) + 1;
            let text = format!("order {n} for {:?}\n", String::from_utf8_lossy(&body));
            let mut res = Response::new(Full::new(Bytes::from(text)));
            *res.status_mut() = StatusCode::CREATED;
            Ok::<_, Infallible>(res)
        }
    });
    let layer = IdempotencyLayer::new(MemoryBackend::new());
    let shutdown = layer.shutdown_handle();
    let service = ServiceBuilder::new().layer(layer).service(handler);

    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    // The layer's shutdown starts at the signal; the accept loop ends with it.
    let finished = shutdown.shutdown_on(signal, Duration::from_secs(10));
    let graceful = GracefulShutdown::new();
    let mut started = pin!(shutdown.started());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted?.0,
            () = &mut started => break,
        };
        let service = TowerToHyperService::new(service.clone());
        let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                eprintln!("connection error: {error}");
            }
        });
    }
    drop(listener);
    // Connected clients get their answers; a connection still open after the
    // layer's two waits (a client sending half a request) is not waited for.
    if tokio::time::timeout(Duration::from_secs(21), graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("connections still open after the grace period are closed");
    }
    let report = finished.await; // and what runs on its own is settled
    eprintln!("shut down: {report:?}");
    Ok(())
}

/// Resolves on `SIGTERM` or Ctrl-C, with the handlers installed when this
/// is called: a signal right after start-up is not lost.
fn terminated() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
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
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
