//! The Redis backend against the real server on `REDIS_URL`.

mod common;
mod conformance;
mod redis_support;

use std::time::Duration;

use common::{Runs, counting, gated, post, send, slow_payment};
use http::StatusCode;
use http_body_util::BodyExt;
use redis_support::{admin, backend, pool, redis_url, unique_prefix};
use tower::{Layer, ServiceExt};
use tower_idempotency::{
    Backend, BackendErrorKind, Begin, IdempotencyKey, IdempotencyLayer, RedisBackend, ScopeValue,
    StorageKey,
};

backend_conformance!(#[tokio::test], backend().await, Lapse);

/// Two instances of a service (two pools, two backends) behind one Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_run_a_hundred_duplicates_once() {
    let prefix = unique_prefix();
    let runs = Runs::default();
    let handler = slow_payment(runs.clone(), Duration::from_millis(200));
    let mut instances = Vec::new();
    for _ in 0..2 {
        let backend = RedisBackend::builder(pool().await)
            .prefix(prefix.clone())
            .build()
            .unwrap();
        instances.push(IdempotencyLayer::new(backend).layer(handler.clone()));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let mut svc = instances[i % 2].clone();
        tasks.spawn(async move { send(&mut svc, post("/payments", Some("\"hot\""), "{}")).await });
    }
    let answers = tasks.join_all().await;
    assert_eq!(
        runs.get(),
        1,
        "the handler must run once across both instances"
    );
    for a in &answers {
        match a.status {
            StatusCode::CREATED => assert_eq!(a.body, "payment 1"),
            StatusCode::CONFLICT => assert_eq!(a.problem_type(), "request-in-flight"),
            other => panic!("unexpected {other}: {:?}", a.body),
        }
    }
    for svc in &mut instances {
        let again = send(svc, post("/payments", Some("\"hot\""), "{}")).await;
        assert!(again.replayed());
        assert_eq!(again.body, "payment 1");
    }
}

/// A lock TTL a loaded machine cannot outrun: the heartbeat (every TTL / 3)
/// may be up to two thirds of it late, and one request's round trips take
/// far less.
const LOCK_TTL: Duration = Duration::from_secs(3);

#[tokio::test]
async fn without_heartbeat_a_lapsed_lock_is_lost_and_never_overwrites() {
    let runs = Runs::default();
    let (handler, gate) = gated(runs.clone());
    let svc = IdempotencyLayer::new(backend().await)
        .lock_ttl(Duration::from_millis(300))
        .heartbeat(false)
        .layer(handler);
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some("k"), "x")));
    // The first holds the lock from before its handler started; past the
    // TTL, Redis has dropped it.
    gate.started.await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = send(&mut svc.clone(), post("/p", Some("k"), "x")).await;
    assert_eq!(
        second.body, "run 2",
        "the lapsed lock let a second request take the key"
    );
    gate.finish.send(()).unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(
        first.into_body().collect().await.unwrap().to_bytes(),
        "run 1"
    );
    let third = send(&mut svc.clone(), post("/p", Some("k"), "x")).await;
    assert!(third.replayed());
    assert_eq!(
        third.body, "run 2",
        "the stale holder's save must be refused"
    );
}

#[tokio::test]
async fn heartbeat_keeps_the_lock_of_a_handler_slower_than_the_lock_ttl() {
    let runs = Runs::default();
    let (handler, gate) = gated(runs.clone());
    let svc = IdempotencyLayer::new(backend().await)
        .lock_ttl(LOCK_TTL)
        .layer(handler);
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some("k"), "x")));
    gate.started.await.unwrap();
    // Half a TTL beyond the lock's own: only the heartbeat kept it.
    tokio::time::sleep(LOCK_TTL * 3 / 2).await;
    let during = send(&mut svc.clone(), post("/p", Some("k"), "x")).await;
    assert_eq!(
        during.status,
        StatusCode::CONFLICT,
        "still locked after 1.5 lock TTLs: {:?}",
        during.body
    );
    gate.finish.send(()).unwrap();
    first.await.unwrap().unwrap();
    let after = send(&mut svc.clone(), post("/p", Some("k"), "x")).await;
    assert!(after.replayed());
    assert_eq!(after.body, "run 1");
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn script_flush_mid_run_is_survived() {
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend().await).layer(counting(runs.clone()));
    let mut admin = admin(&redis_url()).await;
    for i in 0..40 {
        if i % 10 == 5 {
            let () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut admin)
                .await
                .unwrap();
        }
        let key = format!("flush-{i}");
        let first = send(&mut svc, post("/p", Some(&key), "x")).await;
        assert_eq!(
            first.status,
            StatusCode::CREATED,
            "request {i}: {:?}",
            first.body
        );
        if i % 10 == 5 {
            let () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut admin)
                .await
                .unwrap();
        }
        assert!(
            send(&mut svc, post("/p", Some(&key), "x")).await.replayed(),
            "request {i}"
        );
    }
    assert_eq!(runs.get(), 40);
}

fn redis_keys(prefix: &str, key: &str) -> (String, String) {
    let storage = StorageKey::derive(
        &ScopeValue::anonymous(),
        &IdempotencyKey::parse(&key.parse().unwrap()).unwrap(),
    );
    let hex = storage.to_hex();
    (
        format!("{prefix}{{{hex}}}:rec"),
        format!("{prefix}{{{hex}}}:lock"),
    )
}

#[tokio::test]
async fn corrupt_or_foreign_values_are_500_never_replayed_never_run_again() {
    let prefix = unique_prefix();
    let backend = RedisBackend::builder(pool().await)
        .prefix(prefix.clone())
        .build()
        .unwrap();
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(counting(runs.clone()));
    let mut admin = admin(&redis_url()).await;

    // Garbage bytes where a record should be.
    let (rec, _) = redis_keys(&prefix, "garbage");
    let () = redis::cmd("SET")
        .arg(&rec)
        .arg(b"\x01\x00not a record")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut admin)
        .await
        .unwrap();
    let answer = send(&mut svc, post("/p", Some("garbage"), "x")).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.problem_type(), "stored-response-unreadable");
    // Not even fail-open runs the handler over a stored record.
    let mut open = IdempotencyLayer::new(backend.clone())
        .fail_open()
        .layer(counting(runs.clone()));
    let answer = send(&mut open, post("/p", Some("garbage"), "x")).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);

    // A valid record with one bit flipped.
    send(&mut svc, post("/p", Some("flipped"), "x")).await;
    let (rec, _) = redis_keys(&prefix, "flipped");
    let mut blob: Vec<u8> = redis::cmd("GET")
        .arg(&rec)
        .query_async(&mut admin)
        .await
        .unwrap();
    let last = blob.len() - 1;
    blob[last] ^= 0x10;
    let () = redis::cmd("SET")
        .arg(&rec)
        .arg(blob)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        send(&mut svc, post("/p", Some("flipped"), "x"))
            .await
            .status,
        StatusCode::INTERNAL_SERVER_ERROR
    );

    // Another type at the record key.
    let (rec, _) = redis_keys(&prefix, "list");
    let _: i64 = redis::cmd("LPUSH")
        .arg(&rec)
        .arg("x")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(&rec)
        .arg(60_000)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        send(&mut svc, post("/p", Some("list"), "x")).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let storage = StorageKey::derive(
        &ScopeValue::anonymous(),
        &IdempotencyKey::parse(&"list".parse().unwrap()).unwrap(),
    );
    let error = backend
        .begin(
            &storage,
            &conformance::fingerprint(1),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind(), BackendErrorKind::Corrupt);

    assert_eq!(
        runs.get(),
        1,
        "only the 'flipped' request ran, before its record was damaged"
    );

    // The operator drops the unreadable record: the next request runs.
    let flipped = StorageKey::derive(
        &ScopeValue::anonymous(),
        &IdempotencyKey::parse(&"flipped".parse().unwrap()).unwrap(),
    );
    assert!(backend.forget(&flipped).await.unwrap());
    assert!(!backend.forget(&flipped).await.unwrap(), "already gone");
    let again = send(&mut svc, post("/p", Some("flipped"), "x")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
}

/// A record this instance cannot read, though another could (a newer
/// format during a rollback; larger than this instance's
/// `max_record_size`): `503`, retry; the handler never runs again.
#[tokio::test]
async fn records_another_instance_wrote_are_503_never_run_again() {
    let prefix = unique_prefix();
    let backend = RedisBackend::builder(pool().await)
        .prefix(prefix.clone())
        .build()
        .unwrap();
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend.clone())
        .fail_open()
        .layer(counting(runs.clone()));
    let mut admin = admin(&redis_url()).await;
    // A newer format version.
    send(&mut svc, post("/p", Some("newer"), "x")).await;
    let (rec, _) = redis_keys(&prefix, "newer");
    let mut blob: Vec<u8> = redis::cmd("GET")
        .arg(&rec)
        .query_async(&mut admin)
        .await
        .unwrap();
    blob[0] = 3;
    let () = redis::cmd("SET")
        .arg(&rec)
        .arg(blob)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut admin)
        .await
        .unwrap();
    let answer = send(&mut svc, post("/p", Some("newer"), "x")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.problem_type(), "stored-response-incompatible");
    assert!(answer.headers.contains_key("retry-after"));
    // A record larger than a smaller-configured instance reads.
    send(&mut svc, post("/p", Some("large"), &"y".repeat(4096))).await;
    let small = RedisBackend::builder(pool().await)
        .prefix(prefix.clone())
        .codec(tower_idempotency::RecordCodec::new().max_record_size(1024))
        .build()
        .unwrap();
    let mut small_svc = IdempotencyLayer::new(small)
        .fail_open()
        .layer(counting(runs.clone()));
    let answer = send(&mut small_svc, post("/p", Some("large"), &"y".repeat(4096))).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.problem_type(), "stored-response-incompatible");
    // The instance with the larger limit still replays it.
    assert!(
        send(&mut svc, post("/p", Some("large"), &"y".repeat(4096)))
            .await
            .replayed()
    );
    assert_eq!(runs.get(), 2, "each request ran once, before");
}

#[tokio::test]
async fn keys_share_a_hash_tag_and_expire() {
    let prefix = unique_prefix();
    let backend = RedisBackend::builder(pool().await)
        .prefix(prefix.clone())
        .build()
        .unwrap();
    let mut admin = admin(&redis_url()).await;
    let key = conformance::fresh_key();
    let Begin::Acquired(lock) = backend
        .begin(&key, &conformance::fingerprint(1), Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("fresh key");
    };
    let lock_key = format!("{prefix}{{{}}}:lock", key.to_hex());
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&lock_key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!((1..=5000).contains(&pttl), "lock PTTL {pttl}");
    backend
        .complete(
            lock,
            conformance::record(conformance::fingerprint(1), b"{}"),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let rec_key = format!("{prefix}{{{}}}:rec", key.to_hex());
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&rec_key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!((25_000..=30_000).contains(&pttl), "record PTTL {pttl}");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&lock_key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(exists, 0, "complete deletes the lock");
    // Redis hashes only what stands between the first '{' and the next '}'.
    let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_owned();
    assert_eq!(
        tag(&rec_key),
        tag(&lock_key),
        "both keys of a request hash to one slot"
    );
    assert_eq!(tag(&rec_key), format!("{{{}}}", key.to_hex()));
}

#[tokio::test]
async fn prefix_with_braces_is_refused() {
    let error = RedisBackend::builder(pool().await)
        .prefix("bad{tag}:")
        .build()
        .unwrap_err();
    assert_eq!(error.kind(), BackendErrorKind::Misconfigured);
}

/// Two processes of `examples/payments_redis.rs` share one Redis: a retry
/// sent to the other instance is replayed with the same payment id.
#[tokio::test]
async fn payments_redis_example_instances_share_one_record() {
    let key = format!("\"{}\"", unique_prefix());
    common::example_instances_share_one_record("payments_redis", ("REDIS_URL", &redis_url()), &key)
        .await;
}

/// A `SCRIPT FLUSH` followed by a burst: every request of the burst meets
/// `NOSCRIPT` at once and must still be served (and stored) correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noscript_storm_after_a_flush() {
    let runs = Runs::default();
    let svc = IdempotencyLayer::new(backend().await).layer(counting(runs.clone()));
    send(&mut svc.clone(), post("/p", Some("storm-warm"), "x")).await;
    let mut admin = admin(&redis_url()).await;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let mut svc = svc.clone();
        tasks.spawn(async move {
            let key = format!("storm-{}", i % 25);
            send(&mut svc, post("/p", Some(&key), "x")).await.status
        });
    }
    for status in tasks.join_all().await {
        assert!(
            status == StatusCode::CREATED || status == StatusCode::CONFLICT,
            "{status}"
        );
    }
    assert_eq!(runs.get(), 26, "one run per key (25) plus the warm-up");
}

/// A client that closes its socket mid-handler, then retries: one run.
#[tokio::test]
async fn payments_redis_example_survives_a_client_that_gives_up() {
    let prefix = unique_prefix();
    common::example_survives_a_client_that_gives_up(
        "payments_redis",
        &[("REDIS_URL", &redis_url()), ("REDIS_PREFIX", &prefix)],
    )
    .await;
}

/// A response larger than the codec's `max_record_size` (but within the
/// layer's `max_stored_response`) is replaced by a "not kept" marker: the
/// retry gets the marker answer and the handler does not run again.
#[tokio::test]
async fn a_record_too_large_for_the_codec_leaves_a_marker() {
    let backend = RedisBackend::builder(pool().await)
        .prefix(unique_prefix())
        .codec(tower_idempotency::RecordCodec::new().max_record_size(1024))
        .build()
        .unwrap();
    let runs = Runs::default();
    let mut svc = IdempotencyLayer::new(backend).layer(counting(runs.clone()));
    let big = "z".repeat(8 * 1024);
    let first = send(&mut svc, post("/p", Some("big"), &big)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&mut svc, post("/p", Some("big"), &big)).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.problem_type(), "response-not-kept");
    assert_eq!(runs.get(), 1);
}

/// A handler that panics: the default `Backend::abandon` releases the Redis
/// lock in the background, and the retry runs within seconds.
#[tokio::test]
async fn a_panicked_handler_frees_the_key_within_seconds() {
    common::a_panicked_handler_frees_the_key(backend().await, "panicked").await;
}

/// The `5xx` policies on Redis.
#[tokio::test]
async fn server_error_policies_on_redis() {
    common::server_error_policies(backend().await, "redis").await;
}
