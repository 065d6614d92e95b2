//! Crash states at every write and sync point of randomized workloads.
//!
//! A workload runs on a [`FaultStorage`] whose hook fires before every mutating operation. At
//! each such point the hook takes several crash images (unsynced blocks all lost, all kept, or
//! some kept; the last write torn or not), recovers each one, and checks:
//! - recovery succeeds (a crash is never reported as corruption);
//! - the log holds every acknowledged entry, unchanged;
//! - every other entry it holds is one that was submitted at that index;
//! - the hard state is the last one saved or the one being saved;
//! - during a `restart_at`, the log is either the whole old log (every check above) or exactly
//!   the new empty one, never a mix;
//! - recovery is idempotent: opening again gives the same log, also when recovery itself is
//!   cut by a crash part way, and also when a power loss cuts the recovery that follows a
//!   process crash.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use raftwal_wal::fault::{CrashPoint, CrashSpec, FaultStorage, Loss};
use raftwal_wal::{Entry, HardState, LogIndex, NodeId, Options, Term, Ticket, Wal};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Options for the workload; recoveries never need the preparer thread.
fn opts_with(prepare_segments: bool) -> Options {
    Options {
        segment_bytes: 4096,
        record_bytes_max: 1024,
        group_bytes_max: 3584,
        group_entries_max: 6,
        queue_bytes_max: 1 << 20,
        prepare_segments,
        ..Options::default()
    }
}

fn opts() -> Options {
    opts_with(false)
}

type Payload = Vec<u8>;

/// What the workload knows about the log, for the hook to check recoveries against.
#[derive(Default, Clone)]
struct Model {
    /// The log as it would be if everything submitted were durable (index `origin` =
    /// position 0).
    log: Vec<(Term, Payload)>,
    /// Index of `log[0]`: 1, or where the last restart put the log.
    origin: u64,
    /// Term of `origin - 1`.
    origin_prev_term: Term,
    /// Entries `origin..=acked` are acknowledged durable (those below `first` may be
    /// compacted).
    acked: u64,
    /// A truncation in progress: acked entries from here on may be gone.
    truncating: Option<u64>,
    /// Every version ever submitted at each index.
    history: HashMap<u64, Vec<(Term, Payload)>>,
    first: u64,
    compacting: Option<u64>,
    /// A restart in progress: (first index, term before it).
    restarting: Option<(u64, Term)>,
    hard_state: HardState,
    saving: Option<HardState>,
}

impl Model {
    fn last(&self) -> u64 {
        self.origin + self.log.len() as u64 - 1
    }

    /// Term of `index`, for `origin - 1 <= index <= last`.
    fn term_at(&self, index: u64) -> Term {
        if index + 1 == self.origin {
            self.origin_prev_term
        } else {
            self.log[(index - self.origin) as usize].0
        }
    }
}

type Recovered = (u64, Term, Vec<(Term, Payload)>, HardState);

/// Recovers `image` and checks it against the model; returns what it recovered, for comparison.
fn check_recovery(image: &FaultStorage, m: &Model, what: &str) -> Recovered {
    let wal = match Wal::open_with(Arc::new(image.clone()), opts()) {
        Ok(w) => w,
        Err(e) => panic!("{what}: recovery failed: {e}"),
    };
    let first = wal.first_index().get();
    let last = wal.last_index().get();
    let prev_term = wal.term(LogIndex(first - 1)).unwrap_or_else(|e| panic!("{what}: {e}"));
    let hs = wal.hard_state();
    assert!(
        hs == m.hard_state || Some(hs) == m.saving,
        "{what}: hard state {hs:?} is neither saved {:?} nor saving {:?}",
        m.hard_state,
        m.saving
    );
    // A restart in progress: the new, empty log is one of the two allowed outcomes. Anything
    // else must pass every check of the old log below.
    if let Some((f, t)) = m.restarting {
        if (first, last, prev_term) == (f, f - 1, t) {
            RESTART_NEW.fetch_add(1, Ordering::Relaxed);
            return (first, prev_term, Vec::new(), hs);
        }
        RESTART_OLD.fetch_add(1, Ordering::Relaxed);
    }
    assert!(
        first == m.first || Some(first) == m.compacting,
        "{what}: first index {first}, model {} (compacting {:?}, restarting {:?})",
        m.first,
        m.compacting,
        m.restarting
    );
    assert_eq!(prev_term, m.term_at(first - 1), "{what}: term before the first index");
    let must_hold = match m.truncating {
        Some(from) => m.acked.min(from - 1),
        None => m.acked,
    };
    assert!(
        last >= must_hold,
        "{what}: lost acknowledged entries: last {last} < acked {must_hold}"
    );
    let mut got = Vec::new();
    if last >= first {
        let records = wal
            .read(LogIndex(first)..LogIndex(last + 1), u64::MAX)
            .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
        assert_eq!(records.len() as u64, last + 1 - first, "{what}: short read");
        for r in records {
            let i = r.index().get();
            let entry = (r.term(), r.payload().to_vec());
            if i <= must_hold {
                assert_eq!(
                    entry,
                    m.log[(i - m.origin) as usize],
                    "{what}: acknowledged entry {i} changed"
                );
            } else {
                assert!(
                    m.history.get(&i).is_some_and(|v| v.contains(&entry)),
                    "{what}: entry {i} was never submitted"
                );
            }
            got.push(entry);
        }
    }
    (first, prev_term, got, hs)
}

static STATES: AtomicU64 = AtomicU64::new(0);
/// Recoveries of crash images taken inside `restart_at` that gave the new, empty log...
static RESTART_NEW: AtomicU64 = AtomicU64::new(0);
/// ... and those that gave the old log.
static RESTART_OLD: AtomicU64 = AtomicU64::new(0);

fn specs(seed: u64) -> [CrashSpec; 4] {
    [
        CrashSpec { loss: Loss::All, tear_last_write: false, seed },
        CrashSpec { loss: Loss::None, tear_last_write: true, seed },
        CrashSpec { loss: Loss::Some, tear_last_write: true, seed: seed ^ 0x55 },
        CrashSpec { loss: Loss::Some, tear_last_write: false, seed: seed ^ 0xaa },
    ]
}

fn on_crash_point(p: &CrashPoint<'_>, model: &Mutex<Model>, seed: u64, n: u64) {
    let m = model.lock().expect("model lock").clone();
    for (k, spec) in specs(seed.wrapping_mul(1_000_003).wrapping_add(n)).into_iter().enumerate() {
        let image = p.image(spec);
        let what = format!("seed {seed} point {n} ({}) spec {k} {spec:?}", p.op());
        let pristine =
            image.crash_image(CrashSpec { loss: Loss::All, tear_last_write: false, seed: 0 });
        let before = check_recovery(&image, &m, &what);
        // Idempotent: recovering the recovered disk gives the same log.
        let again = check_recovery(&image, &m, &format!("{what}, second recovery"));
        assert_eq!(before, again, "{what}: recovery is not idempotent");
        // A process crash, a restart that recovers from the page cache, then a power loss:
        // whatever the first recovery exposed must survive the second.
        if k == 0 {
            let process = p.process_crash_image();
            // A power loss part way through the recovery after the process crash: nothing was
            // exposed yet, but what is on disk must still recover to an allowed state.
            let cut: Arc<Mutex<Option<FaultStorage>>> = Arc::default();
            let (cut2, target) = (cut.clone(), n % 6);
            let ops = Arc::new(AtomicU64::new(0));
            process.set_hook(move |q| {
                if ops.fetch_add(1, Ordering::Relaxed) == target {
                    let power = CrashSpec { loss: Loss::All, tear_last_write: false, seed };
                    *cut2.lock().expect("cut lock") = Some(q.image(power));
                }
            });
            let exposed = check_recovery(&process, &m, &format!("{what}, process crash"));
            process.clear_hook();
            if let Some(img) = cut.lock().expect("cut lock").take() {
                check_recovery(&img, &m, &format!("{what}, power loss during that recovery"));
                STATES.fetch_add(1, Ordering::Relaxed);
            }
            let power =
                process.crash_image(CrashSpec { loss: Loss::All, tear_last_write: false, seed: 0 });
            let after = check_recovery(&power, &m, &format!("{what}, power loss after restart"));
            assert_eq!(
                exposed, after,
                "{what}: a power loss after restart took back what recovery exposed"
            );
            STATES.fetch_add(1, Ordering::Relaxed);
        }
        // A crash during recovery: cut it at some operation and recover from there.
        if k == 2 {
            let cut: Arc<Mutex<Option<FaultStorage>>> = Arc::default();
            let (cut2, target) = (cut.clone(), n % 3);
            let ops = Arc::new(AtomicU64::new(0));
            pristine.set_hook(move |q| {
                if ops.fetch_add(1, Ordering::Relaxed) == target {
                    *cut2.lock().expect("cut lock") = Some(q.image(spec));
                }
            });
            let during = check_recovery(&pristine, &m, &format!("{what}, recovery cut"));
            pristine.clear_hook();
            if let Some(img) = cut.lock().expect("cut lock").take() {
                let after = check_recovery(&img, &m, &format!("{what}, after a crash in recovery"));
                assert_eq!(after, during, "{what}: a crash in recovery changed the log");
            }
            STATES.fetch_add(1, Ordering::Relaxed);
        }
        STATES.fetch_add(1, Ordering::Relaxed);
    }
}

fn payload(rng: &mut SmallRng) -> Payload {
    let len = match rng.random_range(0..10) {
        0 => 0,
        1 => rng.random_range(900..=1024),
        _ => rng.random_range(1..200),
    };
    (0..len).map(|_| rng.random()).collect()
}

/// Submits one batch of one to three entries at `next` without waiting, and records it in the
/// model as submitted (not acknowledged). Returns its ticket and the index after it.
fn submit_batch(
    wal: &Wal,
    model: &Mutex<Model>,
    rng: &mut SmallRng,
    term: Term,
    next: u64,
) -> (Ticket, u64) {
    let batch: Vec<(Term, Payload)> =
        (0..rng.random_range(1..=3)).map(|_| (term, payload(rng))).collect();
    let entries: Vec<Entry<'_>> = batch
        .iter()
        .enumerate()
        .map(|(i, (t, p))| Entry { term: *t, index: LogIndex(next + i as u64), payload: p })
        .collect();
    // The model first: the hook checks crash images taken inside this call against it.
    {
        let mut mm = model.lock().expect("model");
        for (i, e) in batch.iter().enumerate() {
            mm.history.entry(next + i as u64).or_default().push(e.clone());
        }
        mm.log.extend(batch.iter().cloned());
    }
    let ticket = wal.submit(&entries).expect("submit");
    (ticket, next + batch.len() as u64)
}

fn run_workload(seed: u64, steps: usize, prepare_segments: bool) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let storage = FaultStorage::new();
    let model = Arc::new(Mutex::new(Model { first: 1, origin: 1, ..Model::default() }));
    let points = Arc::new(AtomicU64::new(0));
    {
        let (model, points) = (model.clone(), points.clone());
        storage.set_hook(move |p| {
            let n = points.fetch_add(1, Ordering::Relaxed);
            on_crash_point(p, &model, seed, n);
        });
    }
    let mut wal =
        Wal::open_with(Arc::new(storage.clone()), opts_with(prepare_segments)).expect("open fresh");
    let mut term = Term(1);
    for _ in 0..steps {
        let m = model.lock().expect("model").clone();
        let last = m.last();
        let commit = m.hard_state.commit.get();
        match rng.random_range(0..20) {
            0..=12 => {
                // One to three submissions, then wait for all (they may share a group).
                if rng.random_range(0..6) == 0 {
                    term = Term(term.get() + 1);
                }
                let mut next = last + 1;
                let mut tickets = Vec::new();
                for _ in 0..rng.random_range(1..=3) {
                    let (ticket, after) = submit_batch(&wal, &model, &mut rng, term, next);
                    tickets.push(ticket);
                    next = after;
                }
                wal.wait(*tickets.last().expect("one ticket")).expect("wait");
                model.lock().expect("model").acked = next - 1;
            }
            13..=14 if last > commit.max(m.first - 1) => {
                let from = rng.random_range(commit.max(m.first - 1) + 1..=last);
                model.lock().expect("model").truncating = Some(from);
                wal.truncate_suffix(LogIndex(from)).expect("truncate");
                let mut mm = model.lock().expect("model");
                let keep = (from - mm.origin) as usize;
                mm.log.truncate(keep);
                mm.acked = mm.acked.min(from - 1);
                mm.truncating = None;
            }
            15..=16 => {
                // A restart below the commit index leaves the commit above the log.
                let commit = rng.random_range(commit..=commit.max(m.acked));
                let hs = HardState {
                    term,
                    vote: Some(NodeId(1 + term.get() % 3)),
                    commit: LogIndex(commit),
                };
                let hs = if hs.term == m.hard_state.term {
                    HardState { vote: m.hard_state.vote, ..hs }
                } else {
                    hs
                };
                model.lock().expect("model").saving = Some(hs);
                wal.save_hard_state(hs).expect("save hard state");
                let mut mm = model.lock().expect("model");
                mm.hard_state = hs;
                mm.saving = None;
            }
            17 if commit.min(last) >= m.first => {
                let before = rng.random_range(m.first + 1..=commit.min(last) + 1);
                model.lock().expect("model").compacting = Some(before);
                wal.compact_prefix(LogIndex(before)).expect("compact");
                let mut mm = model.lock().expect("model");
                mm.first = before;
                mm.compacting = None;
            }
            18 => {
                // A clean restart.
                drop(wal);
                wal = Wal::open_with(Arc::new(storage.clone()), opts_with(prepare_segments))
                    .expect("reopen");
                assert_eq!(wal.last_index().get(), model.lock().expect("model").last());
            }
            _ => {
                // A log restart: far ahead, inside the log, or at or below its first index;
                // sometimes with an append still queued (written first, then discarded).
                let queued = (rng.random_range(0..3) == 0)
                    .then(|| submit_batch(&wal, &model, &mut rng, term, last + 1).0);
                let f = match rng.random_range(0..4) {
                    0 => rng.random_range(last + 1..=last + 40),
                    1 if last >= m.first => rng.random_range(m.first..=last),
                    2 => rng.random_range(1..=m.first),
                    _ => last + 1,
                };
                let t = Term(rng.random_range(1..=term.get()));
                model.lock().expect("model").restarting = Some((f, t));
                wal.restart_at(LogIndex(f), t).expect("restart");
                if let Some(ticket) = queued {
                    wal.wait(ticket).expect("an append queued before the restart completes");
                }
                let mut mm = model.lock().expect("model");
                mm.log.clear();
                mm.history.clear();
                mm.origin = f;
                mm.origin_prev_term = t;
                mm.first = f;
                mm.acked = f - 1;
                mm.restarting = None;
                drop(mm);
                assert_eq!((wal.first_index(), wal.last_index()), (LogIndex(f), LogIndex(f - 1)));
                assert_eq!(wal.term(LogIndex(f - 1)).expect("term before the restart"), t);
            }
        }
    }
    storage.clear_hook();
}

#[test]
fn every_crash_point_recovers_every_acknowledged_append() {
    let seeds: u64 =
        std::env::var("RAFTWAL_CRASH_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    let before = STATES.load(Ordering::Relaxed);
    let (new_before, old_before) =
        (RESTART_NEW.load(Ordering::Relaxed), RESTART_OLD.load(Ordering::Relaxed));
    for seed in 0..seeds {
        run_workload(seed, 60, false);
    }
    let states = STATES.load(Ordering::Relaxed) - before;
    let restart_new = RESTART_NEW.load(Ordering::Relaxed) - new_before;
    let restart_old = RESTART_OLD.load(Ordering::Relaxed) - old_before;
    println!("crash states checked: {states}");
    println!(
        "recoveries inside restart_at: {restart_old} gave the old log, {restart_new} the new one"
    );
    assert!(states >= 100_000 || seeds < 120, "only {states} crash states");
    assert!(
        (restart_new >= 1_000 && restart_old >= 1_000) || seeds < 120,
        "restarts barely exercised: {restart_old} old, {restart_new} new"
    );
}

/// The same checks with segments prepared by the background thread, whose create, fill, sync
/// and rename interleave with the writer's operations. The interleaving depends on thread
/// timing, so a failure here names its seed and point but may not replay exactly; the
/// deterministic test above covers everything else.
#[test]
fn crash_points_with_prepared_segments_recover() {
    for seed in 10_000..10_040 {
        run_workload(seed, 60, true);
    }
}
