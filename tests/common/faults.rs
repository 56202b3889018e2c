//! One fault suite for every backend: many instances on one key, retries
//! and cancellations at random, a backend that goes silent, resets or dies,
//! and one lost between the handler and the save. Each scenario asserts
//! what every client got and how often the handler ran, and returns its
//! counts.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_idempotency::{Backend, IdempotencyBody, IdempotencyLayer};

use super::fault_proxy::{Fault, FaultProxy};

/// What a scenario saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub requests: usize,
    pub handler_runs: usize,
    /// Keys whose side effect happened more than once (must be 0).
    pub duplicates: usize,
    /// Requests whose future panicked (must be 0).
    pub panics: usize,
}

/// Prints a scenario's counts under `name`.
pub fn report(name: &str, counts: Counts) {
    println!(
        "{name}: {} requests, {} handler runs, {} keys run more than once, {} panics",
        counts.requests, counts.handler_runs, counts.duplicates, counts.panics
    );
}

/// A key prefix no other test or run uses.
pub fn tag(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// The side effects, per key: each run appends the body it answered.
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<HashMap<String, Vec<Bytes>>>>);

impl Ledger {
    fn runs(&self) -> usize {
        self.0.lock().unwrap().values().map(Vec::len).sum()
    }
    fn duplicates(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .values()
            .filter(|v| v.len() > 1)
            .count()
    }
    fn answers(&self, key: &str) -> Vec<Bytes> {
        self.0.lock().unwrap().get(key).cloned().unwrap_or_default()
    }
}

type Req = Request<Full<Bytes>>;

/// A handler that records a side effect under the request's key and
/// answers `201 <key>#<n>` after `delay`.
fn ledger_handler(
    ledger: Ledger,
    delay: Duration,
) -> impl tower::Service<
    Request<IdempotencyBody<Full<Bytes>>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<IdempotencyBody<Full<Bytes>>>| {
        let ledger = ledger.clone();
        async move {
            let key = req
                .headers()
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            tokio::time::sleep(delay).await;
            let body = {
                let mut all = ledger.0.lock().unwrap();
                let runs = all.entry(key.clone()).or_default();
                let body = Bytes::from(format!("{key}#{}", runs.len() + 1));
                runs.push(body.clone());
                body
            };
            let mut res = Response::new(Full::new(body));
            *res.status_mut() = StatusCode::CREATED;
            Ok(res)
        }
    })
}

fn keyed(key: &str) -> Req {
    Request::post("/payments")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

/// A small deterministic generator (no `rand` needed).
struct Lcg(u64);

impl Lcg {
    fn index(&mut self, below: usize) -> usize {
        usize::try_from(self.next(below as u64)).unwrap()
    }

    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// 200 concurrent requests with one key, spread over three service
/// instances (each its own backend handle on the same store): the handler
/// runs once; every other request gets `409` or the same response replayed.
pub async fn same_key_across_instances<B: Backend>(instances: [B; 3], key: &str) -> Counts {
    let ledger = Ledger::default();
    let services: Vec<_> = instances
        .into_iter()
        .map(|b| {
            IdempotencyLayer::new(b)
                .layer(ledger_handler(ledger.clone(), Duration::from_millis(200)))
        })
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let svc = services[i % 3].clone();
        let key = key.to_owned();
        tasks.spawn(async move {
            let res = svc.oneshot(keyed(&key)).await.unwrap();
            let status = res.status();
            let replayed = res.headers().contains_key("idempotent-replayed");
            (
                status,
                replayed,
                res.into_body().collect().await.unwrap().to_bytes(),
            )
        });
    }
    let mut counts = Counts {
        requests: 200,
        ..Counts::default()
    };
    let (mut fresh, mut conflicts, mut replays) = (0, 0, 0);
    while let Some(joined) = tasks.join_next().await {
        let Ok((status, replayed, body)) = joined else {
            counts.panics += 1;
            continue;
        };
        match status {
            StatusCode::CREATED if replayed => {
                replays += 1;
                assert_eq!(
                    body,
                    ledger.answers(key)[0],
                    "a replay differs from the answer"
                );
            }
            StatusCode::CREATED => fresh += 1,
            StatusCode::CONFLICT => conflicts += 1,
            other => panic!("unexpected {other}: {body:?}"),
        }
    }
    counts.handler_runs = ledger.runs();
    counts.duplicates = ledger.duplicates();
    assert_eq!(counts.handler_runs, 1, "{counts:?}");
    assert_eq!(fresh, 1);
    assert_eq!(fresh + conflicts + replays, 200);
    assert!(conflicts > 0, "the requests did not overlap");
    assert_eq!(counts.panics, 0);
    counts
}

/// 1 000 requests over 50 keys, 40 at a time, with retries and clients that
/// give up at random moments: each key's side effect happens exactly once
/// (a final retry per key settles it), and every replay is byte for byte the
/// answer the handler gave.
pub async fn retries_and_cancellations<B: Backend>(backend: B, tag: &str) -> Counts {
    let ledger = Ledger::default();
    let svc = IdempotencyLayer::new(backend)
        .layer(ledger_handler(ledger.clone(), Duration::from_millis(3)));
    let keys: Vec<String> = (0..50).map(|k| format!("{tag}-{k}")).collect();
    let mut rng = Lcg(0x5eed);
    let mut counts = Counts {
        requests: 1_000,
        ..Counts::default()
    };
    for _batch in 0..25 {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..40 {
            let key = keys[rng.index(50)].clone();
            // One client in five gives up after 0–9 ms.
            let give_up = (rng.next(5) == 0).then(|| Duration::from_millis(rng.next(10)));
            let svc = svc.clone();
            tasks.spawn(async move {
                let call = svc.oneshot(keyed(&key));
                let res = match give_up {
                    Some(after) => match tokio::time::timeout(after, call).await {
                        Ok(res) => res.unwrap(),
                        Err(_) => return None,
                    },
                    None => call.await.unwrap(),
                };
                let status = res.status();
                let replayed = res.headers().contains_key("idempotent-replayed");
                let body = res.into_body().collect().await.unwrap().to_bytes();
                Some((key, status, replayed, body))
            });
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Err(_) => counts.panics += 1,
                Ok(None) => {}
                Ok(Some((key, status, replayed, body))) => match status {
                    StatusCode::CREATED => {
                        let answers = ledger.answers(&key);
                        assert_eq!(answers.len(), 1, "{key} ran {} times", answers.len());
                        if replayed {
                            assert_eq!(body, answers[0], "{key}: replay differs");
                        }
                    }
                    StatusCode::CONFLICT => {}
                    other => panic!("{key}: unexpected {other}"),
                },
            }
        }
    }
    // Settle every key: its final retry replays, or runs it the one time.
    for key in &keys {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let res = svc.clone().oneshot(keyed(key)).await.unwrap();
            if res.status() != StatusCode::CONFLICT {
                assert_eq!(res.status(), StatusCode::CREATED);
                let body = res.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(ledger.answers(key), vec![body], "{key}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{key} stuck in flight"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    counts.handler_runs = ledger.runs();
    counts.duplicates = ledger.duplicates();
    assert_eq!(counts.handler_runs, 50, "{counts:?}");
    assert_eq!(counts.duplicates, 0);
    assert_eq!(counts.panics, 0);
    counts
}

/// The backend's server goes silent, then is reset and refused, then slow:
/// each keyed request is answered `503` within `bound` (slow ones succeed),
/// the service recovers without a restart, and no key is stuck afterwards.
pub async fn outages<B: Backend>(
    backend: B,
    proxy: &FaultProxy,
    bound: Duration,
    tag: &str,
) -> Counts {
    let ledger = Ledger::default();
    let svc = IdempotencyLayer::new(backend).layer(ledger_handler(ledger.clone(), Duration::ZERO));
    let mut counts = Counts::default();
    // Warm up: a connection to reset.
    assert_eq!(
        svc.clone()
            .oneshot(keyed(&format!("{tag}-warm")))
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    counts.requests += 1;
    for (i, fault) in [Fault::Blackhole, Fault::Down].into_iter().enumerate() {
        proxy.set(fault);
        let key = format!("{tag}-outage-{i}");
        for _ in 0..3 {
            let started = tokio::time::Instant::now();
            let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
            counts.requests += 1;
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{fault:?}");
            assert!(
                started.elapsed() < bound,
                "{fault:?}: answered after {:?}",
                started.elapsed()
            );
        }
        proxy.set(Fault::None);
        // Recovery without a restart; the key is not stuck.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let answer = loop {
            let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
            counts.requests += 1;
            if res.status() == StatusCode::CREATED {
                break res;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no recovery after {fault:?}: {}",
                res.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!answer.headers().contains_key("idempotent-replayed"));
        let retry = svc.clone().oneshot(keyed(&key)).await.unwrap();
        counts.requests += 1;
        assert!(
            retry.headers().contains_key("idempotent-replayed"),
            "after {fault:?}"
        );
    }
    proxy.set(Fault::Latency(Duration::from_millis(20)));
    let res = svc
        .clone()
        .oneshot(keyed(&format!("{tag}-slow")))
        .await
        .unwrap();
    counts.requests += 1;
    assert_eq!(
        res.status(),
        StatusCode::CREATED,
        "a slow backend still serves"
    );
    proxy.set(Fault::None);
    counts.handler_runs = ledger.runs();
    counts.duplicates = ledger.duplicates();
    assert_eq!(
        counts.handler_runs, 4,
        "warm-up, two recoveries, the slow one"
    );
    assert_eq!(counts.duplicates, 0);
    counts
}

/// The backend is lost while the handler runs, so the save fails: the
/// client still gets its response. The backend comes back within the lock
/// TTL. With `made_up` (Redis, PostgreSQL lease mode) the save is made up in
/// the background, fenced by the lock's token: the retry replays the first
/// answer and the handler ran once. Without (PostgreSQL advisory mode, whose
/// lock died with its session: nothing proves that nobody took the key
/// over) nothing is stored and — as documented, "at least once, beyond
/// that" — the retry runs the handler again.
pub async fn lost_between_handler_and_save<B: Backend>(
    backend: B,
    proxy: &FaultProxy,
    tag: &str,
    made_up: bool,
) -> Counts {
    let ledger = Ledger::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let inner = ledger_handler(ledger.clone(), Duration::ZERO);
        let gate = gate.clone();
        tower::service_fn(move |req: Request<IdempotencyBody<Full<Bytes>>>| {
            let inner = inner.clone();
            let gate = gate.clone();
            async move {
                gate.notified().await;
                inner.oneshot(req).await
            }
        })
    };
    let svc = IdempotencyLayer::new(backend)
        .lock_ttl(Duration::from_secs(2))
        .layer(handler);
    let key = format!("{tag}-lost");
    let first = tokio::spawn(svc.clone().oneshot(keyed(&key)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.set(Fault::Down);
    gate.notify_one();
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        first.status(),
        StatusCode::CREATED,
        "the client still gets its response"
    );
    let body = first.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, ledger.answers(&key)[0]);
    proxy.set(Fault::None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut requests = 1;
    let retry = loop {
        let pending = tokio::spawn(svc.clone().oneshot(keyed(&key)));
        gate.notify_one();
        let res = pending.await.unwrap().unwrap();
        requests += 1;
        if res.status() == StatusCode::CREATED {
            break res;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key stayed locked: {}",
            res.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        retry.headers().contains_key("idempotent-replayed"),
        made_up,
        "the save was made up once the backend was back: {made_up}"
    );
    if made_up {
        let replayed = retry.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(replayed, body, "the first answer");
    }
    let counts = Counts {
        requests,
        handler_runs: ledger.runs(),
        duplicates: ledger.duplicates(),
        panics: 0,
    };
    assert_eq!(
        counts.handler_runs,
        if made_up { 1 } else { 2 },
        "made up: the handler ran once; otherwise the retry runs again"
    );
    counts
}
