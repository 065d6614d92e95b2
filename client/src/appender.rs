//! [`Appender`]: pipelined appends over one AppendStream, with a bounded window.
//!
//! A background task (the driver) owns the stream. `send` takes a place in the window, hands
//! the records to the driver and returns a ticket; the driver gives the append the next
//! sequence and request id, writes it to the stream and answers the ticket when the server's
//! answer with that request id arrives. When the stream fails, the driver opens a new one on
//! the (new) leader and writes every unanswered append again, in order, with its same sequence.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;

use crate::backoff::Backoff;
use crate::call::Shared;
use crate::client::Producer;
use crate::config::AppenderConfig;
use crate::error::{ClientError, Verdict, classify, classify_stream_error, describe};
use crate::proto;
use crate::router::{Route, Target};
use crate::types::{AppendOptions, Appended, Offset};

type Reply = oneshot::Sender<Result<Appended, ClientError>>;

/// Pipelined appends: many appends in flight on one stream to the leader, each answered
/// separately, with a fixed bound on how many are in flight.
///
/// Each appender has its own random producer id; its appends get sequences 1, 2, 3, ... in the
/// order they enter it (when one [`send`](Appender::send) returns before another starts, the
/// first gets the lower sequence). The driver writes them to the stream in that order and, after
/// any failure, writes all unanswered ones again in that order with the same sequences, on one
/// new stream. With the server's producer rule ([`crate::dedup`]: a producer sequence at or
/// below its latest applied one is never applied again), this gives:
///
/// - **At most once, in send order.** An append is in the log at most once, and if appends A and
///   B of this appender are both in the log and A was sent first, A's offsets are below B's.
/// - **Answers.** `Ok` means the append is in the log (committed on a quorum).
///   [`ClientError::UnknownOutcome`] means it may or may not be, and if it is, it is below every
///   later append of this appender. Any other error means it is not.
/// - **No stop on error.** A failed append does not stop the ones sent after it (they may already
///   be in flight). A caller that needs "this one or none of the later ones" stops sending at
///   the first error and treats the later in-flight ones by their own answers.
///
/// Retries: a stream failure (a broken connection, a "not leader" answer, no answer within
/// `request_timeout`) counts as one failed attempt for all unanswered appends; after
/// `retries_max` failures in a row without an answer, every unanswered append fails with
/// `UnknownOutcome` (if it may have reached a server) or `Unavailable`, and the appender goes on
/// with later sends. RESOURCE_EXHAUSTED pauses and retries `overloaded_retries_max` times, then
/// fails the unanswered appends with [`ClientError::Overloaded`].
///
/// Dropping the appender lets the driver finish the appends in flight in the background;
/// [`close`](Appender::close) waits for them. Dropping a ticket does not cancel its append.
pub struct Appender {
    commands: mpsc::Sender<Command>,
    window: Arc<Semaphore>,
    window_size: u32,
    driver: JoinHandle<()>,
}

impl fmt::Debug for Appender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Appender")
            .field("window", &self.window_size)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// The answer to one [`Appender::send`]: a future of the append's outcome.
#[derive(Debug)]
#[must_use = "a ticket does nothing unless awaited; dropping it does not cancel the append"]
pub struct AppendTicket {
    reply: oneshot::Receiver<Result<Appended, ClientError>>,
}

impl Future for AppendTicket {
    type Output = Result<Appended, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.reply).poll(cx) {
            Poll::Ready(Ok(outcome)) => Poll::Ready(outcome),
            // The driver never drops a reply unanswered unless it stopped (its runtime shut
            // down, or it panicked).
            Poll::Ready(Err(_)) => Poll::Ready(Err(ClientError::Closed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

struct Command {
    records: Vec<Vec<u8>>,
    expected_next_offset: Option<u64>,
    reply: Reply,
    permit: OwnedSemaphorePermit,
}

impl Appender {
    pub(crate) fn start(
        shared: Arc<Shared>,
        config: AppenderConfig,
    ) -> Result<Appender, ClientError> {
        config.validate()?;
        let window =
            usize::try_from(config.window).expect("the window is at most APPENDER_WINDOW_MAX");
        let (commands, commands_rx) = mpsc::channel(window);
        let driver = Driver {
            producer: Producer::new(shared.random_u64()),
            backoff: shared.backoff(),
            target: shared.router.target(Route::Leader),
            deadline: Instant::now(),
            check_at: Instant::now(),
            shared,
            commands: commands_rx,
            commands_open: true,
            next_request_id: 1,
            window,
            pending: VecDeque::with_capacity(window),
            conn: None,
            failures: 0,
            overloaded: 0,
            pause: false,
            redirected: false,
            last: String::new(),
        };
        Ok(Appender {
            commands,
            window: Arc::new(Semaphore::new(window)),
            window_size: config.window,
            driver: tokio::spawn(driver.run()),
        })
    }

    /// Queues `records` as one append and returns a ticket for its outcome. Waits while the
    /// window is full. See [`Appender::send_with`].
    pub async fn send<R: Into<Vec<u8>>>(
        &self,
        records: impl IntoIterator<Item = R>,
    ) -> Result<AppendTicket, ClientError> {
        self.send_with(records, AppendOptions::default()).await
    }

    /// Queues `records` as one append with options and returns a ticket for its outcome.
    /// Waits while the window is full (a slow leader slows the caller). Fails at once with
    /// [`ClientError::InvalidArgument`] for an empty batch and [`ClientError::Closed`] when the
    /// driver has stopped; every other error comes through the ticket.
    pub async fn send_with<R: Into<Vec<u8>>>(
        &self,
        records: impl IntoIterator<Item = R>,
        options: AppendOptions,
    ) -> Result<AppendTicket, ClientError> {
        let records: Vec<Vec<u8>> = records.into_iter().map(Into::into).collect();
        if records.is_empty() {
            return Err(ClientError::InvalidArgument {
                message: "an append needs at least one record".into(),
            });
        }
        let permit =
            Arc::clone(&self.window).acquire_owned().await.map_err(|_| ClientError::Closed)?;
        let (reply, reply_rx) = oneshot::channel();
        let command = Command {
            records,
            expected_next_offset: options.expected_next_offset.map(Offset::get),
            reply,
            permit,
        };
        self.commands.send(command).await.map_err(|_| ClientError::Closed)?;
        Ok(AppendTicket { reply: reply_rx })
    }

    /// How many appends are queued or in flight (sent, not yet answered).
    pub fn in_flight(&self) -> usize {
        let window =
            usize::try_from(self.window_size).expect("the window is at most APPENDER_WINDOW_MAX");
        window.saturating_sub(self.window.available_permits())
    }

    /// Stops taking appends and waits until every one sent is answered.
    pub async fn close(self) -> Result<(), ClientError> {
        drop(self.commands);
        self.driver.await.map_err(|_| ClientError::Closed)
    }
}

/// One append the driver has taken and not yet answered.
struct Pending {
    request: proto::AppendRequest,
    reply: Reply,
    /// Frees a place in the window when the append is answered.
    permit: OwnedSemaphorePermit,
    /// How many streams it was written to.
    attempts: u32,
    /// Some attempt of it may have reached a server.
    ambiguous: bool,
}

impl Pending {
    fn answer(self, outcome: Result<Appended, ClientError>) {
        let outcome = match outcome {
            Err(ClientError::OffsetMismatch { next_offset }) if self.ambiguous => {
                Err(ClientError::UnknownOutcome {
                    attempts: self.attempts,
                    last: format!(
                        "offset mismatch (next offset {next_offset}) after an attempt that may have committed"
                    ),
                })
            }
            other => other,
        };
        // Free the place in the window before the caller can observe the answer.
        let Pending { reply, permit, .. } = self;
        drop(permit);
        // The ticket may have been dropped; the append happened (or not) regardless.
        let _ = reply.send(outcome);
    }
}

struct Connection {
    requests: mpsc::Sender<proto::AppendRequest>,
    responses: Streaming<proto::AppendResponse>,
}

enum Event {
    Command(Option<Command>),
    Answer(Result<Option<proto::AppendResponse>, tonic::Status>),
    Stalled,
    /// Time for a leader check ([`crate::ClientConfig::leader_check_after`]).
    Check,
}

/// The task behind an [`Appender`].
///
/// Invariants: `pending` is in sequence order and holds at most `window` appends (each holds a
/// window permit); when `conn` is `Some`, every append in `pending` was written to it in order.
struct Driver {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    commands_open: bool,
    producer: Producer,
    next_request_id: u64,
    window: usize,
    pending: VecDeque<Pending>,
    conn: Option<Connection>,
    target: Target,
    /// Stream failures in a row without an answer.
    failures: u32,
    /// RESOURCE_EXHAUSTED answers in a row.
    overloaded: u32,
    backoff: Backoff,
    /// Pause before the next connection.
    pause: bool,
    /// The last connection followed a redirect without pausing.
    redirected: bool,
    last: String,
    /// When the stream is taken as stalled if no answer has come.
    deadline: Instant,
    /// When to ask the other nodes who leads if no answer has come.
    check_at: Instant,
}

impl Driver {
    async fn run(mut self) {
        loop {
            if self.pending.is_empty() && !self.commands_open {
                return;
            }
            if self.conn.is_none() && !self.pending.is_empty() {
                self.connect().await;
                continue;
            }
            let event = {
                let stalled = self.conn.is_some() && !self.pending.is_empty();
                let deadline = self.deadline;
                let check_at = self.check_at;
                let checking = stalled && !self.shared.config.leader_check_after.is_zero();
                let conn = self.conn.as_mut();
                tokio::select! {
                    command = self.commands.recv(), if self.commands_open => Event::Command(command),
                    answer = async {
                        match conn {
                            Some(conn) => conn.responses.message().await,
                            None => std::future::pending().await,
                        }
                    } => Event::Answer(answer),
                    () = tokio::time::sleep_until(deadline), if stalled => Event::Stalled,
                    () = tokio::time::sleep_until(check_at), if checking => Event::Check,
                }
            };
            match event {
                Event::Command(Some(command)) => self.take(command),
                Event::Command(None) => self.commands_open = false,
                Event::Answer(Ok(Some(answer))) => self.on_answer(answer),
                Event::Answer(Ok(None)) if self.pending.is_empty() => self.conn = None,
                Event::Answer(Ok(None)) => {
                    let last = format!("{}: the server ended the stream", self.target.url);
                    self.on_failure(Verdict::Ambiguous, last, None);
                }
                Event::Answer(Err(status)) => {
                    let last = format!("{}: {}", self.target.url, describe(&status));
                    self.on_failure(classify(status), last, None);
                }
                Event::Check => match self.shared.leader_elsewhere(&self.target).await {
                    Some(addr) => {
                        let last = crate::call::abandoned(&self.target.url, &addr);
                        self.on_failure(Verdict::NotLeader { leader_addr: Some(addr) }, last, None);
                    }
                    None => {
                        self.check_at = Instant::now() + self.shared.leader_check_every();
                    }
                },
                Event::Stalled => {
                    let last = format!(
                        "{}: no answer within request_timeout {:?}",
                        self.target.url, self.shared.config.request_timeout
                    );
                    self.on_failure(Verdict::Ambiguous, last, None);
                }
            }
        }
    }

    /// Something moved (a first append in the window, a new stream, an answer): the stall
    /// deadline and the next leader check count from now.
    fn progressed(&mut self) {
        let now = Instant::now();
        self.deadline = now + self.shared.config.request_timeout;
        self.check_at = now + self.shared.config.leader_check_after;
    }

    /// Gives a new append its sequence and request id and writes it to the stream.
    fn take(&mut self, command: Command) {
        let request = proto::AppendRequest {
            records: command.records,
            expected_next_offset: command.expected_next_offset,
            producer: Some(proto::Producer {
                id: self.producer.id,
                sequence: self.producer.take_sequence(),
            }),
            request_id: self.next_request_id,
        };
        self.next_request_id += 1;
        if self.pending.is_empty() {
            self.progressed();
        }
        let mut attempts = 0;
        if let Some(conn) = &self.conn {
            // A full channel cannot happen (its capacity is the window); a closed one means
            // the call ended, which the answer side reports next.
            let _ = conn.requests.try_send(request.clone());
            attempts = 1;
        }
        self.pending.push_back(Pending {
            request,
            reply: command.reply,
            permit: command.permit,
            attempts,
            ambiguous: false,
        });
        assert!(
            self.pending.len() <= self.window,
            "{} appends in a window of {}",
            self.pending.len(),
            self.window
        );
    }

    /// Opens a stream to the believed leader and writes every unanswered append to it.
    async fn connect(&mut self) {
        if self.pause {
            self.backoff.wait().await;
        }
        self.pause = false;
        self.target = self.shared.router.target(Route::Leader);
        let (requests, requests_rx) = mpsc::channel(self.window);
        for pending in &mut self.pending {
            pending.attempts += 1;
            requests
                .try_send(pending.request.clone())
                .expect("pending holds at most `window` appends, the channel's capacity");
        }
        // No grpc-timeout: a deadline would bound the whole stream, not one append. Stalls
        // are caught by `deadline` instead.
        let request = tonic::Request::new(ReceiverStream::new(requests_rx));
        let mut client = crate::log_client(self.target.channel.clone());
        let call = client.append_stream(request);
        match tokio::time::timeout(self.shared.config.request_timeout, call).await {
            Ok(Ok(response)) => {
                self.conn = Some(Connection { requests, responses: response.into_inner() });
                self.progressed();
            }
            Ok(Err(status)) => {
                let last = format!("{}: {}", self.target.url, describe(&status));
                self.on_failure(classify(status), last, None);
            }
            Err(_elapsed) => {
                let last =
                    format!("{}: the stream did not open within request_timeout", self.target.url);
                self.on_failure(Verdict::Ambiguous, last, None);
            }
        }
    }

    fn on_answer(&mut self, answer: proto::AppendResponse) {
        let Some(index) =
            self.pending.iter().position(|p| p.request.request_id == answer.request_id)
        else {
            let last = format!(
                "{}: an answer for unknown request id {}",
                self.target.url, answer.request_id
            );
            self.on_failure(Verdict::Ambiguous, last, None);
            return;
        };
        if let Some(error) = &answer.error {
            let last = format!(
                "{}: {:?}: {}",
                self.target.url,
                tonic::Code::from_i32(error.code),
                error.message
            );
            self.on_failure(classify_stream_error(error), last, Some(index));
            return;
        }
        let pending = self.pending.remove(index).expect("index came from position");
        self.shared.router.confirm(Route::Leader, self.target.index);
        self.failures = 0;
        self.overloaded = 0;
        self.redirected = false;
        self.backoff.reset();
        self.progressed();
        let outcome = Appended::from_answer(&answer, pending.attempts);
        pending.answer(outcome);
    }

    /// Handles a failed stream, or an error answer for `pending[index]` (after which the
    /// server ends the stream). The stream is dropped; the next loop opens a new one.
    fn on_failure(&mut self, verdict: Verdict, last: String, index: Option<usize>) {
        self.last = last;
        let mid_stream = self.conn.take().is_some();
        // Appends written to a stream that failed may have been applied, except one the
        // server answered with an error itself.
        if mid_stream || matches!(verdict, Verdict::Ambiguous) {
            for (i, pending) in self.pending.iter_mut().enumerate() {
                pending.ambiguous |= Some(i) != index;
            }
        }
        match verdict {
            Verdict::Final(error) => {
                // A stream-level final error is charged to the oldest append, so a server that
                // keeps refusing drains the window instead of looping.
                if let Some(pending) = self.pending.remove(index.unwrap_or(0)) {
                    pending.answer(Err(error));
                }
            }
            Verdict::Overloaded => {
                self.overloaded += 1;
                self.pause = true;
                if self.overloaded > self.shared.config.overloaded_retries_max {
                    let attempts = self.overloaded;
                    let message = self.last.clone();
                    self.fail_all(|| ClientError::Overloaded {
                        attempts,
                        message: message.clone(),
                    });
                }
            }
            Verdict::NotLeader { leader_addr } => {
                let redirect =
                    leader_addr.and_then(|addr| self.shared.router.redirect(Route::Leader, &addr));
                match redirect {
                    Some(next) if next.index != self.target.index && !self.redirected => {
                        self.redirected = true;
                    }
                    Some(_) => self.pause = true,
                    None => {
                        self.shared.router.advance(Route::Leader, self.target.index);
                        self.pause = true;
                    }
                }
                self.count_failure();
            }
            Verdict::Unreachable | Verdict::Ambiguous => {
                self.shared.router.advance(Route::Leader, self.target.index);
                self.pause = true;
                self.count_failure();
            }
        }
        if self.pause {
            self.redirected = false;
        }
    }

    fn count_failure(&mut self) {
        self.failures += 1;
        if self.failures > self.shared.config.retries_max {
            let attempts = self.failures;
            let last = self.last.clone();
            self.fail_all(|| ClientError::Unavailable { attempts, last: last.clone() });
        }
    }

    /// Answers every unanswered append: `error()` for those that never reached a server,
    /// `UnknownOutcome` for the others. The appender then goes on with later sends.
    fn fail_all(&mut self, error: impl Fn() -> ClientError) {
        for pending in self.pending.drain(..) {
            let outcome = if pending.ambiguous {
                ClientError::UnknownOutcome { attempts: pending.attempts, last: self.last.clone() }
            } else {
                error()
            };
            pending.answer(Err(outcome));
        }
        self.failures = 0;
        self.overloaded = 0;
        self.backoff.reset();
    }
}
