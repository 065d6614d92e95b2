//! The checker: what a recorded history and the nodes' logs after healing must satisfy.
//!
//! The reference log is the first readable node log (the run puts the leader's first). Checks:
//! - lost: a record of an acknowledged append absent from the reference log;
//! - reordered: a record of an acknowledged append present but not at its acknowledged offset,
//!   or an acknowledged append whose offsets are not above those of an append acknowledged
//!   before it was invoked (real-time order);
//! - duplicated: a record at more than one offset;
//! - diverged: a node whose log differs from the reference, or that could not be read;
//! - and, counted only as violations: appends reported as failed that are in the log, records
//!   nobody appended, an acknowledged expected-offset append at another offset, linearizable
//!   reads that miss an append acknowledged before they began or return what the log does not
//!   hold, and follows that skip, repeat, go back or return what the log does not hold.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::history::{AppendOutcome, History, NodeLog};

/// Violations listed in detail (all are counted).
const DETAILS_MAX: usize = 50;

#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckResult {
    /// Records of acknowledged appends.
    pub acked: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub diverged: u64,
    pub stale_reads: u64,
    pub follow_errors: u64,
    pub other: u64,
    pub violations: u64,
    /// The first violations, described.
    pub details: Vec<String>,
    /// Length of the reference log in records.
    pub log_records: u64,
}

impl CheckResult {
    fn violation(&mut self, detail: String) {
        self.violations += 1;
        if self.details.len() < DETAILS_MAX {
            self.details.push(detail);
        }
    }
}

/// Checks `history` against the nodes' logs after healing.
pub fn check(history: &History, logs: &[NodeLog]) -> CheckResult {
    let mut r = CheckResult::default();
    let Some((reference_node, reference)) =
        logs.iter().find_map(|l| l.records.as_ref().map(|recs| (l.node, recs)))
    else {
        r.diverged = logs.len() as u64;
        r.violation("no node's log could be read after healing".into());
        return r;
    };
    r.log_records = reference.len() as u64;
    let at: BTreeMap<u64, &str> = reference.iter().map(|(o, id)| (*o, id.as_str())).collect();
    let mut where_is: HashMap<&str, Vec<u64>> = HashMap::new();
    for (offset, id) in reference {
        where_is.entry(id.as_str()).or_default().push(*offset);
    }

    check_divergence(&mut r, reference_node, reference, logs);
    check_log_contents(&mut r, history, &where_is);
    check_appends(&mut r, history, &at, &where_is);
    check_real_time(&mut r, history);
    check_reads(&mut r, history, &at);
    check_follows(&mut r, history, &at);
    r
}

fn check_divergence(r: &mut CheckResult, node: u64, reference: &[(u64, String)], logs: &[NodeLog]) {
    for log in logs {
        match &log.records {
            None => {
                r.diverged += 1;
                r.violation(format!(
                    "node {} could not be read after healing, so its log is unchecked: {}",
                    log.node,
                    log.error.as_deref().unwrap_or("no error recorded")
                ));
            }
            Some(records) if records.as_slice() != reference => {
                r.diverged += 1;
                let first = records
                    .iter()
                    .zip(reference)
                    .position(|(a, b)| a != b)
                    .unwrap_or(records.len().min(reference.len()));
                r.violation(format!(
                    "node {}'s log differs from node {node}'s at position {first} ({} vs {} records): {:?} vs {:?}",
                    log.node,
                    records.len(),
                    reference.len(),
                    records.get(first),
                    reference.get(first)
                ));
            }
            Some(_) => {}
        }
    }
}

fn check_log_contents(r: &mut CheckResult, history: &History, where_is: &HashMap<&str, Vec<u64>>) {
    let mut invoked: HashMap<&str, &AppendOutcome> = HashMap::new();
    for op in &history.appends {
        for id in &op.ids {
            invoked.insert(id.as_str(), &op.outcome);
        }
    }
    let mut ids: Vec<(&&str, &Vec<u64>)> = where_is.iter().collect();
    ids.sort();
    for (id, offsets) in ids {
        if offsets.len() > 1 {
            r.duplicated += (offsets.len() - 1) as u64;
            r.violation(format!(
                "record {id} is in the log {} times, at {offsets:?}",
                offsets.len()
            ));
        }
        match invoked.get(*id) {
            None => {
                r.other += 1;
                r.violation(format!("record {id} at {offsets:?} was never appended by anyone"));
            }
            Some(AppendOutcome::Failed { error }) => {
                r.other += 1;
                r.violation(format!(
                    "record {id} is in the log at {offsets:?} but its append was reported as not done: {error}"
                ));
            }
            Some(_) => {}
        }
    }
}

fn check_appends(
    r: &mut CheckResult,
    history: &History,
    at: &BTreeMap<u64, &str>,
    where_is: &HashMap<&str, Vec<u64>>,
) {
    for op in &history.appends {
        let AppendOutcome::Acked { first, last, .. } = op.outcome else { continue };
        if last < first || last - first + 1 != op.ids.len() as u64 {
            r.other += 1;
            r.violation(format!(
                "{} append {:?} of {} records was acknowledged at {first}..={last}",
                op.process,
                op.ids.first(),
                op.ids.len()
            ));
        }
        if let Some(expected) = op.expected_offset
            && expected != first
        {
            r.other += 1;
            r.violation(format!(
                "{} append {:?} expected offset {expected} but was acknowledged at {first}",
                op.process,
                op.ids.first()
            ));
        }
        for (i, id) in op.ids.iter().enumerate() {
            r.acked += 1;
            let offset = first + i as u64;
            if at.get(&offset) == Some(&id.as_str()) {
                continue;
            }
            match where_is.get(id.as_str()) {
                None => {
                    r.lost += 1;
                    r.violation(format!(
                        "lost: record {id} ({}) acknowledged at offset {offset} is not in the log (offset {offset} holds {:?})",
                        op.process,
                        at.get(&offset)
                    ));
                }
                Some(offsets) => {
                    r.reordered += 1;
                    r.violation(format!(
                        "record {id} ({}) acknowledged at offset {offset} is at {offsets:?} (offset {offset} holds {:?})",
                        op.process,
                        at.get(&offset)
                    ));
                }
            }
        }
    }
}

/// An append acknowledged before another was invoked must have lower offsets.
fn check_real_time(r: &mut CheckResult, history: &History) {
    let mut acked: Vec<(u64, u64, u64, u64, &str)> = history
        .appends
        .iter()
        .filter_map(|op| match (op.outcome.clone(), op.complete_us) {
            (AppendOutcome::Acked { first, last, .. }, Some(done)) => {
                Some((op.invoke_us, done, first, last, op.ids.first().map_or("", |s| s.as_str())))
            }
            _ => None,
        })
        .collect();
    let mut by_completion: Vec<(u64, u64, &str)> =
        acked.iter().map(|&(_, done, _, last, id)| (done, last, id)).collect();
    by_completion.sort_unstable();
    acked.sort_unstable();
    let mut next = 0;
    let mut high: Option<(u64, &str)> = None;
    for &(invoke, _, first, _, id) in &acked {
        while next < by_completion.len() && by_completion[next].0 < invoke {
            let (_, last, before) = by_completion[next];
            if high.is_none_or(|(h, _)| last > h) {
                high = Some((last, before));
            }
            next += 1;
        }
        if let Some((h, before)) = high
            && h >= first
        {
            r.reordered += 1;
            r.violation(format!(
                "real-time order: {id} was invoked after {before} was acknowledged at {h}, yet got offset {first}"
            ));
        }
    }
}

fn check_reads(r: &mut CheckResult, history: &History, at: &BTreeMap<u64, &str>) {
    // Acknowledged records by offset, with their completion time.
    let mut acked: BTreeMap<u64, (u64, &str)> = BTreeMap::new();
    for op in &history.appends {
        if let (AppendOutcome::Acked { first, .. }, Some(done)) = (&op.outcome, op.complete_us) {
            for (i, id) in op.ids.iter().enumerate() {
                acked.insert(first + i as u64, (done, id.as_str()));
            }
        }
    }
    for read in &history.reads {
        let Some(records) = &read.records else { continue };
        for (offset, id) in records {
            if at.get(offset) != Some(&id.as_str()) {
                r.stale_reads += 1;
                r.violation(format!(
                    "{} read {id} at offset {offset}; the log holds {:?} there",
                    read.process,
                    at.get(offset)
                ));
            }
        }
        if !read.linearizable {
            continue;
        }
        let full = records.len() as u64 >= u64::from(read.records_max);
        let seen: std::collections::HashSet<u64> = records.iter().map(|(o, _)| *o).collect();
        for (&offset, &(done, id)) in acked.range(read.from..) {
            if done >= read.invoke_us {
                continue;
            }
            let in_range = offset < read.next_offset;
            if (in_range && !seen.contains(&offset)) || (!in_range && !full) {
                r.stale_reads += 1;
                r.violation(format!(
                    "stale read: {} (from {}, invoked at {} us) did not return {id} at {offset}, acknowledged at {done} us (read returned up to next offset {})",
                    read.process, read.from, read.invoke_us, read.next_offset
                ));
                break;
            }
        }
    }
}

fn check_follows(r: &mut CheckResult, history: &History, at: &BTreeMap<u64, &str>) {
    for follow in &history.follows {
        let mut previous: Option<u64> = None;
        let mut problems = 0u64;
        for (offset, id) in &follow.records {
            if let Some(p) = previous
                && *offset <= p
            {
                problems += 1;
                r.violation(format!(
                    "{} yielded offset {offset} after {p} (repeat or going back)",
                    follow.process
                ));
            }
            if at.get(offset) != Some(&id.as_str()) {
                problems += 1;
                r.violation(format!(
                    "{} yielded {id} at {offset}; the log holds {:?} there",
                    follow.process,
                    at.get(offset)
                ));
            }
            previous = Some(previous.map_or(*offset, |p| p.max(*offset)));
        }
        if let Some(last) = previous {
            let seen: std::collections::HashSet<u64> =
                follow.records.iter().map(|(o, _)| *o).collect();
            if let Some((&offset, id)) =
                at.range(follow.from..=last).find(|(o, _)| !seen.contains(o))
            {
                problems += 1;
                r.violation(format!(
                    "{} skipped {id} at offset {offset} (it yielded up to {last})",
                    follow.process
                ));
            }
        }
        r.follow_errors += problems;
    }
}
