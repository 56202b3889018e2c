//! Graceful shutdown: what the layer has started is finished (or settled)
//! before the process exits.
//!
//! A rolling deploy stops an instance with `SIGTERM`. Without this, the
//! work the layer runs on its own — a handler whose client left (see
//! [`OnDisconnect::Complete`](crate::OnDisconnect::Complete)), the store of
//! a streamed response, a release sent in the background — is dropped at
//! an arbitrary `.await` when `main` returns: between the charge and the
//! store, say. The key's lock then stays for `lock_ttl`, and the retry on
//! the next instance runs the handler a second time.
//!
//! [`ShutdownHandle::shutdown`] closes that hole: it refuses new keyed
//! requests (`503`, [shutting down](crate::problem#shutting-down)), waits —
//! up to a grace period — for every keyed request in flight, connected or
//! detached, and for the stores and releases sent in the background, then
//! cuts off the handlers still running and settles their keys.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::Notify;

/// Stops a layer's keyed work gracefully; made by
/// [`IdempotencyLayer::shutdown_handle`](crate::IdempotencyLayer::shutdown_handle).
///
/// Three lines in an axum server: start the layer's shutdown at the signal,
/// let the server's graceful shutdown start with it (connected clients get
/// their answers), and wait for both before `main` returns. Started
/// together, one grace period bounds the keyed requests of connected
/// clients too: a server's own graceful shutdown waits for them without
/// limit.
///
/// ```no_run
/// use std::time::Duration;
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let layer = IdempotencyLayer::new(MemoryBackend::new());
/// let shutdown = layer.shutdown_handle();
/// let app: Router = Router::new().route("/payments", post(|| async { "created" })).layer(layer);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
///
/// let signal = async { tokio::signal::ctrl_c().await.ok(); }; // and SIGTERM, see the examples
/// let finished = shutdown.shutdown_on(signal, Duration::from_secs(20)); // 1
/// axum::serve(listener, app)
///     .with_graceful_shutdown(shutdown.started()) // 2
///     .await?;
/// let report = finished.await; // 3
/// # let _ = report;
/// # Ok(())
/// # }
/// ```
///
/// A hyper server does the same around `hyper_util`'s `GracefulShutdown`
/// (see `examples/hyper.rs`): `shutdown_on` the signal, break the accept
/// loop on [`started`](Self::started), `graceful.shutdown().await`, then
/// await what `shutdown_on` returned. Calling
/// [`shutdown`](Self::shutdown) only after the server's own graceful
/// shutdown returned also works, but bounds nothing until then.
///
/// # What it does
///
/// 1. From the call on, keyed requests are answered `503` with
///    `Retry-After` ([shutting down](crate::problem#shutting-down)) before
///    anything is looked up or run: the client retries on another instance.
///    Requests the layer does not guard pass as before.
/// 2. It waits up to `grace` for every keyed request in flight — handlers
///    still running, connected or not, responses being stored, streamed
///    bodies being copied — and for the backend calls the layer or a
///    backend sent in the background (releases, late stores).
/// 3. Handlers still running then are cut off at their next `.await`, and
///    their keys settled:
///    - on a backend that commits the handler's effects with the record
///      (PostgreSQL's transaction mode), the key is **released**: the
///      transaction rolls back, so nothing happened and a retry may run;
///    - on every other backend an **[interrupted](crate::problem#interrupted)
///      record** is stored: the layer cannot know how far the handler got —
///      the charge may have happened — so a retry is answered `500` with
///      that problem instead of running the handler a second time. Choose
///      `grace` long enough that this is rare (longer than your slowest
///      handler, shorter than the orchestrator's kill timeout);
///    - a handler that was never called (its lock came after the cut) is
///      released, and one whose response was already streaming gets a
///      "response not kept" marker with its status, as any response that
///      could not be stored.
///
///    It waits once more for those settlements and what they send in the
///    background: up to `grace`, and at least five seconds, so that a short
///    or zero grace period still lets them reach the backend.
///
/// What it cannot promise: a backend that does not answer within the two
/// waits (the keys it held then lapse after `lock_ttl`, and
/// [`ShutdownReport`] says how many), a process killed before `shutdown`
/// returns, and the records of a [`MemoryBackend`](crate::MemoryBackend),
/// which live in the process and end with it.
///
/// The handle is cheap to clone; every clone, and every service made by
/// the layer (and its clones), shares one state. Calling `shutdown` again
/// waits again.
#[derive(Clone)]
#[must_use]
pub struct ShutdownHandle {
    state: Arc<State>,
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("closed", &self.state.closed.load(Ordering::SeqCst))
            .field("requests", &self.state.requests.load(Ordering::SeqCst))
            .field("background", &self.state.background.load(Ordering::SeqCst))
            .finish()
    }
}

/// What [`ShutdownHandle::shutdown`] found when it returned.
///
/// ```
/// # async fn run(shutdown: tower_idempotency::ShutdownHandle) {
/// use std::time::Duration;
///
/// let report = shutdown.shutdown(Duration::from_secs(20)).await;
/// if !report.is_clean() {
///     eprintln!("shutdown: {report:?}");
/// }
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct ShutdownReport {
    /// Handlers still running at the end of the grace period, cut off and
    /// settled (released, or an interrupted record stored).
    pub interrupted: usize,
    /// Keyed requests still not finished when `shutdown` returned (their
    /// settlement did not finish within the second wait either).
    pub unfinished: usize,
    /// Background backend calls (releases, late stores) still running when
    /// `shutdown` returned: their keys lapse after `lock_ttl`.
    pub abandoned: usize,
}

impl ShutdownReport {
    /// Whether everything finished within the grace period.
    #[must_use]
    pub const fn is_clean(&self) -> bool {
        self.interrupted == 0 && self.unfinished == 0 && self.abandoned == 0
    }
}

#[derive(Default)]
struct State {
    /// No new keyed request is taken.
    closed: AtomicBool,
    /// Running handlers are cut off.
    cut: AtomicBool,
    /// Keyed requests from the lookup to the store or release.
    requests: AtomicUsize,
    /// Backend calls spawned in the background.
    background: AtomicUsize,
    /// Handlers cut off so far.
    interrupted: AtomicUsize,
    /// Woken, once the shutdown started, when a count reaches zero; and when
    /// it starts.
    changed: Notify,
    /// Woken when handlers are cut off. Sharded: every request in flight
    /// waits on one, and waiting takes its lock at each poll.
    cut_signal: [Notify; CUT_SHARDS],
    /// Spreads requests over the shards.
    next_shard: AtomicUsize,
}

const CUT_SHARDS: usize = 16;

/// The least time the cut-off requests get to settle their keys.
const MIN_SETTLE: Duration = Duration::from_secs(5);

impl State {
    fn decrement(&self, count: &AtomicUsize) {
        // Nobody waits for the counts before a shutdown starts: `shutdown`
        // sets `closed` before it reads them, so one of the two sees the
        // other.
        if count.fetch_sub(1, Ordering::SeqCst) == 1 && self.closed.load(Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }

    /// Waits until `done` holds, rechecked whenever a count changes.
    async fn until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if done(self) {
                return;
            }
            changed.await;
        }
    }
}

impl ShutdownHandle {
    /// A handle of its own; layers make theirs.
    pub(crate) fn new() -> Self {
        Self {
            state: Arc::default(),
        }
    }

    /// Starts [`shutdown`](Self::shutdown) when `signal` resolves, in a task
    /// of its own, so that its grace period runs beside the server's own
    /// graceful shutdown and also bounds the keyed requests of clients that
    /// are still connected. Await the returned future before the process
    /// exits; it resolves with the report once the shutdown is over.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (it spawns the task that waits for `signal`).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use axum::{Router, routing::post};
    /// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let layer = IdempotencyLayer::new(MemoryBackend::new());
    /// let shutdown = layer.shutdown_handle();
    /// let app: Router = Router::new().route("/payments", post(|| async { "created" })).layer(layer);
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    ///
    /// let signal = async { tokio::signal::ctrl_c().await.ok(); };
    /// let finished = shutdown.shutdown_on(signal, Duration::from_secs(20)); // 1
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(shutdown.started()) // 2
    ///     .await?;
    /// let report = finished.await; // 3
    /// # let _ = report;
    /// # Ok(())
    /// # }
    /// ```
    pub fn shutdown_on<F>(
        &self,
        signal: F,
        grace: Duration,
    ) -> impl Future<Output = ShutdownReport> + Send + 'static
    where
        F: Future + Send + 'static,
    {
        let handle = self.clone();
        let task = tokio::spawn(async move {
            signal.await;
            handle.shutdown(grace).await
        });
        async move { task.await.unwrap_or_default() }
    }

    /// Resolves once a shutdown has started: for a server's own graceful
    /// shutdown to begin together with the layer's (see
    /// [`shutdown_on`](Self::shutdown_on)).
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        let state = Arc::clone(&self.state);
        async move { state.until(|s| s.closed.load(Ordering::SeqCst)).await }
    }

    /// Refuses new keyed requests, waits up to `grace` for the keyed work
    /// in flight, then cuts off the handlers still running, settles their
    /// keys and waits for that (up to `grace`, at least five seconds). See
    /// [What it does](#what-it-does).
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let state = &*self.state;
        state.closed.store(true, Ordering::SeqCst);
        state.changed.notify_waiters();
        let all_done = |s: &State| {
            s.requests.load(Ordering::SeqCst) == 0 && s.background.load(Ordering::SeqCst) == 0
        };
        let finished = tokio::time::timeout(grace, state.until(all_done))
            .await
            .is_ok();
        if !finished {
            let running = state.requests.load(Ordering::SeqCst);
            if running > 0 {
                tracing::warn!(
                    running,
                    "shutdown grace period over: cutting off keyed requests still running"
                );
                state.cut.store(true, Ordering::SeqCst);
                for signal in &state.cut_signal {
                    signal.notify_waiters();
                }
            }
            // The settlements (one backend call each) and their own late
            // stores and releases: given time even when the grace period
            // is short or zero, or their keys would be left to lapse.
            let settling = grace.max(MIN_SETTLE);
            let _ = tokio::time::timeout(settling, state.until(all_done)).await;
        }
        let report = ShutdownReport {
            interrupted: state.interrupted.load(Ordering::SeqCst),
            unfinished: state.requests.load(Ordering::SeqCst),
            abandoned: state.background.load(Ordering::SeqCst),
        };
        if report.unfinished > 0 || report.abandoned > 0 {
            tracing::warn!(
                unfinished = report.unfinished,
                abandoned = report.abandoned,
                "shutdown returns with idempotency work unfinished; those keys lapse after lock_ttl"
            );
        } else {
            tracing::info!(
                interrupted = report.interrupted,
                "idempotency layer shut down"
            );
        }
        report
    }

    /// Whether [`shutdown`](Self::shutdown) was called: new keyed requests
    /// are refused.
    #[must_use]
    pub fn is_shutting_down(&self) -> bool {
        self.state.closed.load(Ordering::SeqCst)
    }

    /// Makes the background tasks spawned with [`spawn`] while `work` is
    /// polled or dropped count for this shutdown.
    pub(crate) fn track<F: Future>(&self, work: F) -> Tracked<F> {
        Tracked {
            work: Some(work),
            state: Arc::clone(&self.state),
        }
    }

    /// A ticket for a keyed request, or `None` once shutting down.
    pub(crate) fn enter(&self) -> Option<Ticket> {
        let state = &self.state;
        // Counted before the check: `shutdown` sets `closed` before it reads
        // the count, so one of the two sees the other.
        state.requests.fetch_add(1, Ordering::SeqCst);
        let shard = state.next_shard.fetch_add(1, Ordering::Relaxed) % CUT_SHARDS;
        let ticket = Ticket(Arc::clone(state), shard);
        if state.closed.load(Ordering::SeqCst) {
            return None; // the ticket's drop takes the count back
        }
        Some(ticket)
    }
}

/// A keyed request in flight, counted until dropped.
pub(crate) struct Ticket(Arc<State>, usize);

impl Ticket {
    /// Runs `work` unless the handlers are cut off first (the grace period
    /// ended); `None` when cut off. The cut is looked at first.
    pub(crate) async fn unless_cut_off<F: Future>(&self, work: Pin<&mut F>) -> Option<F::Output> {
        let state = &*self.0;
        let signal = &state.cut_signal[self.1];
        let cut = async {
            loop {
                let notified = signal.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if state.cut.load(Ordering::SeqCst) {
                    return;
                }
                notified.await;
            }
        };
        tokio::select! {
            biased;
            () = cut => {
                state.interrupted.fetch_add(1, Ordering::SeqCst);
                None
            }
            output = work => Some(output),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.decrement(&self.0.requests);
    }
}

thread_local! {
    /// The shutdown state of the request being polled on this thread.
    static CURRENT: RefCell<Option<Arc<State>>> = const { RefCell::new(None) };
}

pin_project! {
    /// A future that makes its shutdown state current while it is polled
    /// or dropped, so that [`spawn`] inside it is tracked.
    pub(crate) struct Tracked<F> {
        #[pin]
        work: Option<F>,
        state: Arc<State>,
    }

    impl<F> PinnedDrop for Tracked<F> {
        fn drop(this: Pin<&mut Self>) {
            // Drop glue run here (a lock guard abandoning its lock, a
            // backend call cleaning up) spawns tracked tasks too.
            let this = this.project();
            let _current = Current::enter(this.state);
            let mut work = this.work;
            work.set(None);
        }
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _current = Current::enter(this.state);
        match this.work.as_pin_mut() {
            Some(work) => work.poll(cx),
            None => Poll::Pending,
        }
    }
}

/// Makes a shutdown state current on this thread until dropped.
struct Current(Option<Arc<State>>);

impl Current {
    fn enter(state: &Arc<State>) -> Self {
        // `try_with`: a future dropped while the thread's locals are torn
        // down spawns untracked rather than panicking.
        Self(
            CURRENT
                .try_with(|c| c.replace(Some(Arc::clone(state))))
                .unwrap_or(None),
        )
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        let previous = self.0.take();
        let _ = CURRENT.try_with(|c| *c.borrow_mut() = previous);
    }
}

/// Spawns `task` on the current Tokio runtime, counted as background work
/// of the layer whose request is being polled (or dropped) on this thread,
/// so that a graceful shutdown waits for it. Outside a runtime nothing is
/// spawned and `false` is returned.
pub(crate) fn spawn<F>(task: F) -> bool
where
    F: Future<Output = ()> + Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    let state = CURRENT.try_with(|c| c.borrow().clone()).unwrap_or(None);
    match state {
        Some(state) => {
            state.background.fetch_add(1, Ordering::SeqCst);
            let counted = Background(Arc::clone(&state));
            // Tracked itself: what the task spawns in turn (a failed
            // release's own clean-up) is waited for too.
            let task = Tracked {
                work: Some(task),
                state,
            };
            runtime.spawn(async move {
                task.await;
                drop(counted);
            });
        }
        None => {
            runtime.spawn(task);
        }
    }
    true
}

/// A background task, counted until it ends (or the runtime drops it).
struct Background(Arc<State>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.decrement(&self.0.background);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_tickets_and_background_tasks() {
        let handle = ShutdownHandle::new();
        let ticket = handle.enter().expect("open");
        let tracked = handle.track(async {
            assert!(spawn(async {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }));
        });
        tracked.await;
        let started = tokio::time::Instant::now();
        let release = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(ticket);
        };
        let (report, ()) = tokio::join!(handle.shutdown(Duration::from_secs(10)), release);
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert!(handle.enter().is_none(), "closed for new requests");
        assert!(handle.is_shutting_down());
    }

    #[tokio::test(start_paused = true)]
    async fn handlers_past_the_grace_period_are_cut_off() {
        let handle = ShutdownHandle::new();
        let ticket = handle.enter().expect("open");
        let request = async move {
            let work = std::pin::pin!(std::future::pending::<()>());
            let cut = ticket.unless_cut_off(work).await;
            assert!(cut.is_none());
            // Settling takes a moment.
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let started = tokio::time::Instant::now();
        let (report, ()) = tokio::join!(handle.shutdown(Duration::from_secs(5)), request);
        assert_eq!(report.interrupted, 1);
        assert_eq!(report.unfinished, 0);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5) + Duration::from_millis(10)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_grace_period_still_lets_the_cut_off_settle() {
        let handle = ShutdownHandle::new();
        let ticket = handle.enter().expect("open");
        let request = async move {
            let work = std::pin::pin!(std::future::pending::<()>());
            assert!(ticket.unless_cut_off(work).await.is_none());
            // Settling: a backend call.
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(ticket);
        };
        let started = tokio::time::Instant::now();
        let (report, ()) = tokio::join!(handle.shutdown(Duration::ZERO), request);
        assert_eq!(
            (report.interrupted, report.unfinished),
            (1, 0),
            "{report:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn what_never_settles_is_reported() {
        let handle = ShutdownHandle::new();
        let ticket = handle.enter().expect("open");
        let report = handle.shutdown(Duration::from_secs(1)).await;
        assert_eq!(report.unfinished, 1);
        assert!(!report.is_clean());
        drop(ticket);
        assert!(handle.shutdown(Duration::from_secs(1)).await.is_clean());
    }

    /// Spawns a two-second task when dropped, as a backend call cleans up.
    struct SpawnsOnDrop;

    impl Drop for SpawnsOnDrop {
        fn drop(&mut self) {
            assert!(spawn(tokio::time::sleep(Duration::from_secs(2))));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn what_a_request_dropped_between_polls_spawns_is_tracked() {
        let handle = ShutdownHandle::new();
        let guard = SpawnsOnDrop;
        let mut request = Box::pin(handle.track(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        }));
        std::future::poll_fn(|cx| {
            assert!(request.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        drop(request); // the client leaves
        let started = tokio::time::Instant::now();
        assert!(handle.shutdown(Duration::from_secs(10)).await.is_clean());
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_settlements_own_background_work_is_waited_for() {
        let handle = ShutdownHandle::new();
        let ticket = handle.enter().expect("open");
        let request = handle.track(async move {
            let work = std::pin::pin!(std::future::pending::<()>());
            assert!(ticket.unless_cut_off(work).await.is_none());
            // Settling the key: its store is made up in the background.
            assert!(spawn(tokio::time::sleep(Duration::from_secs(3))));
            drop(ticket);
        });
        let started = tokio::time::Instant::now();
        let (report, ()) = tokio::join!(handle.shutdown(Duration::from_secs(5)), request);
        assert_eq!(report.interrupted, 1);
        assert!(
            report.abandoned == 0 && report.unfinished == 0,
            "{report:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(8));
    }

    #[tokio::test(start_paused = true)]
    async fn what_background_work_spawns_is_waited_for_too() {
        let handle = ShutdownHandle::new();
        handle
            .track(async {
                assert!(spawn(async {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    // A failed release cleans up in a task of its own.
                    assert!(spawn(tokio::time::sleep(Duration::from_secs(2))));
                }));
            })
            .await;
        let started = tokio::time::Instant::now();
        assert!(handle.shutdown(Duration::from_secs(10)).await.is_clean());
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn started_resolves_when_the_shutdown_begins_and_shutdown_on_runs_it() {
        let handle = ShutdownHandle::new();
        let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
        let finished = handle.shutdown_on(
            async move {
                let _ = signalled.await;
            },
            Duration::from_secs(1),
        );
        let started = handle.started();
        tokio::pin!(started);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), &mut started)
                .await
                .is_err(),
            "not before the signal"
        );
        signal.send(()).unwrap();
        started.await;
        assert!(handle.is_shutting_down());
        assert!(finished.await.is_clean());
    }

    #[tokio::test]
    async fn untracked_spawns_are_not_counted() {
        let handle = ShutdownHandle::new();
        assert!(spawn(std::future::pending()));
        let report = handle.shutdown(Duration::from_millis(1)).await;
        assert!(report.is_clean(), "{report:?}");
    }
}
