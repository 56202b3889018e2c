//! [`IdempotencyService`]: the middleware itself.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower::Service;

use crate::backend::Backend;
use crate::body::IdempotencyBody;
use crate::config::Config;
use crate::future::ResponseFuture;
use crate::headers::problem;
use crate::key::IdempotencyKey;
use crate::problem::ProblemKind;
use crate::{BoxError, IdempotencyLayer, flow, grpc, observe};

/// Middleware that runs each keyed request exactly once. Made by
/// [`IdempotencyLayer`](crate::IdempotencyLayer).
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use tower::{Layer, service_fn};
/// use tower_idempotency::{IdempotencyBody, IdempotencyLayer, MemoryBackend};
///
/// let handler = service_fn(|_req: Request<IdempotencyBody<String>>| async {
///     Ok::<_, Infallible>(Response::new("created".to_owned()))
/// });
/// let service = IdempotencyLayer::new(MemoryBackend::new()).layer(handler);
/// let _handler_again = service.get_ref();
/// ```
#[derive(Clone, Debug)]
pub struct IdempotencyService<S, B> {
    inner: S,
    backend: B,
    config: Arc<Config>,
}

impl<S, B> IdempotencyService<S, B> {
    /// Wraps `inner`, storing into `backend`, with the default settings of
    /// [`IdempotencyLayer::new`]. Use [`IdempotencyService::layer`] (or
    /// [`IdempotencyLayer`]) to change them.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use tower_idempotency::{IdempotencyBody, IdempotencyService, MemoryBackend};
    ///
    /// let handler = tower::service_fn(|_req: Request<IdempotencyBody<String>>| async {
    ///     Ok::<_, Infallible>(Response::new("created".to_owned()))
    /// });
    /// let service = IdempotencyService::new(handler, MemoryBackend::new());
    /// # let _ = service;
    /// ```
    pub fn new(inner: S, backend: B) -> Self {
        Self::with_config(inner, backend, Arc::new(Config::default()))
    }

    pub(crate) const fn with_config(inner: S, backend: B, config: Arc<Config>) -> Self {
        Self {
            inner,
            backend,
            config,
        }
    }

    /// The wrapped service.
    pub const fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub const fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl IdempotencyService<(), ()> {
    /// A layer that wraps services in [`IdempotencyService`]: the same as
    /// [`IdempotencyLayer::new`], whose builder methods set everything else.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::{IdempotencyService, MemoryBackend};
    ///
    /// let layer = IdempotencyService::layer(MemoryBackend::new()).ttl(Duration::from_hours(1));
    /// # let _ = layer;
    /// ```
    pub fn layer<B>(backend: B) -> IdempotencyLayer<B> {
        IdempotencyLayer::new(backend)
    }
}

impl<S, B, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S, B>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Backend,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError> + Send,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Response = Response<IdempotencyBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if !self.config.methods.contains(req.method()) {
            return ResponseFuture::passthrough(self.inner.call(req.map(IdempotencyBody::stream)));
        }
        let key = IdempotencyKey::from_headers(req.headers());
        if matches!(key, Ok(None)) && !self.config.required {
            observe::request("no_key");
            return ResponseFuture::passthrough(self.inner.call(req.map(IdempotencyBody::stream)));
        }
        let grpc = grpc::is_grpc(req.headers());
        let path = req.uri().path();
        if grpc && (self.config.grpc_streaming_requests.iter()).any(|m| **m == *path) {
            observe::request("grpc_streaming");
            return ResponseFuture::passthrough(self.inner.call(req.map(IdempotencyBody::stream)));
        }
        match key {
            Ok(Some(key)) => {
                // The guarded flow calls the inner service later: take the
                // one driven to readiness, and leave a clone behind.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                // Tracked: a backend call cut off by a dropped request
                // cleans up in a task that a graceful shutdown waits for.
                ResponseFuture::guarded(
                    Box::pin(self.config.shutdown.track(flow::run(
                        inner,
                        self.backend.clone(),
                        Arc::clone(&self.config),
                        req,
                        (key, grpc),
                    ))),
                    grpc,
                )
            }
            Ok(None) => {
                observe::request("missing_key");
                let answer = problem(
                    ProblemKind::MissingKey,
                    "send an Idempotency-Key header with this request",
                    None,
                );
                ResponseFuture::ready(answer, grpc)
            }
            Err(error) => {
                observe::request("invalid_key");
                tracing::debug!(%error, "rejected malformed Idempotency-Key");
                let answer = problem(ProblemKind::InvalidKey, &error.to_string(), None);
                ResponseFuture::ready(answer, grpc)
            }
        }
    }
}
