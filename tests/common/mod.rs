//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod fault_proxy;
pub mod faults;
#[path = "../sqlite_files/mod.rs"]
pub mod sqlite_files;
pub mod stepped;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_idempotency::{
    Backend, BackendError, BackendErrorKind, Begin, Completion, Fingerprint, IdempotencyBody,
    MemoryBackend, MemoryLock, Record, StorageKey,
};

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

/// An `Idempotency-Key` header value (a quoted string) no other test or run
/// uses: records outlive a run on the shared servers.
pub fn unique_key(tag: &str) -> String {
    format!("\"{}\"", faults::tag(tag))
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
    /// The trailers the body ended with, if any.
    pub trailers: Option<HeaderMap>,
}

impl Answer {
    /// Reads a whole response.
    pub async fn read<B>(res: Response<B>) -> Self
    where
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let (parts, body) = res.into_parts();
        let collected = body.collect().await.unwrap();
        Self {
            status: parts.status,
            headers: parts.headers,
            trailers: collected.trailers().cloned(),
            body: collected.to_bytes(),
        }
    }

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
    Answer::read(res).await
}

/// Sends `req()` through clones of `svc` until the answer is neither `409`
/// (in flight) nor `503` (the backend not back yet), for at most `within`.
pub async fn until_settled<S, B>(
    svc: &S,
    req: impl Fn() -> Req,
    within: std::time::Duration,
) -> Answer
where
    S: Service<Req, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let answer = send(&mut svc.clone(), req()).await;
        if answer.status != StatusCode::CONFLICT && answer.status != StatusCode::SERVICE_UNAVAILABLE
        {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {} after {within:?}",
            answer.status
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A hundred requests with one key at once, spread over `instances` (each a
/// layer over [`slow_payment`]): each answer is the one payment or a `409`.
pub async fn hundred_at_once<S, B>(instances: &[S], key: &str)
where
    S: Service<Req, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Send,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let mut svc = instances[i % instances.len()].clone();
        let key = key.to_owned();
        tasks.spawn(async move { send(&mut svc, post("/payments", Some(&key), "{}")).await });
    }
    for a in tasks.join_all().await {
        match a.status {
            StatusCode::CREATED => assert_eq!(a.body, "payment 1"),
            StatusCode::CONFLICT => assert_eq!(a.problem_type(), "request-in-flight"),
            other => panic!("unexpected {other}: {:?}", a.body),
        }
    }
}

/// One request on a fresh HTTP/1.1 connection to `addr`.
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = sender
        .send_request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    Answer::read(res).await
}

/// Starts a built example (`cargo test` builds them) on a free port and
/// returns it with the address it printed.
pub async fn spawn_example(
    name: &str,
    env: &[(&str, &str)],
) -> (tokio::process::Child, std::net::SocketAddr) {
    spawn_example_with(name, env, std::process::Stdio::inherit()).await
}

/// [`spawn_example`] with the example's standard error going to `stderr`.
pub async fn spawn_example_with(
    name: &str,
    env: &[(&str, &str)],
    stderr: std::process::Stdio,
) -> (tokio::process::Child, std::net::SocketAddr) {
    use tokio::io::AsyncBufReadExt;

    // target/<profile>/deps/<test>-<hash> → target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: the full `cargo test --all-features` builds the examples (or `cargo build --examples --all-features`)",
        bin.display()
    );
    let mut child = tokio::process::Command::new(&bin)
        .env("ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .expect("the example printed no address")
        .unwrap()
        .unwrap();
    let addr: std::net::SocketAddr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    assert_ne!(addr.port(), 0);
    (child, addr)
}

/// The handler type the shared handlers below return.
pub trait Handler:
    Service<
        InnerReq,
        Response = Response<Full<Bytes>>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static
{
}

impl<S> Handler for S where
    S: Service<
            InnerReq,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
            Future: Send,
        > + Clone
        + Send
        + 'static
{
}

/// Answers `201` with `payment <n>` after `delay`, long enough for
/// concurrent duplicates to overlap it.
pub fn slow_payment(runs: Runs, delay: std::time::Duration) -> impl Handler {
    tower::service_fn(move |_req: InnerReq| {
        let n = runs.bump();
        async move {
            tokio::time::sleep(delay).await;
            let mut res = Response::new(Full::new(Bytes::from(format!("payment {n}"))));
            *res.status_mut() = StatusCode::CREATED;
            Ok(res)
        }
    })
}

/// The first call sleeps `first_call`, later ones answer at once; each
/// answers `run <n>`.
pub fn slow_first(runs: Runs, first_call: std::time::Duration) -> impl Handler {
    tower::service_fn(move |_req: InnerReq| {
        let n = runs.bump();
        async move {
            if n == 1 {
                tokio::time::sleep(first_call).await;
            }
            Ok(Response::new(Full::new(Bytes::from(format!("run {n}")))))
        }
    })
}

/// The two ends of a [`gated`] handler's first call.
pub struct Gate {
    /// Fires when the first call has started.
    pub started: tokio::sync::oneshot::Receiver<()>,
    /// Lets the first call finish.
    pub finish: tokio::sync::oneshot::Sender<()>,
}

/// A handler whose first call signals that it started and then waits to be
/// let go; every call answers `run <n>`.
pub fn gated(runs: Runs) -> (impl Handler, Gate) {
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (finish, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let gates = Arc::new(std::sync::Mutex::new(Some((started_tx, finish_rx))));
    let handler = tower::service_fn(move |_req: InnerReq| {
        let n = runs.bump();
        let gates = gates.lock().unwrap().take();
        async move {
            if let Some((started, finish)) = gates {
                started.send(()).unwrap();
                finish.await.unwrap();
            }
            Ok(Response::new(Full::new(Bytes::from(format!("run {n}")))))
        }
    });
    (handler, Gate { started, finish })
}

/// Two processes of a payments example on one shared store (`env` names
/// it): a retry sent to the other instance is replayed with the same
/// payment id, and that instance never runs the handler.
pub async fn example_instances_share_one_record(example: &str, env: (&str, &str), key: &str) {
    let (_a, addr_a) = spawn_example(example, &[env]).await;
    let (_b, addr_b) = spawn_example(example, &[env]).await;
    let headers = [
        ("idempotency-key", key),
        ("content-type", "application/json"),
    ];
    let body = r#"{"amount":5,"currency":"EUR"}"#;
    let first = request(addr_a, "POST", "/payments", &headers, body).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let second = request(addr_b, "POST", "/payments", &headers, body).await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert!(second.replayed());
    assert_eq!(
        second.body, first.body,
        "same payment id from the other instance"
    );
    let stats = request(addr_b, "GET", "/stats", &[], "").await;
    assert_eq!(
        stats.body, r#"{"handler_runs":0}"#,
        "instance B never ran the handler"
    );
}

/// A memory backend whose operations can be made to fail.
#[derive(Clone, Default)]
pub struct Flaky {
    pub inner: MemoryBackend,
    pub fail_begin: Arc<AtomicBool>,
    /// The error `begin` answers with instead (a poisoned record, say).
    pub begin_error: Arc<std::sync::Mutex<Option<BackendErrorKind>>>,
    pub fail_complete: Arc<AtomicBool>,
    pub fail_extend: Arc<AtomicBool>,
    /// `extend` keeps the lock but reports it lost.
    pub report_lost: Arc<AtomicBool>,
    /// How many times `complete` was called.
    pub completes: Arc<AtomicUsize>,
}

pub fn outage() -> BackendError {
    BackendError::new(BackendErrorKind::Unavailable, "connection refused")
}

impl Backend for Flaky {
    type Lock = MemoryLock;

    async fn begin(
        &self,
        key: &StorageKey,
        fp: &Fingerprint,
        ttl: std::time::Duration,
    ) -> Result<Begin<MemoryLock>, BackendError> {
        if self.fail_begin.load(Ordering::SeqCst) {
            return Err(outage());
        }
        if let Some(kind) = *self.begin_error.lock().unwrap() {
            return Err(BackendError::new(kind, "injected"));
        }
        self.inner.begin(key, fp, ttl).await
    }

    async fn complete(
        &self,
        lock: MemoryLock,
        record: Record,
        ttl: std::time::Duration,
    ) -> Result<Completion, BackendError> {
        self.completes.fetch_add(1, Ordering::SeqCst);
        if self.fail_complete.load(Ordering::SeqCst) {
            self.inner.release(lock).await?;
            return Err(outage());
        }
        self.inner.complete(lock, record, ttl).await
    }

    async fn release(&self, lock: MemoryLock) -> Result<(), BackendError> {
        self.inner.release(lock).await
    }

    async fn extend(
        &self,
        lock: &MemoryLock,
        ttl: std::time::Duration,
    ) -> Result<bool, BackendError> {
        if self.fail_extend.load(Ordering::SeqCst) {
            return Err(outage());
        }
        let kept = self.inner.extend(lock, ttl).await?;
        Ok(kept && !self.report_lost.load(Ordering::SeqCst))
    }
}

/// The black-box check of a client that gives up: a keyed payment to a slow
/// example server, the socket closed while the handler runs, then the retry.
/// The handler ran once, the first payment is charged once, and the retry
/// gets that payment back (`409` while it is still running).
pub async fn example_survives_a_client_that_gives_up(example: &str, env: &[(&str, &str)]) {
    use tokio::io::AsyncWriteExt;

    let mut env = env.to_vec();
    env.push(("PAYMENT_DELAY_MS", "1500"));
    let (_server, addr) = spawn_example(example, &env).await;
    let key = format!(
        "gives-up-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let body = r#"{"amount":5,"currency":"EUR"}"#;
    let raw = format!(
        "POST /payments HTTP/1.1\r\nhost: {addr}\r\nidempotency-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(raw.as_bytes()).await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while request(addr, "GET", "/stats", &[], "").await.body != r#"{"handler_runs":1}"# {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the handler never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(socket); // the client gives up mid-handler
    let headers = [
        ("idempotency-key", key.as_str()),
        ("content-type", "application/json"),
    ];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let retry = loop {
        let answer = request(addr, "POST", "/payments", &headers, body).await;
        if answer.status != StatusCode::CONFLICT {
            break answer;
        }
        assert!(tokio::time::Instant::now() < deadline, "still in flight");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(
        retry.replayed(),
        "the retry replays the payment the first request made"
    );
    let stats = request(addr, "GET", "/stats", &[], "").await;
    assert_eq!(stats.body, r#"{"handler_runs":1}"#, "charged once");
}

/// A handler that panics on its first call, under a 60 s lock TTL: the
/// layer abandons the lock to the backend, which releases it from a task of
/// its own, so a retry runs the handler again within seconds — not a `409`
/// until the lock expires.
pub async fn a_panicked_handler_frees_the_key<B: Backend>(backend: B, key: &str) {
    use std::time::{Duration, Instant};
    use tower::Layer;

    let runs = Runs::default();
    let handler = {
        let runs = runs.clone();
        tower::service_fn(move |_req: InnerReq| {
            let n = runs.bump();
            async move {
                assert!(n > 1, "the first call panics");
                let mut res = Response::new(Full::new(Bytes::from(format!("run {n}"))));
                *res.status_mut() = StatusCode::CREATED;
                Ok::<_, Infallible>(res)
            }
        })
    };
    let svc = tower_idempotency::IdempotencyLayer::new(backend)
        .lock_ttl(Duration::from_mins(1))
        .layer(handler);
    let first = tokio::spawn(svc.clone().oneshot(post("/p", Some(key), "x"))).await;
    assert!(first.unwrap_err().is_panic());
    let deadline = Instant::now() + Duration::from_secs(5);
    let retry = loop {
        let answer = send(&mut svc.clone(), post("/p", Some(key), "x")).await;
        if answer.status != StatusCode::CONFLICT {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "the key stayed locked: the panicked request's lock was left to its 60 s TTL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.body);
    assert_eq!(retry.body, "run 2");
    assert_eq!(runs.get(), 2);
}

/// Each [`ServerErrors`](tower_idempotency::ServerErrors) policy on
/// `backend`: a handler answers `502`, then its retry — runs again
/// (`Retry`), replays the `502` (`Replay`) or gets the outcome-unknown
/// problem with status `502` (`Mark`).
pub async fn server_error_policies<B: Backend>(backend: B, tag: &str) {
    use tower::Layer;
    use tower_idempotency::{IdempotencyLayer, ServerErrors};

    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for (policy, name) in [
        (ServerErrors::Retry, "retry"),
        (ServerErrors::Replay, "replay"),
        (ServerErrors::Mark, "mark"),
    ] {
        let runs = Runs::default();
        let handler = tower::service_fn({
            let runs = runs.clone();
            move |_req: InnerReq| {
                let n = runs.bump();
                async move {
                    let mut res =
                        Response::new(Full::new(Bytes::from(format!("upstream timed out ({n})"))));
                    *res.status_mut() = StatusCode::BAD_GATEWAY;
                    Ok::<_, Infallible>(res)
                }
            }
        });
        let mut svc = IdempotencyLayer::new(backend.clone())
            .server_errors(policy)
            .layer(handler);
        let key = format!("{tag}-5xx-{name}-{nonce}");
        let first = send(&mut svc, post("/pay", Some(&key), "{}")).await;
        assert_eq!(first.status, StatusCode::BAD_GATEWAY, "{tag} {name}");
        assert_eq!(
            first.body, "upstream timed out (1)",
            "the client gets the handler's answer"
        );
        let retry = send(&mut svc, post("/pay", Some(&key), "{}")).await;
        assert_eq!(retry.status, StatusCode::BAD_GATEWAY, "{tag} {name}");
        match policy {
            ServerErrors::Retry => {
                assert!(!retry.replayed(), "{tag}: runs again");
                assert_eq!(runs.get(), 2, "{tag} {name}");
            }
            ServerErrors::Replay => {
                assert!(retry.replayed(), "{tag}: replayed");
                assert_eq!(retry.body, first.body, "{tag}: as it was");
                assert_eq!(runs.get(), 1, "{tag} {name}");
            }
            _ => {
                assert!(retry.replayed(), "{tag}: marked");
                assert_eq!(retry.problem_type(), "outcome-unknown", "{tag}");
                assert_eq!(runs.get(), 1, "{tag} {name}");
            }
        }
    }
}

/// A file of its own for one test, removed (with its WAL files) on drop.
pub struct TempDb(std::path::PathBuf);

impl TempDb {
    pub fn new(tag: &str) -> Self {
        Self(std::env::temp_dir().join(format!("tower-idempotency-{}.sqlite3", faults::tag(tag))))
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        sqlite_files::remove(&self.0);
    }
}
