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

/// The keys `written` found: (node, key, slot).
type Written = Vec<(usize, String, i64)>;

/// The keys `written` found, without and with the `:fence` keys.
fn split_fences(keys: Written) -> (Written, Written) {
    keys.into_iter()
        .partition(|(_, key, _)| !key.ends_with(":fence"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::too_many_lines,
    reason = "one cluster, started once for every check"
)]
async fn redis_cluster() {
    let cluster = Cluster::start();
    cluster.wait_until_ok().await;

    // The conformance suite, unchanged.
    conformance::run_all(cluster.backend(), conformance::Locks::Lapse).await;

    // Where the backend actually wrote: the lock and then the record of each
    // key are read back from the nodes. Both carry the storage key as their
    // hash tag and sit on the node that owns their slot, and the keys of
    // 30 requests land on every master.
    let backend = cluster.backend();
    let mut nodes = Vec::new();
    for url in cluster.urls() {
        let mut conn = admin(&url).await;
        let slots = owned_slots(&mut conn).await;
        nodes.push((conn, slots));
    }
    let mut used = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let key = conformance::fresh_key();
        let hex = key.to_hex();
        let Begin::Acquired(l) = backend
            .begin(&key, &conformance::fingerprint(1), Duration::from_secs(5))
            .await
            .unwrap()
        else {
            panic!("fresh key");
        };
        let (locks, fences) = split_fences(written(&mut nodes, &hex).await);
        let [(lock_node, lock_key, lock_slot)] = locks.as_slice() else {
            panic!("one lock after begin, found {locks:?}");
        };
        // The key's last fencing token is kept beside the lock, in its slot.
        assert_eq!(
            fences,
            [(*lock_node, lock_key.replace(":lock", ":fence"), *lock_slot)]
        );
        assert!(lock_key.ends_with(":lock"), "{lock_key}");
        backend
            .complete(
                l,
                conformance::record(conformance::fingerprint(1), b"{}"),
                Duration::from_mins(1),
            )
            .await
            .unwrap();
        let (records, _) = split_fences(written(&mut nodes, &hex).await);
        let [(record_node, record_key, record_slot)] = records.as_slice() else {
            panic!("one key (the record) after complete, found {records:?}");
        };
        assert!(record_key.ends_with(":rec"), "{record_key}");
        for k in [lock_key, record_key] {
            assert_eq!(hash_tag(k), Some(hex.as_str()), "hash tag of {k}");
        }
        assert_eq!(
            (record_node, record_slot),
            (lock_node, lock_slot),
            "{record_key} and {lock_key} share a slot"
        );
        used.insert(*lock_node);
    }
    assert_eq!(used.len(), 3, "keys spread over the three masters");

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

/// The slots a node owns, from its own line of `CLUSTER NODES`.
async fn owned_slots(conn: &mut redis::aio::MultiplexedConnection) -> Vec<(i64, i64)> {
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(conn)
        .await
        .unwrap();
    let me = nodes
        .lines()
        .find(|line| line.contains("myself"))
        .expect("CLUSTER NODES names this node");
    // Fields 9.. are slots and ranges; migrating slots ("[..]") are skipped.
    me.split_whitespace()
        .skip(8)
        .filter_map(|range| {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            Some((first.parse().ok()?, last.parse().ok()?))
        })
        .collect()
}

/// Every key holding `hex` on every node, as (node, key, slot), after
/// checking each sits on a node that owns its slot and that the node lists
/// it in that slot.
async fn written(
    nodes: &mut [(redis::aio::MultiplexedConnection, Vec<(i64, i64)>)],
    hex: &str,
) -> Vec<(usize, String, i64)> {
    let mut found = Vec::new();
    for (index, (conn, slots)) in nodes.iter_mut().enumerate() {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*{hex}*"))
            .query_async(conn)
            .await
            .unwrap();
        for key in keys {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&key)
                .query_async(conn)
                .await
                .unwrap();
            assert!(
                slots.iter().any(|&(a, b)| (a..=b).contains(&slot)),
                "{key} (slot {slot}) on node {index}, which owns {slots:?}"
            );
            let in_slot: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1000)
                .query_async(conn)
                .await
                .unwrap();
            assert!(in_slot.contains(&key), "{key} not listed in slot {slot}");
            found.push((index, key, slot));
        }
    }
    found
}

/// A key's hash tag as Redis Cluster reads it: between the first `{` and
/// the next `}`, when not empty.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')? + 1;
    let len = key[open..].find('}')?;
    (len > 0).then(|| &key[open..open + len])
}
