//! Parsing the `Idempotency-Key` header, caller scopes and storage keys.
//!
//! The header is a [Structured Field string] per the IETF
//! `draft-ietf-httpapi-idempotency-key-header`: `Idempotency-Key: "8e03978e-40d5"`.
//! For compatibility with clients written against Stripe- and Mastodon-style
//! APIs a bare token (`Idempotency-Key: 8e03978e-40d5`) is accepted too; both
//! spellings name the same key.
//!
//! [Structured Field string]: https://www.rfc-editor.org/rfc/rfc8941#section-3.3.3

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::HeaderMap;
use http::header::{AUTHORIZATION, COOKIE, GetAll, HeaderName, HeaderValue};
use http::request::Parts;
use sha2::{Digest, Sha256};

use crate::fingerprint::put_field;

/// The name of the header the layer reads: `Idempotency-Key`.
///
/// ```
/// use tower_idempotency::{IDEMPOTENCY_KEY, IdempotencyKey};
///
/// let request = http::Request::post("/payments")
///     .header(IDEMPOTENCY_KEY, "\"8e03978e\"")
///     .body(())
///     .unwrap();
/// let key = IdempotencyKey::from_headers(request.headers()).unwrap().unwrap();
/// assert_eq!(key.as_str(), "8e03978e");
/// ```
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The longest key accepted, in bytes (after removing quotes and escapes).
///
/// ```
/// use http::HeaderValue;
/// use tower_idempotency::{IdempotencyKey, KeyError, MAX_KEY_LEN};
///
/// let longest = HeaderValue::from_str(&"k".repeat(MAX_KEY_LEN)).unwrap();
/// assert!(IdempotencyKey::parse(&longest).is_ok());
/// let too_long = HeaderValue::from_str(&"k".repeat(MAX_KEY_LEN + 1)).unwrap();
/// assert!(matches!(IdempotencyKey::parse(&too_long), Err(KeyError::TooLong { .. })));
/// ```
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key, as the client sent it.
///
/// The layer inserts it into the request extensions before calling the inner
/// service, so a handler can read it, for example to pass it on to a payment
/// provider:
///
/// ```
/// use tower_idempotency::IdempotencyKey;
///
/// fn provider_key(req: &http::Request<()>) -> Option<&str> {
///     req.extensions().get::<IdempotencyKey>().map(IdempotencyKey::as_str)
/// }
/// # let _ = provider_key;
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// Parses one header value: a quoted Structured Field string or a bare token.
    ///
    /// ```
    /// use http::HeaderValue;
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let quoted = IdempotencyKey::parse(&HeaderValue::from_static("\"k1\"")).unwrap();
    /// let bare = IdempotencyKey::parse(&HeaderValue::from_static("k1")).unwrap();
    /// assert_eq!(quoted, bare);
    /// assert!(IdempotencyKey::parse(&HeaderValue::from_static("\"\"")).is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// A [`KeyError`] when the value is empty, longer than [`MAX_KEY_LEN`]
    /// bytes, holds a byte that is not visible ASCII, or is a malformed
    /// quoted string.
    pub fn parse(value: &HeaderValue) -> Result<Self, KeyError> {
        let raw = trim_ows(value.as_bytes());
        let key = if raw.first() == Some(&b'"') {
            parse_sf_string(raw)?
        } else {
            parse_token(raw)?
        };
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: key.len() });
        }
        Ok(Self(Arc::from(&*key)))
    }

    /// Reads the key from a request's headers.
    ///
    /// Returns `Ok(None)` when the header is absent.
    ///
    /// # Errors
    ///
    /// [`KeyError::Repeated`] when the header appears more than once, or the
    /// error of [`IdempotencyKey::parse`].
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, KeyError> {
        let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(KeyError::Repeated);
        }
        Self::parse(first).map(Some)
    }

    /// The key as the client meant it (without quotes or escapes).
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey").field(&&*self.0).finish()
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an `Idempotency-Key` header was rejected (answered with `400`).
///
/// ```
/// use http::HeaderValue;
/// use tower_idempotency::{IdempotencyKey, KeyError};
///
/// let unterminated = HeaderValue::from_static("\"abc");
/// assert_eq!(IdempotencyKey::parse(&unterminated), Err(KeyError::Malformed));
/// let empty = HeaderValue::from_static("\"\"");
/// assert_eq!(IdempotencyKey::parse(&empty), Err(KeyError::Empty));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty.
    #[error("the Idempotency-Key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    #[error("the Idempotency-Key is {len} bytes long; at most {MAX_KEY_LEN} are allowed")]
    TooLong {
        /// The length that was sent.
        len: usize,
    },
    /// The key holds a byte that is not visible ASCII.
    #[error("the Idempotency-Key holds a byte that is not visible ASCII at offset {offset}")]
    InvalidByte {
        /// Offset of the byte in the header value.
        offset: usize,
    },
    /// A quoted key is not a well-formed Structured Field string.
    #[error("the Idempotency-Key is not a well-formed quoted string")]
    Malformed,
    /// The header was sent more than once, or a bare (unquoted) key holds a
    /// `,` — what a proxy makes of two headers joined into one. Inside a
    /// quoted key a `,` is an ordinary character.
    #[error("the Idempotency-Key header was sent more than once (or a bare key holds a ',')")]
    Repeated,
}

fn trim_ows(mut raw: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = raw {
        raw = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = raw {
        raw = rest;
    }
    raw
}

/// RFC 8941 §4.2.5: `DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE`,
/// where `unescaped` is `%x20-21 / %x23-5B / %x5D-7E`.
fn parse_sf_string(raw: &[u8]) -> Result<Cow<'_, str>, KeyError> {
    // Escapes are rare: until one turns up, the key is a slice of `raw`.
    let mut out: Option<String> = None;
    let mut i = 1;
    loop {
        let Some(&b) = raw.get(i) else {
            return Err(KeyError::Malformed);
        };
        match b {
            b'"' => {
                if i + 1 != raw.len() {
                    return Err(KeyError::Malformed);
                }
                return Ok(match out {
                    Some(unescaped) => Cow::Owned(unescaped),
                    // Every byte so far was checked to be visible ASCII.
                    None => Cow::Borrowed(ascii(&raw[1..i])),
                });
            }
            b'\\' => match raw.get(i + 1) {
                Some(&e @ (b'"' | b'\\')) => {
                    out.get_or_insert_with(|| ascii(&raw[1..i]).to_owned())
                        .push(char::from(e));
                    i += 2;
                }
                _ => return Err(KeyError::Malformed),
            },
            0x20..=0x7e => {
                if let Some(out) = &mut out {
                    out.push(char::from(b));
                }
                i += 1;
            }
            _ => return Err(KeyError::InvalidByte { offset: i }),
        }
    }
}

/// `bytes` as text; only called on bytes already checked to be ASCII.
fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// A bare key: visible ASCII only, no `"` (so the two forms never overlap)
/// and no `,`: a bare `a,b` is what a proxy makes of two `Idempotency-Key`
/// headers, so it is refused as a repeated header.
fn parse_token(raw: &[u8]) -> Result<Cow<'_, str>, KeyError> {
    for (offset, &b) in raw.iter().enumerate() {
        match b {
            b'"' => return Err(KeyError::Malformed),
            b',' => return Err(KeyError::Repeated),
            0x21..=0x7e => {}
            _ => return Err(KeyError::InvalidByte { offset }),
        }
    }
    Ok(Cow::Borrowed(ascii(raw)))
}

/// The key a backend stores a request under: SHA-256 of the caller's scope
/// and the idempotency key.
///
/// The fingerprint of the request is deliberately not part of it: a key
/// reused with a different payload finds the earlier record and is answered
/// `422` instead of silently running as a new request.
///
/// ```
/// use http::HeaderValue;
/// use tower_idempotency::{IdempotencyKey, ScopeValue, StorageKey};
///
/// let key = IdempotencyKey::parse(&HeaderValue::from_static("\"k1\"")).unwrap();
/// let alice = StorageKey::derive(&ScopeValue::custom("alice"), &key);
/// let bob = StorageKey::derive(&ScopeValue::custom("bob"), &key);
/// assert_ne!(alice, bob, "the same key from two callers is two keys");
/// assert_eq!(alice.to_hex().len(), 64);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey([u8; 32]);

impl StorageKey {
    /// Derives the storage key of `key` for the caller identified by `scope`.
    #[must_use]
    pub fn derive(scope: &ScopeValue, key: &IdempotencyKey) -> Self {
        let mut hasher = Sha256::new();
        put_field(&mut hasher, b"tower-idempotency/storage-key/v1");
        put_field(&mut hasher, scope.tag.as_bytes());
        put_field(&mut hasher, &scope.value);
        put_field(&mut hasher, key.as_str().as_bytes());
        Self(hasher.finalize().into())
    }

    /// Wraps 32 raw bytes (as stored by a backend).
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses the 64 hex characters that logs show (the `key` field of the
    /// `idempotency` span), for an operator dropping one key's record.
    ///
    /// ```
    /// use tower_idempotency::StorageKey;
    ///
    /// let key = StorageKey::from_bytes([0xab; 32]);
    /// assert_eq!(StorageKey::from_hex(&key.to_hex()), Some(key));
    /// assert_eq!(StorageKey::from_hex("not hex"), None);
    /// ```
    #[must_use]
    pub fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.trim().as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            let digit = |c: u8| char::from(c).to_digit(16);
            *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
        }
        Some(Self(bytes))
    }

    /// Lower-case hex, 64 characters: what logs and key-value backends use.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageKey({})", self.to_hex())
    }
}

impl fmt::Display for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Who a request belongs to, as resolved by the layer's scope.
///
/// Two callers with different scopes never see each other's responses, even
/// when they send the same key.
///
/// ```
/// use tower_idempotency::ScopeValue;
///
/// assert_ne!(ScopeValue::custom("tenant-1"), ScopeValue::custom("tenant-2"));
/// assert_ne!(ScopeValue::custom(""), ScopeValue::anonymous());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeValue {
    tag: &'static str,
    value: Vec<u8>,
}

impl ScopeValue {
    /// The scope of requests that carry no identity: all such callers share it.
    #[must_use]
    pub fn anonymous() -> Self {
        Self {
            tag: "anonymous",
            value: Vec::new(),
        }
    }

    /// A scope made by a user-supplied function (for example a user id).
    #[must_use]
    pub fn custom(value: impl Into<Vec<u8>>) -> Self {
        Self {
            tag: "custom",
            value: value.into(),
        }
    }

    /// The non-blank values of one header, each trimmed.
    fn header(tag: &'static str, values: &GetAll<'_, HeaderValue>) -> Self {
        let non_blank = || {
            values
                .iter()
                .map(|v| trim_ows(v.as_bytes()))
                .filter(|v| !v.is_empty())
        };
        let len = non_blank().map(|v| 8 + v.len()).sum();
        let mut value = Vec::with_capacity(len);
        for v in non_blank() {
            put_len_prefixed(&mut value, v);
        }
        Self { tag, value }
    }
}

fn put_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

type ScopeFn = dyn Fn(&Parts) -> Option<Vec<u8>> + Send + Sync;

/// How the layer decides who a request belongs to.
#[derive(Clone)]
pub(crate) enum Scope {
    /// `Authorization`, else the whole `Cookie` header, else anonymous.
    AuthorizationOrCookie,
    /// The value of one named cookie; no identity without it.
    Cookie(Arc<str>),
    /// A user function, typically reading the authenticated principal; no
    /// identity when it returns `None`.
    Custom(Arc<ScopeFn>),
}

impl Scope {
    /// Who the request belongs to; `None` when a scope that must identify
    /// the caller (a named cookie, a function) could not.
    ///
    /// Empty or whitespace-only credentials count as absent: a client that
    /// sends `Authorization:` with nothing after it has not identified
    /// itself, and must not share a scope with every other such client that
    /// sends a different cookie.
    pub(crate) fn resolve(&self, parts: &Parts) -> Option<ScopeValue> {
        match self {
            Self::AuthorizationOrCookie => {
                for (name, tag) in [(AUTHORIZATION, "authorization"), (COOKIE, "cookie")] {
                    let values = parts.headers.get_all(name);
                    if values.iter().any(|v| !is_blank(v.as_bytes())) {
                        return Some(ScopeValue::header(tag, &values));
                    }
                }
                Some(ScopeValue::anonymous())
            }
            Self::Cookie(name) => find_cookie(&parts.headers, name)
                .filter(|value| !is_blank(value))
                .map(|value| ScopeValue {
                    tag: "named-cookie",
                    value: value.to_vec(),
                }),
            Self::Custom(f) => f(parts).map(ScopeValue::custom),
        }
    }
}

/// Empty, or only spaces and tabs.
fn is_blank(value: &[u8]) -> bool {
    trim_ows(value).is_empty()
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AuthorizationOrCookie => f.write_str("AuthorizationOrCookie"),
            Self::Cookie(name) => f.debug_tuple("Cookie").field(name).finish(),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Finds `name=value` among the `Cookie` headers (RFC 6265 §4.2.1 syntax).
fn find_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get_all(COOKIE).iter().find_map(|header| {
        header.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = trim_ows(pair);
            let eq = pair.iter().position(|&b| b == b'=')?;
            (trim_ows(&pair[..eq]) == name.as_bytes()).then(|| trim_ows(&pair[eq + 1..]))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8]) -> Result<String, KeyError> {
        IdempotencyKey::parse(&HeaderValue::from_bytes(s).unwrap()).map(|k| k.as_str().to_owned())
    }

    #[test]
    fn accepts_quoted_and_bare() {
        assert_eq!(parse(b"\"abc-123\"").unwrap(), "abc-123");
        assert_eq!(parse(b"abc-123").unwrap(), "abc-123");
        assert_eq!(parse(b"  \"a\\\"b\\\\c\"  ").unwrap(), "a\"b\\c");
        assert_eq!(parse(b"\"with space\"").unwrap(), "with space");
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(parse(b""), Err(KeyError::Empty));
        assert_eq!(parse(b"\"\""), Err(KeyError::Empty));
        assert_eq!(parse(b"\"abc"), Err(KeyError::Malformed));
        assert_eq!(parse(b"\"abc\"x"), Err(KeyError::Malformed));
        assert_eq!(parse(b"\"a\\nb\""), Err(KeyError::Malformed));
        assert_eq!(parse(b"a b"), Err(KeyError::InvalidByte { offset: 1 }));
        assert_eq!(parse(b"a\tb"), Err(KeyError::InvalidByte { offset: 1 }));
        assert_eq!(parse(b"ab\"c"), Err(KeyError::Malformed));
        assert_eq!(parse(b"a,b"), Err(KeyError::Repeated));
        assert_eq!(parse(b"a, b"), Err(KeyError::Repeated));
        assert_eq!(parse(b"\"a,b\"").unwrap(), "a,b");
        assert_eq!(parse(b"\xff"), Err(KeyError::InvalidByte { offset: 0 }));
        assert_eq!(parse(&[b'k'; 256]), Err(KeyError::TooLong { len: 256 }));
        assert!(parse(&[b'k'; 255]).is_ok());
    }

    #[test]
    fn named_cookie_is_found() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("_ga=1; session=abc ; x=y"));
        assert_eq!(find_cookie(&headers, "session"), Some(&b"abc"[..]));
        assert_eq!(find_cookie(&headers, "sess"), None);
    }

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut req = http::Request::post("/");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn blank_credentials_are_absent() {
        let scope = Scope::AuthorizationOrCookie;
        let one = scope.resolve(&parts(&[("authorization", ""), ("cookie", "sid=1")]));
        let two = scope.resolve(&parts(&[("authorization", " \t"), ("cookie", "sid=2")]));
        assert_ne!(
            one, two,
            "a blank Authorization must fall through to Cookie"
        );
        assert_eq!(one, scope.resolve(&parts(&[("cookie", "sid=1")])));
        assert_eq!(
            scope.resolve(&parts(&[("authorization", ""), ("cookie", " ")])),
            Some(ScopeValue::anonymous())
        );
        assert_eq!(
            scope.resolve(&parts(&[("authorization", "Bearer a")])),
            scope.resolve(&parts(&[
                ("authorization", " Bearer a "),
                ("authorization", "")
            ]))
        );
        let named = Scope::Cookie(Arc::from("sid"));
        assert_eq!(named.resolve(&parts(&[("cookie", "sid=; x=1")])), None);
        assert_eq!(named.resolve(&parts(&[("cookie", "x=1")])), None);
        assert!(named.resolve(&parts(&[("cookie", "sid=a")])).is_some());
        let custom = Scope::Custom(Arc::new(|_: &Parts| None));
        assert_eq!(
            custom.resolve(&parts(&[("authorization", "Bearer a")])),
            None
        );
    }

    #[test]
    fn storage_keys_round_trip_through_hex() {
        let mut raw = [0u8; 32];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = u8::try_from(i * 8 + 1).unwrap();
        }
        let key = StorageKey::from_bytes(raw);
        let hex = key.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(StorageKey::from_hex(&hex), Some(key));
        assert_eq!(
            StorageKey::from_hex(&format!(" {} ", hex.to_uppercase())),
            Some(key)
        );
        assert_eq!(StorageKey::from_hex(&hex[..62]), None);
        assert_eq!(StorageKey::from_hex(&format!("{hex}00")), None);
        assert_eq!(StorageKey::from_hex(&format!("g{}", &hex[1..])), None);
        assert_eq!(format!("{key}"), hex);
        assert_eq!(format!("{key:?}"), format!("StorageKey({hex})"));
    }

    #[test]
    fn keys_print_as_the_client_meant_them() {
        let key = IdempotencyKey::parse(&HeaderValue::from_static("\"a\\\"b\"")).unwrap();
        assert_eq!(key.to_string(), "a\"b");
        assert_eq!(format!("{key:?}"), "IdempotencyKey(\"a\\\"b\")");
    }

    #[test]
    fn scopes_do_not_collide() {
        let k = IdempotencyKey::parse(&HeaderValue::from_static("k")).unwrap();
        let a = StorageKey::derive(&ScopeValue::custom("x"), &k);
        let b = StorageKey::derive(&ScopeValue::anonymous(), &k);
        let c = StorageKey::derive(&ScopeValue::custom(""), &k);
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_eq!(a.to_hex().len(), 64);
    }
}
