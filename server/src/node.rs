//! Starting and stopping a node: recover the WAL (refusing to start on corruption), bootstrap
//! or join, start the transport, the driver thread, the gRPC API and the HTTP admin port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use parking_lot::RwLock;
use raftwal_consensus::{Config, GroupId, LogIndex, NodeId, RawNode, Restored, Term, bootstrap};
use raftwal_transport::{Identity, PeerIdentity, Transport, TransportConfig};
use raftwal_wal::storage::{FsStorage, Storage};
use raftwal_wal::{Options as WalOptions, Salvage, Wal};
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::core::{CoreConfig, Members, NodeCore, ReadView};
use crate::envelope::Addresses;
use crate::identity::{self, KnownPeers};
use crate::shell::{self, DriverFailure, DriverHandle, DriverParts, NodeStorage, Shared};
use crate::store::{self, WalStore};
use crate::{api, http};

/// Events that may queue for the driver before new ones are refused as overload.
const DRIVER_QUEUE_EVENTS_MAX: usize = 65_536;

/// A running node.
#[derive(Debug)]
pub struct Node {
    /// Its shared state.
    pub shared: Arc<Shared>,
    /// Submits events to its driver.
    pub driver: DriverHandle,
    /// The bound client API address.
    pub api_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// The bound peer address.
    pub peer_addr: SocketAddr,
    /// The bound Durable Streams HTTP address, if served.
    pub streams_addr: Option<SocketAddr>,
    driver_thread: Option<std::thread::JoinHandle<(Result<(), DriverFailure>, Transport)>>,
    shutdown: watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

/// Everything from the config that is read from disk first.
/// The node's certificates as read from disk once, for the peer transport and the client API.
#[derive(Debug)]
pub struct TlsPem {
    /// The cluster CA certificate.
    pub ca: String,
    /// This node's certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

fn load_tls(cfg: &NodeConfig) -> anyhow::Result<TlsPem> {
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read_to_string(p).with_context(|| {
            format!("cannot read the {what} {} (run `raftwal certs init`)", p.display())
        })
    };
    Ok(TlsPem {
        ca: read(&cfg.tls_ca, "CA certificate")?,
        cert: read(&cfg.tls_cert, "node certificate")?,
        key: read(&cfg.tls_key, "node key")?,
    })
}

impl Node {
    /// Starts a node. Must be called inside a multi-threaded tokio runtime.
    pub async fn start(cfg: NodeConfig) -> anyhow::Result<Node> {
        cfg.validate()?;
        let id = NodeId(cfg.id);
        let pem = load_tls(&cfg)?;
        let identity =
            Identity::from_pem(&pem.ca, &pem.cert, &pem.key).context("the node's TLS identity")?;
        let peers = cfg.parsed_peers()?;
        let (dir, me) = open_data_dir(&cfg)?;
        let book = Arc::new(KnownPeers::load(dir.clone())?);
        // With peers, damage is cut away and fetched again from them; a node alone holds the
        // only copy and refuses to start on damage.
        let repairable = !peers.is_empty() || cfg.join;
        let wal = open_wal(&cfg, &peers, dir.as_ref(), repairable)?;
        let floor = prepare_repair(&wal, dir.as_ref(), repairable)?;
        let (rc, core_config) = core_configs(&cfg);
        let (core, start_addresses) =
            recover_core(wal.clone(), dir.as_ref(), rc, core_config, floor)?;

        let mut tc = TransportConfig::new(id, cfg.peer_listen, identity);
        tc.me = me;
        tc.book = book.clone();
        tc.peers.extend(peers.iter().map(|p| (p.id, p.peer_addr)));
        tc.peers.extend(start_addresses.iter().filter(|a| a.id != id).map(|a| (a.id, a.peer)));
        let (transport, mut inbox) =
            start_transport(tc).await.context("start the peer transport")?;
        let peer_addr = transport.local_addr();
        let refusal = transport.refusal();

        let mut api_addrs: BTreeMap<NodeId, String> =
            peers.iter().map(|p| (p.id, p.api_addr.clone())).collect();
        api_addrs.extend(start_addresses.iter().map(|a| (a.id, a.api.clone())));
        let shared = Arc::new(new_shared(id, wal.clone(), core.status()));
        let (driver, rx) = shell::channel(DRIVER_QUEUE_EVENTS_MAX);

        let (api_listener, http_listener) = bind_listeners(&cfg).await?;
        let api_addr = api_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let advertised = if cfg.api_advertise.is_empty() {
            api_addr.to_string()
        } else {
            cfg.api_advertise.clone()
        };
        api_addrs.insert(id, advertised);
        *shared.api_addrs.write() = api_addrs;

        let forward = driver.clone();
        let inbox_task = tokio::spawn(async move {
            while let Some(msg) = inbox.recv().await {
                forward.submit_peer(msg);
            }
        });
        let parts = DriverParts {
            core,
            storage: NodeStorage::new(wal, dir),
            book,
            shared: shared.clone(),
            transport,
            rx,
            handle: driver.clone(),
            tick: Duration::from_millis(cfg.tick_ms),
            runtime: tokio::runtime::Handle::current(),
        };
        let failure = shared.failure.clone();
        let driver_thread = std::thread::Builder::new()
            .name(format!("raftwal-driver-{}", id.0))
            .spawn(move || shell::run_guarded(&failure, || shell::run(parts)))
            .context("spawn the driver thread")?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let shutdown_rx_disk = shutdown_rx.clone();
        // Named streams: served over gRPC on the client port, and over HTTP when configured.
        let streams = crate::streams_api::StreamsApi::new(
            shared.clone(),
            driver.clone(),
            Duration::from_millis(cfg.stream_long_poll_ms),
            cfg.record_bytes_max,
            cfg.streams_max,
            (!cfg.client_plaintext).then_some(&pem),
            shutdown_rx.clone(),
        );
        let api_task = api::serve(
            &cfg,
            &pem,
            shared.clone(),
            driver.clone(),
            streams.clone(),
            api_listener,
            shutdown_rx.clone(),
        )?;
        let mut servers = vec![
            tokio::spawn(crate::streams_api::sweep_expired(streams.clone())),
            tokio::spawn(crate::streams_api::fetch_streams(streams.clone())),
        ];
        let mut streams_addr = None;
        if let Some(addr) = cfg.streams_addr()? {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve the streams API on {addr}"))?;
            streams_addr = Some(listener.local_addr()?);
            let api = streams;
            let tls = if cfg.client_plaintext {
                None
            } else {
                Some(crate::streams_http::tls_config(&pem, cfg.client_auth)?)
            };
            servers.push(crate::streams_http::serve(
                api,
                listener,
                cfg.max_stream_connections as usize,
                tls,
                shutdown_rx.clone(),
            ));
        }
        let http_task = http::serve(
            shared.clone(),
            http_listener,
            cfg.max_http_connections as usize,
            shutdown_rx,
        );
        let grace = Duration::from_millis(cfg.tick_ms * u64::from(cfg.election_ticks) * 3);
        let refusal_task = tokio::spawn(stop_when_refused(refusal, shared.clone(), grace));
        let disk_task = tokio::spawn(crate::disk::watch_free_space(
            shared.clone(),
            cfg.data_dir.clone(),
            cfg.disk_free_min_bytes,
            Duration::from_millis(cfg.tick_ms),
            shutdown_rx_disk,
        ));
        tracing::info!(node = id.0, %api_addr, %http_addr, %peer_addr, ?streams_addr, "node started");
        servers.extend([inbox_task, api_task, http_task, refusal_task, disk_task]);
        Ok(Node {
            shared,
            driver,
            api_addr,
            http_addr,
            peer_addr,
            streams_addr,
            driver_thread: Some(driver_thread),
            shutdown,
            servers,
        })
    }

    /// Resolves when the driver stopped on an error (a failed fsync, a broken log); the
    /// message says why. The process should then exit: a node that cannot write must not go
    /// on serving.
    pub async fn failed(&self) -> String {
        let mut failure = self.shared.failure.subscribe();
        let why = failure.wait_for(Option::is_some).await.map(|f| f.clone()).ok().flatten();
        why.unwrap_or_else(|| "the driver is gone".to_string())
    }

    /// Stops the servers and the driver, and waits for them; the WAL closes with the last
    /// reference.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        let driver = self.driver.clone();
        // Waits for room in a full queue, so off the async workers.
        let _ = tokio::task::spawn_blocking(move || driver.shutdown()).await;
        let thread = self.driver_thread.take();
        let joined = tokio::task::spawn_blocking(move || thread.map(|t| t.join())).await?;
        for task in self.servers.drain(..) {
            task.abort();
            let _ = task.await;
        }
        match joined {
            None => Ok(()),
            Some(Err(_)) => Err(anyhow::anyhow!("the driver thread panicked")),
            Some(Ok((result, transport))) => {
                transport.shutdown().await;
                result.map_err(|e| anyhow::anyhow!("the driver failed: {e}"))
            }
        }
    }
}

/// Opens the data directory and reads (or, for a new one, makes) its identity: the cluster and
/// node it belongs to and its incarnation, which peers check.
fn open_data_dir(cfg: &NodeConfig) -> anyhow::Result<(Arc<dyn Storage>, PeerIdentity)> {
    let dir: Arc<dyn Storage> =
        Arc::new(FsStorage::new(&cfg.data_dir).with_context(|| {
            format!("cannot open the data directory {}", cfg.data_dir.display())
        })?);
    let made = identity::load_or_create(dir.as_ref(), cfg.cluster_id, NodeId(cfg.id), seed())?;
    Ok((dir, PeerIdentity { cluster: made.cluster, incarnation: made.incarnation }))
}

/// A peer refused this node (another cluster, or a data directory it does not know as this
/// node's). If the node still has no leader after `grace` (three election timeouts), no quorum
/// takes it: it must not go on as a voter, and its failure makes /livez fail and `raftwal node`
/// exit with the reason. A node that follows a leader goes on (a member that has not yet
/// applied this node's removal and re-addition refuses it for a while), with a warning.
async fn stop_when_refused(
    mut refusal: watch::Receiver<Option<String>>,
    shared: Arc<Shared>,
    grace: Duration,
) {
    if refusal.wait_for(Option::is_some).await.is_err() {
        return;
    }
    loop {
        let why = refusal.borrow_and_update().clone().unwrap_or_default();
        tokio::time::sleep(grace).await;
        if shared.status.read().leader.is_none() {
            tracing::error!(%why, "refusing to go on");
            shared.failure.send_replace(Some(format!("refusing to go on: {why}")));
            return;
        }
        tracing::warn!(%why, "a peer refuses this node, but it follows a leader: going on");
        if refusal.changed().await.is_err() {
            return;
        }
    }
}

/// Binds the client API and HTTP listeners, saying which address is taken when one is.
async fn bind_listeners(
    cfg: &NodeConfig,
) -> anyhow::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    let api = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .with_context(|| format!("cannot listen for clients on {}", cfg.api_listen))?;
    let http = tokio::net::TcpListener::bind(cfg.http_listen)
        .await
        .with_context(|| format!("cannot serve HTTP on {}", cfg.http_listen))?;
    Ok((api, http))
}

/// What the node publishes before its driver runs: nothing settled beyond the log start.
fn new_shared(id: NodeId, wal: Arc<Wal>, status: raftwal_consensus::Status) -> Shared {
    let first = wal.first_index();
    Shared {
        id,
        wal,
        view: RwLock::new(ReadView { start: first, hidden: Default::default() }),
        readable: watch::channel(first.prev()).0,
        status: RwLock::new(status),
        api_addrs: RwLock::new(BTreeMap::new()),
        appends_inflight: AtomicU64::new(0),
        appends_inflight_bytes: AtomicU64::new(0),
        failure: watch::Sender::new(None),
        disk_free_bytes: AtomicU64::new(u64::MAX),
        disk_low: std::sync::atomic::AtomicBool::new(false),
        streams: RwLock::new(Default::default()),
        streams_changed: watch::Sender::new(0),
        streams_missing: watch::Sender::new(None),
    }
}

/// Opens (recovering) the node's WAL and writes the founding membership into a new one. When
/// `repairable`, damage in a segment cuts the log before it and the repair floor is made
/// durable first (docs/reliability.md); otherwise damage refuses the start.
fn open_wal(
    cfg: &NodeConfig,
    peers: &[crate::config::Peer],
    dir: &dyn Storage,
    repairable: bool,
) -> anyhow::Result<Arc<Wal>> {
    let id = NodeId(cfg.id);
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create the data directory {}", cfg.data_dir.display()))?;
    let wal_opts = WalOptions {
        segment_bytes: cfg.segment_bytes,
        record_bytes_max: crate::config::WAL_ENTRY_BYTES_MAX,
        durability: cfg.wal_durability()?,
        ..WalOptions::default()
    };
    if cfg.wal_durability()? == raftwal_wal::Durability::UnsafeNoSync {
        tracing::warn!("durability is unsafe-no-sync: a power loss can lose acknowledged appends");
    }
    let wal_dir = cfg.data_dir.join("wal");
    let storage = FsStorage::new(&wal_dir)
        .with_context(|| format!("cannot open the WAL directory {}", wal_dir.display()))?;
    let opened = if repairable {
        Wal::open_salvaging(Arc::new(storage), wal_opts, &mut |s: &Salvage| {
            let Some(seen) = s.seen_last else {
                return Err(std::io::Error::other(
                    "no frame after the damage still verifies, so how far this log reached \
                     (which entries it may have acknowledged) is unknown",
                ));
            };
            store::raise_repair_floor(dir, seen)
        })
    } else {
        Wal::open_with(Arc::new(storage), wal_opts)
    };
    let wal = opened.with_context(|| {
        let what = if repairable {
            "remove this node from the cluster, empty its data directory and add it again"
        } else {
            "this node has no peers, so its log is the only copy: restore the data directory \
             from a backup"
        };
        format!(
            "refusing to start: the WAL in {} could not be recovered (no data was changed); {what}",
            wal_dir.display()
        )
    })?;
    if let Some(torn) = &wal.recovery().torn_tail
        && wal.hard_state().commit <= wal.last_index()
    {
        // (Below the commit index it was no torn write: `check_commit_reached` says so.)
        tracing::warn!(
            ?torn,
            "recovery cut an unreadable tail (a torn write, or damage after the sync that looks \
             the same): holding elections for one election timeout, so that a leader that \
             counted this node for those entries can say so"
        );
    }
    if let Some(s) = wal.salvage() {
        metrics::counter!("raftwal_server_repairs_started_total", "what" => "segment").increment(1);
        tracing::error!(
            segment = %s.segment,
            offset = s.offset,
            reason = %s.reason,
            kept_last = %s.kept_last,
            seen_last = ?s.seen_last,
            dropped = ?s.dropped,
            "damage in the WAL: the log is cut before it and the rest is fetched again from peers"
        );
    }
    check_commit_reached(&wal, dir, repairable, &wal_dir)?;
    if !cfg.join {
        let mut voters: Vec<NodeId> = peers.iter().map(|p| p.id).collect();
        voters.push(id);
        bootstrap_if_new(&wal, &voters)?;
    }
    let wal = Arc::new(wal);
    Ok(wal)
}

/// A log that ends below its saved commit index lost entries it had acknowledged: recovery cut
/// a tail that was not torn by a crash but damaged after it was synced (the commit index is
/// saved only for durable entries). A torn tail looks the same otherwise; this is the case the
/// node's own hard state proves. With peers, it becomes a repair: how far the log reached is
/// unknown, so the floor is "any entry of a later term" (the node votes again once a leader
/// elected after the damage has appended to it). Without peers, it refuses.
fn check_commit_reached(
    wal: &Wal,
    dir: &dyn Storage,
    repairable: bool,
    wal_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let (hs, last) = (wal.hard_state(), wal.last_index());
    if hs.commit <= last {
        return Ok(());
    }
    let damage = wal.recovery().torn_tail.as_ref().map_or_else(
        || "no damage was reported".to_string(),
        |t| format!("damage in {} at offset {}: {}", t.segment, t.offset, t.reason),
    );
    if !repairable {
        anyhow::bail!(
            "refusing to start: the WAL in {} ends at {last}, below its saved commit index {}: \
             committed entries were lost ({damage}); this node has no peers, so its log was the \
             only copy: restore the data directory from a backup",
            wal_dir.display(),
            hs.commit
        );
    }
    metrics::counter!("raftwal_server_repairs_started_total", "what" => "committed_tail")
        .increment(1);
    tracing::error!(
        last = %last,
        commit = %hs.commit,
        %damage,
        "the log ends below its saved commit index: entries it acknowledged were lost; \
         fetching them again from peers"
    );
    store::raise_repair_floor(dir, (LogIndex(u64::MAX), hs.term))
        .context("refusing to start: cannot save the repair floor")?;
    wal.lower_commit(last).context("refusing to start: cannot lower the commit index")?;
    Ok(())
}

/// The last index and its term. An unreadable term is an error, never a default: a floor built
/// on a term too low would let this node vote for a log without entries it acknowledged.
fn last_entry(wal: &Wal) -> anyhow::Result<(LogIndex, Term)> {
    let last = wal.last_index();
    let term = wal.term(last).context("refusing to start: cannot read the last entry's term")?;
    Ok((last, term))
}

/// Settles a repair from peers before the core starts, and returns the repair floor to start
/// with. A damaged log-start file (the membership as of the log start) is repaired by
/// discarding the whole log: the leader sends its log start again. A repair floor the log has
/// reached is cleared. Without `repairable`, a damaged log-start file refuses the start.
pub fn prepare_repair(
    wal: &Wal,
    dir: &dyn Storage,
    repairable: bool,
) -> anyhow::Result<Option<(LogIndex, Term)>> {
    // An IO error reading it (permissions, EIO) refuses the start: only a file that reads but
    // does not decode is damage to repair.
    let start = store::load_log_start(dir, wal.first_index())
        .context("refusing to start: cannot read the log-start file")?;
    if let Err(damage) = start {
        if !repairable {
            anyhow::bail!(
                "{damage}; refusing to start: this node has no peers, so its log is the only \
                 copy: restore the data directory from a backup"
            );
        }
        let (last, term) = last_entry(wal)?;
        tracing::error!(
            error = %damage,
            last = %last,
            "the log-start file is damaged: discarding the log; the leader sends it again"
        );
        metrics::counter!("raftwal_server_repairs_started_total", "what" => "log_start")
            .increment(1);
        if last >= wal.first_index() {
            store::raise_repair_floor(dir, (last, term))
                .context("refusing to start: cannot save the repair floor")?;
        }
        // The commit index first: a crash before the restart then repeats this repair.
        wal.lower_commit(LogIndex(0))
            .and_then(|()| wal.restart_at(LogIndex(1), Term(0)))
            .context("refusing to start: cannot discard the damaged log")?;
        store::remove_small_file(dir, store::LOG_START_FILE)
            .context("refusing to start: cannot remove the damaged log-start file")?;
    }
    let Some((index, term)) = store::read_repair_floor(dir)? else { return Ok(None) };
    let (last, last_term) = last_entry(wal)?;
    if (last_term, last) >= (term, index) {
        store::clear_repair_floor(dir).context("cannot remove the finished repair's floor")?;
        tracing::info!(floor = %format!("{term}/{index}"), "a repair from peers had completed");
        return Ok(None);
    }
    metrics::gauge!("raftwal_server_repair_pending").set(1.0);
    tracing::warn!(
        floor = %format!("{term}/{index}"),
        last = %format!("{last_term}/{last}"),
        "repairing from peers: this node neither campaigns nor votes for a log behind the floor \
         until its own log reaches it"
    );
    Ok(Some((index, term)))
}

/// Consensus's and the core's settings from the node's config, with a fresh random seed.
fn core_configs(cfg: &NodeConfig) -> (Config, CoreConfig) {
    let id = NodeId(cfg.id);
    let seed = seed();
    let mut rc = Config::new(id, seed);
    // Messages of another cluster's group are refused by consensus too.
    rc.group = GroupId(cfg.cluster_id);
    rc.election_ticks = cfg.election_ticks;
    rc.heartbeat_ticks = cfg.heartbeat_ticks;
    rc.uncommitted_bytes_max = cfg.uncommitted_bytes_max;
    // Every peer receives with the transport's default frame limits.
    rc.msg_entries_max =
        rc.msg_entries_max.min(raftwal_transport::FrameLimits::default().app_entries_max());
    let core_config = CoreConfig {
        id,
        read_barrier_ticks: u64::from(cfg.election_ticks) * 2,
        // Below 2^63, so the contexts of one incarnation never wrap.
        read_context_start: seed >> 1,
        producers_max: cfg.producers_max as usize,
        writes_in_flight_max: shell::WRITES_IN_FLIGHT_MAX,
        disk_stall_ms: cfg.leader_disk_stall_ms,
        planted: None,
    };
    (rc, core_config)
}

/// Writes the founding membership of `voters` into the WAL of a node that has never run (an
/// empty log and no term). Returns whether it did.
pub fn bootstrap_if_new(wal: &Wal, voters: &[NodeId]) -> anyhow::Result<bool> {
    if wal.last_index() != LogIndex(0) || wal.hard_state().term.0 != 0 {
        return Ok(false);
    }
    let mut voters = voters.to_vec();
    voters.sort();
    voters.dedup();
    let (entries, hs) = bootstrap(&voters);
    let batch = store::WalBatch::new(&entries);
    wal.append(&batch.entries()).context("bootstrap: write the founding membership")?;
    wal.save_hard_state(hs).context("bootstrap: save the hard state")?;
    tracing::info!(?voters, "bootstrapped a new cluster");
    Ok(true)
}

/// Recovers a node's core from its WAL and its log-start file in `dir`: the membership
/// and addresses as of the log start, consensus's hard state, and a log state to be rebuilt by
/// applying the log again. Returns the core and the addresses kept with the log start.
pub fn recover_core(
    wal: Arc<Wal>,
    dir: &dyn Storage,
    raft: Config,
    core: CoreConfig,
    repair_floor: Option<(LogIndex, Term)>,
) -> anyhow::Result<(NodeCore, Vec<Addresses>)> {
    let first = wal.first_index();
    let start = store::read_log_start(dir, first)?;
    let start_membership = start.as_ref().map(|r| r.membership.clone()).unwrap_or_default();
    let start_addresses = start.map(|r| r.addresses).unwrap_or_default();
    let restored = Restored {
        hard_state: wal.hard_state(),
        membership: start_membership.clone(),
        applied: first.prev(),
        repair_floor,
        tail_cut: wal.recovery().torn_tail.is_some(),
    };
    let raw = RawNode::new(raft, restored, WalStore::new(wal, start_membership.clone()))
        .context("refusing to start: the persisted state is inconsistent")?;
    let members = Members::new(first.prev(), start_membership, start_addresses.clone());
    let mut node = NodeCore::new(core, raw, members);
    let checkpoint = match store::read_streams(dir) {
        Ok(c) => c,
        Err(e) => {
            // Kept aside, never overwritten: the state it held may exist nowhere else.
            let aside = format!("{}.damaged", store::STREAMS_FILE);
            dir.rename(store::STREAMS_FILE, &aside)
                .and_then(|()| dir.sync_dir())
                .with_context(|| format!("{e:#}; and it could not be moved aside to {aside}"))?;
            tracing::error!(
                error = %e,
                "the stream checkpoint cannot be used; moved aside to {aside}: this node asks \
                 its peers for their stream state (a node without peers serves no streams \
                 until an operator restores the file)"
            );
            crate::core::StreamsCheckpoint::Missing
        }
    };
    node.restore_streams(checkpoint);
    Ok((node, start_addresses))
}

/// Starts the transport, retrying for up to 3 s while its address is still held: a node
/// stopped and started again in one process gets its UDP socket back only when quinn has
/// dropped the old endpoint, which happens after `Transport::shutdown` returns (its
/// connections drain in the background; waiting for the transport's own tasks in shutdown
/// was tried and still left the address held in 2 of 5 runs).
async fn start_transport(
    tc: TransportConfig,
) -> Result<
    (Transport, tokio::sync::mpsc::Receiver<raftwal_consensus::Message>),
    raftwal_transport::StartError,
> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match Transport::start(tc.clone()) {
            Err(raftwal_transport::StartError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

/// The election jitter's seed: different per process start, so two nodes never share timeouts.
fn seed() -> u64 {
    // The standard library's per-process random keys, with the time and the process id.
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    crate::local::random_cluster_id().rotate_left(7)
        ^ t.as_nanos() as u64
        ^ u64::from(std::process::id()).rotate_left(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_incarnation_starts_its_read_contexts_elsewhere() {
        // A peer's late answer to a read barrier of a previous process must not complete a
        // barrier of this one: contexts must not repeat across restarts (they used to start at
        // 1 in every process). Each start draws a fresh 63-bit start; a run of one incarnation
        // never reaches the next's.
        let mut cfg = NodeConfig::defaults();
        cfg.id = 1;
        cfg.cluster_id = 7;
        let starts: std::collections::BTreeSet<u64> =
            (0..64).map(|_| core_configs(&cfg).1.read_context_start).collect();
        assert_eq!(starts.len(), 64, "every incarnation its own start");
        assert!(starts.iter().all(|s| *s < 1 << 63), "no wrap within an incarnation");
    }
}
