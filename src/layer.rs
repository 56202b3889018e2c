//! [`IdempotencyLayer`] and its configuration.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode, request, response};
use tower::Layer;

use crate::key::Scope;
use crate::service::IdempotencyService;

type PersistFn = dyn Fn(&response::Parts) -> bool + Send + Sync;

/// The layer's settings, shared by every clone of the layer and its services.
#[derive(Clone)]
#[allow(clippy::struct_excessive_bools)] // independent switches, not a state machine
pub(crate) struct Config {
    pub(crate) ttl: Duration,
    pub(crate) lock_ttl: Duration,
    pub(crate) heartbeat: bool,
    pub(crate) methods: Vec<Method>,
    pub(crate) required: bool,
    pub(crate) max_request_body: usize,
    pub(crate) max_stored_response: usize,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) include_authorization: bool,
    pub(crate) scope: Scope,
    pub(crate) persist_if: Arc<PersistFn>,
    pub(crate) fail_open: bool,
    pub(crate) unavailable_retry_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ttl: Duration::from_hours(24),
            lock_ttl: Duration::from_secs(30),
            heartbeat: true,
            methods: vec![Method::POST, Method::PATCH],
            required: false,
            max_request_body: 1024 * 1024,
            max_stored_response: 1024 * 1024,
            fingerprint_headers: Vec::new(),
            include_authorization: true,
            scope: Scope::AuthorizationOrCookie,
            persist_if: Arc::new(default_persist),
            fail_open: false,
            unavailable_retry_after: Duration::from_secs(1),
        }
    }
}

/// Stores every response except `5xx` and `429 Too Many Requests`: those
/// describe a passing state of the server, and a retry should run again.
fn default_persist(parts: &response::Parts) -> bool {
    !(parts.status.is_server_error() || parts.status == StatusCode::TOO_MANY_REQUESTS)
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("ttl", &self.ttl)
            .field("lock_ttl", &self.lock_ttl)
            .field("heartbeat", &self.heartbeat)
            .field("methods", &self.methods)
            .field("required", &self.required)
            .field("max_request_body", &self.max_request_body)
            .field("max_stored_response", &self.max_stored_response)
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("include_authorization", &self.include_authorization)
            .field("scope", &self.scope)
            .field("fail_open", &self.fail_open)
            .finish_non_exhaustive()
    }
}

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
    /// `PATCH`, keeps responses 24 hours, locks for 30 seconds (extended
    /// while the handler runs), buffers request bodies up to 1 MiB and stores
    /// responses up to 1 MiB, scopes keys by `Authorization` (else `Cookie`),
    /// fails closed.
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

    /// How long a completed response is kept and replayed (default 24 hours).
    /// A handler can set its own with [`Persist::For`].
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|c| c.ttl = ttl)
    }

    /// How long a request holds its key before another may take it over
    /// (default 30 seconds). While the handler runs, the layer extends the
    /// lock every `lock_ttl / 3`, so this bounds how long a *crashed* holder
    /// blocks the key, not how long a handler may take. Values under 3 ms are
    /// raised to 3 ms.
    pub fn lock_ttl(self, lock_ttl: Duration) -> Self {
        self.with(|c| c.lock_ttl = lock_ttl.max(Duration::from_millis(3)))
    }

    /// Whether to extend the lock while the handler runs (default `true`).
    /// Without it a handler slower than [`lock_ttl`](Self::lock_ttl) loses
    /// its lock: a retry may then run concurrently, and the slow request's
    /// response is returned but not stored.
    pub fn heartbeat(self, enabled: bool) -> Self {
        self.with(|c| c.heartbeat = enabled)
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

    /// The largest response body stored (default 1 MiB). Larger responses
    /// are passed through to the client but not stored, and the key is
    /// released, so a retry runs the handler again.
    pub fn max_stored_response(self, bytes: usize) -> Self {
        self.with(|c| c.max_stored_response = bytes)
    }

    /// Request headers that must also match on a retry (for example
    /// `Content-Type`, or a tenant header). Method, path, query and body
    /// always count.
    pub fn fingerprint_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers = headers.into_iter().collect();
        self.with(|c| c.fingerprint_headers = headers)
    }

    /// Scopes keys by what `scope` returns for a request — the recommended
    /// set-up: return the authenticated principal (for example a user id an
    /// authentication layer put into the request extensions). Requests for
    /// which it returns `None` share one anonymous scope.
    ///
    /// The raw `Authorization` header then leaves the fingerprint: access
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
    pub fn scope_cookie(self, name: impl Into<String>) -> Self {
        let name: Arc<str> = Arc::from(name.into());
        self.with(|c| c.scope = Scope::Cookie(name))
    }

    /// Decides which responses are stored (default: all but `5xx` and `429`).
    /// A [`Persist`] marker in the response extensions overrides it.
    pub fn persist_if<F>(self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.with(|c| c.persist_if = Arc::new(predicate))
    }

    /// When the backend fails, run the handler unprotected instead of
    /// answering `503`. Choose this only where a duplicate is cheaper than an
    /// outage.
    pub fn fail_open(self) -> Self {
        self.with(|c| c.fail_open = true)
    }

    /// The backend this layer stores into.
    pub const fn backend(&self) -> &B {
        &self.backend
    }
}

impl<S, B: Clone> Layer<S> for IdempotencyLayer<B> {
    type Service = IdempotencyService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService::new(inner, self.backend.clone(), Arc::clone(&self.config))
    }
}

/// A handler's say over whether its response is stored: insert it into the
/// response extensions.
///
/// It overrides the layer's [`persist_if`](IdempotencyLayer::persist_if)
/// predicate, in both directions.
///
/// ```
/// use std::time::Duration;
/// use axum::{Extension, http::StatusCode, response::IntoResponse};
/// use tower_idempotency::Persist;
///
/// // A quote that is only valid for a minute: replay it for a minute only.
/// async fn quote() -> impl IntoResponse {
///     (Extension(Persist::For(Duration::from_mins(1))), "EUR 10.00")
/// }
///
/// // A result the client should not see again on a retry.
/// async fn preview() -> impl IntoResponse {
///     (StatusCode::OK, Extension(Persist::Never), "preview")
/// }
/// # let _ = (quote, preview);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Persist {
    /// Do not store this response; release the key so a retry runs again.
    Never,
    /// Store this response (whatever its status) for this long instead of the
    /// layer's [`ttl`](IdempotencyLayer::ttl).
    For(Duration),
}
