//! The responses the layer makes itself, as RFC 9457 `application/problem+json`.
//!
//! Every case has a stable `type` URI that points at its heading below, so a
//! client can match on `type` rather than on status or wording.
//!
//! # Missing key
//! `400 Bad Request`: the layer is [`required`](crate::IdempotencyLayer::required)
//! and the request has no `Idempotency-Key`.
//!
//! # Invalid key
//! `400 Bad Request`: the key is empty, longer than 255 bytes, not visible
//! ASCII, a malformed quoted string, or the header was sent twice. The
//! handler did not run and nothing was stored.
//!
//! # Request body error
//! `400 Bad Request`: the request body could not be read to the end.
//!
//! # Invalid body
//! `400 Bad Request`: the layer fingerprints this endpoint's request body
//! by its meaning rather than its bytes — as canonical JSON
//! ([`fingerprint_json`](crate::IdempotencyLayer::fingerprint_json)) or
//! with a function of the service's
//! ([`fingerprint_body_with`](crate::IdempotencyLayer::fingerprint_body_with))
//! — and this body has none: not valid JSON (or the same key twice in an
//! object, or nested deeper than 128 levels), or refused by the function,
//! whose reason is the `detail`. The handler did not run and nothing was
//! stored.
//!
//! # Body too large
//! `413 Content Too Large`: the body is over the layer's
//! [`max_request_body`](crate::IdempotencyLayer::max_request_body). Checked
//! before any lock is taken.
//!
//! # Fingerprint mismatch
//! `422 Unprocessable Content`: the key was used before with a different
//! request (method, path, query, body, credentials or a configured header).
//! A key names one request; make a new key for a new request.
//!
//! # Request in flight
//! `409 Conflict` with `Retry-After`: a request with this key is being
//! processed. `Retry-After` is the time until the key's lock runs out: by
//! then the request has finished (a retry gets its response), is still
//! running and has extended its lock (another `409`), or its process died
//! and the key is free (a retry runs). It never promises an answer sooner
//! than that; a client may retry earlier to pick up a quick response.
//!
//! # Stored response unreadable
//! `500 Internal Server Error`: a response is stored for this key, but it is
//! corrupt (it fails its checksum or does not decode). The request was
//! processed before; the handler does not run again, and retrying does not
//! help. An operator can drop the key's record (see the crate docs,
//! "Operations"); until then, or until it expires, this is the answer.
//!
//! # Stored response incompatible
//! `503 Service Unavailable` with `Retry-After`: a response is stored for
//! this key in a format this instance cannot read (written by a newer
//! version during a rollback, or larger than this instance's
//! `max_record_size`). Another instance may read it: retry. The handler does
//! not run again.
//!
//! # Unidentified caller
//! `400 Bad Request`: the layer scopes keys by a caller identity (a
//! [`scope`](crate::IdempotencyLayer::scope) function or a
//! [`scope_cookie`](crate::IdempotencyLayer::scope_cookie)) and this request
//! has none, so its key cannot be told apart from another caller's. The
//! handler did not run. Send the request authenticated; on the server side,
//! check that authentication runs *before* this layer, or opt into
//! [`shared_anonymous_scope`](crate::IdempotencyLayer::shared_anonymous_scope).
//!
//! # Response not kept
//! A retry of a request that was processed, but whose response could not be
//! stored (larger than
//! [`max_stored_response`](crate::IdempotencyLayer::max_stored_response),
//! or an event stream). The status is the original
//! response's status, the handler did not run again, and
//! `Idempotent-Replayed: true` is set. To repeat the operation, send a new
//! key.
//!
//! # Backend unavailable
//! `503 Service Unavailable` with `Retry-After`: the idempotency store could
//! not be reached, so the request was not run (the layer fails closed unless
//! [`fail_open`](crate::IdempotencyLayer::fail_open) is set).
//!
//! # Shutting down
//! `503 Service Unavailable` with `Retry-After`: this instance is shutting
//! down (see [`ShutdownHandle`](crate::ShutdownHandle)) and took no new
//! request; the handler did not run. Retry with the same key: another
//! instance serves it. The same problem answers a request whose handler was
//! cut off by the shutdown on a backend that rolls the handler's effects
//! back (PostgreSQL's transaction mode): nothing was committed.
//!
//! # Interrupted
//! `500 Internal Server Error`: the handler was still running when its
//! instance shut down and its grace period ended, so it was cut off at an
//! `.await`. How far it got is unknown — its side effects may or may not
//! have happened — so this answer is stored for the key and a retry gets it
//! (with `Idempotent-Replayed: true`) instead of running the handler a
//! second time. Check the operation's outcome by other means (look the
//! payment up, say) before sending a new key.
//!
//! # Outcome unknown
//! The status of the first attempt's `5xx` (with `Idempotent-Replayed:
//! true`): the layer is configured with
//! [`ServerErrors::Mark`](crate::ServerErrors::Mark), the first attempt of
//! this request failed with a server error, and whether it took effect is
//! unknown — so it is not run again with this key. Look the outcome up (the
//! payment, the order) before sending the request again with a new key.
//!
//! # Transaction aborted
//! `500 Internal Server Error`: the handler wrote through the request's
//! transaction (PostgreSQL's transaction mode), one of its statements
//! failed, and the handler carried on and answered with a success. The
//! failed statement aborted the transaction, so none of its writes were
//! committed and the success is not true; nothing was stored and the key is
//! free. A retry fails the same way until the handler is fixed: wrap
//! statements that may fail in a `SAVEPOINT` and roll back to it. (A handler
//! that answers such a failure with a `4xx` of its own, or a gRPC handler
//! with a definite error status, gets that answer through, not stored.)

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

/// Where the `type` URIs point.
const TYPE_BASE: &str =
    "https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/index.html#";

/// The cases the layer answers on its own.
///
/// ```
/// use http::StatusCode;
/// use tower_idempotency::problem::ProblemKind;
///
/// assert_eq!(ProblemKind::InFlight.status(), StatusCode::CONFLICT);
/// assert!(ProblemKind::FingerprintMismatch.type_uri().ends_with("#fingerprint-mismatch"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// See [Missing key](self#missing-key).
    MissingKey,
    /// See [Invalid key](self#invalid-key).
    InvalidKey,
    /// See [Request body error](self#request-body-error).
    RequestBodyError,
    /// See [Body too large](self#body-too-large).
    BodyTooLarge,
    /// See [Invalid body](self#invalid-body).
    InvalidBody,
    /// See [Fingerprint mismatch](self#fingerprint-mismatch).
    FingerprintMismatch,
    /// See [Request in flight](self#request-in-flight).
    InFlight,
    /// See [Backend unavailable](self#backend-unavailable).
    BackendUnavailable,
    /// See [Unidentified caller](self#unidentified-caller).
    UnidentifiedCaller,
    /// See [Stored response unreadable](self#stored-response-unreadable).
    StoredResponseUnreadable,
    /// See [Stored response incompatible](self#stored-response-incompatible).
    StoredResponseIncompatible,
    /// See [Response not kept](self#response-not-kept). Its status is the
    /// original response's; [`status`](Self::status) gives `200 OK` for it.
    ResponseNotKept,
    /// See [Shutting down](self#shutting-down).
    ShuttingDown,
    /// See [Interrupted](self#interrupted).
    Interrupted,
    /// See [Transaction aborted](self#transaction-aborted).
    TransactionAborted,
    /// See [Outcome unknown](self#outcome-unknown). Its status is the
    /// first attempt's `5xx`; [`status`](Self::status) gives `500`.
    OutcomeUnknown,
}

impl ProblemKind {
    /// The status code the layer answers with.
    #[must_use]
    pub const fn status(self) -> StatusCode {
        match self {
            Self::MissingKey
            | Self::InvalidKey
            | Self::RequestBodyError
            | Self::InvalidBody
            | Self::UnidentifiedCaller => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::FingerprintMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InFlight => StatusCode::CONFLICT,
            Self::BackendUnavailable | Self::StoredResponseIncompatible | Self::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::StoredResponseUnreadable
            | Self::Interrupted
            | Self::TransactionAborted
            | Self::OutcomeUnknown => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ResponseNotKept => StatusCode::OK,
        }
    }

    /// The fragment of the stable `type` URI.
    const fn slug(self) -> &'static str {
        match self {
            Self::MissingKey => "missing-key",
            Self::InvalidKey => "invalid-key",
            Self::RequestBodyError => "request-body-error",
            Self::BodyTooLarge => "body-too-large",
            Self::InvalidBody => "invalid-body",
            Self::FingerprintMismatch => "fingerprint-mismatch",
            Self::InFlight => "request-in-flight",
            Self::BackendUnavailable => "backend-unavailable",
            Self::UnidentifiedCaller => "unidentified-caller",
            Self::ResponseNotKept => "response-not-kept",
            Self::StoredResponseUnreadable => "stored-response-unreadable",
            Self::StoredResponseIncompatible => "stored-response-incompatible",
            Self::ShuttingDown => "shutting-down",
            Self::Interrupted => "interrupted",
            Self::TransactionAborted => "transaction-aborted",
            Self::OutcomeUnknown => "outcome-unknown",
        }
    }

    /// The stable `type` URI of the problem document.
    #[must_use]
    pub fn type_uri(self) -> String {
        format!("{TYPE_BASE}{}", self.slug())
    }

    /// The short human-readable summary (`title`).
    #[must_use]
    pub const fn title(self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency-Key header is required",
            Self::InvalidKey => "Invalid Idempotency-Key header",
            Self::RequestBodyError => "Request body could not be read",
            Self::BodyTooLarge => "Request body too large",
            Self::InvalidBody => "Request body not accepted",
            Self::FingerprintMismatch => "Idempotency-Key reused with a different request",
            Self::InFlight => "A request with this Idempotency-Key is in progress",
            Self::BackendUnavailable => "Idempotency store unavailable",
            Self::UnidentifiedCaller => "Idempotency-Key needs an identified caller",
            Self::ResponseNotKept => "Request processed; its response was not kept",
            Self::StoredResponseUnreadable => {
                "Request processed; its stored response is unreadable"
            }
            Self::StoredResponseIncompatible => {
                "Request processed; its stored response cannot be read here"
            }
            Self::ShuttingDown => "Service shutting down",
            Self::Interrupted => "Request interrupted; its outcome is unknown",
            Self::TransactionAborted => "The request's transaction failed; nothing was committed",
            Self::OutcomeUnknown => "Request failed; its outcome is unknown",
        }
    }
}

/// Builds the problem response; `detail` must not echo client input verbatim
/// beyond what [`json_string`] escapes.
pub(crate) fn response(
    kind: ProblemKind,
    detail: &str,
    retry_after: Option<Duration>,
) -> Response<Bytes> {
    response_with_status(kind, kind.status(), detail, retry_after)
}

/// Marks a response as the layer's own problem answer, so that it can be
/// answered in gRPC's terms to a gRPC request.
#[derive(Clone, Debug)]
pub(crate) struct Answered {
    pub(crate) kind: ProblemKind,
    pub(crate) detail: Box<str>,
    pub(crate) retry_after: Option<Duration>,
}

/// [`response`] with a status other than the kind's own (the original
/// status of a response that was not kept).
pub(crate) fn response_with_status(
    kind: ProblemKind,
    status: StatusCode,
    detail: &str,
    retry_after: Option<Duration>,
) -> Response<Bytes> {
    let body = format!(
        "{{\"type\":{},\"title\":{},\"status\":{},\"detail\":{}}}",
        json_string(&kind.type_uri()),
        json_string(kind.title()),
        status.as_u16(),
        json_string(detail),
    );
    let mut res = Response::new(Bytes::from(body));
    *res.status_mut() = status;
    res.extensions_mut().insert(Answered {
        kind,
        detail: detail.into(),
        retry_after,
    });
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(after) = retry_after {
        res.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(after)));
    }
    res
}

/// Whole seconds, rounded up, at least 1.
pub(crate) fn retry_after_secs(after: Duration) -> u64 {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    secs.max(1)
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_rounds() {
        assert_eq!(json_string("a\"b\\\n"), r#""a\"b\\\u000a""#);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        let res = response(ProblemKind::InFlight, "x", Some(Duration::from_secs(3)));
        assert_eq!(res.status(), 409);
        assert_eq!(res.headers()[RETRY_AFTER], "3");
    }

    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        assert_eq!(json_string("\u{1f} \u{7f}é/"), "\"\\u001f \u{7f}é/\"");
    }

    /// Each kind: status, `type` fragment (its heading in the module docs), title.
    const CASES: [(ProblemKind, u16, &str, &str); 16] = {
        use ProblemKind::*;
        [
            (
                MissingKey,
                400,
                "missing-key",
                "Idempotency-Key header is required",
            ),
            (
                InvalidKey,
                400,
                "invalid-key",
                "Invalid Idempotency-Key header",
            ),
            (
                RequestBodyError,
                400,
                "request-body-error",
                "Request body could not be read",
            ),
            (
                BodyTooLarge,
                413,
                "body-too-large",
                "Request body too large",
            ),
            (
                FingerprintMismatch,
                422,
                "fingerprint-mismatch",
                "Idempotency-Key reused with a different request",
            ),
            (
                InFlight,
                409,
                "request-in-flight",
                "A request with this Idempotency-Key is in progress",
            ),
            (
                BackendUnavailable,
                503,
                "backend-unavailable",
                "Idempotency store unavailable",
            ),
            (
                UnidentifiedCaller,
                400,
                "unidentified-caller",
                "Idempotency-Key needs an identified caller",
            ),
            (
                StoredResponseUnreadable,
                500,
                "stored-response-unreadable",
                "Request processed; its stored response is unreadable",
            ),
            (
                StoredResponseIncompatible,
                503,
                "stored-response-incompatible",
                "Request processed; its stored response cannot be read here",
            ),
            (
                ResponseNotKept,
                200,
                "response-not-kept",
                "Request processed; its response was not kept",
            ),
            (ShuttingDown, 503, "shutting-down", "Service shutting down"),
            (
                InvalidBody,
                400,
                "invalid-body",
                "Request body not accepted",
            ),
            (
                OutcomeUnknown,
                500,
                "outcome-unknown",
                "Request failed; its outcome is unknown",
            ),
            (
                Interrupted,
                500,
                "interrupted",
                "Request interrupted; its outcome is unknown",
            ),
            (
                TransactionAborted,
                500,
                "transaction-aborted",
                "The request's transaction failed; nothing was committed",
            ),
        ]
    };

    /// Each kind's status, `type` (its heading in the module docs) and title,
    /// as the document carries them.
    #[test]
    fn every_kind_answers_its_own_document() {
        let cases = CASES;
        for (kind, status, slug, title) in cases {
            assert_eq!(kind.status(), status, "{kind:?}");
            assert_eq!(kind.type_uri(), format!("{TYPE_BASE}{slug}"));
            assert_eq!(kind.title(), title);
            let res = response(kind, "d", None);
            assert_eq!(res.status(), status, "{kind:?}");
            assert_eq!(res.headers()[CONTENT_TYPE], "application/problem+json");
            assert!(res.headers().get(RETRY_AFTER).is_none());
            assert_eq!(
                res.body(),
                &format!(
                    "{{\"type\":\"{TYPE_BASE}{slug}\",\"title\":\"{title}\",\"status\":{status},\"detail\":\"d\"}}"
                )
            );
        }
    }
}
