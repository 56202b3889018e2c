//! `Counted`: a backend that counts the `begin` calls of the one it wraps
//! (a request's own look, and every poll of a waiting room), for the wait
//! tests and `benches/wait_cost.rs`.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tower_idempotency::{
    Backend, BackendError, Begin, Completion, FencingToken, Fingerprint, Record, StorageKey,
};

/// Counts `begin` calls of the backend it wraps; forwards everything else.
#[derive(Clone)]
pub struct Counted<B> {
    inner: B,
    begins: Arc<AtomicUsize>,
    /// How long each `begin` takes, as a round trip would.
    round_trip: Duration,
}

impl<B: Backend> Counted<B> {
    pub fn new(inner: B) -> Self {
        Self::counting_into(inner, Arc::default())
    }
    /// Counts into `begins`, which several backends can share.
    pub fn counting_into(inner: B, begins: Arc<AtomicUsize>) -> Self {
        Self {
            inner,
            begins,
            round_trip: Duration::ZERO,
        }
    }
    pub fn with_round_trip(mut self, round_trip: Duration) -> Self {
        self.round_trip = round_trip;
        self
    }
    pub fn begins(&self) -> usize {
        self.begins.load(Ordering::SeqCst)
    }
}

impl<B: Backend> Backend for Counted<B> {
    type Lock = B::Lock;

    async fn begin(
        &self,
        key: &StorageKey,
        fp: &Fingerprint,
        ttl: Duration,
    ) -> Result<Begin<B::Lock>, BackendError> {
        self.begins.fetch_add(1, Ordering::SeqCst);
        if !self.round_trip.is_zero() {
            tokio::time::sleep(self.round_trip).await;
        }
        self.inner.begin(key, fp, ttl).await
    }
    async fn complete(
        &self,
        lock: B::Lock,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        self.inner.complete(lock, record, ttl).await
    }
    async fn release(&self, lock: B::Lock) -> Result<(), BackendError> {
        self.inner.release(lock).await
    }
    async fn extend(&self, lock: &B::Lock, ttl: Duration) -> Result<bool, BackendError> {
        self.inner.extend(lock, ttl).await
    }
    fn abandon(&self, lock: B::Lock) {
        self.inner.abandon(lock);
    }
    fn fencing_token(&self, lock: &B::Lock) -> Option<FencingToken> {
        self.inner.fencing_token(lock)
    }
    fn prepare_request(&self, lock: &B::Lock, extensions: &mut http::Extensions) {
        self.inner.prepare_request(lock, extensions);
    }
    fn commits_handler_effects(&self) -> bool {
        self.inner.commits_handler_effects()
    }
}
