//! The crate's backends run the published conformance suite
//! (`tower_idempotency::conformance`, feature `conformance`) unchanged; this
//! module only names its helpers for the other tests and generates the test.
#![allow(dead_code, unused_imports)]

pub use tower_idempotency::conformance::{Locks, fingerprint, fresh_key, record};

/// Every case on one backend; fails with every failed case by name.
pub async fn run_all<B: tower_idempotency::Backend>(b: B, locks: Locks) {
    tower_idempotency::conformance::run(b, locks)
        .await
        .assert_passed();
}

/// The named cases on one backend.
pub async fn run_only<B: tower_idempotency::Backend>(b: B, locks: Locks, names: &[&str]) {
    tower_idempotency::conformance::run_only(b, locks, names)
        .await
        .assert_passed();
}

/// A test that runs the whole suite on the backend `$make` makes.
///
/// `backend_conformance!(#[tokio::test(start_paused = true)], MemoryBackend::new(), Lapse);`
#[macro_export]
macro_rules! backend_conformance {
    (#[$attr:meta], $make:expr, $locks:ident) => {
        #[$attr]
        async fn the_conformance_suite_passes() {
            conformance::run_all($make, conformance::Locks::$locks).await;
        }
    };
}
