//! The `payments.v1` gRPC API, written out by hand as `tonic-build` would
//! generate it, so that the example builds without `protoc`:
//!
//! ```proto
//! syntax = "proto3";
//! package payments.v1;
//!
//! service Payments {
//!   rpc Create(CreatePayment) returns (Payment);
//!   rpc Stats(StatsRequest) returns (Stats);
//! }
//!
//! message CreatePayment { int64 amount = 1; string currency = 2; }
//! message Payment { string id = 1; int64 amount = 2; string currency = 3; }
//! message StatsRequest {}
//! message Stats { uint64 handler_runs = 1; }
//! ```
//!
//! The messages are `prost` messages; the server routes by method path and
//! runs each call through tonic's own `server::Grpc`, and the client is
//! tonic's `client::Grpc`, as generated code does.

#![allow(
    dead_code,
    reason = "the example, its tests and its benchmark each use a part"
)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::{Bytes, StdError, http};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

/// `payments.v1.CreatePayment`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct CreatePayment {
    #[prost(int64, tag = "1")]
    pub amount: i64,
    #[prost(string, tag = "2")]
    pub currency: String,
}

/// `payments.v1.Payment`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Payment {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(int64, tag = "2")]
    pub amount: i64,
    #[prost(string, tag = "3")]
    pub currency: String,
}

/// `payments.v1.StatsRequest`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct StatsRequest {}

/// `payments.v1.Stats`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Stats {
    #[prost(uint64, tag = "1")]
    pub handler_runs: u64,
}

pub const CREATE: &str = "/payments.v1.Payments/Create";
pub const STATS: &str = "/payments.v1.Payments/Stats";

/// What the handlers share: how often `Create` ran, and how long it takes.
#[derive(Default)]
pub struct Ledger {
    pub handler_runs: AtomicU64,
    pub delay: Duration,
}

/// The `payments.v1.Payments` service.
#[derive(Clone, Default)]
pub struct PaymentsServer {
    pub ledger: Arc<Ledger>,
}

impl PaymentsServer {
    pub fn new(delay: Duration) -> Self {
        Self {
            ledger: Arc::new(Ledger {
                delay,
                ..Ledger::default()
            }),
        }
    }
}

/// `Create`: charges once per call; an amount that is not positive is
/// `INVALID_ARGUMENT` (a definite answer, stored and replayed).
async fn create(
    ledger: Arc<Ledger>,
    req: Request<CreatePayment>,
) -> Result<Response<Payment>, Status> {
    let new = req.into_inner();
    if new.amount <= 0 {
        return Err(Status::invalid_argument("amount must be positive"));
    }
    let run = ledger.handler_runs.fetch_add(1, Ordering::SeqCst) + 1;
    if !ledger.delay.is_zero() {
        tokio::time::sleep(ledger.delay).await;
    }
    Ok(Response::new(Payment {
        id: format!("pay_{run:06}"),
        amount: new.amount,
        currency: new.currency,
    }))
}

impl tonic::server::NamedService for PaymentsServer {
    const NAME: &'static str = "payments.v1.Payments";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<B> tower::Service<http::Request<B>> for PaymentsServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ledger = Arc::clone(&self.ledger);
        Box::pin(async move {
            Ok(match req.uri().path() {
                CREATE => {
                    let handler = tower::service_fn(move |r| create(Arc::clone(&ledger), r));
                    tonic::server::Grpc::new(ProstCodec::default())
                        .unary(handler, req)
                        .await
                }
                STATS => {
                    let handler = tower::service_fn(move |_: Request<StatsRequest>| {
                        let runs = ledger.handler_runs.load(Ordering::SeqCst);
                        async move { Ok::<_, Status>(Response::new(Stats { handler_runs: runs })) }
                    });
                    tonic::server::Grpc::new(ProstCodec::default())
                        .unary(handler, req)
                        .await
                }
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// A `payments.v1.Payments` client on any tonic transport.
#[derive(Clone)]
pub struct PaymentsClient {
    inner: tonic::client::Grpc<tonic::transport::Channel>,
}

impl PaymentsClient {
    pub fn new(channel: tonic::transport::Channel) -> Self {
        Self {
            inner: tonic::client::Grpc::new(channel),
        }
    }

    pub async fn create(
        &mut self,
        req: Request<CreatePayment>,
    ) -> Result<Response<Payment>, Status> {
        self.unary(req, CREATE).await
    }

    pub async fn stats(&mut self) -> Result<Response<Stats>, Status> {
        self.unary(Request::new(StatsRequest {}), STATS).await
    }

    async fn unary<M1, M2>(
        &mut self,
        req: Request<M1>,
        path: &'static str,
    ) -> Result<Response<M2>, Status>
    where
        M1: prost::Message + Send + Sync + 'static,
        M2: prost::Message + Default + Send + Sync + 'static,
    {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("service not ready: {e}")))?;
        let path = http::uri::PathAndQuery::from_static(path);
        self.inner.unary(req, path, ProstCodec::default()).await
    }
}
