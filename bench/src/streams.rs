//! `streams`: appends over the Durable Streams HTTP API spread over 1, 100 and 10,000 streams
//! (records/s, latency p50/p99), and the same 3-node cluster's restart with `--restart-records`
//! records in `--restart-streams` streams: how long until the streams are served again, and the
//! process's memory (three nodes in this one process) before and after.
//!
//! Each writer holds one HTTP/1.1 keep-alive connection to the leader's streams port and has
//! one append in flight; a record is one POST.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use raftwal_server::{Node, NodeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Stream counts to spread the appends over, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,100,10000")]
    streams: Vec<u64>,
    /// Appends per run.
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Bytes per record.
    #[arg(long, default_value_t = 256)]
    record_size: usize,
    /// Concurrent writers (connections, one append in flight each).
    #[arg(long, default_value_t = 64)]
    writers: u64,
    /// Records written before the restart measurement (0: skip it).
    #[arg(long, default_value_t = 1_000_000)]
    restart_records: u64,
    /// Streams they are spread over.
    #[arg(long, default_value_t = 10_000)]
    restart_streams: u64,
    /// Where the nodes' data goes (a temp dir is made inside).
    #[arg(long, default_value = "target/bench-data")]
    dir: PathBuf,
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    raftwal_server::http::prometheus();
    std::fs::create_dir_all(&args.dir)?;
    println!(
        "streams: 3 nodes on loopback (fsync on), {} B records, {} writers, one POST per record",
        args.record_size, args.writers
    );
    for &streams in &args.streams {
        let mut cluster = Cluster::start(&args.dir).await?;
        let leader = cluster.leader_streams().await?;
        create_streams(leader, streams, args.writers).await?;
        let report =
            append_load(leader, streams, args.records, args.record_size, args.writers).await?;
        println!(
            "  {streams:>6} streams: {:>8.0} records/s  p50 {:.2} ms  p99 {:.2} ms  ({} records in {:.1} s)",
            report.rate(),
            report.quantile(0.50),
            report.quantile(0.99),
            report.latencies_us.len(),
            report.elapsed.as_secs_f64()
        );
        cluster.stop_all().await;
    }
    if args.restart_records > 0 {
        restart(args).await?;
    }
    Ok(())
}

async fn restart(args: &Args) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&args.dir).await?;
    let leader = cluster.leader_streams().await?;
    create_streams(leader, args.restart_streams, args.writers).await?;
    let size = 16.min(args.record_size);
    let report =
        append_load(leader, args.restart_streams, args.restart_records, size, args.writers).await?;
    println!(
        "  restart: {} records of {size} B in {} streams written at {:.0}/s; RSS {} MiB",
        args.restart_records,
        args.restart_streams,
        report.rate(),
        rss_mib()
    );
    cluster.stop_all().await;
    let before = rss_mib();
    let started = Instant::now();
    cluster.start_all().await?;
    let leader = cluster.leader_streams().await?;
    // Served again: the last stream holds what was written to it, on the leader.
    let last = format!("/bench/{}", args.restart_streams - 1);
    let expected = args.restart_records / args.restart_streams * size as u64;
    loop {
        let mut conn = Conn::connect(leader).await?;
        let (status, body) = conn.request("HEAD", &last, &[], b"").await?;
        let _ = body;
        if status == 200 {
            let (_, body) = conn.request("GET", &format!("{last}?offset=-1"), &[], b"").await?;
            if body.len() as u64 >= expected {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the streams were not served again within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "  restart: every node started and the streams served again in {:.2} s; RSS {} MiB \
         before the restart, {} MiB after (three nodes in one process)",
        started.elapsed().as_secs_f64(),
        before,
        rss_mib()
    );
    cluster.stop_all().await;
    Ok(())
}

/// This process's resident memory.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

struct Cluster {
    _dir: tempfile::TempDir,
    configs: Vec<NodeConfig>,
    nodes: Vec<Node>,
}

impl Cluster {
    async fn start(parent: &std::path::Path) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir_in(parent).context("temp dir for the cluster")?;
        let configs: Vec<NodeConfig> =
            raftwal_server::local::configs(dir.path(), 3, 0)?.into_values().collect();
        let mut cluster = Cluster { _dir: dir, configs, nodes: Vec::new() };
        cluster.start_all().await?;
        Ok(cluster)
    }

    async fn start_all(&mut self) -> anyhow::Result<()> {
        for c in &mut self.configs {
            let node = Node::start(c.clone()).await?;
            // A restart keeps its ports.
            c.api_listen = node.api_addr;
            if let Some(addr) = node.streams_addr {
                c.streams_listen = addr.to_string();
            }
            self.nodes.push(node);
        }
        let addrs: Vec<_> =
            self.nodes.iter().map(|n| (n.shared.id, n.api_addr.to_string())).collect();
        raftwal_server::local::share_api_addrs(&self.nodes, &addrs);
        Ok(())
    }

    async fn stop_all(&mut self) {
        for node in self.nodes.drain(..) {
            let _ = node.shutdown().await;
        }
    }

    async fn leader_streams(&self) -> anyhow::Result<SocketAddr> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for n in &self.nodes {
                if n.shared.status.read().role == raftwal_consensus::Role::Leader {
                    return n.streams_addr.context("the streams API is not served");
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("no leader within 30 s")
    }
}

async fn create_streams(addr: SocketAddr, streams: u64, writers: u64) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..writers.min(streams) {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= streams {
                    return anyhow::Ok(());
                }
                let path = format!("/bench/{i}");
                let ct = [("content-type", "application/octet-stream")];
                let (status, _) = conn.request("PUT", &path, &ct, b"").await?;
                if status != 201 && status != 200 {
                    bail!("PUT {path}: {status}");
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

struct Report {
    latencies_us: Vec<u64>,
    elapsed: Duration,
}

impl Report {
    fn rate(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn quantile(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

async fn append_load(
    addr: SocketAddr,
    streams: u64,
    records: u64,
    size: usize,
    writers: u64,
) -> anyhow::Result<Report> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            let body = vec![b'r'; size];
            let ct = [("content-type", "application/octet-stream")];
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= records {
                    return anyhow::Ok(latencies);
                }
                let path = format!("/bench/{}", i % streams);
                let t = Instant::now();
                let (status, _) = conn.request("POST", &path, &ct, &body).await?;
                if status != 204 {
                    bail!("POST {path}: {status}");
                }
                latencies.push(t.elapsed().as_micros() as u64);
            }
        }));
    }
    let mut latencies_us = Vec::with_capacity(records as usize);
    for t in tasks {
        latencies_us.extend(t.await??);
    }
    let elapsed = started.elapsed();
    latencies_us.sort_unstable();
    Ok(Report { latencies_us, elapsed })
}

/// One HTTP/1.1 keep-alive connection.
struct Conn {
    stream: tokio::io::BufStream<tokio::net::TcpStream>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream: tokio::io::BufStream::new(stream) })
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: raftwal\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        self.stream.write_all(head.as_bytes()).await?;
        self.stream.write_all(body).await?;
        self.stream.flush().await?;
        let mut header = Vec::new();
        while !header.ends_with(b"\r\n\r\n") {
            let b = self.stream.read_u8().await.context("the server closed the connection")?;
            header.push(b);
        }
        let text = String::from_utf8_lossy(&header);
        let status: u16 = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("a response without a status")?;
        let mut length = 0usize;
        let mut chunked = false;
        for line in text.lines().skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    length = v.trim().parse().unwrap_or(0);
                } else if k == "transfer-encoding" && v.trim().eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        if method == "HEAD" || status == 204 || status == 304 {
            return Ok((status, Vec::new()));
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut line = Vec::new();
                while !line.ends_with(b"\r\n") {
                    line.push(self.stream.read_u8().await?);
                }
                let size = usize::from_str_radix(String::from_utf8_lossy(&line).trim(), 16)?;
                let mut chunk = vec![0; size + 2];
                self.stream.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            body.resize(length, 0);
            self.stream.read_exact(&mut body).await?;
        }
        Ok((status, body))
    }
}
