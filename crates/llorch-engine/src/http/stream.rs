//! The SSE body of a generation: the events the decode loop sends for one job, written as
//! `text/event-stream`. It owns the response's end of the job's event channel, and with it the
//! request's place in the idle count; it does not produce events (that is `decode/`).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use llorch_wire::engine::EngineEvent;
use tokio::sync::mpsc;

use super::idle::ActivityGuard;

/// The SSE body of one generation. It ends when the decode loop drops the sender after the
/// final event; dropping it (the client went away) closes the channel, which the decode loop
/// notices before its next step and cancels the job.
//
// A hand-written body rather than `http_body_util::StreamBody`: tokio's receiver is not a
// `Stream` without another dependency, and each poll coalesces the events already waiting into
// one frame, which a stream of single events would not.
pub struct SseBody {
    rx: mpsc::Receiver<EngineEvent>,
    _activity: ActivityGuard,
}

impl SseBody {
    /// The body for a job whose events arrive on `rx`; it counts as a generation request in
    /// progress until it is dropped.
    pub(super) fn new(rx: mpsc::Receiver<EngineEvent>, activity: ActivityGuard) -> Self {
        Self {
            rx,
            _activity: activity,
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ev)) => {
                // Coalesce what is already waiting into one write.
                let mut out = ev.to_sse();
                while let Ok(more) = self.rx.try_recv() {
                    out.push_str(&more.to_sse());
                }
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
