//! The `raftwal.v1.Streams` gRPC service on the client port: the same named streams the
//! Durable Streams HTTP API serves (`streams_api` holds what both share), plus "all", every
//! record of the log in log order. The proto file documents each call and error.

use std::pin::Pin;
use std::sync::Arc;

use axum::http::StatusCode;
use bytes::Bytes;
use raftwal_client::proto::{self, streams_server::Streams};
use raftwal_consensus::LogIndex;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use raftwal_client::{
    TRAILER_PRODUCER_EPOCH, TRAILER_PRODUCER_EXPECTED_SEQ, TRAILER_STREAM_CLOSED,
    TRAILER_STREAM_VERSION,
};

use crate::api::wait_for_more;
use crate::core::streams::{self, Command, CreateSpec, ProducerTuple, StreamOutcome, StreamView};
use crate::read::{self, AllRecord, StreamMessage};
use crate::streams_api::{Refusal, StreamsApi, UNSTAMPED, now_ms};
use crate::streams_http::{is_json, parse_rfc3339, valid_content_type};

/// Bytes a read answers with by default, and at most.
const READ_BYTES_DEFAULT: u32 = 4 << 20;
const READ_BYTES_MAX: u32 = 32 << 20;
/// Records an "all" read answers with at most.
const ALL_RECORDS_MAX: usize = 10_000;
/// What one batch of a follow carries at most.
const FOLLOW_BATCH_BYTES: u64 = 1 << 20;
/// Streams a list answers with by default, and at most.
const LIST_DEFAULT: u32 = 1000;
const LIST_MAX: u32 = 10_000;

/// The service: the shared streams API and the node's limit on followers (shared with the
/// `Log` service's Follow).
#[derive(Clone, Debug)]
pub struct StreamsService {
    api: StreamsApi,
    followers: Arc<Semaphore>,
}

impl StreamsService {
    /// The service over `api`; `followers` bounds the follows open at once.
    pub fn new(api: StreamsApi, followers: Arc<Semaphore>) -> StreamsService {
        StreamsService { api, followers }
    }
}

/// A refusal as a gRPC status.
fn refusal(r: Refusal) -> Status {
    let code = if r.unknown {
        Code::Unknown
    } else {
        match r.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => Code::InvalidArgument,
            StatusCode::NOT_FOUND | StatusCode::GONE => Code::NotFound,
            StatusCode::CONFLICT => Code::FailedPrecondition,
            StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
            StatusCode::INSUFFICIENT_STORAGE => Code::ResourceExhausted,
            _ => Code::Internal,
        }
    };
    Status::new(code, r.message)
}

fn with_trailer(code: Code, message: String, name: &'static str, value: u64) -> Status {
    let mut md = MetadataMap::new();
    md.insert(name, value.to_string().parse().expect("digits are ASCII"));
    Status::with_metadata(code, message, md)
}

/// A refusal by the stream's state as a gRPC status; `create`: a conflict is ALREADY_EXISTS.
fn outcome_status(outcome: StreamOutcome, create: bool) -> Status {
    match outcome {
        StreamOutcome::NotFound => Status::not_found("no such stream"),
        StreamOutcome::Gone => Status::not_found("the stream was deleted (forks still read it)"),
        StreamOutcome::Closed { tail } => with_trailer(
            Code::FailedPrecondition,
            format!("the stream is closed at offset {tail}"),
            TRAILER_STREAM_CLOSED,
            tail,
        ),
        StreamOutcome::Conflict(why) if create => Status::already_exists(why),
        StreamOutcome::Conflict(why) => Status::failed_precondition(why),
        StreamOutcome::VersionMismatch { version } => with_trailer(
            Code::FailedPrecondition,
            format!("the stream's version is {version}, not the one expected"),
            TRAILER_STREAM_VERSION,
            version,
        ),
        StreamOutcome::StaleEpoch { epoch } => with_trailer(
            Code::FailedPrecondition,
            format!("fenced: a newer producer epoch ({epoch}) took over"),
            TRAILER_PRODUCER_EPOCH,
            epoch,
        ),
        StreamOutcome::SequenceGap { expected, received } => with_trailer(
            Code::FailedPrecondition,
            format!("expected producer sequence {expected}, got {received}"),
            TRAILER_PRODUCER_EXPECTED_SEQ,
            expected,
        ),
        StreamOutcome::Invalid(why) => Status::invalid_argument(why),
        other => Status::internal(format!("unexpected outcome {other:?}")),
    }
}

fn info(view: &StreamView) -> proto::StreamInfo {
    let (forked_from, fork_offset) =
        view.fork.as_ref().map_or((String::new(), 0), |(from, _, at)| (from.clone(), *at));
    proto::StreamInfo {
        name: view.name.clone(),
        content_type: view.content_type.clone(),
        next_offset: view.tail,
        version: view.version,
        closed: view.closed,
        ttl_secs: view.ttl_secs,
        expires_at: view.expires_at.as_ref().map(|(s, _)| s.clone()).unwrap_or_default(),
        incarnation: view.incarnation.0,
        forked_from,
        fork_offset,
        created: false,
    }
}

fn check_name(name: &str) -> Result<(), Status> {
    if name.is_empty() || name.len() > streams::NAME_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "a stream name has 1 to {} bytes",
            streams::NAME_BYTES_MAX
        )));
    }
    Ok(())
}

/// The records of a write: none empty (an empty record has no offset of its own), each one
/// JSON value on a JSON stream.
fn records_of(records: Vec<Vec<u8>>, json: bool) -> Result<Vec<Bytes>, Status> {
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            if r.is_empty() {
                return Err(Status::invalid_argument(format!("record {i} is empty")));
            }
            if json && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&r) {
                return Err(Status::invalid_argument(format!(
                    "record {i} is not one JSON value: {e}"
                )));
            }
            Ok(Bytes::from(r))
        })
        .collect()
}

fn producer_of(p: Option<proto::StreamProducer>) -> Result<Option<ProducerTuple>, Status> {
    match p {
        None => Ok(None),
        Some(p) if p.id.is_empty() => Err(Status::invalid_argument("a producer needs an id")),
        Some(p) => Ok(Some(ProducerTuple { id: p.id, epoch: p.epoch, seq: p.sequence })),
    }
}

fn stream_record(name: &str, m: StreamMessage) -> proto::StreamRecord {
    proto::StreamRecord {
        stream: name.to_string(),
        offset: m.end - m.data.len() as u64,
        next_offset: m.end,
        position: m.position.0,
        data: m.data.to_vec(),
    }
}

fn all_record(r: AllRecord) -> proto::StreamRecord {
    proto::StreamRecord {
        stream: r.stream.unwrap_or_default(),
        offset: r.offset,
        next_offset: r.next_offset,
        position: r.position.0,
        data: r.data.to_vec(),
    }
}

fn append_response(
    outcome: StreamOutcome,
    added: u64,
) -> Result<proto::StreamAppendResponse, Status> {
    match outcome {
        StreamOutcome::Appended { tail, closed, version } => Ok(proto::StreamAppendResponse {
            next_offset: tail,
            version,
            closed,
            duplicate: false,
            first_offset: tail.saturating_sub(added),
        }),
        StreamOutcome::Duplicate { tail, closed, .. } => Ok(proto::StreamAppendResponse {
            next_offset: tail,
            version: 0,
            closed,
            duplicate: true,
            first_offset: tail,
        }),
        other => Err(outcome_status(other, false)),
    }
}

impl StreamsService {
    /// The stream for a read or describe, after a ReadIndex round.
    async fn readable_view(&self, name: &str) -> Result<Arc<StreamView>, Status> {
        check_name(name)?;
        self.api.barrier().await.map_err(refusal)?;
        let view = self.api.live_view(name).map_err(refusal)?;
        self.api.touch_if_due(&view).await.map_err(refusal)?;
        Ok(view)
    }

    /// Every record of the log from `from` (a log offset), as this node applied it.
    fn read_all(&self, from: u64, bytes_max: u64) -> Result<(Vec<AllRecord>, u64, bool), Status> {
        // Without the stream state every stream record would look refused and be skipped.
        self.api.check_state().map_err(refusal)?;
        let shared = &self.api.shared;
        let readable = *shared.readable.borrow();
        let lookup = |name: &str| self.api.view(name);
        let (records, next) = read::read_all(
            &shared.wal,
            || shared.view.read().clone(),
            &lookup,
            readable,
            LogIndex(from),
            ALL_RECORDS_MAX,
            bytes_max,
        )
        .map_err(crate::api::read_status)?;
        // A log restart during the walk drops the streams: what was skipped was not refused.
        self.api.check_state().map_err(refusal)?;
        Ok((records, next.0, next > readable))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Streams for StreamsService {
    async fn create(
        &self,
        request: Request<proto::CreateStreamRequest>,
    ) -> Result<Response<proto::StreamInfo>, Status> {
        let r = request.into_inner();
        check_name(&r.name)?;
        let content_type = if r.content_type.is_empty() {
            "application/octet-stream".to_string()
        } else if valid_content_type(&r.content_type) {
            r.content_type
        } else {
            return Err(Status::invalid_argument(format!("bad content type {:?}", r.content_type)));
        };
        if r.ttl_secs.is_some() && !r.expires_at.is_empty() {
            return Err(Status::invalid_argument("ttl_secs and expires_at exclude each other"));
        }
        if r.ttl_secs.is_some_and(|t| t > streams::TTL_SECS_MAX) {
            return Err(Status::invalid_argument(format!(
                "a time to live is at most {} s",
                streams::TTL_SECS_MAX
            )));
        }
        let expires_at = if r.expires_at.is_empty() {
            None
        } else {
            let ms = parse_rfc3339(&r.expires_at)
                .ok_or_else(|| Status::invalid_argument("expires_at is not RFC 3339"))?;
            Some((r.expires_at, ms))
        };
        let messages = records_of(r.records, is_json(&content_type))?;
        let added: u64 = messages.iter().map(|m| m.len() as u64).sum();
        let count = messages.len() as u64;
        let spec = CreateSpec {
            content_type,
            ttl_secs: r.ttl_secs,
            expires_at,
            closed: r.closed,
            fork: None,
        };
        let cmd = Command::Create { name: r.name.clone(), now_ms: UNSTAMPED, spec, messages };
        let outcome = self.api.command(cmd).await.map_err(refusal)?;
        let (tail, content_type, closed, created) = match outcome {
            StreamOutcome::Created { tail, content_type, closed } => {
                (tail, content_type, closed, true)
            }
            StreamOutcome::Exists { tail, content_type, closed } => {
                (tail, content_type, closed, false)
            }
            other => return Err(outcome_status(other, true)),
        };
        // The rest as this node knows it (on a follower it may not have applied the create
        // yet; then what the request said).
        let mut out = match self.api.view(&r.name) {
            Some(v) if v.tail >= tail => info(&v),
            _ => proto::StreamInfo {
                name: r.name,
                version: if created { count } else { 0 },
                ..Default::default()
            },
        };
        debug_assert!(!created || added == tail);
        (out.next_offset, out.content_type, out.closed, out.created) =
            (tail, content_type, closed, created);
        Ok(Response::new(out))
    }

    async fn append(
        &self,
        request: Request<proto::StreamAppendRequest>,
    ) -> Result<Response<proto::StreamAppendResponse>, Status> {
        let r = request.into_inner();
        check_name(&r.name)?;
        if r.records.is_empty() && !r.close {
            return Err(Status::invalid_argument("an append needs at least one record"));
        }
        let producer = producer_of(r.producer)?;
        // JSON records are checked against the stream's mode as the client last wrote it.
        self.api.catch_up_if_follower().await.map_err(refusal)?;
        self.api.check_state().map_err(refusal)?;
        // Not there after the catch-up: it did not exist when the request came.
        let Some(view) = self.api.view(&r.name) else {
            return Err(Status::not_found("no such stream"));
        };
        let messages = records_of(r.records, is_json(&view.content_type))?;
        let added: u64 = messages.iter().map(|m| m.len() as u64).sum();
        let cmd = Command::Append {
            name: r.name,
            now_ms: UNSTAMPED,
            // The records were checked for this media type: the apply refuses another.
            content_type: Some(view.content_type.clone()),
            messages,
            close: r.close,
            producer,
            stream_seq: None,
            expected_version: r.expected_version,
        };
        let outcome = self.api.command(cmd).await.map_err(refusal)?;
        append_response(outcome, added).map(Response::new)
    }

    async fn read(
        &self,
        request: Request<proto::StreamReadRequest>,
    ) -> Result<Response<proto::StreamReadResponse>, Status> {
        let r = request.into_inner();
        let bytes_max = u64::from(match r.max_bytes {
            0 => READ_BYTES_DEFAULT,
            n => n.min(READ_BYTES_MAX),
        });
        if r.name.is_empty() {
            self.api.barrier().await.map_err(refusal)?;
            let (records, next, up_to_date) = self.read_all(r.from_offset, bytes_max)?;
            return Ok(Response::new(proto::StreamReadResponse {
                records: records.into_iter().map(all_record).collect(),
                next_offset: next.max(r.from_offset),
                up_to_date,
                closed: false,
            }));
        }
        let view = self.readable_view(&r.name).await?;
        let messages = self.api.read(&view, r.from_offset, bytes_max).map_err(refusal)?;
        let next = messages.last().map_or(view.tail, |m| m.end);
        let up_to_date = next >= view.tail;
        Ok(Response::new(proto::StreamReadResponse {
            records: messages.into_iter().map(|m| stream_record(&view.name, m)).collect(),
            next_offset: next,
            up_to_date,
            closed: up_to_date && view.closed,
        }))
    }

    type FollowStream = BoxStream<proto::StreamFollowResponse>;

    async fn follow(
        &self,
        request: Request<proto::StreamFollowRequest>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        let r = request.into_inner();
        let permit = self.followers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("too many followers of the log on this node")
        })?;
        let (tx, rx) = mpsc::channel(4);
        if r.name.is_empty() {
            self.api.barrier().await.map_err(refusal)?;
            // Fails at once when the start was trimmed.
            self.read_all(r.from_offset, 1)?;
            let service = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                service.follow_all(r.from_offset, tx).await;
            });
        } else {
            let view = self.readable_view(&r.name).await?;
            if r.from_offset > view.tail {
                return Err(Status::invalid_argument(format!(
                    "offset {} is beyond the stream's tail, {}",
                    r.from_offset, view.tail
                )));
            }
            let service = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                service.follow_one(view, r.from_offset, tx).await;
            });
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn describe(
        &self,
        request: Request<proto::DescribeStreamRequest>,
    ) -> Result<Response<proto::StreamInfo>, Status> {
        let view = self.readable_view(&request.into_inner().name).await?;
        Ok(Response::new(info(&view)))
    }

    async fn list(
        &self,
        request: Request<proto::ListStreamsRequest>,
    ) -> Result<Response<proto::ListStreamsResponse>, Status> {
        let r = request.into_inner();
        let limit = match r.limit {
            0 => LIST_DEFAULT,
            n => n.min(LIST_MAX),
        } as usize;
        self.api.barrier().await.map_err(refusal)?;
        let now = now_ms();
        let mut views: Vec<Arc<StreamView>> = self
            .api
            .shared
            .streams
            .read()
            .values()
            .filter(|v| {
                !v.soft_deleted
                    && !v.expired(now)
                    && v.name.starts_with(&r.prefix)
                    && v.name.as_str() > r.start_after.as_str()
            })
            .cloned()
            .collect();
        views.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let more = views.len() > limit;
        views.truncate(limit);
        Ok(Response::new(proto::ListStreamsResponse {
            streams: views.iter().map(|v| info(v)).collect(),
            more,
        }))
    }

    async fn close(
        &self,
        request: Request<proto::CloseStreamRequest>,
    ) -> Result<Response<proto::StreamAppendResponse>, Status> {
        let r = request.into_inner();
        check_name(&r.name)?;
        let cmd = Command::Append {
            name: r.name,
            now_ms: UNSTAMPED,
            content_type: None,
            messages: Vec::new(),
            close: true,
            producer: producer_of(r.producer)?,
            stream_seq: None,
            expected_version: None,
        };
        let outcome = self.api.command(cmd).await.map_err(refusal)?;
        append_response(outcome, 0).map(Response::new)
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteStreamRequest>,
    ) -> Result<Response<proto::DeleteStreamResponse>, Status> {
        let name = request.into_inner().name;
        check_name(&name)?;
        match self.api.command(Command::Delete { name, now_ms: UNSTAMPED }).await {
            Ok(StreamOutcome::Deleted) => Ok(Response::new(proto::DeleteStreamResponse {})),
            Ok(other) => Err(outcome_status(other, false)),
            Err(r) => Err(refusal(r)),
        }
    }
}

type FollowTx = mpsc::Sender<Result<proto::StreamFollowResponse, Status>>;

fn batch(records: Vec<proto::StreamRecord>, next: u64) -> proto::StreamFollowResponse {
    proto::StreamFollowResponse {
        event: Some(proto::stream_follow_response::Event::Records(proto::StreamRecordBatch {
            records,
            next_offset: next,
        })),
    }
}

fn caught_up(next: u64, closed: bool) -> proto::StreamFollowResponse {
    proto::StreamFollowResponse {
        event: Some(proto::stream_follow_response::Event::CaughtUp(proto::StreamCaughtUp {
            next_offset: next,
            closed,
        })),
    }
}

impl StreamsService {
    /// One stream from `next`: woken by the apply path (`streams_changed`), never by polling.
    async fn follow_one(&self, mut view: Arc<StreamView>, mut next: u64, tx: FollowTx) {
        let name = view.name.clone();
        let incarnation = view.incarnation;
        let mut changed = self.api.shared.streams_changed.subscribe();
        let mut stopping = self.api.stopping.clone();
        let caught_up_at = view.tail;
        let mut caught_up_sent = false;
        loop {
            let messages = match self.api.read(&view, next, FOLLOW_BATCH_BYTES) {
                Ok(m) => m,
                Err(r) => {
                    let _ = tx.send(Err(refusal(r))).await;
                    return;
                }
            };
            let progressed = !messages.is_empty();
            if let Some(last) = messages.last() {
                next = last.end;
                let records = messages.into_iter().map(|m| stream_record(&name, m)).collect();
                if tx.send(Ok(batch(records, next))).await.is_err() {
                    return;
                }
            }
            let closed = view.closed && next >= view.tail;
            if (!caught_up_sent && next >= caught_up_at) || closed {
                caught_up_sent = true;
                if tx.send(Ok(caught_up(next, closed))).await.is_err() || closed {
                    return;
                }
            }
            if !progressed && !wait_for_more(changed.changed(), &tx, &mut stopping).await {
                return;
            }
            view = match self.api.view(&name) {
                Some(v) if !v.soft_deleted && v.incarnation == incarnation => v,
                // Gone with this node's log restart (marked before the streams are dropped),
                // not by a delete: the follower resumes on another node.
                _ => {
                    let status = match self.api.check_state() {
                        Err(r) => refusal(r),
                        Ok(()) => Status::not_found("the stream was deleted"),
                    };
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
        }
    }

    /// Every record of the log from `next` (a log offset): woken as the node applies.
    async fn follow_all(&self, mut next: u64, tx: FollowTx) {
        let mut readable = self.api.shared.readable.subscribe();
        let mut stopping = self.api.stopping.clone();
        let caught_up_at = readable.borrow_and_update().0;
        let mut caught_up_sent = false;
        loop {
            let (records, to, _) = match self.read_all(next, FOLLOW_BATCH_BYTES) {
                Ok(x) => x,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let progressed = to > next;
            next = next.max(to);
            if !records.is_empty() {
                let records = records.into_iter().map(all_record).collect();
                if tx.send(Ok(batch(records, next))).await.is_err() {
                    return;
                }
            }
            if !caught_up_sent && next > caught_up_at {
                caught_up_sent = true;
                if tx.send(Ok(caught_up(next, false))).await.is_err() {
                    return;
                }
            }
            if !progressed && !wait_for_more(readable.changed(), &tx, &mut stopping).await {
                return;
            }
        }
    }
}
