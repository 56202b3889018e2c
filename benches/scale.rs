//! Memory scale: 1 000 000 distinct keys through the layer on a bounded
//! memory backend. Reports the latency of fresh requests and replays with
//! 1 000 and with 1 000 000 records stored, that the store stays within its
//! bound when more keys arrive, and the process' peak RSS.
//!
//! `cargo bench --bench scale` (figures in BENCHMARKS.md).

// Statistics over counts far below 2^52.
#![allow(clippy::cast_precision_loss)]

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyBody, IdempotencyLayer, MemoryBackend};

const BOUND: u64 = 1_000_000;
const SAMPLE: usize = 20_000;

async fn handler(
    _req: Request<IdempotencyBody<Full<Bytes>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::new(Bytes::from_static(
        br#"{"id":"pay_000001","status":"succeeded"}"#,
    )));
    *res.status_mut() = StatusCode::CREATED;
    Ok(res)
}

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/payments")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(
            br#"{"amount":500,"currency":"EUR"}"#,
        )))
        .expect("request")
}

async fn call<S>(svc: &mut S, key: &str) -> Duration
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<IdempotencyBody<Full<Bytes>>>,
            Error = Infallible,
        >,
{
    let started = Instant::now();
    let res = svc
        .ready()
        .await
        .expect("ready")
        .call(request(key))
        .await
        .expect("response");
    assert!(res.status().is_success());
    res.into_body().collect().await.expect("body");
    started.elapsed()
}

/// Mean and 99th percentile, in microseconds.
fn stats(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort_unstable();
    let mean = samples.iter().sum::<Duration>().as_secs_f64() * 1e6 / samples.len() as f64;
    let p99 = samples[samples.len() * 99 / 100].as_secs_f64() * 1e6;
    (mean, p99)
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Fresh requests on new keys, then replays of keys stored just before.
async fn measure<S>(svc: &mut S, label: &str, next: &mut u64) -> ((f64, f64), (f64, f64))
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<IdempotencyBody<Full<Bytes>>>,
            Error = Infallible,
        >,
{
    let first = *next;
    let mut fresh = Vec::with_capacity(SAMPLE);
    for _ in 0..SAMPLE {
        fresh.push(call(svc, &format!("key-{next}")).await);
        *next += 1;
    }
    let mut replay = Vec::with_capacity(SAMPLE);
    for i in 0..SAMPLE as u64 {
        replay.push(call(svc, &format!("key-{}", first + i)).await);
    }
    let (fresh, replay) = (stats(fresh), stats(replay));
    println!(
        "{label}: fresh mean {:.2} µs p99 {:.2} µs | replay mean {:.2} µs p99 {:.2} µs",
        fresh.0, fresh.1, replay.0, replay.1
    );
    (fresh, replay)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // No minimum retention: this measures eviction at the bound (with the
    // default, new keys past the bound are refused instead).
    let backend = MemoryBackend::builder()
        .max_entries(BOUND)
        .min_retention(std::time::Duration::ZERO)
        .build();
    let mut svc = IdempotencyLayer::new(backend.clone()).layer(tower::service_fn(handler));
    let mut next = 0u64;

    // Warm the code paths, then fill to ~1 000 records and measure.
    for _ in 0..1_000 {
        call(&mut svc, &format!("key-{next}")).await;
        next += 1;
    }
    let small = measure(&mut svc, "~1 000 stored (+ sample)", &mut next).await;

    // Fill to the bound and measure again.
    let fill_started = Instant::now();
    while next < BOUND {
        call(&mut svc, &format!("key-{next}")).await;
        next += 1;
    }
    println!(
        "filled to {next} keys in {:.1} s; stored: {}",
        fill_started.elapsed().as_secs_f64(),
        backend.stored_count()
    );
    let large = measure(&mut svc, "~1 000 000 stored", &mut next).await;

    // 200 000 keys beyond the bound: the store stays within it.
    for _ in 0..200_000 {
        call(&mut svc, &format!("key-{next}")).await;
        next += 1;
    }
    let stored = backend.stored_count();
    println!("after {next} distinct keys: {stored} stored (bound {BOUND})");
    assert!(stored <= BOUND, "the store grew past its bound: {stored}");

    println!(
        "latency at 1 M vs 1 K stored: fresh mean {:.2}x, p99 {:.2}x; replay mean {:.2}x, p99 {:.2}x",
        large.0.0 / small.0.0,
        large.0.1 / small.0.1,
        large.1.0 / small.1.0,
        large.1.1 / small.1.1
    );
    match peak_rss_mib() {
        Some(mib) => println!(
            "peak RSS: {mib:.0} MiB ({:.0} bytes per stored record)",
            mib * 1024.0 * 1024.0 / stored as f64
        ),
        None => println!("peak RSS: unavailable"),
    }
}
