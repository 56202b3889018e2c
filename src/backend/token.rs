//! Lock tokens for the Redis and PostgreSQL backends: 128 bits from the
//! operating system's randomness, drawn for every lock.
//!
//! A token proves to the server that a write comes from the holder of the
//! lock; it never leaves the backend (the handler's
//! [`FencingToken`](crate::FencingToken) is another number). A random base
//! per process plus a counter would spare the system call, but a process
//! that is forked, or a virtual machine restored from one snapshot more than
//! once, would hand out the same sequence twice, and a holder whose lease
//! lapsed could then complete over a newer holder with the same token. A
//! forked process draws fresh bytes here, and Linux reseeds its generator
//! when a virtual machine with a generation ID (vmgenid) is restored.

use super::{BackendError, BackendErrorKind};

/// A fresh random token.
pub(crate) fn next() -> Result<[u8; 16], BackendError> {
    let mut token = [0; 16];
    getrandom::fill(&mut token).map_err(|e| {
        BackendError::new(
            BackendErrorKind::Other,
            format!("no randomness for a lock token: {e}"),
        )
    })?;
    Ok(token)
}
