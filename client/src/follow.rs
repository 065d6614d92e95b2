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
        let follower =
            Follower { next: from_offset, stream: None, reconnect: Reconnect::new(shared) };
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
    next: Offset,
    stream: Option<Streaming<proto::FollowResponse>>,
    reconnect: Reconnect,
}

/// Which node a follow reads from, and how it moves on after a failure: to the next node (or
/// the one a refusal names), pausing with backoff, giving up after `retries_max` failures in a
/// row without an event. [`Follow`] and [`crate::StreamFollow`] share it.
#[derive(Debug)]
pub(crate) struct Reconnect {
    shared: Arc<Shared>,
    pub(crate) target: Target,
    /// Failed attempts since the last event.
    failures: u32,
    backoff: Backoff,
}

impl Reconnect {
    pub(crate) fn new(shared: Arc<Shared>) -> Reconnect {
        let backoff = shared.backoff();
        let target = shared.router.target(Route::Any);
        Reconnect { shared, target, failures: 0, backoff }
    }

    /// An event came: the failures in a row start again.
    pub(crate) fn event(&mut self) {
        self.failures = 0;
        self.backoff.reset();
    }

    /// Opens the server stream with `call` on the current node, bounded by `request_timeout`;
    /// on failure, counts it and moves on (`Ok(None)`: try again), or ends with a final error.
    pub(crate) async fn open<T>(
        &mut self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<Option<T>, ClientError> {
        // No grpc-timeout: a deadline would end the (endless) stream; only its opening is
        // bounded, and keep-alive pings find a dead connection under an idle stream.
        let reason = match tokio::time::timeout(self.shared.config.request_timeout, call).await {
            Ok(Ok(response)) => {
                self.shared.router.confirm(Route::Any, self.target.index);
                return Ok(Some(response.into_inner()));
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
        self.failed(reason).await.map(|()| None)
    }

    /// A server stream failed with `status`: a final error, or `Ok` to reconnect.
    pub(crate) async fn broken(&mut self, status: tonic::Status) -> Result<(), ClientError> {
        let reason = format!("{}: {}", self.target.url, describe(&status));
        if let Verdict::Final(error) = classify(status) {
            return Err(error);
        }
        self.failed(reason).await
    }

    /// The server ended the stream.
    pub(crate) async fn ended(&mut self) -> Result<(), ClientError> {
        let reason = format!("{}: the server ended the stream", self.target.url);
        self.failed(reason).await
    }

    /// Moves to the next node and pauses; gives up after `retries_max` failures in a row.
    async fn failed(&mut self, reason: String) -> Result<(), ClientError> {
        self.failures += 1;
        if self.failures > self.shared.config.retries_max {
            return Err(ClientError::Unavailable { attempts: self.failures, last: reason });
        }
        self.target = self.shared.router.advance(Route::Any, self.target.index);
        self.backoff.wait().await;
        Ok(())
    }
}

impl Follower {
    async fn next_event(mut self) -> Step {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                let request =
                    tonic::Request::new(proto::FollowRequest { from_offset: self.next.get() });
                let mut client = crate::log_client(self.reconnect.target.channel.clone());
                match self.reconnect.open(client.follow(request)).await {
                    Ok(stream) => self.stream = stream,
                    Err(error) => return (Some(Err(error)), self),
                }
                continue;
            };
            let failed = match stream.message().await {
                Ok(Some(message)) => {
                    self.reconnect.event();
                    if let Some(event) = self.accept(message) {
                        return (Some(Ok(event)), self);
                    }
                    continue;
                }
                Ok(None) => self.reconnect.ended().await,
                Err(status) => self.reconnect.broken(status).await,
            };
            self.stream = None;
            if let Err(error) = failed {
                return (Some(Err(error)), self);
            }
        }
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
