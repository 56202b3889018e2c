//! `Idempotency-Key` parsing: never panics, and what it accepts is a key the
//! layer can store.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use tower_idempotency::{IdempotencyKey, MAX_KEY_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    if let Ok(key) = IdempotencyKey::parse(&value) {
        let k = key.as_str();
        assert!(!k.is_empty() && k.len() <= MAX_KEY_LEN);
        assert!(k.bytes().all(|b| (0x20..=0x7e).contains(&b)));
        // A parsed key re-quoted parses to itself.
        let mut quoted = String::from("\"");
        for c in k.chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        let again = IdempotencyKey::parse(&HeaderValue::from_str(&quoted).unwrap()).unwrap();
        assert_eq!(again, key);
    }
});
