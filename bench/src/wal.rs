//! `raftwal-bench wal`: group-commit throughput and latency of the WAL with fsync on, against
//! the raw baseline on the same directory: one positioned write of the WAL's mean group size
//! plus one `fdatasync`, in a loop, into preallocated files.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::latency::{histogram, us};
use raftwal_wal::{Durability, Entry, LogIndex, Options, Term, Wal, frame_bytes};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Directory for the WAL and the baseline files (created; its contents are removed after).
    #[arg(long, default_value = "target/bench-wal")]
    dir: PathBuf,
    /// Seconds to run each writer count (and each baseline).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Writer counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    writers: Vec<usize>,
    /// Record payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Skip fdatasync (UNSAFE: loses acknowledged appends on power loss; figures say so).
    #[arg(long)]
    unsafe_no_sync: bool,
    /// Prepare segments on a background thread (zero-filled ahead; see ARCHITECTURE.md).
    #[arg(long)]
    prepare_segments: bool,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Debug)]
struct Row {
    writers: usize,
    durability: &'static str,
    prepare_segments: bool,
    record_bytes: usize,
    seconds: f64,
    records_per_s: f64,
    mb_per_s: f64,
    fsyncs_per_s: f64,
    mean_fsync_us: f64,
    mean_group_entries: f64,
    mean_group_bytes: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    raw_mb_per_s: f64,
    raw_fsync_p50_us: f64,
    ratio: f64,
    p50_vs_raw_fsync: f64,
}

struct WalRun {
    records: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    groups: u64,
    syncs: u64,
    group_bytes: u64,
    sync_us: u64,
}

fn run_wal(dir: &Path, writers: usize, args: &Args) -> anyhow::Result<WalRun> {
    let _ = std::fs::remove_dir_all(dir);
    let opts = Options {
        durability: if args.unsafe_no_sync { Durability::UnsafeNoSync } else { Durability::Sync },
        prepare_segments: args.prepare_segments,
        ..Options::default()
    };
    let wal = Arc::new(Wal::open(dir, opts).context("open wal")?);
    // Indexes are assigned under one lock that also covers `submit`, as a Raft driver does.
    let next = Arc::new(Mutex::new(1u64));
    let payload = Arc::new(vec![0xabu8; args.record_bytes]);
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let (wal, next, payload) = (wal.clone(), next.clone(), payload.clone());
            std::thread::spawn(move || -> anyhow::Result<(u64, Histogram<u64>)> {
                let mut h = histogram();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let ticket = {
                        let mut i = next.lock().expect("index lock");
                        let entry = Entry { term: Term(1), index: LogIndex(*i), payload: &payload };
                        let t = wal.submit(&[entry])?;
                        *i += 1;
                        t
                    };
                    wal.wait(ticket)?;
                    h.saturating_record(t0.elapsed().as_micros() as u64);
                    n += 1;
                }
                Ok((n, h))
            })
        })
        .collect();
    let mut latency_us = histogram();
    let mut records = 0;
    for t in threads {
        let (n, h) = t.join().expect("writer thread")?;
        records += n;
        latency_us.add(&h).expect("same bounds");
    }
    let elapsed = start.elapsed();
    let stats = wal.stats();
    Ok(WalRun {
        records,
        elapsed,
        latency_us,
        groups: stats.groups,
        syncs: stats.segment_syncs,
        group_bytes: stats.bytes,
        sync_us: stats.segment_sync_us,
    })
}

/// The raw baseline: `pwrite(group_bytes)` + `fdatasync` in a loop, appending into files
/// preallocated like WAL segments. Returns (MB/s, fdatasync p50 in µs).
fn run_raw(dir: &Path, group_bytes: usize, args: &Args) -> anyhow::Result<(f64, f64)> {
    std::fs::create_dir_all(dir)?;
    const FILE_BYTES: u64 = 64 << 20;
    let buf = vec![0xcdu8; group_bytes];
    let mut h = histogram();
    let mut written = 0u64;
    let mut file_no = 0;
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    while Instant::now() < deadline {
        let path = dir.join(format!("raw-{file_no}"));
        file_no += 1;
        let file =
            OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, FILE_BYTES)?;
        let mut off = 0u64;
        while off + group_bytes as u64 <= FILE_BYTES && Instant::now() < deadline {
            file.write_all_at(&buf, off)?;
            let t0 = Instant::now();
            if !args.unsafe_no_sync {
                file.sync_data()?;
            }
            h.saturating_record(t0.elapsed().as_micros() as u64);
            off += group_bytes as u64;
            written += group_bytes as u64;
        }
        drop(file);
        std::fs::remove_file(&path)?;
    }
    let mb_per_s = written as f64 / start.elapsed().as_secs_f64() / 1e6;
    Ok((mb_per_s, us(&h, 0.5)))
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let durability = if args.unsafe_no_sync { "UNSAFE-no-fsync" } else { "fsync" };
    if !args.json {
        println!(
            "raftwal-bench wal: {} B records, {:.1} s per run, durability {durability}, prepared segments {}, dir {}",
            args.record_bytes,
            args.seconds,
            args.prepare_segments,
            args.dir.display()
        );
        println!(
            "| writers | records/s | MB/s | fsyncs/s | mean fsync µs | group entries | p50 µs | p99 µs | p99.9 µs | raw MB/s | raw fsync p50 µs | WAL/raw | p50/raw fsync |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    }
    for &writers in &args.writers {
        let w = run_wal(&args.dir.join(format!("wal-{writers}")), writers, args)?;
        let secs = w.elapsed.as_secs_f64();
        let frame = frame_bytes(args.record_bytes as u64) as f64;
        let mean_group_entries = w.records as f64 / w.groups.max(1) as f64;
        let mean_group_bytes = w.group_bytes as f64 / w.groups.max(1) as f64;
        let (raw_mb_per_s, raw_fsync_p50_us) =
            run_raw(&args.dir.join("raw"), mean_group_bytes.round().max(frame) as usize, args)?;
        let mb_per_s = w.records as f64 * args.record_bytes as f64 / secs / 1e6;
        // The raw loop writes frames' worth of bytes; compare like with like.
        let wal_frame_mb_per_s = w.group_bytes as f64 / secs / 1e6;
        let row = Row {
            writers,
            durability,
            prepare_segments: args.prepare_segments,
            record_bytes: args.record_bytes,
            seconds: secs,
            records_per_s: w.records as f64 / secs,
            mb_per_s,
            fsyncs_per_s: w.syncs as f64 / secs,
            mean_fsync_us: w.sync_us as f64 / w.syncs.max(1) as f64,
            mean_group_entries,
            mean_group_bytes,
            p50_us: us(&w.latency_us, 0.5),
            p99_us: us(&w.latency_us, 0.99),
            p999_us: us(&w.latency_us, 0.999),
            raw_mb_per_s,
            raw_fsync_p50_us,
            ratio: wal_frame_mb_per_s / raw_mb_per_s,
            p50_vs_raw_fsync: us(&w.latency_us, 0.5) / raw_fsync_p50_us.max(1.0),
        };
        if args.json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            println!(
                "| {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.2} | {:.2} |",
                row.writers,
                row.records_per_s,
                row.mb_per_s,
                row.fsyncs_per_s,
                row.mean_fsync_us,
                row.mean_group_entries,
                row.p50_us,
                row.p99_us,
                row.p999_us,
                row.raw_mb_per_s,
                row.raw_fsync_p50_us,
                row.ratio,
                row.p50_vs_raw_fsync
            );
        }
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}
