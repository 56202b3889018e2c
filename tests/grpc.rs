//! gRPC through the layer, with real tonic clients and servers over TCP, on
//! the memory backend and on Redis: retries replay the message and its
//! trailers, concurrent duplicates run once, the layer answers in gRPC
//! statuses, `grpc-status` decides what is stored, streaming requests pass
//! through, and the example serves all of it (on PostgreSQL too).

mod common;
#[path = "../examples/grpc/payments.rs"]
mod payments;
#[cfg(feature = "postgres")]
mod postgres_support;
mod redis_support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use payments::{CreatePayment, Payment, PaymentsClient, PaymentsServer};
use tonic::codegen::{StdError, http};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;
use tower_idempotency::{Backend, IdempotencyLayer, MemoryBackend, RedisBackend, ServerErrors};

const FLAKY: &str = "/test.v1.Probe/Flaky";
const RAW: &str = "/test.v1.Probe/Raw";
const ECHO: &str = "/test.v1.Probe/Echo";
const COUNT: &str = "/test.v1.Probe/Count";

/// A test service beside `payments.v1.Payments`:
///
/// - `Flaky` answers an `amount` of 1 to 16 with that status code (and the
///   message `code <n>`), any other amount with a `Payment`;
/// - `Raw` answers with one message and trailers of its own, written out
///   frame by frame (`x-ledger-seq` counts its runs);
/// - `Echo` (bidirectional) sends every message back as it comes;
/// - `Count` (server streaming) sends `amount` payments; from 100 up, two
///   and then `UNAVAILABLE` (from 200 up, `INTERNAL`).
#[derive(Clone, Default)]
struct Probe {
    runs: Arc<AtomicUsize>,
}

impl tonic::server::NamedService for Probe {
    const NAME: &'static str = "test.v1.Probe";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn payment(n: usize, amount: i64) -> Payment {
    Payment {
        id: format!("pay_{n}"),
        amount,
        currency: "EUR".to_owned(),
    }
}

/// One gRPC message frame: uncompressed, length-prefixed.
fn frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

impl<B> tower::Service<http::Request<B>> for Probe
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
        let runs = Arc::clone(&self.runs);
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<Payment, CreatePayment>::default());
            Ok(match req.uri().path() {
                FLAKY => {
                    let handler = tower::service_fn(move |r: Request<CreatePayment>| {
                        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        let amount = r.into_inner().amount;
                        async move {
                            match i32::try_from(amount) {
                                Ok(code @ 1..=16) => {
                                    Err(Status::new(Code::from_i32(code), format!("code {code}")))
                                }
                                _ => Ok(Response::new(payment(n, amount))),
                            }
                        }
                    });
                    grpc.unary(handler, req).await
                }
                RAW => {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    trailers.insert("x-ledger-seq", n.to_string().parse().unwrap());
                    trailers.append("x-note", "first".parse().unwrap());
                    trailers.append("x-note", "second".parse().unwrap());
                    let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = vec![
                        Ok(http_body::Frame::data(frame(&payment(n, 7)))),
                        Ok(http_body::Frame::trailers(trailers)),
                    ];
                    let body = StreamBody::new(tonic::codegen::tokio_stream::iter(frames));
                    http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("x-handler", "raw")
                        .body(tonic::body::Body::new(body))
                        .unwrap()
                }
                ECHO => {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let handler = tower::service_fn(
                        |r: Request<tonic::Streaming<CreatePayment>>| async move {
                            use tonic::codegen::tokio_stream::StreamExt;
                            let echoed = r.into_inner().map(|m| m.map(|m| payment(0, m.amount)));
                            Ok::<_, Status>(Response::new(echoed))
                        },
                    );
                    grpc.streaming(handler, req).await
                }
                COUNT => {
                    let handler = tower::service_fn(move |r: Request<CreatePayment>| {
                        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        let amount = r.into_inner().amount;
                        // From 100 up: two messages, then `UNAVAILABLE`
                        // (from 200 up, `INTERNAL`).
                        let last = if amount >= 200 {
                            Status::internal("lost the ledger")
                        } else {
                            Status::unavailable("try again")
                        };
                        let all: Vec<Result<Payment, Status>> = if amount >= 100 {
                            vec![Ok(payment(n, 0)), Ok(payment(n, 1)), Err(last)]
                        } else {
                            (0..amount).map(|i| Ok(payment(n, i))).collect()
                        };
                        async move {
                            Ok::<_, Status>(Response::new(tonic::codegen::tokio_stream::iter(all)))
                        }
                    });
                    grpc.server_streaming(handler, req).await
                }
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// The payments service and the probe behind `layer`, on a free port.
struct Served {
    addr: SocketAddr,
    payments: PaymentsServer,
    probe: Probe,
    _server: tokio::task::JoinHandle<()>,
}

impl Served {
    fn runs(&self) -> u64 {
        self.payments.ledger.handler_runs.load(Ordering::SeqCst)
    }

    fn probe_runs(&self) -> usize {
        self.probe.runs.load(Ordering::SeqCst)
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(&self) -> PaymentsClient {
        PaymentsClient::new(self.channel().await)
    }

    async fn probe(&self) -> tonic::client::Grpc<Channel> {
        tonic::client::Grpc::new(self.channel().await)
    }
}

async fn serve<B: Backend>(layer: IdempotencyLayer<B>, delay: Duration) -> Served {
    let payments = PaymentsServer::new(delay);
    let probe = Probe::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Server::builder()
        .layer(layer)
        .add_service(payments.clone())
        .add_service(probe.clone());
    let server = tokio::spawn(async move {
        router
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
            .unwrap();
    });
    Served {
        addr,
        payments,
        probe,
        _server: server,
    }
}

fn keyed<M>(message: M, key: &str) -> Request<M> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert("idempotency-key", MetadataValue::try_from(key).unwrap());
    req
}

fn eur(amount: i64) -> CreatePayment {
    CreatePayment {
        amount,
        currency: "EUR".to_owned(),
    }
}

fn replayed<M>(res: &Response<M>) -> bool {
    res.metadata()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

async fn probe_unary(
    served: &Served,
    req: Request<CreatePayment>,
) -> Result<Response<Payment>, Status> {
    let mut client = served.probe().await;
    client.ready().await.unwrap();
    client
        .unary(
            req,
            http::uri::PathAndQuery::from_static(FLAKY),
            ProstCodec::default(),
        )
        .await
}

/// A whole HTTP/2 exchange, as the wire has it.
struct Exchange {
    headers: http::HeaderMap,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

/// One raw gRPC call over HTTP/2 with hyper: what a tonic client would
/// read, before tonic interprets it.
async fn raw_call(
    addr: SocketAddr,
    path: &str,
    key: &str,
    message: &impl prost::Message,
) -> Exchange {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("idempotency-key", key)
        .body(Full::new(frame(message)))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    assert_eq!(parts.status, http::StatusCode::OK);
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Exchange {
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

// ---------------------------------------------------------------- scenarios

async fn a_retry_replays_the_message_and_trailers<B: Backend>(backend: B) {
    let served = serve(IdempotencyLayer::new(backend), Duration::ZERO).await;
    let key = common::unique_key("grpc-raw");
    let first = raw_call(served.addr, RAW, &key, &eur(7)).await;
    let again = raw_call(served.addr, RAW, &key, &eur(7)).await;
    assert_eq!(served.probe_runs(), 1, "the handler ran once");
    assert_eq!(again.body, first.body, "the same message bytes");
    let trailers = first.trailers.expect("the first answer ends with trailers");
    assert_eq!(trailers["x-ledger-seq"], "1");
    assert_eq!(
        again.trailers.as_ref(),
        Some(&trailers),
        "the same trailers"
    );
    let notes: Vec<_> = again
        .trailers
        .as_ref()
        .unwrap()
        .get_all("x-note")
        .iter()
        .collect();
    assert_eq!(notes, ["first", "second"], "in order, each value");
    assert!(first.headers.get("idempotent-replayed").is_none());
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.headers["x-handler"], "raw");
    assert_eq!(again.headers["content-type"], "application/grpc");

    // Through tonic: the same payment, marked as a replay.
    let mut client = served.client().await;
    let key = common::unique_key("grpc-create");
    let first = client.create(keyed(eur(5), &key)).await.unwrap();
    let again = client.create(keyed(eur(5), &key)).await.unwrap();
    assert_eq!(served.runs(), 1);
    assert_eq!(again.get_ref(), first.get_ref());
    assert!(!replayed(&first));
    assert!(replayed(&again));
    // Without a key, every call runs.
    client.create(Request::new(eur(5))).await.unwrap();
    client.create(Request::new(eur(5))).await.unwrap();
    assert_eq!(served.runs(), 3);
}

async fn concurrent_duplicates_run_once<B: Backend>(backend: B) {
    let served = serve(IdempotencyLayer::new(backend), Duration::from_millis(300)).await;
    let key = common::unique_key("grpc-concurrent");
    // Connected first, then all at once: they overlap the first call.
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(served.client().await);
    }
    let start = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let mut calls = Vec::new();
    for mut client in clients {
        let (key, start) = (key.clone(), Arc::clone(&start));
        calls.push(tokio::spawn(async move {
            start.wait().await;
            client.create(keyed(eur(9), &key)).await
        }));
    }
    let mut ids = Vec::new();
    let mut aborted = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(res) => ids.push(res.into_inner().id),
            Err(status) => {
                assert_eq!(status.code(), Code::Aborted, "{status:?}");
                assert!(status.message().contains("being processed"), "{status:?}");
                let pushback = status.metadata().get("grpc-retry-pushback-ms");
                assert!(pushback.is_some(), "told when to retry: {status:?}");
                aborted += 1;
            }
        }
    }
    assert_eq!(served.runs(), 1, "the handler ran once");
    assert!(aborted >= 1, "the duplicates overlapped the first call");
    ids.dedup();
    assert_eq!(ids.len(), 1, "every success is the same payment: {ids:?}");
    let mut client = served.client().await;
    let retry = client.create(keyed(eur(9), &key)).await.unwrap();
    assert_eq!(retry.into_inner().id, ids[0]);
    assert_eq!(served.runs(), 1);
}

async fn the_layer_answers_in_grpc_statuses<B: Backend>(backend: B) {
    let served = serve(IdempotencyLayer::new(backend), Duration::ZERO).await;
    let mut client = served.client().await;
    let key = common::unique_key("grpc-reuse");
    client.create(keyed(eur(5), &key)).await.unwrap();
    let reused = client.create(keyed(eur(6), &key)).await.unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition, "{reused:?}");
    assert!(reused.message().contains("different request"), "{reused:?}");
    assert_eq!(served.runs(), 1);

    let malformed = client
        .create(keyed(eur(5), "\"unterminated"))
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument, "{malformed:?}");
    assert!(
        malformed.message().contains("quoted string"),
        "{malformed:?}"
    );
    assert_eq!(served.runs(), 1, "nothing ran");
}

async fn grpc_status_decides_what_is_stored<B: Backend>(backend: B) {
    let served = serve(IdempotencyLayer::new(backend), Duration::ZERO).await;
    let not_stored = [1, 2, 4, 8, 10, 13, 14];
    for code in 1..=16 {
        let key = common::unique_key(&format!("grpc-code-{code}"));
        let before = served.probe_runs();
        let first = probe_unary(&served, keyed(eur(code), &key))
            .await
            .unwrap_err();
        let again = probe_unary(&served, keyed(eur(code), &key))
            .await
            .unwrap_err();
        let code32 = i32::try_from(code).unwrap();
        assert_eq!(first.code(), Code::from_i32(code32));
        assert_eq!(again.code(), first.code(), "code {code}");
        assert_eq!(again.message(), format!("code {code}"));
        let stored = !not_stored.contains(&code);
        let runs = served.probe_runs() - before;
        assert_eq!(runs, if stored { 1 } else { 2 }, "code {code}");
        assert_eq!(
            again.metadata().get("idempotent-replayed").is_some(),
            stored,
            "code {code}: a replay is marked in the initial metadata"
        );
    }
    // OK is stored.
    let key = common::unique_key("grpc-code-ok");
    let before = served.probe_runs();
    let first = probe_unary(&served, keyed(eur(100), &key)).await.unwrap();
    let again = probe_unary(&served, keyed(eur(100), &key)).await.unwrap();
    assert_eq!(again.get_ref(), first.get_ref());
    assert!(replayed(&again));
    assert_eq!(served.probe_runs() - before, 1);
}

async fn a_chosen_grpc_policy_is_followed<B: Backend>(backend: B) {
    let layer = IdempotencyLayer::new(backend).grpc_persist_if(|code| code == Code::Ok as i32);
    let served = serve(layer, Duration::ZERO).await;
    let key = common::unique_key("grpc-policy");
    let invalid = i64::from(Code::InvalidArgument as i32);
    probe_unary(&served, keyed(eur(invalid), &key))
        .await
        .unwrap_err();
    probe_unary(&served, keyed(eur(invalid), &key))
        .await
        .unwrap_err();
    assert_eq!(
        served.probe_runs(),
        2,
        "errors are not stored under this policy"
    );
}

async fn a_streaming_request_passes_through<B: Backend>(backend: B) {
    let layer = IdempotencyLayer::new(backend).grpc_streaming_requests([ECHO]);
    let served = serve(layer, Duration::ZERO).await;
    let key = common::unique_key("grpc-echo");
    for round in 1..=2 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let outbound = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut client = served.probe().await;
        client.ready().await.unwrap();
        tx.send(eur(1)).await.unwrap();
        let call = client.streaming(
            keyed(outbound, &key),
            http::uri::PathAndQuery::from_static(ECHO),
            ProstCodec::<CreatePayment, Payment>::default(),
        );
        let res = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("answered while the request stream was open")
            .unwrap();
        assert!(!replayed(&res));
        let mut inbound = res.into_inner();
        // Each message comes back before the next is sent: nothing waits
        // for the whole request stream.
        for amount in 1..=3 {
            let echo = tokio::time::timeout(Duration::from_secs(10), inbound.message())
                .await
                .expect("the echo came while the request stream was open")
                .unwrap()
                .unwrap();
            assert_eq!(echo.amount, amount);
            if amount < 3 {
                tx.send(eur(amount + 1)).await.unwrap();
            }
        }
        drop(tx);
        assert!(inbound.message().await.unwrap().is_none());
        assert_eq!(served.probe_runs(), round, "untouched: every call runs");
    }
}

async fn a_server_stream_is_stored_and_replayed<B: Backend>(backend: B) {
    let served = serve(IdempotencyLayer::new(backend), Duration::ZERO).await;
    let key = common::unique_key("grpc-count");
    let all = [
        count(&served, &key, 5).await.unwrap(),
        count(&served, &key, 5).await.unwrap(),
    ];
    assert_eq!(served.probe_runs(), 1);
    assert_eq!(all[0].len(), 5);
    assert_eq!(all[1], all[0]);

    // A stream that ends in `UNAVAILABLE` is not stored: the retry runs.
    let key = common::unique_key("grpc-count-unavailable");
    for round in 1..=2 {
        let mut client = served.probe().await;
        client.ready().await.unwrap();
        let res = client
            .server_streaming(
                keyed(eur(100), &key),
                http::uri::PathAndQuery::from_static(COUNT),
                ProstCodec::<CreatePayment, Payment>::default(),
            )
            .await
            .unwrap();
        assert!(!replayed(&res), "round {round}");
        let mut stream = res.into_inner();
        assert_eq!(
            stream.message().await.unwrap().unwrap().id,
            format!("pay_{}", round + 1)
        );
        stream.message().await.unwrap().unwrap();
        let status = stream.message().await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    assert_eq!(served.probe_runs(), 3, "the stream that failed ran again");
}

async fn count(served: &Served, key: &str, amount: i64) -> Result<Vec<Payment>, Status> {
    let mut client = served.probe().await;
    client.ready().await.unwrap();
    let res = client
        .server_streaming(
            keyed(eur(amount), key),
            http::uri::PathAndQuery::from_static(COUNT),
            ProstCodec::<CreatePayment, Payment>::default(),
        )
        .await?;
    let mut stream = res.into_inner();
    let mut got = Vec::new();
    while let Some(p) = stream.message().await? {
        got.push(p);
    }
    Ok(got)
}

/// `UNKNOWN`, `INTERNAL` and `DEADLINE_EXCEEDED` are ambiguous: with
/// `ServerErrors::Replay` they are stored and replayed as they are.
async fn ambiguous_statuses_are_replayed_under_replay<B: Backend>(backend: B) {
    let layer = IdempotencyLayer::new(backend).server_errors(ServerErrors::Replay);
    let served = serve(layer, Duration::ZERO).await;
    for code in [2, 4, 13] {
        let key = common::unique_key(&format!("grpc-replay-{code}"));
        let before = served.probe_runs();
        let first = probe_unary(&served, keyed(eur(code), &key))
            .await
            .unwrap_err();
        let again = probe_unary(&served, keyed(eur(code), &key))
            .await
            .unwrap_err();
        assert_eq!(served.probe_runs() - before, 1, "code {code}");
        assert_eq!(again.code(), first.code());
        assert_eq!(again.message(), first.message());
        assert!(again.metadata().get("idempotent-replayed").is_some());
    }
    // Streamed: two messages, then `INTERNAL`, replayed whole.
    let key = common::unique_key("grpc-replay-stream");
    let before = served.probe_runs();
    let first = count(&served, &key, 200).await.unwrap_err();
    let again = count(&served, &key, 200).await.unwrap_err();
    assert_eq!(served.probe_runs() - before, 1);
    assert_eq!(
        (again.code(), again.message()),
        (Code::Internal, first.message())
    );
}

/// With `ServerErrors::Mark` every retry of an ambiguous status is `UNKNOWN`
/// "outcome unknown", and the handler does not run again.
async fn ambiguous_statuses_are_marked_under_mark<B: Backend>(backend: B) {
    let layer = IdempotencyLayer::new(backend).server_errors(ServerErrors::Mark);
    let served = serve(layer, Duration::ZERO).await;
    let key = common::unique_key("grpc-mark-unary");
    let first = probe_unary(&served, keyed(eur(13), &key))
        .await
        .unwrap_err();
    assert_eq!(
        first.code(),
        Code::Internal,
        "the first caller gets the handler's"
    );
    let again = probe_unary(&served, keyed(eur(13), &key))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::Unknown);
    assert!(
        again
            .message()
            .contains("whether it took effect is unknown"),
        "{again:?}"
    );
    assert_eq!(served.probe_runs(), 1);
    // Streamed, the status known only at the end.
    let key = common::unique_key("grpc-mark-stream");
    let first = count(&served, &key, 200).await.unwrap_err();
    assert_eq!(first.code(), Code::Internal);
    let again = count(&served, &key, 200).await.unwrap_err();
    assert_eq!(again.code(), Code::Unknown);
    assert_eq!(served.probe_runs(), 2);
    // `UNAVAILABLE` is not ambiguous: not stored, under any policy.
    let key = common::unique_key("grpc-mark-unavailable");
    probe_unary(&served, keyed(eur(14), &key))
        .await
        .unwrap_err();
    probe_unary(&served, keyed(eur(14), &key))
        .await
        .unwrap_err();
    assert_eq!(served.probe_runs(), 4);
}

macro_rules! on_backends {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::MemoryBackend::new()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::redis_support::backend().await).await;
                }
            )*
        }
    };
}

on_backends!(
    a_retry_replays_the_message_and_trailers,
    concurrent_duplicates_run_once,
    the_layer_answers_in_grpc_statuses,
    grpc_status_decides_what_is_stored,
    a_chosen_grpc_policy_is_followed,
    a_streaming_request_passes_through,
    a_server_stream_is_stored_and_replayed,
    ambiguous_statuses_are_replayed_under_replay,
    ambiguous_statuses_are_marked_under_mark,
);

// ------------------------------------------------------- backend failures

#[tokio::test]
async fn a_failed_backend_is_unavailable_on_memory() {
    let backend = common::Flaky::default();
    backend.fail_begin.store(true, Ordering::SeqCst);
    let served = serve(IdempotencyLayer::new(backend), Duration::ZERO).await;
    let mut client = served.client().await;
    let status = client
        .create(keyed(eur(5), &common::unique_key("grpc-down")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("not processed"), "{status:?}");
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "1000"
    );
    assert_eq!(served.runs(), 0);
}

#[tokio::test]
async fn redis_down_is_unavailable() {
    let port = redis_support::free_port();
    let pool = redis_support::pool_for(&format!("redis://127.0.0.1:{port}"));
    let backend = RedisBackend::builder(pool)
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let served = serve(IdempotencyLayer::new(backend), Duration::ZERO).await;
    let mut client = served.client().await;
    let status = client
        .create(keyed(eur(5), &common::unique_key("grpc-redis-down")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(served.runs(), 0);
}

// ------------------------------------------------------------- the example

async fn example_client(addr: SocketAddr) -> PaymentsClient {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    PaymentsClient::new(channel)
}

/// The example on the backend `env` names; the other backends' variables
/// are emptied, so that one exported in the shell cannot pick for it.
async fn the_example_serves_once(env: &[(&str, &str)]) {
    let mut all = vec![("REDIS_URL", ""), ("DATABASE_URL", "")];
    all.extend_from_slice(env);
    let (_child, addr) = common::spawn_example("grpc_payments", &all).await;
    let mut client = example_client(addr).await;
    let key = common::unique_key("grpc-example");
    let first = client.create(keyed(eur(5), &key)).await.unwrap();
    let again = client.create(keyed(eur(5), &key)).await.unwrap();
    assert_eq!(again.get_ref(), first.get_ref());
    assert!(replayed(&again));
    let reused = client.create(keyed(eur(6), &key)).await.unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);
    let invalid = client
        .create(keyed(eur(0), &common::unique_key("grpc-zero")))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(client.stats().await.unwrap().into_inner().handler_runs, 1);
}

#[tokio::test]
async fn the_example_on_memory() {
    the_example_serves_once(&[]).await;
}

#[tokio::test]
async fn the_example_on_redis() {
    the_example_serves_once(&[("REDIS_URL", &redis_support::redis_url())]).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn the_example_on_postgres() {
    // Fails here, loudly, if PostgreSQL is down.
    drop(postgres_support::pool().await);
    let url = postgres_support::database_url();
    the_example_serves_once(&[("DATABASE_URL", &url)]).await;
}

#[cfg(unix)]
#[tokio::test]
async fn the_example_finishes_a_call_in_flight_on_sigterm() {
    let env = [
        ("PAYMENT_DELAY_MS", "800"),
        ("REDIS_URL", ""),
        ("DATABASE_URL", ""),
    ];
    let (mut child, addr) = common::spawn_example("grpc_payments", &env).await;
    let client = example_client(addr).await;
    let key = common::unique_key("grpc-sigterm");
    let mut in_flight = client.clone();
    let first = tokio::spawn({
        let key = key.clone();
        async move { in_flight.create(keyed(eur(5), &key)).await }
    });
    // SIGTERM once the handler runs.
    let mut stats = client.clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        while stats.stats().await.unwrap().into_inner().handler_runs == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the handler started");
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let payment = first.await.unwrap().expect("the call in flight finished");
    assert_eq!(payment.get_ref().amount, 5);
    drop(client);
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the example exits after its grace period")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

// ------------------------------------- answers stored in a response's place

/// A gRPC call through the layer as a plain tower service.
fn grpc_req(key: &str) -> common::Req {
    let req = common::post("/test.v1.Probe/Flaky", Some(key), "");
    let mut req = common::with_header(req, "te", "trailers");
    req.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    *req.body_mut() = Full::new(frame(&eur(1)));
    req
}

/// A handler that counts its runs and answers with `respond()`.
fn answering(
    runs: &common::Runs,
    respond: fn() -> http::Response<Full<Bytes>>,
) -> impl common::Handler {
    let runs = runs.clone();
    tower::service_fn(move |_req: common::InnerReq| {
        runs.bump();
        let response = respond();
        async move { Ok::<_, Infallible>(response) }
    })
}

#[tokio::test]
async fn an_ambiguous_http_error_is_stored_as_a_grpc_answer() {
    use tower::Layer;
    use tower_idempotency::ServerErrors;

    // A gRPC call that a proxy or a timeout layer answers with a `5xx`:
    // under `ServerErrors::Mark` the retry gets `UNKNOWN` in gRPC's terms.
    let runs = common::Runs::default();
    let handler = answering(&runs, || {
        http::Response::builder()
            .status(http::StatusCode::BAD_GATEWAY)
            .body(Full::new(Bytes::new()))
            .unwrap()
    });
    let mut svc = IdempotencyLayer::new(MemoryBackend::new())
        .server_errors(ServerErrors::Mark)
        .layer(handler);
    let key = common::unique_key("grpc-mark");
    let first = common::send(&mut svc, grpc_req(&key)).await;
    assert_eq!(
        first.status,
        http::StatusCode::BAD_GATEWAY,
        "the first answer is the handler's"
    );
    let again = common::send(&mut svc, grpc_req(&key)).await;
    assert_eq!(runs.get(), 1);
    assert_eq!(
        again.status,
        http::StatusCode::OK,
        "never an HTTP error to a gRPC client"
    );
    assert_eq!(again.headers["content-type"], "application/grpc");
    assert_eq!(again.headers["grpc-status"], "2", "UNKNOWN");
    assert!(
        again.headers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("whether it took effect is unknown"),
        "{:?}",
        again.headers
    );
    assert!(again.replayed());
    assert!(again.body.is_empty(), "trailers-only");
    assert!(
        again.headers.get("content-length").is_none(),
        "restored as a gRPC answer is sent: {:?}",
        again.headers
    );
}

/// A body of frames, the last one trailers.
type FramedBody = StreamBody<
    tonic::codegen::tokio_stream::Iter<
        std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>,
    >,
>;

/// A handler whose response announces its length and ends with trailers:
/// the buffered path (stored before anything is sent).
fn with_length_and_trailers(
    runs: common::Runs,
    grpc_status: &'static str,
) -> impl tower::Service<
    common::InnerReq,
    Response = http::Response<FramedBody>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_req: common::InnerReq| {
        let n = runs.bump();
        let data = frame(&payment(n, 3));
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", grpc_status.parse().unwrap());
        trailers.insert("x-run", n.to_string().parse().unwrap());
        let len = data.len();
        let frames = vec![
            Ok(http_body::Frame::data(data)),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        async move {
            Ok(http::Response::builder()
                .header("content-type", "application/grpc")
                .header("content-length", len)
                .body(StreamBody::new(tonic::codegen::tokio_stream::iter(frames)))
                .unwrap())
        }
    })
}

#[tokio::test]
async fn a_response_of_known_length_keeps_its_trailers_and_its_grpc_status_decides() {
    use tower::Layer;

    // Stored with its trailers, replayed with them.
    let runs = common::Runs::default();
    let mut svc = IdempotencyLayer::new(MemoryBackend::new())
        .layer(with_length_and_trailers(runs.clone(), "0"));
    let key = common::unique_key("grpc-known-length");
    let first = common::send(&mut svc, grpc_req(&key)).await;
    let again = common::send(&mut svc, grpc_req(&key)).await;
    assert_eq!(runs.get(), 1);
    assert_eq!(again.body, first.body);
    assert_eq!(again.trailers, first.trailers);
    assert_eq!(again.trailers.unwrap()["x-run"], "1");
    assert_eq!(again.headers["idempotent-replayed"], "true");

    // `UNAVAILABLE` in the trailers: sent as it is, not stored.
    let runs = common::Runs::default();
    let mut svc = IdempotencyLayer::new(MemoryBackend::new())
        .layer(with_length_and_trailers(runs.clone(), "14"));
    let key = common::unique_key("grpc-known-length-14");
    let first = common::send(&mut svc, grpc_req(&key)).await;
    assert_eq!(first.trailers.unwrap()["grpc-status"], "14");
    let again = common::send(&mut svc, grpc_req(&key)).await;
    assert_eq!(runs.get(), 2, "the retry ran");
    assert!(again.headers.get("idempotent-replayed").is_none());
    assert_eq!(again.trailers.unwrap()["x-run"], "2");
}

/// The layer's other answers to a gRPC call, each a trailers-only `200`
/// with its status: a missing key where one is required, a message over the
/// limit, a retry of a response too large to keep, a call to an instance
/// shutting down.
#[tokio::test]
async fn every_answer_of_the_layer_is_a_grpc_status() {
    use tower::Layer;

    fn status_of(answer: &common::Answer) -> (String, String) {
        assert_eq!(answer.status, http::StatusCode::OK, "{:?}", answer.headers);
        assert_eq!(answer.headers["content-type"], "application/grpc");
        assert!(answer.body.is_empty(), "trailers-only");
        let text = |name| answer.headers[name].to_str().unwrap().to_owned();
        (text("grpc-status"), text("grpc-message"))
    }
    let runs = common::Runs::default();
    let handler = || with_length_and_trailers(runs.clone(), "0");
    let unkeyed = || {
        let mut req = grpc_req("\"x\"");
        req.headers_mut().remove("idempotency-key");
        req
    };

    // A key is required: INVALID_ARGUMENT.
    let mut svc = IdempotencyLayer::new(MemoryBackend::new())
        .required()
        .layer(handler());
    let (code, message) = status_of(&common::send(&mut svc, unkeyed()).await);
    assert_eq!(code, "3");
    assert!(message.contains("Idempotency-Key"), "{message}");

    // A message over the limit: RESOURCE_EXHAUSTED.
    let mut svc = IdempotencyLayer::new(MemoryBackend::new())
        .max_request_body(4)
        .layer(handler());
    let (code, message) = status_of(&common::send(&mut svc, grpc_req("\"big\"")).await);
    assert_eq!(code, "8");
    assert!(message.contains("larger than 4 bytes"), "{message}");

    // A response too large to keep: the retry is ALREADY_EXISTS, marked as
    // a replay, and the handler does not run again.
    let mut svc = IdempotencyLayer::new(MemoryBackend::new())
        .max_stored_response(4)
        .layer(handler());
    let key = common::unique_key("grpc-not-kept");
    let first = common::send(&mut svc, grpc_req(&key)).await;
    assert_eq!(first.status, http::StatusCode::OK);
    let before = runs.get();
    let again = common::send(&mut svc, grpc_req(&key)).await;
    assert_eq!(runs.get(), before, "not run again");
    assert_eq!(status_of(&again).0, "6");
    assert!(again.replayed());

    // An instance shutting down: UNAVAILABLE, with a pushback.
    let layer = IdempotencyLayer::new(MemoryBackend::new());
    let shutdown = layer.shutdown_handle();
    let mut svc = layer.layer(handler());
    let _report = shutdown.shutdown(Duration::from_millis(10)).await;
    let answer = common::send(&mut svc, grpc_req(&common::unique_key("grpc-down"))).await;
    assert_eq!(status_of(&answer).0, "14");
    assert_eq!(answer.headers["grpc-retry-pushback-ms"], "1000");
    assert!(
        answer.headers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("shutting down"),
        "{:?}",
        answer.headers
    );
}

#[tokio::test]
async fn a_grpc_stream_cut_short_is_not_stored() {
    use tower::Layer;

    // Messages, then the end of the stream without trailers.
    let runs = common::Runs::default();
    // A `grpc-status` in the headers belongs to an answer without
    // messages: it does not count here.
    let handler = answering(&runs, || {
        http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "0")
            .body(Full::new(frame(&eur(1))))
            .unwrap()
    });
    let mut svc = IdempotencyLayer::new(MemoryBackend::new()).layer(handler);
    let key = common::unique_key("grpc-cut-short");
    common::send(&mut svc, grpc_req(&key)).await;
    let again = common::send(&mut svc, grpc_req(&key)).await;
    assert_eq!(runs.get(), 2, "no grpc-status: the retry runs");
    assert!(!again.replayed());
}

/// A handler's own answer is never rewritten into a gRPC status, not even
/// one built like the layer's (an extractor's rejection).
#[cfg(feature = "axum")]
#[tokio::test]
async fn a_handlers_own_problem_answer_is_not_rewritten() {
    use axum::response::IntoResponse;
    use tower::Layer;

    let handler = tower::service_fn(|_req: common::InnerReq| async {
        Ok::<_, Infallible>(tower_idempotency::MissingIdempotencyKey::default().into_response())
    });
    for layer in [
        IdempotencyLayer::new(MemoryBackend::new()),
        IdempotencyLayer::new(MemoryBackend::new()).fail_open(),
    ] {
        let mut svc = layer.layer(handler);
        let answer = common::send(&mut svc, grpc_req(&common::unique_key("grpc-own"))).await;
        assert_eq!(answer.status, http::StatusCode::BAD_REQUEST);
        assert_eq!(answer.headers["content-type"], "application/problem+json");
        assert!(answer.headers.get("grpc-status").is_none());
    }
    // Through fail-open: the backend down, the handler answers unprotected.
    let backend = common::Flaky::default();
    backend.fail_begin.store(true, Ordering::SeqCst);
    let mut svc = IdempotencyLayer::new(backend).fail_open().layer(handler);
    let answer = common::send(&mut svc, grpc_req(&common::unique_key("grpc-own-open"))).await;
    assert_eq!(answer.status, http::StatusCode::BAD_REQUEST);
    assert!(answer.headers.get("grpc-status").is_none());
}
