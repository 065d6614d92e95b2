//! The gRPC API (`raftwal.v1`): appends go to the driver and complete at commit; reads and
//! follows are served from the WAL's maps up to the settled index, on any node.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use raftwal_client::proto::admin_server::{Admin, AdminServer};
use raftwal_client::proto::log_server::{Log, LogServer};
use raftwal_client::proto::{self, follow_response};
use raftwal_client::{
    TRAILER_FIRST_OFFSET, TRAILER_LEADER_ADDR, TRAILER_LEADER_ID, TRAILER_NEXT_OFFSET,
};
use raftwal_consensus::{ConfChange, ConfStep, LogIndex, NodeId, ProgressState, Role};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::config::NodeConfig;
use crate::core::{AppendReq, Outcome, Reply, Request as NodeRequest, RequestError};
use crate::envelope::{self, Addresses, ProducerSeq};
use crate::read;
use crate::shell::{DriverHandle, InflightGuard, Shared};

const READ_RECORDS_DEFAULT: u32 = 1000;
const READ_RECORDS_MAX: u32 = 10_000;
const READ_BYTES_DEFAULT: u32 = 4 << 20;
const READ_BYTES_MAX: u32 = 32 << 20;
/// Records per Follow message.
const FOLLOW_BATCH_RECORDS: u32 = 1000;
const FOLLOW_BATCH_BYTES: u32 = 1 << 20;

#[derive(Debug, Clone)]
struct Api {
    shared: Arc<Shared>,
    driver: DriverHandle,
    limits: Limits,
    followers: Arc<Semaphore>,
    /// One `Forward.StreamsState` at a time: each encodes the whole stream state on the
    /// driver's thread, so a flood of them must not stall it.
    state_permit: Arc<Semaphore>,
    /// Turns true when the node stops: long-lived streams end so clients resume elsewhere.
    stopping: watch::Receiver<bool>,
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    record_bytes_max: u64,
    request_bytes_max: u64,
    appends_inflight_max: u64,
    appends_inflight_bytes_max: u64,
    append_stream_window: u32,
    disk_free_min_bytes: u64,
}

/// Starts the gRPC server on `listener` until `shutdown` turns true.
pub fn serve(
    cfg: &NodeConfig,
    pem: &crate::node::TlsPem,
    shared: Arc<Shared>,
    driver: DriverHandle,
    streams: crate::streams_api::StreamsApi,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let api = Api {
        shared,
        driver,
        limits: Limits {
            record_bytes_max: cfg.record_bytes_max,
            request_bytes_max: cfg.request_bytes_max,
            appends_inflight_max: cfg.appends_inflight_max,
            appends_inflight_bytes_max: cfg.appends_inflight_bytes_max,
            append_stream_window: cfg.append_stream_window,
            disk_free_min_bytes: cfg.disk_free_min_bytes,
        },
        followers: Arc::new(Semaphore::new(cfg.followers_max as usize)),
        state_permit: Arc::new(Semaphore::new(1)),
        stopping: shutdown.clone(),
    };
    let message_bytes_max = (cfg.request_bytes_max as usize).saturating_add(1 << 20);
    let mut builder = tonic::transport::Server::builder();
    if !cfg.client_plaintext {
        let mut tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&pem.cert, &pem.key));
        if cfg.client_auth {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(&pem.ca));
        }
        builder = builder.tls_config(tls).context("client TLS configuration")?;
    }
    let router = builder
        .add_service(
            LogServer::new(api.clone())
                .max_decoding_message_size(message_bytes_max)
                .max_encoding_message_size(READ_BYTES_MAX as usize + (1 << 20)),
        )
        .add_service(AdminServer::new(api.clone()))
        .add_service(
            raftwal_client::proto::streams_server::StreamsServer::new(
                crate::streams_grpc::StreamsService::new(streams, api.followers.clone()),
            )
            .max_decoding_message_size(message_bytes_max)
            .max_encoding_message_size(READ_BYTES_MAX as usize + (1 << 20)),
        )
        .add_service(
            raftwal_client::proto::forward_server::ForwardServer::new(api)
                .max_decoding_message_size(message_bytes_max),
        );
    // At most `max_client_connections` open, TCP_NODELAY on each (conn_limit.rs).
    let incoming = crate::conn_limit::grpc_incoming(listener, cfg.max_client_connections as usize);
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!(error = %e, "the client API stopped");
        }
    }))
}

#[tonic::async_trait]
impl raftwal_client::proto::forward_server::Forward for Api {
    async fn stream_command(
        &self,
        request: Request<proto::StreamCommandRequest>,
    ) -> Result<Response<proto::StreamCommandResponse>, Status> {
        let data = Bytes::from(request.into_inner().command);
        let cmd = match envelope::decode(&data) {
            Ok(envelope::Payload::Stream(cmd)) => cmd,
            _ => return Err(Status::invalid_argument("not a stream command")),
        };
        // Whoever sent it, it must be a command this node's own API could have built: the log
        // entry must fit (else the WAL would refuse it and stop the node).
        let messages_max = crate::streams_api::messages_bytes_max(self.limits.record_bytes_max);
        cmd.check(messages_max).map_err(Status::invalid_argument)?;
        if cmd.adds_data() && self.shared.disk_low.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Status::resource_exhausted(
                "the leader's disk is under its free-space watermark: writes are refused",
            ));
        }
        let rx = self.submit(NodeRequest::Stream(cmd))?;
        match rx.await {
            Ok(Ok(Reply::Stream(outcome))) => {
                let outcome = serde_json::to_vec(&outcome)
                    .map_err(|e| Status::internal(format!("encode the outcome: {e}")))?;
                Ok(Response::new(proto::StreamCommandResponse { outcome }))
            }
            Ok(Ok(other)) => Err(unexpected(other)),
            Ok(Err(RequestError::NotLeader { .. })) => {
                Err(Status::failed_precondition("this node does not lead"))
            }
            Ok(Err(e)) => Err(status_of(&self.shared, e)),
            Err(_) => Err(Status::unknown("the node stopped; the outcome is unknown")),
        }
    }

    async fn streams_state(
        &self,
        request: Request<proto::StreamsStateRequest>,
    ) -> Result<Response<proto::StreamsStateResponse>, Status> {
        let at_least = LogIndex(request.into_inner().at_least);
        let _permit = self.state_permit.try_acquire().map_err(|_| {
            Status::resource_exhausted("another peer's stream state is being sent; retry")
        })?;
        let rx = self.submit(NodeRequest::StreamsState { at_least })?;
        match rx.await {
            Ok(Ok(Reply::StreamsState { at, state })) => {
                Ok(Response::new(proto::StreamsStateResponse { at: at.0, state: state.to_vec() }))
            }
            Ok(Ok(other)) => Err(unexpected(other)),
            Ok(Err(e)) => Err(Status::unavailable(e.to_string())),
            Err(_) => Err(Status::unavailable("the node stopped")),
        }
    }
}

/// A reply of the wrong kind for its request: a bug in the node, reported, never a panic.
fn unexpected(reply: Reply) -> Status {
    Status::internal(format!("the node answered with an unexpected reply: {reply:?}"))
}

fn status_of(shared: &Shared, e: RequestError) -> Status {
    let mut md = MetadataMap::new();
    let code = match &e {
        RequestError::NotLeader { leader } => {
            if let Some(l) = leader {
                md.insert(TRAILER_LEADER_ID, l.0.to_string().parse().expect("digits are ASCII"));
            }
            if let Some(addr) = shared.leader_addr(*leader)
                && let Ok(v) = addr.parse()
            {
                md.insert(TRAILER_LEADER_ADDR, v);
            }
            Code::Unavailable
        }
        RequestError::OffsetMismatch { next } => {
            md.insert(TRAILER_NEXT_OFFSET, next.0.to_string().parse().expect("digits are ASCII"));
            Code::FailedPrecondition
        }
        RequestError::Overloaded(_) => Code::ResourceExhausted,
        RequestError::Lost => Code::Aborted,
        RequestError::StaleSequence { .. } | RequestError::OutOfOrder { .. } => {
            Code::FailedPrecondition
        }
        RequestError::Invalid(_) => Code::InvalidArgument,
        RequestError::Stopped(_) => Code::Unavailable,
        RequestError::Unknown(_) => Code::Unknown,
    };
    Status::with_metadata(code, e.to_string(), md)
}

impl Api {
    /// Checks an append's limits; returns its record bytes.
    fn check_append(&self, req: &proto::AppendRequest) -> Result<u64, Status> {
        if req.records.is_empty() {
            return Err(Status::invalid_argument("an append needs at least one record"));
        }
        if req.records.len() as u64 > envelope::BATCH_RECORDS_MAX {
            return Err(Status::invalid_argument(format!(
                "the append has {} records; the limit is {}",
                req.records.len(),
                envelope::BATCH_RECORDS_MAX
            )));
        }
        let mut total = 0u64;
        for (i, r) in req.records.iter().enumerate() {
            if r.len() as u64 > self.limits.record_bytes_max {
                return Err(Status::invalid_argument(format!(
                    "record {i} is {} bytes; the limit is {} (record_bytes_max)",
                    r.len(),
                    self.limits.record_bytes_max
                )));
            }
            total += r.len() as u64;
        }
        if total > self.limits.request_bytes_max {
            return Err(Status::invalid_argument(format!(
                "the append is {total} bytes; the limit is {} (request_bytes_max)",
                self.limits.request_bytes_max
            )));
        }
        Ok(total)
    }

    /// Submits an append to the driver; the receiver completes at commit.
    fn submit_append(
        &self,
        req: proto::AppendRequest,
    ) -> Result<(oneshot::Receiver<Outcome>, InflightGuard), Status> {
        let bytes = self.check_append(&req)?;
        // Only a leader refuses for its disk: a follower answers "not leader" (below), which
        // sends the client to the leader, whose disk may have room.
        let leads = self.shared.status.read().role == raftwal_consensus::Role::Leader;
        if leads
            && let Some(why) = crate::disk::refusal(&self.shared, self.limits.disk_free_min_bytes)
        {
            metrics::counter!("raftwal_server_appends_refused_total", "reason" => "disk_low")
                .increment(1);
            return Err(Status::resource_exhausted(why));
        }
        let (guard, appends, inflight_bytes) = InflightGuard::new(self.shared.clone(), bytes);
        if appends >= self.limits.appends_inflight_max {
            return Err(Status::resource_exhausted("too many appends in flight on this node"));
        }
        if inflight_bytes + bytes > self.limits.appends_inflight_bytes_max {
            return Err(Status::resource_exhausted(
                "too many bytes of appends in flight on this node",
            ));
        }
        let request = NodeRequest::Append(AppendReq {
            records: req.records.into_iter().map(Bytes::from).collect(),
            expected_next: req.expected_next_offset.map(LogIndex),
            producer: req.producer.map(|p| ProducerSeq { id: p.id, sequence: p.sequence }),
        });
        Ok((self.submit(request)?, guard))
    }

    /// Submits a request to the driver; the receiver gets its outcome.
    fn submit(&self, request: NodeRequest) -> Result<oneshot::Receiver<Outcome>, Status> {
        self.driver.request(request).map_err(|e| status_of(&self.shared, e))
    }

    /// Waits for the outcome of a request that answers with an index.
    async fn index_outcome(
        rx: oneshot::Receiver<Outcome>,
        shared: &Shared,
    ) -> Result<LogIndex, Status> {
        match rx.await {
            Ok(Ok(Reply::Index(index))) => Ok(index),
            Ok(Ok(other)) => Err(unexpected(other)),
            Ok(Err(e)) => Err(status_of(shared, e)),
            Err(_) => Err(Status::unknown("the node stopped; the outcome is unknown")),
        }
    }

    fn answer(
        &self,
        r: Result<Outcome, oneshot::error::RecvError>,
        request_id: u64,
    ) -> Result<proto::AppendResponse, Status> {
        match r {
            Ok(Ok(Reply::Appended(ok))) => Ok(proto::AppendResponse {
                first_offset: ok.first.0,
                last_offset: ok.last.0,
                duplicate: ok.duplicate,
                request_id,
                error: None,
            }),
            Ok(Ok(other)) => Err(unexpected(other)),
            Ok(Err(e)) => Err(status_of(&self.shared, e)),
            Err(_) => Err(Status::unknown(
                "the node stopped before the append completed; its outcome is unknown",
            )),
        }
    }

    /// UNAVAILABLE (with the next offset) when `from` is beyond the end of this node's log:
    /// nothing was ever at that offset here. Another node may be ahead (the client tries it);
    /// if none is, the offset was never committed. (Before this, such a follow got a caught-up
    /// marker and then silence.)
    fn check_end(&self, from: LogIndex) -> Result<(), Status> {
        let readable = *self.shared.readable.borrow();
        let end = self.shared.status.read().last_index.max(readable).next();
        if from <= end {
            return Ok(());
        }
        let mut md = MetadataMap::new();
        md.insert(TRAILER_NEXT_OFFSET, end.0.to_string().parse().expect("digits are ASCII"));
        Err(Status::with_metadata(
            Code::Unavailable,
            format!("offset {from} is beyond the end of this node's log; its next offset is {end}"),
            md,
        ))
    }

    /// OUT_OF_RANGE (with the first offset) when `from` is below the log's start.
    fn check_start(&self, from: LogIndex) -> Result<(), Status> {
        let first = read::first_readable(&self.shared.wal, &self.shared.view.read());
        if from < first { Err(trimmed(from, first)) } else { Ok(()) }
    }

    /// Records in `[from, ...)` up to the settled index and the limits.
    fn read_records(
        &self,
        from: u64,
        max_records: u32,
        max_bytes: u32,
    ) -> Result<proto::ReadResponse, Status> {
        let readable = *self.shared.readable.borrow();
        let max_records =
            if max_records == 0 { READ_RECORDS_DEFAULT } else { max_records.min(READ_RECORDS_MAX) };
        let max_bytes =
            if max_bytes == 0 { READ_BYTES_DEFAULT } else { max_bytes.min(READ_BYTES_MAX) };
        let page = read::read_page(
            &self.shared.wal,
            || self.shared.view.read().clone(),
            readable,
            LogIndex(from),
            max_records as usize,
            u64::from(max_bytes),
        )
        .map_err(read_status)?;
        let records = page
            .records
            .into_iter()
            .map(|(offset, data)| proto::Record { offset: offset.0, data: data.to_vec() })
            .collect();
        Ok(proto::ReadResponse { records, next_offset: page.next.0, commit_offset: readable.0 })
    }
}

pub(crate) fn read_status(e: read::ReadError) -> Status {
    match e {
        read::ReadError::Trimmed { from, first } => trimmed(from, first),
        e => Status::internal(e.to_string()),
    }
}

/// How long a linearizable read waits for its barrier and for this node to apply up to it.
const READ_BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

impl Api {
    /// A ReadIndex round: returns once this node has applied everything a quorum confirmed
    /// committed when the read arrived.
    async fn read_barrier(&self) -> Result<(), Status> {
        let rx = self.submit(NodeRequest::ReadIndex)?;
        let index = match tokio::time::timeout(READ_BARRIER_TIMEOUT, rx).await {
            Ok(Ok(Ok(Reply::Index(index)))) => index,
            Ok(Ok(Ok(other))) => return Err(unexpected(other)),
            Ok(Ok(Err(e))) => return Err(status_of(&self.shared, e)),
            Ok(Err(_)) => return Err(Status::unavailable("the node stopped")),
            Err(_) => return Err(Status::unavailable("no leader confirmed the read in time")),
        };
        let mut readable = self.shared.readable.subscribe();
        match tokio::time::timeout(READ_BARRIER_TIMEOUT, readable.wait_for(|r| *r >= index)).await {
            Ok(Ok(_)) => Ok(()),
            _ => {
                Err(Status::unavailable(format!("this node did not apply offset {index} in time")))
            }
        }
    }
}

/// The answer to a read below the log's start `first`.
fn trimmed(from: LogIndex, first: LogIndex) -> Status {
    let mut md = MetadataMap::new();
    md.insert(TRAILER_FIRST_OFFSET, first.0.to_string().parse().expect("digits are ASCII"));
    Status::with_metadata(
        Code::OutOfRange,
        format!("offset {from} was trimmed; the log starts at {first}"),
        md,
    )
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What a live follow waits for when it has sent everything: `changed` (more to read), its
/// receiver leaving, or the node stopping (the receiver then hears where to go). False: end
/// the follow.
pub(crate) async fn wait_for_more<T>(
    changed: impl std::future::Future<Output = Result<(), watch::error::RecvError>>,
    tx: &mpsc::Sender<Result<T, Status>>,
    stopping: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        changed = changed => changed.is_ok(),
        () = tx.closed() => false,
        () = async { let _ = stopping.wait_for(|s| *s).await; } => {
            let _ = tx.send(Err(Status::unavailable("the node is stopping; resume elsewhere"))).await;
            false
        }
    }
}

#[tonic::async_trait]
impl Log for Api {
    async fn append(
        &self,
        request: Request<proto::AppendRequest>,
    ) -> Result<Response<proto::AppendResponse>, Status> {
        let started = std::time::Instant::now();
        let req = request.into_inner();
        let request_id = req.request_id;
        let (rx, _guard) = self.submit_append(req)?;
        let answer = self.answer(rx.await, request_id);
        metrics::histogram!("raftwal_server_append_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        if answer.is_err() {
            metrics::counter!("raftwal_server_appends_failed_total").increment(1);
        }
        answer.map(Response::new)
    }

    type AppendStreamStream = BoxStream<proto::AppendResponse>;

    async fn append_stream(
        &self,
        request: Request<Streaming<proto::AppendRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let window = self.limits.append_stream_window as usize;
        let (pending_tx, mut pending_rx) = mpsc::channel::<(
            u64,
            Result<(oneshot::Receiver<Outcome>, InflightGuard), Status>,
        )>(window);
        let (out_tx, out_rx) = mpsc::channel(window);
        let api = self.clone();
        // Reads requests while fewer than `window` are unanswered (the bounded channel).
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                let id = req.request_id;
                let submitted = api.submit_append(req);
                let failed = submitted.is_err();
                if pending_tx.send((id, submitted)).await.is_err() || failed {
                    break;
                }
            }
        });
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((id, submitted)) = pending_rx.recv().await {
                let answer = match submitted {
                    Ok((rx, _guard)) => api.answer(rx.await, id),
                    Err(status) => Err(status),
                };
                let (msg, stop) = match answer {
                    Ok(ok) => (ok, false),
                    Err(status) => (
                        proto::AppendResponse {
                            request_id: id,
                            error: Some(proto::Error {
                                code: status.code() as i32,
                                message: status.message().to_string(),
                                next_offset: status
                                    .metadata()
                                    .get(TRAILER_NEXT_OFFSET)
                                    .and_then(|v| v.to_str().ok()?.parse().ok()),
                                leader_id: status
                                    .metadata()
                                    .get(TRAILER_LEADER_ID)
                                    .and_then(|v| v.to_str().ok()?.parse().ok()),
                                leader_addr: status
                                    .metadata()
                                    .get(TRAILER_LEADER_ADDR)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string(),
                            }),
                            ..Default::default()
                        },
                        true,
                    ),
                };
                if out_tx.send(Ok(msg)).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn read(
        &self,
        request: Request<proto::ReadRequest>,
    ) -> Result<Response<proto::ReadResponse>, Status> {
        let r = request.into_inner();
        if r.linearizable {
            self.read_barrier().await?;
        }
        self.read_records(r.from_offset, r.max_records, r.max_bytes).map(Response::new)
    }

    type FollowStream = BoxStream<proto::FollowResponse>;

    async fn follow(
        &self,
        request: Request<proto::FollowRequest>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        let permit = self.followers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("too many followers of the log on this node")
        })?;
        let mut next = request.into_inner().from_offset.max(1);
        // Fail at once if the start is trimmed, or beyond anything this node's log holds.
        self.check_start(LogIndex(next))?;
        self.check_end(LogIndex(next))?;
        let (tx, rx) = mpsc::channel(4);
        let api = self.clone();
        let mut readable = self.shared.readable.subscribe();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let caught_up_at = *readable.borrow_and_update();
            let mut caught_up_sent = false;
            loop {
                let batch = match api.read_records(next, FOLLOW_BATCH_RECORDS, FOLLOW_BATCH_BYTES) {
                    Ok(b) => b,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let progressed = batch.next_offset > next;
                next = next.max(batch.next_offset);
                if !batch.records.is_empty() {
                    let msg = proto::FollowResponse {
                        event: Some(follow_response::Event::Records(proto::RecordBatch {
                            records: batch.records,
                            next_offset: next,
                        })),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                if !caught_up_sent && next > caught_up_at.0 {
                    caught_up_sent = true;
                    let msg = proto::FollowResponse {
                        event: Some(follow_response::Event::CaughtUp(proto::CaughtUp {
                            next_offset: next,
                        })),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                if !progressed && !wait_for_more(readable.changed(), &tx, &mut stopping).await {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        _: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        Ok(Response::new(status_response(&self.shared, self.limits.append_stream_window)))
    }
}

/// The node's status as the API reports it.
pub fn status_response(shared: &Shared, window: u32) -> proto::StatusResponse {
    let s = shared.status.read().clone();
    let addrs = shared.api_addrs.read().clone();
    let role = match s.role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::PreCandidate => "pre-candidate",
    };
    let m = &s.membership;
    let members = m
        .members()
        .into_iter()
        .map(|id| {
            let kind = if m.voters.contains(&id) {
                "voter"
            } else if m.voters_outgoing.contains(&id) {
                "voter (outgoing)"
            } else {
                "learner"
            };
            proto::Member {
                id: id.0,
                kind: kind.into(),
                addr: addrs.get(&id).cloned().unwrap_or_default(),
            }
        })
        .collect();
    let progress = s
        .progress
        .iter()
        .map(|(id, p)| proto::PeerProgress {
            id: id.0,
            match_offset: p.matched.0,
            next_offset: p.next.0,
            state: match p.state {
                ProgressState::Probe => "probe",
                ProgressState::Replicate => "replicate",
                ProgressState::Snapshot { .. } => "snapshot",
            }
            .into(),
            active: p.recent_active,
        })
        .collect();
    proto::StatusResponse {
        node_id: s.id.0,
        role: role.into(),
        term: s.term.0,
        leader_id: s.leader.map_or(0, |l| l.0),
        leader_addr: shared.leader_addr(s.leader).unwrap_or_default(),
        // The snapshot may be a tick old; what is applied is committed, so never show less.
        commit_offset: s.commit.0.max(shared.readable.borrow().0),
        applied_offset: shared.readable.borrow().0,
        first_offset: shared.wal.first_index().0,
        last_offset: s.last_index.0,
        members,
        progress,
        append_stream_window: window,
    }
}

impl Api {
    async fn conf(
        &self,
        change: ConfChange,
        addresses: Option<Addresses>,
    ) -> Result<Response<proto::MembershipResponse>, Status> {
        let rx = self.submit(NodeRequest::ConfChange { change, addresses })?;
        match Api::index_outcome(rx, &self.shared).await {
            Ok(index) => {
                // Answer once it is applied here, so the members listed include the change.
                let mut readable = self.shared.readable.subscribe();
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    readable.wait_for(|r| *r >= index),
                )
                .await;
                let members = status_response(&self.shared, 0).members;
                Ok(Response::new(proto::MembershipResponse { offset: index.0, members }))
            }
            Err(status) => Err(status),
        }
    }
}

#[tonic::async_trait]
impl Admin for Api {
    async fn add_learner(
        &self,
        request: Request<proto::AddLearnerRequest>,
    ) -> Result<Response<proto::MembershipResponse>, Status> {
        let r = request.into_inner();
        if r.node_id == 0 {
            return Err(Status::invalid_argument("node id 0 is reserved"));
        }
        let peer = r
            .peer_addr
            .parse()
            .map_err(|_| Status::invalid_argument(format!("bad peer address {:?}", r.peer_addr)))?;
        if r.api_addr.is_empty() || r.api_addr.len() > 255 {
            return Err(Status::invalid_argument("api_addr must be 1 to 255 bytes"));
        }
        let id = NodeId(r.node_id);
        if self.shared.status.read().membership.members().contains(&id) {
            // Its addresses would be replaced, and a voter demoted, by a typo.
            return Err(Status::failed_precondition(format!("node {id} is already a member")));
        }
        let addresses = Addresses { id, peer, api: r.api_addr };
        self.conf(ConfChange::Simple(ConfStep::AddLearner(id)), Some(addresses)).await
    }

    async fn promote(
        &self,
        request: Request<proto::PromoteRequest>,
    ) -> Result<Response<proto::MembershipResponse>, Status> {
        let id = NodeId(request.into_inner().node_id);
        if !self.shared.status.read().membership.is_learner(id) {
            return Err(Status::failed_precondition(format!("node {id} is not a learner")));
        }
        self.conf(ConfChange::Simple(ConfStep::AddVoter(id)), None).await
    }

    async fn remove(
        &self,
        request: Request<proto::RemoveRequest>,
    ) -> Result<Response<proto::MembershipResponse>, Status> {
        let id = NodeId(request.into_inner().node_id);
        if !self.shared.status.read().membership.members().contains(&id) {
            return Err(Status::failed_precondition(format!("node {id} is not a member")));
        }
        self.conf(ConfChange::Simple(ConfStep::Remove(id)), None).await
    }

    async fn transfer_leader(
        &self,
        request: Request<proto::TransferLeaderRequest>,
    ) -> Result<Response<proto::TransferLeaderResponse>, Status> {
        let to = NodeId(request.into_inner().to_node_id);
        let rx = self.submit(NodeRequest::Transfer { to })?;
        match rx.await {
            Ok(Ok(Reply::Done)) => {}
            Ok(Ok(other)) => return Err(unexpected(other)),
            Ok(Err(e)) => return Err(status_of(&self.shared, e)),
            Err(_) => return Err(Status::unknown("the node stopped; the outcome is unknown")),
        }
        for _ in 0..200 {
            let leader = self.shared.status.read().leader;
            if leader == Some(to) {
                return Ok(Response::new(proto::TransferLeaderResponse { leader_id: to.0 }));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(Status::deadline_exceeded(format!("leadership did not move to {to} within 5 s")))
    }

    async fn trim(
        &self,
        request: Request<proto::TrimRequest>,
    ) -> Result<Response<proto::TrimResponse>, Status> {
        let before = LogIndex(request.into_inner().before_offset);
        let rx = self.submit(NodeRequest::Trim { before })?;
        let first = Api::index_outcome(rx, &self.shared).await?;
        Ok(Response::new(proto::TrimResponse { first_offset: first.0 }))
    }
}
