//! Holding a key while the handler runs: the lock guard, the heartbeat that
//! keeps the lock of a slow handler, and the runner that lets a started
//! handler finish when its client goes away.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument;
use tracing::instrument::Instrumented;

use crate::backend::{Backend, BackendError, Completion};
use crate::config::{Config, OnDisconnect};
use crate::wait::Waiting;
use crate::{Record, StorageKey, observe};

/// Holds the lock; if it is dropped (the flow cancelled, a panic) before
/// the lock is handed to `complete` or `release`, the lock is abandoned to
/// the backend, which releases it without blocking.
pub(crate) struct LockGuard<B: Backend> {
    backend: B,
    lock: Option<B::Lock>,
    /// The duplicates of this key waiting in this process, woken once the
    /// key is stored or released.
    waiters: Option<(Arc<Waiting>, StorageKey)>,
}

impl<B: Backend> LockGuard<B> {
    pub(crate) const fn new(backend: B, lock: B::Lock) -> Self {
        Self {
            backend,
            lock: Some(lock),
            waiters: None,
        }
    }

    /// Wakes `waiting`'s duplicates of `key` when the key is settled.
    pub(crate) fn waking(mut self, waiting: Option<&Arc<Waiting>>, key: StorageKey) -> Self {
        self.waiters = waiting.map(|waiting| (Arc::clone(waiting), key));
        self
    }

    fn wake_waiters(&self) {
        if let Some((waiting, key)) = &self.waiters {
            waiting.settled(key);
        }
    }

    pub(crate) async fn release(&mut self, why: &str) {
        tracing::debug!(why, "response not stored; key released");
        if let Some(lock) = self.lock.take() {
            if let Err(error) = observe::backend("release", self.backend.release(lock)).await {
                tracing::warn!(%error, "releasing the idempotency lock failed");
            }
            self.wake_waiters();
        }
    }

    pub(crate) async fn complete(
        &mut self,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        match self.lock.take() {
            Some(lock) => {
                let completed =
                    observe::backend("complete", self.backend.complete(lock, record, ttl)).await;
                self.wake_waiters();
                completed
            }
            None => Ok(Completion::Lost),
        }
    }

    /// Drives `work` while extending the lock every `lock_ttl / 3` (when the
    /// heartbeat is on). Returns the output and whether the lock was
    /// reported lost.
    ///
    /// `work` is pinned by the caller: a future moved into an async function
    /// is stored again at every level, and this one is large.
    pub(crate) async fn keep_while<F: Future>(
        &self,
        mut work: Pin<&mut F>,
        config: &Config,
    ) -> (F::Output, bool) {
        let Some(lock) = self.lock.as_ref().filter(|_| config.heartbeat) else {
            return (work.await, false);
        };
        let interval = config.heartbeat_interval();
        let heartbeat = async {
            loop {
                tokio::time::sleep(interval).await;
                match observe::backend("extend", self.backend.extend(lock, config.lock_ttl)).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(error) => tracing::warn!(%error, "extending the idempotency lock failed"),
                }
            }
        };
        tokio::select! {
            biased;
            output = &mut work => (output, false),
            () = heartbeat => (work.await, true),
        }
    }
}

impl<B: Backend> Drop for LockGuard<B> {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            self.backend.abandon(lock);
            // The release runs in the background: the waiting room polls
            // again from its shortest interval, and finds the key free soon
            // after, instead of at a poll up to 500 ms away.
            self.wake_waiters();
        }
    }
}

/// Where the task running a handler sends the response, once. It also
/// holds the signal a streamed body waits for before it ends: dropped with
/// the delivery, when the task has stored the record or released the key.
pub(crate) struct Delivery<T>(Option<oneshot::Sender<T>>, Option<oneshot::Sender<()>>);

impl<T> Delivery<T> {
    /// A receiver that resolves when the task has settled the key.
    pub(crate) fn settled(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.1 = Some(tx);
        rx
    }

    /// Hands `value` to the waiting client; if the client is gone, `value`
    /// is dropped here.
    pub(crate) fn send(&mut self, value: T) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(value);
        }
    }
}

/// Runs `work` so that it is not cancelled with the client's response
/// future. With [`OnDisconnect::Cancel`], `work` is told through its
/// [`Cancellation`] when the client leaves before it delivered.
///
/// `work` is first polled right here, in the client's task: most handlers
/// answer without waiting for anything, and then no task is spawned. The
/// first time it has to wait, it is moved into a task of its own (spawned
/// before this poll returns, so there is no moment at which dropping the
/// client's future could cut it off). The returned future resolves to what
/// `work` delivers: `None` if it ended without delivering (the runtime shut
/// down); a panic in `work` is resumed in the caller.
pub(crate) fn run_detached<T, F>(
    on_disconnect: OnDisconnect,
    work: impl FnOnce(Delivery<T>, Cancellation) -> F,
) -> Detached<T>
where
    T: Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let (disarm, cancellation) = match on_disconnect {
        OnDisconnect::Cancel => {
            let (disarm, armed) = oneshot::channel();
            (Some(disarm), Cancellation(Some(armed)))
        }
        OnDisconnect::Complete => (None, Cancellation(None)),
    };
    // Boxed, then instrumented (in the request's span): the future is large,
    // and is moved once.
    let work: Work = (Box::pin(work(Delivery(Some(tx), None), cancellation))
        as Pin<Box<dyn Future<Output = ()> + Send>>)
        .instrument(tracing::Span::current());
    Detached {
        rx,
        running: Running::Here(Some(work)),
        disarm,
    }
}

type Work = Instrumented<Pin<Box<dyn Future<Output = ()> + Send>>>;

/// Where the work runs.
enum Running {
    /// Not polled yet: the client's future polls it first.
    Here(Option<Work>),
    /// In a task of its own.
    Spawned(JoinHandle<()>),
    /// Finished, or no longer followed (delivered).
    Done,
}

/// Tells a detached task that its client left before it was answered
/// (only with [`OnDisconnect::Cancel`]).
pub(crate) struct Cancellation(Option<oneshot::Receiver<()>>);

impl Cancellation {
    /// Runs `work` unless the client leaves first; `None` when it left.
    /// Only the handler is cut off this way: storing or releasing the key
    /// afterwards always runs to its end.
    pub(crate) async fn unless_cancelled<F: Future>(self, work: Pin<&mut F>) -> Option<F::Output> {
        let Some(armed) = self.0 else {
            return Some(work.await);
        };
        let left = async {
            // Disarmed (the client got its answer): never cancelled.
            if armed.await.is_ok() {
                std::future::pending::<()>().await;
            }
        };
        // The client's leaving is looked at first: the handler is cut off at
        // the first await after it, not allowed one more step.
        tokio::select! {
            biased;
            () = left => None,
            output = work => Some(output),
        }
    }
}

/// The client's side of [`run_detached`].
pub(crate) struct Detached<T> {
    rx: oneshot::Receiver<T>,
    running: Running,
    /// Dropped unsent, it cancels the work ([`OnDisconnect::Cancel`]).
    disarm: Option<oneshot::Sender<()>>,
}

impl<T> Future for Detached<T> {
    type Output = Option<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Running::Here(work) = &mut self.running
            && let Some(mut work) = work.take()
        {
            self.running = match Pin::new(&mut work).poll(cx) {
                Poll::Ready(()) => Running::Done,
                // It waits for something: from now on it runs on its own.
                Poll::Pending => Running::Spawned(tokio::spawn(work)),
            };
        }
        if let Ok(value) = ready!(Pin::new(&mut self.rx).poll(cx)) {
            if let Some(disarm) = self.disarm.take() {
                let _ = disarm.send(());
            }
            // Delivered: the rest (a streamed body being stored) goes on
            // without this future.
            self.running = Running::Done;
            return Poll::Ready(Some(value));
        }
        // The work ended without delivering: it panicked, or was cancelled.
        let Running::Spawned(handle) = &mut self.running else {
            return Poll::Ready(None);
        };
        let joined = ready!(Pin::new(handle).poll(cx));
        self.running = Running::Done;
        match joined {
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            _ => Poll::Ready(None),
        }
    }
}
