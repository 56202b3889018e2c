//! gRPC: the same exactly-once guarantee for [tonic] services.
//!
//! gRPC metadata travel as HTTP/2 headers, so a client that sends an
//! `idempotency-key` metadata entry reaches the layer like any HTTP client.
//! Add the layer to tonic's server:
//!
//! ```
//! use tower_idempotency::{IdempotencyLayer, MemoryBackend};
//!
//! let layer = IdempotencyLayer::new(MemoryBackend::new());
//! let server = tonic::transport::Server::builder().layer(layer);
//! # let _ = server;
//! ```
//!
//! A request is gRPC when its `content-type` is `application/grpc` or
//! `application/grpc+<codec>` (`+proto`, `+json`, …). For such a request the
//! layer speaks gRPC:
//!
//! # The response is kept whole
//!
//! A gRPC response ends with trailers (`grpc-status`, `grpc-message` and the
//! handler's own trailing metadata). The record keeps them, and a replay
//! sends the stored initial metadata, messages and trailers exactly as the
//! first answer had them, with `idempotent-replayed: true` in its initial
//! metadata. A trailers-only response (an error with no message) is
//! replayed as a trailers-only response. A server-streaming response is
//! stored like any streamed HTTP body: forwarded as it is produced, stored
//! at its end if it stayed within
//! [`max_stored_response`](crate::IdempotencyLayer::max_stored_response),
//! and otherwise marked "not kept".
//!
//! Serve with `TCP_NODELAY`, as tonic's `Server::serve` does. A response
//! whose length is not known in advance (every tonic response) is
//! forwarded as it is produced and its trailers only once its record is
//! stored, in a write of their own; with Nagle's algorithm on, the kernel
//! holds that write until the client acknowledges the data before it,
//! which clients delay by up to 40 ms. A listener of your own passed to
//! `serve_with_incoming` needs
//! `TcpIncoming::from(listener).with_nodelay(Some(true))`.
//!
//! # Which statuses are stored
//!
//! A gRPC error is a `200 OK` whose trailers carry a non-zero
//! `grpc-status`, so the HTTP policy ([`persist_if`]) cannot tell a success
//! from a failure. A gRPC answer (HTTP status `200`) is therefore stored or
//! not by its `grpc-status`, read from the trailers (or from the headers of
//! a trailers-only answer, one without messages) once it is complete; any
//! other HTTP status (a proxy's, a timeout layer's) follows the HTTP rules.
//! By default these are **not** stored, so a retry runs the handler again:
//!
//! | code | why |
//! |---|---|
//! | `UNAVAILABLE` (14) | the handler asks the client to try again |
//! | `RESOURCE_EXHAUSTED` (8) | a quota or a limit; retried later |
//! | `ABORTED` (10) | a conflict, typically retried at a higher level |
//! | `CANCELLED` (1) | the call was cancelled; it did not complete |
//! | `UNKNOWN` (2), `INTERNAL` (13), `DEADLINE_EXCEEDED` (4) | ambiguous, as a `5xx` in HTTP: whether the work was done is unknown |
//!
//! The ambiguous three follow
//! [`server_errors`](crate::IdempotencyLayer::server_errors) as a `5xx`
//! does, and in the same order: with
//! [`ServerErrors::Mark`] every retry is answered
//! `UNKNOWN` "outcome unknown" without running again; with
//! [`ServerErrors::Replay`] they are stored and
//! replayed as they are; with [`ServerErrors::Retry`]
//! (the default) the gRPC policy decides.
//!
//! The gRPC policy ([`grpc_persist_if`], default [`persist_by_default`])
//! stores `OK` and the definite failures (`INVALID_ARGUMENT`, `NOT_FOUND`,
//! `ALREADY_EXISTS`, `PERMISSION_DENIED`, `FAILED_PRECONDITION`,
//! `OUT_OF_RANGE`, `UNIMPLEMENTED`, `DATA_LOSS`, `UNAUTHENTICATED`) and none
//! of the codes above. An answer without a `grpc-status` (messages, then a
//! stream cut short) is never stored. A [`Persist`] extension on the
//! response (tonic's `Response::extensions_mut`) still decides for itself,
//! as on the HTTP side.
//!
//! One exception: a response that passes
//! [`max_stored_response`](crate::IdempotencyLayer::max_stored_response)
//! leaves its "not kept" marker as soon as it does, before its status is
//! known, so that the key is not held while the rest streams. A retry then
//! gets `ALREADY_EXISTS` even if the stream ended `UNAVAILABLE`: raise the
//! limit for large streams, or mark them [`Persist::Never`].
//!
//! # The layer's own answers
//!
//! Where an HTTP client gets a `problem+json` document, a gRPC client gets a
//! trailers-only response with a status it can act on, a `grpc-message` a
//! person can read, and never an HTTP error status (which gRPC clients
//! report as a transport failure):
//!
//! | situation | HTTP | gRPC |
//! |---|---|---|
//! | the key is in flight | `409` | `ABORTED`, with `grpc-retry-pushback-ms` |
//! | the key was used with another message | `422` | `FAILED_PRECONDITION` |
//! | a malformed or missing key | `400` | `INVALID_ARGUMENT` |
//! | the request is larger than the limit | `413` | `RESOURCE_EXHAUSTED` |
//! | the request stream broke | `400` | `CANCELLED` |
//! | no caller identity | `400` | `UNAUTHENTICATED` |
//! | the backend fails, or the instance shuts down | `503` | `UNAVAILABLE`, with `grpc-retry-pushback-ms` where the HTTP answer has a `Retry-After` |
//! | the stored response is in a format this instance cannot read | `503` | `UNAVAILABLE`, with `grpc-retry-pushback-ms` |
//! | the stored response is corrupt | `500` | `DATA_LOSS` |
//! | outcome unknown, interrupted | `500` | `UNKNOWN` |
//! | the handler's transaction failed (PostgreSQL transaction mode) and it answered no definite error of its own | `500` | `ABORTED` |
//! | processed, response not kept | the first status | `ALREADY_EXISTS` |
//!
//! A reused key is `FAILED_PRECONDITION`, not `INVALID_ARGUMENT`: the
//! message is not wrong in itself (it would succeed with a new key), the
//! key's state is. That is the split gRPC's status guide draws between the
//! two, and it tells a client not to retry unchanged.
//!
//! `grpc-retry-pushback-ms` is gRPC's `Retry-After` (the retry design,
//! gRFC A6): clients with a retry policy wait that long before retrying
//! (at least 1 ms). It is sent wherever the HTTP answer has a
//! `Retry-After`, which is kept beside it, as is the retention header when
//! one is configured. A handler's own responses are never rewritten, even
//! ones built like the layer's.
//!
//! # The fingerprint
//!
//! A retry must repeat the method path and the message: the fingerprint is
//! the HTTP one, and a gRPC request's body is its framed messages (each
//! with its compressed flag and length). As for HTTP, the `content-type`
//! counts too: a retry that switches between `application/grpc` and
//! `application/grpc+proto` is refused (`FAILED_PRECONDITION`), never run
//! twice (see
//! [`fingerprint_content_headers`](crate::IdempotencyLayer::fingerprint_content_headers)). Compressed messages
//! (`grpc-encoding`) are fingerprinted as sent: a client compresses the
//! same message to the same bytes with the same settings, and a retry that
//! compresses differently is refused as another message
//! (`FAILED_PRECONDITION`), never replayed wrongly. Canonical-JSON
//! fingerprints ([`fingerprint_json`]) leave gRPC bodies as they are.
//!
//! # Streaming requests
//!
//! The wire does not say whether a method streams its request, and the
//! layer must read a request whole before it can fingerprint it. A client-
//! or bidirectional-streaming call whose client waits for an answer before
//! it ends its stream would wait for ever. Name such methods with
//! [`grpc_streaming_requests`]: their calls pass through untouched, with or
//! without a key. A method not named is guarded: a client-streaming call
//! that sends its whole stream before it waits (an upload) is buffered
//! within [`max_request_body`] and runs once like a unary call. The default
//! guards every method because the other way round, a unary method left
//! out of a list of guarded ones, would run twice without a word.
//!
//! gRPC-Web (`application/grpc-web*`) keeps its status inside the body; it
//! is treated as HTTP.
//!
//! [tonic]: https://docs.rs/tonic
//! [`persist_if`]: crate::IdempotencyLayer::persist_if
//! [`grpc_persist_if`]: crate::IdempotencyLayer::grpc_persist_if
//! [`grpc_streaming_requests`]: crate::IdempotencyLayer::grpc_streaming_requests
//! [`max_request_body`]: crate::IdempotencyLayer::max_request_body
//! [`fingerprint_json`]: crate::IdempotencyLayer::fingerprint_json
//! [`Persist`]: crate::Persist
//! [`Persist::Never`]: crate::Persist::Never

use std::fmt::Write as _;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::Body;

use crate::Record;
use crate::body::IdempotencyBody;
use crate::config::{GrpcPersistFn, ServerErrors};
use crate::problem::{Answered, ProblemKind};

/// `grpc-status`.
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// gRPC's `Retry-After`, in milliseconds (gRFC A6).
const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// gRPC status codes the layer answers with or reads.
mod code {
    pub(super) const CANCELLED: i32 = 1;
    pub(super) const UNKNOWN: i32 = 2;
    pub(super) const INVALID_ARGUMENT: i32 = 3;
    pub(super) const DEADLINE_EXCEEDED: i32 = 4;
    pub(super) const ALREADY_EXISTS: i32 = 6;
    pub(super) const RESOURCE_EXHAUSTED: i32 = 8;
    pub(super) const FAILED_PRECONDITION: i32 = 9;
    pub(super) const ABORTED: i32 = 10;
    pub(super) const INTERNAL: i32 = 13;
    pub(super) const UNAVAILABLE: i32 = 14;
    pub(super) const DATA_LOSS: i32 = 15;
    pub(super) const UNAUTHENTICATED: i32 = 16;
}

/// The default gRPC persist policy: whether a response with this
/// `grpc-status` is stored and replayed. See the [module
/// documentation](self#which-statuses-are-stored).
///
/// ```
/// use tower_idempotency::grpc::persist_by_default;
///
/// assert!(persist_by_default(tonic::Code::Ok as i32));
/// assert!(persist_by_default(tonic::Code::InvalidArgument as i32));
/// assert!(!persist_by_default(tonic::Code::Unavailable as i32), "the handler asked for a retry");
/// assert!(!persist_by_default(tonic::Code::Internal as i32), "ambiguous");
/// ```
#[must_use]
pub const fn persist_by_default(code: i32) -> bool {
    !matches!(
        code,
        code::CANCELLED
            | code::UNKNOWN
            | code::DEADLINE_EXCEEDED
            | code::RESOURCE_EXHAUSTED
            | code::ABORTED
            | code::INTERNAL
            | code::UNAVAILABLE
    )
}

/// Whether a request (by its headers) is gRPC: `application/grpc` or
/// `application/grpc+<codec>`, parameters allowed; not gRPC-Web.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let value = value.as_bytes();
    let Some(prefix) = value.get(..16) else {
        return false;
    };
    prefix.eq_ignore_ascii_case(b"application/grpc")
        && matches!(value.get(16), None | Some(b'+' | b';' | b' '))
}

/// The `grpc-status` in `headers`, if it is a number.
pub(crate) fn status_in(headers: &HeaderMap) -> Option<i32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// What becomes of a complete gRPC response, by its `grpc-status`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Stored as it is.
    Store,
    /// An ambiguous status under [`ServerErrors::Mark`]: an "outcome
    /// unknown" answer is stored instead.
    OutcomeUnknown,
    /// Not stored, and why.
    Release(&'static str),
}

/// The `grpc-status` of a complete gRPC response: from its trailers, or,
/// for a trailers-only response (no body), from its headers.
pub(crate) fn final_status(
    headers: &HeaderMap,
    empty_body: bool,
    trailers: Option<&HeaderMap>,
) -> Option<i32> {
    match trailers {
        Some(trailers) => status_in(trailers),
        None if empty_body => status_in(headers),
        // Messages and no trailers: a stream cut short.
        None => None,
    }
}

/// Whether a record holds a gRPC answer with a definite error status (one
/// the default policy stores: not an ambiguous or retryable one), as an
/// HTTP `4xx` is.
pub(crate) fn failed(record: &Record) -> bool {
    let trailers = record.trailers.as_deref();
    is_grpc(&record.headers)
        && final_status(&record.headers, record.body.is_empty(), trailers)
            .is_some_and(|c| c != 0 && persist_by_default(c))
}

/// Whether a complete gRPC response with status `code` is stored: for the
/// ambiguous codes, by the [`ServerErrors`] policy first, as a `5xx` would
/// be; then by `persist`.
pub(crate) fn verdict(
    code: Option<i32>,
    persist: &GrpcPersistFn,
    server_errors: ServerErrors,
) -> Verdict {
    let Some(code) = code else {
        return Verdict::Release("gRPC response without a grpc-status");
    };
    let ambiguous = matches!(
        code,
        code::UNKNOWN | code::INTERNAL | code::DEADLINE_EXCEEDED
    );
    match server_errors {
        ServerErrors::Mark if ambiguous => Verdict::OutcomeUnknown,
        ServerErrors::Replay if ambiguous => Verdict::Store,
        _ if persist(code) => Verdict::Store,
        _ => Verdict::Release("grpc-status is not stored"),
    }
}

/// The gRPC status the layer answers a problem with.
pub(crate) const fn code_of(kind: ProblemKind) -> i32 {
    match kind {
        ProblemKind::MissingKey | ProblemKind::InvalidKey | ProblemKind::InvalidBody => {
            code::INVALID_ARGUMENT
        }
        ProblemKind::RequestBodyError => code::CANCELLED,
        ProblemKind::BodyTooLarge => code::RESOURCE_EXHAUSTED,
        ProblemKind::FingerprintMismatch => code::FAILED_PRECONDITION,
        ProblemKind::InFlight | ProblemKind::TransactionAborted => code::ABORTED,
        ProblemKind::BackendUnavailable
        | ProblemKind::StoredResponseIncompatible
        | ProblemKind::ShuttingDown => code::UNAVAILABLE,
        ProblemKind::UnidentifiedCaller => code::UNAUTHENTICATED,
        ProblemKind::StoredResponseUnreadable => code::DATA_LOSS,
        ProblemKind::ResponseNotKept => code::ALREADY_EXISTS,
        ProblemKind::Interrupted | ProblemKind::OutcomeUnknown => code::UNKNOWN,
    }
}

/// The layer's own answer to a gRPC request: a problem response (marked
/// with [`Answered`]) becomes a trailers-only gRPC response; any other
/// response is returned as it is.
pub(crate) fn answer<B: Body>(
    response: Response<IdempotencyBody<B>>,
) -> Response<IdempotencyBody<B>> {
    let Some(answered) = response.extensions().get::<Answered>().cloned() else {
        return response;
    };
    let (mut parts, _) = response.into_parts();
    convert(&mut parts.status, &mut parts.headers, &answered);
    Response::from_parts(parts, IdempotencyBody::full(bytes::Bytes::new(), None))
}

/// Turns the status and headers of a problem answer into a trailers-only
/// gRPC response's (its body must be dropped).
pub(crate) fn convert(status: &mut StatusCode, headers: &mut HeaderMap, answered: &Answered) {
    *status = StatusCode::OK;
    headers.remove(CONTENT_LENGTH);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, HeaderValue::from(code_of(answered.kind)));
    headers.insert(GRPC_MESSAGE, percent_encode(&answered.detail));
    if let Some(after) = answered.retry_after {
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX).max(1);
        headers.insert(GRPC_RETRY_PUSHBACK_MS, HeaderValue::from(ms));
    }
}

/// `grpc-message`'s encoding: bytes outside printable ASCII, and `%`,
/// percent-encoded (the gRPC over HTTP/2 protocol).
fn percent_encode(message: &str) -> HeaderValue {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    // Only printable ASCII remains.
    HeaderValue::try_from(out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types() {
        let of = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            is_grpc(&h)
        };
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc; charset=utf-8",
        ] {
            assert!(of(yes), "{yes}");
        }
        for no in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpcx",
            "application/json",
            "application/grp",
        ] {
            assert!(!of(no), "{no}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn the_pushback_is_the_retry_after_in_milliseconds() {
        let pushback = |retry_after| {
            let (mut status, mut headers) = (StatusCode::CONFLICT, HeaderMap::new());
            let answered = Answered {
                kind: ProblemKind::InFlight,
                detail: "busy".into(),
                retry_after,
            };
            convert(&mut status, &mut headers, &answered);
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers[GRPC_STATUS], "10");
            headers.get(GRPC_RETRY_PUSHBACK_MS).cloned()
        };
        let ms = |ms| Some(std::time::Duration::from_millis(ms));
        assert_eq!(pushback(ms(1500)).unwrap(), "1500");
        assert_eq!(pushback(ms(0)).unwrap(), "1", "at least a millisecond");
        assert_eq!(pushback(None), None);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("a b%c"), "a b%25c");
        assert_eq!(percent_encode("déjà\n"), "d%C3%A9j%C3%A0%0A");
    }

    #[test]
    fn the_default_policy_stores_ok_and_definite_failures() {
        let stored: Vec<i32> = (0..=16).filter(|c| persist_by_default(*c)).collect();
        assert_eq!(stored, [0, 3, 5, 6, 7, 9, 11, 12, 15, 16]);
    }

    #[test]
    fn trailers_decide_and_headers_only_without_a_body() {
        let mut headers = HeaderMap::new();
        let mut trailers = HeaderMap::new();
        trailers.insert(GRPC_STATUS, HeaderValue::from_static("14"));
        headers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
        assert_eq!(final_status(&headers, false, Some(&trailers)), Some(14));
        assert_eq!(final_status(&headers, true, None), Some(0), "trailers-only");
        assert_eq!(
            final_status(&headers, false, None),
            None,
            "messages, then nothing"
        );
        assert_eq!(final_status(&HeaderMap::new(), true, None), None);
    }

    #[test]
    fn ambiguous_codes_follow_the_server_error_policy() {
        use ServerErrors::{Mark, Replay, Retry};
        let stored = |code, policy| verdict(Some(code), &persist_by_default, policy);
        for code in [code::UNKNOWN, code::INTERNAL, code::DEADLINE_EXCEEDED] {
            assert!(matches!(stored(code, Retry), Verdict::Release(_)), "{code}");
            assert_eq!(stored(code, Replay), Verdict::Store, "{code}");
            assert_eq!(stored(code, Mark), Verdict::OutcomeUnknown, "{code}");
        }
        for code in [
            code::UNAVAILABLE,
            code::ABORTED,
            code::CANCELLED,
            code::RESOURCE_EXHAUSTED,
        ] {
            for policy in [Retry, Replay, Mark] {
                assert!(
                    matches!(stored(code, policy), Verdict::Release(_)),
                    "{code}"
                );
            }
        }
        assert_eq!(stored(0, Retry), Verdict::Store);
        // The server-error policy comes first, as for a `5xx`.
        let everything = |_| true;
        assert_eq!(
            verdict(Some(code::INTERNAL), &everything, Mark),
            Verdict::OutcomeUnknown
        );
        assert_eq!(
            verdict(Some(code::INTERNAL), &everything, Retry),
            Verdict::Store
        );
        assert!(matches!(
            verdict(None, &persist_by_default, Replay),
            Verdict::Release(_)
        ));
    }
}
