//! Counters and histograms through the [`metrics`](https://docs.rs/metrics)
//! facade with the `metrics` feature; without it every function here is an
//! empty inline call. The names and labels are documented in the crate docs
//! ("Metrics").

#[cfg(feature = "metrics")]
use std::future::Future;

#[cfg(feature = "metrics")]
use crate::backend::BackendError;

/// Counts one guarded request (or one without a key) by what the layer did.
#[inline]
pub(crate) fn request(outcome: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_requests_total", "outcome" => outcome).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}

/// Counts what became of a response the handler produced under the lock.
#[inline]
pub(crate) fn store(result: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_stores_total", "result" => result).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = result;
}

/// Counts how a wait for a request in flight ended.
#[inline]
pub(crate) fn wait(result: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_waits_total", "result" => result).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = result;
}

/// Runs one backend operation, recording its duration and, on failure, its
/// error kind.
///
/// A plain function returning a future, not an `async fn`: an `async fn`
/// that awaits a future it was given keeps room for it twice (as the
/// argument and as what it awaits), and the backends' futures are the
/// largest part of a request's.
#[cfg(not(feature = "metrics"))]
#[inline]
pub(crate) fn backend<F>(operation: &'static str, call: F) -> F {
    let _ = operation;
    call
}

/// Runs one backend operation, recording its duration and, on failure, its
/// error kind.
///
/// A future of its own rather than an `async fn`, which would keep room for
/// the backend's future twice (see the version without metrics).
#[cfg(feature = "metrics")]
#[inline]
pub(crate) fn backend<F>(operation: &'static str, call: F) -> Observed<F> {
    Observed {
        call,
        operation,
        started: None,
    }
}

#[cfg(feature = "metrics")]
pin_project_lite::pin_project! {
    /// A backend call being timed: see [`backend`].
    pub(crate) struct Observed<F> {
        #[pin]
        call: F,
        operation: &'static str,
        started: Option<std::time::Instant>,
    }
}

#[cfg(feature = "metrics")]
impl<T, F: Future<Output = Result<T, BackendError>>> Future for Observed<F> {
    type Output = Result<T, BackendError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let started = *this.started.get_or_insert_with(std::time::Instant::now);
        let result = std::task::ready!(this.call.poll(cx));
        let operation = *this.operation;
        metrics::histogram!("idempotency_backend_duration_seconds", "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        if let Err(error) = &result {
            metrics::counter!(
                "idempotency_backend_errors_total",
                "operation" => operation,
                "kind" => error_kind(error),
            )
            .increment(1);
        }
        std::task::Poll::Ready(result)
    }
}

#[cfg(feature = "metrics")]
const fn error_kind(error: &BackendError) -> &'static str {
    use crate::backend::BackendErrorKind;
    match error.kind() {
        BackendErrorKind::Unavailable => "unavailable",
        BackendErrorKind::Timeout => "timeout",
        BackendErrorKind::Rejected => "rejected",
        BackendErrorKind::Corrupt => "corrupt",
        BackendErrorKind::Incompatible => "incompatible",
        BackendErrorKind::Misconfigured => "misconfigured",
        BackendErrorKind::Other => "other",
    }
}

/// Describes the metrics to the installed recorder (units and help texts,
/// shown by exporters such as Prometheus).
///
/// ```
/// # #[cfg(feature = "metrics")]
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let handle = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
/// tower_idempotency::describe_metrics();
/// # let _ = handle;
/// # Ok(())
/// # }
/// # #[cfg(not(feature = "metrics"))]
/// # fn main() {}
/// ```
#[cfg(feature = "metrics")]
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "idempotency_requests_total",
        Unit::Count,
        "Requests seen by the idempotency layer, by outcome"
    );
    describe_counter!(
        "idempotency_stores_total",
        Unit::Count,
        "Responses produced under an idempotency lock, by what became of them"
    );
    describe_counter!(
        "idempotency_waits_total",
        Unit::Count,
        "Waits of duplicates for a request in flight, by how they ended"
    );
    describe_histogram!(
        "idempotency_backend_duration_seconds",
        Unit::Seconds,
        "Duration of idempotency backend operations"
    );
    describe_counter!(
        "idempotency_backend_errors_total",
        Unit::Count,
        "Failed idempotency backend operations, by operation and error kind"
    );
}
