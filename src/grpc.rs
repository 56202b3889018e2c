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
//! from a failure. gRPC responses are stored by their `grpc-status`
//! instead, read from the trailers (or from the headers of a trailers-only
//! response) once the response is complete. By default
//! ([`persist_by_default`]) these are **not** stored, so a retry runs the
//! handler again:
//!
//! | code | why |
//! |---|---|
//! | `UNAVAILABLE` (14) | the handler asks the client to try again |
//! | `DEADLINE_EXCEEDED` (4) | ran out of time; the work may not be done |
//! | `RESOURCE_EXHAUSTED` (8) | a quota or a limit; retried later |
//! | `ABORTED` (10) | a conflict, typically retried at a higher level |
//! | `INTERNAL` (13), `UNKNOWN` (2) | ambiguous: as a `5xx` in HTTP |
//! | `CANCELLED` (1) | the call was cancelled; it did not complete |
//!
//! `OK` and the definite failures (`INVALID_ARGUMENT`, `NOT_FOUND`,
//! `ALREADY_EXISTS`, `PERMISSION_DENIED`, `FAILED_PRECONDITION`,
//! `OUT_OF_RANGE`, `UNIMPLEMENTED`, `DATA_LOSS`, `UNAUTHENTICATED`) are
//! stored and replayed. A response without a `grpc-status` is not stored.
//! Choose another policy with [`grpc_persist_if`]; a [`Persist`] extension
//! on the response (tonic's `Response::extensions_mut`) still decides for
//! itself, as on the HTTP side.
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
//! | the backend fails, or the instance shuts down | `503` | `UNAVAILABLE`, with `grpc-retry-pushback-ms` |
//! | the stored response is corrupt | `500` | `DATA_LOSS` |
//! | outcome unknown, interrupted | `500` | `UNKNOWN` |
//! | the handler's transaction failed (PostgreSQL transaction mode) | `500` | `ABORTED` |
//! | processed, response not kept | the first status | `ALREADY_EXISTS` |
//!
//! A reused key is `FAILED_PRECONDITION`, not `INVALID_ARGUMENT`: the
//! message is not wrong in itself (it would succeed with a new key), the
//! key's state is. That is the split gRPC's status guide draws between the
//! two, and it tells a client not to retry unchanged.
//!
//! `grpc-retry-pushback-ms` is gRPC's `Retry-After` (the retry design,
//! gRFC A6): clients with a retry policy wait that long before retrying.
//! The HTTP `retry-after` is kept beside it, and so is the retention header
//! when one is configured.
//!
//! # The fingerprint
//!
//! A retry must repeat the method path and the message: the fingerprint is
//! the HTTP one, and a gRPC request's body is its framed messages (each
//! with its compressed flag and length). Compressed messages
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

use std::fmt::Write as _;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body::Body;

use crate::body::IdempotencyBody;
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

/// Why a complete gRPC response is not stored, if it is not: its
/// `grpc-status` (from the trailers, or the headers of a trailers-only
/// response) fails `persist`, or it has none.
pub(crate) fn refused(
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
    persist: &(dyn Fn(i32) -> bool + Send + Sync),
) -> Option<&'static str> {
    match trailers.and_then(status_in).or_else(|| status_in(headers)) {
        Some(code) if persist(code) => None,
        Some(_) => Some("grpc-status is not stored"),
        None => Some("gRPC response without a grpc-status"),
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
    let pushback = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(secs) = pushback {
        headers.insert(
            GRPC_RETRY_PUSHBACK_MS,
            HeaderValue::from(secs.saturating_mul(1000)),
        );
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
    fn trailers_decide_before_headers() {
        let mut headers = HeaderMap::new();
        let mut trailers = HeaderMap::new();
        trailers.insert(GRPC_STATUS, HeaderValue::from_static("14"));
        assert_eq!(
            refused(&headers, Some(&trailers), &persist_by_default),
            Some("grpc-status is not stored")
        );
        trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
        assert_eq!(
            refused(&headers, Some(&trailers), &persist_by_default),
            None
        );
        assert_eq!(
            refused(&headers, None, &persist_by_default),
            Some("gRPC response without a grpc-status")
        );
        headers.insert(GRPC_STATUS, HeaderValue::from_static("5"));
        assert_eq!(
            refused(&headers, None, &persist_by_default),
            None,
            "trailers-only"
        );
    }
}
