//! A client that leaves at every await point of the flow, on any backend.
//!
//! The handler and the backend wait for *steps* that the test hands out one
//! at a time, so the test decides how far the flow gets before the client's
//! response future is dropped: while the request body is read, in `begin`,
//! in the handler, while the response body streams, in the store.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{
    Backend, BackendError, Begin, Completion, Fingerprint, IdempotencyBody, IdempotencyLayer,
    OnDisconnect, Record, StorageKey,
};

use super::Runs;

/// Steps handed out one at a time by the test.
#[derive(Clone)]
pub struct Steps(Arc<tokio::sync::Semaphore>);

impl Steps {
    fn new() -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(0)))
    }
    async fn take(&self) {
        self.0.acquire().await.unwrap().forget();
    }
    fn grant_all(&self) {
        self.0.add_permits(1 << 20);
    }
    /// One step, unless the last one is still unused.
    fn grant_one(&self) {
        if self.0.available_permits() == 0 {
            self.0.add_permits(1);
        }
    }
}

/// A backend whose every operation waits for a step before it runs, and
/// that counts the locks it handed out and that were not yet completed,
/// released or abandoned.
#[derive(Clone)]
pub struct Stepped<B> {
    inner: B,
    steps: Steps,
    held: Arc<AtomicIsize>,
}

impl<B: Backend> Backend for Stepped<B> {
    type Lock = B::Lock;

    async fn begin(
        &self,
        key: &StorageKey,
        fp: &Fingerprint,
        ttl: Duration,
    ) -> Result<Begin<B::Lock>, BackendError> {
        self.steps.take().await;
        let begun = self.inner.begin(key, fp, ttl).await;
        if matches!(begun, Ok(Begin::Acquired(_))) {
            self.held.fetch_add(1, Ordering::SeqCst);
        }
        begun
    }

    async fn complete(
        &self,
        lock: B::Lock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        self.steps.take().await;
        let done = self.inner.complete(lock, record, ttl).await;
        self.held.fetch_sub(1, Ordering::SeqCst);
        done
    }

    async fn release(&self, lock: B::Lock) -> Result<(), BackendError> {
        self.steps.take().await;
        let done = self.inner.release(lock).await;
        self.held.fetch_sub(1, Ordering::SeqCst);
        done
    }

    async fn extend(&self, lock: &B::Lock, ttl: Duration) -> Result<bool, BackendError> {
        self.steps.take().await;
        self.inner.extend(lock, ttl).await
    }

    fn abandon(&self, lock: B::Lock) {
        self.held.fetch_sub(1, Ordering::SeqCst);
        self.inner.abandon(lock);
    }

    fn fencing_token(&self, lock: &B::Lock) -> Option<tower_idempotency::FencingToken> {
        self.inner.fencing_token(lock)
    }
}

/// A request body that is `Pending` (waking itself) before each chunk.
pub struct SlowBody {
    chunks: Vec<&'static [u8]>,
    pending: bool,
}

impl SlowBody {
    pub fn new(chunks: Vec<&'static [u8]>) -> Self {
        Self {
            chunks,
            pending: false,
        }
    }
}

impl http_body::Body for SlowBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.chunks.is_empty() {
            return Poll::Ready(None);
        }
        if !self.pending {
            self.pending = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.pending = false;
        let chunk = self.chunks.remove(0);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(chunk)))))
    }
}

/// `POST /p` with `key` and the body `abc` in three slow chunks.
pub fn slow_request(key: &str) -> Request<SlowBody> {
    Request::post("/p")
        .header("idempotency-key", key)
        .body(SlowBody::new(vec![b"a", b"b", b"c"]))
        .unwrap()
}

/// A response body of two chunks, each after a step, with no length.
pub struct SteppedBody {
    chunks: Vec<&'static [u8]>,
    step: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    steps: Steps,
}

impl http_body::Body for SteppedBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.chunks.is_empty() {
            return Poll::Ready(None);
        }
        let steps = self.steps.clone();
        let step = self
            .step
            .get_or_insert_with(|| Box::pin(async move { steps.take().await }));
        std::task::ready!(step.as_mut().poll(cx));
        self.step = None;
        let chunk = self.chunks.remove(0);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(chunk)))))
    }
}

/// Echoes the request body after four steps; the response body is whole
/// (`Full`: buffered, then stored) or streamed in two stepped chunks without
/// a length (teed to the client and stored at its end).
fn echo_handler(
    runs: Runs,
    streamed: bool,
    steps: Steps,
) -> impl Service<
    Request<IdempotencyBody<SlowBody>>,
    Response = Response<http_body_util::Either<Full<Bytes>, SteppedBody>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<IdempotencyBody<SlowBody>>| {
        let runs = runs.clone();
        let steps = steps.clone();
        async move {
            runs.bump();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            for _ in 0..4 {
                steps.take().await;
            }
            assert_eq!(body, "abc");
            let body = if streamed {
                http_body_util::Either::Right(SteppedBody {
                    chunks: vec![b"ab", b"c"],
                    step: None,
                    steps,
                })
            } else {
                http_body_util::Either::Left(Full::new(body))
            };
            Ok::<_, Infallible>(Response::new(body))
        }
    })
}

/// What one client that left after some polls saw.
pub struct Left {
    /// A lock was held when the client left.
    pub held_lock: bool,
    /// The client had its answer (and dropped the body unread).
    pub answered: bool,
    /// Handler runs by the first request and by its retry.
    pub first_runs: usize,
    pub retry_runs: usize,
    /// The retry was a replay.
    pub replayed: bool,
}

/// Sends a request on `key` and drops it after `polls` polls, with one step
/// granted and a millisecond for the runtime (and the network) between
/// polls; then lets everything finish (failing on a lock that stays held)
/// and retries.
pub async fn leave_after<B: Backend>(
    backend: &B,
    key: &str,
    polls: usize,
    streamed: bool,
    on_disconnect: OnDisconnect,
) -> Left {
    let runs = Runs::default();
    let steps = Steps::new();
    let held = Arc::new(AtomicIsize::new(0));
    let stepped = Stepped {
        inner: backend.clone(),
        steps: steps.clone(),
        held: held.clone(),
    };
    let svc = IdempotencyLayer::new(stepped)
        .on_disconnect(on_disconnect)
        .layer(echo_handler(runs.clone(), streamed, steps.clone()));
    let mut fut = Box::pin(svc.clone().oneshot(slow_request(key)));
    let mut cx = Context::from_waker(Waker::noop());
    let mut answered = false;
    for _ in 0..polls {
        if let Poll::Ready(res) = fut.as_mut().poll(&mut cx) {
            answered = true;
            drop(res); // the body, unread
            break;
        }
        steps.grant_one();
        // Time for a remote backend's reply to arrive, too.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let held_lock = held.load(Ordering::SeqCst) > 0;
    drop(fut);
    steps.grant_all();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while held.load(Ordering::SeqCst) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a lock stayed held after {polls} polls"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(held.load(Ordering::SeqCst), 0, "a lock was settled twice");
    let first_runs = runs.get();
    // A lock taken by a `begin` whose reply the client never read is not
    // counted above: a remote backend frees it on its own (Redis by token
    // from a background task, PostgreSQL when the server sees the closed
    // session), which may take a moment. Retry as a client would, on `409`.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let retry = loop {
        let retry = svc.clone().oneshot(slow_request(key)).await.unwrap();
        if retry.status() != http::StatusCode::CONFLICT {
            break retry;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key stayed locked after {polls} polls"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let replayed = retry.headers().contains_key("idempotent-replayed");
    assert_eq!(retry.into_body().collect().await.unwrap().to_bytes(), "abc");
    Left {
        held_lock,
        answered,
        first_runs,
        retry_runs: runs.get() - first_runs,
        replayed,
    }
}

/// With [`OnDisconnect::Complete`]: wherever the client leaves, the handler
/// runs exactly once for the key; once it started, the retry replays it.
pub async fn never_twice<B: Backend>(backend: &B, tag: &str) {
    for streamed in [false, true] {
        let (mut held, mut before_start, mut answered) = (0, 0, 0);
        for polls in 0..32 {
            let key = format!("{tag}-leave-{streamed}-{polls}");
            let left = leave_after(backend, &key, polls, streamed, OnDisconnect::Complete).await;
            let at = format!("streamed {streamed}, {polls} polls");
            assert_eq!(
                left.first_runs + left.retry_runs,
                1,
                "{at}: exactly one run"
            );
            assert_eq!(
                left.replayed,
                left.first_runs == 1,
                "{at}: replay iff the first ran"
            );
            held += usize::from(left.held_lock);
            before_start += usize::from(left.first_runs == 0);
            answered += usize::from(left.answered);
        }
        assert!(before_start > 0, "no drop before the handler started");
        assert!(held >= 2, "only {held} drops held the lock");
        assert!(
            answered > 0,
            "the poll budget never reached an answer; raise it"
        );
    }
}

/// With [`OnDisconnect::Cancel`]: a handler may be cut off, but no lock
/// stays held, and a retry either replays a complete response or runs again.
pub async fn cancel_leaves_no_lock<B: Backend>(backend: &B, tag: &str) {
    for streamed in [false, true] {
        let mut cut_off = 0;
        for polls in 0..32 {
            let key = format!("{tag}-cancel-{streamed}-{polls}");
            let left = leave_after(backend, &key, polls, streamed, OnDisconnect::Cancel).await;
            let at = format!("streamed {streamed}, {polls} polls");
            assert!(left.retry_runs <= 1, "{at}");
            assert_eq!(left.replayed, left.retry_runs == 0, "{at}");
            if left.first_runs == 1 && left.retry_runs == 1 {
                cut_off += 1;
            }
        }
        assert!(cut_off >= 1, "cancel mode never cut a handler off");
    }
}
