//! Lock tokens for the Redis and PostgreSQL backends: 128 bits that no
//! other holder of a key, in this process or another, is ever given.
//!
//! A token only has to be unique: it proves to the server that a write
//! comes from the holder of the lock, and it never leaves the backend (the
//! handler's [`FencingToken`](crate::FencingToken) is another number). So
//! the operating system's randomness is asked once per process, for a
//! 128-bit base, and each token is the base plus a counter: two processes
//! repeat a token only if their bases land within the number of tokens
//! either draws of each other, about 2^-90 for a billion tokens a process.
//! A `getrandom` call per lock (a system call on every `begin`, replays
//! included) showed in profiles; an addition does not.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{BackendError, BackendErrorKind};

static BASE: OnceLock<u128> = OnceLock::new();
static NEXT: AtomicU64 = AtomicU64::new(0);

/// A token no other lock is given.
pub(crate) fn next() -> Result<[u8; 16], BackendError> {
    let base = if let Some(base) = BASE.get() {
        *base
    } else {
        let mut bytes = [0; 16];
        getrandom::fill(&mut bytes).map_err(|e| {
            BackendError::new(
                BackendErrorKind::Other,
                format!("no randomness for lock tokens: {e}"),
            )
        })?;
        // Two tasks may both draw: one base wins, and both use it.
        *BASE.get_or_init(|| u128::from_ne_bytes(bytes))
    };
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Ok(base.wrapping_add(u128::from(n)).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn tokens_are_distinct_across_threads() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..10_000)
                        .map(|_| next().expect("a token"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for thread in threads {
            for token in thread.join().expect("no panic") {
                assert!(seen.insert(token), "token {token:?} given twice");
            }
        }
        assert_eq!(seen.len(), 40_000);
    }
}
