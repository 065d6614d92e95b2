//! Runs the seeded whole-cluster simulator over many seeds and reports the violations found.
//!
//! `cargo run --release -p raftwal-consensus --example sim -- --seeds 2000`
//! `cargo run --release -p raftwal-consensus --example sim -- --seeds 1 --start 42 --nodes 5 --verbose`
//!
//! Without `--nodes`, even seeds run 3 nodes and odd seeds 5. Prints each failing seed with its
//! violation and replay command, the simulated steps per wall-clock second, and last the line
//! `seeds: N violations: V`; the exit status is non-zero when V > 0.

#[path = "../tests/support/sim/mod.rs"]
mod sim;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Seeded whole-cluster simulation of raftwal-consensus")]
struct Args {
    /// How many seeds to run.
    #[arg(long)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Founding voters per cluster (3 or 5); alternates per seed when absent.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["3", "5"]))]
    nodes: Option<String>,
    /// Steps of the fault phase (the liveness phase follows).
    #[arg(long, default_value_t = sim::FAULT_STEPS_DEFAULT)]
    steps: u64,
    /// Print every event and delivered message.
    #[arg(long)]
    verbose: bool,
    /// Plant a bug: damaged nodes restart without their repair floor (shows the checks catch
    /// it).
    #[arg(long)]
    ignore_repair_floor: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let fixed_nodes: Option<u64> = args.nodes.as_deref().map(|n| n.parse().expect("3 or 5"));
    let started = Instant::now();
    let (mut steps, mut violations) = (0u64, 0u64);
    let (mut damaged, mut stalls) = (0u64, 0u64);
    for seed in args.start..args.start.saturating_add(args.seeds) {
        let nodes = fixed_nodes.unwrap_or(if seed % 2 == 0 { 3 } else { 5 });
        let options = sim::Options {
            fault_steps: args.steps,
            verbose: args.verbose,
            ignore_repair_floor: args.ignore_repair_floor,
            ..sim::Options::new(seed, nodes)
        };
        let report = sim::run(&options);
        steps += report.steps;
        damaged += report.stats.damaged;
        stalls += report.stats.only_copy_stalls;
        if args.verbose {
            println!("seed {seed}: {} steps, {:?}", report.steps, report.stats);
        }
        if let Some(violation) = report.violation {
            violations += 1;
            println!("FAIL {violation}\n  replay: {}", options.replay_command());
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    println!("steps: {steps} wall: {wall_s:.2} s steps/s: {:.0}", steps as f64 / wall_s.max(1e-9));
    println!("damaged restarts: {damaged} stalled on the only copy: {stalls}");
    println!("seeds: {} violations: {violations}", args.seeds);
    if violations > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
