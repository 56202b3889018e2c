//! The conformance suite against the in-memory backend, on a paused clock.

mod conformance;

use tower_idempotency::MemoryBackend;

backend_conformance!(#[tokio::test(start_paused = true)], MemoryBackend::new());
