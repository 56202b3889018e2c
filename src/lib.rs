//! Exactly-once `POST`s for [Tower], [axum] and [hyper] services, and
//! exactly-once unary calls for [tonic] gRPC services ([`grpc`]).
//!
//! A client that retries a request — after a timeout, a dropped connection,
//! a double click — must not charge a card twice. With [`IdempotencyLayer`],
//! a request that carries an `Idempotency-Key` header runs the handler
//! **once**; every retry gets the original response back, byte for byte, with
//! `Idempotent-Replayed: true`, and a duplicate that arrives while the first
//! is still running is answered `409 Conflict` with `Retry-After` instead of
//! racing it.
//!
//! [Tower]: https://docs.rs/tower
//! [axum]: https://docs.rs/axum
//! [hyper]: https://docs.rs/hyper
//! [tonic]: https://docs.rs/tonic
//!
//! # Quick start (axum)
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyLayer, MemoryBackend};
//!
//! async fn create_payment(body: String) -> String {
//!     format!("charged: {body}")
//! }
//!
//! let backend = MemoryBackend::builder().max_entries(100_000).build();
//! let app: Router = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(IdempotencyLayer::new(backend).ttl(Duration::from_hours(24)));
//! # let _ = app;
//! ```
//!
//! # Step by step: a protected axum route with metrics
//!
//! ```sh
//! cargo add tower-idempotency --features axum,metrics
//! cargo add metrics-exporter-prometheus   # or any `metrics` exporter
//! ```
//!
//! 1. Pick a backend: [`MemoryBackend`] for one process; Redis or
//!    PostgreSQL (features `redis`, `postgres`) when several instances serve
//!    the same clients — each backend's page lists what its server needs.
//! 2. Add [`IdempotencyLayer`] to the routes that create things. Requests
//!    without an `Idempotency-Key` pass through unless the layer is
//!    [`required`](IdempotencyLayer::required).
//! 3. Read the key in the handler with the [`IdempotencyKey`] extractor
//!    (feature `axum`) to pass it on to a payment provider, and answer with a
//!    [`Persist`] extension to keep a response shorter (or not at all).
//! 4. Install a `metrics` recorder; the layer counts every decision (see
//!    [Metrics](#metrics)).
//!
//! ```
//! # #[cfg(all(feature = "axum", feature = "metrics"))]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use axum::{Extension, Json, Router, http::StatusCode, routing::{get, post}};
//! use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryBackend, Persist};
//!
//! async fn create_payment(key: IdempotencyKey, body: String) -> (StatusCode, String) {
//!     // Hand `key` to the payment provider too, then answer.
//!     (StatusCode::CREATED, format!("charged {body} with provider key {key}"))
//! }
//!
//! async fn preview(body: String) -> (Extension<Persist>, String) {
//!     // A quote that must not be replayed: a retry computes it again.
//!     (Extension(Persist::Never), format!("quote for {body}"))
//! }
//!
//! let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
//! tower_idempotency::describe_metrics();
//!
//! let backend = MemoryBackend::builder().max_entries(100_000).build();
//! let app: Router = Router::new()
//!     .route("/payments", post(create_payment))
//!     .route("/payments/preview", post(preview))
//!     .layer(IdempotencyLayer::new(backend).ttl(Duration::from_hours(24)))
//!     // Added after the layer, so not guarded.
//!     .route("/metrics", get(move || async move { prometheus.render() }));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! `examples/metrics.rs` is this program with a JSON API and `curl` commands
//! to try (`cargo run --example metrics --features axum,metrics`).
//!
//! # Quick start (tower / hyper)
//!
//! The layer wraps any `Service<http::Request<_>>`. The inner service
//! receives the request with an [`IdempotencyBody`] (the buffered body for
//! guarded requests, the original stream otherwise); a bare hyper 1 server
//! uses it through `hyper_util::service::TowerToHyperService` (see
//! `examples/hyper.rs`).
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, service_fn};
//! use tower_idempotency::{IdempotencyBody, IdempotencyLayer, MemoryBackend};
//!
//! async fn handler(_req: Request<IdempotencyBody<String>>) -> Result<Response<String>, Infallible> {
//!     Ok(Response::new("created".to_owned()))
//! }
//!
//! let service = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new(MemoryBackend::new()))
//!     .service(service_fn(handler));
//! # let _ = service;
//! ```
//!
//! # Quick start (tonic)
//!
//! ```
//! use tower_idempotency::{IdempotencyLayer, MemoryBackend};
//!
//! let server = tonic::transport::Server::builder()
//!     .layer(IdempotencyLayer::new(MemoryBackend::new()));
//! // .add_service(PaymentsServer::new(…)).serve(addr).await
//! # let _ = server;
//! ```
//!
//! gRPC calls are answered in gRPC's terms and stored by their
//! `grpc-status`; see [`grpc`] and `examples/grpc_payments.rs`.
//!
//! # Backends
//!
//! - [`MemoryBackend`] (feature `memory`, on by default): bounded by records
//!   and bytes, in process, no server; keeps every record at least an hour.
//!   Protects **one** process.
//! - `RedisBackend` (feature `redis`): several instances share one Redis or
//!   Redis Cluster through your `deadpool_redis` pool; two commands for a
//!   fresh request, one for a replay. See the `backend::redis` module.
//! - `PostgresBackend` (feature `postgres`): one table through your
//!   `deadpool_postgres` pool; two round trips for a fresh request, one for
//!   a replay. Three modes: a lease row (the default; survives lost
//!   sessions, holds no connection across the handler), a session advisory
//!   lock (the fewest writes), or a transaction the handler writes through
//!   and that commits with the record (`RequestTransaction`). See the
//!   `backend::postgres` module.
//! - `SqliteBackend` (feature `sqlite`): records and leases in one SQLite
//!   file (WAL), shared by the processes of one host and kept across
//!   restarts; built on this crate's public API alone. See the
//!   `backend::sqlite` module.
//! - Your own: implement [`Backend`] as its documentation says, and check it
//!   with the conformance suite (feature `conformance`): one call runs every
//!   case of the contract against your backend and reports each failure by
//!   name.
//!
//! The Redis and PostgreSQL constructors take pools of the `deadpool-redis`
//! and `deadpool-postgres` versions this crate was built with. They are
//! re-exported as `tower_idempotency::deadpool_redis`
//! and `tower_idempotency::deadpool_postgres`, with the client crates they
//! re-export in turn (`deadpool_redis::redis`,
//! `deadpool_postgres::tokio_postgres`): build the pool through them and it
//! is of the type the constructor expects, whatever versions your own
//! dependencies name. This release pins `deadpool-redis` 0.23 (`redis` 1)
//! and `deadpool-postgres` 0.14 (`tokio-postgres` 0.7); a release that moves
//! to another minor version of either says so in its changelog.
//!
//! # How a request is handled
//!
//! 1. Methods other than `POST` and `PATCH` (configurable with
//!    [`methods`](IdempotencyLayer::methods)) and requests without the
//!    header pass straight through (or get `400` when the layer is
//!    [`required`](IdempotencyLayer::required)).
//! 2. The key is parsed: a quoted Structured Field string (`"k1"`) or a bare
//!    token (`k1`). Empty, longer than 255 bytes, not visible ASCII, the
//!    header repeated, or a bare key holding a `,` (what a proxy makes of two
//!    headers): `400`.
//! 3. The body is buffered up to [`max_request_body`](IdempotencyLayer::max_request_body)
//!    (`413` above it, before any lock is taken).
//! 4. The caller's scope is resolved (see [Scopes](#scopes-whose-key-is-it));
//!    a scope that must identify the caller and cannot answers `400`. The
//!    **storage key** is SHA-256 of the scope and the key; the
//!    **fingerprint** is SHA-256 of method, path, query, body,
//!    `Authorization`, `Content-Type`, `Content-Encoding` and any
//!    [configured headers](IdempotencyLayer::fingerprint_headers).
//! 5. The [`Backend`] looks the key up and locks it in one step:
//!    a stored response with the same fingerprint is replayed; with a
//!    different fingerprint the answer is `422`; a key held by a request in
//!    flight gets `409` with `Retry-After` (or, with
//!    [`wait_for_in_flight`](IdempotencyLayer::wait_for_in_flight), waits for
//!    its response); otherwise the handler runs, with the lock's
//!    [`FencingToken`] in its request extensions.
//! 6. The handler runs in a task of its own: if the client goes away (the
//!    socket closes, an outer timeout fires), it still runs to the end and its
//!    response is stored for the retry (see [`on_disconnect`](IdempotencyLayer::on_disconnect)).
//! 7. The response is stored unless it is `5xx` or `429` (see
//!    [`persist_if`](IdempotencyLayer::persist_if) and [`Persist`]); then the
//!    key is released. A body of known length is buffered, stored, then sent;
//!    a body without one (a chunked stream) is sent as it arrives while a copy
//!    is kept, and stored when it ends — before the client sees its end or
//!    its trailers, which are stored with it (unless the store itself fails;
//!    the client then still gets the whole body). Serve such bodies with
//!    `TCP_NODELAY` (with axum, a listener whose `tap_io` calls
//!    `set_nodelay(true)`; tonic's `serve` sets it): their end leaves in a write of its own once the
//!    record is stored, which Nagle's algorithm would hold for the
//!    client's delayed ACK. Once such a body passes the limit, the key is
//!    settled at once with a marker while the rest streams on. A
//!    response that cannot be stored (larger than
//!    [`max_stored_response`](IdempotencyLayer::max_stored_response), or a
//!    `text/event-stream`, which passes straight through)
//!    leaves a "response not kept" marker, so a retry does not run the handler
//!    again (see [`unstorable`](IdempotencyLayer::unstorable)).
//!
//! | Situation | Status | Handler runs |
//! |---|---|---|
//! | first request with a key | handler's | yes |
//! | retry after completion, same request | stored response + `Idempotent-Replayed: true` | no |
//! | retry of a response too large (or otherwise unfit) to store | [response not kept](problem#response-not-kept), original status | no |
//! | retry of a `5xx` | runs again by default; the `5xx` replayed, or [outcome unknown](problem#outcome-unknown), as [`server_errors`](IdempotencyLayer::server_errors) says | by default |
//! | retry while the first is in flight (or its client left and it is still running) | `409` + `Retry-After` | no |
//! | the same with [`wait_for_in_flight`](IdempotencyLayer::wait_for_in_flight) | the first one's response once stored; `409` at the bound | no (yes if the first stored nothing) |
//! | key reused with a different request | `422` | no |
//! | malformed or repeated key | `400` | no |
//! | [scope](IdempotencyLayer::scope) cannot identify the caller | `400` | no |
//! | body over the limit | `413` | no |
//! | body that cannot be fingerprinted ([`fingerprint_json`](IdempotencyLayer::fingerprint_json), [`fingerprint_body_with`](IdempotencyLayer::fingerprint_body_with)) | `400` ([invalid body](problem#invalid-body)) | no |
//! | backend down (default: fail closed) | `503` + `Retry-After` | no |
//! | backend down with [`fail_open`](IdempotencyLayer::fail_open) | handler's | yes, unprotected |
//! | instance [shutting down](ShutdownHandle) | `503` + `Retry-After` ([shutting down](problem#shutting-down)) | no |
//! | retry of a handler cut off at the end of a shutdown's grace period | `500` ([interrupted](problem#interrupted)), stored | no |
//!
//! Answers the layer makes itself are `application/problem+json` (RFC 9457)
//! with a stable `type`; see [`problem`].
//!
//! # Scopes: whose key is it?
//!
//! Keys are per caller. By default the caller is the `Authorization` header,
//! or the whole `Cookie` header when there is none; two callers that send the
//! same key never see each other's response. An empty or whitespace-only
//! `Authorization` or `Cookie` counts as absent.
//!
//! **Requests with no credentials at all** share one anonymous scope under
//! the default: all of them meet under the same key. That is right where
//! keys are unique by construction — signed webhooks keyed by their event
//! id, say — and wrong where anonymous clients choose keys; scope such routes
//! by something that tells the clients apart.
//!
//! **Access tokens rotate.** Under the default scope a retry that carries a
//! refreshed bearer token is a *new caller* and runs the handler again. The
//! recommended set-up scopes keys by the authenticated principal, which an
//! authentication layer (placed outside this one) puts into the request
//! extensions. With [`scope`](IdempotencyLayer::scope), `Authorization` also
//! leaves the fingerprint, so the retry with the new token is replayed:
//!
//! ```
//! use tower_idempotency::{IdempotencyLayer, MemoryBackend};
//!
//! #[derive(Clone)]
//! struct UserId(u64); // inserted by your authentication layer
//!
//! let layer = IdempotencyLayer::new(MemoryBackend::new())
//!     .scope(|req: &http::request::Parts| req.extensions.get::<UserId>().map(|u| u.0.to_string()));
//! # let _ = layer;
//! ```
//!
//! A scope function that returns `None` (typically: the authentication
//! layer sits inside this one by mistake) never shares a scope silently: the
//! request is answered `400` ([unidentified caller](problem#unidentified-caller)),
//! the handler does not run, and a warning is logged and counted. Opt into
//! one shared scope for such requests with
//! [`shared_anonymous_scope`](IdempotencyLayer::shared_anonymous_scope).
//!
//! For cookie sessions, [`scope_cookie`](IdempotencyLayer::scope_cookie)
//! scopes by the session cookie alone (an analytics cookie that changes
//! between retries would otherwise split one caller into two); a request
//! without that cookie is answered like a scope function's `None`.
//!
//! # With tower-http and axum
//!
//! Order matters for layers that change the response or end the request
//! (outermost first; tested in `tests/tower_http.rs`):
//!
//! - **`CompressionLayer` outside** this layer. The plain response is stored
//!   and every replay is encoded for the client asking. Inside, the
//!   compressed bytes are stored and replayed with their `Content-Encoding`
//!   to every retry, also to a client that did not ask for that encoding; if
//!   it must sit inside, add `Accept-Encoding` to
//!   [`fingerprint_headers`](IdempotencyLayer::fingerprint_headers) so such a
//!   retry gets `422` instead.
//! - **`TimeoutLayer` outside**: a timeout drops this layer's future; the
//!   handler that started runs on to the end and its response is stored, so
//!   the client's retry replays it (or gets `409` while it still runs). With
//!   [`OnDisconnect::Cancel`] the timeout cuts the handler off instead and
//!   releases the key.
//! - **`RequestBodyLimitLayer`** outside answers `413` before the key is
//!   looked at (also for bodies without `Content-Length`, whose limit error
//!   this layer reports as `413`). This layer's own
//!   [`max_request_body`](IdempotencyLayer::max_request_body) does the same.
//! - axum's **`DefaultBodyLimit`** acts in the handler's extractors, after
//!   this layer buffered the body: its `413` is the handler's answer and, like
//!   any `4xx`, is stored and replayed for the same request.
//! - **`TraceLayer`** anywhere; outside it also traces replays and `409`s.
//! - Authentication goes **outside** when keys are scoped by the principal
//!   ([`scope`](IdempotencyLayer::scope)), so the principal is in the request
//!   extensions when this layer runs.
//!
//! # Guarantees
//!
//! - **Exactly once while healthy.** For one (scope, key), the handler runs
//!   at most once while the backend is reachable and the lock is kept: the
//!   heartbeat extends it every `lock_ttl / 3` (on by default) while the
//!   handler runs and while a streamed response is sent. Concurrent
//!   duplicates are answered `409`; later ones replay.
//! - **A client that leaves does not make a second run.** Once the handler
//!   has started under the lock, dropping the response future (socket
//!   closed, outer timeout) does not cancel it: it finishes, its response is
//!   stored by the usual rules, and the retry replays it. A client that stops
//!   reading a streamed body mid-way hands the rest to be read and stored.
//!   [`OnDisconnect::Cancel`] chooses cancellation instead (the key is then
//!   released and a retry runs again).
//! - **A response that cannot be stored is not a reason to run again.** Too
//!   large, or an event stream: a "response not kept" marker is
//!   stored (unless [`Unstorable::Release`]), and retries are answered with
//!   the original status and a problem document, without running the handler.
//!   `5xx`, `429`, [`Persist::Never`] and an inner `Err` release the key: a
//!   retry runs again.
//! - **A lost lock is never overwritten.** If a lock lapses (heartbeat off
//!   and a slow handler, or a backend that lost it), another request may run;
//!   the first one's response is returned to its client but not stored, so
//!   it never replaces the newer holder's record. On PostgreSQL, a lost
//!   connection loses no lock in lease mode (the default) as long as the
//!   heartbeat reaches the database again within `lock_ttl`; in advisory
//!   mode it frees the key while the handler runs (documented there).
//! - **Database effects exactly once (PostgreSQL transaction mode).** Writes
//!   the handler makes through its `RequestTransaction` commit in the same
//!   transaction as the stored response, or not at all: a crash, a killed
//!   connection or a failed commit leaves neither, and a response meant to
//!   be stored whose commit failed (or could not be confirmed) is answered
//!   `503` — retry with the same key. A response that is not meant to be
//!   stored (`5xx`, `429`, [`Persist::Never`], a body that failed) rolls the
//!   writes back and still reaches the client as the handler made it.
//! - **A deploy does not make a second run** (on a shared backend that
//!   answers). With a [`ShutdownHandle`], a graceful shutdown refuses new
//!   keyed requests, finishes and stores the handlers still running
//!   (connected or detached) within its grace period, and waits for the
//!   releases and late stores sent in the background. A handler still
//!   running at the end is cut off and its key settled for good with an
//!   [interrupted](problem#interrupted) answer — its outcome is unknown, so
//!   it never runs again — or, on a backend that rolls its effects back
//!   (PostgreSQL's transaction mode), released. What the backend does not
//!   take within the grace periods lapses after `lock_ttl`, as after a
//!   crash; a [`MemoryBackend`]'s records end with its process.
//! - **A backend that comes back in time loses nothing.** A `complete` that
//!   could not reach Redis or PostgreSQL (lease mode) — stopped, restarted,
//!   unreachable — is tried again in the background, fenced by the lock's
//!   token, until the lock would lapse: the client got its response, and
//!   its retry replays once the record lands (`409` until then).
//! - **A handler can fence its own writes.** Every lock the built-in
//!   backends grant carries a [`FencingToken`] larger than that of every
//!   lock granted on the key before it; a handler whose lock lapsed while it
//!   was paused cannot overwrite a newer holder's write fenced with it (see
//!   [`fence`]). The layer's own store is fenced by the lock.
//! - **Waiting never runs twice.** A duplicate waiting with
//!   [`wait_for_in_flight`](IdempotencyLayer::wait_for_in_flight) replays the
//!   stored response; only if the request in flight ended without storing
//!   does it take the key, as any new request would.
//! - **No stuck keys.** A handler panic or an inner `Err` releases the key
//!   and stores nothing; a streamed response whose client left is read for
//!   at most [`drain_timeout`](IdempotencyLayer::drain_timeout); a crashed process's key is free after `lock_ttl`
//!   (10 s by default), and the `409`s in between say so in `Retry-After`.
//!   With a remote backend a release the layer could not wait for is sent in
//!   the background; if that fails too, the lock expires after `lock_ttl`.
//! - **Never another caller's response.** Responses are kept per (scope,
//!   key); blank credentials are absent, and an explicit scope that cannot
//!   identify the caller is refused rather than shared.
//! - **At least once, beyond that.** If the store fails *after* the handler
//!   ran and cannot be made up in time (the backend stays away longer than
//!   `lock_ttl`, refuses the write, or the response body itself fails
//!   part-way), the client still gets its response (or the body's error),
//!   but a retry runs the handler again. If the process crashes mid-handler, the key is
//!   free after `lock_ttl` and a retry runs again: make the side effect itself
//!   idempotent too where that matters (e.g. pass the key to your payment
//!   provider; handlers can read it as an [`IdempotencyKey`] extension).
//! - **Expiry.** A response is replayed until its TTL ends (at most
//!   [`MAX_TTL`]; longer TTLs are shortened to it); after that the key is free
//!   and the next request runs the handler.
//! - **The SQLite backend keeps its records across restarts.** A record is
//!   on disk (`synchronous = FULL`) before its response is answered, so it
//!   survives the process and the machine crashing (with
//!   `relaxed_durability()`, the process only); processes on one host share
//!   the file, and a process killed mid-handler leaves a lease that lapses
//!   after `lock_ttl`.
//! - **[`MemoryBackend`] forgets no young record.** A record is kept at least
//!   its [`min_retention`](MemoryBackendBuilder::min_retention)
//!   (one hour by default) and up to its TTL while memory allows; when the
//!   bound is reached with younger records only, *new* keys are answered `503`
//!   (store full) instead of evicting anyone's response. It protects one
//!   process only; several instances need a shared backend such as Redis.
//! - **Fail closed.** A backend error answers `503` and the handler does not
//!   run, unless [`fail_open`](IdempotencyLayer::fail_open) is chosen.
//! - **gRPC calls get the same guarantees.** A keyed unary or
//!   server-streaming call runs once and its retries get its messages and
//!   trailers back; a status the handler meant as "try again"
//!   (`UNAVAILABLE`, `ABORTED`, …) is not stored, so the retry runs; the
//!   layer's own answers are gRPC statuses ([`grpc`]). Methods named in
//!   [`grpc_streaming_requests`](IdempotencyLayer::grpc_streaming_requests)
//!   are not guarded at all.
//! - **Unreadable records are never replayed, and never run again.** A
//!   stored record that fails its checksum or does not decode is a
//!   [`CodecError`] ([`BackendErrorKind::Corrupt`]): the request gets `500`
//!   ([stored response unreadable](problem#stored-response-unreadable)) until
//!   the record expires or an operator drops it. One written in a format
//!   this instance cannot read — a newer version during a rollback, larger
//!   than this instance's `max_record_size` —
//!   ([`BackendErrorKind::Incompatible`]) gets `503` with `Retry-After`:
//!   another instance may read it. Neither runs the handler, not even with
//!   [`fail_open`](IdempotencyLayer::fail_open).
//! - **The record format is stable.** Records are versioned; the bytes of
//!   the current format are kept as test fixtures (`tests/fixtures/records/`)
//!   that every later version must read and this one must write unchanged. A
//!   format change ships in two steps — a release that reads the new form,
//!   then one that writes it — so both a rolling upgrade and a rollback by
//!   one release keep every stored record readable.
//!
//! # Operations: dropping one key's record
//!
//! A record that must not be replayed any more (or that cannot be read) can
//! be dropped by its storage key, the 64 hex characters that the
//! `idempotency` span logs as `key`: `MemoryBackend::forget`,
//! `RedisBackend::forget` or `PostgresBackend::forget` with
//! [`StorageKey::from_hex`]. The next request with that key runs the handler.
//!
//! # Metrics
//!
//! With the `metrics` feature the layer records through the [`metrics`]
//! facade to whichever recorder the application installed (Prometheus,
//! StatsD, OpenTelemetry, …); without a recorder, or without the feature,
//! nothing is recorded. [`describe_metrics`] registers units and help texts.
//!
//! | Name | Type | Labels | Meaning |
//! |---|---|---|---|
//! | `idempotency_requests_total` | counter | `outcome` | one per request the layer looked at (below) |
//! | `idempotency_stores_total` | counter | `result` | what became of a response produced under the lock: `stored`, `not_kept` (a "response not kept" marker stored in its place), `not_stored` (`5xx`, `429`, [`Persist::Never`], handler error, a failed body, a cancelled handler; the key released), `lock_lost`, `failed` (the backend refused or failed the save), `interrupted` (cut off by a shutdown; an interrupted answer stored), `aborted` (the handler's own transaction failed; nothing stored), `stored_late`, `late_lost` and `late_gave_up` (a store retried after an outage: landed, found the lock gone, gave up) |
//! | `idempotency_waits_total` | counter | `result` | how a wait of [`wait_for_in_flight`](IdempotencyLayer::wait_for_in_flight) ended: `replayed`, `acquired` (the key was freed; the request runs), `exhausted` (the bound or a shutdown: `409`; a poll that fails counts as busy) |
//! | `idempotency_backend_duration_seconds` | histogram | `operation` | time of each backend call: `begin`, `complete`, `release`, `extend` |
//! | `idempotency_backend_errors_total` | counter | `operation`, `kind` | failed backend calls by [`BackendErrorKind`]: `unavailable`, `timeout`, `rejected`, `corrupt`, `incompatible`, `misconfigured`, `other` |
//!
//! Outcomes: `fresh` (the handler runs under the lock), `replayed`,
//! `conflict` (`409`), `mismatch` (`422`), `no_key` (passed through),
//! `missing_key`, `invalid_key` and `unidentified_caller` (`400`),
//! `stored_unreadable` (`500`), `stored_incompatible` (`503`),
//! `body_too_large` (`413`),
//! `body_error` and `invalid_body` (`400`), `backend_unavailable` (`503`),
//! `shutting_down` (`503`), `fail_open` (the handler ran unprotected),
//! `grpc_streaming` (a keyed call, or any call where a key is required, to
//! a gRPC method named in
//! [`grpc_streaming_requests`](IdempotencyLayer::grpc_streaming_requests), passed through). Labels take only these fixed values: keys and
//! callers never become label values, so cardinality stays bounded.
//!
//! [`metrics`]: https://docs.rs/metrics
//! [`describe_metrics`]: https://docs.rs/tower-idempotency/latest/tower_idempotency/fn.describe_metrics.html
//!
//! # Graceful shutdown
//!
//! A rolling deploy is the most common way for a process to stop while it
//! runs handlers. Take a [`ShutdownHandle`] from the layer before serving,
//! start its shutdown at the signal with
//! [`shutdown_on`](ShutdownHandle::shutdown_on), let the server's own
//! graceful shutdown begin with it ([`started`](ShutdownHandle::started)),
//! and await both before `main` returns; see [`ShutdownHandle`] for what it
//! does and the lines an axum or hyper server adds.
//!
//! # Runtime
//!
//! A fresh guarded request runs the handler, the store and the release in a
//! future of its own: it is polled in the request's task until it first has
//! to wait, and from then on in a Tokio task it spawns (replays, `409`,
//! `422` and pass-through requests never get that far). With the heartbeat's
//! timers, that is why the guarded path must run inside a Tokio runtime with
//! time enabled, as axum and hyper servers do, and why the inner service, its
//! future, its error and its response body must be `Send + 'static`.

#![cfg_attr(docsrs, feature(doc_cfg))]

/// A boxed error of any type, for errors passed through from other crates.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub mod backend;
mod body;
mod config;
#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod extract;
pub mod fence;
mod fingerprint;
mod flow;
mod future;
pub mod grpc;
mod headers;
mod key;
mod layer;
mod lock;
mod observe;
pub mod problem;
mod record;
mod service;
mod settle;
pub mod shutdown;
mod wait;

#[cfg(feature = "memory")]
pub use backend::memory::{MemoryBackend, MemoryBackendBuilder, MemoryLock};
#[cfg(all(feature = "postgres", feature = "axum"))]
pub use backend::postgres::NoRequestTransaction;
#[cfg(feature = "postgres")]
pub use backend::postgres::{
    PostgresBackend, PostgresBackendBuilder, PostgresLock, PostgresMode, RequestTransaction,
    TransactionClient, UnknownPostgresMode,
};
#[cfg(feature = "redis")]
pub use backend::redis::{RedisBackend, RedisBackendBuilder, RedisLock};
#[cfg(feature = "sqlite")]
pub use backend::sqlite::{SqliteBackend, SqliteBackendBuilder, SqliteLock};
pub use backend::{Backend, BackendError, BackendErrorKind, Begin, Completion};
pub use body::IdempotencyBody;
pub use config::{MAX_TTL, OnDisconnect, Persist, ServerErrors, Unstorable};
/// The `deadpool-postgres` this crate's PostgreSQL backend takes its pool
/// from (with `tokio-postgres` as `deadpool_postgres::tokio_postgres`).
///
/// ```no_run
/// use tower_idempotency::deadpool_postgres::{Config, Runtime};
/// use tower_idempotency::deadpool_postgres::tokio_postgres::NoTls;
/// use tower_idempotency::PostgresBackend;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config { url: Some("postgres://postgres@127.0.0.1/test".into()), ..Config::default() };
/// let backend = PostgresBackend::new(config.create_pool(Some(Runtime::Tokio1), NoTls)?);
/// # let _ = backend;
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use deadpool_postgres;
/// The `deadpool-redis` this crate's Redis backend takes its pool from
/// (with `redis` as `deadpool_redis::redis`).
///
/// ```no_run
/// use tower_idempotency::deadpool_redis::{Config, Runtime};
/// use tower_idempotency::RedisBackend;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Config::from_url("redis://127.0.0.1:6379").create_pool(Some(Runtime::Tokio1))?;
/// let backend = RedisBackend::new(pool);
/// # let _ = backend;
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use deadpool_redis;
#[cfg(feature = "axum")]
pub use extract::MissingIdempotencyKey;
pub use fence::FencingToken;
#[cfg(feature = "axum")]
pub use fence::NoFencingToken;
pub use fingerprint::Fingerprint;
pub use future::ResponseFuture;
pub use headers::{IDEMPOTENCY_TTL, IDEMPOTENT_REPLAYED};
pub use key::{IDEMPOTENCY_KEY, IdempotencyKey, KeyError, MAX_KEY_LEN, ScopeValue, StorageKey};
pub use layer::IdempotencyLayer;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub use observe::describe as describe_metrics;
pub use record::{CodecError, Record, RecordCodec};
pub use service::IdempotencyService;
pub use shutdown::{ShutdownHandle, ShutdownReport};
