//! Many requests, one key: the handler runs once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Answer, Runs, counting, post, send};
use http::{Response, StatusCode};
use http_body_util::Full;
use tokio::sync::Notify;
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, MemoryBackend};

const N: usize = 100;

/// The handler holds the first request until every other request has been
/// answered, so all 99 duplicates truly overlap it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_overlapping_duplicates_run_once() {
    let runs = Runs::default();
    let answered = Arc::new(AtomicUsize::new(0));
    let notify = Arc::new(Notify::new());
    let handler = {
        let (runs, answered, notify) = (runs.clone(), answered.clone(), notify.clone());
        tower::service_fn(move |_req: common::InnerReq| {
            let (runs, answered, notify) = (runs.clone(), answered.clone(), notify.clone());
            async move {
                let n = runs.bump();
                // Bounded: if a second run slipped through, the test fails
                // on the count below instead of hanging.
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        // Registered before the check, so a notification
                        // between the check and the wait is not lost.
                        let notified = notify.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        if answered.load(Ordering::SeqCst) >= N - 1 {
                            break;
                        }
                        notified.await;
                    }
                })
                .await;
                let res = Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Full::new(Bytes::from(format!("payment {n}"))))
                    .unwrap();
                Ok::<_, std::convert::Infallible>(res)
            }
        })
    };
    let backend = MemoryBackend::new();
    let svc = IdempotencyLayer::new(backend.clone()).layer(handler);

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..N {
        let mut svc = svc.clone();
        let (answered, notify) = (answered.clone(), notify.clone());
        tasks.spawn(async move {
            let answer = send(
                &mut svc,
                post("/payments", Some("\"hot\""), r#"{"amount":5}"#),
            )
            .await;
            answered.fetch_add(1, Ordering::SeqCst);
            notify.notify_waiters();
            answer
        });
    }
    let answers: Vec<Answer> = tasks.join_all().await;
    assert_eq!(runs.get(), 1, "the handler must run exactly once");
    let created: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .collect();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].body, "payment 1");
    for conflict in answers.iter().filter(|a| a.status != StatusCode::CREATED) {
        assert_eq!(conflict.status, StatusCode::CONFLICT);
        assert_eq!(conflict.problem_type(), "request-in-flight");
        assert!(conflict.headers.contains_key("retry-after"));
    }
    let mut svc = svc.clone();
    let retry = send(
        &mut svc,
        post("/payments", Some("\"hot\""), r#"{"amount":5}"#),
    )
    .await;
    assert!(retry.replayed());
    assert_eq!(retry.body, "payment 1");
    assert_eq!(backend.in_flight_count(), 0);
}

/// Without a gate, duplicates land before, during and after the first run:
/// each one is the original, a replay of it, or a 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_racing_duplicates_run_once() {
    let mut conflicts = 0;
    for round in 0..5 {
        let runs = Runs::default();
        // A handler that takes a moment, so that duplicates do overlap it.
        let svc = IdempotencyLayer::new(MemoryBackend::new())
            .layer(common::slow_payment(runs.clone(), Duration::from_millis(5)));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..N {
            let mut svc = svc.clone();
            tasks.spawn(async move { send(&mut svc, post("/p", Some("race"), "same body")).await });
        }
        let answers = tasks.join_all().await;
        assert_eq!(runs.get(), 1, "round {round}");
        let originals = answers
            .iter()
            .filter(|a| a.status == StatusCode::CREATED && !a.replayed())
            .count();
        assert_eq!(originals, 1);
        let original = answers
            .iter()
            .find(|a| a.status == StatusCode::CREATED && !a.replayed())
            .unwrap();
        for a in &answers {
            match a.status {
                StatusCode::CREATED => assert_eq!(a.body, original.body),
                StatusCode::CONFLICT => {
                    conflicts += 1;
                    assert_eq!(a.problem_type(), "request-in-flight");
                }
                other => panic!("unexpected status {other}"),
            }
        }
    }
    assert!(conflicts > 0, "no duplicate overlapped the first run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_keys_each_run() {
    let runs = Runs::default();
    let backend = MemoryBackend::new();
    let svc = IdempotencyLayer::new(backend.clone()).layer(counting(runs.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut svc = svc.clone();
        tasks
            .spawn(async move { send(&mut svc, post("/p", Some(&format!("key-{i}")), "x")).await });
    }
    for a in tasks.join_all().await {
        assert_eq!(a.status, StatusCode::CREATED);
        assert!(!a.replayed());
    }
    assert_eq!(runs.get(), N);
    assert_eq!(backend.stored_count(), N as u64);
}

/// Polls a future that is ready at once (the memory backend never waits).
fn now<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("the memory backend never waits"),
    }
}

/// A `begin` that looks up just before a `complete` stores, and takes the
/// key just after it unlocks, must still see the record: the window the
/// lookup-then-lock sequence has to close. A thread spins `begin` while the
/// holder completes, over many rounds.
#[test]
fn begin_racing_complete_never_acquires_a_completed_key() {
    use std::sync::atomic::AtomicBool;
    use tower_idempotency::{Backend, Begin, Fingerprint, Record, StorageKey};

    let backend = MemoryBackend::new();
    let fp = Fingerprint::from_bytes([1; 32]);
    let lock_ttl = Duration::from_mins(1);
    for round in 0u32..3000 {
        let mut raw = [0u8; 32];
        raw[..4].copy_from_slice(&round.to_le_bytes());
        raw[31] = raw[0];
        let key = StorageKey::from_bytes(raw);
        let Begin::Acquired(lock) = now(backend.begin(&key, &fp, lock_ttl)).unwrap() else {
            panic!("fresh key");
        };
        let spinning = Arc::new(AtomicBool::new(false));
        let spinner = {
            let (backend, spinning) = (backend.clone(), spinning.clone());
            std::thread::spawn(move || {
                loop {
                    spinning.store(true, Ordering::Release);
                    match now(backend.begin(&key, &fp, lock_ttl)).unwrap() {
                        Begin::Busy { .. } => {}
                        Begin::Completed(_) => return true,
                        Begin::Acquired(_) => return false,
                    }
                }
            })
        };
        while !spinning.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        let record = Record::new(StatusCode::OK, http::HeaderMap::new(), Bytes::new(), fp);
        now(backend.complete(lock, record, Duration::from_mins(1))).unwrap();
        assert!(
            spinner.join().unwrap(),
            "round {round}: begin acquired a key whose record was just stored"
        );
    }
}
