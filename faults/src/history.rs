//! The recorded history of a run: every operation the workload invoked, with its invocation
//! and completion times (microseconds since the run began) and its outcome, plus what each
//! follower saw and each injected fault.
//!
//! Records are identified by a short id (`u1-17`); their bytes are the id, a `|`, and padding
//! derived from the id, so the checker can tell a record it wrote from damaged or foreign bytes.

use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// Microseconds since the run began.
pub type Micros = u64;

/// The bytes of the record with this id, `bytes_total` long (at least the id and a `|`).
pub fn record_bytes(id: &str, bytes_total: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes_total.max(id.len() + 1));
    out.extend_from_slice(id.as_bytes());
    out.push(b'|');
    let seed = id.bytes().fold(17u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    let mut i = 0u8;
    while out.len() < bytes_total {
        out.push(b'a' + (seed.wrapping_add(i) % 26));
        i = i.wrapping_add(1);
    }
    out
}

/// The id of a record the workload wrote, or a description of bytes it did not write.
pub fn record_id(bytes: &[u8]) -> String {
    let Some(bar) = bytes.iter().position(|&b| b == b'|') else {
        return format!("foreign:{}b", bytes.len());
    };
    let Ok(id) = std::str::from_utf8(&bytes[..bar]) else {
        return format!("foreign:{}b", bytes.len());
    };
    if record_bytes(id, bytes.len()) == bytes { id.to_string() } else { format!("damaged:{id}") }
}

/// What an append's caller learned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum AppendOutcome {
    /// Not answered yet (at the end of a run: treated as unknown).
    Pending,
    /// Acknowledged at these offsets.
    Acked { first: u64, last: u64, duplicate: bool },
    /// Definitely not appended (the client says nothing took effect).
    Failed { error: String },
    /// May or may not be in the log.
    Unknown { error: String },
}

/// One append: its records, in order, get consecutive offsets if acknowledged.
#[derive(Clone, Debug, Serialize)]
pub struct AppendOp {
    pub process: String,
    pub ids: Vec<String>,
    pub expected_offset: Option<u64>,
    pub invoke_us: Micros,
    pub complete_us: Option<Micros>,
    pub outcome: AppendOutcome,
}

/// One read (linearizable or not) and what it returned.
#[derive(Clone, Debug, Serialize)]
pub struct ReadOp {
    pub process: String,
    pub linearizable: bool,
    pub from: u64,
    pub records_max: u32,
    pub invoke_us: Micros,
    pub complete_us: Micros,
    /// `(offset, record id)`; None when the read failed.
    pub records: Option<Vec<(u64, String)>>,
    pub next_offset: u64,
    pub error: Option<String>,
}

/// Everything one follower (one logical stream, across reconnections) yielded.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FollowLog {
    pub process: String,
    pub from: u64,
    pub records: Vec<(u64, String)>,
    /// How many times the stream ended with an error and was opened again where it stood.
    pub reopened: u32,
}

/// One injected fault, from injection to healing.
#[derive(Clone, Debug, Serialize)]
pub struct FaultEvent {
    pub kind: String,
    pub detail: String,
    pub start_us: Micros,
    pub healed_us: Micros,
    /// What the harness observed (a node that did not come back, and why).
    pub notes: Vec<String>,
    /// A node that did not come back on its own after this fault.
    pub node_not_back: bool,
}

/// A whole recorded history.
#[derive(Clone, Debug, Default, Serialize)]
pub struct History {
    pub appends: Vec<AppendOp>,
    pub reads: Vec<ReadOp>,
    pub follows: Vec<FollowLog>,
    pub faults: Vec<FaultEvent>,
    /// When the workload started and stopped.
    pub workload_start_us: Micros,
    pub workload_end_us: Micros,
}

/// Records operations from many tasks. Each append is registered at invocation, so one whose
/// task never finishes still appears (as unknown) in the history.
#[derive(Debug)]
pub struct Recorder {
    t0: Instant,
    history: Mutex<History>,
    /// The highest acknowledged offset so far (readers start near it).
    acked_high: std::sync::atomic::AtomicU64,
}

impl Recorder {
    pub fn new(t0: Instant) -> Recorder {
        Recorder {
            t0,
            history: Mutex::new(History::default()),
            acked_high: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Microseconds since the run began.
    pub fn now_us(&self) -> Micros {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn with<T>(&self, f: impl FnOnce(&mut History) -> T) -> T {
        // A panicking recorder task leaves the history as it was; keep using it.
        let mut guard = self.history.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Registers an append as invoked now; returns its index for [`Recorder::complete_append`].
    pub fn invoke_append(&self, process: &str, ids: Vec<String>, expected: Option<u64>) -> usize {
        let invoke_us = self.now_us();
        self.with(|h| {
            h.appends.push(AppendOp {
                process: process.to_string(),
                ids,
                expected_offset: expected,
                invoke_us,
                complete_us: None,
                outcome: AppendOutcome::Pending,
            });
            h.appends.len() - 1
        })
    }

    pub fn complete_append(&self, index: usize, outcome: AppendOutcome) {
        let now = self.now_us();
        if let AppendOutcome::Acked { last, .. } = outcome {
            self.acked_high.fetch_max(last, std::sync::atomic::Ordering::Relaxed);
        }
        self.with(|h| {
            if let Some(op) = h.appends.get_mut(index) {
                op.complete_us = Some(now);
                op.outcome = outcome;
            }
        });
    }

    pub fn acked_high(&self) -> u64 {
        self.acked_high.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn read(&self, op: ReadOp) {
        self.with(|h| h.reads.push(op));
    }

    pub fn follow(&self, log: FollowLog) {
        self.with(|h| h.follows.push(log));
    }

    pub fn fault(&self, event: FaultEvent) {
        self.with(|h| h.faults.push(event));
    }

    pub fn set_workload_window(&self, start_us: Micros, end_us: Micros) {
        self.with(|h| {
            h.workload_start_us = start_us;
            h.workload_end_us = end_us;
        });
    }

    /// The history so far; appends still pending become unknown.
    pub fn snapshot(&self) -> History {
        let mut h = self.with(|h| h.clone());
        for op in &mut h.appends {
            if op.outcome == AppendOutcome::Pending {
                op.outcome = AppendOutcome::Unknown { error: "never answered".into() };
            }
        }
        h
    }
}

/// One node's log as read back after healing.
#[derive(Clone, Debug, Serialize)]
pub struct NodeLog {
    pub node: u64,
    /// `(offset, record id)` in offset order; None when the node could not be read.
    pub records: Option<Vec<(u64, String)>>,
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_round_trip_and_damage_is_seen() {
        let bytes = record_bytes("u3-41", 64);
        assert_eq!(bytes.len(), 64);
        assert_eq!(record_id(&bytes), "u3-41");
        let mut damaged = bytes.clone();
        damaged[40] ^= 1;
        assert_eq!(record_id(&damaged), "damaged:u3-41");
        assert!(record_id(b"hello").starts_with("foreign:"));
    }
}
