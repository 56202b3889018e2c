//! What `wait_for_in_flight` costs the backend per waiting request.
//!
//! One request holds a key for 600 ms on instance A; N duplicates arrive
//! 50 ms later, split over A and B (two layers, each with a backend and pool
//! of its own, as two processes would have). Every `begin` the backends see
//! is counted: each request's own first look, and the polls of the waiting
//! rooms. Counts do not move with the machine's load; the latency column
//! (from the holder's answer to the last duplicate's) does.
//!
//! `cargo bench --bench wait_cost --features redis,postgres,sqlite` with the
//! servers the tests use (`REDIS_URL`, `DATABASE_URL`). Figures in
//! BENCHMARKS.md.

// Statistics over counts far below 2^52.
#![allow(clippy::cast_precision_loss)]

#[path = "../tests/sqlite_files/mod.rs"]
mod sqlite_files;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{
    Backend, IdempotencyBody, IdempotencyLayer, MemoryBackend, PostgresBackend, PostgresMode,
    RedisBackend, SqliteBackend,
};

#[path = "../tests/counted/mod.rs"]
mod counted;

use counted::Counted;

const HOLD: Duration = Duration::from_millis(600);
const WAITERS: [usize; 4] = [1, 10, 100, 1000];

async fn handler(
    _req: Request<IdempotencyBody<Full<Bytes>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    tokio::time::sleep(HOLD).await;
    let mut res = Response::new(Full::new(Bytes::from_static(br#"{"id":"pay_1"}"#)));
    *res.status_mut() = StatusCode::CREATED;
    Ok(res)
}

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/payments")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{\"amount\":5}")))
        .expect("request")
}

struct Row {
    polls: usize,
    lag: Duration,
}

/// One holder and `waiters` duplicates over instances `a` and `b`.
async fn measure<B: Backend>(a: B, b: B, waiters: usize, key: &str) -> Row {
    let begins = Arc::new(AtomicUsize::new(0));
    let layer = |inner: B| {
        IdempotencyLayer::new(Counted::counting_into(inner, Arc::clone(&begins)))
            .wait_for_in_flight(Duration::from_secs(10))
    };
    let instances = [
        layer(a).layer(tower::service_fn(handler)),
        layer(b).layer(tower::service_fn(handler)),
    ];
    let holder = {
        let svc = instances[0].clone();
        let key = key.to_owned();
        tokio::spawn(async move {
            let res = svc.oneshot(request(&key)).await.expect("response");
            assert_eq!(res.status(), StatusCode::CREATED);
            Instant::now()
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..waiters {
        let mut svc = instances[i % 2].clone();
        let key = key.to_owned();
        tasks.spawn(async move {
            let res = svc
                .ready()
                .await
                .expect("ready")
                .call(request(&key))
                .await
                .expect("response");
            assert_eq!(res.status(), StatusCode::CREATED, "every duplicate replays");
            Instant::now()
        });
    }
    let last = tasks.join_all().await.into_iter().max().expect("waiters");
    let answered = holder.await.expect("holder");
    Row {
        polls: begins.load(Ordering::Relaxed) - waiters - 1,
        lag: last.saturating_duration_since(answered),
    }
}

async fn table<B: Backend>(name: &str, make: impl AsyncFn() -> B) {
    for waiters in WAITERS {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        let key = format!("\"wait-cost-{name}-{waiters}-{nanos}\"");
        let row = measure(make().await, make().await, waiters, &key).await;
        println!(
            "| {name} | {waiters} | {} | {:.3} | {:.0} |",
            row.polls,
            row.polls as f64 / waiters as f64,
            row.lag.as_secs_f64() * 1000.0
        );
    }
}

#[tokio::main]
async fn main() {
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    println!(
        "One request holds a key for {} ms; N duplicates wait, split over two instances.",
        HOLD.as_millis()
    );
    println!("Polls: backend `begin` calls besides each request's own first one.\n");
    println!(
        "| backend | waiters | polls | polls per waiter | last replay after the holder's answer (ms) |"
    );
    println!("|---|---:|---:|---:|---:|");
    let memory = MemoryBackend::new();
    table("memory", async || memory.clone()).await;
    let prefix = format!("wait-cost-{}:", std::process::id());
    table("redis", async || {
        let pool = deadpool_redis::Config::from_url(&redis_url)
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .expect("redis pool");
        RedisBackend::builder(pool)
            .prefix(prefix.clone())
            .build()
            .expect("redis backend")
    })
    .await;
    for mode in [
        PostgresMode::Lease,
        PostgresMode::Advisory,
        PostgresMode::Transaction,
    ] {
        let name = format!("postgres {mode:?}").to_lowercase();
        table(&name, async || {
            let config = deadpool_postgres::Config {
                url: Some(database_url.clone()),
                ..deadpool_postgres::Config::default()
            };
            let pool = config
                .create_pool(
                    Some(deadpool_postgres::Runtime::Tokio1),
                    tokio_postgres::NoTls,
                )
                .expect("postgres pool");
            let backend = PostgresBackend::builder(pool)
                .table("idempotency_wait_cost")
                .mode(mode)
                .build()
                .expect("postgres backend");
            backend.migrate().await.expect("migrate");
            backend
        })
        .await;
    }
    let sqlite_path = std::env::temp_dir().join(format!(
        "tower-idempotency-wait-cost-{}.sqlite3",
        std::process::id()
    ));
    table("sqlite", async || {
        SqliteBackend::open(&sqlite_path)
            .await
            .expect("sqlite backend")
    })
    .await;
    sqlite_files::remove(&sqlite_path);
    // The keys expire with their records; the bench table is dropped.
    let config = deadpool_postgres::Config {
        url: Some(database_url),
        ..deadpool_postgres::Config::default()
    };
    if let Ok(pool) = config.create_pool(
        Some(deadpool_postgres::Runtime::Tokio1),
        tokio_postgres::NoTls,
    ) && let Ok(client) = pool.get().await
    {
        let _ = client
            .batch_execute("DROP TABLE IF EXISTS idempotency_wait_cost CASCADE; DROP SEQUENCE IF EXISTS idempotency_wait_cost_fence")
            .await;
    }
}
