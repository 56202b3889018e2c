//! [`ResponseFuture`]: what [`IdempotencyService`](crate::IdempotencyService)
//! returns.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;

use crate::body::IdempotencyBody;
use crate::grpc;

type Guarded<ResBody, E> =
    Pin<Box<dyn Future<Output = Result<Response<IdempotencyBody<ResBody>>, E>> + Send>>;

pin_project! {
    /// The response future of [`IdempotencyService`](crate::IdempotencyService).
    ///
    /// Requests the layer does not guard (another method, or no key) poll
    /// the inner future directly, with no allocation. A guarded request runs
    /// the lookup → lock flow in one heap-allocated state machine; once it
    /// holds the key, the handler, the store and the release run in a task of
    /// their own. Dropping this future before that only abandons the request;
    /// after it, the handler finishes and its response is stored (or it is
    /// cut off and the key released, with
    /// [`OnDisconnect::Cancel`](crate::OnDisconnect::Cancel)).
    pub struct ResponseFuture<F, ResBody: Body, E> {
        #[pin]
        kind: Kind<F, ResBody, E>,
        // The request is gRPC: the layer's own answers (not the handler's)
        // are given in gRPC's terms.
        grpc: bool,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, ResBody: Body, E> {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Response<IdempotencyBody<ResBody>>> },
        Guarded { future: Guarded<ResBody, E> },
    }
}

impl<F, ResBody: Body, E> ResponseFuture<F, ResBody, E> {
    pub(crate) const fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough { future },
            grpc: false,
        }
    }

    /// The layer's own answer to a request (a gRPC one if `grpc`).
    pub(crate) const fn ready(response: Response<IdempotencyBody<ResBody>>, grpc: bool) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
            grpc,
        }
    }

    /// The guarded flow of a request (a gRPC one if `grpc`).
    pub(crate) const fn guarded(future: Guarded<ResBody, E>, grpc: bool) -> Self {
        Self {
            kind: Kind::Guarded { future },
            grpc,
        }
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F, ResBody, E>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Body,
{
    type Output = Result<Response<IdempotencyBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let grpc = *this.grpc;
        // The layer's problem answers to a gRPC request become gRPC
        // statuses; the handler's own answers pass as they are.
        let answer = |res| if grpc { grpc::answer(res) } else { res };
        match this.kind.project() {
            KindProj::Passthrough { future } => future
                .poll(cx)
                .map_ok(|res| res.map(IdempotencyBody::stream)),
            KindProj::Ready { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(answer(response))),
                None => panic!("ResponseFuture polled after completion"),
            },
            KindProj::Guarded { future } => future.as_mut().poll(cx).map_ok(answer),
        }
    }
}

impl<F, ResBody: Body, E> fmt::Debug for ResponseFuture<F, ResBody, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Ready { .. } => "Ready",
            Kind::Guarded { .. } => "Guarded",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .field("grpc", &self.grpc)
            .finish()
    }
}
