//! [`IdempotencyKey`] as an axum extractor (feature `axum`).
//!
//! ```
//! use tower_idempotency::IdempotencyKey;
//!
//! // Pass the key on, so the payment provider deduplicates too.
//! async fn create_payment(key: IdempotencyKey) -> String {
//!     format!("charging with provider key {key}")
//! }
//!
//! // For routes that also serve requests without a key.
//! async fn maybe(key: Option<IdempotencyKey>) -> String {
//!     key.map_or_else(|| "no key".to_owned(), |k| k.to_string())
//! }
//! # let _ = (create_payment, maybe);
//! ```
//!
//! The extractor reads the key the layer validated and put into the request
//! extensions; it does not parse the header itself, so a handler only sees
//! keys the layer accepted.

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::request::Parts;

use crate::IdempotencyKey;
use crate::problem::{self, ProblemKind};

/// The rejection of the [`IdempotencyKey`] extractor: the request carried no
/// key (or the route is not behind the layer). Answers `400` with the
/// layer's "missing key" problem document.
///
/// ```
/// use axum_core::response::IntoResponse;
/// use tower_idempotency::MissingIdempotencyKey;
///
/// let response = MissingIdempotencyKey::default().into_response();
/// assert_eq!(response.status(), 400);
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// ```
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct MissingIdempotencyKey;

impl IntoResponse for MissingIdempotencyKey {
    fn into_response(self) -> Response {
        problem::response(
            ProblemKind::MissingKey,
            "this endpoint needs an Idempotency-Key header",
            None,
        )
        .map(axum_core::body::Body::from)
    }
}

/// The rejection of an extractor for something the layer lends a keyed
/// request (a [`FencingToken`](crate::FencingToken), a `RequestTransaction`):
/// without a key, the "missing key" problem (`400`); with one, `500` with
/// `body` — the handler asked for what this setup never lends — and
/// `error` logged.
pub(crate) fn not_lent(keyed: bool, error: &str, body: &'static str) -> Response {
    if !keyed {
        return MissingIdempotencyKey.into_response();
    }
    tracing::error!("{error}");
    let mut response = Response::new(axum_core::body::Body::from(body));
    *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
    response
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = MissingIdempotencyKey;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Self>()
            .cloned()
            .ok_or(MissingIdempotencyKey)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().cloned())
    }
}
