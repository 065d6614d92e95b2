//! The seeded whole-cluster simulator (tests/support/sim/) over fixed seed ranges, 3-node and
//! 5-node, split so that nextest runs the ranges in parallel; plus every seed that ever failed.
//! A failure prints each failing seed with its violation and the command that replays it.

#[path = "support/sim/mod.rs"]
mod sim;

use std::ops::Range;

fn run_seeds(nodes: u64, seeds: Range<u64>) {
    let failures: Vec<String> = seeds
        .filter_map(|seed| {
            let options = sim::Options::new(seed, nodes);
            let report = sim::run(&options);
            report.violation.map(|v| format!("{v}\n  replay: {}", options.replay_command()))
        })
        .collect();
    assert!(failures.is_empty(), "{} seeds failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn three_nodes_seeds_0_to_300() {
    run_seeds(3, 0..300);
}

#[test]
fn three_nodes_seeds_300_to_600() {
    run_seeds(3, 300..600);
}

#[test]
fn five_nodes_seeds_0_to_300() {
    run_seeds(5, 0..300);
}

#[test]
fn five_nodes_seeds_300_to_600() {
    run_seeds(5, 300..600);
}

/// Every seed that ever failed, as `(seed, nodes, fault steps)`, with the bug it found. (A
/// change to the simulator changes what a seed runs; the entries stay as permanent cases.)
const REGRESSION_SEEDS: &[(u64, u64, u64)] = &[
    // RawNode::new refused Restored.applied above the persisted commit (applied before persist).
    (10, 3, 2000),
    // The same restore bug, 5 nodes.
    (8, 5, 2000),
    // A node restarted with its commit index lost behind two membership changes in its log
    // counted votes by the membership before both and led without a committed entry (leader
    // completeness); fixed by RaftLog::committed_conf_change_floor. Seed 319 (5 nodes) is in
    // the ranges above.
    (684, 3, 2000),
    (1874, 3, 2000),
];

#[test]
fn regression_seeds() {
    let failures: Vec<String> = REGRESSION_SEEDS
        .iter()
        .filter_map(|&(seed, nodes, fault_steps)| {
            let options = sim::Options { fault_steps, ..sim::Options::new(seed, nodes) };
            sim::run(&options).violation
        })
        .collect();
    assert!(failures.is_empty(), "regression seeds failed:\n{}", failures.join("\n"));
}

/// The planted bug the damage faults exist to catch: a node whose log damage cut restarts
/// without its repair floor, votes by its shorter log and elects leaders without entries that
/// were committed with its help. The checks must see it.
#[test]
fn a_damaged_node_restarted_without_its_repair_floor_is_caught() {
    let caught = (0..300)
        .filter(|&seed| {
            let nodes = if seed % 2 == 0 { 3 } else { 5 };
            let options =
                sim::Options { ignore_repair_floor: true, ..sim::Options::new(seed, nodes) };
            sim::run(&options).violation.is_some()
        })
        .count();
    assert!(caught > 0, "no seed caught a node voting by its cut log");
}
