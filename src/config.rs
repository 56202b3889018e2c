//! The layer's settings, their defaults, and the clamping of durations.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderName, Method, StatusCode, response};

use crate::fingerprint::BodyFingerprint;
use crate::key::Scope;
use crate::shutdown::ShutdownHandle;
use crate::wait::Waiting;

/// The longest TTL the layer and every backend accept: 366 days.
///
/// Longer TTLs ([`IdempotencyLayer::ttl`](crate::IdempotencyLayer::ttl),
/// [`Persist::For`], [`IdempotencyLayer::lock_ttl`](crate::IdempotencyLayer::lock_ttl),
/// or a duration handed to a [`Backend`](crate::Backend) directly) are
/// shortened to this, so `Duration::MAX` means "as long as possible", never a
/// panic or a silently refused write.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::MAX_TTL;
///
/// assert_eq!(MAX_TTL, Duration::from_hours(366 * 24));
/// ```
pub const MAX_TTL: Duration = Duration::from_hours(366 * 24);

/// The shortest lock TTL: shorter values are raised to it.
const MIN_LOCK_TTL: Duration = Duration::from_millis(3);

/// `ttl`, shortened to [`MAX_TTL`].
pub(crate) fn clamp_ttl(ttl: Duration) -> Duration {
    ttl.min(MAX_TTL)
}

type PersistFn = dyn Fn(&response::Parts) -> bool + Send + Sync;
pub(crate) type GrpcPersistFn = dyn Fn(i32) -> bool + Send + Sync;

/// What happens to a handler that already started when the client goes away
/// (the response future is dropped: the socket closed, an outer timeout
/// fired). Set with [`IdempotencyLayer::on_disconnect`](crate::IdempotencyLayer::on_disconnect).
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryBackend, OnDisconnect};
///
/// // Handlers that must not outlive their request (the old behaviour).
/// let layer = IdempotencyLayer::new(MemoryBackend::new()).on_disconnect(OnDisconnect::Cancel);
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnDisconnect {
    /// The handler runs to completion in the background, its response is
    /// stored (or the key released) by the usual rules, and the client's
    /// retry replays it. The default: a client that times out and retries is
    /// the case this crate exists for.
    #[default]
    Complete,
    /// The handler is dropped at its next `.await` and the key released, so a
    /// retry runs it again from the start. Choose this only for handlers
    /// whose work is safe to repeat after being cut off at any `.await`.
    Cancel,
}

/// What the layer keeps when the handler produced a response that cannot be
/// stored: larger than
/// [`max_stored_response`](crate::IdempotencyLayer::max_stored_response),
/// or a `text/event-stream`. Set with
/// [`IdempotencyLayer::unstorable`](crate::IdempotencyLayer::unstorable).
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryBackend, Unstorable};
///
/// // Retries of such responses run the handler again.
/// let layer = IdempotencyLayer::new(MemoryBackend::new()).unstorable(Unstorable::Release);
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unstorable {
    /// Store a "completed, response not kept" marker with the original
    /// status, so a retry does not run the handler again; it is answered with
    /// the [response not kept](crate::problem#response-not-kept) problem
    /// carrying that status. The default: the side effect happened.
    #[default]
    Mark,
    /// Release the key: a retry runs the handler again.
    Release,
}

/// What becomes of a `5xx` response: an ambiguous outcome, as the handler
/// may have failed before its side effect or after it (a timeout towards a
/// payment provider that charged anyway). Set with
/// [`IdempotencyLayer::server_errors`](crate::IdempotencyLayer::server_errors);
/// a [`Persist`] extension on the response still decides for itself. A
/// gRPC answer with `UNKNOWN`, `INTERNAL` or `DEADLINE_EXCEEDED` is treated
/// as a `5xx` (see [gRPC](crate::grpc#which-statuses-are-stored)); under
/// `Mark` its retries get the `UNKNOWN` status.
///
/// | policy | the client that got the `5xx` | a retry | the handler runs again |
/// |---|---|---|---|
/// | [`Retry`](Self::Retry) (default) | the `5xx` | runs the handler | yes |
/// | [`Replay`](Self::Replay) | the `5xx` | the same `5xx`, replayed | no |
/// | [`Mark`](Self::Mark) | the `5xx` | [outcome unknown](crate::problem#outcome-unknown), with the `5xx`'s status | no |
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryBackend, ServerErrors};
///
/// // A payment API whose handlers cannot tell whether a failed charge went through.
/// let layer = IdempotencyLayer::new(MemoryBackend::new()).server_errors(ServerErrors::Mark);
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerErrors {
    /// Not stored: the key is released and a retry runs the handler again
    /// (what [`persist_if`](crate::IdempotencyLayer::persist_if) says, which
    /// by default stores no `5xx`). Right where handlers fail before they do
    /// anything lasting, or where their side effects are idempotent
    /// themselves (the key passed on to the payment provider). On
    /// PostgreSQL's transaction mode the handler's writes roll back.
    #[default]
    Retry,
    /// Stored and replayed as it was, as Stripe does: a retry never runs the
    /// handler again; the client looks the outcome up, then uses a new key.
    /// On PostgreSQL's transaction mode the handler's writes commit with it.
    Replay,
    /// Not replayed, but never run again either: a retry is answered with
    /// the [outcome unknown](crate::problem#outcome-unknown) problem, with
    /// the status of the `5xx`. The client that got the `5xx` got the
    /// handler's own answer. On PostgreSQL's transaction mode the handler's
    /// writes commit with the mark.
    Mark,
}

/// A handler's say over whether its response is stored: insert it into the
/// response extensions.
///
/// It overrides the layer's [`persist_if`](crate::IdempotencyLayer::persist_if)
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
    /// layer's [`ttl`](crate::IdempotencyLayer::ttl); at most [`MAX_TTL`].
    For(Duration),
}

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
    /// The headers the user added with `fingerprint_headers`.
    pub(crate) extra_fingerprint_headers: Vec<HeaderName>,
    /// Whether `Content-Type` and `Content-Encoding` count.
    pub(crate) fingerprint_content_headers: bool,
    /// Every header fingerprinted besides `Authorization`: derived from the
    /// two settings above, once, so requests do not rebuild it.
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) include_authorization: bool,
    /// How the body enters the fingerprint.
    pub(crate) body_fingerprint: BodyFingerprint,
    pub(crate) scope: Scope,
    pub(crate) shared_anonymous_scope: bool,
    pub(crate) persist_if: Arc<PersistFn>,
    /// Which `grpc-status` codes are stored.
    pub(crate) grpc_persist_if: Arc<GrpcPersistFn>,
    /// gRPC methods (`/package.Service/Method`) whose requests stream:
    /// passed through untouched.
    pub(crate) grpc_streaming_requests: Vec<Box<str>>,
    pub(crate) server_errors: ServerErrors,
    pub(crate) fail_open: bool,
    pub(crate) on_disconnect: OnDisconnect,
    pub(crate) unstorable: Unstorable,
    pub(crate) unavailable_retry_after: Duration,
    /// How long the rest of a streamed body is read after its client left;
    /// `None`: the lock TTL.
    pub(crate) drain_timeout: Option<Duration>,
    /// Shared by every clone of the config: one shutdown per layer.
    pub(crate) shutdown: ShutdownHandle,
    /// Where duplicates of a request in flight wait; `None`: answered `409`.
    pub(crate) waiting: Option<Arc<Waiting>>,
    /// The header that tells how long a key is kept; `None`: not sent.
    pub(crate) retention_header: Option<HeaderName>,
}

impl Default for Config {
    fn default() -> Self {
        let mut config = Self {
            ttl: Duration::from_hours(24),
            lock_ttl: Duration::from_secs(10),
            heartbeat: true,
            methods: vec![Method::POST, Method::PATCH],
            required: false,
            max_request_body: 1024 * 1024,
            max_stored_response: 1024 * 1024,
            extra_fingerprint_headers: Vec::new(),
            fingerprint_content_headers: true,
            fingerprint_headers: Vec::new(),
            include_authorization: true,
            body_fingerprint: BodyFingerprint::Raw,
            scope: Scope::AuthorizationOrCookie,
            shared_anonymous_scope: false,
            persist_if: Arc::new(default_persist),
            grpc_persist_if: Arc::new(crate::grpc::persist_by_default),
            grpc_streaming_requests: Vec::new(),
            server_errors: ServerErrors::Retry,
            fail_open: false,
            on_disconnect: OnDisconnect::Complete,
            unstorable: Unstorable::Mark,
            unavailable_retry_after: Duration::from_secs(1),
            drain_timeout: None,
            shutdown: ShutdownHandle::new(),
            waiting: None,
            retention_header: None,
        };
        config.derive_fingerprint_headers();
        config
    }
}

impl Config {
    pub(crate) fn set_ttl(&mut self, ttl: Duration) {
        self.ttl = clamp_ttl(ttl);
    }

    pub(crate) fn set_lock_ttl(&mut self, lock_ttl: Duration) {
        self.lock_ttl = clamp_ttl(lock_ttl).max(MIN_LOCK_TTL);
    }

    /// How long the rest of a streamed body is read after its client left.
    pub(crate) fn drain_timeout(&self) -> Duration {
        self.drain_timeout.unwrap_or(self.lock_ttl)
    }

    /// How often the heartbeat extends a held lock.
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        (self.lock_ttl / 3).max(Duration::from_millis(1))
    }

    pub(crate) fn derive_fingerprint_headers(&mut self) {
        let content: &[HeaderName] = if self.fingerprint_content_headers {
            &[CONTENT_TYPE, CONTENT_ENCODING]
        } else {
            &[]
        };
        let mut all: Vec<HeaderName> = content.to_vec();
        for name in &self.extra_fingerprint_headers {
            if !all.contains(name) {
                all.push(name.clone());
            }
        }
        self.fingerprint_headers = all;
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
            .field("body_fingerprint", &self.body_fingerprint)
            .field("scope", &self.scope)
            .field("shared_anonymous_scope", &self.shared_anonymous_scope)
            .field("server_errors", &self.server_errors)
            .field("fail_open", &self.fail_open)
            .field("on_disconnect", &self.on_disconnect)
            .field("unstorable", &self.unstorable)
            .field("drain_timeout", &self.drain_timeout())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_clamped() {
        let mut c = Config::default();
        c.set_ttl(Duration::MAX);
        assert_eq!(c.ttl, MAX_TTL);
        c.set_lock_ttl(Duration::MAX);
        assert_eq!(c.lock_ttl, MAX_TTL);
        c.set_lock_ttl(Duration::ZERO);
        assert_eq!(c.lock_ttl, MIN_LOCK_TTL);
        c.set_ttl(Duration::from_secs(5));
        assert_eq!(c.ttl, Duration::from_secs(5));
    }

    #[test]
    fn the_heartbeat_beats_three_times_per_lock_ttl() {
        let mut c = Config::default();
        c.set_lock_ttl(Duration::from_secs(3));
        assert_eq!(c.heartbeat_interval(), Duration::from_secs(1));
        c.set_lock_ttl(Duration::ZERO);
        assert_eq!(c.heartbeat_interval(), Duration::from_millis(1));
    }

    #[test]
    fn server_errors_and_429_are_not_stored_by_default() {
        let persist = |status: u16| {
            let (parts, ()) = http::Response::builder()
                .status(status)
                .body(())
                .unwrap()
                .into_parts();
            default_persist(&parts)
        };
        for status in [200, 201, 204, 302, 400, 404, 409, 422, 428, 431] {
            assert!(persist(status), "{status} is stored");
        }
        for status in [429, 500, 502, 503, 599] {
            assert!(!persist(status), "{status} is not stored");
        }
    }

    #[test]
    fn debug_shows_the_settings() {
        let debug = format!("{:?}", Config::default());
        for field in [
            "ttl: 86400s",
            "lock_ttl: 10s",
            "heartbeat: true",
            "methods: [POST, PATCH]",
            "required: false",
            "max_request_body: 1048576",
            "max_stored_response: 1048576",
            "fingerprint_headers: [\"content-type\", \"content-encoding\"]",
            "include_authorization: true",
            "shared_anonymous_scope: false",
            "fail_open: false",
            "on_disconnect: Complete",
            "unstorable: Mark",
        ] {
            assert!(debug.contains(field), "{field} in {debug}");
        }
        assert!(debug.starts_with("Config {"), "{debug}");
    }

    #[test]
    fn content_headers_are_fingerprinted_by_default_and_extras_added_once() {
        let mut c = Config::default();
        assert_eq!(c.fingerprint_headers, [CONTENT_TYPE, CONTENT_ENCODING]);
        c.extra_fingerprint_headers = vec![HeaderName::from_static("x-tenant"), CONTENT_TYPE];
        c.derive_fingerprint_headers();
        assert_eq!(
            c.fingerprint_headers,
            [
                CONTENT_TYPE,
                CONTENT_ENCODING,
                HeaderName::from_static("x-tenant")
            ]
        );
        c.fingerprint_content_headers = false;
        c.derive_fingerprint_headers();
        assert_eq!(
            c.fingerprint_headers,
            [HeaderName::from_static("x-tenant"), CONTENT_TYPE]
        );
    }

    #[test]
    fn the_longest_ttl_is_366_days() {
        assert_eq!(MAX_TTL.as_secs(), 366 * 24 * 60 * 60);
    }
}
