//! How the request body enters the fingerprint: its bytes as sent (the
//! default), a canonical form of its JSON, or what a function of the user's
//! makes of it.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::request::Parts;

type BodyFn = dyn Fn(&Parts, &[u8]) -> Result<Vec<u8>, String> + Send + Sync;

/// The body part of the fingerprint.
#[derive(Clone, Default)]
pub(crate) enum BodyFingerprint {
    /// The bytes as sent.
    #[default]
    Raw,
    /// The canonical form of the JSON document (see [`canonical_json`]).
    #[cfg(feature = "json")]
    CanonicalJson,
    /// What the user's function returns.
    Custom(Arc<BodyFn>),
}

impl BodyFingerprint {
    pub(crate) fn custom<F>(f: F) -> Self
    where
        F: Fn(&Parts, &[u8]) -> Result<Vec<u8>, String> + Send + Sync + 'static,
    {
        Self::Custom(Arc::new(f))
    }

    /// The bytes to fingerprint for `body`, or why the body is refused.
    pub(crate) fn apply<'a>(&self, parts: &Parts, body: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
        match self {
            Self::Raw => Ok(Cow::Borrowed(body)),
            #[cfg(feature = "json")]
            Self::CanonicalJson if body.is_empty() => Ok(Cow::Borrowed(body)),
            #[cfg(feature = "json")]
            Self::CanonicalJson => canonical_json(body)
                .map(Cow::Owned)
                .map_err(|e| format!("the request body is not valid JSON: {e}")),
            Self::Custom(f) => f(parts, body).map(Cow::Owned),
        }
    }
}

impl fmt::Debug for BodyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Raw => "Raw",
            #[cfg(feature = "json")]
            Self::CanonicalJson => "CanonicalJson",
            Self::Custom(_) => "Custom",
        })
    }
}

/// Why a body is not canonical JSON.
#[cfg(feature = "json")]
#[derive(Debug)]
pub(crate) enum JsonError {
    Invalid(serde_json::Error),
    DuplicateKey(String),
}

#[cfg(feature = "json")]
impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(e) => e.fmt(f),
            // The key is the client's own input: its length only.
            Self::DuplicateKey(key) => write!(
                f,
                "an object has the same key twice (a key of {} bytes)",
                key.len()
            ),
        }
    }
}

/// The canonical form of a JSON document, for fingerprinting: insignificant
/// whitespace removed, object members sorted by key (by the keys' UTF-8
/// bytes, after unescaping), strings written with the fewest escapes
/// (`"\u0041"` and `"A"` are the same), numbers, `true`, `false` and `null`
/// **as written** (`1`, `1.0` and `1e0` stay three different requests: no
/// number is rounded into another, however large or precise). An object
/// with the same key twice is refused, as its meaning depends on the reader.
///
/// The document is validated by `serde_json` first, then walked once;
/// nesting deeper than 128 levels is refused (the walk recurses).
#[cfg(feature = "json")]
pub(crate) fn canonical_json(body: &[u8]) -> Result<Vec<u8>, JsonError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(JsonError::Invalid)?;
    let mut walker = Walker {
        text: body,
        at: 0,
        depth: 0,
    };
    let mut out = Vec::with_capacity(body.len());
    walker.value(&mut out)?;
    Ok(out)
}

/// A walk over a document `serde_json` has validated.
#[cfg(feature = "json")]
struct Walker<'a> {
    text: &'a [u8],
    at: usize,
    /// Objects and arrays open around the cursor.
    depth: usize,
}

/// The deepest nesting walked (as `serde_json` bounds its own recursion).
#[cfg(feature = "json")]
const MAX_DEPTH: usize = 128;

#[cfg(feature = "json")]
impl Walker<'_> {
    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    /// The next byte after whitespace, consumed.
    fn next_token(&mut self) -> Result<u8, JsonError> {
        self.skip_whitespace();
        let byte = self.peek().ok_or_else(|| {
            JsonError::Invalid(serde::de::Error::custom("unexpected end of the document"))
        })?;
        self.at += 1;
        Ok(byte)
    }

    fn value(&mut self, out: &mut Vec<u8>) -> Result<(), JsonError> {
        let token = self.next_token()?;
        if matches!(token, b'{' | b'[') {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(JsonError::Invalid(serde::de::Error::custom(format!(
                    "nested deeper than {MAX_DEPTH} levels"
                ))));
            }
        }
        let written = self.token_value(token, out);
        if matches!(token, b'{' | b'[') {
            self.depth -= 1;
        }
        written
    }

    fn token_value(&mut self, token: u8, out: &mut Vec<u8>) -> Result<(), JsonError> {
        match token {
            b'{' => self.object(out),
            b'[' => {
                out.push(b'[');
                self.skip_whitespace();
                if self.peek() == Some(b']') {
                    self.at += 1;
                } else {
                    loop {
                        self.value(out)?;
                        if self.next_token()? == b']' {
                            break;
                        }
                        out.push(b',');
                    }
                }
                out.push(b']');
                Ok(())
            }
            b'"' => {
                self.at -= 1;
                let string = self.string()?;
                serde_json::to_writer(&mut *out, &string).map_err(JsonError::Invalid)
            }
            _ => {
                // A number or a literal, as written.
                let start = self.at - 1;
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.at += 1;
                }
                out.extend_from_slice(&self.text[start..self.at]);
                Ok(())
            }
        }
    }

    fn object(&mut self, out: &mut Vec<u8>) -> Result<(), JsonError> {
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.at += 1;
        } else {
            loop {
                self.skip_whitespace();
                let key = self.string()?;
                self.next_token()?; // ':'
                let mut value = Vec::new();
                self.value(&mut value)?;
                members.push((key, value));
                if self.next_token()? == b'}' {
                    break;
                }
            }
        }
        members.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(pair) = members.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(JsonError::DuplicateKey(pair[0].0.clone()));
        }
        out.push(b'{');
        for (i, (key, value)) in members.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, key).map_err(JsonError::Invalid)?;
            out.push(b':');
            out.extend_from_slice(value);
        }
        out.push(b'}');
        Ok(())
    }

    /// A string at the cursor, unescaped.
    fn string(&mut self) -> Result<String, JsonError> {
        let start = self.at;
        self.at += 1; // the opening quote
        loop {
            match self.peek() {
                Some(b'\\') => self.at += 2,
                Some(b'"') => {
                    self.at += 1;
                    break;
                }
                Some(_) => self.at += 1,
                None => break,
            }
        }
        let raw = self.text.get(start..self.at).unwrap_or_default();
        serde_json::from_slice(raw).map_err(JsonError::Invalid)
    }
}

#[cfg(all(test, feature = "json"))]
mod tests {
    use super::*;

    fn canon(json: &str) -> String {
        String::from_utf8(canonical_json(json.as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn key_order_and_whitespace_do_not_count() {
        let a = canon(r#"{"amount": 5, "currency": "EUR", "meta": {"b": [1, 2], "a": null}}"#);
        let b =
            canon("{\n  \"meta\":{\"a\":null,\"b\":[1,2]},\"currency\":\"EUR\",\"amount\":5\n}");
        assert_eq!(a, b);
        assert_eq!(
            a,
            r#"{"amount":5,"currency":"EUR","meta":{"a":null,"b":[1,2]}}"#
        );
    }

    #[test]
    fn numbers_stay_as_written() {
        assert_eq!(
            canon("[1, 1.0, 1e0, -0, 12345678901234567890123456789]"),
            "[1,1.0,1e0,-0,12345678901234567890123456789]"
        );
        assert_ne!(canon(r#"{"a":1}"#), canon(r#"{"a":1.0}"#));
        assert_ne!(
            canon("[123456789012345678901234567890]"),
            canon("[123456789012345678901234567891]"),
            "large numbers are never rounded into each other"
        );
    }

    #[test]
    fn strings_are_unescaped_then_written_once() {
        assert_eq!(canon(r#"["\u0041\/", "é", "\u00e9"]"#), r#"["A/","é","é"]"#);
        assert_eq!(canon(r#"{"\u0061":1}"#), canon(r#"{"a":1}"#));
        assert_eq!(canon(r#""a\"b\\c\n""#), r#""a\"b\\c\n""#);
    }

    #[test]
    fn empty_containers_and_scalars() {
        assert_eq!(canon(" { } "), "{}");
        assert_eq!(canon("[ ]"), "[]");
        assert_eq!(canon(" true "), "true");
        assert_eq!(canon("[[],{},[{}]]"), "[[],{},[{}]]");
    }

    #[test]
    fn invalid_documents_and_duplicate_keys_are_refused() {
        for bad in [
            "",
            "{",
            r#"{"a":1,}"#,
            "[1 2]",
            "NaN",
            "{'a':1}",
            r#"{"a":1} trailing"#,
        ] {
            assert!(
                matches!(canonical_json(bad.as_bytes()), Err(JsonError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(canonical_json(&[b'"', 0xff, b'"']).is_err(), "not UTF-8");
        let error = canonical_json(br#"{"a":1,"b":2,"\u0061":3}"#).unwrap_err();
        assert!(matches!(error, JsonError::DuplicateKey(_)));
        assert!(
            !error.to_string().contains("\"a\""),
            "the key is not echoed"
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(matches!(
            canonical_json(deep.as_bytes()),
            Err(JsonError::Invalid(_))
        ));
        let fine = "[".repeat(100) + &"]".repeat(100);
        assert_eq!(canon(&fine), fine);
    }

    proptest::proptest! {
        /// Any document, written with its members in another order and with
        /// whitespace, has the same canonical form, which is itself valid
        /// JSON and canonical.
        #[test]
        fn reordered_and_reformatted_documents_agree(value in json_value(), seed in 0u64..1000) {
            let plain = serde_json::to_string(&value).unwrap();
            let shuffled = write_shuffled(&value, seed);
            let a = canonical_json(plain.as_bytes()).unwrap();
            let b = canonical_json(shuffled.as_bytes()).unwrap();
            proptest::prop_assert_eq!(&a, &b);
            let again = canonical_json(&a).unwrap();
            proptest::prop_assert_eq!(&again, &a);
            let parsed: serde_json::Value = serde_json::from_slice(&a).unwrap();
            proptest::prop_assert_eq!(parsed, value);
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(serde_json::Value::from),
            "[a-zé\"\\\\\\n ]{0,6}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-d]{1,2}", inner, 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// `value` with object members in an order picked by `seed` and
    /// whitespace around every token.
    fn write_shuffled(value: &serde_json::Value, seed: u64) -> String {
        match value {
            serde_json::Value::Object(map) => {
                let mut members: Vec<_> = map.iter().collect();
                let n = members.len().max(1);
                members.rotate_left(usize::try_from(seed).unwrap() % n);
                if seed % 2 == 1 {
                    members.reverse();
                }
                let inner: Vec<String> = members
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            " {} :\n {} ",
                            serde_json::to_string(k).unwrap(),
                            write_shuffled(v, seed / 3 + 1)
                        )
                    })
                    .collect();
                format!("{{ {} }}", inner.join(",\t"))
            }
            serde_json::Value::Array(items) => {
                let inner: Vec<String> =
                    items.iter().map(|v| write_shuffled(v, seed + 7)).collect();
                format!("[ {} ]", inner.join(" , "))
            }
            other => serde_json::to_string(other).unwrap(),
        }
    }
}
