//! Per-request cost of the layer and its parts.
//!
//! `cargo bench --bench layer` (figures in BENCHMARKS.md). The `layer/*`
//! group compares the same trivial handler with no layer, with the layer but
//! no key (pass-through), a fresh key (lock → handler → store), a replay, and
//! a key held by a request in flight (409).

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{
    Backend, Fingerprint, IdempotencyBody, IdempotencyKey, IdempotencyLayer, MemoryBackend, Record,
    RecordCodec, StorageKey,
};

const PAYLOAD: &str = r#"{"amount":500,"currency":"EUR","customer":"cus_8e03978e40d5"}"#;

fn request(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post("/payments")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Full::new(Bytes::from_static(PAYLOAD.as_bytes())))
        .unwrap()
}

async fn handler<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.headers().contains_key("x-hang") {
        std::future::pending::<()>().await;
    }
    let mut res = Response::new(Full::new(Bytes::from_static(
        br#"{"id":"pay_000001","status":"succeeded"}"#,
    )));
    *res.status_mut() = StatusCode::CREATED;
    Ok(res)
}

/// Sends one request and reads the whole response, as a server would.
async fn drive<S, B>(svc: &S, req: Request<Full<Bytes>>) -> Bytes
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    res.into_body().collect().await.unwrap().to_bytes()
}

/// 100 000 records, the oldest evicted at the bound whatever their age: so
/// `fresh_key` measures a full table that evicts one record per request
/// (with the default minimum retention, new keys past the bound would be
/// refused instead, and the benchmark would measure `503`s).
fn bounded() -> MemoryBackend {
    MemoryBackend::builder()
        .max_entries(100_000)
        .min_retention(Duration::ZERO)
        .build()
}

fn layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("layer");

    let bare = tower::service_fn(handler::<Full<Bytes>>);
    group.bench_function("no_layer", |b| {
        b.to_async(&rt).iter(|| drive(&bare, request(None)));
    });

    // Each scenario gets its own backend, so one scenario's cache
    // housekeeping does not land in another's figures.
    let layered = |backend: &MemoryBackend| {
        IdempotencyLayer::new(backend.clone())
            .layer(tower::service_fn(handler::<IdempotencyBody<Full<Bytes>>>))
    };
    let svc = layered(&bounded());

    group.bench_function("passthrough_no_key", |b| {
        b.to_async(&rt).iter(|| drive(&svc, request(None)));
    });

    // The default bound (100 000): the run passes it within a second and then
    // measures the steady state of a server at capacity (insert + evict).
    let svc = layered(&bounded());
    let counter = AtomicU64::new(0);
    group.bench_function("fresh_key", |b| {
        b.to_async(&rt).iter(|| {
            let key = format!("fresh-{}", counter.fetch_add(1, Ordering::Relaxed));
            let svc = &svc;
            async move { drive(svc, request(Some(&key))).await }
        });
    });

    let svc = layered(&bounded());
    rt.block_on(drive(&svc, request(Some("replayed-key"))));
    group.bench_function("replay", |b| {
        b.to_async(&rt)
            .iter(|| drive(&svc, request(Some("replayed-key"))));
    });

    // Hold one key with a request that never finishes, then hit it.
    let backend = bounded();
    let svc = layered(&backend);
    let mut hung = request(Some("held-key"));
    hung.headers_mut()
        .insert("x-hang", HeaderValue::from_static("1"));
    let held = rt.spawn(svc.clone().oneshot(hung));
    rt.block_on(async {
        while backend.in_flight_count() == 0 {
            tokio::task::yield_now().await;
        }
    });
    group.bench_function("conflict_409", |b| {
        b.to_async(&rt)
            .iter(|| drive(&svc, request(Some("held-key"))));
    });
    held.abort();
    group.finish();
}

fn parts(c: &mut Criterion) {
    let mut group = c.benchmark_group("parts");
    let value = HeaderValue::from_static("\"8e03978e-40d5-43e8-bc93-6894a57f9324\"");
    group.bench_function("parse_key", |b| {
        b.iter(|| IdempotencyKey::parse(black_box(&value)));
    });

    let (req_parts, ()) = Request::post("/payments?expand=customer")
        .header("authorization", "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc")
        .body(())
        .unwrap()
        .into_parts();
    for size in [0usize, 1024, 64 * 1024] {
        let body = vec![b'x'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("fingerprint", size), &body, |b, body| {
            b.iter(|| Fingerprint::compute(black_box(&req_parts), black_box(body), true, &[]));
        });
    }
    group.finish();

    let mut group = c.benchmark_group("codec");
    let codec = RecordCodec::new();
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let cases = [
        (
            "small_json",
            Bytes::from_static(br#"{"id":"pay_000001","status":"succeeded"}"#),
        ),
        (
            "64k_compressible",
            Bytes::from(PAYLOAD.repeat(64 * 1024 / PAYLOAD.len())),
        ),
        (
            "64k_random",
            Bytes::from(
                (0..64 * 1024u32)
                    .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2])
                    .collect::<Vec<u8>>(),
            ),
        ),
    ];
    for (name, body) in cases {
        let record = Record::new(
            StatusCode::CREATED,
            headers.clone(),
            body,
            Fingerprint::from_bytes([7; 32]),
        );
        let encoded = codec.encode(&record).unwrap();
        group.bench_function(BenchmarkId::new("encode", name), |b| {
            b.iter(|| codec.encode(black_box(&record)).unwrap());
        });
        group.bench_function(BenchmarkId::new("decode", name), |b| {
            b.iter(|| codec.decode(black_box(&encoded)).unwrap());
        });
    }
    group.finish();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("memory_backend");
    let backend = bounded();
    let record = Record::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from_static(b"{}"),
        Fingerprint::from_bytes([1; 32]),
    );
    let counter = AtomicU64::new(0);
    group.bench_function("begin_complete", |b| {
        b.to_async(&rt).iter(|| {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&counter.fetch_add(1, Ordering::Relaxed).to_le_bytes());
            key[31] = key[0];
            let (backend, record) = (&backend, record.clone());
            async move {
                let key = StorageKey::from_bytes(key);
                let fp = Fingerprint::from_bytes([1; 32]);
                match backend
                    .begin(&key, &fp, Duration::from_secs(30))
                    .await
                    .unwrap()
                {
                    tower_idempotency::Begin::Acquired(lock) => backend
                        .complete(lock, record, Duration::from_mins(1))
                        .await
                        .unwrap(),
                    _ => unreachable!("fresh key"),
                }
            }
        });
    });
    group.finish();
}

criterion_group!(benches, layer, parts);
criterion_main!(benches);
