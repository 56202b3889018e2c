//! Edges of the PostgreSQL backend. A lease-mode connection whose statement
//! timed out is closed, not pooled. And transaction mode: a handler whose
//! own statement failed inside the request's transaction (PostgreSQL aborts
//! it, `25P02`) and who caught the error. Its `4xx` reaches the client, a success is never delivered for
//! writes that were rolled back, nothing is stored, the key is free, and no
//! answer says "retry with the same key". With a `SAVEPOINT` the handler
//! recovers and its answer is stored as usual.

mod common;
mod postgres_support;

use std::convert::Infallible;

use bytes::Bytes;
use common::{InnerReq, Runs, post, send};
use http::{Response, StatusCode};
use http_body_util::Full;
use postgres_support::{admin, backend_in, backend_prepared};
use tower::Layer;
use tower_idempotency::{IdempotencyLayer, PostgresBackend, PostgresMode, RequestTransaction};

fn unique(name: &str) -> String {
    format!(
        "{name}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A table with one row (`id = 1`) already in it, so inserting `id = 1`
/// again is a unique violation.
async fn ledger() -> String {
    let table = unique("aborted_ledger");
    admin()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, note text); INSERT INTO {table} VALUES (1, 'before')"
        ))
        .await
        .unwrap();
    table
}

async fn rows(table: &str) -> i64 {
    admin()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// What the handler answers after catching the duplicate.
#[derive(Clone, Copy)]
enum Recovery {
    /// Catches the error and answers with this status, without a savepoint.
    Answer(StatusCode),
    /// Wraps the duplicate insert in a savepoint, rolls back to it and
    /// answers `409`.
    Savepoint,
}

/// A handler that writes a row (`id = 2`), then a duplicate of `id = 1`,
/// catches the unique violation and answers as `recovery` says.
fn handler(runs: Runs, table: String, recovery: Recovery) -> impl common::Handler {
    tower::service_fn(move |req: InnerReq| {
        let (runs, table) = (runs.clone(), table.clone());
        async move {
            runs.bump();
            let tx = req
                .extensions()
                .get::<RequestTransaction>()
                .unwrap()
                .clone();
            let client = tx.client().await.unwrap();
            client
                .execute(
                    &format!("INSERT INTO {table} VALUES (2, 'first write')"),
                    &[],
                )
                .await
                .unwrap();
            let savepoint = matches!(recovery, Recovery::Savepoint);
            if savepoint {
                client.batch_execute("SAVEPOINT duplicate").await.unwrap();
            }
            let duplicate = client
                .execute(&format!("INSERT INTO {table} VALUES (1, 'duplicate')"), &[])
                .await
                .unwrap_err();
            assert_eq!(
                duplicate.code(),
                Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
            );
            let status = match recovery {
                Recovery::Answer(status) => status,
                Recovery::Savepoint => {
                    client
                        .batch_execute("ROLLBACK TO SAVEPOINT duplicate")
                        .await
                        .unwrap();
                    StatusCode::CONFLICT
                }
            };
            drop(client);
            let mut res = Response::new(Full::new(Bytes::from("already paid")));
            *res.status_mut() = status;
            Ok::<_, Infallible>(res)
        }
    })
}

async fn backends() -> [(&'static str, PostgresBackend); 2] {
    [
        ("unnamed", backend_in(PostgresMode::Transaction).await),
        (
            "prepared",
            backend_prepared(PostgresMode::Transaction).await,
        ),
    ]
}

#[tokio::test]
async fn a_caught_failure_answered_4xx_reaches_the_client_and_is_not_stored() {
    for (statements, backend) in backends().await {
        let (table, runs) = (ledger().await, Runs::default());
        let mut svc = IdempotencyLayer::new(backend).layer(handler(
            runs.clone(),
            table.clone(),
            Recovery::Answer(StatusCode::CONFLICT),
        ));
        let key = unique("aborted-4xx");
        for attempt in 1..=2 {
            let answer = send(&mut svc, post("/pay", Some(&key), "{}")).await;
            assert_eq!(
                answer.status,
                StatusCode::CONFLICT,
                "{statements} #{attempt}"
            );
            assert_eq!(answer.body, "already paid", "the handler's own answer");
            assert!(!answer.replayed(), "{statements}: not stored");
        }
        assert_eq!(runs.get(), 2, "{statements}: the key was free again");
        assert_eq!(
            rows(&table).await,
            1,
            "{statements}: the first write rolled back"
        );
    }
}

#[tokio::test]
async fn a_caught_failure_answered_2xx_is_not_delivered_as_a_success() {
    for (statements, backend) in backends().await {
        let (table, runs) = (ledger().await, Runs::default());
        let mut svc = IdempotencyLayer::new(backend).layer(handler(
            runs.clone(),
            table.clone(),
            Recovery::Answer(StatusCode::CREATED),
        ));
        let key = unique("aborted-2xx");
        for attempt in 1..=2 {
            let answer = send(&mut svc, post("/pay", Some(&key), "{}")).await;
            assert_eq!(
                answer.status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "{statements} #{attempt}: {:?}",
                answer.body
            );
            assert_eq!(answer.problem_type(), "transaction-aborted");
            assert!(
                !String::from_utf8_lossy(&answer.body).contains("same Idempotency-Key"),
                "never told to retry what fails the same way"
            );
        }
        assert_eq!(runs.get(), 2, "{statements}: the key was free again");
        assert_eq!(rows(&table).await, 1, "{statements}: nothing committed");
    }
}

#[tokio::test]
async fn a_failure_rolled_back_to_a_savepoint_is_stored_as_usual() {
    for (statements, backend) in backends().await {
        let (table, runs) = (ledger().await, Runs::default());
        let mut svc = IdempotencyLayer::new(backend).layer(handler(
            runs.clone(),
            table.clone(),
            Recovery::Savepoint,
        ));
        let key = unique("savepoint");
        let first = send(&mut svc, post("/pay", Some(&key), "{}")).await;
        assert_eq!(first.status, StatusCode::CONFLICT, "{statements}");
        let again = send(&mut svc, post("/pay", Some(&key), "{}")).await;
        assert_eq!(again.status, StatusCode::CONFLICT, "{statements}");
        assert!(again.replayed(), "{statements}: stored and replayed");
        assert_eq!(runs.get(), 1, "{statements}");
        assert_eq!(
            rows(&table).await,
            2,
            "{statements}: the first write committed"
        );
    }
}

/// Lease mode: a statement that times out (here a release waiting for a row
/// another session holds) may still run on the server. Its connection is
/// closed, not pooled: a pool of one serves the next request at once
/// instead of queueing it behind the stuck statement.
#[tokio::test]
async fn a_connection_whose_statement_timed_out_is_not_pooled() {
    use std::time::Duration;
    use tower_idempotency::{Backend, Begin, Fingerprint, StorageKey};

    // A table of its own: a concurrent `migrate()` of the shared table would
    // queue behind the row lock below, and every statement behind it.
    let table = unique("idem_timed_out");
    let backend = PostgresBackend::builder(postgres_support::pool_for(
        &postgres_support::database_url(),
        1,
    ))
    .table(&table)
    .timeout(Duration::from_millis(500))
    .build()
    .unwrap();
    backend.migrate().await.unwrap();
    let fp = Fingerprint::from_bytes([3; 32]);
    let held = StorageKey::derive(
        &tower_idempotency::ScopeValue::anonymous(),
        &unique_key("held"),
    );
    let other = StorageKey::derive(
        &tower_idempotency::ScopeValue::anonymous(),
        &unique_key("other"),
    );
    let Begin::Acquired(lock) = backend
        .begin(&held, &fp, Duration::from_mins(1))
        .await
        .unwrap()
    else {
        panic!("a fresh key");
    };
    // Another session holds the lease's row: the release's DELETE waits.
    let blocker = admin().await;
    blocker.batch_execute("BEGIN").await.unwrap();
    blocker
        .execute(
            &format!("SELECT 1 FROM {table} WHERE key = $1 FOR UPDATE"),
            &[&&held.as_bytes()[..]],
        )
        .await
        .unwrap();
    let error = backend.release(lock).await.unwrap_err();
    assert_eq!(error.kind(), tower_idempotency::BackendErrorKind::Timeout);

    let started = std::time::Instant::now();
    let begun = backend.begin(&other, &fp, Duration::from_mins(1)).await;
    assert!(
        matches!(begun, Ok(Begin::Acquired(_))),
        "the next request was served ({:?} after {:?})",
        begun.map(|_| ()),
        started.elapsed()
    );
    blocker.batch_execute("ROLLBACK").await.unwrap();
}

fn unique_key(name: &str) -> tower_idempotency::IdempotencyKey {
    let mut headers = http::HeaderMap::new();
    headers.insert("idempotency-key", unique(name).parse().unwrap());
    tower_idempotency::IdempotencyKey::from_headers(&headers)
        .unwrap()
        .unwrap()
}

/// A deferred constraint fails only at `COMMIT`, after the handler answered:
/// the transaction rolls back, and the answer is the same as for a failed
/// statement — never "retry with the same key", never the success.
#[tokio::test]
async fn a_deferred_constraint_failing_at_commit_is_not_a_success() {
    let table = unique("deferred_ledger");
    admin()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int UNIQUE DEFERRABLE INITIALLY DEFERRED); \
             INSERT INTO {table} VALUES (1)"
        ))
        .await
        .unwrap();
    let runs = Runs::default();
    let handler = tower::service_fn({
        let (runs, table) = (runs.clone(), table.clone());
        move |req: InnerReq| {
            let (runs, table) = (runs.clone(), table.clone());
            async move {
                runs.bump();
                let tx = req
                    .extensions()
                    .get::<RequestTransaction>()
                    .unwrap()
                    .clone();
                let client = tx.client().await.unwrap();
                client
                    .execute(&format!("INSERT INTO {table} VALUES (1)"), &[])
                    .await
                    .unwrap();
                drop(client);
                let mut res = Response::new(Full::new(Bytes::from("paid")));
                *res.status_mut() = StatusCode::CREATED;
                Ok::<_, Infallible>(res)
            }
        }
    });
    for (statements, backend) in backends().await {
        let mut svc = IdempotencyLayer::new(backend).layer(handler.clone());
        let key = unique("deferred");
        let answer = send(&mut svc, post("/pay", Some(&key), "{}")).await;
        assert_eq!(
            answer.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{statements}"
        );
        assert_eq!(answer.problem_type(), "transaction-aborted", "{statements}");
        let again = send(&mut svc, post("/pay", Some(&key), "{}")).await;
        assert_eq!(
            again.problem_type(),
            "transaction-aborted",
            "{statements}: the key was free"
        );
    }
    assert_eq!(runs.get(), 4);
    assert_eq!(rows(&table).await, 1, "nothing committed");
}

/// `migrate()` on a table that is already up to date takes no lock that
/// waits for writers: a new instance starting while requests write rows
/// neither waits for them nor makes every later write queue behind it.
#[tokio::test]
async fn migrate_does_not_wait_for_writers_when_nothing_changes() {
    use std::time::Duration;

    let table = unique("idem_migrate");
    let backend = PostgresBackend::builder(postgres_support::pool_for(
        &postgres_support::database_url(),
        2,
    ))
    .table(&table)
    .build()
    .unwrap();
    backend.migrate().await.unwrap();
    let writer = admin().await;
    writer.batch_execute("BEGIN").await.unwrap();
    writer
        .execute(
            &format!(
                "INSERT INTO {table} (key, fingerprint, expires_at) VALUES ('\\x01', '\\x00', now())"
            ),
            &[],
        )
        .await
        .unwrap();
    let migrated = tokio::time::timeout(Duration::from_secs(5), backend.migrate()).await;
    writer.batch_execute("ROLLBACK").await.unwrap();
    assert!(
        matches!(migrated, Ok(Ok(()))),
        "migrate waited for a writer: {migrated:?}"
    );
}
