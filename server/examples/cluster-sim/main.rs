//! `cluster-sim`: whole clusters of node cores over the real WAL on simulated disks, a
//! simulated network and clock, and simulated clients, from one seed per run.
//!
//! ```text
//! cargo run --release -p raftwal-server --example cluster-sim -- --seeds 2000
//! cargo run --release -p raftwal-server --example cluster-sim -- --start 17 --seeds 1   # replay
//! cargo run --release -p raftwal-server --example cluster-sim -- --inject skip-dedup --seeds 200
//! ```
//! Prints steps per second and ends with `seeds: N violations: V`; a failing seed prints its
//! history and the command that replays it.

mod harness;

use std::time::Instant;

fn main() {
    let mut seeds = 100u64;
    let mut start = 1u64;
    let mut bug = None;
    let mut nodes: Option<u64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&format!("{arg} needs a value")));
        match arg.as_str() {
            "--seeds" => seeds = value().parse().unwrap_or_else(|_| usage("--seeds N")),
            "--start" => start = value().parse().unwrap_or_else(|_| usage("--start SEED")),
            "--nodes" => nodes = Some(value().parse().unwrap_or_else(|_| usage("--nodes 3|5"))),
            "--inject" => bug = Some(value().parse().unwrap_or_else(|e: String| usage(&e))),
            _ => usage(&format!("unknown argument {arg}")),
        }
    }
    let began = Instant::now();
    let mut steps = 0u64;
    let mut violations = 0u64;
    let mut acked = 0u64;
    let mut failing = Vec::new();
    for seed in start..start + seeds {
        // Odd seeds run 3 nodes, even seeds 5, unless --nodes says.
        let n = nodes.unwrap_or(if seed % 2 == 1 { 3 } else { 5 });
        let report = harness::run(harness::Options { bug, ..harness::Options::new(seed, n) });
        steps += report.steps;
        acked += report.acked;
        if !report.violations.is_empty() {
            violations += 1;
            failing.push(seed);
            if violations <= 3 {
                println!("== seed {seed} ({n} nodes): history");
                // A replay of one seed prints all of it; a campaign the end of each.
                let keep = if seeds == 1 { usize::MAX } else { 400 };
                for line in report.history.iter().rev().take(keep).rev() {
                    println!("{line}");
                }
                println!("== seed {seed}: violations");
                for v in &report.violations {
                    println!("  {v}");
                }
                let inject = bug.map(|b| format!(" --inject {}", name(b))).unwrap_or_default();
                println!(
                    "replay: cargo run --release -p raftwal-server --example cluster-sim -- \
                     --start {seed} --seeds 1{inject}"
                );
            }
        }
    }
    let secs = began.elapsed().as_secs_f64();
    println!(
        "{steps} steps in {secs:.1} s ({:.0} steps/s), {acked} appends acknowledged",
        steps as f64 / secs
    );
    if !failing.is_empty() {
        println!("failing seeds: {failing:?}");
    }
    println!("seeds: {seeds} violations: {violations}");
}

fn name(bug: raftwal_server::core::PlantedBug) -> &'static str {
    use raftwal_server::core::PlantedBug::*;
    match bug {
        AckBeforeQuorum => "ack-before-quorum",
        SkipDedup => "skip-dedup",
        ServeUncommitted => "serve-uncommitted",
        SkipStreamDedup => "skip-stream-dedup",
        SkipStreamReplay => "skip-stream-replay",
    }
}

fn usage(why: &str) -> ! {
    eprintln!("cluster-sim: {why}");
    eprintln!(
        "usage: cluster-sim [--seeds N] [--start SEED] [--nodes 3|5] \
         [--inject ack-before-quorum|skip-dedup|serve-uncommitted]"
    );
    std::process::exit(2)
}
