//! The decision sequence of a guarded request: buffer → fingerprint → begin
//! → (replay | 409 | 422 | run the handler) → store, mark or release.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderMap;
use http::{Request, Response, StatusCode, response};
use http_body::Body;
use tower::Service;
use tracing::Instrument;

use crate::backend::{Backend, BackendError, BackendErrorKind, Begin};
use crate::body::{Collected, IdempotencyBody, TeeEnd, collect_limited, follow_tee};
use crate::config::{Config, GrpcPersistFn, OnDisconnect, Persist, ServerErrors, Unstorable};
use crate::grpc::{self, Verdict};
use crate::headers::{
    IDEMPOTENCY_TTL, declared_length, is_event_stream, keep_retention_back, known_length, problem,
    replay, retention_left, set_retention,
};
use crate::lock::{Cancellation, Delivery, LockGuard, run_detached};
use crate::observe;
use crate::problem::{Answered, ProblemKind};
use crate::settle::{
    Answer, Keep, Progress, full, interrupted, keep, not_committed, outcome_unknown, store,
};
use crate::shutdown::Ticket;
use crate::{BoxError, Fingerprint, IdempotencyKey, Record, StorageKey};

/// Buffers and fingerprints a keyed request (a gRPC one if `grpc`), then
/// [`decide`]s.
pub(crate) async fn run<S, B, ReqBody, ResBody>(
    inner: S,
    backend: B,
    config: Arc<Config>,
    req: Request<ReqBody>,
    (key, grpc): (IdempotencyKey, bool),
) -> Answer<ResBody, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Backend,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError> + Send,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    if config.shutdown.is_shutting_down() {
        return Ok(shutting_down(&config));
    }
    let (mut parts, body) = req.into_parts();
    let (data, trailers) = match buffer_request(&parts.headers, body, config.max_request_body).await
    {
        Ok(buffered) => buffered,
        Err(answer) => return Ok(answer),
    };

    let scope = match config.scope.resolve(&parts) {
        Some(scope) => scope,
        None if config.shared_anonymous_scope => crate::ScopeValue::anonymous(),
        None => {
            observe::request("unidentified_caller");
            tracing::warn!(
                "keyed request without a caller identity answered 400; does authentication run before the idempotency layer?"
            );
            return Ok(problem(
                ProblemKind::UnidentifiedCaller,
                "this request carries an Idempotency-Key but no caller identity; authenticate it",
                None,
            ));
        }
    };
    // A gRPC body is framed protobuf (or another codec): never JSON-canonical.
    let raw = crate::fingerprint::BodyFingerprint::Raw;
    let body_fingerprint = if grpc { &raw } else { &config.body_fingerprint };
    let fingerprinted = match body_fingerprint.apply(&parts, &data) {
        Ok(body) => body,
        Err(reason) => {
            observe::request("invalid_body");
            tracing::debug!(%reason, "request body refused for the fingerprint");
            return Ok(problem(ProblemKind::InvalidBody, &reason, None));
        }
    };
    let storage_key = StorageKey::derive(&scope, &key);
    let fingerprint = Fingerprint::compute(
        &parts,
        &fingerprinted,
        config.include_authorization,
        &config.fingerprint_headers,
    );
    drop(fingerprinted);
    parts.extensions.insert(key);
    let req = Request::from_parts(parts, IdempotencyBody::full(data, trailers));
    // Only the hashed key is logged: never the client's key or credentials.
    let span = tracing::debug_span!("idempotency", key = %storage_key);
    decide(
        inner,
        backend,
        config,
        req,
        storage_key,
        (fingerprint, grpc),
    )
    .instrument(span)
    .await
}

/// Locks or looks up the key, then answers from the store or runs the
/// handler under the lock.
async fn decide<S, B, ReqBody, ResBody>(
    inner: S,
    backend: B,
    config: Arc<Config>,
    mut req: Request<IdempotencyBody<ReqBody>>,
    storage_key: StorageKey,
    (fingerprint, grpc): (Fingerprint, bool),
) -> Answer<ResBody, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Backend,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Send,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    // Counted from here until the key is settled: a shutdown waits for it.
    let Some(ticket) = config.shutdown.enter() else {
        return Ok(shutting_down(&config));
    };
    let mut begun = observe::backend(
        "begin",
        backend.begin(&storage_key, &fingerprint, config.lock_ttl),
    )
    .await;
    if let (Ok(Begin::Busy { retry_after }), Some(waiting)) = (&begun, &config.waiting) {
        tracing::debug!("request with this key in flight; waiting for its result");
        begun = Ok(waiting
            .wait(
                &backend,
                &storage_key,
                &fingerprint,
                config.lock_ttl,
                *retry_after,
                config.shutdown.started(),
            )
            .await);
    }
    let retention = config.retention_header.as_ref();
    let lock = match begun {
        Ok(Begin::Acquired(lock)) => {
            observe::request("fresh");
            tracing::debug!("key acquired; running the handler");
            lock
        }
        Ok(Begin::Completed(record)) if record.fingerprint == fingerprint => {
            observe::request("replayed");
            tracing::debug!(kept = record.kept, "replaying stored response");
            let left = retention.and_then(|name| retention_left(&record, name));
            let mut response = replay(record);
            // A record stored while the header was on carries it: it is no
            // promise once the time has passed, or with the header off.
            for name in retention.into_iter().chain([&IDEMPOTENCY_TTL]) {
                response.headers_mut().remove(name);
            }
            if let Some(left) = left {
                set_retention(response.headers_mut(), retention, left);
            }
            return Ok(response);
        }
        Ok(Begin::Completed(record)) => {
            observe::request("mismatch");
            tracing::debug!("key reused with a different request");
            let mut response = problem(
                ProblemKind::FingerprintMismatch,
                "this Idempotency-Key was used with a different request; use a new key",
                None,
            );
            if let Some(left) = retention.and_then(|name| retention_left(&record, name)) {
                set_retention(response.headers_mut(), retention, left);
            }
            return Ok(response);
        }
        Ok(Begin::Busy { retry_after }) => {
            observe::request("conflict");
            tracing::debug!("request with this key in flight");
            let mut response = problem(
                ProblemKind::InFlight,
                "a request with this Idempotency-Key is being processed; retry later",
                // When the holder's lock runs out: by then it has answered,
                // extended its lock (alive), or died and freed the key.
                Some(retry_after),
            );
            set_retention(response.headers_mut(), retention, config.ttl);
            return Ok(response);
        }
        Err(error) => return backend_failed(inner, req, &config, &error).await,
    };

    backend.prepare_request(&lock, req.extensions_mut());
    if let Some(fence) = backend.fencing_token(&lock) {
        req.extensions_mut().insert(fence);
    }
    let held = Held {
        atomic: backend.commits_handler_effects(),
        guard: LockGuard::new(backend, lock).waking(config.waiting.as_ref(), storage_key),
        ticket,
        grpc,
    };
    // `run_detached` keeps the work in this request's span.
    let shutdown = config.shutdown.clone();
    let running = run_detached(config.on_disconnect, move |delivery, cancellation| {
        let work = execute(
            inner,
            config,
            req,
            fingerprint,
            held,
            delivery,
            cancellation,
        );
        shutdown.track(work)
    });
    match running.await {
        Some(answer) => answer,
        // Only when the runtime is shutting down.
        None => Ok(problem(
            ProblemKind::BackendUnavailable,
            "the request was interrupted before it was answered",
            None,
        )),
    }
}

/// What the handler's response becomes.
enum Produced<ResBody: Body, E> {
    /// The inner service returned an error.
    Failed(E),
    /// Not stored; the key is released, and why. `response` is `None` when
    /// it was already delivered (a streamed body).
    Release {
        response: Option<Response<IdempotencyBody<ResBody>>>,
        why: &'static str,
    },
    /// Store `record` (the response, or a "not kept" marker) for `ttl`.
    Store {
        record: Record,
        ttl: Duration,
        response: Option<Response<IdempotencyBody<ResBody>>>,
    },
}

/// What a request holds while its handler runs.
struct Held<B: Backend> {
    guard: LockGuard<B>,
    /// Counts the request for a graceful shutdown, which may cut it off.
    ticket: Ticket,
    /// The backend commits the handler's effects with the record
    /// (PostgreSQL's transaction mode), so a response whose record was not
    /// committed is replaced by a `503`: its effects were rolled back.
    atomic: bool,
    /// The request is gRPC: its answers are in gRPC's terms.
    grpc: bool,
}

/// Runs the handler under the lock (with the heartbeat), then stores or
/// releases and delivers the response to the client, if it is still there.
async fn execute<S, B, ReqBody, ResBody>(
    mut inner: S,
    config: Arc<Config>,
    req: Request<IdempotencyBody<ReqBody>>,
    fingerprint: Fingerprint,
    held: Held<B>,
    mut delivery: Delivery<Answer<ResBody, S::Error>>,
    cancellation: Cancellation,
) where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
    B: Backend,
    ReqBody: Body,
    ResBody: Body + Send + 'static,
{
    // The ticket is bound first so that it is dropped last: a lock guard
    // dropped unfinished (a panic) counts its background release before the
    // ticket lets a waiting shutdown see nothing left.
    let Held {
        ticket,
        mut guard,
        atomic,
        grpc,
    } = held;
    let progress = Progress::default();
    let (produced, lost) = {
        let work = pin!(produce(
            &mut inner,
            req,
            &config,
            (fingerprint, grpc),
            atomic,
            &mut delivery,
            &progress,
        ));
        let work = pin!(cancellation.unless_cancelled(work));
        let work = pin!(ticket.unless_cut_off(work));
        guard.keep_while(work, &config).await
    };
    let Some(produced) = produced else {
        interrupted(
            &mut guard,
            &config,
            (fingerprint, grpc),
            atomic,
            &progress,
            &mut delivery,
        )
        .await;
        return;
    };
    let Some(produced) = produced else {
        observe::store("not_stored");
        guard.release("the client left; handler cancelled").await;
        return;
    };
    match produced {
        Produced::Failed(error) => {
            observe::store("not_stored");
            guard.release("inner service failed").await;
            delivery.send(Err(error));
        }
        Produced::Release { response, why } => {
            observe::store("not_stored");
            guard.release(why).await;
            if let Some(mut response) = response {
                let retention = config.retention_header.as_ref();
                set_retention(response.headers_mut(), retention, Duration::ZERO);
                delivery.send(Ok(response));
            }
        }
        Produced::Store { response, .. } if lost => {
            observe::store("lock_lost");
            tracing::warn!("lock lost while the handler ran; response not stored");
            guard.release("lock lost").await;
            if let Some(response) = response {
                let mut response = if atomic { not_committed() } else { response };
                let retention = config.retention_header.as_ref();
                set_retention(response.headers_mut(), retention, Duration::ZERO);
                delivery.send(Ok(response));
            }
        }
        Produced::Store {
            record,
            ttl,
            response,
        } => {
            let retention = config.retention_header.as_ref();
            store(
                &mut guard,
                (record, ttl),
                response,
                atomic,
                retention,
                &mut delivery,
            )
            .await;
        }
    }
}

/// Calls the handler and decides what its response becomes: buffered and
/// stored, streamed to the client while a copy is stored (no length known
/// up front), passed through with a "not kept" marker, or released.
async fn produce<S, ReqBody, ResBody>(
    inner: &mut S,
    req: Request<IdempotencyBody<ReqBody>>,
    config: &Config,
    (fingerprint, grpc): (Fingerprint, bool),
    atomic: bool,
    delivery: &mut Delivery<Answer<ResBody, S::Error>>,
    progress: &Progress,
) -> Produced<ResBody, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body,
    ResBody: Body + Send + 'static,
{
    progress.called.store(true, Ordering::SeqCst);
    let (mut parts, body) = match inner.call(req).await {
        Ok(response) => response.into_parts(),
        Err(error) => return Produced::Failed(error),
    };
    // The handler's own answer is never taken for the layer's.
    parts.extensions.remove::<Answered>();
    let stream = |parts, body| Response::from_parts(parts, IdempotencyBody::stream(body));
    // A gRPC response's own status comes at its end, in its trailers,
    // unless the handler decided for itself. (Another HTTP status is not a
    // gRPC answer: a proxy's or a timeout layer's, kept by the HTTP rules.)
    let by_grpc_status =
        (grpc && parts.status == StatusCode::OK && parts.extensions.get::<Persist>().is_none())
            .then_some((&*config.grpc_persist_if, config.server_errors));
    let ttl = match announced(&mut parts, config, (fingerprint, grpc)) {
        Keep::For(ttl) => ttl,
        Keep::Release(why) => {
            return Produced::Release {
                response: Some(stream(parts, body)),
                why,
            };
        }
        Keep::Instead(record) => {
            return Produced::Store {
                record,
                ttl: config.ttl,
                response: Some(stream(parts, body)),
            };
        }
    };
    let status = parts.status;
    // A "not kept" marker, or a release if so configured. An atomic backend
    // always marks: it commits the handler's effects only with a record, and
    // releasing would roll back a response the client is about to get.
    let unstorable = |response, why| {
        if matches!(config.unstorable, Unstorable::Release) && !atomic {
            Produced::Release { response, why }
        } else {
            Produced::Store {
                record: Record::not_kept(status, fingerprint),
                ttl,
                response,
            }
        }
    };
    if is_event_stream(&parts.headers) {
        return unstorable(Some(stream(parts, body)), "an event stream is not stored");
    }
    let limit = config.max_stored_response;
    let known = known_length(&parts.headers, &body);
    if known.is_some_and(|len| len > limit as u64) {
        return unstorable(
            Some(stream(parts, body)),
            "response larger than the store limit",
        );
    }
    if known.is_none() && !atomic {
        let keeping = Keeping {
            fingerprint,
            ttl,
            by_grpc_status,
        };
        return forward_and_copy(parts, body, config, delivery, progress, keeping)
            .await
            .unwrap_or_else(|why| unstorable(None, why));
    }
    // Buffered: nothing reaches the client before the record is stored (for
    // an atomic backend, before the handler's effects commit).
    let mut body = Box::pin(body);
    match collect_limited(body.as_mut(), limit).await {
        Collected::Complete { data, trailers } => {
            let head = (status, parts.headers.clone());
            let body = (data.clone(), trailers.clone());
            let response = Some(full(parts, data, trailers));
            let keeping = Keeping {
                fingerprint,
                ttl,
                by_grpc_status,
            };
            match complete_record(keeping, head, body) {
                Ok(record) => Produced::Store {
                    record,
                    ttl,
                    response,
                },
                Err(why) => Produced::Release { response, why },
            }
        }
        // The length it announced was wrong.
        Collected::Overflow { prefix } => unstorable(
            Some(Response::from_parts(
                parts,
                IdempotencyBody::prefixed(prefix, body),
            )),
            "response larger than the store limit",
        ),
        Collected::Failed { prefix, error } => Produced::Release {
            response: Some(Response::from_parts(
                parts,
                IdempotencyBody::failed(prefix, error),
            )),
            why: "response body failed",
        },
    }
}

/// Forwards a response of unknown length as it arrives while a copy is
/// kept, and says what the copy becomes at the body's end: stored, released,
/// or (`Err`) unstorable, and why.
async fn forward_and_copy<ResBody, E>(
    mut parts: response::Parts,
    body: ResBody,
    config: &Config,
    delivery: &mut Delivery<Answer<ResBody, E>>,
    progress: &Progress,
    keeping: Keeping<'_>,
) -> Result<Produced<ResBody, E>, &'static str>
where
    ResBody: Body + Send + 'static,
{
    let status = parts.status;
    let limit = config.max_stored_response;
    // Kept or not is known only at the end: the retention header goes into
    // the copy alone.
    let headers = keep_retention_back(&mut parts.headers, config.retention_header.as_ref());
    let (events, mut copies) = tokio::sync::mpsc::unbounded_channel();
    let hand_over = config.on_disconnect == OnDisconnect::Complete;
    let settled = delivery.settled();
    let body = IdempotencyBody::tee(body, events, settled, limit, hand_over);
    progress.streaming.store(status.as_u16(), Ordering::SeqCst);
    delivery.send(Ok(Response::from_parts(parts, body)));
    let released = |why| Produced::Release {
        response: None,
        why,
    };
    let produced = match follow_tee(&mut copies, limit, config.drain_timeout()).await {
        TeeEnd::Complete(data, trailers) => {
            match complete_record(keeping, (status, headers), (data, trailers)) {
                Ok(record) => Produced::Store {
                    record,
                    ttl: keeping.ttl,
                    response: None,
                },
                Err(why) => released(why),
            }
        }
        TeeEnd::Unstorable(why) => return Err(why),
        TeeEnd::Failed => released("response body failed"),
        TeeEnd::Gone => released("the client left mid-stream"),
    };
    Ok(produced)
}

/// What a complete response's record is made with.
#[derive(Clone, Copy)]
struct Keeping<'a> {
    fingerprint: Fingerprint,
    ttl: Duration,
    /// For a gRPC response the handler did not decide for: the policies
    /// its `grpc-status` is kept by.
    by_grpc_status: Option<(&'a GrpcPersistFn, ServerErrors)>,
}

/// The record of a complete response, with its trailers — unless its
/// `grpc-status` decides otherwise (an "outcome unknown" answer instead, or
/// nothing stored, and why).
fn complete_record(
    keeping: Keeping<'_>,
    (status, headers): (StatusCode, HeaderMap),
    (data, trailers): (Bytes, Option<HeaderMap>),
) -> Result<Record, &'static str> {
    let fingerprint = keeping.fingerprint;
    if let Some((persist, server_errors)) = keeping.by_grpc_status {
        let code = grpc::final_status(&headers, data.is_empty(), trailers.as_ref());
        match grpc::verdict(code, persist, server_errors) {
            Verdict::Store => {}
            Verdict::OutcomeUnknown => return Ok(outcome_unknown(status, (fingerprint, true))),
            Verdict::Release(why) => return Err(why),
        }
    }
    let record = Record::new(status, headers, data, fingerprint);
    Ok(match trailers {
        Some(trailers) => record.with_trailers(trailers),
        None => record,
    })
}

/// What becomes of the handler's response ([`keep`]), announced in the
/// retention header when one is configured. The header is stored with the
/// record, so a replay counts down from the TTL this response was kept for.
fn announced(parts: &mut response::Parts, config: &Config, request: (Fingerprint, bool)) -> Keep {
    let kept = keep(parts, config, request);
    let retention = config.retention_header.as_ref();
    match &kept {
        Keep::For(ttl) => set_retention(&mut parts.headers, retention, *ttl),
        Keep::Instead(_) => set_retention(&mut parts.headers, retention, config.ttl),
        Keep::Release(_) => {}
    }
    kept
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

fn shutting_down<B: Body>(config: &Config) -> Response<IdempotencyBody<B>> {
    observe::request("shutting_down");
    problem(
        ProblemKind::ShuttingDown,
        "this instance is shutting down; the request was not processed; retry with the same Idempotency-Key",
        Some(config.unavailable_retry_after),
    )
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

async fn backend_failed<S, ReqBody, ResBody>(
    mut inner: S,
    req: Request<IdempotencyBody<ReqBody>>,
    config: &Config,
    error: &BackendError,
) -> Answer<ResBody, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body,
    ResBody: Body,
{
    // A record is stored for this key: the request was processed. Whatever
    // else fails, it must not run again, not even with fail-open.
    match error.kind() {
        BackendErrorKind::Corrupt => {
            observe::request("stored_unreadable");
            tracing::error!(%error, "stored record for this key is unreadable; answering 500");
            return Ok(problem(
                ProblemKind::StoredResponseUnreadable,
                "this request was processed before, but its stored response cannot be read",
                None,
            ));
        }
        BackendErrorKind::Incompatible => {
            observe::request("stored_incompatible");
            tracing::warn!(%error, "stored record for this key cannot be read here; answering 503");
            return Ok(problem(
                ProblemKind::StoredResponseIncompatible,
                "this request was processed before; its stored response cannot be read by this instance",
                Some(config.unavailable_retry_after),
            ));
        }
        _ => {}
    }
    if config.fail_open {
        observe::request("fail_open");
        tracing::warn!(%error, "idempotency backend failed; running unprotected (fail-open)");
        let mut response = inner.call(req).await?;
        response.extensions_mut().remove::<Answered>();
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
