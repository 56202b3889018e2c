//! The conformance suite against the in-memory backend, on a paused clock.

mod conformance;

use tower_idempotency::MemoryBackend;

backend_conformance!(#[tokio::test(start_paused = true)], MemoryBackend::new(), Lapse);

/// At capacity the least recently used records go, never the one just
/// stored: a retry is most likely for the newest requests.
#[tokio::test(start_paused = true)]
async fn memory_backend_keeps_the_newest_records_at_capacity() {
    use std::time::Duration;
    use tower_idempotency::{Backend, Begin, Completion};

    let backend = MemoryBackend::builder().max_entries(200).build();
    let keys: Vec<_> = (0..2000).map(|_| conformance::fresh_key()).collect();
    let fp = conformance::fingerprint(1);
    for key in &keys {
        let Begin::Acquired(lock) = backend
            .begin(key, &fp, Duration::from_secs(30))
            .await
            .unwrap()
        else {
            panic!("fresh key");
        };
        let saved = backend
            .complete(
                lock,
                conformance::record(fp, b"{}"),
                Duration::from_hours(1),
            )
            .await
            .unwrap();
        assert_eq!(saved, Completion::Saved);
    }
    assert!(
        backend.stored_count() <= 200,
        "bounded: {}",
        backend.stored_count()
    );
    for (i, key) in keys.iter().rev().take(100).enumerate() {
        match backend
            .begin(key, &fp, Duration::from_secs(30))
            .await
            .unwrap()
        {
            Begin::Completed(_) => {}
            _ => panic!("record #{i} from the end was dropped at capacity"),
        }
    }
}
