//! Instructions per request through the layer, for counting under
//! callgrind: a number that the machine's load cannot move (runs differ by a
//! few hundred instructions, the hash maps being randomly keyed).
//!
//! `scripts/instructions.sh [revision]` runs it (and, given a revision, the
//! same program built against that revision of the crate) under
//! `valgrind --tool=callgrind` twice per mode, with 0 and with N requests,
//! and prints the difference divided by N.
//!
//! Usage of the binary itself: `instructions <mode> <requests> [backend]`,
//! modes `fresh` (a new key per request: lock, handler, store), `replay`
//! (one stored key), `nokey` (no `Idempotency-Key`: pass-through) and `none`
//! (the handler without the layer); backends `memory` (the default),
//! `redis` (`REDIS_URL`), `postgres` (`DATABASE_URL`, lease mode, unnamed
//! statements) and `sqlite` (a file in the temporary directory). For the
//! networked backends the count is this process' side only: building the
//! commands, the client library, the socket calls' user-space part and
//! decoding the answer — what the application's CPU pays per request,
//! without the server's. The requests are the criterion benchmark's
//! (`benches/layer.rs`): a 61-byte JSON body, `Content-Type` and
//! `Authorization`; the handler answers 41 bytes of JSON.

#[cfg(feature = "sqlite")]
#[path = "../tests/sqlite_files/mod.rs"]
mod sqlite_files;

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{Backend, IdempotencyLayer, MemoryBackend};

const PAYLOAD: &str = r#"{"amount":500,"currency":"EUR","customer":"cus_8e03978e40d5"}"#;

fn request(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post("/payments")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Full::new(Bytes::from_static(PAYLOAD.as_bytes())))
        .expect("a valid request")
}

async fn handler<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::new(Bytes::from_static(
        br#"{"id":"pay_000001","status":"succeeded"}"#,
    )));
    *res.status_mut() = StatusCode::CREATED;
    Ok(res)
}

async fn drive<S, B>(svc: &S, req: Request<Full<Bytes>>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.expect("infallible");
    std::hint::black_box(res.into_body().collect().await.expect("body").to_bytes());
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mode = args.first().map_or("fresh", String::as_str).to_owned();
    let n: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1000);
    let backend = args.get(2).map_or("memory", String::as_str).to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // Every run its own keys: the counts must not depend on what an earlier
    // run stored.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    rt.block_on(async move {
        match backend.as_str() {
            "memory" => count(MemoryBackend::new(), &mode, n, run).await,
            #[cfg(feature = "redis")]
            "redis" => {
                let url = std::env::var("REDIS_URL")
                    .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
                let pool = tower_idempotency::deadpool_redis::Config::from_url(url)
                    .create_pool(Some(tower_idempotency::deadpool_redis::Runtime::Tokio1))
                    .expect("a Redis pool");
                let backend = tower_idempotency::RedisBackend::builder(pool)
                    .prefix(format!("instructions-{run}:"))
                    .build()
                    .expect("a Redis backend");
                count(backend, &mode, n, run).await;
            }
            #[cfg(feature = "postgres")]
            "postgres" => {
                use tower_idempotency::deadpool_postgres::{self, tokio_postgres};
                let mut config = deadpool_postgres::Config::new();
                config.url = Some(
                    std::env::var("DATABASE_URL")
                        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
                );
                let pool = config
                    .create_pool(
                        Some(deadpool_postgres::Runtime::Tokio1),
                        tokio_postgres::NoTls,
                    )
                    .expect("a PostgreSQL pool");
                let table = format!("instructions_bench_{run}");
                let backend = tower_idempotency::PostgresBackend::builder(pool.clone())
                    .table(&table)
                    .build()
                    .expect("a PostgreSQL backend");
                backend.migrate().await.expect("migrate");
                count(backend, &mode, n, run).await;
                let client = pool.get().await.expect("a PostgreSQL connection");
                client
                    .batch_execute(&format!(
                        "DROP TABLE {table}; DROP SEQUENCE IF EXISTS {table}_fence; \
                         DROP FUNCTION IF EXISTS {table}_lease, {table}_begin, {table}_begin_xact, \
                         {table}_complete_session, {table}_complete_xact"
                    ))
                    .await
                    .expect("drop the benchmark's table");
            }
            #[cfg(feature = "sqlite")]
            "sqlite" => {
                let path = std::env::temp_dir().join(format!("instructions-{run}.db"));
                let backend = tower_idempotency::SqliteBackend::open(&path)
                    .await
                    .expect("a SQLite file");
                count(backend, &mode, n, run).await;
                sqlite_files::remove(&path);
            }
            other => panic!("unknown backend {other} (or its feature is off)"),
        }
    });
}

async fn count<Bk: Backend>(backend: Bk, mode: &str, n: usize, run: u128) {
    let plain = tower::service_fn(handler::<Full<Bytes>>);
    // Redis keys expire on their own soon after the run.
    let guarded = IdempotencyLayer::new(backend)
        .ttl(std::time::Duration::from_mins(1))
        .layer(tower::service_fn(handler));
    let replayed = format!("\"replayed-{run}\"");
    // The same warm-up for every N: the stored key, and a few requests of
    // each kind, so that N = 0 pays every one-time cost too (connections,
    // prepared statements, the scripts loaded).
    drive(&guarded, request(Some(&replayed))).await;
    for i in 0..16 {
        drive(&guarded, request(Some(&format!("\"warm-{run}-{i}\"")))).await;
        drive(&guarded, request(Some(&replayed))).await;
        drive(&guarded, request(None)).await;
        drive(&plain, request(None)).await;
    }
    for i in 0..n {
        match mode {
            "fresh" => drive(&guarded, request(Some(&format!("\"fresh-{run}-{i}\"")))).await,
            "replay" => drive(&guarded, request(Some(&replayed))).await,
            "nokey" => drive(&guarded, request(None)).await,
            "none" => drive(&plain, request(None)).await,
            other => panic!("unknown mode {other}"),
        }
    }
}
