//! Graceful shutdown of the layer (`ShutdownHandle`): what runs is finished
//! and stored, new keyed requests are refused, what outlives the grace
//! period is cut off and settled so that it never runs a second time; and
//! an idle stream whose client left does not hold its key for ever.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{InnerReq, Runs, counting, post, send, slow_payment};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{
    Backend, BackendError, Begin, Completion, Fingerprint, IdempotencyLayer, MemoryBackend,
    MemoryLock, Record, StorageKey,
};

/// Starts a keyed request and gives up on it once the handler has run
/// for `after`: the handler goes on detached.
async fn start_and_leave<S>(svc: &S, key: &str, after: Duration)
where
    S: Service<common::Req> + Clone,
    S::Error: std::fmt::Debug,
{
    let mut svc = svc.clone();
    let call = svc
        .ready()
        .await
        .unwrap()
        .call(post("/pay", Some(key), "{}"));
    assert!(
        tokio::time::timeout(after, call).await.is_err(),
        "the handler is still running when its client leaves"
    );
}

#[tokio::test(start_paused = true)]
async fn a_detached_handler_is_finished_and_stored_before_shutdown_returns() {
    let backend = MemoryBackend::new();
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(backend.clone());
    let shutdown = layer.shutdown_handle();
    let svc = layer.layer(slow_payment(runs.clone(), Duration::from_secs(5)));
    start_and_leave(&svc, "detached", Duration::from_secs(1)).await;

    let started = Instant::now();
    let report = shutdown.shutdown(Duration::from_secs(30)).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(4),
        "waited for the handler, no longer"
    );
    // Another instance on the same store replays it.
    let mut other =
        IdempotencyLayer::new(backend).layer(slow_payment(runs.clone(), Duration::ZERO));
    let retry = send(&mut other, post("/pay", Some("detached"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.body, "payment 1");
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn once_shutting_down_keyed_requests_are_refused_and_others_pass() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryBackend::new());
    let shutdown = layer.shutdown_handle();
    let mut svc = layer.layer(counting(runs.clone()));
    assert!(!shutdown.is_shutting_down());
    assert!(shutdown.shutdown(Duration::from_secs(1)).await.is_clean());
    assert!(shutdown.is_shutting_down());

    let refused = send(&mut svc, post("/pay", Some("late"), "{}")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.problem_type(), "shutting-down");
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(runs.get(), 0, "nothing ran");

    let unkeyed = send(&mut svc, post("/pay", None, "{}")).await;
    assert_eq!(unkeyed.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1, "requests the layer does not guard pass");
}

#[tokio::test(start_paused = true)]
async fn handlers_past_the_grace_period_are_cut_off_and_never_run_again() {
    let backend = MemoryBackend::new();
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(backend.clone());
    let shutdown = layer.shutdown_handle();
    let svc = layer.layer(slow_payment(runs.clone(), Duration::from_mins(10)));
    start_and_leave(&svc, "detached", Duration::from_secs(1)).await;
    let connected = tokio::spawn({
        let mut svc = svc.clone();
        async move { send(&mut svc, post("/pay", Some("connected"), "{}")).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    let report = shutdown.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.interrupted, 2, "{report:?}");
    assert_eq!((report.unfinished, report.abandoned), (0, 0), "{report:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(5));

    let answer = connected.await.unwrap();
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.problem_type(), "interrupted");

    let mut other =
        IdempotencyLayer::new(backend).layer(slow_payment(runs.clone(), Duration::ZERO));
    for key in ["detached", "connected"] {
        let retry = send(&mut other, post("/pay", Some(key), "{}")).await;
        assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR, "{key}");
        assert_eq!(retry.problem_type(), "interrupted");
        assert!(retry.replayed(), "{key}: the stored answer");
    }
    assert_eq!(runs.get(), 2, "neither handler ran a second time");
}

/// A memory backend that can say it commits the handler's effects with the
/// record (as PostgreSQL's transaction mode does), and whose `release` can
/// be slow; its `abandon` is the trait's default.
#[derive(Clone, Default)]
struct Wrapped {
    inner: MemoryBackend,
    atomic: bool,
    slow_begin: Duration,
    slow_release: Duration,
}

impl Backend for Wrapped {
    type Lock = MemoryLock;

    async fn begin(
        &self,
        key: &StorageKey,
        fp: &Fingerprint,
        ttl: Duration,
    ) -> Result<Begin<MemoryLock>, BackendError> {
        tokio::time::sleep(self.slow_begin).await;
        self.inner.begin(key, fp, ttl).await
    }

    async fn complete(
        &self,
        lock: MemoryLock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        self.inner.complete(lock, record, ttl).await
    }

    async fn release(&self, lock: MemoryLock) -> Result<(), BackendError> {
        tokio::time::sleep(self.slow_release).await;
        self.inner.release(lock).await
    }

    async fn extend(&self, lock: &MemoryLock, ttl: Duration) -> Result<bool, BackendError> {
        self.inner.extend(lock, ttl).await
    }

    fn commits_handler_effects(&self) -> bool {
        self.atomic
    }
}

#[tokio::test(start_paused = true)]
async fn on_an_atomic_backend_a_cut_off_handler_is_released() {
    let backend = Wrapped {
        atomic: true,
        ..Wrapped::default()
    };
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(backend.clone());
    let shutdown = layer.shutdown_handle();
    let svc = layer.layer(slow_payment(runs.clone(), Duration::from_mins(10)));
    let connected = tokio::spawn({
        let mut svc = svc.clone();
        async move { send(&mut svc, post("/pay", Some("rolled-back"), "{}")).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = shutdown.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.interrupted, 1, "{report:?}");

    let answer = connected.await.unwrap();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.problem_type(), "shutting-down");
    // Its effects rolled back: the retry runs.
    let mut other =
        IdempotencyLayer::new(backend).layer(slow_payment(runs.clone(), Duration::ZERO));
    let retry = send(&mut other, post("/pay", Some("rolled-back"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(runs.get(), 2);
}

/// A request whose lock is granted only after the grace period ended is cut
/// off before its handler is called: nothing ran, so the key is released
/// and the client told to retry elsewhere — not a stored "interrupted".
#[tokio::test(start_paused = true)]
async fn a_handler_never_called_is_released_not_marked() {
    let backend = Wrapped {
        slow_begin: Duration::from_secs(3),
        ..Wrapped::default()
    };
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(backend.clone());
    let shutdown = layer.shutdown_handle();
    let svc = layer.layer(counting(runs.clone()));
    let request = tokio::spawn({
        let mut svc = svc.clone();
        async move { send(&mut svc, post("/pay", Some("late-lock"), "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    let report = shutdown.shutdown(Duration::from_secs(1)).await;
    // Cut off as soon as its lock came (3 s), within the settling wait.
    assert_eq!(
        (report.interrupted, report.unfinished),
        (1, 0),
        "{report:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_millis(2900));
    let answer = request.await.unwrap();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.problem_type(), "shutting-down");
    assert_eq!(runs.get(), 0);
    let mut other = IdempotencyLayer::new(backend.inner).layer(counting(runs.clone()));
    let retry = send(&mut other, post("/pay", Some("late-lock"), "{}")).await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "the retry runs: nothing ran before"
    );
    assert_eq!(runs.get(), 1);
}

/// A body that yields a chunk every second, for ever (an NDJSON feed).
struct Ticking {
    interval: tokio::time::Interval,
}

impl http_body::Body for Ticking {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::task::ready!(self.interval.poll_tick(cx));
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{\"tick\":1}\n")))))
    }
}

/// A response that was already streaming when the grace period ended: the
/// client has its status, so the key is settled like any response that
/// could not be stored — a "not kept" marker with that status — rather than
/// "interrupted".
#[tokio::test(start_paused = true)]
async fn a_response_cut_off_mid_stream_keeps_its_status() {
    let backend = MemoryBackend::new();
    let runs = Runs::default();
    let handler = tower::service_fn({
        let runs = runs.clone();
        move |_req: InnerReq| {
            runs.bump();
            let body = Ticking {
                interval: tokio::time::interval(Duration::from_secs(1)),
            };
            async move { Ok::<_, Infallible>(Response::new(body)) }
        }
    });
    let layer = IdempotencyLayer::new(backend.clone());
    let shutdown = layer.shutdown_handle();
    let mut svc = layer.layer(handler);
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(post("/feed", Some("feed"), "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let reader = tokio::spawn(async move {
        let mut body = res.into_body();
        while let Some(Ok(_)) = body.frame().await {}
    });
    let report = shutdown.shutdown(Duration::from_secs(3)).await;
    assert_eq!(report.interrupted, 1, "{report:?}");
    reader.abort();

    let mut other = IdempotencyLayer::new(backend).layer(counting(runs.clone()));
    let retry = send(&mut other, post("/feed", Some("feed"), "{}")).await;
    assert_eq!(
        retry.status,
        StatusCode::OK,
        "the streamed response's status"
    );
    assert_eq!(retry.problem_type(), "response-not-kept");
    assert_eq!(runs.get(), 1);
}

/// A handler panic abandons its lock; the release runs in the background,
/// and shutdown waits for it instead of leaving the key locked.
#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_the_release_of_an_abandoned_lock() {
    let backend = Wrapped {
        slow_release: Duration::from_secs(2),
        ..Wrapped::default()
    };
    let layer = IdempotencyLayer::new(backend.clone()).lock_ttl(Duration::from_mins(10));
    let shutdown = layer.shutdown_handle();
    let panics = tower::service_fn(|_req: InnerReq| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        panic!("handler bug");
        #[allow(unreachable_code)]
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let mut svc = layer.layer(panics);
    let call = svc
        .ready()
        .await
        .unwrap()
        .call(post("/pay", Some("panics"), "{}"));
    let panicked = tokio::spawn(call).await.unwrap_err();
    assert!(panicked.is_panic());

    let started = Instant::now();
    let report = shutdown.shutdown(Duration::from_secs(30)).await;
    assert!(report.is_clean(), "{report:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "shutdown waited for the release ({:?})",
        started.elapsed()
    );
    let mut other = IdempotencyLayer::new(backend).layer(counting(Runs::default()));
    let retry = send(&mut other, post("/pay", Some("panics"), "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "the key was released");
}

/// A body that yields one chunk, then stays open until dropped (a long poll,
/// an NDJSON watch); it records that it was dropped.
struct Idle {
    sent: bool,
    dropped: Arc<AtomicBool>,
}

impl http_body::Body for Idle {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent {
            return Poll::Pending;
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            b"{\"event\":1}\n",
        )))))
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_stream_whose_client_left_is_settled_after_the_drain_timeout() {
    let runs = Runs::default();
    let dropped = Arc::new(AtomicBool::new(false));
    let handler = tower::service_fn({
        let (runs, dropped) = (runs.clone(), Arc::clone(&dropped));
        move |_req: InnerReq| {
            runs.bump();
            let body = Idle {
                sent: false,
                dropped: Arc::clone(&dropped),
            };
            async move { Ok::<_, Infallible>(Response::new(body)) }
        }
    });
    let layer = IdempotencyLayer::new(MemoryBackend::new())
        .lock_ttl(Duration::from_secs(30))
        .drain_timeout(Duration::from_secs(2));
    let mut svc = layer.layer(handler);

    let res = svc
        .ready()
        .await
        .unwrap()
        .call(post("/watch", Some("watch"), "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "{\"event\":1}\n");
    drop(body); // the client leaves mid-stream

    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy = send(&mut svc, post("/watch", Some("watch"), "{}")).await;
    assert_eq!(busy.status, StatusCode::CONFLICT, "still draining");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        dropped.load(Ordering::SeqCst),
        "the upstream body is dropped"
    );
    let retry = send(&mut svc, post("/watch", Some("watch"), "{}")).await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(
        retry.problem_type(),
        "response-not-kept",
        "settled well within the lock TTL, and not run again"
    );
    assert_eq!(runs.get(), 1);
}
