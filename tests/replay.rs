//! Replays, mismatches, scopes and what is (not) stored.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Runs, counting, post, send, with_header};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryBackend, Persist, Unstorable};

fn layer(backend: &MemoryBackend) -> IdempotencyLayer<MemoryBackend> {
    IdempotencyLayer::new(backend.clone())
}

#[tokio::test]
async fn sequential_retry_replays_the_original_response() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new()).layer(counting(runs.clone()));
    let first = send(
        &mut svc,
        post("/payments", Some("\"k1\""), r#"{"amount":5}"#),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    assert_eq!(first.headers["set-cookie"], "run=1");

    for _ in 0..3 {
        let again = send(
            &mut svc,
            post("/payments", Some("\"k1\""), r#"{"amount":5}"#),
        )
        .await;
        assert_eq!(again.status, first.status);
        assert_eq!(again.body, first.body);
        assert!(again.replayed());
        assert!(
            !again.headers.contains_key("set-cookie"),
            "Set-Cookie must not be replayed"
        );
        let mut expected = first.headers.clone();
        expected.remove("set-cookie");
        expected.insert("content-length", first.body.len().into());
        expected.insert("idempotent-replayed", "true".parse().unwrap());
        assert_eq!(again.headers, expected);
    }
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn quoted_and_bare_keys_are_the_same_key() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new()).layer(counting(runs.clone()));
    send(&mut svc, post("/p", Some("\"same\""), "x")).await;
    assert!(
        send(&mut svc, post("/p", Some("same"), "x"))
            .await
            .replayed()
    );
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn same_key_different_request_is_422() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new()).layer(counting(runs.clone()));
    send(&mut svc, post("/payments?x=1", Some("k"), "a")).await;
    for req in [
        post("/payments?x=1", Some("k"), "b"),
        post("/refunds?x=1", Some("k"), "a"),
        post("/payments?x=2", Some("k"), "a"),
        post("/payments", Some("k"), "a"),
    ] {
        let answer = send(&mut svc, req).await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(answer.problem_type(), "fingerprint-mismatch");
    }
    let patch = http::Request::patch("/payments?x=1")
        .header("idempotency-key", "k")
        .body(Full::new(Bytes::from_static(b"a")))
        .unwrap();
    assert_eq!(
        send(&mut svc, patch).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn two_callers_never_share_a_response() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new()).layer(counting(runs.clone()));
    let alice = send(
        &mut svc,
        with_header(post("/p", Some("k"), "x"), "authorization", "Bearer alice"),
    )
    .await;
    let bob = send(
        &mut svc,
        with_header(post("/p", Some("k"), "x"), "authorization", "Bearer bob"),
    )
    .await;
    assert!(!bob.replayed());
    assert_ne!(alice.body, bob.body);
    assert_eq!(runs.get(), 2);
    // Each replays only its own.
    let alice2 = send(
        &mut svc,
        with_header(post("/p", Some("k"), "x"), "authorization", "Bearer alice"),
    )
    .await;
    assert_eq!(alice2.body, alice.body);
    // No credentials at all is a third caller.
    let anon = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert!(!anon.replayed());
    assert_eq!(runs.get(), 3);
}

#[tokio::test]
async fn default_scope_falls_back_to_cookie() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new()).layer(counting(runs.clone()));
    send(
        &mut svc,
        with_header(post("/p", Some("k"), "x"), "cookie", "sid=1"),
    )
    .await;
    assert!(
        send(
            &mut svc,
            with_header(post("/p", Some("k"), "x"), "cookie", "sid=1")
        )
        .await
        .replayed()
    );
    assert!(
        !send(
            &mut svc,
            with_header(post("/p", Some("k"), "x"), "cookie", "sid=2")
        )
        .await
        .replayed()
    );
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn named_cookie_scope_ignores_other_cookies() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new())
        .scope_cookie("session")
        .layer(counting(runs.clone()));
    send(
        &mut svc,
        with_header(post("/p", Some("k"), "x"), "cookie", "session=s1; _ga=1"),
    )
    .await;
    let retry = send(
        &mut svc,
        with_header(post("/p", Some("k"), "x"), "cookie", "_ga=2; session=s1"),
    )
    .await;
    assert!(
        retry.replayed(),
        "a changed analytics cookie must not split the caller"
    );
    let other = send(
        &mut svc,
        with_header(post("/p", Some("k"), "x"), "cookie", "session=s2"),
    )
    .await;
    assert!(!other.replayed());
    assert_eq!(runs.get(), 2);
}

/// What an authentication layer in front of ours would insert.
#[derive(Clone)]
struct Principal(&'static str);

fn authenticated(token: &str, principal: &'static str) -> common::Req {
    let mut req = with_header(post("/p", Some("k"), "x"), "authorization", token);
    req.extensions_mut().insert(Principal(principal));
    req
}

#[tokio::test]
async fn default_scope_treats_a_rotated_token_as_a_new_caller() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new()).layer(counting(runs.clone()));
    send(&mut svc, authenticated("Bearer token-v1", "user-1")).await;
    let retry = send(&mut svc, authenticated("Bearer token-v2", "user-1")).await;
    assert!(!retry.replayed());
    assert_eq!(runs.get(), 2, "documented pitfall of the default scope");
}

#[tokio::test]
async fn principal_scope_replays_across_token_rotation() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new())
        .scope(|parts: &http::request::Parts| parts.extensions.get::<Principal>().map(|p| p.0))
        .layer(counting(runs.clone()));
    let first = send(&mut svc, authenticated("Bearer token-v1", "user-1")).await;
    let retry = send(&mut svc, authenticated("Bearer token-v2", "user-1")).await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "a refreshed token must replay, not 422"
    );
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    // Another principal with the same key is isolated.
    let other = send(&mut svc, authenticated("Bearer token-v1", "user-2")).await;
    assert!(!other.replayed());
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn fingerprint_headers_must_match() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new())
        .fingerprint_headers([http::header::CONTENT_TYPE])
        .layer(counting(runs.clone()));
    send(&mut svc, post("/p", Some("k"), "x")).await;
    let mut req = post("/p", Some("k"), "x");
    req.headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    assert_eq!(
        send(&mut svc, req).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
}

/// Answers `status` with `run <n>`, with `persist` in the response
/// extensions when given.
fn status_service(
    runs: Runs,
    status: StatusCode,
    persist: Option<Persist>,
) -> impl tower::Service<
    common::InnerReq,
    Response = Response<Full<Bytes>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_req| {
        let n = runs.bump();
        async move {
            let mut res = Response::new(Full::new(Bytes::from(format!("run {n}"))));
            *res.status_mut() = status;
            if let Some(persist) = persist {
                res.extensions_mut().insert(persist);
            }
            Ok(res)
        }
    })
}

#[tokio::test]
async fn server_errors_and_429_are_not_stored() {
    for status in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let runs = Runs::default();
        let backend = MemoryBackend::new();
        let mut svc = layer(&backend).layer(status_service(runs.clone(), status, None));
        for n in 1..=3 {
            let answer = send(&mut svc, post("/p", Some("k"), "x")).await;
            assert_eq!(answer.status, status);
            assert!(!answer.replayed());
            assert_eq!(answer.body, format!("run {n}"));
        }
        assert_eq!(runs.get(), 3);
        assert_eq!(backend.stored_count(), 0);
        assert_eq!(backend.in_flight_count(), 0);
    }
}

#[tokio::test]
async fn client_errors_are_stored() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new()).layer(status_service(
        runs.clone(),
        StatusCode::PAYMENT_REQUIRED,
        None,
    ));
    send(&mut svc, post("/p", Some("k"), "x")).await;
    let again = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert_eq!(again.status, StatusCode::PAYMENT_REQUIRED);
    assert!(again.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn persist_if_decides_what_is_stored() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new())
        .persist_if(|parts| parts.status.is_success())
        .layer(status_service(runs.clone(), StatusCode::CONFLICT, None));
    send(&mut svc, post("/p", Some("k"), "x")).await;
    assert!(!send(&mut svc, post("/p", Some("k"), "x")).await.replayed());
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn handler_can_opt_out() {
    let runs = Runs::default();
    let backend = MemoryBackend::new();
    let mut svc = layer(&backend).layer(status_service(
        runs.clone(),
        StatusCode::OK,
        Some(Persist::Never),
    ));
    send(&mut svc, post("/p", Some("k"), "x")).await;
    assert!(!send(&mut svc, post("/p", Some("k"), "x")).await.replayed());
    assert_eq!(runs.get(), 2);
    assert_eq!(backend.stored_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn handler_ttl_overrides_the_layer_ttl() {
    let runs = Runs::default();
    let backend = MemoryBackend::new();
    let mut svc = layer(&backend)
        .ttl(Duration::from_hours(1))
        .layer(status_service(
            runs.clone(),
            StatusCode::OK,
            Some(Persist::For(Duration::from_mins(1))),
        ));
    send(&mut svc, post("/p", Some("k"), "x")).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(send(&mut svc, post("/p", Some("k"), "x")).await.replayed());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(!send(&mut svc, post("/p", Some("k"), "x")).await.replayed());
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn handler_can_force_storing_an_error() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new()).layer(status_service(
        runs.clone(),
        StatusCode::BAD_GATEWAY,
        Some(Persist::For(Duration::from_mins(1))),
    ));
    send(&mut svc, post("/p", Some("k"), "x")).await;
    assert!(send(&mut svc, post("/p", Some("k"), "x")).await.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn records_expire_at_their_ttl() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new())
        .ttl(Duration::from_hours(24))
        .layer(counting(runs.clone()));
    send(&mut svc, post("/p", Some("k"), "x")).await;
    tokio::time::advance(Duration::from_secs(24 * 3600 - 1)).await;
    assert!(send(&mut svc, post("/p", Some("k"), "x")).await.replayed());
    tokio::time::advance(Duration::from_secs(2)).await;
    let after = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert!(!after.replayed(), "an expired record must not be replayed");
    assert_eq!(after.headers["x-run"], "2");
    assert_eq!(runs.get(), 2);
}

fn big_body_service(
    runs: Runs,
    size: usize,
    declare_length: bool,
) -> impl tower::Service<
    common::InnerReq,
    Response = Response<http_body_util::StreamBody<futures_stream::Chunks>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_req| {
        runs.bump();
        async move {
            let mut res = Response::new(http_body_util::StreamBody::new(
                futures_stream::Chunks::new(size),
            ));
            if declare_length {
                res.headers_mut().insert("content-length", size.into());
            }
            Ok(res)
        }
    })
}

/// A streaming body in 8 KiB chunks, without pulling in a stream crate.
mod futures_stream {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::Frame;

    pub struct Chunks {
        left: usize,
    }

    impl Chunks {
        pub fn new(size: usize) -> Self {
            Self { left: size }
        }
    }

    impl futures_core::Stream for Chunks {
        type Item = Result<Frame<Bytes>, std::convert::Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            let n = self.left.min(8192);
            self.left -= n;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'z'; n])))))
        }
    }
}

/// A response too large to store reaches the client whole; a retry does
/// not run the handler again but gets the "response not kept" answer with
/// the original status — whether the length was declared (passed straight
/// through) or not (streamed and counted).
#[tokio::test]
async fn oversize_responses_pass_through_and_retries_get_the_not_kept_answer() {
    for declare_length in [false, true] {
        let runs = Runs::default();
        let backend = MemoryBackend::new();
        let mut svc = layer(&backend)
            .max_stored_response(64 * 1024)
            .layer(big_body_service(runs.clone(), 100 * 1024, declare_length));
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(post("/p", Some("k"), "x"))
            .await
            .unwrap();
        assert!(!res.headers().contains_key("idempotent-replayed"));
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 100 * 1024, "the whole body reaches the client");
        assert!(body.iter().all(|&b| b == b'z'));
        for _ in 0..2 {
            let again = send(&mut svc, post("/p", Some("k"), "x")).await;
            assert_eq!(again.status, StatusCode::OK, "the original status");
            assert!(again.replayed());
            assert_eq!(again.problem_type(), "response-not-kept");
        }
        assert_eq!(runs.get(), 1, "an unstorable response never runs again");
        assert_eq!(backend.stored_count(), 1, "the marker");
        assert_eq!(backend.in_flight_count(), 0);
        // Another request under the key is still a mismatch.
        assert_eq!(
            send(&mut svc, post("/p", Some("k"), "y")).await.status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}

/// `Unstorable::Release`: the key is released and a retry runs again.
#[tokio::test]
async fn oversize_responses_with_release_run_again() {
    for declare_length in [false, true] {
        let runs = Runs::default();
        let backend = MemoryBackend::new();
        let mut svc = layer(&backend)
            .max_stored_response(64 * 1024)
            .unstorable(Unstorable::Release)
            .layer(big_body_service(runs.clone(), 100 * 1024, declare_length));
        for _ in 0..2 {
            let answer = send(&mut svc, post("/p", Some("k"), "x")).await;
            assert!(!answer.replayed());
            assert_eq!(answer.body.len(), 100 * 1024);
        }
        assert_eq!(runs.get(), 2);
        assert_eq!(backend.stored_count(), 0);
        assert_eq!(backend.in_flight_count(), 0);
    }
}

#[tokio::test]
async fn responses_within_the_limit_are_stored_whole() {
    // Exactly the limit, streamed or declared.
    for declare_length in [false, true] {
        let runs = Runs::default();
        let mut svc = layer(&MemoryBackend::new())
            .max_stored_response(64 * 1024)
            .layer(big_body_service(runs.clone(), 64 * 1024, declare_length));
        send(&mut svc, post("/p", Some("k"), "x")).await;
        let again = send(&mut svc, post("/p", Some("k"), "x")).await;
        assert!(again.replayed(), "declared: {declare_length}");
        assert_eq!(again.body.len(), 64 * 1024);
        assert_eq!(again.headers["content-length"], "65536");
        assert_eq!(runs.get(), 1);
    }
}

/// A body of two chunks, the second held until the test lets it go.
struct HeldBody {
    first: Option<Bytes>,
    rest: Option<tokio::sync::oneshot::Receiver<Bytes>>,
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        }
        let Some(rest) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match std::pin::Pin::new(rest).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(chunk) => {
                self.rest = None;
                Poll::Ready(chunk.ok().map(|c| Ok(http_body::Frame::data(c))))
            }
        }
    }
}

/// A response that declares a length over the store limit is passed on
/// at once, its body unread by the layer: the client has the head while
/// the handler's body is still waiting for its second chunk.
#[tokio::test(start_paused = true)]
async fn a_response_declared_over_the_limit_is_passed_on_before_its_body_is_read() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
    let svc = layer(&MemoryBackend::new())
        .max_stored_response(4)
        .layer(tower::service_fn(move |_req: common::InnerReq| {
            let rest = rx.lock().unwrap().take();
            async move {
                let mut res = Response::new(HeldBody {
                    first: Some(Bytes::from_static(b"abcd")),
                    rest,
                });
                res.headers_mut().insert("content-length", 8.into());
                Ok::<_, std::convert::Infallible>(res)
            }
        }));
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        svc.oneshot(post("/p", Some("k"), "x")),
    )
    .await
    .expect("answered before the body ended")
    .unwrap();
    tx.send(Bytes::from_static(b"efgh")).unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "abcdefgh");
}

#[tokio::test]
async fn unguarded_requests_pass_through() {
    let runs = Runs::default();
    let backend = MemoryBackend::new();
    let mut svc = layer(&backend).layer(counting(runs.clone()));
    // No key.
    send(&mut svc, post("/p", None, "x")).await;
    send(&mut svc, post("/p", None, "x")).await;
    // A method that is not guarded, even with a key.
    for _ in 0..2 {
        let put = http::Request::put("/p")
            .header("idempotency-key", "k")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        assert!(!send(&mut svc, put).await.replayed());
    }
    assert_eq!(runs.get(), 4);
    assert_eq!(backend.stored_count(), 0);
}

#[tokio::test]
async fn methods_can_be_configured() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new())
        .methods([http::Method::PUT])
        .layer(counting(runs.clone()));
    for _ in 0..2 {
        let put = http::Request::put("/p")
            .header("idempotency-key", "k")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        send(&mut svc, put).await;
    }
    send(&mut svc, post("/p", Some("k"), "x")).await;
    assert_eq!(
        runs.get(),
        2,
        "PUT guarded (1 run), POST no longer guarded (1 run)"
    );
}

#[tokio::test]
async fn required_rejects_requests_without_a_key() {
    let runs = Runs::default();
    let mut svc = layer(&MemoryBackend::new())
        .required()
        .layer(counting(runs.clone()));
    let answer = send(&mut svc, post("/p", None, "x")).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.problem_type(), "missing-key");
    assert_eq!(runs.get(), 0);
}

#[tokio::test]
async fn handler_sees_the_key() {
    let svc = tower::service_fn(|req: common::InnerReq| async move {
        let key = req
            .extensions()
            .get::<tower_idempotency::IdempotencyKey>()
            .unwrap()
            .clone();
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
            key.as_str().to_owned(),
        ))))
    });
    let mut svc = layer(&MemoryBackend::new()).layer(svc);
    assert_eq!(
        send(&mut svc, post("/p", Some("\"abc\""), "x")).await.body,
        "abc"
    );
}

/// The `5xx` policies on the memory backend.
#[tokio::test]
async fn server_error_policies_on_memory() {
    common::server_error_policies(tower_idempotency::MemoryBackend::new(), "memory").await;
}

/// A chunked response with a trailer, over a real HTTP/1.1 connection:
/// the replay carries the trailer too (chunked, with `Trailer` announcing
/// it), and its body.
#[tokio::test]
async fn trailers_are_replayed_over_http1() {
    use http_body_util::StreamBody;

    let runs = Runs::default();
    let handler = tower::service_fn({
        let runs = runs.clone();
        move |_req: http::Request<tower_idempotency::IdempotencyBody<hyper::body::Incoming>>| {
            let n = runs.bump();
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-checksum", n.to_string().parse().unwrap());
            let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = vec![
                Ok(http_body::Frame::data(Bytes::from(format!("payment {n}")))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            async move {
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .header("trailer", "x-checksum")
                        .body(StreamBody::new(tonic::codegen::tokio_stream::iter(frames)))
                        .unwrap(),
                )
            }
        }
    });
    let svc = layer(&MemoryBackend::new()).layer(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    let headers = [
        ("te", "trailers"),
        ("idempotency-key", "\"http1-trailers\""),
    ];
    let first = common::request(addr, "POST", "/payments", &headers, "{}").await;
    let again = common::request(addr, "POST", "/payments", &headers, "{}").await;
    assert_eq!(runs.get(), 1);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body);
    assert_eq!(first.trailers.as_ref().unwrap()["x-checksum"], "1");
    assert_eq!(again.trailers, first.trailers, "the trailer is replayed");
}
