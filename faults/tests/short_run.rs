//! A short real run: 3 nodes, kill -9 and SIGSTOP faults (and partitions when root), about
//! 25 s of faults; no violation may be found.

use std::time::Duration;

use raftwal_faults::cluster::is_root;
use raftwal_faults::nemesis::FaultKind;
use raftwal_faults::run::{RunOptions, run};

#[test]
fn short_run_with_kills_and_pauses_finds_no_violation() -> anyhow::Result<()> {
    let mut kinds =
        vec![FaultKind::Kill, FaultKind::KillLeader, FaultKind::Pause, FaultKind::PauseLeader];
    if is_root() {
        kinds.push(FaultKind::PartitionLeader);
    } else {
        eprintln!("short_run: not root, skipping the partition part (nftables needs root)");
    }
    let opts = RunOptions::new(3, kinds, Duration::from_secs(25), 42);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let output = runtime.block_on(run(opts))?;
    let report = output.report;
    eprint!("{}", report.human());
    eprintln!("{}", report.last_line());
    assert!(report.faults.len() >= 3, "too few faults injected: {}", report.faults.len());
    assert!(report.check.acked > 0, "nothing was acknowledged");
    assert_eq!(report.check.violations, 0, "{:#?}", report.check.details);
    Ok(())
}
