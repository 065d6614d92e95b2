//! `append`, `follow` and `mixed`: load on a raftwal cluster through the real client.
//!
//! - `append`: closed loop (each of `--clients` keeps `--depth` appends in flight: depth 1 is
//!   one `Client::append` at a time, more is an `Appender` over AppendStream) or open loop
//!   (`--rate` appends/s in total, each append timed from when it was due, so a stall counts
//!   against every append it delayed: no coordinated omission).
//! - `follow`: the same appends, plus `--followers` Follow streams from the end of the log;
//!   consumer records/s and end-to-end latency (append sent -> record delivered; records carry
//!   their send time).
//! - `mixed`: appends, followers and a reader of recent offsets at once.
//!
//! Every result states its durability mode. Latencies are in microseconds.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use raftwal_client::{AppenderConfig, Client, ClientConfig, FollowEvent, Offset};
use tokio_stream::StreamExt;

use crate::cluster::{self, LocalCluster, NodeFigures};
use crate::latency::{Latency, histogram, us};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Start N nodes on loopback in this process (fsync on unless --durability says otherwise).
    #[arg(long, conflicts_with = "endpoints")]
    local: Option<u64>,
    /// Client endpoints of a running cluster (http://host:port, comma-separated).
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// The cluster CA certificate, for https:// endpoints (e.g. raftwal-dev/certs/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// HTTP admin addresses of that cluster's nodes, to read their fsync figures.
    #[arg(long, value_delimiter = ',')]
    metrics: Vec<std::net::SocketAddr>,
    /// Bytes per record.
    #[arg(long, default_value_t = 256)]
    record_size: usize,
    /// Records per append.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Concurrent clients (each with its own connection).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Appends in flight per client.
    #[arg(long, default_value_t = 1)]
    depth: u32,
    /// Connections the clients share (each client is its own producer on one of them).
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Open loop: appends per second in total (instead of a closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured seconds (e.g. 20 or 20s).
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value = "2", value_parser = parse_secs)]
    warmup: f64,
    /// Follow streams (`follow` and `mixed`).
    #[arg(long, default_value_t = 1)]
    followers: usize,
    /// The nodes' durability for --local: `sync` (fdatasync before acknowledging) or
    /// `unsafe-no-sync`. With --endpoints, the mode the cluster runs in (reported as given).
    #[arg(long, default_value = "sync")]
    durability: String,
    /// Where --local keeps its data.
    #[arg(long, default_value = "target/bench-cluster")]
    dir: PathBuf,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_secs(s: &str) -> Result<f64, String> {
    let t = s.trim().trim_end_matches('s');
    t.parse::<f64>()
        .map_err(|_| format!("{s:?} is not a number of seconds"))
        .and_then(|v| if v >= 0.0 { Ok(v) } else { Err("seconds must not be negative".into()) })
}

/// Which load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Append,
    Follow,
    Mixed,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Append => "append",
            Mode::Follow => "follow",
            Mode::Mixed => "mixed",
        }
    }
}

/// What a run measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub durability: String,
    pub nodes: String,
    pub record_size: usize,
    pub batch: usize,
    pub clients: usize,
    pub depth: u32,
    pub conns: usize,
    pub rate: Option<f64>,
    pub seconds: f64,
    pub records_per_s: f64,
    pub mb_per_s: f64,
    pub appends_per_s: f64,
    #[serde(flatten)]
    pub latency: Latency,
    pub errors: u64,
    pub follow_records_per_s: Option<f64>,
    pub e2e_p50_us: Option<f64>,
    pub e2e_p99_us: Option<f64>,
    pub reads_per_s: Option<f64>,
    pub node: NodeFigures,
}

struct Shared {
    epoch: Instant,
    measure_from: Instant,
    stop: AtomicBool,
    acked_records: AtomicU64,
    acked_appends: AtomicU64,
    errors: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    followed: AtomicU64,
    e2e: Mutex<Histogram<u64>>,
    reads: AtomicU64,
}

impl Shared {
    fn measuring(&self, at: Instant) -> bool {
        at >= self.measure_from
    }

    fn acked(&self, records: u64, latency: Duration, at: Instant) {
        if self.measuring(at) {
            self.acked_records.fetch_add(records, Ordering::Relaxed);
            self.acked_appends.fetch_add(1, Ordering::Relaxed);
            let _ = self.latency.lock().record(latency.as_micros().max(1) as u64);
        }
    }
}

/// A record: its send time (ns since the run's epoch) then filler; at least 8 bytes.
fn record(shared: &Shared, size: usize) -> Vec<u8> {
    let mut r = vec![0x5a; size.max(8)];
    let ns = shared.epoch.elapsed().as_nanos() as u64;
    r[..8].copy_from_slice(&ns.to_le_bytes());
    r
}

pub async fn run(mode: Mode, args: &Args) -> anyhow::Result<Report> {
    let local = match args.local {
        Some(n) => Some(LocalCluster::start(n, &args.durability, &args.dir).await?),
        None => None,
    };
    let (endpoints, metrics) = match &local {
        // One recorder per process: the first node's /metrics already covers all of them.
        Some(c) => (c.endpoints(), c.http_addrs().into_iter().take(1).collect::<Vec<_>>()),
        None => {
            anyhow::ensure!(!args.endpoints.is_empty(), "give --local N or --endpoints");
            (args.endpoints.clone(), args.metrics.clone())
        }
    };
    let nodes = match args.local {
        Some(n) => format!("{n} local (loopback, in-process)"),
        None => format!("{} endpoints", endpoints.len()),
    };
    let result = measure(mode, args, &endpoints, &metrics, nodes).await;
    if let Some(c) = local {
        c.stop().await;
    }
    result
}

async fn connect(endpoints: &[String], ca: Option<&PathBuf>) -> anyhow::Result<Client> {
    let mut config = ClientConfig::new(endpoints.to_vec());
    config.request_timeout = Duration::from_secs(10);
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
        config = config.with_tls(raftwal_client::ClientTls::new(pem));
    }
    Ok(Client::connect(config).await?)
}

async fn measure(
    mode: Mode,
    args: &Args,
    endpoints: &[String],
    metrics: &[std::net::SocketAddr],
    nodes: String,
) -> anyhow::Result<Report> {
    let probe = connect(endpoints, args.ca.as_ref()).await?;
    // Wait for a leader: one append must go through.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match probe.append([b"raftwal-bench probe".to_vec()]).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                if std::io::stderr().is_terminal() {
                    eprintln!("waiting for a leader: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).context("no leader"),
        }
    }
    let now = Instant::now();
    let shared = Arc::new(Shared {
        epoch: now,
        measure_from: now + Duration::from_secs_f64(args.warmup),
        stop: AtomicBool::new(false),
        acked_records: AtomicU64::new(0),
        acked_appends: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        latency: Mutex::new(histogram()),
        followed: AtomicU64::new(0),
        e2e: Mutex::new(histogram()),
        reads: AtomicU64::new(0),
    });
    let mut tasks = Vec::new();
    if mode != Mode::Append {
        let start = probe.status().await?.commit_offset + 1;
        for _ in 0..args.followers {
            let client = connect(endpoints, args.ca.as_ref()).await?;
            let shared = shared.clone();
            tasks.push(tokio::spawn(follower(client, Offset(start), shared)));
        }
    }
    if mode == Mode::Mixed {
        let client = connect(endpoints, args.ca.as_ref()).await?;
        tasks.push(tokio::spawn(reader(client, shared.clone())));
    }
    let before = cluster::read_node_metrics(metrics).await;
    let conns = args.conns.clamp(1, args.clients.max(1));
    let mut bases = Vec::new();
    for _ in 0..conns {
        bases.push(connect(endpoints, args.ca.as_ref()).await?);
    }
    for c in 0..args.clients {
        let client = bases[c % conns].new_producer();
        let shared = shared.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            match args.rate {
                Some(rate) => {
                    // Each client's share of the rate, its schedule offset within one interval.
                    let interval = Duration::from_secs_f64(args.clients as f64 / rate.max(1e-3));
                    let offset = interval.mul_f64(c as f64 / args.clients.max(1) as f64);
                    let pace = Some((Instant::now() + offset, interval));
                    pipelined(client, shared, args, pace).await
                }
                None if args.depth <= 1 => closed_loop_one(client, shared, args).await,
                None => pipelined(client, shared, args, None).await,
            }
        }));
    }
    let end = shared.measure_from + Duration::from_secs_f64(args.duration);
    let progress = std::io::stderr().is_terminal();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if progress {
            let elapsed = shared.epoch.elapsed().as_secs_f64();
            let measured =
                Instant::now().saturating_duration_since(shared.measure_from).as_secs_f64();
            let rate = if measured > 0.0 {
                shared.acked_records.load(Ordering::Relaxed) as f64 / measured
            } else {
                0.0
            };
            eprint!(
                "\r{} {:5.1}s of {:.0}s  {:>9.0} records/s{}   ",
                mode.name(),
                elapsed,
                args.warmup + args.duration,
                rate,
                if measured > 0.0 { "" } else { " (warm-up)" }
            );
        }
    }
    let seconds = Instant::now().saturating_duration_since(shared.measure_from).as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    let records = shared.acked_records.load(Ordering::Relaxed) as f64;
    let appends = shared.acked_appends.load(Ordering::Relaxed) as f64;
    let followed = shared.followed.load(Ordering::Relaxed) as f64;
    let reads = shared.reads.load(Ordering::Relaxed) as f64;
    if progress {
        eprintln!();
    }
    let after = cluster::read_node_metrics(metrics).await;
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    let h = shared.latency.lock().clone();
    let e2e = shared.e2e.lock().clone();
    Ok(Report {
        mode: mode.name(),
        durability: args.durability.clone(),
        nodes,
        record_size: args.record_size,
        batch: args.batch,
        clients: args.clients,
        depth: args.depth,
        conns: args.conns.clamp(1, args.clients.max(1)),
        rate: args.rate,
        seconds,
        records_per_s: records / seconds,
        mb_per_s: records * args.record_size as f64 / seconds / 1e6,
        appends_per_s: appends / seconds,
        latency: Latency::of(&h),
        errors: shared.errors.load(Ordering::Relaxed),
        follow_records_per_s: (mode != Mode::Append).then_some(followed / seconds),
        e2e_p50_us: (mode != Mode::Append && !e2e.is_empty()).then(|| us(&e2e, 0.5)),
        e2e_p99_us: (mode != Mode::Append && !e2e.is_empty()).then(|| us(&e2e, 0.99)),
        reads_per_s: (mode == Mode::Mixed).then_some(reads / seconds),
        node: cluster::figures(&before, &after),
    })
}

fn batch(shared: &Shared, args: &Args) -> Vec<Vec<u8>> {
    (0..args.batch.max(1)).map(|_| record(shared, args.record_size)).collect()
}

async fn closed_loop_one(client: Client, shared: Arc<Shared>, args: Args) {
    while !shared.stop.load(Ordering::Relaxed) {
        let records = batch(&shared, &args);
        let n = records.len() as u64;
        let sent = Instant::now();
        match client.append(records).await {
            Ok(_) => {
                let now = Instant::now();
                shared.acked(n, now - sent, now);
            }
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Appends over one AppendStream. Without `pace`, a closed loop: as fast as the window allows,
/// each append timed from its send. With `pace` (the first due time, the interval), an open
/// loop: each append is due at its slot and timed from then, not from when the window let it
/// go, so a stall counts against every append it delayed.
async fn pipelined(
    client: Client,
    shared: Arc<Shared>,
    args: Args,
    pace: Option<(Instant, Duration)>,
) {
    let window = if pace.is_some() { args.depth.max(64) } else { args.depth };
    let Ok(appender) = client.appender(AppenderConfig { window }) else {
        shared.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    // Answers come in order: one task awaits them as they come.
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(raftwal_client::AppendTicket, Instant, u64)>(window as usize);
    let waiter = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some((ticket, timed_from, n)) = rx.recv().await {
                match ticket.await {
                    Ok(_) => {
                        let now = Instant::now();
                        shared.acked(n, now - timed_from, now);
                    }
                    Err(_) => {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let mut i: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let timed_from = match pace {
            Some((start, interval)) => {
                let due = start + interval.mul_f64(i as f64);
                i += 1;
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => Instant::now(),
        };
        let records = batch(&shared, &args);
        let n = records.len() as u64;
        match appender.send(records).await {
            Ok(ticket) => {
                if tx.send((ticket, timed_from, n)).await.is_err() {
                    break;
                }
            }
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                if pace.is_none() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    drop(tx);
    let _ = waiter.await;
}

async fn follower(client: Client, from: Offset, shared: Arc<Shared>) {
    let mut stream = client.follow(from);
    while let Some(event) = stream.next().await {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(FollowEvent::Records(records)) = event else { continue };
        let now = Instant::now();
        if !shared.measuring(now) {
            continue;
        }
        let now_ns = shared.epoch.elapsed().as_nanos() as u64;
        let mut e2e = shared.e2e.lock();
        for r in &records {
            if r.data.len() >= 8 {
                let sent = u64::from_le_bytes(r.data[..8].try_into().expect("8 bytes"));
                let _ = e2e.record((now_ns.saturating_sub(sent) / 1000).max(1));
            }
        }
        shared.followed.fetch_add(records.len() as u64, Ordering::Relaxed);
    }
}

async fn reader(client: Client, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok(status) = client.status().await else { continue };
        let from = status.commit_offset.saturating_sub(1000).max(status.first_offset);
        if client.read(Offset(from), 100, 0).await.is_ok() && shared.measuring(Instant::now()) {
            shared.reads.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Prints a report as a markdown table or one JSON object.
pub fn print(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    let load = match report.rate {
        Some(r) => format!("open loop {r:.0} appends/s"),
        None => format!(
            "closed loop, {} clients x depth {} over {} connections",
            report.clients, report.depth, report.conns
        ),
    };
    println!(
        "raftwal-bench {}: {} nodes, durability {}, {} B records x {} per append, {load}, {:.1} s measured\n",
        report.mode,
        report.nodes,
        report.durability,
        report.record_size,
        report.batch,
        report.seconds
    );
    println!(
        "| records/s | MB/s | appends/s | p50 us | p90 us | p99 us | p99.9 us | max us | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {:.0} | {:.1} | {:.0} | {} | {} |",
        report.records_per_s,
        report.mb_per_s,
        report.appends_per_s,
        report.latency.cells(),
        report.errors
    );
    if let Some(f) = report.follow_records_per_s {
        println!(
            "\nfollowers: {f:.0} records/s delivered; append-to-delivery p50 {} us, p99 {} us",
            report.e2e_p50_us.map_or("-".into(), |v| format!("{v:.0}")),
            report.e2e_p99_us.map_or("-".into(), |v| format!("{v:.0}"))
        );
    }
    if let Some(r) = report.reads_per_s {
        println!("reads: {r:.0}/s (100 recent records each)");
    }
    let n = &report.node;
    println!(
        "\nnodes' WAL: {:.0} fsyncs, mean {} us, p99 <= {} us; mean group {} entries",
        n.fsyncs,
        n.fsync_mean_us.map_or("-".into(), |v| format!("{v:.0}")),
        n.fsync_p99_le_us.map_or("-".into(), |v| format!("{v:.0}")),
        n.group_entries_mean.map_or("-".into(), |v| format!("{v:.1}"))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(extra: &[&str]) -> Args {
        let dir = std::env::temp_dir().join("raftwal-bench-smoke");
        let mut argv = vec!["bench", "--local", "3", "--duration", "1", "--warmup", "0.5"];
        argv.extend_from_slice(extra);
        let mut args = Cli::parse_from(argv).args;
        args.dir = dir;
        args
    }

    /// The modes run end to end against a local cluster and report what they did (a smoke
    /// test: figures are checked by running the program, never asserted here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_mode_runs_and_reports() {
        let r = run(Mode::Mixed, &args(&["--clients", "2", "--depth", "4", "--json"]))
            .await
            .expect("mixed");
        assert!(r.records_per_s > 0.0 && r.follow_records_per_s.is_some_and(|f| f > 0.0), "{r:?}");
        assert!(r.reads_per_s.is_some() && r.errors == 0, "{r:?}");
        assert_eq!(r.durability, "sync");
        let json = serde_json::to_value(&r).expect("json");
        for field in ["records_per_s", "mb_per_s", "p50_us", "p99_us", "durability"] {
            assert!(json.get(field).is_some(), "--json lacks {field}: {json}");
        }
        let r = run(
            Mode::Append,
            &args(&["--clients", "2", "--rate", "200", "--durability", "unsafe-no-sync"]),
        )
        .await
        .expect("open loop");
        assert!(r.records_per_s > 0.0 && r.durability == "unsafe-no-sync", "{r:?}");
        print(&r, true).expect("json");
    }
}
