//! [`IdempotencyLayer`] and its configuration.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, request, response};
use tower::Layer;

use crate::config::{Config, OnDisconnect, ServerErrors, Unstorable};
use crate::fingerprint::BodyFingerprint;
use crate::key::Scope;
use crate::service::IdempotencyService;
use crate::shutdown::ShutdownHandle;

/// Makes requests that carry an `Idempotency-Key` run exactly once.
///
/// See the [crate documentation](crate) for the request flow and the
/// guarantees. Cloning is cheap: the settings live behind an [`Arc`].
///
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
///
/// async fn create_payment() -> &'static str { "created" }
///
/// let app: Router = Router::new()
///     .route("/payments", post(create_payment))
///     .layer(
///         IdempotencyLayer::new(MemoryBackend::new())
///             .ttl(Duration::from_hours(24))
///             .max_request_body(64 * 1024),
///     );
/// # let _ = app;
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct IdempotencyLayer<B> {
    backend: B,
    config: Arc<Config>,
}

impl<B> IdempotencyLayer<B> {
    /// A layer storing into `backend`, with the defaults: guards `POST` and
    /// `PATCH`, keeps responses 24 hours, locks for 10 seconds (extended
    /// while the handler runs), finishes a started handler when the client
    /// goes away, buffers request bodies up to 1 MiB and stores responses up
    /// to 1 MiB, scopes keys by `Authorization` (else `Cookie`), fingerprints
    /// `Content-Type` and `Content-Encoding` with the request, fails closed.
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            config: Arc::new(Config::default()),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// How long a completed response is kept and replayed (default 24 hours,
    /// at most [`MAX_TTL`](crate::MAX_TTL)). A handler can set its own with
    /// [`Persist::For`](crate::Persist::For).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|c| c.set_ttl(ttl))
    }

    /// How long a request holds its key before another may take it over
    /// (default 10 seconds). While the handler runs, the layer extends the
    /// lock every `lock_ttl / 3`, so this bounds how long a *crashed* holder
    /// (a process killed mid-handler) blocks the key, not how long a handler
    /// may take. Values under 3 ms are raised to 3 ms, values over
    /// [`MAX_TTL`](crate::MAX_TTL) lowered to it.
    pub fn lock_ttl(self, lock_ttl: Duration) -> Self {
        self.with(|c| c.set_lock_ttl(lock_ttl))
    }

    /// Whether to extend the lock while the handler runs (default `true`).
    /// Without it a handler slower than [`lock_ttl`](Self::lock_ttl) loses
    /// its lock: a retry may then run concurrently, and the slow request's
    /// response is returned but not stored.
    pub fn heartbeat(self, enabled: bool) -> Self {
        self.with(|c| c.heartbeat = enabled)
    }

    /// What happens to a started handler when the client goes away (default
    /// [`OnDisconnect::Complete`]: it runs to completion and its response is
    /// stored for the retry).
    pub fn on_disconnect(self, behaviour: OnDisconnect) -> Self {
        self.with(|c| c.on_disconnect = behaviour)
    }

    /// The methods the layer guards (default `POST` and `PATCH`). Other
    /// methods pass straight through.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with(|c| c.methods = methods)
    }

    /// Answer guarded requests without an `Idempotency-Key` with `400`
    /// instead of passing them through unprotected.
    pub fn required(self) -> Self {
        self.with(|c| c.required = true)
    }

    /// The largest request body buffered for the fingerprint (default
    /// 1 MiB). Larger bodies are answered `413` before any lock is taken.
    pub fn max_request_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_request_body = bytes)
    }

    /// The largest response body stored (default 1 MiB). A larger response
    /// is passed through to the client but not stored; by default a
    /// "response not kept" marker is stored in its place so a retry does not
    /// run the handler again (see [`unstorable`](Self::unstorable)).
    pub fn max_stored_response(self, bytes: usize) -> Self {
        self.with(|c| c.max_stored_response = bytes)
    }

    /// What to keep when a response cannot be stored (over
    /// [`max_stored_response`](Self::max_stored_response), or a
    /// `text/event-stream`): a marker that answers retries without running
    /// the handler ([`Unstorable::Mark`], the default), or nothing
    /// ([`Unstorable::Release`]).
    pub fn unstorable(self, what: Unstorable) -> Self {
        self.with(|c| c.unstorable = what)
    }

    /// Request headers that must also match on a retry (for example a
    /// tenant header), besides `Content-Type` and `Content-Encoding` (see
    /// [`fingerprint_content_headers`](Self::fingerprint_content_headers)).
    /// Method, path, query and body always count.
    pub fn fingerprint_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers = headers.into_iter().collect();
        self.with(|c| {
            c.extra_fingerprint_headers = headers;
            c.derive_fingerprint_headers();
        })
    }

    /// Whether `Content-Type` and `Content-Encoding` are part of the
    /// fingerprint (default `true`): they change what the body bytes mean,
    /// so a retry that corrects them (a `415` answered for a missing
    /// `Content-Type`, say) is answered `422` — use a new key — instead of
    /// replaying the stale error.
    pub fn fingerprint_content_headers(self, enabled: bool) -> Self {
        self.with(|c| {
            c.fingerprint_content_headers = enabled;
            c.derive_fingerprint_headers();
        })
    }

    /// Fingerprints the body of a JSON request by its canonical form rather
    /// than its bytes, so that a retry whose client library re-serialised the
    /// body — members in another order, other whitespace, other escapes in
    /// strings — is still the same request and replays.
    ///
    /// The canonical form sorts object members by key and drops
    /// insignificant whitespace; numbers count **as written**: `1`, `1.0` and
    /// `1e0` are three different requests (no number is rounded into
    /// another, so no two amounts can ever be taken for the same). A body
    /// that is not valid JSON, nests deeper than 128 levels or has an
    /// object with the same key twice is answered `400`
    /// ([invalid body](crate::problem#invalid-body)) before anything is
    /// looked up or run; an empty body is fingerprinted as empty.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
    ///
    /// let layer = IdempotencyLayer::new(MemoryBackend::new()).fingerprint_json();
    /// # let _ = layer;
    /// ```
    #[cfg(feature = "json")]
    #[cfg_attr(docsrs, doc(cfg(feature = "json")))]
    pub fn fingerprint_json(self) -> Self {
        self.with(|c| c.body_fingerprint = BodyFingerprint::CanonicalJson)
    }

    /// Fingerprints what `f` makes of the request body instead of the body
    /// itself: leave out a field the client sets anew on every retry (a
    /// timestamp, a nonce), or fingerprint only the part that names the
    /// operation. `Err(reason)` refuses the request with `400`
    /// ([invalid body](crate::problem#invalid-body), `reason` as the detail:
    /// it is shown to the client) before anything is looked up or run.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
    ///
    /// // Every line but the `sent_at=` one.
    /// let layer = IdempotencyLayer::new(MemoryBackend::new()).fingerprint_body_with(
    ///     |_req: &http::request::Parts, body: &[u8]| {
    ///         let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_owned())?;
    ///         Ok(text
    ///             .lines()
    ///             .filter(|line| !line.starts_with("sent_at="))
    ///             .collect::<Vec<_>>()
    ///             .join("\n")
    ///             .into_bytes())
    ///     },
    /// );
    /// # let _ = layer;
    /// ```
    pub fn fingerprint_body_with<F>(self, f: F) -> Self
    where
        F: Fn(&request::Parts, &[u8]) -> Result<Vec<u8>, String> + Send + Sync + 'static,
    {
        self.with(|c| c.body_fingerprint = BodyFingerprint::custom(f))
    }

    /// Scopes keys by what `scope` returns for a request — the recommended
    /// set-up: return the authenticated principal (for example a user id an
    /// authentication layer put into the request extensions).
    ///
    /// A request for which it returns `None` is answered `400` with the
    /// [unidentified caller](crate::problem#unidentified-caller) problem and
    /// the handler does not run: `None` usually means the authentication
    /// layer sits *inside* this one by mistake, and sharing one scope would
    /// replay one user's response to another. Opt into one shared scope for
    /// such requests with [`shared_anonymous_scope`](Self::shared_anonymous_scope).
    ///
    /// The raw `Authorization` header leaves the fingerprint: access
    /// tokens rotate, and a retry that carries a refreshed token for the same
    /// principal must replay, not be answered `422`. (Add `Authorization` to
    /// [`fingerprint_headers`](Self::fingerprint_headers) to keep it.)
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
    ///
    /// /// Put into the request extensions by the authentication layer.
    /// #[derive(Clone)]
    /// struct UserId(u64);
    ///
    /// let layer = IdempotencyLayer::new(MemoryBackend::new())
    ///     .scope(|req: &http::request::Parts| {
    ///         req.extensions.get::<UserId>().map(|u| u.0.to_string())
    ///     });
    /// # let _ = layer;
    /// ```
    pub fn scope<F, S>(self, scope: F) -> Self
    where
        F: Fn(&request::Parts) -> Option<S> + Send + Sync + 'static,
        S: AsRef<[u8]>,
    {
        let f = move |parts: &request::Parts| scope(parts).map(|s| s.as_ref().to_vec());
        self.with(|c| {
            c.scope = Scope::Custom(Arc::new(f));
            c.include_authorization = false;
        })
    }

    /// Scopes keys by the value of one cookie, typically the session cookie.
    ///
    /// Prefer this to the default fallback on the whole `Cookie` header when
    /// callers are identified by a cookie: an analytics cookie that changes
    /// between two retries would otherwise make them two different callers.
    /// A request without the cookie (or with an empty value) is answered like
    /// a [`scope`](Self::scope) function returning `None`.
    pub fn scope_cookie(self, name: impl Into<String>) -> Self {
        let name: Arc<str> = Arc::from(name.into());
        self.with(|c| c.scope = Scope::Cookie(name))
    }

    /// With [`scope`](Self::scope) or [`scope_cookie`](Self::scope_cookie):
    /// requests without an identity share one anonymous scope instead of
    /// being answered `400`. Right when such keys are unique by construction
    /// — signed webhooks keyed by their event id, say — and wrong for keys
    /// that clients choose, which may then collide across callers.
    pub fn shared_anonymous_scope(self) -> Self {
        self.with(|c| c.shared_anonymous_scope = true)
    }

    /// What becomes of a `5xx` response (or a gRPC `UNKNOWN`, `INTERNAL`,
    /// `DEADLINE_EXCEEDED`), an ambiguous outcome (default
    /// [`ServerErrors::Retry`]: not stored, a retry runs again): see
    /// [`ServerErrors`] for the trade.
    pub fn server_errors(self, policy: ServerErrors) -> Self {
        self.with(|c| c.server_errors = policy)
    }

    /// Decides which responses are stored (default: all but `5xx` and `429`).
    /// A [`Persist`](crate::Persist) marker in the response extensions
    /// overrides it. A gRPC response (always `200`) is then also decided by
    /// its `grpc-status`: see [`grpc_persist_if`](Self::grpc_persist_if).
    pub fn persist_if<F>(self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.with(|c| c.persist_if = Arc::new(predicate))
    }

    /// Decides which gRPC responses are stored, by their `grpc-status`
    /// (default [`grpc::persist_by_default`](crate::grpc::persist_by_default):
    /// `OK` and the definite failures, not the retryable or ambiguous
    /// codes). See [gRPC](crate::grpc#which-statuses-are-stored).
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
    ///
    /// // Store successes only: every other status runs again on retry
    /// // (with the default `server_errors`).
    /// let layer = IdempotencyLayer::new(MemoryBackend::new())
    ///     .grpc_persist_if(|code| code == tonic::Code::Ok as i32);
    /// # let _ = layer;
    /// ```
    pub fn grpc_persist_if<F>(self, predicate: F) -> Self
    where
        F: Fn(i32) -> bool + Send + Sync + 'static,
    {
        self.with(|c| c.grpc_persist_if = Arc::new(predicate))
    }

    /// gRPC methods whose requests are streams (client-streaming and
    /// bidirectional RPCs), as paths `/package.Service/Method`: their calls
    /// pass through untouched, with or without a key. Every other gRPC
    /// method is guarded; see [streaming
    /// requests](crate::grpc#streaming-requests) for why that is the
    /// default. Adds to the methods named before.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
    ///
    /// let layer = IdempotencyLayer::new(MemoryBackend::new())
    ///     .grpc_streaming_requests(["/chat.v1.Chat/Converse", "/files.v1.Files/Upload"]);
    /// # let _ = layer;
    /// ```
    pub fn grpc_streaming_requests<I, M>(self, methods: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        let methods: Vec<Box<str>> = methods
            .into_iter()
            .map(|m| m.into().into_boxed_str())
            .collect();
        self.with(|c| c.grpc_streaming_requests.extend(methods))
    }

    /// When the backend fails, run the handler unprotected instead of
    /// answering `503`. Choose this only where a duplicate is cheaper than an
    /// outage.
    pub fn fail_open(self) -> Self {
        self.with(|c| c.fail_open = true)
    }

    /// How long the rest of a streamed response (one without a known
    /// length) is still read and stored after its client stopped reading
    /// (default: the [`lock_ttl`](Self::lock_ttl)). A response that does not
    /// end by then — a long poll, an NDJSON watch that only ends when its
    /// client goes away — is not stored: it is settled like a response too
    /// large to store (a "response not kept" marker, see
    /// [`unstorable`](Self::unstorable)), and the handler's body is dropped.
    /// Without a bound such a stream would hold its key, and every retry
    /// would be answered `409`, for as long as the upstream stays open.
    pub fn drain_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.drain_timeout = Some(timeout))
    }

    /// Lets a duplicate of a request still in flight wait up to `max` for
    /// its result and replay it, instead of the immediate `409` (default:
    /// no wait). At the bound it gets the `409` with `Retry-After`; if the
    /// request in flight ends without storing (its key released, or its
    /// lock lapsed), the waiting duplicate takes the key and runs.
    ///
    /// It works across instances: the duplicates of a key that wait in one
    /// process poll the backend together — one `begin` per poll interval
    /// (25 ms growing to 500 ms, jittered) per key and process, however many
    /// requests wait — and hold no backend connection between polls. A
    /// holder in the same process wakes them the moment it stores or
    /// releases. A shutdown ends the waits at once with the `409`. A poll
    /// that fails counts as busy: the wait goes on, and never runs the
    /// handler, not even with [`fail_open`](Self::fail_open).
    ///
    /// Why polling, and not Redis pub/sub or keyspace notifications, or
    /// PostgreSQL's `LISTEN`/`NOTIFY`: the poll is the `begin` every backend
    /// already has, so it works the same on Redis, on each PostgreSQL mode,
    /// on the memory backend and on a backend of your own; it needs no
    /// connection kept open per instance, no server configuration
    /// (keyspace notifications need `notify-keyspace-events`, which managed
    /// Redis services often refuse) and works behind PgBouncer's
    /// transaction mode, where `LISTEN` does not; and it adds nothing to
    /// requests that do not wait (a `NOTIFY` on every store would serialise
    /// PostgreSQL's commits). Its cost is bounded per key and process, not
    /// per waiter: about seven polls over a 600 ms wait whether one or a
    /// thousand requests wait (see `BENCHMARKS.md`). A duplicate on another
    /// instance sees the response at its room's next poll: at most 625 ms
    /// (500 ms and its jitter) after it was stored.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
    ///
    /// // Clients that cannot handle 409 get the original response instead.
    /// let layer = IdempotencyLayer::new(MemoryBackend::new())
    ///     .wait_for_in_flight(Duration::from_secs(10));
    /// # let _ = layer;
    /// ```
    pub fn wait_for_in_flight(self, max: Duration) -> Self {
        let max = crate::config::clamp_ttl(max);
        self.with(|c| {
            c.waiting = (!max.is_zero()).then(|| Arc::new(crate::wait::Waiting::new(max)));
        })
    }

    /// Tells clients how long their key is kept: every answer to a keyed
    /// request — fresh, replayed, `409` and `422` — carries
    /// [`Idempotency-TTL`](crate::IDEMPOTENCY_TTL) with the seconds until
    /// the key's record expires (the header proposed in the IETF httpapi
    /// working group's discussion of the Idempotency-Key draft, issue 49).
    /// See [`retention_header_named`](Self::retention_header_named) for
    /// what each answer says.
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
    ///
    /// let layer = IdempotencyLayer::new(MemoryBackend::new()).retention_header();
    /// # let _ = layer;
    /// ```
    pub fn retention_header(self) -> Self {
        self.retention_header_named(crate::IDEMPOTENCY_TTL)
    }

    /// [`retention_header`](Self::retention_header) under another name.
    /// The value is whole seconds (`delta-seconds`, like `Retry-After`):
    ///
    /// - a fresh response that is stored: the TTL it is stored for (a
    ///   [`Persist::For`](crate::Persist::For) of its own included);
    /// - a fresh response that is not stored (a `5xx` under
    ///   [`ServerErrors::Retry`](crate::ServerErrors::Retry), a lock lost):
    ///   `0`, the key is not kept and a retry runs again;
    /// - a response whose store failed (its outcome unknown), and a
    ///   streamed response (sent before it is stored): no header;
    /// - a replay, and a `422` for a key used with another request: the
    ///   seconds left until the stored record expires, counted down from
    ///   the TTL its fresh answer announced (which is stored with it); no
    ///   header for a record stored while the header was off, or a
    ///   "response not kept" marker;
    /// - a `409`: the layer's [`ttl`](Self::ttl), the longest the response
    ///   will be kept once the request in flight stores it (it may store
    ///   nothing, or keep its response for less).
    ///
    /// The memory backend may drop records before their TTL under memory
    /// pressure (not before its
    /// [minimum retention](crate::MemoryBackendBuilder::min_retention)).
    /// Turned off, the header is no longer sent, and `Idempotency-TTL` is
    /// taken off replays of records stored while it was on (a renamed
    /// header is not: it is replayed as the handler's own).
    pub fn retention_header_named(self, name: HeaderName) -> Self {
        self.with(|c| c.retention_header = Some(name))
    }

    /// A handle that shuts this layer down gracefully: new keyed requests
    /// are refused, and what runs is finished or settled before the process
    /// exits. Every service the layer makes (before or after this call)
    /// shares it. See [`ShutdownHandle`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyLayer, MemoryBackend};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let layer = IdempotencyLayer::new(MemoryBackend::new());
    /// let shutdown = layer.shutdown_handle();
    /// // … serve with `layer` until SIGTERM, then:
    /// let report = shutdown.shutdown(Duration::from_secs(20)).await;
    /// assert!(report.is_clean());
    /// # }
    /// ```
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.config.shutdown.clone()
    }

    /// The backend this layer stores into.
    pub const fn backend(&self) -> &B {
        &self.backend
    }
}

impl<S, B: Clone> Layer<S> for IdempotencyLayer<B> {
    type Service = IdempotencyService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService::with_config(inner, self.backend.clone(), Arc::clone(&self.config))
    }
}
