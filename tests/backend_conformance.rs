//! The conformance suite against the in-memory backend, on a paused clock.

mod conformance;

use tower_idempotency::MemoryBackend;

backend_conformance!(#[tokio::test(start_paused = true)], MemoryBackend::new(), Lapse);

/// At capacity (with no minimum retention) the oldest records go, never the
/// one just stored: a retry is most likely for the newest requests.
#[tokio::test(start_paused = true)]
async fn memory_backend_keeps_the_newest_records_at_capacity() {
    use std::time::Duration;
    use tower_idempotency::{Backend, Begin, Completion};

    let backend = MemoryBackend::builder()
        .max_entries(200)
        .min_retention(std::time::Duration::ZERO)
        .build();
    let keys: Vec<_> = (0..2000).map(|_| conformance::fresh_key()).collect();
    let fp = conformance::fingerprint(1);
    for key in &keys {
        let Begin::Acquired(lock) = backend
            .begin(key, &fp, Duration::from_secs(30))
            .await
            .unwrap()
        else {
            panic!("fresh key");
        };
        let saved = backend
            .complete(
                lock,
                conformance::record(fp, b"{}"),
                Duration::from_hours(1),
            )
            .await
            .unwrap();
        assert_eq!(saved, Completion::Saved);
    }
    assert!(
        backend.stored_count() <= 200,
        "bounded: {}",
        backend.stored_count()
    );
    for (i, key) in keys.iter().rev().take(100).enumerate() {
        match backend
            .begin(key, &fp, Duration::from_secs(30))
            .await
            .unwrap()
        {
            Begin::Completed(_) => {}
            _ => panic!("record #{i} from the end was dropped at capacity"),
        }
    }
}

/// Stores a record under a fresh lock on `key`.
async fn store(
    backend: &MemoryBackend,
    key: &tower_idempotency::StorageKey,
    body: &[u8],
    ttl: std::time::Duration,
) -> Result<tower_idempotency::Completion, tower_idempotency::BackendError> {
    use std::time::Duration;
    use tower_idempotency::{Backend, Begin};

    let fp = conformance::fingerprint(1);
    let Begin::Acquired(lock) = backend.begin(key, &fp, Duration::from_secs(30)).await? else {
        panic!("the key should be free");
    };
    backend
        .complete(lock, conformance::record(fp, body), ttl)
        .await
}

/// A large bound is spread over shards: it is never exceeded, and the
/// newest records (thousands of them) all survive the eviction.
#[tokio::test(start_paused = true)]
async fn memory_backend_sharded_bound_keeps_recent_records() {
    use std::time::Duration;
    use tower_idempotency::{Backend, Begin};

    let backend = MemoryBackend::builder()
        .max_entries(20_000)
        .min_retention(Duration::ZERO)
        .build();
    let keys: Vec<_> = (0..50_000).map(|_| conformance::fresh_key()).collect();
    for key in &keys {
        store(&backend, key, b"{}", Duration::from_hours(1))
            .await
            .unwrap();
    }
    let stored = backend.stored_count();
    assert!(stored <= 20_000, "bound exceeded: {stored}");
    assert!(stored >= 19_000, "evicted far too early: {stored}");
    let fp = conformance::fingerprint(1);
    for (i, key) in keys.iter().rev().take(2_000).enumerate() {
        let begin = backend
            .begin(key, &fp, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(
            matches!(begin, Begin::Completed(_)),
            "record #{i} from the end was dropped"
        );
    }
    // The oldest went first.
    let begin = backend
        .begin(&keys[0], &fp, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        matches!(begin, Begin::Acquired(_)),
        "the oldest record survived"
    );
}

/// Expired records are not replayed, and their memory is reclaimed as newer
/// records arrive in their shard, even while the bound is far away.
#[tokio::test(start_paused = true)]
async fn memory_backend_reclaims_expired_records() {
    use std::time::Duration;

    let backend = MemoryBackend::builder().max_entries(10_000).build();
    for _ in 0..500 {
        store(
            &backend,
            &conformance::fresh_key(),
            b"{}",
            Duration::from_mins(1),
        )
        .await
        .unwrap();
    }
    assert_eq!(backend.stored_count(), 500);
    tokio::time::advance(Duration::from_secs(61)).await;
    // 200 new records reach each of the 8 shards of a 10 000 bound.
    for _ in 0..200 {
        store(
            &backend,
            &conformance::fresh_key(),
            b"{}",
            Duration::from_mins(1),
        )
        .await
        .unwrap();
    }
    assert_eq!(backend.stored_count(), 200, "expired records were kept");
}

/// A byte bound: a record heavier than a shard's share is not kept, but a
/// "not kept" marker with its status takes its place, so a retry does not
/// run the handler again.
#[tokio::test(start_paused = true)]
async fn memory_backend_keeps_a_marker_for_a_record_heavier_than_its_share() {
    use std::time::Duration;
    use tower_idempotency::{Backend, Begin, Completion};

    let backend = MemoryBackend::builder()
        .max_bytes(64 * 1024)
        .min_retention(Duration::ZERO)
        .build();
    let key = conformance::fresh_key();
    let completion = store(
        &backend,
        &key,
        &vec![b'x'; 100 * 1024],
        Duration::from_hours(1),
    )
    .await
    .unwrap();
    assert_eq!(
        completion,
        Completion::NotKept,
        "a 100 KiB record cannot fit a 64 KiB bound"
    );
    assert_eq!(backend.stored_count(), 1, "the marker");
    assert_eq!(backend.in_flight_count(), 0);
    let fp = conformance::fingerprint(1);
    let begin = backend
        .begin(&key, &fp, Duration::from_secs(30))
        .await
        .unwrap();
    let Begin::Completed(marker) = begin else {
        panic!("the marker answers the retry");
    };
    assert!(!marker.kept);
    assert_eq!(marker.status, http::StatusCode::CREATED);
    backend.forget(&key);

    // Within the bound, records are weighed by size: 4 KiB bodies, about
    // 15 of them fit in 64 KiB.
    for _ in 0..100 {
        store(
            &backend,
            &conformance::fresh_key(),
            &[b'y'; 4096],
            Duration::from_hours(1),
        )
        .await
        .unwrap();
    }
    let stored = backend.stored_count();
    assert!(
        (10..=16).contains(&stored),
        "{stored} records of 4 KiB in 64 KiB"
    );
}

/// One caller floods the table with new keys: a victim's young record
/// survives, the flood is answered `503` ("store full") at the bound, the
/// victim's retry replays, and requests in flight are unaffected.
#[tokio::test(start_paused = true)]
async fn a_flood_of_new_keys_never_evicts_a_young_record() {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, ServiceExt};
    use tower_idempotency::{IdempotencyBody, IdempotencyLayer};

    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        tower::service_fn(move |_req: Request<IdempotencyBody<Full<Bytes>>>| {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                    "payment {n}"
                )))))
            }
        })
    };
    let backend = MemoryBackend::builder().max_entries(2_000).build();
    let svc = IdempotencyLayer::new(backend.clone()).layer(handler);
    let post = |key: String, who: &str| {
        Request::post("/payments")
            .header("idempotency-key", key)
            .header("authorization", format!("Bearer {who}"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let victim = svc
        .clone()
        .oneshot(post("pay-1".into(), "victim"))
        .await
        .unwrap();
    assert_eq!(victim.status(), StatusCode::OK);
    let victim_body = victim.into_body().collect().await.unwrap().to_bytes();

    let (mut stored, mut full) = (0, 0);
    for i in 0..3_000 {
        tokio::time::advance(Duration::from_millis(1)).await;
        let res = svc
            .clone()
            .oneshot(post(format!("flood-{i}"), "flooder"))
            .await
            .unwrap();
        match res.status() {
            StatusCode::OK => stored += 1,
            StatusCode::SERVICE_UNAVAILABLE => full += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        full >= 1_000,
        "the flood was answered 503 at the bound ({full} times)"
    );
    assert!(stored < 2_000, "the bound held ({stored} stored)");
    assert!(backend.stored_count() <= 2_000);

    let retry = svc
        .clone()
        .oneshot(post("pay-1".into(), "victim"))
        .await
        .unwrap();
    assert_eq!(
        retry.headers()["idempotent-replayed"],
        "true",
        "the victim's record survived"
    );
    assert_eq!(
        retry.into_body().collect().await.unwrap().to_bytes(),
        victim_body
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1 + stored,
        "no handler ran for a refused key"
    );
}

/// Steady growth past the bound, in paused time: only records older than
/// the minimum retention are evicted (oldest first), every younger record is
/// always kept, and new keys are admitted again as records age.
#[tokio::test(start_paused = true)]
async fn growth_past_the_bound_evicts_only_records_older_than_the_minimum() {
    use std::time::Duration;
    use tower_idempotency::{Backend, BackendErrorKind, Begin};

    let min = Duration::from_mins(10);
    let backend = MemoryBackend::builder()
        .max_entries(1_000)
        .min_retention(min)
        .build();
    let fp = conformance::fingerprint(1);
    let mut kept: Vec<(tokio::time::Instant, tower_idempotency::StorageKey)> = Vec::new();
    let mut refused = 0;
    // Two records a second for an hour: 7 200 records against a bound of
    // 1 000, of which 1 200 are younger than ten minutes at any time.
    for step in 0..7_200u32 {
        tokio::time::advance(Duration::from_millis(500)).await;
        let key = conformance::fresh_key();
        match store(&backend, &key, b"{}", Duration::from_hours(24)).await {
            Ok(_) => kept.push((tokio::time::Instant::now(), key)),
            Err(error) => {
                assert_eq!(error.kind(), BackendErrorKind::Rejected, "{error}");
                refused += 1;
            }
        }
        if step % 600 == 599 {
            let now = tokio::time::Instant::now();
            for (at, key) in kept.iter().filter(|(at, _)| now - *at < min) {
                let begin = backend
                    .begin(key, &fp, Duration::from_secs(1))
                    .await
                    .unwrap();
                assert!(
                    matches!(begin, Begin::Completed(_)),
                    "a record {:?} old was evicted",
                    now - *at
                );
            }
            assert!(backend.stored_count() <= 1_000);
        }
    }
    assert!(refused > 0, "the bound was never reached");
    assert!(
        kept.len() > 5_000,
        "old records made room: {} stored",
        kept.len()
    );
}
