//! Late completion: a `complete` that could not reach the backend (an
//! outage, a restart, a timeout) is tried again in the background, fenced by
//! the lock's token, until the lock would lapse — so that a backend that
//! comes back within `lock_ttl` still gets the record, and the retry
//! replays instead of running the handler again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{BackendError, BackendErrorKind, Completion};
use crate::observe;

/// The latest moment a lock can lapse, as far as this process knows: when
/// its last grant or extension was *sent*, plus its TTL. The server counts
/// from when it received the command, which is later, so until then the
/// lock is certainly still there unless the server lost it.
#[derive(Debug)]
pub(crate) struct Lapse(Mutex<Instant>);

impl Lapse {
    /// A lock granted by a command sent at `sent` for `ttl`.
    pub(crate) fn after(sent: Instant, ttl: Duration) -> Self {
        Self(Mutex::new(later(sent, ttl)))
    }

    /// An extension sent at `sent` for `ttl` succeeded.
    pub(crate) fn extended(&self, sent: Instant, ttl: Duration) {
        let mut at = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *at = (*at).max(later(sent, ttl));
    }

    /// When the lock lapses at the latest.
    pub(crate) fn at(&self) -> Instant {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `at + ttl`, the TTL clamped as the backends clamp it (any TTL is
/// accepted, `Duration::MAX` included).
fn later(at: Instant, ttl: Duration) -> Instant {
    let ttl = crate::config::clamp_ttl(ttl);
    at.checked_add(ttl).unwrap_or(at)
}

/// Whether an error means the backend may not have been reached (or may
/// come back): worth trying again.
pub(crate) const fn is_transient(error: &BackendError) -> bool {
    matches!(
        error.kind(),
        BackendErrorKind::Unavailable | BackendErrorKind::Timeout
    )
}

type Attempt<T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send>>;

/// Tries `complete` again from a task of its own (which a graceful
/// shutdown waits for) until it answers or `deadline` passes. A definite
/// refusal runs `release` once, so the key is free at once instead of at
/// the lock's lapse.
pub(crate) fn complete_late<C, R>(deadline: Instant, mut complete: C, release: R)
where
    C: FnMut() -> Attempt<Completion> + Send + 'static,
    R: FnOnce() -> Attempt<()> + Send + 'static,
{
    tracing::warn!("storing the response failed; trying again until the lock lapses");
    crate::shutdown::spawn(async move {
        let mut pause = Duration::from_millis(50);
        loop {
            let now = Instant::now();
            if now >= deadline {
                observe::store("late_gave_up");
                tracing::warn!(
                    "the backend did not come back before the lock lapsed; the response is not \
                     stored and a retry may run the handler again"
                );
                return;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            match complete().await {
                Ok(Completion::Saved | Completion::NotKept) => {
                    observe::store("stored_late");
                    tracing::info!("the response was stored late, after the backend came back");
                    return;
                }
                Ok(_) => {
                    observe::store("late_lost");
                    tracing::warn!(
                        "not stored late: the lock is no longer this request's (it lapsed, was \
                         taken over, or an earlier attempt stored the response)"
                    );
                    return;
                }
                Err(error) if is_transient(&error) => {
                    tracing::debug!(%error, "late store: the backend is still unreachable");
                }
                Err(error) => {
                    observe::store("late_gave_up");
                    tracing::warn!(%error, "late store refused; releasing the key");
                    if let Err(error) = release().await {
                        tracing::warn!(%error, "releasing the key failed; it lapses by its TTL");
                    }
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn outage() -> BackendError {
        BackendError::new(BackendErrorKind::Unavailable, "refused")
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_backend_answers() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&attempts);
        let released = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&released);
        complete_late(
            Instant::now() + Duration::from_secs(10),
            move || {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                Box::pin(async move {
                    if n < 5 {
                        Err(outage())
                    } else {
                        Ok(Completion::Saved)
                    }
                })
            },
            move || {
                r.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(()) })
            },
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 5);
        assert_eq!(released.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_when_the_lock_lapses_and_releases_on_a_refusal() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&attempts);
        complete_late(
            Instant::now() + Duration::from_secs(3),
            move || {
                counted.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Err(outage()) })
            },
            || Box::pin(async { Ok(()) }),
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        let tried = attempts.load(Ordering::SeqCst);
        assert!((4..=8).contains(&tried), "{tried} attempts within 3 s");

        let released = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&released);
        complete_late(
            Instant::now() + Duration::from_secs(3),
            || Box::pin(async { Err(BackendError::new(BackendErrorKind::Rejected, "OOM")) }),
            move || {
                r.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(()) })
            },
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(released.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_longest_ttls_are_clamped() {
        let start = Instant::now();
        let lapse = Lapse::after(start, Duration::MAX);
        assert_eq!(lapse.at(), start + crate::MAX_TTL);
        lapse.extended(start, Duration::MAX);
        assert_eq!(lapse.at(), start + crate::MAX_TTL);
    }

    #[test]
    fn a_lapse_moves_only_forward() {
        let start = Instant::now();
        let lapse = Lapse::after(start, Duration::from_secs(10));
        lapse.extended(start, Duration::from_secs(5));
        assert_eq!(lapse.at(), start + Duration::from_secs(10));
        lapse.extended(start + Duration::from_secs(3), Duration::from_secs(10));
        assert_eq!(lapse.at(), start + Duration::from_secs(13));
    }
}
