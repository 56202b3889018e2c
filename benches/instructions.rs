//! Instructions per request through the layer, for counting under
//! callgrind: a number that the machine's load cannot move (runs differ by a
//! few hundred instructions, the hash maps being randomly keyed).
//!
//! `scripts/instructions.sh [revision]` runs it (and, given a revision, the
//! same program built against that revision of the crate) under
//! `valgrind --tool=callgrind` twice per mode, with 0 and with N requests,
//! and prints the difference divided by N.
//!
//! Usage of the binary itself: `instructions <mode> <requests>`, modes
//! `fresh` (a new key per request: lock, handler, store), `replay` (one
//! stored key), `nokey` (no `Idempotency-Key`: pass-through) and `none` (the
//! handler without the layer). The requests are the criterion benchmark's
//! (`benches/layer.rs`): a 61-byte JSON body, `Content-Type` and
//! `Authorization`; the handler answers 41 bytes of JSON.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryBackend};

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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let plain = tower::service_fn(handler::<Full<Bytes>>);
        let guarded = IdempotencyLayer::new(MemoryBackend::new()).layer(tower::service_fn(handler));
        // The same warm-up for every N: the stored key, and a few requests
        // of each kind, so that N = 0 pays every one-time cost too.
        drive(&guarded, request(Some("\"replayed\""))).await;
        for i in 0..16 {
            drive(&guarded, request(Some(&format!("\"warm-{i}\"")))).await;
            drive(&guarded, request(Some("\"replayed\""))).await;
            drive(&guarded, request(None)).await;
            drive(&plain, request(None)).await;
        }
        for i in 0..n {
            match mode.as_str() {
                "fresh" => drive(&guarded, request(Some(&format!("\"fresh-{i}\"")))).await,
                "replay" => drive(&guarded, request(Some("\"replayed\""))).await,
                "nokey" => drive(&guarded, request(None)).await,
                "none" => drive(&plain, request(None)).await,
                other => panic!("unknown mode {other}"),
            }
        }
    });
}
