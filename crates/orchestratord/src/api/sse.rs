//! The streaming response body: frames arrive on a bounded channel from the task that produces
//! them. When the client goes away the body is dropped, the channel closes, and the producer
//! sees `Sender::closed()` and stops (for OpenAI streams it also cancels the task).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http_body::Frame;
use tokio::sync::mpsc;

/// Frames a producer may run ahead of a slow client. A task's events are also kept in its log,
/// so a full channel only makes the producer wait, it never loses anything.
pub const CHANNEL_FRAMES: usize = 64;

/// What a waiting stream (queued, or its model loading on demand) gets every
/// `--sse-keepalive-secs`, so proxies and clients between it and orchestratord do not time it
/// out.
pub const KEEP_ALIVE_COMMENT: &[u8] = b": keep-alive\n\n";

/// Ticks every `every`, first after one interval; `reset()` it when data went out.
pub fn keep_alive_timer(every: std::time::Duration) -> tokio::time::Interval {
    tokio::time::interval_at(tokio::time::Instant::now() + every, every)
}

/// The next batch of a task's events for a stream on `tx`, sending a keep-alive comment each
/// time `idle` fires while none comes (and restarting `idle` once events came). `None` when the
/// task's log has nothing more or the client went away: the stream ends.
pub(crate) async fn next_batch(
    follower: &mut crate::tasks::Follower,
    idle: &mut tokio::time::Interval,
    tx: &mpsc::Sender<Bytes>,
) -> Option<Vec<crate::tasks::TaskEvent>> {
    loop {
        let batch = tokio::select! {
            b = follower.next_batch() => b,
            _ = idle.tick() => {
                tx.send(Bytes::from_static(KEEP_ALIVE_COMMENT)).await.ok()?;
                continue;
            }
            _ = tx.closed() => return None,
        };
        idle.reset();
        return batch;
    }
}

/// The batches of a task's events a stream sends: the batch read before the stream was
/// committed to (if any), then the task's, with keep-alive comments while none comes. `None`
/// once the task's log has nothing more or the client went away.
pub(crate) struct Batches {
    pending: Option<Vec<crate::tasks::TaskEvent>>,
    idle: tokio::time::Interval,
}

impl Batches {
    pub(crate) fn new(
        first: Option<Vec<crate::tasks::TaskEvent>>,
        keep_alive: std::time::Duration,
    ) -> Self {
        Self {
            pending: first,
            idle: keep_alive_timer(keep_alive),
        }
    }

    pub(crate) async fn next(
        &mut self,
        follower: &mut crate::tasks::Follower,
        tx: &mpsc::Sender<Bytes>,
    ) -> Option<Vec<crate::tasks::TaskEvent>> {
        match self.pending.take() {
            Some(first) => Some(first),
            None => next_batch(follower, &mut self.idle, tx).await,
        }
    }
}

pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(first)) => {
                // Coalesce what is already waiting into one write.
                let mut more = Vec::new();
                while let Ok(b) = self.rx.try_recv() {
                    more.push(b);
                }
                if more.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(first))));
                }
                let mut out =
                    Vec::with_capacity(first.len() + more.iter().map(Bytes::len).sum::<usize>());
                out.extend_from_slice(&first);
                for b in more {
                    out.extend_from_slice(&b);
                }
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A channel and the SSE response that drains it.
pub fn channel() -> (mpsc::Sender<Bytes>, Response) {
    channel_of("text/event-stream")
}

/// A channel and the streamed response of `content_type` that drains it (Ollama's NDJSON).
pub fn channel_of(content_type: &'static str) -> (mpsc::Sender<Bytes>, Response) {
    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
    let resp = Response::builder()
        .header("content-type", content_type)
        .header("cache-control", "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::new(ChannelBody { rx }))
        .expect("static response");
    (tx, resp)
}
