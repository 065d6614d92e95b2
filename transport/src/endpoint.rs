//! The endpoint: one QUIC connection per peer pair, three streams per direction, bounded
//! queues, reconnection, and validated inbound frames.
//!
//! Connections: the node with the lower id dials, the other accepts, so two nodes never race
//! to open two connections. The dialer checks the acceptor's certificate names the node it
//! dialed; the acceptor learns the dialer's id from its certificate and refuses dialers it does
//! not know (or that should be accepting instead). Both ends then open their own
//! unidirectional streams: control (votes, heartbeats, TimeoutNow, ReadIndex), replication
//! (appends and their answers, in order) and catch-up (log restarts), each opened with a
//! 16-byte header (`RWP1`, version, lane, sender id). The control stream has the highest send
//! priority, so a heartbeat never waits behind a large append.
//!
//! Restarts: a node killed without closing its connections (kill -9, power loss) leaves its
//! peers holding them until their idle timeout. Its stateless-reset and connection-id keys are
//! derived from its private key, so its next process answers the first packet of an old
//! connection with a QUIC stateless reset that the peer accepts, and the peer redials at once.
//!
//! Flow control: each peer has a bounded queue per lane (messages and bytes). When a queue is
//! full, [`Transport::send`] returns [`SendError::QueueFull`] and the caller reports the peer
//! unreachable to consensus (etcd's ReportUnreachable), instead of buffering without bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use metrics::{Counter, Gauge, counter, gauge};
use raftwal_consensus::{Message, MessageBody, NodeId};
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};

use crate::frame::{self, EncodedFrame, FrameLimits};
use crate::handshake::{
    CLOSE_PROTOCOL, CLOSE_SHUTDOWN, CLOSE_UNKNOWN_PEER, GREETING_BYTES, HELLO_KIND, PeerBook,
    PeerIdentity, STREAM_HEADER_BYTES, WELCOME_KIND, greeting, header_bytes, judge, parse_greeting,
    parse_header, refusal_of,
};
use crate::tls::{self, Identity, TlsError};

/// Which stream a message travels on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Lane {
    /// Votes, heartbeats, TimeoutNow, ReadIndex: small and latency-sensitive.
    Control = 0,
    /// Appends and their answers: large, long-lived, in order.
    Replication = 1,
    /// Log restarts for followers behind the leader's first index, and repair answers.
    CatchUp = 2,
}

const LANES: [Lane; 3] = [Lane::Control, Lane::Replication, Lane::CatchUp];

impl Lane {
    /// The lane a message belongs on.
    pub fn of(body: &MessageBody) -> Lane {
        match body {
            MessageBody::App { .. } | MessageBody::AppResp { .. } => Lane::Replication,
            MessageBody::InstallLog { .. }
            | MessageBody::RepairResp { .. }
            | MessageBody::RepairStart { .. } => Lane::CatchUp,
            _ => Lane::Control,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Lane::Control => "control",
            Lane::Replication => "replication",
            Lane::CatchUp => "catchup",
        }
    }

    fn priority(self) -> i32 {
        match self {
            Lane::Control => 2,
            Lane::Replication => 1,
            Lane::CatchUp => 0,
        }
    }
}

/// How long a peer may take to send a stream's header, its hello or its welcome before the
/// stream (or the connection) is refused.
const STREAM_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a transport needs. [`TransportConfig::new`] gives LAN defaults.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// This node.
    pub id: NodeId,
    /// The UDP address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// The peers and their addresses.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// This node's certificate, key and the cluster CA.
    pub identity: Identity,
    /// This node's cluster and data-directory incarnation, told to every peer; a peer of
    /// another cluster is refused.
    pub me: PeerIdentity,
    /// Which incarnation of each peer this node admits.
    pub book: Arc<dyn PeerBook>,
    /// Messages queued per peer and lane before sends are refused.
    pub queue_msgs_max: usize,
    /// Bytes queued per peer on the replication lane before sends are refused (control and
    /// catch-up lanes have `queue_msgs_max` and 4 MiB each).
    pub queue_bytes_max: u64,
    /// Received messages buffered before the transport stops reading (QUIC flow control then
    /// slows the senders).
    pub inbox_msgs_max: usize,
    /// Frame size limits for what we receive.
    pub limits: FrameLimits,
    /// First and last delay between reconnection attempts (doubling in between).
    pub reconnect_backoff_min: Duration,
    /// The cap on the reconnection delay.
    pub reconnect_backoff_max: Duration,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// A connection silent for this long is closed.
    pub idle_timeout: Duration,
    /// Per-stream receive window. Sized so one append window (the Raft inflight window, 32 MiB
    /// by default) is never throttled by a LAN round trip: 16 MiB per ~100 us RTT.
    pub stream_window_bytes: u32,
    /// Per-connection receive and send window (all streams together).
    pub connection_window_bytes: u32,
}

/// The QUIC server and client configurations the transport runs with (TLS, windows, timeouts),
/// for baselines and tools that need a plain quinn endpoint configured the same way.
pub fn quinn_configs(
    config: &TransportConfig,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), StartError> {
    let transport = Arc::new(quic_transport_config(config)?);
    let server = tls::server_config(&config.identity, transport.clone())?;
    let client = tls::client_config(&config.identity, transport)?;
    Ok((server, client))
}

fn quic_transport_config(config: &TransportConfig) -> Result<quinn::TransportConfig, StartError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(config.stream_window_bytes))
        .receive_window(quinn::VarInt::from_u32(config.connection_window_bytes))
        .send_window(u64::from(config.connection_window_bytes))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(0))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(16))
        .keep_alive_interval(Some(config.keep_alive))
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout)
                .map_err(|_| StartError::InvalidConfig { reason: "idle timeout out of range" })?,
        ));
    Ok(transport)
}

impl TransportConfig {
    /// LAN defaults: 4096 messages and 64 MiB per peer queue, 96 MiB frames, reconnect after
    /// 50 ms to 2 s, keep-alive 1 s, idle timeout 10 s, 16 MiB stream and 64 MiB connection
    /// windows.
    pub fn new(id: NodeId, listen: SocketAddr, identity: Identity) -> TransportConfig {
        TransportConfig {
            id,
            listen,
            peers: BTreeMap::new(),
            identity,
            me: PeerIdentity::default(),
            book: Arc::new(crate::handshake::AdmitAll),
            queue_msgs_max: 4096,
            queue_bytes_max: 64 << 20,
            inbox_msgs_max: 8192,
            limits: FrameLimits::default(),
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            stream_window_bytes: 16 << 20,
            connection_window_bytes: 64 << 20,
        }
    }
}

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The TLS identity was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("invalid transport config: {reason}")]
    InvalidConfig {
        /// Why.
        reason: &'static str,
    },
}

/// Why a message was not queued. Report the peer unreachable to consensus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// The recipient is not a known peer.
    #[error("unknown peer {0}")]
    UnknownPeer(NodeId),
    /// The peer's queue for this lane is full.
    #[error("send queue to {peer} ({lane:?}) is full")]
    QueueFull {
        /// The peer.
        peer: NodeId,
        /// The lane.
        lane: Lane,
    },
    /// The transport is shut down.
    #[error("transport is shut down")]
    Closed,
}

struct LaneMetrics {
    sent_bytes: Counter,
    sent_msgs: Counter,
    received_bytes: Counter,
    received_msgs: Counter,
    queue_msgs: Gauge,
    queue_bytes: Gauge,
    queue_full: Counter,
}

impl LaneMetrics {
    fn new(peer: NodeId, lane: Lane) -> LaneMetrics {
        let labels = [("peer", peer.to_string()), ("stream", lane.name().to_string())];
        LaneMetrics {
            sent_bytes: counter!("raftwal_transport_sent_bytes_total", &labels),
            sent_msgs: counter!("raftwal_transport_sent_messages_total", &labels),
            received_bytes: counter!("raftwal_transport_received_bytes_total", &labels),
            received_msgs: counter!("raftwal_transport_received_messages_total", &labels),
            queue_msgs: gauge!("raftwal_transport_queue_messages", &labels),
            queue_bytes: gauge!("raftwal_transport_queue_bytes", &labels),
            queue_full: counter!("raftwal_transport_queue_full_total", &labels),
        }
    }
}

struct LaneQueue {
    tx: mpsc::Sender<EncodedFrame>,
    queued_bytes: AtomicU64,
    bytes_max: u64,
    metrics: LaneMetrics,
}

struct Peer {
    id: NodeId,
    addr: Mutex<SocketAddr>,
    lanes: [LaneQueue; 3],
    /// The live connection, if any; writers wait on it.
    conn: watch::Sender<Option<quinn::Connection>>,
    stop: watch::Sender<bool>,
    reconnects: Counter,
    rtt_seconds: Gauge,
}

struct Shared {
    id: NodeId,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    peers: Mutex<BTreeMap<NodeId, Arc<Peer>>>,
    inbox: mpsc::Sender<Message>,
    limits: FrameLimits,
    queue_msgs_max: usize,
    queue_bytes_max: u64,
    backoff: (Duration, Duration),
    shutdown: watch::Sender<bool>,
    rejected: RejectMetrics,
    me: PeerIdentity,
    book: Arc<dyn PeerBook>,
    /// Set when a peer refused this node for its cluster or its data directory.
    refusal: watch::Sender<Option<String>>,
}

struct RejectMetrics {
    handshake: Counter,
    unknown_peer: Counter,
    stream_header: Counter,
    frame: Counter,
    sender: Counter,
    identity: Counter,
}

/// A running transport. Dropping it without [`Transport::shutdown`] leaves its tasks running
/// until the runtime stops.
pub struct Transport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("id", &self.shared.id).finish_non_exhaustive()
    }
}

impl Transport {
    /// Binds the endpoint and starts connecting to the peers. Returns the transport and the
    /// receiver of inbound messages (already checked: from a verified peer, to this node).
    /// Must be called inside a tokio runtime.
    pub fn start(
        config: TransportConfig,
    ) -> Result<(Transport, mpsc::Receiver<Message>), StartError> {
        if config.queue_msgs_max == 0 || config.inbox_msgs_max == 0 || config.queue_bytes_max == 0 {
            return Err(StartError::InvalidConfig { reason: "queue limits must be positive" });
        }
        let (server_config, client_config) = quinn_configs(&config)?;
        let socket = std::net::UdpSocket::bind(config.listen)
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        // Both keys survive a restart (they come from the node's private key): the restarted
        // process recognises its predecessor's connection ids and resets those connections, so
        // a peer that kept one after a kill -9 redials at once (see the module docs).
        let mut endpoint_config =
            quinn::EndpointConfig::new(Arc::new(config.identity.stateless_reset_key()));
        let cid_key = config.identity.connection_id_key();
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let (inbox_tx, inbox_rx) = mpsc::channel(config.inbox_msgs_max);
        let reject =
            |reason: &'static str| counter!("raftwal_transport_rejected_total", "reason" => reason);
        let shared = Arc::new(Shared {
            id: config.id,
            endpoint,
            client_config,
            peers: Mutex::new(BTreeMap::new()),
            inbox: inbox_tx,
            limits: config.limits,
            queue_msgs_max: config.queue_msgs_max,
            queue_bytes_max: config.queue_bytes_max,
            backoff: (config.reconnect_backoff_min, config.reconnect_backoff_max),
            shutdown: watch::Sender::new(false),
            rejected: RejectMetrics {
                handshake: reject("handshake"),
                unknown_peer: reject("unknown_peer"),
                stream_header: reject("stream_header"),
                frame: reject("frame"),
                sender: reject("sender"),
                identity: reject("identity"),
            },
            me: config.me,
            book: config.book.clone(),
            refusal: watch::Sender::new(None),
        });
        tokio::spawn(accept_loop(shared.clone()));
        let transport = Transport { shared };
        for (id, addr) in config.peers {
            transport.add_peer(id, addr);
        }
        Ok((transport, inbox_rx))
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.endpoint.local_addr().expect("a bound endpoint has an address")
    }

    /// Starts talking to `id` at `addr` (or updates its address).
    pub fn add_peer(&self, id: NodeId, addr: SocketAddr) {
        let shared = &self.shared;
        let mut peers = shared.peers.lock().expect("peers lock");
        if let Some(peer) = peers.get(&id) {
            *peer.addr.lock().expect("addr lock") = addr;
            return;
        }
        if id == shared.id {
            return;
        }
        let mut receivers = Vec::new();
        let lanes = LANES.map(|lane| {
            let (tx, rx) = mpsc::channel(shared.queue_msgs_max);
            receivers.push((lane, rx));
            let bytes_max =
                if lane == Lane::Replication { shared.queue_bytes_max } else { 4 << 20 };
            LaneQueue {
                tx,
                queued_bytes: AtomicU64::new(0),
                bytes_max,
                metrics: LaneMetrics::new(id, lane),
            }
        });
        let peer = Arc::new(Peer {
            id,
            addr: Mutex::new(addr),
            lanes,
            conn: watch::Sender::new(None),
            stop: watch::Sender::new(false),
            reconnects: counter!("raftwal_transport_reconnects_total", "peer" => id.to_string()),
            rtt_seconds: gauge!("raftwal_transport_rtt_seconds", "peer" => id.to_string()),
        });
        for (lane, rx) in receivers {
            tokio::spawn(write_lane(shared.clone(), peer.clone(), lane, rx));
        }
        if shared.id < id {
            tokio::spawn(dial_loop(shared.clone(), peer.clone()));
        }
        peers.insert(id, peer);
    }

    /// Stops talking to `id`: its queues are dropped and its connection closed.
    pub fn remove_peer(&self, id: NodeId) {
        let peer = self.shared.peers.lock().expect("peers lock").remove(&id);
        if let Some(peer) = peer {
            peer.stop.send_replace(true);
            if let Some(conn) = peer.conn.send_replace(None) {
                conn.close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"removed");
            }
        }
    }

    /// Queues `msg` for its recipient. Never blocks; a full queue is an error the caller turns
    /// into `report_unreachable`.
    pub fn send(&self, msg: &Message) -> Result<(), SendError> {
        if *self.shared.shutdown.borrow() {
            return Err(SendError::Closed);
        }
        let peer = self.shared.peers.lock().expect("peers lock").get(&msg.to).cloned();
        let peer = peer.ok_or(SendError::UnknownPeer(msg.to))?;
        let lane = Lane::of(&msg.body);
        let queue = &peer.lanes[lane as usize];
        let frame = frame::encode(msg);
        let len = frame.len() as u64;
        let queued = queue.queued_bytes.load(Ordering::Relaxed);
        // One frame larger than the limit may go when nothing is queued, or it never could.
        if queued > 0 && queued + len > queue.bytes_max {
            queue.metrics.queue_full.increment(1);
            return Err(SendError::QueueFull { peer: msg.to, lane });
        }
        match queue.tx.try_send(frame) {
            Ok(()) => {
                queue.queued_bytes.fetch_add(len, Ordering::Relaxed);
                queue.metrics.queue_msgs.increment(1.0);
                queue.metrics.queue_bytes.increment(len as f64);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                queue.metrics.queue_full.increment(1);
                Err(SendError::QueueFull { peer: msg.to, lane })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        }
    }

    /// Bytes queued to `peer` on `lane`, not yet written to its stream.
    pub fn queued_bytes(&self, peer: NodeId, lane: Lane) -> Option<u64> {
        let peers = self.shared.peers.lock().expect("peers lock");
        peers.get(&peer).map(|p| p.lanes[lane as usize].queued_bytes.load(Ordering::Relaxed))
    }

    /// Set (with the reason) when a peer refused this node for belonging to another cluster or
    /// for a data directory it does not know as this node's: the node must not go on as a
    /// voter.
    pub fn refusal(&self) -> watch::Receiver<Option<String>> {
        self.shared.refusal.subscribe()
    }

    /// Whether a connection to `peer` is up.
    pub fn is_connected(&self, peer: NodeId) -> bool {
        let peers = self.shared.peers.lock().expect("peers lock");
        peers.get(&peer).is_some_and(|p| p.conn.borrow().is_some())
    }

    /// Closes every connection and stops every task; waits briefly for peers to be told.
    pub async fn shutdown(self) {
        self.shared.shutdown.send_replace(true);
        let peers: Vec<Arc<Peer>> =
            std::mem::take(&mut *self.shared.peers.lock().expect("peers lock"))
                .into_values()
                .collect();
        for peer in peers {
            peer.stop.send_replace(true);
        }
        self.shared.endpoint.close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"shutdown");
        let _ =
            tokio::time::timeout(Duration::from_secs(1), self.shared.endpoint.wait_idle()).await;
    }
}

/// Resolves when either the transport or this peer is stopped.
async fn stopped(shared: &Shared, peer: &Peer) {
    let mut global = shared.shutdown.subscribe();
    let mut own = peer.stop.subscribe();
    tokio::select! {
        _ = global.wait_for(|s| *s) => {}
        _ = own.wait_for(|s| *s) => {}
    }
}

async fn dial_loop(shared: Arc<Shared>, peer: Arc<Peer>) {
    let (backoff_min, backoff_max) = shared.backoff;
    let mut backoff = backoff_min;
    let mut connected_before = false;
    loop {
        let addr = *peer.addr.lock().expect("addr lock");
        let attempt = async {
            let connecting = shared
                .endpoint
                .connect_with(shared.client_config.clone(), addr, &tls::node_name(peer.id))
                .ok()?;
            connecting.await.ok()
        };
        let conn = tokio::select! {
            conn = attempt => conn,
            () = stopped(&shared, &peer) => return,
        };
        // Connected only once the acceptor has identified us and welcomed us, and we it.
        let conn = match conn {
            Some(conn) => tokio::select! {
                welcomed = greet_acceptor(&shared, &conn, peer.id) => welcomed.then_some(conn),
                () = stopped(&shared, &peer) => return,
            },
            None => None,
        };
        match conn {
            Some(conn) => {
                if connected_before {
                    peer.reconnects.increment(1);
                }
                connected_before = true;
                backoff = backoff_min;
                serve_connection(&shared, &peer, conn).await;
                if *shared.shutdown.borrow() || *peer.stop.borrow() {
                    return;
                }
            }
            None => backoff = (backoff * 2).min(backoff_max),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&shared, &peer) => return,
        }
    }
}

/// Publishes `conn` to the peer's writers, reads its inbound streams until it closes, then
/// withdraws it.
async fn serve_connection(shared: &Arc<Shared>, peer: &Arc<Peer>, conn: quinn::Connection) {
    if let Some(old) = peer.conn.send_replace(Some(conn.clone())) {
        old.close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"replaced");
    }
    let streams = async {
        while let Ok(recv) = conn.accept_uni().await {
            tokio::spawn(read_stream(shared.clone(), peer.clone(), conn.clone(), recv));
        }
    };
    let rtt = async {
        loop {
            peer.rtt_seconds.set(conn.rtt().as_secs_f64());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        () = streams => {}
        () = rtt => {}
        () = stopped(shared, peer) => conn.close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"stopped"),
    }
    peer.conn.send_if_modified(|current| {
        if current.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
            *current = None;
            true
        } else {
            false
        }
    });
}

async fn accept_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let incoming = tokio::select! {
            incoming = shared.endpoint.accept() => incoming,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Some(incoming) = incoming else { return };
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else {
                // Refused by TLS (no certificate, another CA, expired) or garbage.
                shared.rejected.handshake.increment(1);
                return;
            };
            let Some(peer) = identify(&shared, &conn) else {
                shared.rejected.unknown_peer.increment(1);
                conn.close(quinn::VarInt::from_u32(CLOSE_UNKNOWN_PEER), b"unknown peer");
                return;
            };
            // The dialer's hello is its first stream; our welcome is our first, opened before
            // the writers can open theirs, so it is the first stream the dialer accepts.
            let Some(theirs) = read_greeting(&conn, HELLO_KIND, peer.id).await else {
                shared.rejected.stream_header.increment(1);
                conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), b"no hello");
                return;
            };
            if !admit(&shared, &conn, peer.id, theirs).await {
                return;
            }
            if !send_greeting(&shared, &conn, WELCOME_KIND).await {
                conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), b"welcome not sent");
                return;
            }
            serve_connection(&shared, &peer, conn.clone()).await;
            // The dialer may refuse our welcome (it knows another data directory as ours).
            note_refusal(&shared, &conn, peer.id);
        });
    }
}

/// The known, lower-id peer the dialer's certificate names, if any.
fn identify(shared: &Shared, conn: &quinn::Connection) -> Option<Arc<Peer>> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = certs.first()?;
    let peers = shared.peers.lock().expect("peers lock");
    peers.values().find(|p| p.id < shared.id && tls::cert_names_node(leaf, p.id)).cloned()
}

async fn read_stream(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    conn: quinn::Connection,
    mut recv: quinn::RecvStream,
) {
    let protocol_error = |reason: &'static [u8]| {
        conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), reason);
    };
    let mut header = [0u8; STREAM_HEADER_BYTES];
    let read = tokio::time::timeout(STREAM_HEADER_TIMEOUT, recv.read_exact(&mut header)).await;
    let lane = match read {
        Ok(Ok(())) => parse_stream_header(&header, peer.id),
        _ => None,
    };
    let Some(lane) = lane else {
        shared.rejected.stream_header.increment(1);
        protocol_error(b"bad stream header");
        return;
    };
    let metrics = &peer.lanes[lane as usize].metrics;
    loop {
        let mut prefix = [0u8; 4];
        match recv.read_exact(&mut prefix).await {
            Ok(()) => {}
            // A clean end of stream, or the connection went away: nothing to refuse.
            Err(_) => return,
        }
        let len = match frame::frame_len(prefix, &shared.limits) {
            Ok(len) => len,
            Err(_) => {
                shared.rejected.frame.increment(1);
                protocol_error(b"bad frame length");
                return;
            }
        };
        // Allocated only after the limit check above.
        let mut buf = BytesMut::zeroed(4 + len);
        buf[..4].copy_from_slice(&prefix);
        if recv.read_exact(&mut buf[4..]).await.is_err() {
            return;
        }
        let msg = match frame::decode(buf.freeze(), &shared.limits) {
            Ok(msg) => msg,
            Err(_) => {
                shared.rejected.frame.increment(1);
                protocol_error(b"bad frame");
                return;
            }
        };
        if msg.from != peer.id || msg.to != shared.id || Lane::of(&msg.body) != lane {
            shared.rejected.sender.increment(1);
            protocol_error(b"message names another sender, recipient or stream");
            return;
        }
        metrics.received_bytes.increment(4 + len as u64);
        metrics.received_msgs.increment(1);
        if shared.inbox.send(msg).await.is_err() {
            return;
        }
    }
}

fn stream_header(lane: Lane, from: NodeId) -> [u8; STREAM_HEADER_BYTES] {
    header_bytes(lane as u8, from)
}

fn parse_stream_header(header: &[u8; STREAM_HEADER_BYTES], expected: NodeId) -> Option<Lane> {
    LANES.get(parse_header(header, expected)? as usize).copied()
}

/// Reads the greeting of `kind` that `peer` opens this connection with (its first stream).
async fn read_greeting(conn: &quinn::Connection, kind: u8, peer: NodeId) -> Option<PeerIdentity> {
    let read = async {
        let mut recv = conn.accept_uni().await.ok()?;
        let mut bytes = [0u8; GREETING_BYTES];
        recv.read_exact(&mut bytes).await.ok()?;
        parse_greeting(&bytes, kind, peer)
    };
    tokio::time::timeout(STREAM_HEADER_TIMEOUT, read).await.ok().flatten()
}

/// Opens a stream with our greeting of `kind` and ends it.
async fn send_greeting(shared: &Shared, conn: &quinn::Connection, kind: u8) -> bool {
    let bytes = greeting(kind, shared.id, shared.me);
    let mut send = match conn.open_uni().await {
        Ok(s) => s,
        Err(_) => return false,
    };
    send.write_all(&bytes).await.is_ok() && send.finish().is_ok()
}

/// Checks `peer`'s greeting; closes the connection with the reason when it is refused.
async fn admit(
    shared: &Shared,
    conn: &quinn::Connection,
    peer: NodeId,
    theirs: PeerIdentity,
) -> bool {
    // The book may write and sync a file (a peer's first incarnation): off the async workers.
    let (book, me) = (shared.book.clone(), shared.me);
    let verdict = tokio::task::spawn_blocking(move || judge(book.as_ref(), me, peer, theirs))
        .await
        .unwrap_or_else(|_| Some((CLOSE_PROTOCOL, "the peer book panicked".to_string())));
    match verdict {
        None => true,
        Some((code, why)) => {
            tracing::error!(%peer, %why, "refused a peer");
            shared.rejected.identity.increment(1);
            conn.close(quinn::VarInt::from_u32(code), why.as_bytes());
            false
        }
    }
}

/// The dialer's side: say hello, then wait for the acceptor's welcome and check it. False if
/// the acceptor refused us (then [`Transport::refusal`] says why), said nothing in time, or we
/// refuse it.
async fn greet_acceptor(shared: &Shared, conn: &quinn::Connection, peer: NodeId) -> bool {
    let welcomed = if send_greeting(shared, conn, HELLO_KIND).await {
        read_greeting(conn, WELCOME_KIND, peer).await
    } else {
        None
    };
    match welcomed {
        Some(theirs) => admit(shared, conn, peer, theirs).await,
        None => {
            // Let a close that is on its way arrive, to learn why.
            let _ = tokio::time::timeout(Duration::from_millis(200), conn.closed()).await;
            note_refusal(shared, conn, peer);
            conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), b"no welcome");
            false
        }
    }
}

/// Records that `peer` refused us for our cluster or our data directory, if it did.
fn note_refusal(shared: &Shared, conn: &quinn::Connection, peer: NodeId) {
    if let Some(why) = refusal_of(conn) {
        tracing::error!(%peer, %why, "a peer refuses this node");
        shared.refusal.send_replace(Some(format!("node {peer} refuses this node: {why}")));
    }
}

async fn write_lane(
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    lane: Lane,
    mut rx: mpsc::Receiver<EncodedFrame>,
) {
    let queue = &peer.lanes[lane as usize];
    let mut conn_rx = peer.conn.subscribe();
    let mut stream: Option<(usize, quinn::SendStream)> = None;
    loop {
        // Wait for a connection before taking a frame, so that while the peer is away the queue
        // holds exactly `queue_msgs_max` frames and senders are told the peer is unreachable.
        let conn = tokio::select! {
            conn = conn_rx.wait_for(Option::is_some) => conn.ok().and_then(|c| c.clone()),
            () = stopped(&shared, &peer) => return,
        };
        let Some(conn) = conn else { return };
        let frame = tokio::select! {
            frame = rx.recv() => frame,
            // The connection went or was replaced: wait for the current one first.
            _ = conn_rx.changed() => continue,
            () = stopped(&shared, &peer) => return,
        };
        let Some(frame) = frame else { return };
        let len = frame.len() as u64;
        if stream.as_ref().is_none_or(|(id, _)| *id != conn.stable_id()) {
            stream = open_stream(&conn, lane, shared.id).await.map(|s| (conn.stable_id(), s));
        }
        if let Some((_, send)) = stream.as_mut() {
            let mut chunks: Vec<Bytes> = Vec::with_capacity(1 + frame.payloads.len());
            chunks.push(frame.head);
            chunks.extend(frame.payloads);
            if send.write_all_chunks(&mut chunks).await.is_ok() {
                queue.metrics.sent_bytes.increment(len);
                queue.metrics.sent_msgs.increment(1);
            } else {
                // The connection broke; Raft resends what matters. The next frame waits for
                // a new connection.
                stream = None;
            }
        }
        queue.queued_bytes.fetch_sub(len, Ordering::Relaxed);
        queue.metrics.queue_msgs.decrement(1.0);
        queue.metrics.queue_bytes.decrement(len as f64);
    }
}

async fn open_stream(
    conn: &quinn::Connection,
    lane: Lane,
    from: NodeId,
) -> Option<quinn::SendStream> {
    let mut send = conn.open_uni().await.ok()?;
    send.set_priority(lane.priority()).ok()?;
    send.write_all(&stream_header(lane, from)).await.ok()?;
    Some(send)
}
