//! A node's configuration: defaults < TOML file < `RAFTWAL_*` environment < flags, each value
//! remembering where it came from (`raftwal config show`).
//!
//! Keys are flat (`api_listen`, `tick_ms`, ...). `peers` lists the cluster's founding members
//! other than this node as `ID@PEER_ADDR@API_ADDR` (a TOML array of strings in the file, a
//! comma-separated list in the environment and flags).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use raftwal_consensus::NodeId;
use serde::{Deserialize, Serialize};

/// The largest record any node of any configuration accepts (`record_bytes_max` may be lower).
pub const RECORD_BYTES_CEILING: u64 = 8 << 20;

/// The largest WAL entry a node must accept from a leader: a record at the ceiling and its
/// envelope. Every node's WAL takes entries up to this, whatever its own `record_bytes_max`,
/// because a committed entry must never make a follower's WAL refuse it (a follower with a
/// lower limit than the leader's would otherwise stop on the leader's entry, again at every
/// restart).
pub const WAL_ENTRY_BYTES_MAX: u64 = RECORD_BYTES_CEILING + 64;

/// One other member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its node id.
    pub id: NodeId,
    /// Its QUIC address.
    pub peer_addr: SocketAddr,
    /// Its client API address, as a client dials it.
    pub api_addr: String,
}

impl std::str::FromStr for Peer {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Peer> {
        let parts: Vec<&str> = s.trim().split('@').collect();
        let [id, peer, api] = parts[..] else {
            bail!("peer {s:?} is not ID@PEER_ADDR@API_ADDR");
        };
        let id: u64 = id.parse().with_context(|| format!("peer {s:?}: bad node id"))?;
        if id == 0 {
            bail!("peer {s:?}: node id 0 is reserved");
        }
        let peer_addr = peer.parse().with_context(|| format!("peer {s:?}: bad peer address"))?;
        Ok(Peer { id: NodeId(id), peer_addr, api_addr: api.to_string() })
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}@{}", self.id.0, self.peer_addr, self.api_addr)
    }
}

/// Everything a node runs with. See `Settings` for every key, its default and its meaning.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (> 0).
    pub id: u64,
    /// The cluster's id (> 0), the same on every node of one cluster: peers of another cluster
    /// are refused, even under the same CA. `raftwal certs init`, `raftwal dev` and the local
    /// tools make a random one.
    pub cluster_id: u64,
    /// Where the WAL and the node's state live.
    pub data_dir: PathBuf,
    /// QUIC address for peers.
    pub peer_listen: SocketAddr,
    /// gRPC address for clients.
    pub api_listen: SocketAddr,
    /// HTTP address for /metrics, /livez, /readyz, /v1/status.
    pub http_listen: SocketAddr,
    /// Address of the Durable Streams HTTP API (named streams, docs/streams.md); empty: not
    /// served. TLS like the client API (plain HTTP with `client_plaintext`).
    pub streams_listen: String,
    /// How long a long-poll or an idle SSE read waits before answering, in milliseconds.
    pub stream_long_poll_ms: u64,
    /// Named streams this node lets clients create, about (checked against this node's view
    /// before a create is proposed: concurrent creates may pass it by a few).
    pub streams_max: u64,
    /// The client API address other nodes hand to clients (defaults to `api_listen`).
    pub api_advertise: String,
    /// The other founding members (`ID@PEER_ADDR@API_ADDR`).
    pub peers: Vec<String>,
    /// Join an existing cluster (an admin adds this node) instead of founding one.
    pub join: bool,
    /// The cluster CA certificate (PEM).
    pub tls_ca: PathBuf,
    /// This node's certificate (PEM), naming `node-{id}.raftwal`.
    pub tls_cert: PathBuf,
    /// This node's private key (PEM).
    pub tls_key: PathBuf,
    /// Serve clients without TLS. Peers always use mutual TLS.
    pub client_plaintext: bool,
    /// Require client certificates signed by the cluster CA.
    pub client_auth: bool,
    /// Milliseconds per consensus tick.
    pub tick_ms: u64,
    /// Election timeout in ticks (randomized up to twice this).
    pub election_ticks: u32,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: u32,
    /// Largest record.
    pub record_bytes_max: u64,
    /// Largest append request (all its records).
    pub request_bytes_max: u64,
    /// Record bytes proposed but not yet committed at the leader.
    pub uncommitted_bytes_max: u64,
    /// Appends waiting for commit on this node; beyond it, RESOURCE_EXHAUSTED.
    pub appends_inflight_max: u64,
    /// Record bytes of the appends waiting for commit on this node; beyond it,
    /// RESOURCE_EXHAUSTED.
    pub appends_inflight_bytes_max: u64,
    /// Concurrent Follow streams on this node.
    pub followers_max: u64,
    /// Open client (gRPC) connections; a connection over it is closed at once and counted.
    pub max_client_connections: u64,
    /// Open connections to the HTTP admin port; over it, closed at once and counted.
    pub max_http_connections: u64,
    /// Open connections to the streams (Durable Streams HTTP) port; over it, closed at once
    /// and counted.
    pub max_stream_connections: u64,
    /// Requests in flight per AppendStream.
    pub append_stream_window: u32,
    /// Producers whose last sequence is remembered (least recent forgotten first).
    pub producers_max: u64,
    /// WAL segment size.
    pub segment_bytes: u64,
    /// A leader whose disk has not finished a write for this many milliseconds hands
    /// leadership to a healthy voter (its disk holds up every acknowledgement); 0: never.
    pub leader_disk_stall_ms: u64,
    /// Below this many free bytes on the data disk, appends are refused (RESOURCE_EXHAUSTED)
    /// while reads, follows and trims go on. At least two segments, so a trim always has room;
    /// 0 turns the check off (a full disk then stops the node).
    pub disk_free_min_bytes: u64,
    /// `sync` (fdatasync before acknowledging; the default) or `unsafe-no-sync` (no fsync: a
    /// power loss on a quorum loses acknowledged appends; for benchmarks that say so).
    pub durability: String,
}

impl NodeConfig {
    /// The defaults: a node 1 with everything under `./raftwal-data`.
    pub fn defaults() -> NodeConfig {
        NodeConfig {
            id: 1,
            data_dir: PathBuf::from("raftwal-data"),
            peer_listen: "127.0.0.1:7101".parse().expect("literal address"),
            api_listen: "127.0.0.1:7001".parse().expect("literal address"),
            http_listen: "127.0.0.1:7201".parse().expect("literal address"),
            streams_listen: String::new(),
            stream_long_poll_ms: 20_000,
            streams_max: 1_000_000,
            api_advertise: String::new(),
            peers: Vec::new(),
            join: false,
            cluster_id: 0,
            tls_ca: PathBuf::from("certs/ca.pem"),
            tls_cert: PathBuf::from("certs/node-1.pem"),
            tls_key: PathBuf::from("certs/node-1.key"),
            client_plaintext: false,
            client_auth: false,
            tick_ms: 50,
            election_ticks: 10,
            heartbeat_ticks: 1,
            record_bytes_max: 1 << 20,
            request_bytes_max: 16 << 20,
            uncommitted_bytes_max: 64 << 20,
            appends_inflight_max: 65_536,
            appends_inflight_bytes_max: 256 << 20,
            followers_max: 1024,
            max_client_connections: 10_000,
            max_http_connections: 256,
            max_stream_connections: 10_000,
            append_stream_window: 64,
            producers_max: 20_000,
            segment_bytes: 64 << 20,
            disk_free_min_bytes: 256 << 20,
            leader_disk_stall_ms: 1000,
            durability: "sync".to_string(),
        }
    }

    /// The founding members other than this node.
    pub fn parsed_peers(&self) -> anyhow::Result<Vec<Peer>> {
        self.peers.iter().map(|p| p.parse()).collect()
    }

    /// The WAL durability mode.
    pub fn wal_durability(&self) -> anyhow::Result<raftwal_wal::Durability> {
        match self.durability.as_str() {
            "sync" => Ok(raftwal_wal::Durability::Sync),
            "unsafe-no-sync" => Ok(raftwal_wal::Durability::UnsafeNoSync),
            other => bail!("durability: {other:?} is not \"sync\" or \"unsafe-no-sync\""),
        }
    }

    /// The address clients are sent to for this node.
    pub fn api_addr(&self) -> String {
        if self.api_advertise.is_empty() {
            self.api_listen.to_string()
        } else {
            self.api_advertise.clone()
        }
    }

    /// The streams API's address, if it is served.
    pub fn streams_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.streams_listen.is_empty() {
            return Ok(None);
        }
        let addr = self.streams_listen.parse().with_context(|| {
            format!("streams_listen: {:?} is not an address (IP:PORT)", self.streams_listen)
        })?;
        Ok(Some(addr))
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.id == 0 {
            bail!("id: node id 0 is reserved");
        }
        self.streams_addr()?;
        if self.streams_max == 0 {
            bail!("streams_max must be > 0");
        }
        if self.stream_long_poll_ms == 0 || self.stream_long_poll_ms > 600_000 {
            bail!("stream_long_poll_ms: {} is not within 1..=600000", self.stream_long_poll_ms);
        }
        let peers = self.parsed_peers()?;
        if peers.iter().any(|p| p.id.0 == self.id) {
            bail!("peers: lists this node's own id {}", self.id);
        }
        if self.cluster_id == 0 {
            bail!(
                "cluster_id: set it to the same number (> 0) on every node of the cluster, and \
                 to different numbers on different clusters (`raftwal certs init` prints one)"
            );
        }
        if self.tick_ms == 0
            || self.election_ticks <= self.heartbeat_ticks
            || self.heartbeat_ticks == 0
        {
            bail!("tick_ms must be > 0 and election_ticks > heartbeat_ticks > 0");
        }
        if self.record_bytes_max == 0 || self.request_bytes_max < self.record_bytes_max {
            bail!("record_bytes_max must be > 0 and at most request_bytes_max");
        }
        if self.record_bytes_max > RECORD_BYTES_CEILING {
            bail!("record_bytes_max must be at most 8 MiB (one record must fit one WAL group)");
        }
        let entry_frame =
            raftwal_wal::frame_bytes(WAL_ENTRY_BYTES_MAX) + raftwal_wal::SEGMENT_HEADER_BYTES;
        if self.segment_bytes < entry_frame {
            bail!(
                "segment_bytes must be at least {entry_frame}: every node's WAL must hold the \
                 largest entry any leader may send (a record of 8 MiB and its envelope)"
            );
        }
        if self.disk_free_min_bytes != 0 && self.disk_free_min_bytes < 2 * self.segment_bytes {
            bail!(
                "disk_free_min_bytes must be 0 (no check) or at least two segments ({} bytes): \
                 a trim needs room for its log entry and perhaps a new segment",
                2 * self.segment_bytes
            );
        }
        self.wal_durability()?;
        if self.appends_inflight_bytes_max < self.request_bytes_max {
            bail!("appends_inflight_bytes_max must be at least request_bytes_max");
        }
        if self.max_client_connections == 0
            || self.max_http_connections == 0
            || self.max_stream_connections == 0
        {
            bail!(
                "max_client_connections, max_http_connections and max_stream_connections must be > 0"
            );
        }
        if self.appends_inflight_max == 0
            || self.followers_max == 0
            || self.append_stream_window == 0
        {
            bail!("appends_inflight_max, followers_max and append_stream_window must be > 0");
        }
        Ok(())
    }
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Built in.
    Default,
    /// The TOML file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Env(v) => write!(f, "env {v}"),
            Source::Flag => write!(f, "flag"),
        }
    }
}

/// The effective configuration and the source of every key.
#[derive(Debug)]
pub struct Resolved {
    /// The configuration.
    pub config: NodeConfig,
    /// Every key's source.
    pub sources: BTreeMap<String, Source>,
    /// Every key's value as TOML.
    pub values: BTreeMap<String, toml::Value>,
}

/// Layers defaults, the file (if any), the environment (`RAFTWAL_<KEY>`) and `flags` (key,
/// value) in that order; later layers win.
pub fn resolve(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    flags: &[(String, String)],
) -> anyhow::Result<Resolved> {
    let defaults = toml::Value::try_from(NodeConfig::defaults()).context("encode defaults")?;
    let toml::Value::Table(defaults) = defaults else { bail!("defaults are not a table") };
    let mut values: BTreeMap<String, toml::Value> = defaults.into_iter().collect();
    let mut sources: BTreeMap<String, Source> =
        values.keys().map(|k| (k.clone(), Source::Default)).collect();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
        for (k, v) in table {
            if !values.contains_key(&k) {
                bail!("config file {}: unknown key {k:?}", path.display());
            }
            values.insert(k.clone(), v);
            sources.insert(k, Source::File(path.to_path_buf()));
        }
    }
    for (name, raw) in env {
        let Some(key) = name.strip_prefix("RAFTWAL_") else { continue };
        let key = key.to_ascii_lowercase();
        if !values.contains_key(&key) {
            continue;
        }
        let value =
            parse_like(&values[&key], &raw).with_context(|| format!("environment {name}"))?;
        values.insert(key.clone(), value);
        sources.insert(key, Source::Env(name));
    }
    for (key, raw) in flags {
        let Some(old) = values.get(key) else { bail!("unknown setting {key:?}") };
        let value = parse_like(old, raw).with_context(|| format!("flag {key}"))?;
        values.insert(key.clone(), value);
        sources.insert(key.clone(), Source::Flag);
    }
    let table: toml::Table = values.clone().into_iter().collect();
    let config: NodeConfig = toml::Value::Table(table).try_into().context("configuration")?;
    config.validate()?;
    Ok(Resolved { config, sources, values })
}

/// Parses a string from the environment or a flag as the same TOML type as `like`.
fn parse_like(like: &toml::Value, raw: &str) -> anyhow::Result<toml::Value> {
    Ok(match like {
        toml::Value::Integer(_) => toml::Value::Integer(
            raw.trim().parse().with_context(|| format!("{raw:?} is not an integer"))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => bail!("{raw:?} is not a boolean"),
        }),
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_string()),
    })
}

impl Resolved {
    /// `key = value  # source` lines, as `raftwal config show` prints them.
    pub fn show(&self) -> String {
        let width =
            self.values.iter().map(|(k, v)| k.len() + v.to_string().len()).max().unwrap_or(0) + 3;
        let mut out = String::new();
        for (k, v) in &self.values {
            let line = format!("{k} = {v}");
            out.push_str(&format!("{line:<width$}  # {}\n", self.sources[k]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_layers_win_and_sources_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "id = 2\ncluster_id = 9\ntick_ms = 20\npeers = [\"1@127.0.0.1:1@a:1\"]\n",
        )
        .expect("write");
        let env =
            vec![("RAFTWAL_TICK_MS".to_string(), "30".to_string()), ("HOME".into(), "/".into())];
        let flags = vec![("election_ticks".to_string(), "20".to_string())];
        let r = resolve(Some(&file), env, &flags).expect("resolve");
        assert_eq!((r.config.id, r.config.tick_ms, r.config.election_ticks), (2, 30, 20));
        assert_eq!(r.sources["id"], Source::File(file.clone()));
        assert_eq!(r.sources["tick_ms"], Source::Env("RAFTWAL_TICK_MS".into()));
        assert_eq!(r.sources["election_ticks"], Source::Flag);
        assert_eq!(r.sources["segment_bytes"], Source::Default);
        assert_eq!(r.config.parsed_peers().expect("peers")[0].id, NodeId(1));
        assert!(r.show().contains("tick_ms = 30"));
    }

    #[test]
    fn a_random_cluster_id_fits_a_config_file() {
        // TOML integers are signed: an id above i64::MAX would make the file unreadable.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("node.toml");
        for _ in 0..200 {
            let id = crate::local::random_cluster_id();
            std::fs::write(&file, format!("id = 1\ncluster_id = {id}\n")).expect("write");
            let r = resolve(Some(&file), Vec::new(), &[]).expect("resolve");
            assert_eq!(r.config.cluster_id, id);
        }
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let err = |flags: &[(&str, &str)]| {
            let flags: Vec<(String, String)> =
                flags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            format!("{:#}", resolve(None, Vec::new(), &flags).expect_err("must fail"))
        };
        assert!(err(&[("tick_ms", "fast")]).contains("not an integer"));
        assert!(err(&[("nonsense", "1")]).contains("unknown setting"));
        assert!(err(&[("id", "0")]).contains("reserved"));
        assert!(err(&[("peers", "1@x@y")]).contains("bad peer address"));
        assert!(err(&[("peers", "1@127.0.0.1:1@a"), ("id", "1")]).contains("own id"));
        assert!(err(&[("id", "1")]).contains("cluster_id: set it"), "no cluster id");
    }
}
