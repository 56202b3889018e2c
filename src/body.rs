//! The body type the layer hands to the inner service and returns to callers.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

pin_project! {
    /// A body that is either the original stream, or bytes the layer has
    /// buffered (a request body it fingerprinted, a response it stored or
    /// replays, or a problem document), or a response streamed to the
    /// client as it arrives while the layer keeps a copy to store.
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
        // Boxed: only streamed responses use it, and every response moves
        // this enum around.
        Tee { tee: Box<Tee<B>> },
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

impl<B: Body + Send + 'static> IdempotencyBody<B> {
    /// Streams `body` to the client, sending a copy of each frame (within
    /// `limit` bytes) to `events`. With `hand_over`, a client that stops
    /// reading before the end hands the rest of the body over to be drained.
    ///
    /// The end of the body (or its trailers) is passed on only once
    /// `settled` resolves — when the record is stored or the key released —
    /// so a client that has read the whole response and retries finds it
    /// stored.
    pub(crate) fn tee(
        body: B,
        events: UnboundedSender<TeeEvent<B>>,
        settled: oneshot::Receiver<()>,
        limit: usize,
        hand_over: bool,
    ) -> Self {
        Self {
            kind: Kind::Tee {
                tee: Box::new(Tee {
                    body: Some(Box::pin(body)),
                    events: Some(events),
                    settled: Some(settled),
                    ending: None,
                    copied: 0,
                    overflowed: false,
                    limit,
                    hand_over,
                }),
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
            KindProj::Tee { tee } => tee.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Stream { body } => body.is_end_stream(),
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Prefixed { prefix, body } => prefix.is_none() && body.is_end_stream(),
            Kind::Failed { prefix, error } => prefix.is_none() && error.is_none(),
            // The end is observed by polling, never taken on trust.
            Kind::Tee { tee } => tee.body.is_none() && tee.ending.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Stream { body } => body.size_hint(),
            Kind::Full { data, trailers } => {
                let len = data.as_ref().map_or(0, |d| d.len() as u64);
                if trailers.is_some() {
                    // Not exact: an HTTP/1.1 server then sends the body
                    // chunked, the only framing that carries trailers.
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
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
            Kind::Tee { tee } => tee
                .body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
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
            Kind::Tee { .. } => "Tee",
        };
        f.debug_struct("IdempotencyBody")
            .field("kind", &kind)
            .finish()
    }
}

/// What a [`Tee`] tells the task that stores the response.
pub(crate) enum TeeEvent<B> {
    /// A copy of a data frame, while the copies stay within the limit.
    Data(Bytes),
    /// The body passed the limit: no more copies follow, and the storing
    /// task settles the key at once.
    Overflow,
    /// The body ended with these trailers.
    Trailers(HeaderMap),
    /// The body ended.
    End,
    /// The body failed.
    Failed,
    /// The client stopped reading: the rest of the body, to drain.
    Abandoned(Pin<Box<B>>),
}

/// The last thing a teed body yields.
enum Last {
    End,
    Trailers(Frame<Bytes>),
}

/// A response body on its way to the client, copied as it passes.
pub(crate) struct Tee<B: Body> {
    body: Option<Pin<Box<B>>>,
    events: Option<UnboundedSender<TeeEvent<B>>>,
    /// Resolves (or closes) once the storing task has settled the key.
    settled: Option<oneshot::Receiver<()>>,
    /// The last item (the end, or the trailers), held until `settled`.
    ending: Option<Last>,
    copied: usize,
    overflowed: bool,
    limit: usize,
    hand_over: bool,
}

impl<B: Body> Tee<B> {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if self.ending.is_some() {
            if let Some(settled) = self.settled.as_mut() {
                // Either answer will do: stored, or the task is gone.
                let _ = std::task::ready!(Pin::new(settled).poll(cx));
                self.settled = None;
            }
            return Poll::Ready(match self.ending.take() {
                Some(Last::Trailers(frame)) => Some(Ok(frame)),
                Some(Last::End) | None => None,
            });
        }
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match body.as_mut().poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                self.finish(TeeEvent::End);
                self.ending = Some(Last::End);
                return self.poll_frame(cx);
            }
            Poll::Ready(Some(Err(error))) => {
                self.finish(TeeEvent::Failed);
                return Poll::Ready(Some(Err(error)));
            }
            Poll::Ready(Some(Ok(frame))) => to_bytes(frame),
        };
        if let Some(data) = frame.data_ref() {
            self.copy(data);
        } else if let Some(trailers) = frame.trailers_ref() {
            let copy = if self.overflowed {
                HeaderMap::new()
            } else {
                trailers.clone()
            };
            self.finish(TeeEvent::Trailers(copy));
            self.ending = Some(Last::Trailers(frame));
            return self.poll_frame(cx);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn copy(&mut self, data: &Bytes) {
        if self.overflowed {
            return;
        }
        self.copied = self.copied.saturating_add(data.len());
        if self.copied > self.limit {
            self.overflowed = true;
            self.send(TeeEvent::Overflow);
        } else {
            self.send(TeeEvent::Data(data.clone()));
        }
    }

    fn send(&self, event: TeeEvent<B>) {
        if let Some(events) = &self.events {
            // The receiving task only goes away with the runtime.
            let _ = events.send(event);
        }
    }

    /// The body is over: say how it ended, once.
    fn finish(&mut self, event: TeeEvent<B>) {
        self.body = None;
        if let Some(events) = self.events.take() {
            let _ = events.send(event);
        }
    }
}

impl<B: Body> Drop for Tee<B> {
    fn drop(&mut self) {
        let Some(body) = self.body.take() else {
            return;
        };
        // While unwinding, a body that may just have panicked is not touched
        // again: the sender goes without an end, and nothing is stored.
        if std::thread::panicking() {
            return;
        }
        if body.is_end_stream() {
            self.finish(TeeEvent::End);
        } else if self.hand_over {
            // The client left mid-stream: the storing task reads the rest.
            self.finish(TeeEvent::Abandoned(body));
        }
        // Otherwise the sender is dropped without an end: nothing is stored.
    }
}

/// How a teed body ended, as seen by the task that stores it.
pub(crate) enum TeeEnd {
    /// The whole body, within the limit, and its trailers.
    Complete(Bytes, Option<HeaderMap>),
    /// The body was complete but cannot be stored (over the limit), and
    /// why.
    Unstorable(&'static str),
    /// The body failed.
    Failed,
    /// The client left mid-stream and the rest is not to be read.
    Gone,
}

/// Follows a [`Tee`] to the end of its body, collecting the copies; reads
/// the rest itself when the client hands it over, for at most `drain`. It
/// ends as soon as the body passes `limit`: the response cannot be stored,
/// so the key is settled (marked) at once instead of staying locked while
/// the rest streams.
pub(crate) async fn follow_tee<B: Body>(
    events: &mut UnboundedReceiver<TeeEvent<B>>,
    limit: usize,
    drain: std::time::Duration,
) -> TeeEnd {
    let mut chunks = Chunks::default();
    let mut total = 0usize;
    loop {
        let Some(event) = events.recv().await else {
            return TeeEnd::Gone;
        };
        match event {
            TeeEvent::Data(chunk) => {
                total = total.saturating_add(chunk.len());
                chunks.push(chunk);
            }
            TeeEvent::Overflow => {
                return TeeEnd::Unstorable("response larger than the store limit");
            }
            TeeEvent::Trailers(trailers) => {
                return TeeEnd::Complete(concat(chunks, total), Some(trailers));
            }
            TeeEvent::End => return TeeEnd::Complete(concat(chunks, total), None),
            TeeEvent::Failed => return TeeEnd::Failed,
            TeeEvent::Abandoned(mut rest) => {
                let room = limit.saturating_sub(total);
                let Ok(rest) =
                    tokio::time::timeout(drain, collect_limited(rest.as_mut(), room)).await
                else {
                    // An idle stream (a long poll, a watch) whose client left:
                    // the rest is dropped, not waited for while the key stays
                    // locked.
                    return TeeEnd::Unstorable(
                        "the rest of the body did not end within the drain timeout after its client left",
                    );
                };
                return match rest {
                    Collected::Complete { data, trailers } => {
                        let len = data.len();
                        chunks.push(data);
                        TeeEnd::Complete(concat(chunks, total + len), trailers)
                    }
                    // The rest is not read: it cannot be stored anyway.
                    Collected::Overflow { .. } => {
                        TeeEnd::Unstorable("response larger than the store limit")
                    }
                    Collected::Failed { .. } => TeeEnd::Failed,
                };
            }
        }
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
