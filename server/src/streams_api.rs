//! Named streams, whatever the wire: what the Durable Streams HTTP API (`streams_http`) and the
//! gRPC `Streams` service (`streams_grpc`) share. A command is proposed here or handed to the
//! leader (the `Forward` gRPC service, over the client API with the node's own certificate),
//! and answered with what applying it did; a read first passes a ReadIndex round, so a client
//! reads its own writes on any node. A refusal is a [`Refusal`], which each front end turns
//! into its own answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use bytes::Bytes;
use raftwal_consensus::LogIndex;
use tokio::sync::watch;

use crate::core::streams::{Command, StreamOutcome, StreamView};
use crate::core::{Reply, Request as NodeRequest, RequestError};
use crate::read::{self, StreamMessage};
use crate::shell::{DriverHandle, Shared};

/// How long a read waits for its barrier and for this node to apply up to it.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// Room a command's own fields take in its log entry, besides the messages.
const COMMAND_OVERHEAD_MAX: u64 = 8 << 10;
/// How long a command forwarded to the leader may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The time a command is built with: the leader's driver stamps its own just before proposing
/// (`shell`), whoever built the command, so nothing here reads a clock for it.
pub const UNSTAMPED: u64 = 0;

/// Why a streams request was refused, before or instead of a stream's own outcome: the HTTP
/// status it is (the gRPC service maps it to a code), whether a retry may succeed, and what
/// to tell the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: StatusCode,
    /// Retry after a pause (no leader, a leader change, overload).
    pub retry: bool,
    /// For the client.
    pub message: String,
    /// The request may have taken effect (the node stopped, or the leader did not answer).
    pub unknown: bool,
}

impl Refusal {
    /// A refusal that a retry will not change.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal { status, retry: false, message: message.into(), unknown: false }
    }

    /// 503: retry after a pause.
    pub fn unavailable(message: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            retry: true,
            message: message.into(),
            unknown: false,
        }
    }

    /// 503, and the request may have taken effect: a retry may repeat it.
    pub fn unknown(message: impl Into<String>) -> Refusal {
        Refusal { unknown: true, ..Refusal::unavailable(message) }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, message)
    }
}

/// What both front ends share: the node's state and driver, and the way to the leader.
#[derive(Clone, Debug)]
pub struct StreamsApi {
    pub(crate) shared: Arc<Shared>,
    driver: DriverHandle,
    /// How long a live read waits before answering that nothing came.
    pub(crate) long_poll: Duration,
    /// The most message bytes one command carries.
    pub(crate) body_bytes_max: u64,
    /// Creates are refused once this node knows this many streams.
    streams_max: u64,
    forward: Forwarder,
    /// Turns true when the node stops: live reads end.
    pub(crate) stopping: watch::Receiver<bool>,
}

impl StreamsApi {
    /// The API over a node's shared state and driver. `tls` (the cluster CA, this node's
    /// certificate and key) reaches the leader's client API; `None`: it is plaintext.
    pub fn new(
        shared: Arc<Shared>,
        driver: DriverHandle,
        long_poll: Duration,
        record_bytes_max: u64,
        streams_max: u64,
        tls: Option<&crate::node::TlsPem>,
        stopping: watch::Receiver<bool>,
    ) -> StreamsApi {
        let tls = tls.map(|pem| {
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&pem.ca))
                .identity(tonic::transport::Identity::from_pem(&pem.cert, &pem.key))
        });
        StreamsApi {
            shared,
            driver,
            long_poll,
            body_bytes_max: messages_bytes_max(record_bytes_max),
            streams_max,
            forward: Forwarder { tls, channels: Default::default() },
            stopping,
        }
    }

    /// The stream at `name` as this node last applied it (deleted ones too).
    pub fn view(&self, name: &str) -> Option<Arc<StreamView>> {
        self.shared.streams.read().get(name).cloned()
    }

    /// Proposes a command (here, or at the leader) and waits for what applying it did.
    pub async fn command(&self, cmd: Command) -> Result<StreamOutcome, Refusal> {
        cmd.check(self.body_bytes_max).map_err(Refusal::bad_request)?;
        if cmd.adds_data() && self.shared.disk_low.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Refusal::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "this node's disk is under its free-space watermark (disk_free_min_bytes): \
                 writes are refused until space comes back; reads go on",
            ));
        }
        if let Command::Create { name, .. } = &cmd
            && self.full(name).is_some()
        {
            // A follower may not have applied deletes a client already saw acknowledged.
            if !self.leads() {
                self.barrier().await?;
            }
            if let Some(held) = self.full(name) {
                return Err(Refusal::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    format!(
                        "this cluster holds {held} streams, its limit (streams_max): delete some first"
                    ),
                ));
            }
        }
        let answer = match self.driver.request(NodeRequest::Stream(cmd.clone())) {
            Ok(rx) => rx.await,
            Err(e) => Ok(Err(e)),
        };
        match answer {
            Ok(Ok(Reply::Stream(outcome))) => Ok(outcome),
            Ok(Err(RequestError::NotLeader { leader: Some(id) })) if id != self.shared.id => {
                let Some(addr) = self.shared.leader_addr(Some(id)) else {
                    return Err(node_error(&self.shared, RequestError::NotLeader { leader: None }));
                };
                self.forward.send(&addr, &cmd).await
            }
            Ok(Ok(other)) => Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("unexpected answer from the node: {other:?}"),
            )),
            Ok(Err(e)) => Err(node_error(&self.shared, e)),
            Err(_) => Err(Refusal::unknown("the node stopped; the outcome is unknown")),
        }
    }

    /// How many streams there are, if no new one `name` may be created (`streams_max`).
    fn full(&self, name: &str) -> Option<usize> {
        let streams = self.shared.streams.read();
        (streams.len() as u64 >= self.streams_max && !streams.contains_key(name))
            .then_some(streams.len())
    }

    /// A ReadIndex round, then this node applied everything it confirmed.
    pub async fn barrier(&self) -> Result<(), Refusal> {
        self.check_state()?;
        let rx =
            self.driver.request(NodeRequest::ReadIndex).map_err(|e| node_error(&self.shared, e))?;
        let index = match tokio::time::timeout(BARRIER_TIMEOUT, rx).await {
            Ok(Ok(Ok(Reply::Index(index)))) => index,
            Ok(Ok(Err(e))) => return Err(node_error(&self.shared, e)),
            _ => return Err(Refusal::unavailable("no leader confirmed the read")),
        };
        let mut readable = self.shared.readable.subscribe();
        match tokio::time::timeout(BARRIER_TIMEOUT, readable.wait_for(|r| *r >= index)).await {
            Ok(Ok(_)) => {}
            _ => return Err(Refusal::unavailable("this node did not catch up in time")),
        }
        // Catching up may have restarted this node's log (it was behind a trim): its stream
        // state is then missing until a peer's is installed.
        self.check_state()
    }

    /// 503 while this node's stream state is missing.
    pub fn check_state(&self) -> Result<(), Refusal> {
        if self.shared.streams_missing.borrow().is_some() {
            return Err(Refusal::unavailable(
                "this node is fetching the stream state from a peer (its log restarted at the \
                 leader's start); retry shortly or ask another node",
            ));
        }
        Ok(())
    }

    /// On a follower, waits until this node applied every write acknowledged before the
    /// request: a write that consults the local state (a stream's JSON mode, a fork's source)
    /// must see what the client already wrote through the leader.
    pub async fn catch_up_if_follower(&self) -> Result<(), Refusal> {
        if self.leads() { Ok(()) } else { self.barrier().await }
    }

    /// Whether this node leads.
    pub fn leads(&self) -> bool {
        self.shared.status.read().role == raftwal_consensus::Role::Leader
    }

    /// The stream at `name` for a read: 404 when missing or expired (by this node's clock),
    /// 410 when soft-deleted.
    pub fn live_view(&self, name: &str) -> Result<Arc<StreamView>, Refusal> {
        match self.view(name) {
            Some(v) if v.soft_deleted => {
                Err(Refusal::new(StatusCode::GONE, "the stream was deleted"))
            }
            Some(v) if !v.expired(now_ms()) => Ok(v),
            _ => Err(Refusal::new(StatusCode::NOT_FOUND, "no such stream")),
        }
    }

    /// A read refreshes a sliding time to live: a replicated touch (every node agrees when the
    /// stream expires), at most once per quarter of the window (every read would be a write
    /// otherwise).
    pub async fn touch_if_due(&self, view: &StreamView) -> Result<(), Refusal> {
        let Some(ttl) = view.ttl_secs else { return Ok(()) };
        if now_ms().saturating_sub(view.last_access_ms) < ttl.saturating_mul(250) {
            return Ok(());
        }
        let touch = Command::Touch { name: view.name.clone(), now_ms: UNSTAMPED };
        match self.command(touch).await? {
            StreamOutcome::NotFound => Err(Refusal::new(StatusCode::NOT_FOUND, "no such stream")),
            StreamOutcome::Gone => Err(Refusal::new(StatusCode::GONE, "the stream was deleted")),
            _ => Ok(()),
        }
    }

    /// The messages of `view` whose end is beyond `from`, about `bytes_max` bytes of them.
    pub fn read(
        &self,
        view: &StreamView,
        from: u64,
        bytes_max: u64,
    ) -> Result<Vec<StreamMessage>, Refusal> {
        let lookup = |name: &str| self.view(name);
        read::read_stream(&self.shared.wal, &lookup, view, from, bytes_max)
            .map_err(|e| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    }
}

/// The most message bytes one stream command carries: a log entry holds them and the
/// command's other fields.
pub fn messages_bytes_max(record_bytes_max: u64) -> u64 {
    record_bytes_max.min(crate::config::RECORD_BYTES_CEILING - COMMAND_OVERHEAD_MAX)
}

/// Milliseconds since the epoch by this node's clock.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What a refusal from the node becomes.
fn node_error(shared: &Shared, e: RequestError) -> Refusal {
    match e {
        RequestError::NotLeader { leader } => Refusal::unavailable(match leader {
            Some(id) => format!(
                "this node is not the leader; node {id} leads (client API at {})",
                shared.leader_addr(Some(id)).unwrap_or_default()
            ),
            None => "no leader is known; retry shortly".to_string(),
        }),
        RequestError::Overloaded(why) => Refusal::unavailable(format!("overloaded: {why}")),
        RequestError::Invalid(why) => Refusal::bad_request(why),
        // The command may still commit (its leader lost office with it in flight).
        RequestError::Unknown(why) => Refusal::unknown(why),
        e => Refusal::unavailable(e.to_string()),
    }
}

/// Hands commands to the leader's client API, one channel per address.
#[derive(Clone, Debug)]
struct Forwarder {
    tls: Option<tonic::transport::ClientTlsConfig>,
    channels: Arc<parking_lot::Mutex<HashMap<String, tonic::transport::Channel>>>,
}

impl Forwarder {
    fn channel(&self, addr: &str) -> Result<tonic::transport::Channel, String> {
        if let Some(c) = self.channels.lock().get(addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("the leader's address {addr}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']);
            endpoint = endpoint
                .tls_config(tls.clone().domain_name(host))
                .map_err(|e| format!("TLS to the leader at {addr}: {e}"))?;
        }
        let channel = endpoint.connect_lazy();
        self.channels.lock().insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// A peer's stream state and the index it was applied to.
    async fn streams_state(
        &self,
        addr: &str,
        at_least: LogIndex,
    ) -> Result<(LogIndex, Bytes), String> {
        let channel = self.channel(addr)?;
        let mut client = raftwal_client::proto::forward_client::ForwardClient::new(channel)
            .max_decoding_message_size(crate::store::STREAMS_BYTES_MAX as usize);
        let request = raftwal_client::proto::StreamsStateRequest { at_least: at_least.0 };
        match tokio::time::timeout(FORWARD_TIMEOUT, client.streams_state(request)).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                Ok((LogIndex(r.at), Bytes::from(r.state)))
            }
            Ok(Err(status)) => Err(format!("{addr}: {}", status.message())),
            Err(_) => Err(format!("{addr}: no answer in time")),
        }
    }

    async fn send(&self, addr: &str, cmd: &Command) -> Result<StreamOutcome, Refusal> {
        let channel = self.channel(addr).map_err(Refusal::unavailable)?;
        let mut client = raftwal_client::proto::forward_client::ForwardClient::new(channel)
            .max_encoding_message_size(usize::MAX);
        let request = raftwal_client::proto::StreamCommandRequest {
            command: crate::envelope::encode_stream(cmd).to_vec(),
        };
        let reply = match tokio::time::timeout(FORWARD_TIMEOUT, client.stream_command(request))
            .await
        {
            Ok(Ok(reply)) => reply.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                return Err(Refusal::unavailable("the leader changed; retry"));
            }
            Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                return Err(Refusal::bad_request(status.message()));
            }
            Ok(Err(status)) if status.code() == tonic::Code::ResourceExhausted => {
                return Err(Refusal::unavailable(status.message()));
            }
            Ok(Err(status)) => {
                self.channels.lock().remove(addr);
                return Err(Refusal::unknown(format!(
                    "the leader at {addr} did not take the request (its outcome may be unknown): {}",
                    status.message()
                )));
            }
            Err(_) => {
                return Err(Refusal::unknown(format!(
                    "the leader at {addr} did not answer in time; the outcome is unknown"
                )));
            }
        };
        serde_json::from_slice(&reply.outcome).map_err(|e| {
            Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the leader's answer: {e}"))
        })
    }
}

/// Streams whose expiry no command has touched would stay in memory for good: the leader
/// looks for them once a second and proposes their expiry (applied only if they have expired
/// by the command's time, so a stream touched meanwhile stays).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Expiries proposed per sweep at most.
const SWEEP_MAX: usize = 1000;

/// The leader's expiry sweep, until the node stops (the node runs it whether or not the HTTP
/// API is served: streams made over gRPC expire too).
pub async fn sweep_expired(api: StreamsApi) {
    let mut stopping = api.stopping.clone();
    loop {
        tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        if !api.leads() {
            continue;
        }
        let now = now_ms();
        let expired: Vec<String> = api
            .shared
            .streams
            .read()
            .values()
            .filter(|v| !v.soft_deleted && v.expired(now))
            .take(SWEEP_MAX)
            .map(|v| v.name.clone())
            .collect();
        for name in expired {
            // Not forwarded: only the leader sweeps; a refusal waits for the next sweep.
            if let Ok(rx) =
                api.driver.request(NodeRequest::Stream(Command::Expire { name, now_ms: UNSTAMPED }))
            {
                let _ = rx.await;
            }
        }
    }
}

/// How long a node whose stream state is missing waits between two rounds of asking its peers.
const FETCH_RETRY: Duration = Duration::from_millis(500);

/// While this node's stream state is missing (its log restarted at a leader's start), asks its
/// peers for theirs and installs the first applied to at least the index it needs (once this
/// node applied as far: its own log holds the commands after). Until the node stops.
pub async fn fetch_streams(api: StreamsApi) {
    let mut missing = api.shared.streams_missing.subscribe();
    let mut stopping = api.stopping.clone();
    loop {
        let need = *missing.borrow_and_update();
        let Some(at_least) = need else {
            tokio::select! {
                changed = missing.changed() => if changed.is_err() { return },
                () = async { let _ = stopping.wait_for(|s| *s).await; } => return,
            }
            continue;
        };
        let peers: Vec<(raftwal_consensus::NodeId, String)> = api
            .shared
            .api_addrs
            .read()
            .iter()
            .filter(|(id, _)| **id != api.shared.id)
            .map(|(id, addr)| (*id, addr.clone()))
            .collect();
        let mut why = Vec::new();
        for (peer, addr) in peers {
            match api.forward.streams_state(&addr, at_least).await {
                Ok((at, _)) if at < at_least => {
                    why.push(format!("node {peer} is applied only to {at}"));
                }
                Ok((at, state)) => {
                    // This node must have applied up to `at`: its log holds what follows.
                    let mut readable = api.shared.readable.subscribe();
                    let applied = tokio::time::timeout(
                        Duration::from_secs(30),
                        readable.wait_for(|r| *r >= at),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok());
                    if !applied {
                        why.push(format!("this node did not apply {at} in time"));
                        continue;
                    }
                    let request = NodeRequest::InstallStreams { at, state };
                    match api.driver.request(request) {
                        Ok(rx) => match rx.await {
                            Ok(Ok(_)) => {
                                tracing::info!(node = %peer, %at, "stream state fetched");
                                break;
                            }
                            Ok(Err(e)) => why.push(format!("install node {peer}'s: {e}")),
                            Err(_) => return,
                        },
                        Err(e) => why.push(format!("install: {e}")),
                    }
                }
                Err(e) => why.push(e),
            }
        }
        if api.shared.streams_missing.borrow().is_some() {
            tracing::warn!(%at_least, tried = ?why, "the stream state is still missing; asking the peers again");
            tokio::select! {
                () = tokio::time::sleep(FETCH_RETRY) => {}
                () = async { let _ = stopping.wait_for(|s| *s).await; } => return,
            }
        }
    }
}
