//! The Redis backend on a Redis Cluster of three masters, started by the
//! test on spare ports and stopped when it ends.

mod common;
mod conformance;
mod redis_support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Runs, post, send, slow_payment};
use http::StatusCode;
use redis_support::{RedisProcess, admin};
use tower::Layer;
use tower_idempotency::{Backend, Begin, IdempotencyLayer, RedisBackend};

struct Cluster {
    nodes: Vec<RedisProcess>,
}

impl Cluster {
    fn start() -> Self {
        let nodes: Vec<RedisProcess> = (0..3)
            .map(|_| {
                RedisProcess::start(&["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("redis-cli is installed");
        assert!(status.success(), "redis-cli --cluster create failed");
        Self { nodes }
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisProcess::url).collect()
    }

    async fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for url in self.urls() {
            let mut conn = admin(&url).await;
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster did not become ok: {info}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn backend(&self) -> RedisBackend {
        let pool = deadpool_redis::cluster::Config::from_urls(self.urls())
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .unwrap();
        RedisBackend::new_cluster(pool)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster() {
    let cluster = Cluster::start();
    cluster.wait_until_ok().await;

    // The conformance suite, unchanged.
    conformance::run_all(cluster.backend(), conformance::Locks::Lapse).await;

    // Keys land on every master, and both keys of a request share a slot.
    let backend = cluster.backend();
    let mut slots = std::collections::BTreeSet::new();
    let mut conn = admin(&cluster.urls()[0]).await;
    for _ in 0..30 {
        let key = conformance::fresh_key();
        let hex = key.to_hex();
        let rec: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("idem:{{{hex}}}:rec"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let lock: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("idem:{{{hex}}}:lock"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(rec, lock);
        slots.insert(rec / 5462);
        let Begin::Acquired(l) = backend
            .begin(&key, &conformance::fingerprint(1), Duration::from_secs(5))
            .await
            .unwrap()
        else {
            panic!("fresh key");
        };
        backend
            .complete(
                l,
                conformance::record(conformance::fingerprint(1), b"{}"),
                Duration::from_mins(1),
            )
            .await
            .unwrap();
    }
    assert_eq!(slots.len(), 3, "keys spread over the three masters");

    // Through the layer: 100 concurrent duplicates from two instances.
    let runs = Runs::default();
    let handler = slow_payment(runs.clone(), Duration::from_millis(200));
    let instances = [
        IdempotencyLayer::new(cluster.backend()).layer(handler.clone()),
        IdempotencyLayer::new(cluster.backend()).layer(handler),
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let mut svc = instances[i % 2].clone();
        tasks.spawn(async move { send(&mut svc, post("/p", Some("cluster-hot"), "x")).await });
    }
    for a in tasks.join_all().await {
        assert!(
            a.status == StatusCode::CREATED || a.status == StatusCode::CONFLICT,
            "{}",
            a.status
        );
    }
    assert_eq!(runs.get(), 1);
    let mut svc = instances[0].clone();
    assert!(
        send(&mut svc, post("/p", Some("cluster-hot"), "x"))
            .await
            .replayed()
    );

    // One primary that may evict is enough to refuse the cluster: a new
    // backend reads every primary's policy.
    cluster.backend().verify().await.unwrap();
    for url in cluster.urls() {
        let mut node = admin(&url).await;
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("allkeys-lru")
            .query_async(&mut node)
            .await
            .unwrap();
        let error = cluster.backend().verify().await.unwrap_err();
        assert_eq!(
            error.kind(),
            tower_idempotency::BackendErrorKind::Misconfigured,
            "{error}"
        );
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("noeviction")
            .query_async(&mut node)
            .await
            .unwrap();
    }
    cluster.backend().verify().await.unwrap();
}
