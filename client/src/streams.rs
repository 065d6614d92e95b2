//! Named streams: the `raftwal.v1.Streams` calls on [`Client`], and [`StreamFollow`].
//!
//! Every node serves every stream call (a follower hands writes to the leader and reads after
//! a ReadIndex round), so calls go to any node and move on when one fails. Offsets are byte
//! positions in a stream; an empty stream name in [`Client::read_stream`] and
//! [`Client::follow_stream`] means "all": every record of the log in log order, where offsets
//! are log offsets (the proto file documents the calls).

use std::sync::Arc;

use tonic::codec::Streaming;

use crate::call::Effect;
use crate::client::Client;
use crate::error::ClientError;
use crate::follow::Reconnect;
use crate::proto;
use crate::proto::stream_follow_response::Event;
use crate::router::Route;

/// Options of one stream append.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamAppendOptions {
    /// The stream must hold exactly this many records before the append, else
    /// [`ClientError::StreamVersionMismatch`]: optimistic concurrency on this stream alone.
    pub expected_version: Option<u64>,
    /// An idempotent producer: (id, epoch, sequence). A retry that applied before is answered
    /// `duplicate = true`; a newer epoch of the same id fences this one
    /// ([`ClientError::Fenced`]).
    pub producer: Option<proto::StreamProducer>,
    /// Close the stream with this append.
    pub close: bool,
}

impl Client {
    /// Creates a stream, or confirms an identical one (`created = false`);
    /// [`ClientError::AlreadyExists`] when it exists with other settings.
    pub async fn create_stream(
        &self,
        request: proto::CreateStreamRequest,
    ) -> Result<proto::StreamInfo, ClientError> {
        let shared = &self.shared;
        let answer = shared
            .call(Route::Any, Effect::Mutating, |channel| {
                let request = shared.request(request.clone());
                async move { crate::streams_client(channel).create(request).await }
            })
            .await?;
        Ok(answer.value.into_inner())
    }

    /// Appends `records` (none empty) to stream `name`, in order, all or none.
    ///
    /// With a producer or an expected version an append is retried safely (a repeat is a
    /// duplicate, or a version mismatch reported as [`ClientError::UnknownOutcome`]); without
    /// either, an attempt that may have applied is not repeated: the call returns
    /// `UnknownOutcome` rather than risk appending twice.
    pub async fn stream_append<R: Into<Vec<u8>>>(
        &self,
        name: &str,
        records: impl IntoIterator<Item = R>,
        options: StreamAppendOptions,
    ) -> Result<proto::StreamAppendResponse, ClientError> {
        let effect = if options.producer.is_some() || options.expected_version.is_some() {
            Effect::Mutating
        } else {
            Effect::Once
        };
        let request = proto::StreamAppendRequest {
            name: name.to_owned(),
            records: records.into_iter().map(Into::into).collect(),
            expected_version: options.expected_version,
            producer: options.producer,
            close: options.close,
        };
        let shared = &self.shared;
        let answer = shared
            .call(Route::Any, effect, |channel| {
                let request = shared.request(request.clone());
                async move { crate::streams_client(channel).append(request).await }
            })
            .await?;
        Ok(answer.value.into_inner())
    }

    /// Records of stream `name` from `from_offset` (empty name: all, from a log offset), about
    /// `bytes_max` bytes (0: 4 MiB). Linearizable: it reflects every write acknowledged
    /// before it.
    pub async fn read_stream(
        &self,
        name: &str,
        from_offset: u64,
        bytes_max: u32,
    ) -> Result<proto::StreamReadResponse, ClientError> {
        let request =
            proto::StreamReadRequest { name: name.to_owned(), from_offset, max_bytes: bytes_max };
        let shared = &self.shared;
        let answer = shared
            .call(Route::Any, Effect::ReadOnly, |channel| {
                let request = shared.request(request.clone());
                async move { crate::streams_client(channel).read(request).await }
            })
            .await?;
        Ok(answer.value.into_inner())
    }

    /// Follows stream `name` (empty: all) from `from_offset`. See [`StreamFollow`].
    pub fn follow_stream(&self, name: &str, from_offset: u64) -> StreamFollow {
        StreamFollow {
            reconnect: Reconnect::new(Arc::clone(&self.shared)),
            name: name.to_owned(),
            next: from_offset,
            stream: None,
            ended: false,
        }
    }

    /// A stream's settings and tail.
    pub async fn describe_stream(&self, name: &str) -> Result<proto::StreamInfo, ClientError> {
        let request = proto::DescribeStreamRequest { name: name.to_owned() };
        let shared = &self.shared;
        let answer = shared
            .call(Route::Any, Effect::ReadOnly, |channel| {
                let request = shared.request(request.clone());
                async move { crate::streams_client(channel).describe(request).await }
            })
            .await?;
        Ok(answer.value.into_inner())
    }

    /// Streams whose name starts with `prefix`, after `start_after`, in byte order, at most
    /// `limit` (0: 1,000); `more` says whether another page follows.
    pub async fn list_streams(
        &self,
        prefix: &str,
        start_after: &str,
        limit: u32,
    ) -> Result<proto::ListStreamsResponse, ClientError> {
        let request = proto::ListStreamsRequest {
            prefix: prefix.to_owned(),
            start_after: start_after.to_owned(),
            limit,
        };
        let shared = &self.shared;
        let answer = shared
            .call(Route::Any, Effect::ReadOnly, |channel| {
                let request = shared.request(request.clone());
                async move { crate::streams_client(channel).list(request).await }
            })
            .await?;
        Ok(answer.value.into_inner())
    }

    /// Closes a stream (closing a closed one again succeeds).
    pub async fn close_stream(
        &self,
        name: &str,
        producer: Option<proto::StreamProducer>,
    ) -> Result<proto::StreamAppendResponse, ClientError> {
        let request = proto::CloseStreamRequest { name: name.to_owned(), producer };
        let shared = &self.shared;
        let answer = shared
            .call(Route::Any, Effect::Mutating, |channel| {
                let request = shared.request(request.clone());
                async move { crate::streams_client(channel).close(request).await }
            })
            .await?;
        Ok(answer.value.into_inner())
    }

    /// Deletes a stream. [`ClientError::NotFound`] when there is none (also when an earlier
    /// attempt of this call, whose answer was lost, deleted it).
    pub async fn delete_stream(&self, name: &str) -> Result<(), ClientError> {
        let request = proto::DeleteStreamRequest { name: name.to_owned() };
        let shared = &self.shared;
        shared
            .call(Route::Any, Effect::Mutating, |channel| {
                let request = shared.request(request.clone());
                async move { crate::streams_client(channel).delete(request).await }
            })
            .await?;
        Ok(())
    }
}

/// One event of a [`StreamFollow`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// Records, never empty, each starting at or after where the follow stood.
    Records(Vec<proto::StreamRecord>),
    /// The serving node had sent everything it had when the follow (re)connected; `closed`:
    /// the stream is closed and the follow ends.
    CaughtUp {
        /// Where the follow stands.
        next_offset: u64,
        /// The stream is complete.
        closed: bool,
    },
}

/// A stream (or all) from an offset: the history, a `CaughtUp`, then live records. On a broken
/// connection or a node going away it resumes from where it stands on the next node (pausing
/// with backoff; `retries_max` failures in a row without an event end it with
/// [`ClientError::Unavailable`]); nothing repeats or goes back.
#[derive(Debug)]
pub struct StreamFollow {
    name: String,
    /// Every record before this was yielded (a stream offset, or a log offset for all).
    next: u64,
    stream: Option<Streaming<proto::StreamFollowResponse>>,
    reconnect: Reconnect,
    ended: bool,
}

impl StreamFollow {
    /// Where the follow stands.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// The next event; `None` once the stream is closed and everything was yielded, or after
    /// an error.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, ClientError>> {
        if self.ended {
            return None;
        }
        let event = self.next_inner().await;
        if event.is_err() {
            self.ended = true;
        }
        Some(event)
    }

    async fn next_inner(&mut self) -> Result<StreamEvent, ClientError> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                let request = tonic::Request::new(proto::StreamFollowRequest {
                    name: self.name.clone(),
                    from_offset: self.next,
                });
                let mut client = crate::streams_client(self.reconnect.target.channel.clone());
                self.stream = self.reconnect.open(client.follow(request)).await?;
                continue;
            };
            let failed = match stream.message().await {
                Ok(Some(message)) => {
                    self.reconnect.event();
                    if let Some(event) = self.accept(message) {
                        return Ok(event);
                    }
                    continue;
                }
                Ok(None) => self.reconnect.ended().await,
                Err(status) => self.reconnect.broken(status).await,
            };
            self.stream = None;
            failed?;
        }
    }

    fn accept(&mut self, message: proto::StreamFollowResponse) -> Option<StreamEvent> {
        let all = self.name.is_empty();
        match message.event? {
            Event::Records(batch) => {
                let mut records = Vec::with_capacity(batch.records.len());
                for record in batch.records {
                    // For all, the records of one command share a position and come whole.
                    let at = if all { record.position } else { record.offset };
                    if at < self.next {
                        continue;
                    }
                    records.push(record);
                }
                self.next = self.next.max(batch.next_offset);
                (!records.is_empty()).then_some(StreamEvent::Records(records))
            }
            Event::CaughtUp(c) => {
                self.next = self.next.max(c.next_offset);
                if c.closed {
                    self.ended = true;
                }
                Some(StreamEvent::CaughtUp { next_offset: self.next, closed: c.closed })
            }
        }
    }
}
