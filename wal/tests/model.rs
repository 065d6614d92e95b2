//! A property test against an in-memory model: append, truncate_suffix, compact_prefix,
//! restart_at, save_hard_state and reopen in random order; after every step the WAL and the
//! model agree on the first and last index, every entry, the term at the compaction boundary
//! and the hard state.

use std::sync::Arc;

use proptest::prelude::*;
use raftwal_wal::fault::FaultStorage;
use raftwal_wal::{Entry, HardState, LogIndex, Options, Term, Wal};

#[derive(Clone, Debug)]
enum Op {
    /// Entries with these payload sizes; `bump` starts a new term first.
    Append {
        sizes: Vec<usize>,
        bump: bool,
    },
    /// Truncate at a point chosen by this fraction of the uncommitted suffix.
    Truncate(f64),
    /// Compact up to a point chosen by this fraction of the committed prefix.
    Compact(f64),
    /// Advance the commit index by this fraction of the uncommitted suffix.
    Commit(f64),
    /// Restart the log at `first - 1 + offset` (below, inside or beyond the log; at least 1),
    /// with a term before it chosen by this fraction of the current term.
    Restart {
        offset: i64,
        term: f64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop::collection::vec(0usize..700, 1..5), any::<bool>())
            .prop_map(|(sizes, bump)| Op::Append { sizes, bump }),
        1 => (0.0..1.0f64).prop_map(Op::Truncate),
        1 => (0.0..1.0f64).prop_map(Op::Compact),
        2 => (0.0..1.0f64).prop_map(Op::Commit),
        1 => (-5i64..80, 0.0..1.0f64).prop_map(|(offset, term)| Op::Restart { offset, term }),
        1 => Just(Op::Reopen),
    ]
}

struct Model {
    /// Entries from index `first`.
    entries: Vec<(Term, Vec<u8>)>,
    first: u64,
    /// Term of `first - 1`.
    first_prev_term: Term,
    term: Term,
    hard_state: HardState,
    next_byte: u8,
}

impl Model {
    fn last(&self) -> u64 {
        self.first + self.entries.len() as u64 - 1
    }

    fn term_at(&self, index: u64) -> Term {
        if index + 1 == self.first {
            self.first_prev_term
        } else {
            self.entries[(index - self.first) as usize].0
        }
    }
}

fn opts() -> Options {
    Options {
        segment_bytes: 4096,
        record_bytes_max: 1024,
        group_bytes_max: 4096,
        ..Options::default()
    }
}

fn check(wal: &Wal, m: &Model) {
    assert_eq!(wal.first_index(), LogIndex(m.first));
    assert_eq!(wal.last_index(), LogIndex(m.last()));
    assert_eq!(wal.hard_state(), m.hard_state);
    assert_eq!(wal.term(LogIndex(m.first - 1)).expect("boundary term"), m.first_prev_term);
    if m.entries.is_empty() {
        return;
    }
    let records = wal.read(LogIndex(m.first)..LogIndex(m.last() + 1), u64::MAX).expect("read");
    assert_eq!(records.len(), m.entries.len());
    for (r, (t, p)) in records.iter().zip(&m.entries) {
        assert_eq!((r.term(), r.payload()), (*t, p.as_slice()), "index {}", r.index());
    }
    // A bounded read stops early but returns at least one record.
    let bounded = wal.read(LogIndex(m.first)..LogIndex(m.last() + 1), 1).expect("bounded read");
    assert!(!bounded.is_empty() && bounded.len() <= m.entries.len());
}

fn run(ops: Vec<Op>) {
    let storage = FaultStorage::new();
    let mut wal = Wal::open_with(Arc::new(storage.clone()), opts()).expect("open");
    let mut m = Model {
        entries: Vec::new(),
        first: 1,
        first_prev_term: Term(0),
        term: Term(1),
        hard_state: HardState::default(),
        next_byte: 0,
    };
    for op in ops {
        match op {
            Op::Append { sizes, bump } => {
                if bump {
                    m.term = Term(m.term.get() + 1);
                }
                let start = m.last() + 1;
                let payloads: Vec<Vec<u8>> = sizes
                    .iter()
                    .map(|&n| {
                        m.next_byte = m.next_byte.wrapping_add(1);
                        vec![m.next_byte; n]
                    })
                    .collect();
                let entries: Vec<Entry<'_>> = payloads
                    .iter()
                    .enumerate()
                    .map(|(i, p)| Entry {
                        term: m.term,
                        index: LogIndex(start + i as u64),
                        payload: p,
                    })
                    .collect();
                wal.append(&entries).expect("append");
                m.entries.extend(payloads.into_iter().map(|p| (m.term, p)));
            }
            Op::Truncate(f) => {
                let lo = m.hard_state.commit.get().max(m.first - 1) + 1;
                if lo <= m.last() {
                    let from = lo + ((m.last() - lo) as f64 * f) as u64;
                    wal.truncate_suffix(LogIndex(from)).expect("truncate");
                    m.entries.truncate((from - m.first) as usize);
                }
            }
            Op::Compact(f) => {
                // After a restart below the commit index, the commit lies beyond the log.
                let hi = m.hard_state.commit.get().min(m.last()) + 1;
                if hi > m.first {
                    let before = m.first + 1 + ((hi - m.first - 1) as f64 * f) as u64;
                    let prev = m.term_at(before - 1);
                    wal.compact_prefix(LogIndex(before)).expect("compact");
                    m.entries.drain(..(before - m.first) as usize);
                    m.first = before;
                    m.first_prev_term = prev;
                }
            }
            Op::Commit(f) => {
                let c = m.hard_state.commit.get();
                let commit = c + ((m.last().saturating_sub(c)) as f64 * f) as u64;
                let hs =
                    HardState { term: m.term, vote: m.hard_state.vote, commit: LogIndex(commit) };
                wal.save_hard_state(hs).expect("save");
                m.hard_state = hs;
            }
            Op::Restart { offset, term } => {
                let first = (m.first as i64 - 1 + offset).max(1) as u64;
                let prev = Term(1 + ((m.term.get() - 1) as f64 * term) as u64);
                wal.restart_at(LogIndex(first), prev).expect("restart");
                m.entries.clear();
                m.first = first;
                m.first_prev_term = prev;
            }
            Op::Reopen => {
                drop(wal);
                wal = Wal::open_with(Arc::new(storage.clone()), opts()).expect("reopen");
            }
        }
        check(&wal, &m);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn wal_matches_an_in_memory_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
