//! The cluster's processes: certificates and configs in a fresh directory, one `raftwal node`
//! process per node on its own 127.x.y.z address, and the operations the faults need on them
//! (kill -9, SIGSTOP/SIGCONT, start again) plus status queries to find the leader.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use raftwal_client::proto::StatusResponse;
use raftwal_client::{Client, ClientConfig, ClientTls};
use tokio::process::{Child, Command};

use crate::disk::Tmpfs;

/// The smallest segment size a node accepts is about 8 MiB (one largest entry); a small one
/// makes sealed segments appear within a short run.
pub const SEGMENT_BYTES: u64 = 9 << 20;

/// One node's addresses and files.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: u64,
    pub ip: Ipv4Addr,
    pub api: SocketAddr,
    pub peer: SocketAddr,
    pub http: SocketAddr,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    /// The node's own tmpfs, when the harness runs as root.
    pub mount: Option<PathBuf>,
    pub log: PathBuf,
}

/// A running cluster of `raftwal node` processes.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    bin: PathBuf,
    pub specs: Vec<NodeSpec>,
    children: Vec<Option<Child>>,
    paused: Vec<bool>,
    tls: ClientTls,
    status_clients: Vec<Client>,
    /// Unmounted on drop, after the processes are gone.
    _mounts: Vec<Tmpfs>,
}

/// Whether this process runs as root (needed for tmpfs mounts and nftables).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The `raftwal` binary: `explicit`, else next to this executable, else in the release target
/// directory, else built with cargo (saying so).
pub fn find_raftwal(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path);
        }
        bail!("--raftwal-bin {}: no such file", path.display());
    }
    let exe = std::env::current_exe().context("find this executable's path")?;
    let dir = exe.parent().context("this executable has no directory")?;
    let mut candidates = vec![dir.join("raftwal")];
    // Test binaries live in target/<profile>/deps; a debug harness may use a release node.
    for up in [dir.parent(), dir.parent().and_then(Path::parent)].into_iter().flatten() {
        candidates.push(up.join("release/raftwal"));
        candidates.push(up.join("raftwal"));
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    eprintln!(
        "faults: no raftwal binary next to {}; building it: cargo build --release -p raftwal-server --bin raftwal",
        exe.display()
    );
    let status = std::process::Command::new("cargo")
        .args(["build", "--release", "-p", "raftwal-server", "--bin", "raftwal"])
        .status()
        .context("run cargo build for the raftwal binary")?;
    if !status.success() {
        bail!("cargo build --release -p raftwal-server --bin raftwal failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from);
    let built = match target {
        Some(t) => t.join("release/raftwal"),
        None => PathBuf::from("target/release/raftwal"),
    };
    if built.is_file() {
        return Ok(std::fs::canonicalize(&built).unwrap_or(built));
    }
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!("cargo built raftwal but it is not at {} nor next to the harness", built.display())
    })
}

/// A free port on `ip` for TCP (`udp = false`) or UDP, free a moment ago.
fn free_port(ip: Ipv4Addr, udp: bool) -> anyhow::Result<SocketAddr> {
    let any = SocketAddr::from((ip, 0));
    let addr = if udp {
        std::net::UdpSocket::bind(any).and_then(|s| s.local_addr())
    } else {
        std::net::TcpListener::bind(any).and_then(|s| s.local_addr())
    };
    addr.with_context(|| format!("find a free port on {ip}"))
}

/// A per-run /16-ish loopback range, so that concurrent runs do not share addresses.
fn node_ip(id: u64) -> Ipv4Addr {
    let pid = std::process::id();
    let b = 50 + (pid % 200) as u8;
    let c = ((pid / 200) % 250) as u8;
    Ipv4Addr::new(127, b, c, id as u8)
}

impl Cluster {
    /// Writes certificates and configs for `nodes` nodes under `dir` (each data directory on
    /// its own tmpfs of `tmpfs_mb` MiB when given), without starting anything.
    pub async fn create(
        dir: &Path,
        bin: PathBuf,
        nodes: u64,
        tmpfs_mb: Option<u64>,
    ) -> anyhow::Result<Cluster> {
        let mut specs = Vec::new();
        for id in 1..=nodes {
            let ip = node_ip(id);
            specs.push(NodeSpec {
                id,
                ip,
                api: free_port(ip, false)?,
                peer: free_port(ip, true)?,
                http: free_port(ip, false)?,
                config: dir.join(format!("node-{id}.toml")),
                data_dir: dir.join(format!("node-{id}-disk/data")),
                mount: None,
                log: dir.join(format!("node-{id}.log")),
            });
        }
        let certs = dir.join("certs");
        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        names.extend(specs.iter().map(|s| s.ip.to_string()));
        let out = std::process::Command::new(&bin)
            .arg("certs")
            .arg("init")
            .arg("--dir")
            .arg(&certs)
            .arg("--nodes")
            .arg(nodes.to_string())
            .arg("--names")
            .arg(names.join(","))
            .output()
            .with_context(|| format!("run {} certs init", bin.display()))?;
        if !out.status.success() {
            bail!(
                "raftwal certs init failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let cluster_id: u64 = stdout
            .lines()
            .find_map(|l| l.split("cluster_id = ").nth(1))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("raftwal certs init printed no cluster_id: {stdout}"))?;

        let mut mounts = Vec::new();
        for spec in &mut specs {
            let disk = dir.join(format!("node-{}-disk", spec.id));
            std::fs::create_dir_all(&disk).with_context(|| format!("create {}", disk.display()))?;
            if let Some(mb) = tmpfs_mb {
                mounts.push(Tmpfs::mount(&disk, mb)?);
                spec.mount = Some(disk.clone());
            }
        }
        for spec in &specs {
            let peers: Vec<String> = specs
                .iter()
                .filter(|p| p.id != spec.id)
                .map(|p| format!("\"{}@{}@{}\"", p.id, p.peer, p.api))
                .collect();
            let config = format!(
                "# raftwal-faults: node {id}\nid = {id}\ncluster_id = {cluster_id}\ndata_dir = \"{data}\"\n\
                 api_listen = \"{api}\"\npeer_listen = \"{peer}\"\nhttp_listen = \"{http}\"\npeers = [{peers}]\n\
                 tls_ca = \"{certs}/ca.pem\"\ntls_cert = \"{certs}/node-{id}.pem\"\ntls_key = \"{certs}/node-{id}.key\"\n\
                 segment_bytes = {SEGMENT_BYTES}\n",
                id = spec.id,
                data = spec.data_dir.display(),
                api = spec.api,
                peer = spec.peer,
                http = spec.http,
                peers = peers.join(", "),
                certs = certs.display(),
            );
            std::fs::write(&spec.config, config)
                .with_context(|| format!("write {}", spec.config.display()))?;
        }
        let read = |name: &str| {
            std::fs::read(certs.join(name)).with_context(|| format!("read certs/{name}"))
        };
        let tls = ClientTls::new(read("ca.pem")?)
            .with_identity(read("client.pem")?, read("client.key")?)
            .with_domain("localhost");
        let mut status_clients = Vec::new();
        for spec in &specs {
            let mut config =
                ClientConfig::new([format!("https://{}", spec.api)]).with_tls(tls.clone());
            config.request_timeout = Duration::from_millis(1500);
            config.connect_timeout = Duration::from_millis(500);
            config.retries_max = 0;
            status_clients
                .push(Client::connect(config).await.context("make a status client for a node")?);
        }
        let n = specs.len();
        Ok(Cluster {
            dir: dir.to_path_buf(),
            bin,
            specs,
            children: (0..n).map(|_| None).collect(),
            paused: vec![false; n],
            tls,
            status_clients,
            _mounts: mounts,
        })
    }

    pub fn ids(&self) -> Vec<u64> {
        self.specs.iter().map(|s| s.id).collect()
    }

    fn index(&self, id: u64) -> usize {
        (id as usize).saturating_sub(1).min(self.specs.len().saturating_sub(1))
    }

    pub fn spec(&self, id: u64) -> &NodeSpec {
        &self.specs[self.index(id)]
    }

    /// A client configuration for every node (TLS, short timeouts, a generous retry budget).
    pub fn client_config(&self) -> ClientConfig {
        let endpoints = self.specs.iter().map(|s| format!("https://{}", s.api));
        let mut config = ClientConfig::new(endpoints).with_tls(self.tls.clone());
        config.request_timeout = Duration::from_secs(2);
        config.connect_timeout = Duration::from_millis(500);
        config.retry_backoff_max = Duration::from_millis(500);
        config.retries_max = 20;
        config
    }

    /// A client that talks to node `id` only.
    pub async fn node_client(&self, id: u64) -> anyhow::Result<Client> {
        let mut config = ClientConfig::new([format!("https://{}", self.spec(id).api)])
            .with_tls(self.tls.clone());
        config.request_timeout = Duration::from_secs(5);
        config.retries_max = 3;
        Ok(Client::connect(config).await?)
    }

    /// Starts node `id` (a no-op when its process is running).
    pub fn start(&mut self, id: u64) -> anyhow::Result<()> {
        let i = self.index(id);
        if let Some(child) = self.children[i].as_mut()
            && matches!(child.try_wait(), Ok(None))
        {
            return Ok(());
        }
        let spec = &self.specs[i];
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .with_context(|| format!("open {}", spec.log.display()))?;
        use std::io::Write as _;
        let _ = writeln!(log, "=== raftwal-faults: starting node {id} ===");
        let child = Command::new(&self.bin)
            .arg("node")
            .arg("--config")
            .arg(&spec.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone a log file handle")?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start node {id} ({})", self.bin.display()))?;
        self.children[i] = Some(child);
        self.paused[i] = false;
        Ok(())
    }

    pub fn pid(&self, id: u64) -> Option<u32> {
        self.children[self.index(id)].as_ref().and_then(|c| c.id())
    }

    /// kill -9 node `id` and reap it.
    pub async fn kill9(&mut self, id: u64) {
        let i = self.index(id);
        if let Some(mut child) = self.children[i].take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        self.paused[i] = false;
    }

    /// SIGSTOP (`stop = true`) or SIGCONT node `id`.
    pub fn signal_pause(&mut self, id: u64, stop: bool) -> anyhow::Result<()> {
        let i = self.index(id);
        let Some(pid) = self.pid(id) else { bail!("node {id} is not running") };
        let signal = if stop { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .context("run kill")?;
        if !status.success() {
            bail!("kill {signal} {pid} failed ({status})");
        }
        self.paused[i] = stop;
        Ok(())
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.paused[self.index(id)]
    }

    /// Why node `id` is not running, when it is not.
    pub fn exited(&mut self, id: u64) -> Option<String> {
        let i = self.index(id);
        match self.children[i].as_mut() {
            None => Some("not started".into()),
            Some(child) => match child.try_wait() {
                Ok(None) => None,
                Ok(Some(status)) => Some(format!("exited ({status})")),
                Err(e) => Some(format!("cannot wait for it: {e}")),
            },
        }
    }

    /// Node `id`'s status, within about 1.5 s.
    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        let client = self.status_clients[self.index(id)].clone();
        tokio::time::timeout(Duration::from_secs(2), client.status()).await.ok()?.ok()
    }

    /// Every reachable node's status, asked concurrently.
    pub async fn statuses(&self) -> Vec<(u64, StatusResponse)> {
        let mut set = tokio::task::JoinSet::new();
        for (spec, client) in self.specs.iter().zip(&self.status_clients) {
            let (id, client) = (spec.id, client.clone());
            set.spawn(async move {
                let s = tokio::time::timeout(Duration::from_secs(2), client.status()).await;
                (id, s.ok().and_then(Result::ok))
            });
        }
        let mut out = Vec::new();
        while let Some(joined) = set.join_next().await {
            if let Ok((id, Some(status))) = joined {
                out.push((id, status));
            }
        }
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// The node that says it leads, with the highest term.
    pub async fn leader(&self) -> Option<u64> {
        self.statuses()
            .await
            .into_iter()
            .filter(|(_, s)| s.role == "leader")
            .max_by_key(|(_, s)| s.term)
            .map(|(id, _)| id)
    }

    /// Waits until some node leads; its id.
    pub async fn wait_leader(&self, timeout: Duration) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(id) = self.leader().await {
                return Some(id);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until node `id` answers status and knows a leader; the reason when it does not.
    pub async fn wait_ready(&mut self, id: u64, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(why) = self.exited(id) {
                return Err(format!("node {id} {why}; its log ends: {}", self.log_tail(id, 3)));
            }
            if let Some(s) = self.status(id).await
                && s.leader_id != 0
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "node {id} runs but did not answer status with a leader within {timeout:?}; its log ends: {}",
                    self.log_tail(id, 3)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What node `id` logged since its last start.
    pub fn log_since_start(&self, id: u64) -> String {
        let text = std::fs::read_to_string(&self.spec(id).log).unwrap_or_default();
        text.rsplit("=== raftwal-faults: starting node").next().unwrap_or("").to_string()
    }

    /// The last `lines` lines node `id` logged since its last start, joined by " | ".
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let since = self.log_since_start(id);
        let all: Vec<&str> = since.lines().skip(1).filter(|l| !l.trim().is_empty()).collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        tail.iter().map(|l| strip_ansi(l)).collect::<Vec<_>>().join(" | ")
    }

    /// SIGCONT every paused node.
    pub fn resume_all(&mut self) {
        for id in self.ids() {
            if self.is_paused(id) {
                let _ = self.signal_pause(id, false);
            }
        }
    }

    /// Stops every node: SIGCONT, SIGTERM, then kill after 5 s.
    pub async fn shutdown(&mut self) {
        self.resume_all();
        for child in self.children.iter().flatten() {
            if let Some(pid) = child.id() {
                let _ =
                    std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            }
        }
        for slot in &mut self.children {
            if let Some(mut child) = slot.take()
                && tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}

/// The text of a log line without terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
