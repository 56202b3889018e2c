//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_idempotency::IdempotencyBody;

pub type Req = Request<Full<Bytes>>;
pub type InnerReq = Request<IdempotencyBody<Full<Bytes>>>;

/// Counts handler executions.
#[derive(Clone, Default)]
pub struct Runs(Arc<AtomicUsize>);

impl Runs {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// A handler that counts its runs and answers `201` with the run number,
/// the echoed body and a `Set-Cookie`.
pub fn counting(
    runs: Runs,
) -> impl Service<InnerReq, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(move |req: InnerReq| {
        let runs = runs.clone();
        async move {
            let n = runs.bump();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let res = Response::builder()
                .status(StatusCode::CREATED)
                .header("content-type", "application/json")
                .header("set-cookie", format!("run={n}"))
                .header("x-run", n.to_string())
                .body(Full::new(Bytes::from(format!(
                    "{{\"run\":{n},\"echo\":{:?}}}",
                    String::from_utf8_lossy(&body)
                ))))
                .unwrap();
            Ok::<_, Infallible>(res)
        }
    })
}

/// A `POST` with an idempotency key header value (raw, as sent).
pub fn post(path: &str, key: Option<&str>, body: &str) -> Req {
    let mut b = Request::post(path).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

pub fn with_header(mut req: Req, name: &'static str, value: &str) -> Req {
    req.headers_mut().append(name, value.parse().unwrap());
    req
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
    pub fn problem_type(&self) -> String {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "not a problem document: {:?}",
            self.body
        );
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(v["status"], self.status.as_u16());
        v["type"]
            .as_str()
            .unwrap()
            .rsplit('#')
            .next()
            .unwrap()
            .to_owned()
    }
}

/// Sends one request through a service and reads the whole answer.
pub async fn send<S, B>(svc: &mut S, req: Req) -> Answer
where
    S: Service<Req, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}
