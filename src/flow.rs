//! The guarded request flow: buffer → fingerprint → begin → handler → store.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, response};
use http_body::Body;
use tower::Service;
use tracing::Instrument;

use crate::backend::{Backend, BackendError, Begin, Completion};
use crate::body::{Collected, IdempotencyBody, collect_limited};
use crate::layer::{Config, Persist};
use crate::observe;
use crate::problem::{self, ProblemKind};
use crate::record::strip_unreplayable;
use crate::{BoxError, Fingerprint, IdempotencyKey, Record, StorageKey};

/// The header that marks a replayed response.
///
/// ```
/// use tower_idempotency::IDEMPOTENT_REPLAYED;
///
/// let response = http::Response::builder()
///     .header(IDEMPOTENT_REPLAYED, "true")
///     .body(())
///     .unwrap();
/// assert!(response.headers().get(IDEMPOTENT_REPLAYED).is_some_and(|v| v == "true"));
/// ```
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest `Retry-After` hint given to a duplicate of a request in flight.
const IN_FLIGHT_RETRY_AFTER: Duration = Duration::from_secs(1);

pub(crate) fn problem<B: Body>(
    kind: ProblemKind,
    detail: &str,
    retry_after: Option<Duration>,
) -> Response<IdempotencyBody<B>> {
    problem::response(kind, detail, retry_after).map(|body| IdempotencyBody::full(body, None))
}

pub(crate) async fn run<S, B, ReqBody, ResBody>(
    inner: S,
    backend: B,
    config: Arc<Config>,
    req: Request<ReqBody>,
    key: IdempotencyKey,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
    B: Backend,
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body,
{
    let (mut parts, body) = req.into_parts();
    let (data, trailers) = match buffer_request(&parts.headers, body, config.max_request_body).await
    {
        Ok(buffered) => buffered,
        Err(answer) => return Ok(answer),
    };

    let storage_key = StorageKey::derive(&config.scope.resolve(&parts), &key);
    let fingerprint = Fingerprint::compute(
        &parts,
        &data,
        config.include_authorization,
        &config.fingerprint_headers,
    );
    parts.extensions.insert(key);
    let req = Request::from_parts(parts, IdempotencyBody::full(data, trailers));
    // Only the hashed key is logged: never the client's key or credentials.
    let span = tracing::debug_span!("idempotency", key = %storage_key);
    decide(inner, backend, config, req, storage_key, fingerprint)
        .instrument(span)
        .await
}

/// Locks or looks up the key, runs the handler when it must, stores or
/// releases.
async fn decide<S, B, ReqBody, ResBody>(
    mut inner: S,
    backend: B,
    config: Arc<Config>,
    req: Request<IdempotencyBody<ReqBody>>,
    storage_key: StorageKey,
    fingerprint: Fingerprint,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
    B: Backend,
    ReqBody: Body,
    ResBody: Body,
{
    let begun = observe::backend(
        "begin",
        backend.begin(&storage_key, &fingerprint, config.lock_ttl),
    );
    let lock = match begun.await {
        Ok(Begin::Acquired(lock)) => {
            observe::request("fresh");
            tracing::debug!("key acquired; running the handler");
            lock
        }
        Ok(Begin::Completed(record)) if record.fingerprint == fingerprint => {
            observe::request("replayed");
            tracing::debug!("replaying stored response");
            return Ok(replay(record));
        }
        Ok(Begin::Completed(_)) => {
            observe::request("mismatch");
            tracing::debug!("key reused with a different request");
            return Ok(problem(
                ProblemKind::FingerprintMismatch,
                "this Idempotency-Key was used with a different request; use a new key",
                None,
            ));
        }
        Ok(Begin::Busy { retry_after }) => {
            observe::request("conflict");
            tracing::debug!("request with this key in flight");
            return Ok(problem(
                ProblemKind::InFlight,
                "a request with this Idempotency-Key is being processed; retry later",
                // The lock's expiry is only the worst case (a crashed holder);
                // most requests finish well within a second.
                Some(retry_after.min(IN_FLIGHT_RETRY_AFTER)),
            ));
        }
        Err(error) => return backend_failed(inner, req, &config, &error).await,
    };

    let mut guard = LockGuard {
        backend: &backend,
        lock: Some(lock),
    };
    let handled = handle(&mut inner, req, &config);
    let (outcome, lost) = match guard.lock.as_ref() {
        Some(lock) if config.heartbeat => with_heartbeat(handled, &backend, lock, &config).await,
        _ => (handled.await, false),
    };
    match outcome {
        Outcome::Failed(error) => {
            observe::store("not_stored");
            guard.release("inner service failed").await;
            Err(error)
        }
        Outcome::Unstored(response, why) => {
            observe::store("not_stored");
            guard.release(why).await;
            Ok(response)
        }
        Outcome::Complete { parts, data, .. } if lost => {
            observe::store("lock_lost");
            tracing::warn!("lock lost while the handler ran; response not stored");
            guard.release("lock lost").await;
            Ok(Response::from_parts(
                parts,
                IdempotencyBody::full(data, None),
            ))
        }
        Outcome::Complete { parts, data, ttl } => {
            let record = Record::from_parts(&parts, data.clone(), fingerprint);
            match guard.complete(record, ttl).await {
                Ok(Completion::Saved) => {
                    observe::store("stored");
                    tracing::debug!("response stored");
                }
                Ok(_) => {
                    observe::store("lock_lost");
                    tracing::warn!("lock lost before the response was stored");
                }
                Err(error) => {
                    observe::store("failed");
                    tracing::warn!(%error, "storing the response failed");
                }
            }
            Ok(Response::from_parts(
                parts,
                IdempotencyBody::full(data, None),
            ))
        }
    }
}

/// Buffers the request body within `limit`, or says how to answer instead.
async fn buffer_request<ReqBody, ResBody>(
    headers: &HeaderMap,
    body: ReqBody,
    limit: usize,
) -> Result<(Bytes, Option<HeaderMap>), Response<IdempotencyBody<ResBody>>>
where
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body,
{
    if declared_length(headers).is_some_and(|len| len > limit as u64) {
        return Err(too_large(limit));
    }
    match collect_limited(pin!(body), limit).await {
        Collected::Complete { data, trailers } => Ok((data, trailers)),
        Collected::Overflow { .. } => Err(too_large(limit)),
        // A limit enforced further out (tower-http's `RequestBodyLimitLayer`
        // wraps the body in `Limited`) surfaces here as a body error: it is
        // still "too large", not "broken".
        Collected::Failed { error, .. } => {
            let error: BoxError = error.into();
            Err(if is_length_limit(&*error) {
                too_large(limit)
            } else {
                observe::request("body_error");
                problem(
                    ProblemKind::RequestBodyError,
                    "the request body ended with an error before it was complete",
                    None,
                )
            })
        }
    }
}

fn too_large<B: Body>(limit: usize) -> Response<IdempotencyBody<B>> {
    observe::request("body_too_large");
    problem(
        ProblemKind::BodyTooLarge,
        &format!("the request body is larger than {limit} bytes"),
        None,
    )
}

/// Whether `error`, or an error it wraps, is a body length limit.
fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        current = e.source();
    }
    false
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

async fn backend_failed<S, ReqBody, ResBody>(
    mut inner: S,
    req: Request<IdempotencyBody<ReqBody>>,
    config: &Config,
    error: &BackendError,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body,
    ResBody: Body,
{
    if config.fail_open {
        observe::request("fail_open");
        tracing::warn!(%error, "idempotency backend failed; running unprotected (fail-open)");
        let response = inner.call(req).await?;
        return Ok(response.map(IdempotencyBody::stream));
    }
    observe::request("backend_unavailable");
    tracing::warn!(%error, "idempotency backend failed; answering 503");
    Ok(problem(
        ProblemKind::BackendUnavailable,
        "the idempotency store is unavailable; the request was not processed",
        Some(config.unavailable_retry_after),
    ))
}

/// Builds the replay of a stored record.
pub(crate) fn replay<B: Body>(record: Record) -> Response<IdempotencyBody<B>> {
    let Record {
        status,
        mut headers,
        body,
        ..
    } = record;
    // Records from remote stores may have been written by other code.
    strip_unreplayable(&mut headers);
    if !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
    {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    let mut response = Response::new(IdempotencyBody::full(body, None));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

enum Outcome<ResBody: Body, E> {
    /// The inner service returned an error.
    Failed(E),
    /// A response that is not stored, and why.
    Unstored(Response<IdempotencyBody<ResBody>>, &'static str),
    /// A response to store.
    Complete {
        parts: response::Parts,
        data: Bytes,
        ttl: Duration,
    },
}

/// Calls the handler and buffers its response if it is to be stored.
async fn handle<S, ReqBody, ResBody>(
    inner: &mut S,
    req: Request<IdempotencyBody<ReqBody>>,
    config: &Config,
) -> Outcome<ResBody, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body,
    ResBody: Body,
{
    let (parts, body) = match inner.call(req).await {
        Ok(response) => response.into_parts(),
        Err(error) => return Outcome::Failed(error),
    };
    let ttl = match parts.extensions.get::<Persist>() {
        Some(Persist::Never) => {
            let response = Response::from_parts(parts, IdempotencyBody::stream(body));
            return Outcome::Unstored(response, "the handler opted out");
        }
        Some(Persist::For(ttl)) => *ttl,
        None if (config.persist_if)(&parts) => config.ttl,
        None => {
            let response = Response::from_parts(parts, IdempotencyBody::stream(body));
            return Outcome::Unstored(response, "status is not stored");
        }
    };
    let limit = config.max_stored_response;
    if declared_length(&parts.headers).is_some_and(|len| len > limit as u64) {
        let response = Response::from_parts(parts, IdempotencyBody::stream(body));
        return Outcome::Unstored(response, "response larger than the store limit");
    }
    let mut body = Box::pin(body);
    match collect_limited(body.as_mut(), limit).await {
        Collected::Complete {
            data,
            trailers: None,
        } => Outcome::Complete { parts, data, ttl },
        Collected::Complete { data, trailers } => Outcome::Unstored(
            Response::from_parts(parts, IdempotencyBody::full(data, trailers)),
            "response has trailers",
        ),
        Collected::Overflow { prefix } => Outcome::Unstored(
            Response::from_parts(parts, IdempotencyBody::prefixed(prefix, body)),
            "response larger than the store limit",
        ),
        Collected::Failed { prefix, error } => Outcome::Unstored(
            Response::from_parts(parts, IdempotencyBody::failed(prefix, error)),
            "response body failed",
        ),
    }
}

/// Drives `work` while extending `lock` every `lock_ttl / 3`. Returns the
/// output and whether the lock was reported lost.
async fn with_heartbeat<F: Future, B: Backend>(
    work: F,
    backend: &B,
    lock: &B::Lock,
    config: &Config,
) -> (F::Output, bool) {
    let mut work = pin!(work);
    let interval = (config.lock_ttl / 3).max(Duration::from_millis(1));
    let heartbeat = async {
        loop {
            tokio::time::sleep(interval).await;
            match observe::backend("extend", backend.extend(lock, config.lock_ttl)).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(error) => tracing::warn!(%error, "extending the idempotency lock failed"),
            }
        }
    };
    tokio::select! {
        biased;
        output = &mut work => (output, false),
        () = heartbeat => (work.await, true),
    }
}

/// Holds the lock; if the flow is dropped (client gone, timeout, panic)
/// before the lock is handed to `complete` or `release`, it is abandoned to
/// the backend, which releases it without blocking.
struct LockGuard<'a, B: Backend> {
    backend: &'a B,
    lock: Option<B::Lock>,
}

impl<B: Backend> LockGuard<'_, B> {
    async fn release(&mut self, why: &str) {
        tracing::debug!(why, "response not stored; key released");
        if let Some(lock) = self.lock.take()
            && let Err(error) = observe::backend("release", self.backend.release(lock)).await
        {
            tracing::warn!(%error, "releasing the idempotency lock failed");
        }
    }

    async fn complete(
        &mut self,
        record: Record,
        ttl: Duration,
    ) -> Result<Completion, BackendError> {
        match self.lock.take() {
            Some(lock) => {
                observe::backend("complete", self.backend.complete(lock, record, ttl)).await
            }
            None => Ok(Completion::Lost),
        }
    }
}

impl<B: Backend> Drop for LockGuard<'_, B> {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            self.backend.abandon(lock);
        }
    }
}
