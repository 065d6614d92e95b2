//! `raftwal-bench fsync`: what one `pwrite` + `fdatasync` costs on this disk when the blocks
//! were only reserved by `fallocate` (the sync must also commit the extent conversion through
//! the filesystem journal) and when they were written before (a pure data flush). This is the
//! measurement behind `Options::prepare_segments` (ARCHITECTURE.md).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Directory for the probe file (created; the file is removed after).
    #[arg(long, default_value = "target/bench-fsync")]
    dir: PathBuf,
    /// Bytes per write.
    #[arg(long, default_value_t = 32 << 10)]
    write_bytes: usize,
    /// Writes (each followed by fdatasync) per case.
    #[arg(long, default_value_t = 2000)]
    writes: u64,
    /// Print one JSON object per case instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Debug)]
struct Row {
    blocks: &'static str,
    write_bytes: usize,
    fdatasync_p50_us: u64,
    fdatasync_p99_us: u64,
    mb_per_s: f64,
}

const FILE_BYTES: u64 = 64 << 20;

fn case(args: &Args, prewritten: bool) -> anyhow::Result<Row> {
    std::fs::create_dir_all(&args.dir)?;
    let path = args.dir.join("probe.dat");
    let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, FILE_BYTES)?;
    if prewritten {
        let zeros = vec![0u8; 1 << 20];
        for off in (0..FILE_BYTES).step_by(zeros.len()) {
            file.write_all_at(&zeros, off)?;
        }
        file.sync_data()?;
    }
    let buf = vec![0x5au8; args.write_bytes];
    let writes = args.writes.min(FILE_BYTES / args.write_bytes as u64);
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let start = Instant::now();
    for i in 0..writes {
        file.write_all_at(&buf, i * args.write_bytes as u64)?;
        let t = Instant::now();
        file.sync_data()?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(Row {
        blocks: if prewritten { "fallocated+prewritten" } else { "fallocated" },
        write_bytes: args.write_bytes,
        fdatasync_p50_us: h.value_at_quantile(0.5),
        fdatasync_p99_us: h.value_at_quantile(0.99),
        mb_per_s: (writes * args.write_bytes as u64) as f64 / secs / 1e6,
    })
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    if !args.json {
        println!(
            "raftwal-bench fsync: {} B pwrite + fdatasync, {} writes per case, dir {}",
            args.write_bytes,
            args.writes,
            args.dir.display()
        );
        println!("| blocks | fdatasync p50 µs | p99 µs | MB/s |");
        println!("|---|---|---|---|");
    }
    for prewritten in [false, true] {
        let row = case(args, prewritten)?;
        if args.json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            println!(
                "| {} | {} | {} | {:.1} |",
                row.blocks, row.fdatasync_p50_us, row.fdatasync_p99_us, row.mb_per_s
            );
        }
    }
    Ok(())
}
