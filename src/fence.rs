//! [`FencingToken`]: a number the handler can fence its own writes with.
//!
//! The layer's lock guards the layer's store: [`Backend::complete`] refuses
//! a lock that lapsed or was taken over, so a stale holder never overwrites
//! a newer response. It cannot guard the handler's *own* writes. A handler
//! paused past its lock (a long GC pause, a stalled network, a process
//! frozen by its orchestrator) may wake up after another request took the
//! key over and write after it. The classic remedy is a fencing token: a
//! number that grows with every lock granted on the key, which the write
//! carries and the database compares.
//!
//! Every lock the built-in backends grant carries one, and the layer puts it
//! into the request's extensions just before it calls the handler (and, with
//! the `axum` feature, it is an extractor). Fence the rows that belong to
//! the key — the ones a retry of the same request would write — so that a
//! write made under an older lock of that key is refused:
//!
//! ```sql
//! -- payments(idempotency_key text primary key, fence bigint not null, ...)
//! INSERT INTO payments (idempotency_key, fence, amount) VALUES ($1, $2, $3)
//! ON CONFLICT (idempotency_key) DO UPDATE SET fence = EXCLUDED.fence, amount = EXCLUDED.amount
//! WHERE payments.fence < EXCLUDED.fence;
//! -- 0 rows: a newer holder of the key already wrote; answer an error.
//!
//! UPDATE payments SET status = 'captured', fence = $2
//! WHERE idempotency_key = $1 AND fence <= $2;
//! ```
//!
//! Compare tokens of one key only. Tokens of different keys are not ordered
//! by when their locks were granted (on Redis Cluster they come from
//! different servers' clocks), so a row shared by many keys — an account
//! balance — cannot be fenced with them.
//!
//! ```
//! use http::Request;
//! use tower_idempotency::FencingToken;
//!
//! fn fence_of<B>(request: &Request<B>) -> Option<i64> {
//!     request.extensions().get::<FencingToken>().map(|fence| fence.as_i64())
//! }
//! # let _ = fence_of::<()>;
//! ```
//!
//! # What the built-in backends give
//!
//! | backend | token | grows |
//! |---|---|---|
//! | memory | the lock's sequence number | across every key of the backend |
//! | Redis | the server's clock (`TIME`) in microseconds, and at least one more than the key's last token | per key |
//! | PostgreSQL | `nextval` of the table's sequence `<table>_fence` | across every key of the table |
//!
//! Tokens are positive and fit an `i64` (a PostgreSQL `bigint`). A token
//! granted later on the same key is larger, also after a takeover of a
//! lapsed lock, after a release, and after the key's record expired. On
//! Redis that rests on the server's clock: the key's last token is kept ten
//! minutes past its lock's TTL, which covers a clock stepped back by less
//! than that; a clock stepped back further, on a server that also lost the
//! key's last token (a failover to a replica that had not received it),
//! could hand out a smaller one. The memory and PostgreSQL tokens are
//! counters and have no such limit. In
//! PostgreSQL's transaction mode the handler's writes commit only together
//! with the record, under the lock; the token is given there too, but a
//! write in the request's transaction needs no fence.
//!
//! [`Backend::complete`]: crate::Backend::complete

use std::fmt;

/// A number that grows with every lock granted on a storage key; see the
/// [module documentation](crate::fence).
///
/// ```
/// use tower_idempotency::FencingToken;
///
/// let older = FencingToken::new(41);
/// let newer = FencingToken::new(42);
/// assert!(older < newer);
/// assert_eq!(newer.get(), 42);
/// assert_eq!(newer.as_i64(), 42);
/// assert_eq!(newer.to_string(), "42");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// A token with this value (for backends and tests).
    #[must_use]
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The token's value.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The token as a signed 64-bit integer (a PostgreSQL `bigint`), for
    /// binding in SQL. Saturates at `i64::MAX`, which no built-in backend
    /// reaches.
    #[must_use]
    pub const fn as_i64(self) -> i64 {
        if self.0 > i64::MAX as u64 {
            i64::MAX
        } else {
            self.0.cast_signed()
        }
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<FencingToken> for u64 {
    fn from(token: FencingToken) -> Self {
        token.0
    }
}

#[cfg(feature = "axum")]
mod extractor {
    use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
    use axum_core::response::{IntoResponse, Response};
    use http::request::Parts;

    use super::FencingToken;
    use crate::IdempotencyKey;

    /// The rejection of the [`FencingToken`] extractor. Without an
    /// `Idempotency-Key` it answers `400` with the layer's "missing key"
    /// problem; with a key but no token (a backend that gives none, or a
    /// fail-open request that ran unprotected) `500`: the handler asked to
    /// fence a write it cannot fence.
    ///
    /// ```
    /// use axum_core::response::IntoResponse;
    /// use tower_idempotency::NoFencingToken;
    ///
    /// let response = NoFencingToken::default().into_response();
    /// assert_eq!(response.status(), 400);
    /// ```
    #[derive(Debug, Clone, Copy, Default)]
    #[non_exhaustive]
    pub struct NoFencingToken {
        keyed: bool,
    }

    impl IntoResponse for NoFencingToken {
        fn into_response(self) -> Response {
            crate::extract::not_lent(
                self.keyed,
                "a handler asked for a fencing token, but the request holds none \
                 (the backend gives none, or the request ran unprotected)",
                "no fencing token: the request does not hold an idempotency lock",
            )
        }
    }

    /// For handlers that fence their writes: rejects requests without a
    /// token.
    ///
    /// ```
    /// use tower_idempotency::FencingToken;
    ///
    /// async fn create_payment(fence: FencingToken) -> String {
    ///     // UPDATE … SET fence = $1 WHERE … AND fence < $1
    ///     format!("writing under fence {fence}")
    /// }
    /// # let _ = create_payment;
    /// ```
    impl<S: Send + Sync> FromRequestParts<S> for FencingToken {
        type Rejection = NoFencingToken;

        async fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<Self>()
                .copied()
                .ok_or(NoFencingToken {
                    keyed: parts.extensions.get::<IdempotencyKey>().is_some(),
                })
        }
    }

    /// For routes that also serve requests without a key.
    impl<S: Send + Sync> OptionalFromRequestParts<S> for FencingToken {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<Self>().copied())
        }
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use extractor::NoFencingToken;
