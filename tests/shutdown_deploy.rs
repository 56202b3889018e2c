//! A rolling deploy on Redis and PostgreSQL: `SIGTERM` to one of two example
//! instances mid-payment loses nothing and runs nothing twice. Each example
//! runs as its own process against the shared servers. And what the
//! operator of an example sees: its log says why requests are refused.

mod common;
mod deploy_support;
mod postgres_support;
mod redis_support;

use deploy_support::{
    a_payment_past_the_grace_period_is_not_run_again, sigterm_mid_payment_loses_nothing,
};

fn redis_env() -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", redis_support::redis_url()),
        ("REDIS_PREFIX", redis_support::unique_prefix()),
    ]
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn redis_sigterm_mid_payment_loses_nothing() {
    let env = redis_env();
    sigterm_mid_payment_loses_nothing("payments_redis", &borrowed(&env)).await;
}

#[tokio::test]
async fn redis_a_payment_past_the_grace_period_is_not_run_again() {
    let env = redis_env();
    a_payment_past_the_grace_period_is_not_run_again("payments_redis", &borrowed(&env)).await;
}

#[tokio::test]
async fn postgres_sigterm_mid_payment_loses_nothing() {
    let url = postgres_support::database_url();
    sigterm_mid_payment_loses_nothing("payments_postgres", &[("DATABASE_URL", &url)]).await;
}

#[tokio::test]
async fn postgres_transaction_mode_sigterm_mid_payment_loses_nothing() {
    let url = postgres_support::database_url();
    sigterm_mid_payment_loses_nothing(
        "payments_postgres",
        &[("DATABASE_URL", &url), ("PG_MODE", "transaction")],
    )
    .await;
}

#[tokio::test]
async fn postgres_a_payment_past_the_grace_period_is_not_run_again() {
    let url = postgres_support::database_url();
    a_payment_past_the_grace_period_is_not_run_again(
        "payments_postgres",
        &[("DATABASE_URL", &url)],
    )
    .await;
}

/// The operator sees why requests fail: an example server on a Redis that
/// may evict answers `503`, and logs the refusal (at `ERROR`, through
/// `tracing-subscriber`) where the operator looks.
#[tokio::test]
async fn the_example_logs_why_an_evicting_redis_is_refused() {
    let server = redis_support::RedisProcess::start(&["--maxmemory-policy", "allkeys-lru"]);
    let url = server.url();
    let (_example, addr, mut lines) = deploy_support::spawn_example_logging(
        "payments_redis",
        &[("REDIS_URL", &url), ("RUST_LOG", "info")],
    )
    .await;
    let answer = common::request(
        addr,
        "POST",
        "/payments",
        &[
            ("idempotency-key", "\"evicting\""),
            ("content-type", "application/json"),
        ],
        r#"{"amount":5,"currency":"EUR"}"#,
    )
    .await;
    assert_eq!(answer.status, http::StatusCode::SERVICE_UNAVAILABLE);
    let line = deploy_support::logged(&mut lines, "maxmemory-policy allkeys-lru").await;
    assert!(line.contains("ERROR"), "{line}");
}

/// A proxy that delays every chunk by `ms` towards `port` on this host: a
/// slow path to the store, so that settling takes a while. (Each
/// connection's chunks wait one after another: Redis multiplexes one
/// connection, so its path is slowed less.)
async fn slow_path(port: u16, ms: u64) -> common::fault_proxy::FaultProxy {
    let proxy = common::fault_proxy::FaultProxy::start(([127, 0, 0, 1], port).into()).await;
    proxy.set(common::fault_proxy::Fault::Latency(
        std::time::Duration::from_millis(ms),
    ));
    proxy
}

#[tokio::test]
async fn redis_a_zero_grace_period_settles_every_payment() {
    let env = redis_env();
    let proxy = slow_path(6379, 40).await;
    let mut env_a = env.clone();
    env_a[0].1 = format!("redis://127.0.0.1:{}", proxy.port());
    deploy_support::a_zero_grace_period_settles_every_payment(
        "payments_redis",
        &borrowed(&env_a),
        &borrowed(&env),
    )
    .await;
}

#[tokio::test]
async fn postgres_a_zero_grace_period_settles_every_payment() {
    let url = postgres_support::database_url();
    let proxy = slow_path(5432, 300).await;
    let slow = format!("postgres://postgres@127.0.0.1:{}/test", proxy.port());
    deploy_support::a_zero_grace_period_settles_every_payment(
        "payments_postgres",
        &[("DATABASE_URL", &slow)],
        &[("DATABASE_URL", &url)],
    )
    .await;
}

#[tokio::test]
async fn a_slow_client_does_not_keep_the_example_up() {
    deploy_support::a_slow_client_does_not_keep_the_example_up("payments", &[]).await;
}

#[tokio::test]
async fn a_signal_right_after_start_up_exits_gracefully() {
    deploy_support::a_signal_right_after_start_up_exits_gracefully("payments", &[]).await;
    let env = redis_env();
    deploy_support::a_signal_right_after_start_up_exits_gracefully(
        "payments_redis",
        &borrowed(&env),
    )
    .await;
}
