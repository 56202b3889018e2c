//! A rolling deploy against the example servers: `SIGTERM` to one instance
//! while payments run on it, connected and detached.
#![allow(dead_code)]

use std::time::Duration;

use http::StatusCode;
use tokio::io::AsyncWriteExt;

use crate::common::{request, spawn_example};

const BODY: &str = r#"{"amount":5,"currency":"EUR"}"#;

fn unique(what: &str) -> String {
    format!(
        "{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn headers(key: &str) -> [(&str, &str); 2] {
    [
        ("idempotency-key", key),
        ("content-type", "application/json"),
    ]
}

/// Sends `SIGTERM` to a child process.
pub fn terminate(child: &tokio::process::Child) {
    let pid = child.id().expect("the process is running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits (bounded) for the example to exit by itself; returns whether it
/// exited successfully (not killed by the signal).
pub async fn exits_by_itself(child: &mut tokio::process::Child, within: Duration) -> bool {
    let status = tokio::time::timeout(within, child.wait())
        .await
        .expect("the example exits by itself after SIGTERM")
        .unwrap();
    status.success()
}

async fn handler_runs(addr: std::net::SocketAddr) -> String {
    let stats = request(addr, "GET", "/stats", &[], "").await;
    String::from_utf8_lossy(&stats.body).into_owned()
}

/// Waits until the example at `addr` reports `runs` handler runs.
async fn until_runs(addr: std::net::SocketAddr, runs: u32) {
    let want = format!(r#"{{"handler_runs":{runs}}}"#);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while handler_runs(addr).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the handlers never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a keyed payment and leaves it running: the socket is kept until
/// the returned stream is dropped.
async fn start_payment(addr: std::net::SocketAddr, key: &str) -> tokio::net::TcpStream {
    let raw = format!(
        "POST /payments HTTP/1.1\r\nhost: {addr}\r\nidempotency-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(raw.as_bytes()).await.unwrap();
    socket
}

/// Two instances of `example` on one store (`env`). Instance A runs two slow
/// payments — one whose client stays connected, one whose client left — and
/// gets `SIGTERM` while both run. The connected client gets its `201`, A
/// exits by itself, and retries of both keys on instance B replay the
/// payments A made: B never runs the handler.
pub async fn sigterm_mid_payment_loses_nothing(example: &str, env: &[(&str, &str)]) {
    let mut env_a = env.to_vec();
    env_a.push(("PAYMENT_DELAY_MS", "1500"));
    let (mut a, addr_a) = spawn_example(example, &env_a).await;
    let (_b, addr_b) = spawn_example(example, env).await;
    let (connected_key, detached_key) = (unique("deploy-connected"), unique("deploy-detached"));

    let connected = tokio::spawn({
        let key = connected_key.clone();
        async move { request(addr_a, "POST", "/payments", &headers(&key), BODY).await }
    });
    let detached = start_payment(addr_a, &detached_key).await;
    until_runs(addr_a, 2).await;
    drop(detached); // its client gives up
    terminate(&a);

    let answer = connected
        .await
        .expect("the connected client gets an answer, not a reset");
    assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
    assert!(
        exits_by_itself(&mut a, Duration::from_secs(20)).await,
        "exit status 0 after a graceful shutdown"
    );

    let retry = request(addr_b, "POST", "/payments", &headers(&connected_key), BODY).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.body, answer.body, "the same payment");
    let retry = request(addr_b, "POST", "/payments", &headers(&detached_key), BODY).await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "the detached payment was stored before A exited: {:?}",
        retry.body
    );
    assert!(retry.replayed());
    assert_eq!(
        handler_runs(addr_b).await,
        r#"{"handler_runs":0}"#,
        "B never ran a payment"
    );
}

/// A payment slower than the shutdown's grace period: it is cut off, an
/// "interrupted" answer is stored, and its retry on instance B gets that
/// answer instead of running the payment a second time.
pub async fn a_payment_past_the_grace_period_is_not_run_again(example: &str, env: &[(&str, &str)]) {
    let mut env_a = env.to_vec();
    env_a.extend([("PAYMENT_DELAY_MS", "60000"), ("SHUTDOWN_GRACE_SECS", "1")]);
    let (mut a, addr_a) = spawn_example(example, &env_a).await;
    let (_b, addr_b) = spawn_example(example, env).await;
    let key = unique("deploy-cut");
    let socket = start_payment(addr_a, &key).await;
    until_runs(addr_a, 1).await;
    drop(socket);
    terminate(&a);
    assert!(exits_by_itself(&mut a, Duration::from_secs(20)).await);

    let retry = request(addr_b, "POST", "/payments", &headers(&key), BODY).await;
    assert_eq!(
        retry.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{:?}",
        retry.body
    );
    assert_eq!(retry.problem_type(), "interrupted");
    assert!(retry.replayed());
    assert_eq!(handler_runs(addr_b).await, r#"{"handler_runs":0}"#);
}

/// Starts a built example with its standard error captured: the lines it
/// logs. Returns the child, its address and the log lines as they come.
pub async fn spawn_example_logging(
    name: &str,
    env: &[(&str, &str)],
) -> (
    tokio::process::Child,
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use tokio::io::AsyncBufReadExt;

    let (mut child, addr) =
        crate::common::spawn_example_with(name, env, std::process::Stdio::piped()).await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            let _ = tx.send(line);
        }
    });
    (child, addr, rx)
}

/// Waits (bounded) for a logged line containing `needle`.
pub async fn logged(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> String {
    let wait = async {
        while let Some(line) = lines.recv().await {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the example exited without logging {needle:?}");
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("nothing logged with {needle:?}"))
}

/// A zero grace period with many payments whose clients left: every one is
/// cut off at once, and each key is still settled before the process
/// exits — the retry on instance B gets the stored "interrupted" answer,
/// never a run of its own, never a `409` for the lock's TTL.
///
/// Instance A reaches the store through `env_a` (a slow path: its
/// settlements take a while), instance B through `env`.
pub async fn a_zero_grace_period_settles_every_payment(
    example: &str,
    env_a: &[(&str, &str)],
    env: &[(&str, &str)],
) {
    let mut env_a = env_a.to_vec();
    env_a.extend([("PAYMENT_DELAY_MS", "60000"), ("SHUTDOWN_GRACE_SECS", "0")]);
    let (mut a, addr_a) = spawn_example(example, &env_a).await;
    let (_b, addr_b) = spawn_example(example, env).await;
    let keys: Vec<String> = (0..20)
        .map(|i| unique(&format!("deploy-zero-{i}")))
        .collect();
    let mut sockets = Vec::new();
    for key in &keys {
        sockets.push(start_payment(addr_a, key).await);
    }
    until_runs(addr_a, 20).await;
    drop(sockets); // every client gives up
    // The begins are answered: the settlements follow them on the path.
    tokio::time::sleep(Duration::from_secs(2)).await;
    terminate(&a);
    assert!(exits_by_itself(&mut a, Duration::from_secs(20)).await);
    for key in &keys {
        let retry = request(addr_b, "POST", "/payments", &headers(key), BODY).await;
        assert_eq!(
            retry.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{key}: {:?}",
            retry.body
        );
        assert_eq!(retry.problem_type(), "interrupted");
    }
    assert_eq!(handler_runs(addr_b).await, r#"{"handler_runs":0}"#);
}

/// A client that sent half a request when the signal came does not keep
/// the example up: it exits by itself once the layer's waits are over.
pub async fn a_slow_client_does_not_keep_the_example_up(example: &str, env: &[(&str, &str)]) {
    let mut env = env.to_vec();
    env.push(("SHUTDOWN_GRACE_SECS", "1"));
    let (mut server, addr) = spawn_example(example, &env).await;
    let key = unique("slow-client");
    let head = format!(
        "POST /payments HTTP/1.1\r\nhost: {addr}\r\nidempotency-key: {key}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"amount\""
    );
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(head.as_bytes()).await.unwrap();
    // The server has read the head before the signal comes.
    let _ = request(addr, "GET", "/stats", &[], "").await;
    terminate(&server);
    assert!(
        exits_by_itself(&mut server, Duration::from_secs(30)).await,
        "exit status 0"
    );
    drop(socket);
}

/// A signal right after start-up is a graceful exit (status 0), not a kill.
pub async fn a_signal_right_after_start_up_exits_gracefully(example: &str, env: &[(&str, &str)]) {
    for _ in 0..3 {
        let (mut server, _addr) = spawn_example(example, env).await;
        terminate(&server);
        assert!(
            exits_by_itself(&mut server, Duration::from_secs(30)).await,
            "killed by the signal instead of shutting down"
        );
    }
}
