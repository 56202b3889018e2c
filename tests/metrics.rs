//! The `metrics` feature: every decision is counted under its outcome, and
//! backend operations are timed, read back from a recorder local to each
//! test.

mod common;

use std::sync::atomic::Ordering;

use common::{Flaky, Runs, counting, gated, post, send};
use http::StatusCode;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryBackend};

/// A recorder for this test's thread only (tests run in parallel), and the
/// handle that reads it.
fn local_recorder() -> (Snapshotter, metrics::LocalRecorderGuard<'static>) {
    // Leaked: the guard must borrow it for the rest of the test.
    let recorder: &'static DebuggingRecorder = Box::leak(Box::new(DebuggingRecorder::new()));
    (
        recorder.snapshotter(),
        metrics::set_default_local_recorder(recorder),
    )
}

/// What was recorded since the last take (taking drains the recorder).
struct Recorded(Vec<(metrics_util::CompositeKey, DebugValue)>);

impl Recorded {
    fn take(snapshotter: &Snapshotter) -> Self {
        Self(
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(key, _, _, value)| (key, value))
                .collect(),
        )
    }

    fn find(&self, name: &str, label: (&str, &str)) -> Option<&DebugValue> {
        self.0.iter().find_map(|(key, value)| {
            let key = key.key();
            let labelled = key
                .labels()
                .any(|l| l.key() == label.0 && l.value() == label.1);
            (key.name() == name && labelled).then_some(value)
        })
    }

    /// The value of counter `name` labelled `label` (0 if never counted).
    fn counter(&self, name: &str, label: (&str, &str)) -> u64 {
        match self.find(name, label) {
            Some(DebugValue::Counter(n)) => *n,
            _ => 0,
        }
    }

    fn outcome(&self, outcome: &str) -> u64 {
        self.counter("idempotency_requests_total", ("outcome", outcome))
    }

    fn stores(&self, result: &str) -> u64 {
        self.counter("idempotency_stores_total", ("result", result))
    }

    /// How many durations were recorded for backend `operation`.
    fn timings(&self, operation: &str) -> usize {
        match self.find(
            "idempotency_backend_duration_seconds",
            ("operation", operation),
        ) {
            Some(DebugValue::Histogram(values)) => values.len(),
            _ => 0,
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn each_decision_is_counted_under_its_outcome() {
    let (snapshotter, _local) = local_recorder();
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(MemoryBackend::new())
        .max_request_body(16)
        .layer(counting(runs.clone()));

    send(&mut svc, post("/p", Some("\"a\""), "x")).await;
    send(&mut svc, post("/p", Some("\"a\""), "x")).await;
    send(&mut svc, post("/p", Some("\"a\""), "x")).await;
    send(&mut svc, post("/p", Some("\"a\""), "other")).await;
    send(&mut svc, post("/p", Some("\"unterminated"), "x")).await;
    send(&mut svc, post("/p", None, "x")).await;
    let too_large = send(&mut svc, post("/p", Some("\"b\""), &"y".repeat(17))).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);

    let seen = Recorded::take(&snapshotter);
    assert_eq!(seen.outcome("fresh"), 1);
    assert_eq!(seen.outcome("replayed"), 2);
    assert_eq!(seen.outcome("mismatch"), 1);
    assert_eq!(seen.outcome("invalid_key"), 1);
    assert_eq!(seen.outcome("no_key"), 1);
    assert_eq!(seen.outcome("body_too_large"), 1);
    assert_eq!(seen.stores("stored"), 1);
    // Four requests reached the backend; one stored its response.
    assert_eq!(seen.timings("begin"), 4);
    assert_eq!(seen.timings("complete"), 1);
    assert_eq!(runs.get(), 2, "the fresh request and the one without a key");
}

/// A response too large to keep leaves a marker, counted as `not_kept`.
#[tokio::test(flavor = "current_thread")]
async fn a_marker_is_counted_as_not_kept() {
    let (snapshotter, _local) = local_recorder();
    let mut svc = IdempotencyLayer::new(MemoryBackend::new())
        .max_stored_response(4)
        .layer(counting(Runs::default()));
    send(&mut svc, post("/p", Some("\"m\""), "x")).await;
    let seen = Recorded::take(&snapshotter);
    assert_eq!(seen.stores("not_kept"), 1);
    assert_eq!(seen.stores("stored"), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_duplicate_in_flight_is_counted_as_a_conflict() {
    let (snapshotter, _local) = local_recorder();
    let runs = Runs::default();
    let (handler, gate) = gated(runs.clone());
    let svc = IdempotencyLayer::new(MemoryBackend::new()).layer(handler);

    let mut first_svc = svc.clone();
    let first = async move {
        first_svc
            .ready()
            .await
            .unwrap()
            .call(post("/p", Some("\"c\""), "x"))
            .await
            .unwrap()
            .status()
    };
    let second = async {
        gate.started.await.unwrap();
        let status = svc
            .clone()
            .ready()
            .await
            .unwrap()
            .call(post("/p", Some("\"c\""), "x"))
            .await
            .unwrap()
            .status();
        gate.finish.send(()).unwrap();
        status
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first, StatusCode::OK);
    assert_eq!(second, StatusCode::CONFLICT);
    let seen = Recorded::take(&snapshotter);
    assert_eq!(seen.outcome("conflict"), 1);
    assert_eq!(seen.outcome("fresh"), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn handler_errors_and_backend_failures_are_counted() {
    let (snapshotter, _local) = local_recorder();
    let runs = Runs::default();
    let backend = Flaky::default();
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(counting(runs.clone()));

    backend.fail_begin.store(true, Ordering::SeqCst);
    let answer = send(&mut svc, post("/p", Some("\"d\""), "x")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let seen = Recorded::take(&snapshotter);
    assert_eq!(seen.outcome("backend_unavailable"), 1);
    assert_eq!(
        seen.counter("idempotency_backend_errors_total", ("kind", "unavailable")),
        1
    );

    backend.fail_begin.store(false, Ordering::SeqCst);
    backend.fail_complete.store(true, Ordering::SeqCst);
    send(&mut svc, post("/p", Some("\"e\""), "x")).await;
    let seen = Recorded::take(&snapshotter);
    assert_eq!(seen.stores("failed"), 1);

    let mut open = IdempotencyLayer::new(backend.clone())
        .fail_open()
        .layer(counting(runs.clone()));
    backend.fail_begin.store(true, Ordering::SeqCst);
    send(&mut open, post("/p", Some("\"f\""), "x")).await;
    let seen = Recorded::take(&snapshotter);
    assert_eq!(seen.outcome("fail_open"), 1);
    assert_eq!(runs.get(), 2);

    // A handler error: the request was fresh, its response not stored, and
    // the key released.
    let mut failing = IdempotencyLayer::new(MemoryBackend::new()).layer(tower::service_fn(
        |_req: common::InnerReq| async {
            Err::<http::Response<http_body_util::Full<bytes::Bytes>>, _>("handler failed")
        },
    ));
    let error = failing
        .ready()
        .await
        .unwrap()
        .call(post("/p", Some("\"h\""), "x"))
        .await
        .unwrap_err();
    assert_eq!(error, "handler failed");
    let seen = Recorded::take(&snapshotter);
    assert_eq!(seen.outcome("fresh"), 1);
    assert_eq!(seen.stores("not_stored"), 1, "a handler error is counted");
    assert_eq!(seen.timings("release"), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn unstored_responses_are_counted() {
    let (snapshotter, _local) = local_recorder();
    let mut svc = IdempotencyLayer::new(MemoryBackend::new()).layer(tower::service_fn(
        |_req: common::InnerReq| async {
            let res = http::Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            Ok::<_, std::convert::Infallible>(res)
        },
    ));
    send(&mut svc, post("/p", Some("\"g\""), "x")).await;
    send(&mut svc, post("/p", Some("\"g\""), "x")).await;
    let seen = Recorded::take(&snapshotter);
    assert_eq!(
        seen.stores("not_stored"),
        2,
        "a 5xx is not stored, so the retry runs again"
    );
    assert_eq!(seen.outcome("fresh"), 2);
    assert_eq!(seen.timings("release"), 2);
}

/// The `metrics` example end to end: the extractor's 400, a replay, a
/// `Persist::For` decline, and the Prometheus page counting each outcome.
#[tokio::test]
async fn the_metrics_example_exports_the_counters() {
    let (mut child, addr) = common::spawn_example("metrics", &[]).await;
    let json = ("content-type", "application/json");
    let pay = async |key: Option<&str>, body: &str| {
        let mut headers = vec![json];
        if let Some(key) = key {
            headers.push(("idempotency-key", key));
        }
        common::request(addr, "POST", "/payments", &headers, body).await
    };
    let small = r#"{"amount":5,"currency":"EUR"}"#;
    let first = pay(Some("\"m1\""), small).await;
    let retry = pay(Some("\"m1\""), small).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(first.body, retry.body, "the retry gets the same payment");
    assert!(
        String::from_utf8_lossy(&first.body).contains("\"provider_key\":\"shop-m1\""),
        "the handler read the key through the extractor"
    );
    let declined = pay(Some("\"m2\""), r#"{"amount":5000,"currency":"EUR"}"#).await;
    assert_eq!(declined.status, StatusCode::PAYMENT_REQUIRED);
    assert!(
        pay(Some("\"m2\""), r#"{"amount":5000,"currency":"EUR"}"#)
            .await
            .replayed()
    );
    let keyless = pay(None, small).await;
    assert_eq!(keyless.status, StatusCode::BAD_REQUEST);
    assert_eq!(keyless.problem_type(), "missing-key");

    let page = common::request(addr, "GET", "/metrics", &[], "").await;
    let page = String::from_utf8_lossy(&page.body).into_owned();
    for line in [
        "idempotency_requests_total{outcome=\"fresh\"} 2",
        "idempotency_requests_total{outcome=\"replayed\"} 2",
        "idempotency_requests_total{outcome=\"no_key\"} 1",
        "idempotency_stores_total{result=\"stored\"} 2",
        "# HELP idempotency_backend_duration_seconds",
        "idempotency_backend_duration_seconds_count{operation=\"begin\"} 4",
    ] {
        assert!(page.contains(line), "{line:?} missing from:\n{page}");
    }
    child.kill().await.unwrap();
}
