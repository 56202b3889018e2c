//! How a key is settled once its handler has answered, failed or been cut
//! off: whether a response is kept, what is stored in its place, and what
//! the client gets when the store did not commit.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::{Response, response};
use http_body::Body;

use crate::backend::{Backend, Completion};
use crate::body::IdempotencyBody;
use crate::config::{Config, Persist, ServerErrors, clamp_ttl};
use crate::headers::{problem, set_retention};
use crate::lock::{Delivery, LockGuard};
use crate::observe;
use crate::problem::{Answered, ProblemKind};
use crate::{Fingerprint, Record};

/// What the task running a handler delivers: the response, or the inner
/// service's error.
pub(crate) type Answer<ResBody, E> = Result<Response<IdempotencyBody<ResBody>>, E>;

/// Stores the record of a response (or its "not kept" marker) and delivers
/// the response: replaced by a problem when an atomic backend did not
/// commit it, or when the handler's own transaction failed under a success.
pub(crate) async fn store<B: Backend, ResBody: Body, E>(
    guard: &mut LockGuard<B>,
    (record, ttl): (Record, Duration),
    response: Option<Response<IdempotencyBody<ResBody>>>,
    atomic: bool,
    retention: Option<&HeaderName>,
    delivery: &mut Delivery<Answer<ResBody, E>>,
) {
    let (kept, status) = (record.kept, record.status);
    // The handler answered with a failure of its own (an HTTP `4xx`, or a
    // gRPC error status): that answer stands when its transaction aborted.
    let handler_failed = status.is_client_error() || crate::grpc::failed(&record);
    let mut aborted = false;
    let stored = guard.complete(record, ttl).await;
    let committed = match &stored {
        Ok(Completion::Saved) if kept => {
            observe::store("stored");
            tracing::debug!("response stored");
            true
        }
        Ok(Completion::Saved | Completion::NotKept) => {
            observe::store("not_kept");
            tracing::debug!("response not storable; marker stored");
            true
        }
        Ok(Completion::Aborted) => {
            observe::store("aborted");
            aborted = true;
            false
        }
        Ok(_) => {
            observe::store("lock_lost");
            tracing::warn!("lock lost before the response was stored");
            false
        }
        Err(error) => {
            observe::store("failed");
            tracing::warn!(%error, "storing the response failed");
            false
        }
    };
    if let Some(response) = response {
        let mut response = if aborted && !handler_failed {
            problem(
                ProblemKind::TransactionAborted,
                "a statement of the request's transaction failed, so none of its writes were committed; the request was not completed",
                None,
            )
        } else if atomic && !committed && !aborted {
            not_committed()
        } else {
            response
        };
        if let (Some(name), false) = (retention, committed) {
            // Not stored: a retry runs again. Unknown (the store failed
            // and may still happen late): no promise either way.
            if stored.is_err() {
                response.headers_mut().remove(name);
            } else {
                set_retention(response.headers_mut(), Some(name), Duration::ZERO);
            }
        }
        delivery.send(Ok(response));
    }
}

/// How far the handler got, for a shutdown that cuts it off.
#[derive(Default)]
pub(crate) struct Progress {
    /// The handler was called.
    pub(crate) called: AtomicBool,
    /// The status of a response already streaming to the client; 0 if none.
    pub(crate) streaming: AtomicU16,
}

/// Settles the key of a handler that a graceful shutdown cut off, by how
/// far it got: never called — released, nothing ran; on a backend that
/// rolls its effects back — released; already streaming its response — a
/// "not kept" marker with that status, as for any response that could not
/// be stored; otherwise an "interrupted" record, so that a retry does not
/// run a handler that may have done its work. The client, if still there,
/// gets the answer a retry would get.
pub(crate) async fn interrupted<B: Backend, ResBody: Body, E>(
    guard: &mut LockGuard<B>,
    config: &Config,
    (fingerprint, grpc): (Fingerprint, bool),
    atomic: bool,
    progress: &Progress,
    delivery: &mut Delivery<Answer<ResBody, E>>,
) {
    let called = progress.called.load(Ordering::SeqCst);
    if !called || atomic {
        observe::store("not_stored");
        tracing::warn!(
            called,
            "handler cut off by shutdown before it did anything lasting; the key is released"
        );
        guard.release("interrupted by shutdown").await;
        delivery.send(Ok(problem(
            ProblemKind::ShuttingDown,
            if called {
                "this instance shut down before the request finished; nothing was committed; retry with the same Idempotency-Key"
            } else {
                "this instance shut down before the request was processed; retry with the same Idempotency-Key"
            },
            Some(config.unavailable_retry_after),
        )));
        return;
    }
    let streaming = progress.streaming.load(Ordering::SeqCst);
    // The client has the response's head: the retry gets that status.
    let (record, answer) = if let Ok(status) = http::StatusCode::from_u16(streaming) {
        (Record::not_kept(status, fingerprint), None)
    } else {
        let (record, parts, body) = problem_record(
            ProblemKind::Interrupted,
            ProblemKind::Interrupted.status(),
            "the request was cut off by a shutdown while it was processed; its outcome is unknown and it will not run again with this key",
            (fingerprint, grpc),
        );
        (record, Some((parts, body)))
    };
    tracing::warn!(
        kept = record.kept,
        "handler cut off by shutdown; its key is settled so that a retry does not run it again"
    );
    match guard.complete(record, config.ttl).await {
        Ok(Completion::Saved | Completion::NotKept) => observe::store("interrupted"),
        Ok(_) => {
            observe::store("lock_lost");
            tracing::warn!("lock lost before the interrupted handler's key was settled");
        }
        Err(error) => {
            observe::store("failed");
            tracing::warn!(%error, "settling the interrupted handler's key failed");
        }
    }
    if let Some((parts, body)) = answer {
        delivery.send(Ok(full(parts, body, None)));
    }
}

/// Whether a response is kept, and for how long: the handler's [`Persist`]
/// first, then the [`ServerErrors`] policy for a `5xx`, then `persist_if`.
pub(crate) enum Keep {
    For(Duration),
    Release(&'static str),
    /// Store this record in the response's place.
    Instead(Record),
}

/// `request` is the fingerprint of the request, and whether it is gRPC (a
/// record stored instead of the response is then a gRPC answer).
pub(crate) fn keep(parts: &response::Parts, config: &Config, request: (Fingerprint, bool)) -> Keep {
    match parts.extensions.get::<Persist>() {
        Some(Persist::Never) => Keep::Release("the handler opted out"),
        Some(Persist::For(ttl)) => Keep::For(clamp_ttl(*ttl)),
        None if parts.status.is_server_error() && config.server_errors == ServerErrors::Mark => {
            Keep::Instead(outcome_unknown(parts.status, request))
        }
        None if parts.status.is_server_error() && config.server_errors == ServerErrors::Replay => {
            Keep::For(config.ttl)
        }
        None if (config.persist_if)(parts) => Keep::For(config.ttl),
        None => Keep::Release("status is not stored"),
    }
}

/// The record a retry of a `5xx` gets under [`ServerErrors::Mark`]: the
/// outcome-unknown problem, with the `5xx`'s status.
pub(crate) fn outcome_unknown(status: http::StatusCode, request: (Fingerprint, bool)) -> Record {
    problem_record(
        ProblemKind::OutcomeUnknown,
        status,
        "the first attempt of this request failed with a server error; whether it took effect is unknown, and it will not run again with this key",
        request,
    )
    .0
}

/// A problem answer stored as the key's record, with the answer itself: in
/// gRPC's terms for a gRPC request, so that a replay restores it as such.
fn problem_record(
    kind: ProblemKind,
    status: http::StatusCode,
    detail: &str,
    (fingerprint, grpc): (Fingerprint, bool),
) -> (Record, response::Parts, Bytes) {
    let (mut parts, mut body) =
        crate::problem::response_with_status(kind, status, detail, None).into_parts();
    if grpc && let Some(answered) = parts.extensions.get::<Answered>().cloned() {
        crate::grpc::convert(&mut parts.status, &mut parts.headers, &answered);
        body = Bytes::new();
    }
    let record = Record::from_parts(&parts, body.clone(), fingerprint);
    (record, parts, body)
}

/// The answer for a response whose record, and with it the handler's
/// effects, was not committed — or whose commit cannot be confirmed (the
/// connection died with the COMMIT in flight). Either way the same key is
/// the right retry: it replays if the commit happened, and runs if not.
pub(crate) fn not_committed<B: Body>() -> Response<IdempotencyBody<B>> {
    problem(
        ProblemKind::BackendUnavailable,
        "the request's changes could not be committed with its response, or their commit could not be confirmed; retry with the same Idempotency-Key: it replays the response if they were committed and runs the request if they were not",
        None,
    )
}

pub(crate) fn full<B: Body>(
    parts: response::Parts,
    data: Bytes,
    trailers: Option<HeaderMap>,
) -> Response<IdempotencyBody<B>> {
    Response::from_parts(parts, IdempotencyBody::full(data, trailers))
}
