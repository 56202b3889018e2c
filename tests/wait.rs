//! `wait_for_in_flight` on the memory backend, on a paused clock: duplicates
//! wait for the request in flight and replay its response, a thousand
//! waiters poll the backend as one, the bound and a shutdown end the wait
//! with `409`, a released key is taken by a waiter, and a waiter dropped
//! while it polls hands its role on.

mod common;
mod counted;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Answer, Runs, post, send, slow_payment};
use counted::Counted;
use http::StatusCode;
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, MemoryBackend, StorageKey};

const WAIT: Duration = Duration::from_secs(5);

/// Sends `POST /p` with `key` and `body` through a clone of `svc` in a task
/// of its own: a request in flight.
fn in_flight<S, B>(
    svc: &S,
    key: &'static str,
    body: &'static str,
) -> tokio::task::JoinHandle<Answer>
where
    S: tower::Service<common::Req, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Send,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    let mut svc = svc.clone();
    tokio::spawn(async move { send(&mut svc, post("/p", Some(key), body)).await })
}

/// 20 duplicates of a 600 ms request, split over two layers (two instances:
/// each has its own waiting rooms and only sees the other's result by
/// polling), all get the same `201`; the handler runs once.
#[tokio::test(start_paused = true)]
async fn twenty_duplicates_over_two_instances_get_one_answer() {
    let runs = Runs::default();
    let backend = MemoryBackend::new();
    let handler = slow_payment(runs.clone(), Duration::from_millis(600));
    let instances = [
        IdempotencyLayer::new(backend.clone())
            .wait_for_in_flight(WAIT)
            .layer(handler.clone()),
        IdempotencyLayer::new(backend)
            .wait_for_in_flight(WAIT)
            .layer(handler),
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut svc = instances[i % 2].clone();
        tasks.spawn(async move { send(&mut svc, post("/p", Some("\"twenty\""), "{}")).await });
    }
    let answers: Vec<Answer> = tasks.join_all().await;
    assert_eq!(runs.get(), 1);
    for a in &answers {
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        assert_eq!(a.body, "payment 1");
    }
    assert_eq!(answers.iter().filter(|a| !a.replayed()).count(), 1);
}

/// A thousand duplicates waiting in one process poll the backend as one:
/// besides each request's own first `begin`, a handful of polls over the
/// handler's 600 ms, not a thousand per interval.
#[tokio::test(start_paused = true)]
async fn a_thousand_waiters_poll_as_one() {
    let runs = Runs::default();
    let backend = Counted::new(MemoryBackend::new()).with_round_trip(Duration::from_millis(2));
    let handler = slow_payment(runs.clone(), Duration::from_millis(600));
    let holder = IdempotencyLayer::new(backend.clone()).layer(handler.clone());
    let waiters = IdempotencyLayer::new(backend.clone())
        .wait_for_in_flight(WAIT)
        .layer(handler);
    let first = in_flight(&holder, "\"thousand\"", "{}");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let mut svc = waiters.clone();
        tasks.spawn(async move { send(&mut svc, post("/p", Some("\"thousand\""), "{}")).await });
    }
    let answers = tasks.join_all().await;
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
    assert!(
        answers
            .iter()
            .all(|a| a.status == StatusCode::CREATED && a.replayed())
    );
    let polls = backend.begins() - 1001;
    // 600 ms at 25 ms growing by half (±25 %): about ten.
    println!("{polls} polls for a thousand waiters");
    assert!((1..=16).contains(&polls), "{polls} polls");
}

/// At the bound the duplicate gets the `409` with `Retry-After`, after
/// waiting; the handler still runs once.
#[tokio::test(start_paused = true)]
async fn the_bound_ends_the_wait_with_409() {
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(MemoryBackend::new())
        .wait_for_in_flight(Duration::from_millis(300))
        .layer(slow_payment(runs.clone(), Duration::from_secs(3)));
    let first = in_flight(&svc, "\"bound\"", "{}");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let started = tokio::time::Instant::now();
    let answer = send(&mut svc.clone(), post("/p", Some("\"bound\""), "{}")).await;
    let waited = started.elapsed();
    assert_eq!(answer.status, StatusCode::CONFLICT);
    assert_eq!(answer.problem_type(), "request-in-flight");
    assert!(answer.headers.contains_key("retry-after"));
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(400),
        "{waited:?}"
    );
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
}

/// Without the setting a duplicate is answered at once.
#[tokio::test(start_paused = true)]
async fn without_the_setting_a_duplicate_is_answered_at_once() {
    let svc = IdempotencyLayer::new(MemoryBackend::new())
        .layer(slow_payment(Runs::default(), Duration::from_secs(3)));
    let _first = in_flight(&svc, "\"nowait\"", "{}");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let started = tokio::time::Instant::now();
    let answer = send(&mut svc.clone(), post("/p", Some("\"nowait\""), "{}")).await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

/// How a [`first_run_fails`] handler's first run ends.
#[derive(Clone, Copy)]
enum Failure {
    /// `500`: not stored, the key is released.
    ServerError,
    /// A panic: the lock is abandoned.
    Panic,
}

/// A handler whose first run fails as `failure` says and whose later runs
/// answer `201` with `run <n>`, each after `delay`.
fn first_run_fails(runs: Runs, delay: Duration, failure: Failure) -> impl common::Handler {
    tower::service_fn(move |_req: common::InnerReq| {
        let n = runs.bump();
        async move {
            tokio::time::sleep(delay).await;
            let status = match (n, failure) {
                (1, Failure::Panic) => panic!("the first run fails"),
                (1, Failure::ServerError) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::CREATED,
            };
            let mut res = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                format!("run {n}"),
            )));
            *res.status_mut() = status;
            Ok(res)
        }
    })
}

/// The request in flight ends without storing (a `5xx`, released): the
/// waiting duplicate takes the key and runs, promptly (the holder in this
/// process wakes it), and its own result is stored.
#[tokio::test(start_paused = true)]
async fn a_released_key_is_taken_by_a_waiter() {
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(MemoryBackend::new())
        .wait_for_in_flight(WAIT)
        .layer(first_run_fails(
            runs.clone(),
            Duration::from_millis(400),
            Failure::ServerError,
        ));
    let first = in_flight(&svc, "\"released\"", "{}");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let started = tokio::time::Instant::now();
    let waiter = send(&mut svc.clone(), post("/p", Some("\"released\""), "{}")).await;
    assert_eq!(
        first.await.unwrap().status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(waiter.status, StatusCode::CREATED);
    assert_eq!(waiter.body, "run 2");
    assert!(!waiter.replayed());
    // Woken by the release, not by a poll 500 ms later.
    assert!(
        started.elapsed() < Duration::from_millis(803),
        "{:?}",
        started.elapsed()
    );
    let again = send(&mut svc.clone(), post("/p", Some("\"released\""), "{}")).await;
    assert_eq!(
        (again.status, again.replayed()),
        (StatusCode::CREATED, true)
    );
    assert_eq!(runs.get(), 2);
}

/// A duplicate with another body waits too, and is then told the key was
/// used for another request (`422`), never given the other's response.
#[tokio::test(start_paused = true)]
async fn a_waiter_with_another_request_gets_422() {
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(MemoryBackend::new())
        .wait_for_in_flight(WAIT)
        .layer(slow_payment(runs.clone(), Duration::from_millis(300)));
    let first = {
        let mut svc = svc.clone();
        tokio::spawn(
            async move { send(&mut svc, post("/p", Some("\"other\""), "{\"a\":1}")).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    let same = {
        let mut svc = svc.clone();
        tokio::spawn(
            async move { send(&mut svc, post("/p", Some("\"other\""), "{\"a\":1}")).await },
        )
    };
    let other = send(&mut svc.clone(), post("/p", Some("\"other\""), "{\"a\":2}")).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let same = same.await.unwrap();
    assert_eq!((same.status, same.replayed()), (StatusCode::CREATED, true));
    assert_eq!(runs.get(), 1);
}

/// A shutdown ends every wait at once with the `409`.
#[tokio::test(start_paused = true)]
async fn a_shutdown_ends_the_waits() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryBackend::new()).wait_for_in_flight(WAIT);
    let shutdown = layer.shutdown_handle();
    let svc = layer.layer(slow_payment(runs.clone(), Duration::from_secs(2)));
    let first = in_flight(&svc, "\"stop\"", "{}");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let waiter = in_flight(&svc, "\"stop\"", "{}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(async move { shutdown.shutdown(Duration::from_secs(10)).await });
    let started = tokio::time::Instant::now();
    let waiter = waiter.await.unwrap();
    assert_eq!(waiter.status, StatusCode::CONFLICT);
    assert!(
        started.elapsed() < Duration::from_millis(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert!(stopping.await.unwrap().is_clean());
    assert_eq!(runs.get(), 1);
}

/// The waiter that polls is dropped (its client left) while others wait:
/// another takes the role over, and they still get the response. The
/// holder runs on another instance, so only polls can find it.
#[tokio::test(start_paused = true)]
async fn a_dropped_poller_hands_its_role_on() {
    let runs = Runs::default();
    let backend = Counted::new(MemoryBackend::new());
    let handler = slow_payment(runs.clone(), Duration::from_millis(800));
    let holder = IdempotencyLayer::new(backend.clone()).layer(handler.clone());
    let waiters = IdempotencyLayer::new(backend.clone())
        .wait_for_in_flight(WAIT)
        .layer(handler);
    let first = in_flight(&holder, "\"handover\"", "{}");
    tokio::time::sleep(Duration::from_millis(1)).await;
    // The first waiter takes the poller's role; a second waits behind it.
    let poller = in_flight(&waiters, "\"handover\"", "{}");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let behind = in_flight(&waiters, "\"handover\"", "{}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let polls_before = backend.begins();
    poller.abort();
    assert!(poller.await.is_err_and(|e| e.is_cancelled()));
    let behind = behind.await.unwrap();
    assert_eq!(
        (behind.status, behind.replayed()),
        (StatusCode::CREATED, true)
    );
    assert!(backend.begins() > polls_before, "someone kept polling");
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
}

/// Polls that fail (the backend went away while the duplicate waited) never
/// run the handler, not even with fail-open: the key was busy a moment ago.
/// The wait backs off through the outage and replays once the backend
/// answers again.
#[tokio::test(start_paused = true)]
async fn failed_polls_never_run_the_handler() {
    let runs = Runs::default();
    let memory = MemoryBackend::new();
    let handler = slow_payment(runs.clone(), Duration::from_millis(600));
    let holder = IdempotencyLayer::new(memory.clone()).layer(handler.clone());
    let flaky = common::Flaky {
        inner: memory,
        ..common::Flaky::default()
    };
    let fail_begin = Arc::clone(&flaky.fail_begin);
    let waiters = IdempotencyLayer::new(flaky)
        .wait_for_in_flight(WAIT)
        .fail_open()
        .layer(handler);
    let first = in_flight(&holder, "\"outage\"", "{}");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let waiting = in_flight(&waiters, "\"outage\"", "{}");
    tokio::time::sleep(Duration::from_millis(10)).await;
    fail_begin.store(true, Ordering::SeqCst);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(runs.get(), 1, "a failed poll ran the handler");
    fail_begin.store(false, Ordering::SeqCst);
    let waited = waiting.await.unwrap();
    assert_eq!(
        (waited.status, waited.replayed()),
        (StatusCode::CREATED, true)
    );
    assert_eq!(runs.get(), 1);
}

/// Rooms close with their last waiter, on a multi-threaded runtime where a
/// local holder wakes many at once: a room left behind would keep the
/// stored response and hand it to a later wait on the same key (here after
/// `forget`, when the key runs again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_close_with_their_last_waiter() {
    let runs = Runs::default();
    let backend = MemoryBackend::new();
    let svc = IdempotencyLayer::new(backend.clone())
        .wait_for_in_flight(WAIT)
        .layer(slow_payment(runs.clone(), Duration::from_millis(300)));
    for round in 1..=3 {
        let first = in_flight(&svc, "\"rooms\"", "{}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let mut svc = svc.clone();
            tasks.spawn(async move { send(&mut svc, post("/p", Some("\"rooms\""), "{}")).await });
        }
        let expected = format!("payment {round}");
        assert_eq!(first.await.unwrap().body, expected);
        for a in tasks.join_all().await {
            assert_eq!(a.body, expected, "round {round}: a stale replay");
        }
        let scope = tower_idempotency::ScopeValue::anonymous();
        let key =
            tower_idempotency::IdempotencyKey::parse(&http::HeaderValue::from_static("\"rooms\""))
                .unwrap();
        assert!(backend.forget(&StorageKey::derive(&scope, &key)));
    }
    assert_eq!(runs.get(), 3);
}

/// The request in flight panics (its lock is abandoned, released in the
/// background): the waiting duplicate is woken and takes the key within a
/// few short polls, not at a poll up to 500 ms later.
#[tokio::test(start_paused = true)]
async fn an_abandoned_key_is_taken_by_a_waiter_promptly() {
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(MemoryBackend::new())
        .wait_for_in_flight(WAIT)
        .layer(first_run_fails(
            runs.clone(),
            Duration::from_millis(1500),
            Failure::Panic,
        ));
    let first = in_flight(&svc, "\"abandoned\"", "{}");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let started = tokio::time::Instant::now();
    let waiter = send(&mut svc.clone(), post("/p", Some("\"abandoned\""), "{}")).await;
    let _ = first.await;
    assert_eq!(waiter.status, StatusCode::CREATED);
    assert_eq!(waiter.body, "run 2");
    // 1.5 s for the first run, then the second run's 1.5 s: the key was
    // taken within 100 ms of the panic.
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(3100), "{elapsed:?}");
}
