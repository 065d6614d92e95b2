//! `etcd`: the comparison load, KV.Put over etcd's native gRPC API, closed loop, the same
//! shape as `append --depth 1`: `--clients` each with one put in flight, spread over `--conns`
//! connections and every endpoint (as etcd's own benchmark tool does). etcd fsyncs its WAL
//! before acknowledging a put, so the durability matches raftwal's default.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

mod pb {
    #![allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
    tonic::include_proto!("etcdserverpb");
}

use pb::PutRequest;
use pb::kv_client::KvClient;

use crate::latency::{Latency, histogram};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// etcd client URLs (http://127.0.0.1:2379,...).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Concurrent clients, each with one put in flight.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// gRPC connections the clients share (at most one per client).
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Keys are drawn from this many.
    #[arg(long, default_value_t = 100_000)]
    key_space: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub durability: &'static str,
    pub value_size: usize,
    pub clients: usize,
    pub conns: usize,
    pub seconds: f64,
    pub records_per_s: f64,
    pub mb_per_s: f64,
    #[serde(flatten)]
    pub latency: Latency,
    pub errors: u64,
}

pub async fn run(args: &Args) -> anyhow::Result<Report> {
    let conns = args.conns.clamp(1, args.clients.max(1));
    let mut channels = Vec::new();
    for i in 0..conns {
        let url = args.endpoints[i % args.endpoints.len()].clone();
        let channel = tonic::transport::Endpoint::from_shared(url)?.connect().await?;
        channels.push(KvClient::new(channel));
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(histogram()));
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut kv = channels[c % conns].clone();
        let (stop, done, errors, hist) = (stop.clone(), done.clone(), errors.clone(), hist.clone());
        let value = vec![0x5a; args.value_size];
        let key_space = args.key_space.max(1);
        tasks.push(tokio::spawn(async move {
            let mut k = (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            while !stop.load(Ordering::Relaxed) {
                k = k
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let key = format!("k{:016}", (k >> 11) % key_space).into_bytes();
                let sent = Instant::now();
                let req = PutRequest { key, value: value.clone(), ..Default::default() };
                match kv.put(req).await {
                    Ok(_) => {
                        let now = Instant::now();
                        if now >= measure_from {
                            done.fetch_add(1, Ordering::Relaxed);
                            let _ = hist.lock().record((now - sent).as_micros().max(1) as u64);
                        }
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    let progress = std::io::stderr().is_terminal();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if progress {
            eprint!("\retcd put {:5.1}s", start.elapsed().as_secs_f64());
        }
    }
    if progress {
        eprintln!();
    }
    let seconds = Instant::now().saturating_duration_since(measure_from).as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed) as f64;
    for t in &tasks {
        t.abort();
    }
    let h = hist.lock().clone();
    Ok(Report {
        mode: "etcd-put",
        durability: "sync (etcd fsyncs its WAL before acknowledging)",
        value_size: args.value_size,
        clients: args.clients,
        conns,
        seconds,
        records_per_s: n / seconds,
        mb_per_s: n * args.value_size as f64 / seconds / 1e6,
        latency: Latency::of(&h),
        errors: errors.load(Ordering::Relaxed),
    })
}

pub fn print(r: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "etcd put: {} B values, {} clients over {} connections, {}, {:.1} s measured\n",
        r.value_size, r.clients, r.conns, r.durability, r.seconds
    );
    println!("| puts/s | MB/s | p50 us | p90 us | p99 us | p99.9 us | max us | errors |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {:.0} | {:.1} | {} | {} |",
        r.records_per_s,
        r.mb_per_s,
        r.latency.cells(),
        r.errors
    );
    Ok(())
}
