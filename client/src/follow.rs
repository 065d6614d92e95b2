//! [`Follow`]: a stream of the committed log that survives node failures.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tonic::codec::Streaming;

use crate::backoff::Backoff;
use crate::call::Shared;
use crate::error::{ClientError, Verdict, classify, describe};
use crate::proto;
use crate::proto::follow_response::Event;
use crate::router::{Route, Target};
use crate::types::{FollowEvent, Offset, Record};

type Step = (Option<Result<FollowEvent, ClientError>>, Follower);

/// The committed log from an offset, as a [`Stream`] of [`FollowEvent`]s: first the history,
/// then a [`FollowEvent::CaughtUp`], then live records as they commit.
///
/// Guarantees, enforced by the client whatever the servers send: every record yielded has an
/// offset above every offset yielded before it, so nothing repeats or goes back. Offsets may
/// skip (internal entries take offsets); nothing committed is skipped as long as the servers
/// keep their contract.
///
/// Resumption: when a stream breaks, ends, or its node goes away, the follow reconnects (to the
/// next node, pausing with backoff) from the highest of the last record's offset + 1 and the
/// `next_offset` of the last batch or catch-up marker, and a new `CaughtUp` follows once the new
/// node has sent its history. `retries_max` failed attempts in a row without an event end it
/// with [`ClientError::Unavailable`].
///
/// The stream ends after its first error: [`ClientError::Trimmed`] when the offset to resume
/// from was trimmed, `Unavailable` as above, or a final server error. Dropping it closes the
/// server stream. It reads from the server only when polled, so a slow consumer slows the
/// server's sending (HTTP/2 flow control) rather than growing a buffer.
pub struct Follow {
    /// Every record below this has been yielded; updated after each event.
    next: Offset,
    follower: Option<Follower>,
    step: Option<Pin<Box<dyn Future<Output = Step> + Send>>>,
}

impl Follow {
    pub(crate) fn new(shared: Arc<Shared>, from_offset: Offset) -> Follow {
        let backoff = shared.backoff();
        let target = shared.router.target(Route::Any);
        let follower = Follower {
            shared,
            next: from_offset,
            target,
            stream: None,
            failures: 0,
            backoff,
            last: String::new(),
        };
        Follow { next: from_offset, follower: Some(follower), step: None }
    }

    /// Where the stream stands: every record below this offset has been yielded (and a new
    /// follow from here would continue it).
    pub fn next_offset(&self) -> Offset {
        self.next
    }
}

impl fmt::Debug for Follow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follow")
            .field("next_offset", &self.next)
            .field("polling", &self.step.is_some())
            .finish()
    }
}

impl Stream for Follow {
    type Item = Result<FollowEvent, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.step.is_none() {
            // `follower` is None once the stream has ended.
            let Some(follower) = self.follower.take() else { return Poll::Ready(None) };
            self.step = Some(Box::pin(follower.next_event()));
        }
        let Some(step) = self.step.as_mut() else { return Poll::Ready(None) };
        match step.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready((item, follower)) => {
                self.step = None;
                self.next = follower.next;
                // An error ends the stream: the follower is not put back.
                if matches!(item, Some(Ok(_))) {
                    self.follower = Some(follower);
                }
                Poll::Ready(item)
            }
        }
    }
}

/// The state of a follow between events.
///
/// Invariant: every record yielded so far has an offset below `next`.
struct Follower {
    shared: Arc<Shared>,
    next: Offset,
    target: Target,
    stream: Option<Streaming<proto::FollowResponse>>,
    /// Failed attempts since the last event.
    failures: u32,
    backoff: Backoff,
    last: String,
}

impl Follower {
    async fn next_event(mut self) -> Step {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                if let Err(error) = self.open().await {
                    return (Some(Err(error)), self);
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(message)) => {
                    self.failures = 0;
                    self.backoff.reset();
                    if let Some(event) = self.accept(message) {
                        return (Some(Ok(event)), self);
                    }
                }
                Ok(None) => {
                    let reason = format!("{}: the server ended the stream", self.target.url);
                    if let Err(error) = self.failed(reason).await {
                        return (Some(Err(error)), self);
                    }
                }
                Err(status) => {
                    let reason = format!("{}: {}", self.target.url, describe(&status));
                    if let Verdict::Final(error) = classify(status) {
                        return (Some(Err(error)), self);
                    }
                    if let Err(error) = self.failed(reason).await {
                        return (Some(Err(error)), self);
                    }
                }
            }
        }
    }

    /// Opens a server stream from `next` on the current node; on failure, counts it and
    /// moves to the next node.
    async fn open(&mut self) -> Result<(), ClientError> {
        // No grpc-timeout: a deadline would end the (endless) stream; only its opening is
        // bounded, and keep-alive pings find a dead connection under an idle stream.
        let request = tonic::Request::new(proto::FollowRequest { from_offset: self.next.get() });
        let mut client = crate::log_client(self.target.channel.clone());
        let call = client.follow(request);
        let reason = match tokio::time::timeout(self.shared.config.request_timeout, call).await {
            Ok(Ok(response)) => {
                self.shared.router.confirm(Route::Any, self.target.index);
                self.stream = Some(response.into_inner());
                return Ok(());
            }
            Ok(Err(status)) => {
                let reason = format!("{}: {}", self.target.url, describe(&status));
                match classify(status) {
                    Verdict::Final(error) => return Err(error),
                    Verdict::NotLeader { leader_addr: Some(addr) } => {
                        // A node that will not serve follows but names a leader: go there next.
                        if let Some(target) = self.shared.router.redirect(Route::Any, &addr) {
                            self.target = target;
                        }
                    }
                    _ => {}
                }
                reason
            }
            Err(_elapsed) => {
                format!("{}: the follow did not start within request_timeout", self.target.url)
            }
        };
        self.failed(reason).await
    }

    /// Drops the stream, moves to the next node and pauses; gives up after `retries_max`
    /// failures in a row.
    async fn failed(&mut self, reason: String) -> Result<(), ClientError> {
        self.stream = None;
        self.failures += 1;
        self.last = reason;
        if self.failures > self.shared.config.retries_max {
            return Err(ClientError::Unavailable {
                attempts: self.failures,
                last: self.last.clone(),
            });
        }
        self.target = self.shared.router.advance(Route::Any, self.target.index);
        self.backoff.wait().await;
        Ok(())
    }

    /// Turns a server message into an event, dropping any record at or below one already
    /// yielded. `None` when nothing is left to yield.
    fn accept(&mut self, message: proto::FollowResponse) -> Option<FollowEvent> {
        match message.event? {
            Event::Records(batch) => {
                let mut records = Vec::with_capacity(batch.records.len());
                for record in batch.records {
                    if record.offset < self.next.get() {
                        continue;
                    }
                    self.next = Offset(record.offset).next();
                    records.push(Record::from_proto(record));
                }
                self.next = self.next.max(Offset(batch.next_offset));
                (!records.is_empty()).then_some(FollowEvent::Records(records))
            }
            Event::CaughtUp(caught_up) => {
                self.next = self.next.max(Offset(caught_up.next_offset));
                Some(FollowEvent::CaughtUp { next_offset: self.next })
            }
        }
    }
}
