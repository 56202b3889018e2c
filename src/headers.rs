//! Every header rule in one place: which response headers are stored and
//! replayed, which never are, how a replay is marked, and what the layer
//! reads from a response to decide how to keep it.

use std::time::Duration;

use http::header::{self, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::Body;

use crate::Record;
use crate::body::IdempotencyBody;
use crate::problem::{self, ProblemKind};

/// The header that marks a replayed response.
///
/// ```
/// use tower_idempotency::IDEMPOTENT_REPLAYED;
///
/// let response = http::Response::builder()
///     .header(IDEMPOTENT_REPLAYED, "true")
///     .body(())
///     .unwrap();
/// assert!(response.headers().get(IDEMPOTENT_REPLAYED).is_some_and(|v| v == "true"));
/// ```
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The header that tells a client how long its key is kept, in seconds
/// ([`retention_header`](crate::IdempotencyLayer::retention_header)).
///
/// ```
/// use tower_idempotency::IDEMPOTENCY_TTL;
///
/// assert_eq!(IDEMPOTENCY_TTL, "idempotency-ttl");
/// ```
pub const IDEMPOTENCY_TTL: HeaderName = HeaderName::from_static("idempotency-ttl");

/// Sets the retention header `name` (if configured) to the whole seconds of
/// `kept`, rounded down: never a promise longer than the store keeps.
pub(crate) fn set_retention(headers: &mut HeaderMap, name: Option<&HeaderName>, kept: Duration) {
    if let Some(name) = name {
        headers.insert(name.clone(), HeaderValue::from(kept.as_secs()));
    }
}

/// A copy of `headers` for the record, and the retention header `name` (if
/// configured) taken off the ones sent: for a response sent before it is
/// known to be kept.
pub(crate) fn keep_retention_back(headers: &mut HeaderMap, name: Option<&HeaderName>) -> HeaderMap {
    let copy = headers.clone();
    if let Some(name) = name {
        headers.remove(name);
    }
    copy
}

/// How long `record` is still kept: the TTL its fresh answer announced in
/// the retention header `name` (stored with it), less its age. `None` for a
/// record stored without it (while the header was off, or a "not kept"
/// marker): better no header than a guess.
pub(crate) fn retention_left(record: &Record, name: &HeaderName) -> Option<Duration> {
    let kept_for = record
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)?;
    let age = std::time::SystemTime::now()
        .duration_since(record.created_at)
        .unwrap_or_default();
    Some(kept_for.saturating_sub(age))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the ones proxies still send):
/// about one connection, never about the stored response.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers that are never stored or replayed: the hop-by-hop ones and any
/// listed in `Connection`; `Set-Cookie` (a replay must not hand one
/// caller's session to a retry); `Content-Length` (recomputed from the
/// stored body).
///
/// The others keep the order and multiplicity the handler gave them: the
/// map is rebuilt rather than edited, because `HeaderMap::remove` moves the
/// last header into the removed one's place.
pub(crate) fn strip_unreplayable(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let never = |name: &HeaderName| {
        HOP_BY_HOP.contains(name)
            || name == header::SET_COOKIE
            || name == CONTENT_LENGTH
            || listed.contains(name)
    };
    if !headers.keys().any(never) {
        return;
    }
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers.iter() {
        if !never(name) {
            kept.append(name, value.clone());
        }
    }
    *headers = kept;
}

/// Builds the replay of a stored record: its status, its headers in their
/// order, a `Content-Length` for the stored body (or, for a body with
/// trailers, a `Trailer` field naming them), `Idempotent-Replayed: true`,
/// the body and its trailers. A "not kept" marker is answered with its problem document.
pub(crate) fn replay<B: Body>(record: Record) -> Response<IdempotencyBody<B>> {
    let Record {
        status,
        mut headers,
        body,
        kept,
        mut trailers,
        ..
    } = record;
    if !kept {
        let mut response = problem::response_with_status(
            ProblemKind::ResponseNotKept,
            status,
            "this request was processed, but its response could not be stored; \
             use a new key to send a new request",
            None,
        )
        .map(|body| IdempotencyBody::full(body, None));
        mark_replayed(response.headers_mut());
        return response;
    }
    // Records from remote stores may have been written by other code.
    strip_unreplayable(&mut headers);
    if let Some(trailers) = &mut trailers {
        strip_unreplayable(trailers);
    }
    if let Some(trailers) = &trailers {
        // Sent chunked over HTTP/1.1, which carries only the trailers its
        // `Trailer` field announces (HTTP/2 needs no announcement, and gRPC
        // answers are restored as they were).
        if !crate::grpc::is_grpc(&headers) && !trailers.is_empty() {
            // `keys` yields each name once.
            let names: Vec<&str> = trailers.keys().map(HeaderName::as_str).collect();
            if let Ok(value) = HeaderValue::from_str(&names.join(", ")) {
                headers.insert(header::TRAILER, value);
            }
        }
    } else if !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        // A gRPC answer (a trailers-only one here) never had one.
        || crate::grpc::is_grpc(&headers))
    {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    mark_replayed(&mut headers);
    let mut response = Response::new(IdempotencyBody::full(body, trailers.map(|t| *t)));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn mark_replayed(headers: &mut HeaderMap) {
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
}

/// The problem answer of the layer itself, with the layer's body type.
pub(crate) fn problem<B: Body>(
    kind: ProblemKind,
    detail: &str,
    retry_after: Option<Duration>,
) -> Response<IdempotencyBody<B>> {
    problem::response(kind, detail, retry_after).map(|body| IdempotencyBody::full(body, None))
}

/// The `Content-Length` a message declares, if it is a number.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Whether a response is a server-sent event stream: never held back, never
/// stored (it has no end a retry could wait for).
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// The response body's length when it is known before reading it: an exact
/// size hint, else a declared `Content-Length`.
pub(crate) fn known_length<B: Body>(headers: &HeaderMap, body: &B) -> Option<u64> {
    body.size_hint()
        .exact()
        .or_else(|| declared_length(headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fingerprint;
    use bytes::Bytes;

    #[test]
    fn stripping_keeps_order_and_multiplicity() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("s=1"));
        headers.append("x-b", HeaderValue::from_static("2"));
        headers.append("x-c", HeaderValue::from_static("3"));
        headers.append("x-b", HeaderValue::from_static("4"));
        headers.append(header::CONNECTION, HeaderValue::from_static("x-hop"));
        headers.append("x-hop", HeaderValue::from_static("h"));
        headers.append("x-d", HeaderValue::from_static("5"));
        strip_unreplayable(&mut headers);
        let seen: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        let expected = [
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-b", "4"),
            ("x-c", "3"),
            ("x-d", "5"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn event_streams_are_recognised() {
        let mut headers = HeaderMap::new();
        assert!(!is_event_stream(&headers));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("Text/Event-Stream; charset=utf-8"),
        );
        assert!(is_event_stream(&headers));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_event_stream(&headers));
    }

    #[test]
    fn a_marker_replays_as_a_problem_with_the_original_status() {
        let marker = Record::not_kept(StatusCode::CREATED, Fingerprint::from_bytes([0; 32]));
        let response = replay::<http_body_util::Empty<Bytes>>(marker);
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(response.headers()[IDEMPOTENT_REPLAYED], "true");
    }

    fn stored(status: StatusCode) -> Record {
        Record::new(
            status,
            HeaderMap::new(),
            Bytes::new(),
            Fingerprint::from_bytes([0; 32]),
        )
    }

    #[test]
    fn a_replay_declares_its_length_unless_its_status_has_no_body() {
        for status in [StatusCode::OK, StatusCode::CREATED, StatusCode::NOT_FOUND] {
            let response = replay::<http_body_util::Empty<Bytes>>(stored(status));
            assert_eq!(response.headers()[CONTENT_LENGTH], "0", "{status}");
        }
        for status in [
            StatusCode::CONTINUE,
            StatusCode::NO_CONTENT,
            StatusCode::NOT_MODIFIED,
        ] {
            let response = replay::<http_body_util::Empty<Bytes>>(stored(status));
            assert!(!response.headers().contains_key(CONTENT_LENGTH), "{status}");
            assert_eq!(response.headers()[IDEMPOTENT_REPLAYED], "true");
        }
    }

    #[test]
    fn a_declared_length_is_read_when_it_is_a_number() {
        let mut headers = HeaderMap::new();
        assert_eq!(declared_length(&headers), None);
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("42"));
        assert_eq!(declared_length(&headers), Some(42));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("4x"));
        assert_eq!(declared_length(&headers), None);
    }

    /// A body that knows nothing of its length.
    struct Unsized;

    impl Body for Unsized {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(None)
        }
    }

    #[test]
    fn a_known_length_is_the_exact_size_hint_else_the_declared_one() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("42"));
        let full = http_body_util::Full::new(Bytes::from_static(b"abc"));
        assert_eq!(known_length(&headers, &full), Some(3));
        assert_eq!(known_length(&headers, &Unsized), Some(42));
        assert_eq!(known_length(&HeaderMap::new(), &Unsized), None);
    }
}
