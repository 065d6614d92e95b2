//! `raftwal-faults`: see the library's docs. Prints progress on stderr, then a summary (or
//! with `--json` a JSON document) on stdout whose last line is
//! `faults: F acked: A lost: L duplicated: D reordered: R diverged: X violations: V`.
//! Exits 1 when violations > 0.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use raftwal_faults::nemesis::FaultKind;
use raftwal_faults::run::{RunOptions, run};
use raftwal_faults::selftest;

#[derive(Parser, Debug)]
#[command(
    name = "raftwal-faults",
    about = "Kill, pause, partition and damage a real raftwal cluster under a checked workload"
)]
struct Args {
    /// Cluster size (3 or 5; up to 9).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Fault kinds, comma-separated: kill, kill-leader, kill-all, pause, pause-leader,
    /// partition, partition-leader, partition-oneway, partition-bridge, bitflip, truncate,
    /// meta, log-start, disk-full; or all, kills, pauses, partitions, disk.
    #[arg(long, default_value = "all")]
    faults: String,
    /// How long faults are injected, e.g. 120s, 2m, 500ms.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// The seed of the fault schedule (random when absent; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Print the report as JSON (the last line stays the summary line).
    #[arg(long)]
    json: bool,
    /// Check the checker: a clean synthetic history and three doctored copies.
    #[arg(long)]
    selftest: bool,
    /// The raftwal binary (default: next to this executable, else built with cargo).
    #[arg(long, env = "RAFTWAL_BIN")]
    raftwal_bin: Option<std::path::PathBuf>,
    /// Keep the run's directory (configs, node logs) even when nothing was found.
    #[arg(long)]
    keep: bool,
    /// Size of each node's tmpfs in MiB (when root). Nodes refuse appends below
    /// `disk_free_min_bytes` free (256 MiB by default), so keep it well above that plus the log.
    #[arg(long, default_value_t = 1024)]
    tmpfs_mb: u64,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) =
        s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let value: f64 = number.parse().map_err(|_| format!("{s:?}: not a duration like 120s"))?;
    let secs = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.selftest {
        let (history, logs) = selftest::synthetic(args.nodes);
        let (lines, ok) = selftest::run(&history, &logs);
        for line in lines {
            println!("{line}");
        }
        println!("selftest: {}", if ok { "passed" } else { "FAILED" });
        return if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    match real_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("raftwal-faults: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<ExitCode> {
    let kinds = FaultKind::parse_list(&args.faults)?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_007)
            .unwrap_or(1)
    });
    let mut opts = RunOptions::new(args.nodes, kinds, args.duration, seed);
    opts.raftwal_bin = args.raftwal_bin;
    opts.keep = args.keep;
    opts.tmpfs_mb = args.tmpfs_mb;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let output = runtime.block_on(run(opts))?;
    let report = output.report;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("serialise the report")?);
    } else {
        print!("{}", report.human());
        println!(
            "seed {seed} (replays the same fault schedule: --seed {seed}); run dir {}",
            output.dir.display()
        );
    }
    println!("{}", report.last_line());
    Ok(if report.check.violations > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
