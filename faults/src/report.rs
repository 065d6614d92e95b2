//! The report: availability per fault (the longest window with no acknowledged append while a
//! fault was active, and the time from each fault to the first acknowledged append invoked
//! after it), a summary per fault kind, the findings, and the last line.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::checker::CheckResult;
use crate::history::{AppendOutcome, History};

/// A window after healing that still counts toward a fault's unavailability.
const AFTER_HEAL_US: u64 = 5_000_000;
/// Unavailability above this is listed as a finding.
pub const LONG_UNAVAILABLE_US: u64 = 5_000_000;

#[derive(Clone, Debug, Serialize)]
pub struct FaultStats {
    pub kind: String,
    pub detail: String,
    pub start_s: f64,
    pub held_s: f64,
    /// Longest window with no acknowledged append overlapping the fault (until 5 s after it
    /// healed, or the next fault).
    pub unavailable_s: f64,
    /// Where that window began.
    pub unavailable_from_s: f64,
    /// From the moment the fault was in effect to the completion of the first acknowledged
    /// append invoked after it (near 0 when the fault did not touch the leader).
    pub recovery_s: Option<f64>,
    pub notes: Vec<String>,
    pub node_not_back: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct KindSummary {
    pub kind: String,
    pub count: usize,
    pub unavailable_max_s: f64,
    pub recovery_median_s: Option<f64>,
    pub recovery_max_s: Option<f64>,
    pub nodes_not_back: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub nodes: u64,
    pub duration_s: f64,
    pub appends_invoked: usize,
    pub appends_acked: usize,
    pub appends_failed: usize,
    pub appends_unknown: usize,
    /// Per producer (u0.. unary, a pipelined, e expected-offset, x raw): acknowledged,
    /// failed (not done), unknown appends.
    pub producers: BTreeMap<String, [usize; 3]>,
    /// The most frequent errors of appends with an unknown outcome, with their counts.
    pub unknown_errors: Vec<(String, usize)>,
    pub reads: usize,
    pub follow_records: usize,
    /// The longest window without an acknowledged append outside every fault window.
    pub unavailable_no_fault_s: f64,
    pub faults: Vec<FaultStats>,
    pub kinds: Vec<KindSummary>,
    pub check: CheckResult,
    pub findings: Vec<String>,
    pub skipped: Vec<String>,
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

pub fn build(
    seed: u64,
    nodes: u64,
    history: &History,
    check: CheckResult,
    skipped: Vec<String>,
    mut findings: Vec<String>,
) -> Report {
    let mut acks: Vec<u64> = Vec::new();
    let mut acked_ops: Vec<(u64, u64)> = Vec::new();
    let (mut failed, mut unknown) = (0, 0);
    let mut producers: BTreeMap<String, [usize; 3]> = BTreeMap::new();
    let mut unknown_errors: BTreeMap<String, usize> = BTreeMap::new();
    for op in &history.appends {
        let counts = producers.entry(op.process.clone()).or_default();
        match (&op.outcome, op.complete_us) {
            (AppendOutcome::Acked { .. }, Some(done)) => {
                acks.push(done);
                acked_ops.push((op.invoke_us, done));
                counts[0] += 1;
            }
            (AppendOutcome::Failed { .. }, _) => {
                failed += 1;
                counts[1] += 1;
            }
            (outcome, _) => {
                unknown += 1;
                counts[2] += 1;
                if let AppendOutcome::Unknown { error } = outcome {
                    let short: String = error.chars().take(160).collect();
                    *unknown_errors.entry(format!("{}: {short}", op.process)).or_insert(0) += 1;
                }
            }
        }
    }
    acks.sort_unstable();
    let (start, end) =
        (history.workload_start_us, history.workload_end_us.max(history.workload_start_us));
    // Gaps between consecutive acknowledgements, with the workload's ends as bounds.
    let mut points = vec![start];
    points.extend(acks.iter().copied().filter(|&t| t >= start && t <= end));
    points.push(end);
    let gaps: Vec<(u64, u64)> = points.windows(2).map(|w| (w[0], w[1])).collect();

    let mut faults = Vec::new();
    let mut windows = Vec::new();
    for (i, f) in history.faults.iter().enumerate() {
        let next = history.faults.get(i + 1).map_or(end, |n| n.start_us);
        let until = (f.healed_us + AFTER_HEAL_US).min(next.max(f.healed_us));
        windows.push((f.start_us, until));
        // A gap belongs to the latest fault that began before the gap ended, if the gap began
        // before that fault's window closed: the gap that a fault opens usually begins just
        // before it (the last acknowledgement before the fault).
        let (unavailable, unavailable_at) = gaps
            .iter()
            .filter(|&&(a, b)| f.start_us < b && b <= next && a < until)
            .map(|(a, b)| (b - a, *a))
            .max()
            .unwrap_or((0, f.start_us));
        let recovery = acked_ops
            .iter()
            .filter(|(invoke, _)| *invoke >= f.start_us)
            .map(|(_, done)| done - f.start_us)
            .min();
        faults.push(FaultStats {
            kind: f.kind.clone(),
            detail: f.detail.clone(),
            start_s: secs(f.start_us),
            held_s: secs(f.healed_us.saturating_sub(f.start_us)),
            unavailable_s: secs(unavailable),
            unavailable_from_s: secs(unavailable_at),
            recovery_s: recovery.map(secs),
            notes: f.notes.clone(),
            node_not_back: f.node_not_back,
        });
    }
    let unavailable_no_fault = gaps
        .iter()
        .filter(|(a, b)| !windows.iter().any(|(s, u)| b > s && a < u))
        .map(|(a, b)| b - a)
        .max()
        .unwrap_or(0);

    let mut by_kind: BTreeMap<String, Vec<&FaultStats>> = BTreeMap::new();
    for f in &faults {
        by_kind.entry(f.kind.clone()).or_default().push(f);
    }
    let kinds = by_kind
        .into_iter()
        .map(|(kind, list)| {
            let mut rec: Vec<f64> = list.iter().filter_map(|f| f.recovery_s).collect();
            rec.sort_by(f64::total_cmp);
            KindSummary {
                kind,
                count: list.len(),
                unavailable_max_s: list.iter().map(|f| f.unavailable_s).fold(0.0, f64::max),
                recovery_median_s: rec.get(rec.len() / 2).copied(),
                recovery_max_s: rec.last().copied(),
                nodes_not_back: list.iter().filter(|f| f.node_not_back).count(),
            }
        })
        .collect();

    for f in &faults {
        if f.node_not_back {
            findings.push(format!(
                "[{:.1}s] {}: {} -> {}",
                f.start_s,
                f.kind,
                f.detail,
                f.notes.join("; ")
            ));
        }
        if f.unavailable_s * 1e6 > LONG_UNAVAILABLE_US as f64 {
            findings.push(format!(
                "[{:.1}s] {}: no acknowledged append for {:.1}s from {:.1}s ({}; held {:.1}s)",
                f.start_s, f.kind, f.unavailable_s, f.unavailable_from_s, f.detail, f.held_s
            ));
        }
    }
    if unavailable_no_fault > LONG_UNAVAILABLE_US {
        findings.push(format!(
            "no acknowledged append for {:.1}s outside any fault window",
            secs(unavailable_no_fault)
        ));
    }
    findings.extend(check.details.iter().cloned());

    Report {
        seed,
        nodes,
        duration_s: secs(end.saturating_sub(start)),
        appends_invoked: history.appends.len(),
        appends_acked: acked_ops.len(),
        appends_failed: failed,
        appends_unknown: unknown,
        producers,
        unknown_errors: {
            let mut v: Vec<(String, usize)> = unknown_errors.into_iter().collect();
            v.sort_by_key(|e| std::cmp::Reverse(e.1));
            v.truncate(5);
            v
        },
        reads: history.reads.iter().filter(|r| r.records.is_some()).count(),
        follow_records: history.follows.iter().map(|f| f.records.len()).sum(),
        unavailable_no_fault_s: secs(unavailable_no_fault),
        faults,
        kinds,
        check,
        findings,
        skipped,
    }
}

impl Report {
    /// The contract's last line.
    pub fn last_line(&self) -> String {
        format!(
            "faults: {} acked: {} lost: {} duplicated: {} reordered: {} diverged: {} violations: {}",
            self.faults.len(),
            self.check.acked,
            self.check.lost,
            self.check.duplicated,
            self.check.reordered,
            self.check.diverged,
            self.check.violations
        )
    }

    pub fn human(&self) -> String {
        let mut out = String::new();
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}s"));
        out.push_str(&format!(
            "\nraftwal-faults: seed {} nodes {} workload {:.1}s\n",
            self.seed, self.nodes, self.duration_s
        ));
        out.push_str(&format!(
            "appends: {} invoked, {} acknowledged, {} failed (not done), {} unknown; {} linearizable reads; {} records followed; log {} records\n",
            self.appends_invoked,
            self.appends_acked,
            self.appends_failed,
            self.appends_unknown,
            self.reads,
            self.follow_records,
            self.check.log_records
        ));
        let per: Vec<String> =
            self.producers.iter().map(|(p, [a, f, u])| format!("{p} {a}/{f}/{u}")).collect();
        out.push_str(&format!("per producer (acked/failed/unknown): {}\n", per.join(", ")));
        for (error, count) in &self.unknown_errors {
            out.push_str(&format!("  unknown x{count}: {error}\n"));
        }
        for s in &self.skipped {
            out.push_str(&format!("skipped: {s}\n"));
        }
        out.push_str(&format!(
            "\n{:<18} {:>5} {:>16} {:>16} {:>14} {:>9}\n",
            "fault kind", "count", "longest unavail", "median recovery", "max recovery", "not back"
        ));
        for k in &self.kinds {
            out.push_str(&format!(
                "{:<18} {:>5} {:>15.2}s {:>16} {:>14} {:>9}\n",
                k.kind,
                k.count,
                k.unavailable_max_s,
                opt(k.recovery_median_s),
                opt(k.recovery_max_s),
                k.nodes_not_back
            ));
        }
        out.push_str(&format!(
            "longest window without an acknowledged append outside faults: {:.2}s\n",
            self.unavailable_no_fault_s
        ));
        out.push_str(&format!(
            "check: lost {} duplicated {} reordered {} diverged {} stale reads {} follow errors {} other {}\n",
            self.check.lost,
            self.check.duplicated,
            self.check.reordered,
            self.check.diverged,
            self.check.stale_reads,
            self.check.follow_errors,
            self.check.other
        ));
        if !self.findings.is_empty() {
            out.push_str(&format!("\nfindings ({}):\n", self.findings.len()));
            for f in &self.findings {
                out.push_str(&format!("  - {f}\n"));
            }
        }
        out
    }
}
