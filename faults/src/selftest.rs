//! The checker's self-test: a clean history must pass, and three doctored copies of it (an
//! acknowledged record dropped from the log, a record duplicated, two records swapped) must
//! each be reported.

use crate::checker::{CheckResult, check};
use crate::history::{AppendOp, AppendOutcome, FollowLog, History, NodeLog, ReadOp};

/// A clean synthetic history of `nodes` nodes: three producers taking turns, a linearizable
/// reader and a follower, and identical logs on every node.
pub fn synthetic(nodes: u64) -> (History, Vec<NodeLog>) {
    let mut h = History::default();
    let mut log = Vec::new();
    let mut t = 0u64;
    // Offset 1 is the leader's empty entry: offsets may skip.
    let mut offset = 2u64;
    for n in 0..30u64 {
        let process = format!("u{}", n % 3);
        let ids: Vec<String> = (0..=(n % 2)).map(|i| format!("{process}-{n}-{i}")).collect();
        let first = offset;
        for id in &ids {
            log.push((offset, id.clone()));
            offset += 1;
        }
        h.appends.push(AppendOp {
            process,
            expected_offset: (n % 5 == 0).then_some(first),
            invoke_us: t,
            complete_us: Some(t + 50),
            outcome: AppendOutcome::Acked { first, last: offset - 1, duplicate: false },
            ids,
        });
        t += 100;
    }
    h.appends.push(AppendOp {
        process: "u0".into(),
        ids: vec!["u0-failed".into()],
        expected_offset: Some(1),
        invoke_us: t,
        complete_us: Some(t + 10),
        outcome: AppendOutcome::Failed { error: "offset mismatch".into() },
    });
    h.reads.push(ReadOp {
        process: "r0".into(),
        linearizable: true,
        from: 1,
        records_max: 1000,
        invoke_us: t + 20,
        complete_us: t + 40,
        records: Some(log.clone()),
        next_offset: offset,
        error: None,
    });
    h.follows.push(FollowLog { process: "f0".into(), from: 1, records: log.clone(), reopened: 1 });
    h.workload_end_us = t + 100;
    let logs =
        (1..=nodes).map(|node| NodeLog { node, records: Some(log.clone()), error: None }).collect();
    (h, logs)
}

/// A node's log: `(offset, record id)`.
type Records = Vec<(u64, String)>;

/// The doctored variants: name, and the logs after the doctoring.
pub fn doctored(logs: &[NodeLog]) -> Vec<(&'static str, Vec<NodeLog>)> {
    let edit = |f: &dyn Fn(&mut Records)| -> Vec<NodeLog> {
        logs.iter()
            .cloned()
            .map(|mut l| {
                if let Some(records) = l.records.as_mut() {
                    f(records);
                }
                l
            })
            .collect()
    };
    vec![
        (
            "drop an acknowledged record",
            edit(&|r| {
                r.remove(r.len() / 2);
            }),
        ),
        (
            "duplicate a record",
            edit(&|r| {
                let Some(offset) = r.last().map(|(o, _)| *o) else { return };
                let copy = r[r.len() / 3].1.clone();
                r.push((offset + 1, copy));
            }),
        ),
        (
            "swap two records",
            edit(&|r| {
                let (a, b) = (r.len() / 4, r.len() / 2);
                let id_a = r[a].1.clone();
                r[a].1 = r[b].1.clone();
                r[b].1 = id_a;
            }),
        ),
    ]
}

/// Runs the self-test; returns the lines to print and whether it passed.
pub fn run(history: &History, logs: &[NodeLog]) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let clean = check(history, logs);
    let mut ok = clean.violations == 0;
    lines.push(format!("clean history: {}", summary(&clean)));
    for detail in clean.details.iter().take(5) {
        lines.push(format!("  {detail}"));
    }
    for (name, doctored_logs) in doctored(logs) {
        let result = check(history, &doctored_logs);
        let caught = result.violations > 0;
        ok &= caught;
        lines.push(format!(
            "{name}: {} ({})",
            if caught { "caught" } else { "NOT CAUGHT" },
            summary(&result)
        ));
        if let Some(first) = result.details.first() {
            lines.push(format!("  e.g. {first}"));
        }
    }
    (lines, ok)
}

fn summary(r: &CheckResult) -> String {
    format!(
        "acked {} lost {} duplicated {} reordered {} diverged {} violations {}",
        r.acked, r.lost, r.duplicated, r.reordered, r.diverged, r.violations
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_history_has_no_violations() {
        let (h, logs) = synthetic(3);
        let r = check(&h, &logs);
        assert_eq!(r.violations, 0, "{:?}", r.details);
        assert_eq!(r.acked, 45);
    }

    #[test]
    fn every_doctored_history_is_caught() {
        let (h, logs) = synthetic(3);
        let doctored = doctored(&logs);
        let lost = check(&h, &doctored[0].1);
        assert!(lost.lost >= 1 && lost.violations >= 1, "{lost:?}");
        let dup = check(&h, &doctored[1].1);
        assert!(dup.duplicated >= 1, "{dup:?}");
        let swapped = check(&h, &doctored[2].1);
        assert!(swapped.reordered >= 2, "{swapped:?}");
        let (_, ok) = run(&h, &logs);
        assert!(ok);
    }

    #[test]
    fn one_diverged_node_is_caught() {
        let (h, mut logs) = synthetic(3);
        if let Some(records) = logs[2].records.as_mut() {
            records.pop();
        }
        let r = check(&h, &logs);
        assert_eq!(r.diverged, 1);
    }

    #[test]
    fn a_stale_linearizable_read_is_caught() {
        let (mut h, logs) = synthetic(3);
        if let Some(records) = h.reads[0].records.as_mut() {
            records.truncate(5);
        }
        h.reads[0].next_offset = 7;
        let r = check(&h, &logs);
        assert!(r.stale_reads >= 1, "{r:?}");
    }

    #[test]
    fn real_time_order_is_checked() {
        let (mut h, logs) = synthetic(3);
        // Claim the second append was invoked after the third completed: its offsets are lower.
        h.appends[1].invoke_us = h.appends[2].complete_us.unwrap_or(0) + 1;
        h.appends[1].complete_us = Some(h.appends[1].invoke_us + 1);
        let r = check(&h, &logs);
        assert!(r.reordered >= 1, "{r:?}");
    }

    #[test]
    fn a_skipping_follow_is_caught() {
        let (mut h, logs) = synthetic(3);
        h.follows[0].records.remove(3);
        let r = check(&h, &logs);
        assert!(r.follow_errors >= 1, "{r:?}");
    }
}
