//! Fencing tokens: the handler gets its lock's token (extension and axum
//! extractor) on every backend, a later lock on the key gets a larger one,
//! and the documented SQL pattern fences a stale holder's write.

mod common;
mod conformance;
mod postgres_support;
mod redis_support;

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use http::StatusCode;
use tower::ServiceExt;
use tower_idempotency::{
    Backend, Begin, FencingToken, IdempotencyLayer, MemoryBackend, PostgresMode, RedisBackend,
};

/// A handler that answers its fence in the body: `500` on its first run (so
/// the key is released and the retry runs again), `201` after.
fn app<B: Backend>(backend: B) -> Router {
    let runs = common::Runs::default();
    Router::new()
        .route(
            "/payments",
            post(move |fence: FencingToken| {
                let runs = runs.clone();
                async move {
                    let status = if runs.bump() == 1 {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::CREATED
                    };
                    (status, fence.to_string())
                }
            }),
        )
        .layer(IdempotencyLayer::new(backend))
}

async fn fence_answered(app: &Router, key: &str) -> (StatusCode, u64) {
    let answer = common::send(&mut app.clone(), common::post("/payments", Some(key), "{}")).await;
    let text = std::str::from_utf8(&answer.body).unwrap();
    (
        answer.status,
        text.parse().unwrap_or_else(|_| panic!("{text}")),
    )
}

/// The handler's run after a released key holds a larger token than the
/// first run, and the replay answers the second run's.
async fn handler_sees_a_growing_fence<B: Backend>(backend: B, key: &str) {
    let app = app(backend);
    let (status, first) = fence_answered(&app, key).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(first > 0);
    let (status, second) = fence_answered(&app, key).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(second > first, "{second} <= {first}");
    assert_eq!(
        fence_answered(&app, key).await,
        (StatusCode::CREATED, second)
    );
}

#[tokio::test]
async fn memory_handler_sees_a_growing_fence() {
    handler_sees_a_growing_fence(MemoryBackend::new(), &common::unique_key("fence-memory")).await;
}

#[tokio::test]
async fn redis_handler_sees_a_growing_fence() {
    handler_sees_a_growing_fence(
        redis_support::backend().await,
        &common::unique_key("fence-redis"),
    )
    .await;
}

#[tokio::test]
async fn postgres_handler_sees_a_growing_fence_in_every_mode() {
    for mode in [
        PostgresMode::Lease,
        PostgresMode::Advisory,
        PostgresMode::Transaction,
    ] {
        let key = common::unique_key(&format!("fence-pg-{mode:?}"));
        handler_sees_a_growing_fence(postgres_support::backend_in(mode).await, &key).await;
    }
}

/// A backend that gives no fencing token (the trait's default).
#[derive(Clone)]
struct Unfenced(MemoryBackend);

impl Backend for Unfenced {
    type Lock = <MemoryBackend as Backend>::Lock;

    async fn begin(
        &self,
        key: &tower_idempotency::StorageKey,
        fp: &tower_idempotency::Fingerprint,
        ttl: Duration,
    ) -> Result<Begin<Self::Lock>, tower_idempotency::BackendError> {
        self.0.begin(key, fp, ttl).await
    }
    async fn complete(
        &self,
        lock: Self::Lock,
        record: tower_idempotency::Record,
        ttl: Duration,
    ) -> Result<tower_idempotency::Completion, tower_idempotency::BackendError> {
        self.0.complete(lock, record, ttl).await
    }
    async fn release(&self, lock: Self::Lock) -> Result<(), tower_idempotency::BackendError> {
        self.0.release(lock).await
    }
    async fn extend(
        &self,
        lock: &Self::Lock,
        ttl: Duration,
    ) -> Result<bool, tower_idempotency::BackendError> {
        self.0.extend(lock, ttl).await
    }
}

/// The extractor refuses a request without a key (`400`, the missing-key
/// problem) and a keyed request whose backend gives no token (`500`: the
/// handler cannot fence); `Option<FencingToken>` serves both.
#[tokio::test]
async fn the_extractor_refuses_requests_without_a_token() {
    let fenced = app(MemoryBackend::new());
    let answer = common::send(&mut fenced.clone(), common::post("/payments", None, "{}")).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.problem_type(), "missing-key");

    let unfenced = app(Unfenced(MemoryBackend::new()));
    let answer = common::send(
        &mut unfenced.clone(),
        common::post("/payments", Some("\"unfenced\""), "{}"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);

    let optional = Router::new()
        .route(
            "/payments",
            post(|fence: Option<FencingToken>| async move { format!("{fence:?}") }),
        )
        .layer(IdempotencyLayer::new(MemoryBackend::new()));
    let answer = optional
        .clone()
        .oneshot(common::post("/payments", None, "{}"))
        .await
        .unwrap();
    let answer = common::Answer::read(answer).await;
    assert_eq!(answer.body, "None");
    let answer = common::send(
        &mut optional.clone(),
        common::post("/payments", Some("\"optional\""), "{}"),
    )
    .await;
    assert!(answer.body.starts_with(b"Some("), "{:?}", answer.body);
}

/// A Redis server whose clock stepped back (a failover to a replica whose
/// clock is behind) still hands out a larger token: the key's last token
/// is kept beside it.
#[tokio::test]
async fn redis_fence_survives_a_clock_stepped_back() {
    let prefix = redis_support::unique_prefix();
    let backend = RedisBackend::builder(redis_support::pool().await)
        .prefix(prefix.clone())
        .build()
        .unwrap();
    let key = conformance::fresh_key();
    let fp = conformance::fingerprint(1);
    let Begin::Acquired(lock) = backend
        .begin(&key, &fp, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("fresh key");
    };
    let first = backend.fencing_token(&lock).unwrap().get();
    backend.release(lock).await.unwrap();
    // As if the last token had been drawn an hour ahead of this clock.
    let ahead = first + 3_600_000_000;
    let mut admin = redis_support::admin(&redis_support::redis_url()).await;
    let fence_key = format!("{prefix}{{{}}}:fence", key.to_hex());
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&fence_key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(ttl > 30_000, "the fence outlives the lock: {ttl} ms");
    let () = redis::cmd("SET")
        .arg(&fence_key)
        .arg(ahead)
        .arg("KEEPTTL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let Begin::Acquired(lock) = backend
        .begin(&key, &fp, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("released");
    };
    assert_eq!(backend.fencing_token(&lock).unwrap().get(), ahead + 1);
    backend.release(lock).await.unwrap();
}

/// The pattern of the `fence` module's documentation: a holder whose lease
/// lapsed writes after the holder that took the key over, and its write
/// changes nothing.
#[tokio::test]
async fn postgres_fenced_write_refuses_a_stale_holder() {
    let backend = postgres_support::backend_in(PostgresMode::Lease).await;
    let admin = postgres_support::admin().await;
    let table = format!("fenced_payments_{}", std::process::id());
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; \
             CREATE TABLE {table} (idempotency_key text PRIMARY KEY, fence bigint NOT NULL, amount bigint NOT NULL)"
        ))
        .await
        .unwrap();
    let write = format!(
        "INSERT INTO {table} (idempotency_key, fence, amount) VALUES ($1, $2, $3) \
         ON CONFLICT (idempotency_key) DO UPDATE SET fence = EXCLUDED.fence, amount = EXCLUDED.amount \
         WHERE {table}.fence < EXCLUDED.fence"
    );
    let key = conformance::fresh_key();
    let fp = conformance::fingerprint(2);
    let Begin::Acquired(stale) = backend
        .begin(&key, &fp, Duration::from_millis(200))
        .await
        .unwrap()
    else {
        panic!("fresh key");
    };
    let stale_fence = backend.fencing_token(&stale).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let Begin::Acquired(newer) = backend
        .begin(&key, &fp, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("the stale lease lapsed");
    };
    let newer_fence = backend.fencing_token(&newer).unwrap();
    assert!(newer_fence > stale_fence);
    let written = admin
        .execute(&write, &[&"k1", &newer_fence.as_i64(), &200_i64])
        .await
        .unwrap();
    assert_eq!(written, 1);
    let written = admin
        .execute(&write, &[&"k1", &stale_fence.as_i64(), &100_i64])
        .await
        .unwrap();
    assert_eq!(written, 0, "the stale holder's write is fenced off");
    let amount: i64 = admin
        .query_one(
            &format!("SELECT amount FROM {table} WHERE idempotency_key = 'k1'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(amount, 200);
    backend.release(newer).await.unwrap();
    backend.release(stale).await.unwrap();
    admin
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// A table migrated by an earlier version (no fencing sequence): `verify`
/// says to migrate, and a `begin` that acquires fails as misconfigured
/// (the layer answers `503`), never a lock without its token.
#[tokio::test]
async fn postgres_without_the_fence_sequence_is_misconfigured() {
    let table = format!("fence_upgrade_{}", std::process::id());
    let backend =
        postgres_support::backend_on_table(&table, PostgresMode::Lease, "fence_upgrade").await;
    let admin = postgres_support::admin().await;
    admin
        .batch_execute(&format!("DROP SEQUENCE {table}_fence"))
        .await
        .unwrap();
    let error = backend.verify().await.unwrap_err();
    assert_eq!(
        error.kind(),
        tower_idempotency::BackendErrorKind::Misconfigured
    );
    let key = conformance::fresh_key();
    let error = backend
        .begin(&key, &conformance::fingerprint(3), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(
        error.kind(),
        tower_idempotency::BackendErrorKind::Misconfigured
    );
    backend.migrate().await.unwrap();
    let Begin::Acquired(lock) = backend
        .begin(&key, &conformance::fingerprint(3), Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("the failed begin rolled back the lease it wrote with its statement");
    };
    backend.release(lock).await.unwrap();
    admin
        .batch_execute(&format!("DROP TABLE {table} CASCADE"))
        .await
        .unwrap();
}
