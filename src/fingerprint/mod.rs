//! The request fingerprint: what makes a retry "the same request".

mod body;

pub(crate) use body::BodyFingerprint;

use std::fmt;

use http::HeaderName;
use http::header::AUTHORIZATION;
use http::request::Parts;
use sha2::{Digest, Sha256};

/// SHA-256 over the parts of a request that a retry must repeat exactly:
/// method, path, query, body, `Authorization` (unless the scope already
/// identifies the caller) and any headers configured with
/// [`IdempotencyLayer::fingerprint_headers`](crate::IdempotencyLayer::fingerprint_headers).
///
/// Every field is length-prefixed, so `("ab", "c")` and `("a", "bc")` differ.
/// The fingerprint is stored beside the response; a request that reuses a key
/// with a different fingerprint is answered `422 Unprocessable Content`.
///
/// ```
/// use tower_idempotency::Fingerprint;
///
/// let (post, _) = http::Request::post("/payments").body(()).unwrap().into_parts();
/// let a = Fingerprint::compute(&post, br#"{"amount":5}"#, true, &[]);
/// let b = Fingerprint::compute(&post, br#"{"amount":6}"#, true, &[]);
/// assert_ne!(a, b, "another body is another request");
/// assert_eq!(a, Fingerprint::compute(&post, br#"{"amount":5}"#, true, &[]));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Computes the fingerprint of a request whose body has been buffered.
    #[must_use]
    pub fn compute(
        parts: &Parts,
        body: &[u8],
        include_authorization: bool,
        extra_headers: &[HeaderName],
    ) -> Self {
        let mut h = Sha256::new();
        put_field(&mut h, b"tower-idempotency/fingerprint/v1");
        put_field(&mut h, parts.method.as_str().as_bytes());
        put_field(&mut h, parts.uri.path().as_bytes());
        match parts.uri.query() {
            Some(q) => {
                h.update([1]);
                put_field(&mut h, q.as_bytes());
            }
            None => h.update([0]),
        }
        put_field(&mut h, body);
        let auth = include_authorization.then_some(&AUTHORIZATION);
        for name in auth.into_iter().chain(extra_headers) {
            put_field(&mut h, name.as_str().as_bytes());
            let values = parts.headers.get_all(name);
            h.update((values.iter().count() as u64).to_le_bytes());
            for value in values {
                put_field(&mut h, value.as_bytes());
            }
        }
        Self(h.finalize().into())
    }

    /// Wraps 32 raw bytes (as read back from a backend).
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", crate::key::hex(&self.0))
    }
}

/// Feeds one length-prefixed field into a hash.
pub(crate) fn put_field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn fp(uri: &str, body: &[u8], auth: Option<&str>, include: bool) -> Fingerprint {
        let mut b = Request::post(uri);
        if let Some(a) = auth {
            b = b.header(AUTHORIZATION, a);
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        Fingerprint::compute(&parts, body, include, &[])
    }

    #[test]
    fn fields_are_length_prefixed() {
        assert_ne!(fp("/ab?c", b"", None, true), fp("/a?bc", b"", None, true));
        assert_ne!(fp("/a?", b"b", None, true), fp("/a?b", b"", None, true));
        assert_ne!(fp("/a", b"", None, true), fp("/a?", b"", None, true));
    }

    #[test]
    fn authorization_counts_only_when_included() {
        assert_ne!(
            fp("/a", b"x", Some("t1"), true),
            fp("/a", b"x", Some("t2"), true)
        );
        assert_eq!(
            fp("/a", b"x", Some("t1"), false),
            fp("/a", b"x", Some("t2"), false)
        );
        assert_eq!(
            fp("/a", b"x", Some("t1"), true),
            fp("/a", b"x", Some("t1"), true)
        );
    }

    #[test]
    fn debug_shows_the_hex() {
        let fp = Fingerprint::from_bytes([0xa5; 32]);
        assert_eq!(
            format!("{fp:?}"),
            format!("Fingerprint({})", "a5".repeat(32))
        );
    }
}
