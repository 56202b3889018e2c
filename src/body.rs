//! The body type the layer hands to the inner service and returns to callers.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// A body that is either the original stream, or bytes the layer has
    /// buffered (a request body it fingerprinted, a response it stored or
    /// replays, or a problem document).
    ///
    /// Data frames are [`Bytes`] whatever the wrapped body's data type.
    pub struct IdempotencyBody<B: Body> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B: Body> {
        Stream { #[pin] body: B },
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Prefixed { prefix: Option<Bytes>, body: Pin<Box<B>> },
        Failed { prefix: Option<Bytes>, error: Option<B::Error> },
    }
}

impl<B: Body> IdempotencyBody<B> {
    pub(crate) const fn stream(body: B) -> Self {
        Self {
            kind: Kind::Stream { body },
        }
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Full {
                data: non_empty(data),
                trailers,
            },
        }
    }

    pub(crate) fn prefixed(prefix: Bytes, body: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Prefixed {
                prefix: non_empty(prefix),
                body,
            },
        }
    }

    pub(crate) fn failed(prefix: Bytes, error: B::Error) -> Self {
        Self {
            kind: Kind::Failed {
                prefix: non_empty(prefix),
                error: Some(error),
            },
        }
    }
}

fn non_empty(data: Bytes) -> Option<Bytes> {
    (!data.is_empty()).then_some(data)
}

fn to_bytes<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
}

impl<B: Body> Body for IdempotencyBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Stream { body } => body.poll_frame(cx).map_ok(to_bytes),
            KindProj::Full { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            KindProj::Prefixed { prefix, body } => match prefix.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => body.as_mut().poll_frame(cx).map_ok(to_bytes),
            },
            KindProj::Failed { prefix, error } => Poll::Ready(match prefix.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => error.take().map(Err),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Stream { body } => body.is_end_stream(),
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Prefixed { prefix, body } => prefix.is_none() && body.is_end_stream(),
            Kind::Failed { prefix, error } => prefix.is_none() && error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Stream { body } => body.size_hint(),
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Prefixed { prefix, body } => {
                let extra = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let inner = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(extra));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(extra));
                }
                hint
            }
            Kind::Failed { .. } => SizeHint::default(),
        }
    }
}

impl<B: Body> fmt::Debug for IdempotencyBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Stream { .. } => "Stream",
            Kind::Full { .. } => "Full",
            Kind::Prefixed { .. } => "Prefixed",
            Kind::Failed { .. } => "Failed",
        };
        f.debug_struct("IdempotencyBody")
            .field("kind", &kind)
            .finish()
    }
}

/// The outcome of reading a body up to a limit.
pub(crate) enum Collected<E> {
    /// The whole body.
    Complete {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// More than `limit` bytes; `prefix` holds everything read so far.
    Overflow { prefix: Bytes },
    /// The body failed after `prefix`.
    Failed { prefix: Bytes, error: E },
}

/// Reads `body` to its end while it stays within `limit` bytes.
pub(crate) async fn collect_limited<B: Body>(
    mut body: Pin<&mut B>,
    limit: usize,
) -> Collected<B::Error> {
    let mut chunks = Chunks::default();
    let mut total = 0usize;
    loop {
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        let frame = match frame {
            None => {
                return Collected::Complete {
                    data: concat(chunks, total),
                    trailers: None,
                };
            }
            Some(Err(error)) => {
                return Collected::Failed {
                    prefix: concat(chunks, total),
                    error,
                };
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(mut data) => {
                let chunk = data.copy_to_bytes(data.remaining());
                total = total.saturating_add(chunk.len());
                chunks.push(chunk);
                if total > limit {
                    return Collected::Overflow {
                        prefix: concat(chunks, total),
                    };
                }
            }
            Err(frame) => {
                // Trailers end the body; any other frame kind is ignored.
                if let Ok(trailers) = frame.into_trailers() {
                    return Collected::Complete {
                        data: concat(chunks, total),
                        trailers: Some(trailers),
                    };
                }
            }
        }
    }
}

/// The chunks of a body so far. Most bodies arrive in one chunk, which is
/// kept as it is: no list is allocated until a second one arrives.
#[derive(Default)]
struct Chunks {
    first: Option<Bytes>,
    more: Vec<Bytes>,
}

impl Chunks {
    fn push(&mut self, chunk: Bytes) {
        if self.first.is_none() {
            self.first = Some(chunk);
        } else {
            self.more.push(chunk);
        }
    }
}

fn concat(chunks: Chunks, total: usize) -> Bytes {
    let Some(first) = chunks.first else {
        return Bytes::new();
    };
    if chunks.more.is_empty() {
        return first;
    }
    let mut out = BytesMut::with_capacity(total);
    out.extend_from_slice(&first);
    for chunk in chunks.more {
        out.extend_from_slice(&chunk);
    }
    out.freeze()
}
