//! Cancellation, panics, inner errors, backend failures, lost locks.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::stepped::SlowBody;
use common::{Flaky, Runs, counting, post, send, slow_first, with_header};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{
    BackendErrorKind, IdempotencyBody, IdempotencyLayer, MemoryBackend, OnDisconnect,
};

/// A handler whose first call signals its start, then waits for `go`; it
/// answers `done <n>`.
fn waiting_handler(
    runs: Runs,
    started: tokio::sync::mpsc::UnboundedSender<()>,
    go: Arc<tokio::sync::Notify>,
) -> impl common::Handler {
    tower::service_fn(move |_req: common::InnerReq| {
        let n = runs.bump();
        let started = started.clone();
        let go = go.clone();
        async move {
            if n == 1 {
                started.send(()).unwrap();
                go.notified().await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("done {n}")))))
        }
    })
}

/// The default: a client that gives up mid-handler does not cancel it; the
/// response is stored and the client's retry replays it.
#[tokio::test]
async fn dropping_the_response_future_mid_handler_lets_it_finish_and_the_retry_replays() {
    let runs = Runs::default();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let go = Arc::new(tokio::sync::Notify::new());
    let backend = MemoryBackend::new();
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(waiting_handler(
        runs.clone(),
        started_tx,
        go.clone(),
    ));
    let call = svc.ready().await.unwrap().call(post("/p", Some("k"), "x"));
    let task = tokio::spawn(call);
    started_rx.recv().await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(
        backend.in_flight_count(),
        1,
        "the handler still holds its key"
    );
    let during = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert_eq!(during.status, StatusCode::CONFLICT);
    go.notify_one();
    while backend.stored_count() == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(backend.in_flight_count(), 0);
    let retry = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, "done 1");
    assert_eq!(runs.get(), 1, "the handler ran once");
}

/// `OnDisconnect::Cancel`: dropping the response future cancels the
/// handler and frees the key, so the retry runs it again.
#[tokio::test]
async fn with_cancel_dropping_the_response_future_mid_handler_frees_the_key() {
    let runs = Runs::default();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let go = Arc::new(tokio::sync::Notify::new());
    let backend = MemoryBackend::new();
    let mut svc = IdempotencyLayer::new(backend.clone())
        .on_disconnect(OnDisconnect::Cancel)
        .layer(waiting_handler(runs.clone(), started_tx, go));
    let call = svc.ready().await.unwrap().call(post("/p", Some("k"), "x"));
    let task = tokio::spawn(call);
    started_rx.recv().await.unwrap();
    assert_eq!(backend.in_flight_count(), 1);
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    // The handler's task is cancelled at its next turn on the runtime.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        backend.in_flight_count(),
        0,
        "the lock must be released on drop"
    );
    let retry = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert!(!retry.replayed());
    assert_eq!(runs.get(), 2);
}

/// Returns `Pending` once (waking itself), then `Ready`.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

// A client that leaves at every await point of the flow, on every backend:
// `tests/retry.rs` (`client_leaves_at_every_await_point`), with the stepped
// backend of `tests/common/stepped.rs`.

#[tokio::test]
async fn inner_error_releases_and_stores_nothing() {
    let runs = Runs::default();
    let handler = {
        let runs = runs.clone();
        tower::service_fn(move |_req: common::InnerReq| {
            let n = runs.bump();
            async move {
                if n == 1 {
                    return Err("inner failure");
                }
                Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        })
    };
    let backend = MemoryBackend::new();
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(handler);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(post("/p", Some("k"), "x"))
        .await
        .unwrap_err();
    assert_eq!(err, "inner failure", "the inner error type passes through");
    assert_eq!(backend.in_flight_count(), 0);
    assert_eq!(backend.stored_count(), 0);
    let retry = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert_eq!(retry.body, "ok");
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn handler_panic_releases_the_key() {
    let runs = Runs::default();
    let handler = {
        let runs = runs.clone();
        tower::service_fn(move |_req: common::InnerReq| {
            let n = runs.bump();
            async move {
                YieldOnce(false).await;
                assert!(n != 1, "handler exploded");
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        })
    };
    let backend = MemoryBackend::new();
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(handler);
    let call = svc.ready().await.unwrap().call(post("/p", Some("k"), "x"));
    let joined = tokio::spawn(call).await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(backend.in_flight_count(), 0);
    assert_eq!(backend.stored_count(), 0);
    let retry = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert_eq!(retry.body, "ok");
    assert!(!retry.replayed());
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn oversize_request_is_413_before_any_lock() {
    let runs = Runs::default();
    let backend = MemoryBackend::new();
    let mut svc = IdempotencyLayer::new(backend.clone())
        .max_request_body(16)
        .layer(counting(runs.clone()));
    // Declared length over the limit.
    let declared = |n: usize| {
        with_header(
            post("/p", Some("k"), &"x".repeat(n)),
            "content-length",
            &n.to_string(),
        )
    };
    let answer = send(&mut svc, declared(17)).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.problem_type(), "body-too-large");
    // Streamed without a length.
    let streamed = Request::post("/p")
        .header("idempotency-key", "k2")
        .body(SlowBody::new(vec![b"0123456789", b"0123456789"]))
        .unwrap();
    let mut svc2 = IdempotencyLayer::new(backend.clone())
        .max_request_body(16)
        .layer(tower::service_fn(
            |_req: Request<IdempotencyBody<SlowBody>>| async {
                panic!("handler must not run");
                #[allow(unreachable_code)]
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            },
        ));
    let res = svc2.ready().await.unwrap().call(streamed).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(runs.get(), 0);
    assert_eq!(backend.in_flight_count(), 0);
    assert_eq!(backend.stored_count(), 0);
    // Exactly at the limit is fine, declared or not.
    assert_eq!(
        send(&mut svc, declared(16)).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        send(&mut svc, post("/p", Some("k"), &"x".repeat(16)))
            .await
            .status,
        StatusCode::CREATED
    );
}

/// The heartbeat was told the lock is gone: the response still reaches the
/// client, but it is not stored over whoever may hold the key now (no
/// `complete` at all), and the key is released for a retry.
#[tokio::test(start_paused = true)]
async fn a_lock_reported_lost_is_released_not_completed() {
    let backend = Flaky::default();
    backend.report_lost.store(true, Ordering::SeqCst);
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend.clone())
        .lock_ttl(Duration::from_millis(30))
        .layer(slow_first(runs.clone(), Duration::from_millis(100)));
    let first = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert_eq!(first.body, "run 1");
    assert_eq!(backend.completes.load(Ordering::SeqCst), 0);
    let retry = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert_eq!(retry.body, "run 2", "the key was released, nothing stored");
}

/// A stored record this instance cannot read is answered for what it is
/// (500 unreadable, 503 incompatible) and the handler never runs, not even
/// with fail-open: the request was processed before.
#[tokio::test]
async fn unreadable_and_incompatible_records_never_run_the_handler() {
    for (kind, status, problem) in [
        (
            BackendErrorKind::Corrupt,
            StatusCode::INTERNAL_SERVER_ERROR,
            "stored-response-unreadable",
        ),
        (
            BackendErrorKind::Incompatible,
            StatusCode::SERVICE_UNAVAILABLE,
            "stored-response-incompatible",
        ),
    ] {
        let backend = Flaky::default();
        *backend.begin_error.lock().unwrap() = Some(kind);
        let runs = Runs::default();
        let mut svc = IdempotencyLayer::new(backend)
            .fail_open()
            .layer(counting(runs.clone()));
        let answer = send(&mut svc, post("/p", Some("k"), "x")).await;
        assert_eq!(answer.status, status, "{kind:?}");
        assert_eq!(answer.problem_type(), problem);
        assert_eq!(runs.get(), 0, "{kind:?}: the handler must not run");
    }
}

#[tokio::test]
async fn failing_request_body_is_400() {
    struct Broken;
    impl http_body::Body for Broken {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            Poll::Ready(Some(Err("connection reset")))
        }
    }
    let backend = MemoryBackend::new();
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(tower::service_fn(
        |_req: Request<IdempotencyBody<Broken>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        },
    ));
    let req = Request::post("/p")
        .header("idempotency-key", "k")
        .body(Broken)
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(backend.in_flight_count(), 0);
}

#[tokio::test]
async fn backend_outage_is_503_and_the_handler_does_not_run() {
    let runs = Runs::default();
    let backend = Flaky::default();
    backend.fail_begin.store(true, Ordering::SeqCst);
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(counting(runs.clone()));
    let answer = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.problem_type(), "backend-unavailable");
    assert_eq!(answer.headers["retry-after"], "1");
    assert_eq!(runs.get(), 0);
    // Recovery needs no restart.
    backend.fail_begin.store(false, Ordering::SeqCst);
    assert_eq!(
        send(&mut svc, post("/p", Some("k"), "x")).await.status,
        StatusCode::CREATED
    );
    assert!(send(&mut svc, post("/p", Some("k"), "x")).await.replayed());
}

#[tokio::test]
async fn fail_open_runs_the_handler_unprotected() {
    let runs = Runs::default();
    let backend = Flaky::default();
    backend.fail_begin.store(true, Ordering::SeqCst);
    let mut svc = IdempotencyLayer::new(backend.clone())
        .fail_open()
        .layer(counting(runs.clone()));
    for _ in 0..2 {
        let answer = send(&mut svc, post("/p", Some("k"), "x")).await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(!answer.replayed());
    }
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn store_failure_still_answers_the_client() {
    let runs = Runs::default();
    let backend = Flaky::default();
    backend.fail_complete.store(true, Ordering::SeqCst);
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(counting(runs.clone()));
    let first = send(&mut svc, post("/p", Some("k"), "x")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(backend.inner.in_flight_count(), 0);
    // Documented: nothing was stored, so a retry runs again (at least once).
    backend.fail_complete.store(false, Ordering::SeqCst);
    assert!(!send(&mut svc, post("/p", Some("k"), "x")).await.replayed());
    assert_eq!(runs.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn heartbeat_keeps_the_lock_of_a_slow_handler() {
    let runs = Runs::default();
    let backend = Flaky::default();
    let svc = IdempotencyLayer::new(backend.clone())
        .lock_ttl(Duration::from_secs(3))
        .layer(slow_first(runs.clone(), Duration::from_secs(10)));
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some("k"), "x")));
    // Beats every second (lock_ttl / 3); one failed beat (t=6s) is tolerated.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    backend.fail_extend.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    backend.fail_extend.store(false, Ordering::SeqCst);
    let during = send(&mut svc.clone(), post("/p", Some("k"), "x")).await;
    assert_eq!(
        during.status,
        StatusCode::CONFLICT,
        "the lock must still be held at t=6.5s"
    );
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        first.into_body().collect().await.unwrap().to_bytes(),
        "run 1"
    );
    let after = send(&mut svc.clone(), post("/p", Some("k"), "x")).await;
    assert!(after.replayed());
    assert_eq!(after.body, "run 1");
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_heartbeat_a_lapsed_lock_never_overwrites_the_new_holder() {
    let runs = Runs::default();
    let backend = MemoryBackend::new();
    let svc = IdempotencyLayer::new(backend.clone())
        .lock_ttl(Duration::from_secs(3))
        .heartbeat(false)
        .layer(slow_first(runs.clone(), Duration::from_secs(10)));
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some("k"), "x")));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let second = send(&mut svc.clone(), post("/p", Some("k"), "x")).await;
    assert_eq!(
        second.body, "run 2",
        "the lapsed lock let a second request run"
    );
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        first.into_body().collect().await.unwrap().to_bytes(),
        "run 1",
        "the slow client still gets its answer"
    );
    let third = send(&mut svc.clone(), post("/p", Some("k"), "x")).await;
    assert!(third.replayed());
    assert_eq!(
        third.body, "run 2",
        "the stale holder must not overwrite the record"
    );
    assert_eq!(backend.in_flight_count(), 0);
}

#[tokio::test]
async fn concurrent_duplicate_gets_409_with_retry_after() {
    let runs = Runs::default();
    let backend = MemoryBackend::new();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let handler = {
        let runs = runs.clone();
        tower::service_fn(move |_req: common::InnerReq| {
            runs.bump();
            let rx = release_rx.clone();
            async move {
                if let Some(rx) = rx.lock().await.take() {
                    rx.await.unwrap();
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            }
        })
    };
    let svc = IdempotencyLayer::new(backend.clone())
        .lock_ttl(Duration::from_secs(30))
        .layer(handler);
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some("k"), "x")));
    while backend.in_flight_count() == 0 {
        tokio::task::yield_now().await;
    }
    let dup = send(&mut svc.clone(), post("/p", Some("k"), "x")).await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    let retry_after: u64 = dup.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        retry_after, 30,
        "the time until the holder's lock runs out, never less than the wait"
    );
    release_tx.send(()).unwrap();
    first.await.unwrap().unwrap();
    assert!(
        send(&mut svc.clone(), post("/p", Some("k"), "x"))
            .await
            .replayed()
    );
    assert_eq!(runs.get(), 1);
}
