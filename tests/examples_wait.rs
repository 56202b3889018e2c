//! The payments examples read `IDEMPOTENCY_WAIT_MS` and
//! `IDEMPOTENCY_RETENTION_HEADER`: twenty duplicates of a 600 ms payment,
//! over two instances of the Redis and PostgreSQL examples, all get the same
//! `201` and the handler runs once, and every answer says how long the key
//! is kept.

mod common;

use http::StatusCode;

const ENV: [(&str, &str); 3] = [
    ("PAYMENT_DELAY_MS", "600"),
    ("IDEMPOTENCY_WAIT_MS", "10000"),
    ("IDEMPOTENCY_RETENTION_HEADER", "1"),
];

async fn twenty_duplicates(example: &str, instances: usize, extra: &[(&str, &str)]) {
    let env: Vec<(&str, &str)> = ENV.iter().chain(extra).copied().collect();
    let mut servers = Vec::new();
    for _ in 0..instances {
        servers.push(common::spawn_example(example, &env).await);
    }
    let addrs: Vec<_> = servers.iter().map(|(_, addr)| *addr).collect();
    let key = common::unique_key(example);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let addr = addrs[i % addrs.len()];
        let key = key.clone();
        tasks.spawn(async move {
            if i > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let headers = [
                ("idempotency-key", key.as_str()),
                ("content-type", "application/json"),
            ];
            let body = r#"{"amount":5,"currency":"EUR"}"#;
            common::request(addr, "POST", "/payments", &headers, body).await
        });
    }
    let answers = tasks.join_all().await;
    let first = answers.iter().find(|a| !a.replayed()).expect("one ran");
    for a in &answers {
        assert_eq!(a.status, StatusCode::CREATED, "{example}: {:?}", a.body);
        assert_eq!(a.body, first.body, "{example}: one payment id");
        let kept: u64 = a.headers["idempotency-ttl"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((86_000..=86_400).contains(&kept), "{example}: {kept}");
    }
    assert_eq!(answers.iter().filter(|a| a.replayed()).count(), 19);
    let mut runs = 0;
    for addr in addrs {
        let stats = common::request(addr, "GET", "/stats", &[], "").await;
        let stats: serde_json::Value = serde_json::from_slice(&stats.body).unwrap();
        runs += stats["handler_runs"].as_u64().unwrap();
    }
    assert_eq!(
        runs, 1,
        "{example}: the handler ran once over all instances"
    );
}

#[tokio::test]
async fn payments_example_waits_for_the_payment_in_flight() {
    twenty_duplicates("payments", 1, &[]).await;
}

#[tokio::test]
async fn payments_redis_example_waits_across_instances() {
    let prefix = format!("examples-wait-{}:", std::process::id());
    twenty_duplicates("payments_redis", 2, &[("REDIS_PREFIX", prefix.as_str())]).await;
}

#[tokio::test]
async fn payments_postgres_example_waits_across_instances() {
    twenty_duplicates("payments_postgres", 2, &[]).await;
}
