//! `Wal::restart_at`: the whole log discarded for an empty one at a given index, on real files
//! and on the fault-injecting storage, with a crash at every point of the restart itself.

use std::path::Path;
use std::sync::{Arc, Mutex};

use raftwal_wal::fault::{CrashSpec, FaultStorage, Loss};
use raftwal_wal::{Entry, Error, HardState, LogIndex, NodeId, Options, Record, Term, Wal};

fn file_opts() -> Options {
    Options {
        segment_bytes: 64 << 10,
        record_bytes_max: 16 << 10,
        group_bytes_max: 64 << 10,
        prepare_segments: true,
        ..Options::default()
    }
}

/// Small segments, no preparer thread (its IO would interleave with the crash points).
fn sim_opts() -> Options {
    Options {
        segment_bytes: 4096,
        record_bytes_max: 1024,
        group_bytes_max: 4096,
        ..Options::default()
    }
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|b| (b as u64).wrapping_mul(13).wrapping_add(i) as u8).collect()
}

fn append(wal: &Wal, range: std::ops::RangeInclusive<u64>, term: Term, len: usize) {
    for i in range {
        let p = payload(i, len);
        wal.append(&[Entry { term, index: LogIndex(i), payload: &p }]).expect("append");
    }
}

fn segment_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter(|e| e.as_ref().expect("entry").path().extension().is_some_and(|x| x == "wal"))
        .count()
}

fn assert_empty_at(wal: &Wal, first: u64, prev_term: Term) {
    assert_eq!((wal.first_index(), wal.last_index()), (LogIndex(first), LogIndex(first - 1)));
    assert_eq!(wal.term(LogIndex(first - 1)).expect("term before the first index"), prev_term);
}

#[test]
fn a_restart_far_ahead_discards_everything_and_the_log_goes_on_from_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(dir.path(), file_opts()).expect("open");
    append(&wal, 1..=200, Term(2), 1000);
    let hs = HardState { term: Term(3), vote: Some(NodeId(2)), commit: LogIndex(150) };
    wal.save_hard_state(hs).expect("save");
    assert!(segment_files(dir.path()) >= 3);
    // Readers holding records of the old log keep reading them (the maps stay alive).
    let held: Vec<Record> = wal.read(LogIndex(1)..LogIndex(201), u64::MAX).expect("read");

    wal.restart_at(LogIndex(10_000), Term(3)).expect("restart");
    assert_empty_at(&wal, 10_000, Term(3));
    assert_eq!(wal.hard_state(), hs, "the hard state is untouched");
    assert_eq!(segment_files(dir.path()), 1, "the old segments are gone, one empty one is left");
    for r in &held {
        assert_eq!(r.payload(), payload(r.index().get(), 1000).as_slice());
    }
    assert!(matches!(wal.entry(LogIndex(200)), Err(Error::OutOfRange { .. })));
    assert!(matches!(wal.read(LogIndex(1)..LogIndex(2), 10), Err(Error::OutOfRange { .. })));
    assert!(matches!(wal.term(LogIndex(9_998)), Err(Error::OutOfRange { .. })));
    assert!(matches!(wal.truncate_suffix(LogIndex(9_998)), Err(Error::OutOfRange { .. })));
    wal.truncate_suffix(LogIndex(10_000)).expect("nothing there to truncate");

    // Appends must start at the new first index, with a term of at least the one before it.
    let p = payload(0, 10);
    assert!(matches!(
        wal.append(&[Entry { term: Term(3), index: LogIndex(201), payload: &p }]),
        Err(Error::NonContiguous { expected: LogIndex(10_000), got: LogIndex(201) })
    ));
    assert!(matches!(
        wal.append(&[Entry { term: Term(2), index: LogIndex(10_000), payload: &p }]),
        Err(Error::TermRegression { .. })
    ));
    append(&wal, 10_000..=10_119, Term(4), 1000);
    wal.truncate_suffix(LogIndex(10_110)).expect("truncate after a restart");
    append(&wal, 10_110..=10_112, Term(5), 10);
    wal.compact_prefix(LogIndex(10_090)).expect("compact after a restart");
    drop(held);
    drop(wal);

    let wal = Wal::open(dir.path(), file_opts()).expect("reopen");
    assert!(wal.recovery().removed.is_empty(), "{:?}", wal.recovery().removed);
    assert_eq!((wal.first_index(), wal.last_index()), (LogIndex(10_090), LogIndex(10_112)));
    assert_eq!(wal.term(LogIndex(10_089)).expect("boundary"), Term(4));
    assert_eq!(wal.hard_state(), hs);
    for r in wal.read(LogIndex(10_090)..LogIndex(10_113), u64::MAX).expect("read") {
        let len = if r.index() < LogIndex(10_110) { 1000 } else { 10 };
        assert_eq!(r.payload(), payload(r.index().get(), len).as_slice());
    }
    assert!(matches!(wal.entry(LogIndex(10_089)), Err(Error::OutOfRange { .. })));
}

#[test]
fn an_empty_restarted_log_survives_a_reopen_and_takes_appends_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(dir.path(), file_opts()).expect("open");
    append(&wal, 1..=5, Term(1), 100);
    wal.restart_at(LogIndex(77), Term(6)).expect("restart");
    drop(wal);
    let wal = Wal::open(dir.path(), file_opts()).expect("reopen");
    assert_empty_at(&wal, 77, Term(6));
    append(&wal, 77..=80, Term(6), 100);
    drop(wal);
    let wal = Wal::open(dir.path(), file_opts()).expect("reopen again");
    assert_eq!((wal.first_index(), wal.last_index()), (LogIndex(77), LogIndex(80)));
    assert_eq!(wal.entry(LogIndex(77)).expect("read").payload(), payload(77, 100).as_slice());
}

#[test]
fn a_restart_inside_the_log_discards_the_whole_log() {
    let storage = FaultStorage::new();
    let wal = Wal::open_with(Arc::new(storage.clone()), sim_opts()).expect("open");
    append(&wal, 1..=50, Term(1), 200);
    wal.save_hard_state(HardState { term: Term(2), vote: None, commit: LogIndex(30) })
        .expect("save");
    let held = wal.entry(LogIndex(25)).expect("read");
    // Below the last index and below the commit index: the leader's word wins.
    wal.restart_at(LogIndex(20), Term(1)).expect("restart");
    assert_empty_at(&wal, 20, Term(1));
    assert_eq!(wal.hard_state().commit, LogIndex(30), "the hard state is untouched");
    assert_eq!(held.payload(), payload(25, 200).as_slice());
    append(&wal, 20..=24, Term(2), 7);
    drop(wal);
    let wal = Wal::open_with(Arc::new(storage), sim_opts()).expect("reopen");
    assert_eq!((wal.first_index(), wal.last_index()), (LogIndex(20), LogIndex(24)));
    let got: Vec<(Term, Vec<u8>)> = wal
        .read(LogIndex(20)..LogIndex(25), u64::MAX)
        .expect("read")
        .iter()
        .map(|r| (r.term(), r.payload().to_vec()))
        .collect();
    let want: Vec<(Term, Vec<u8>)> = (20..=24).map(|i| (Term(2), payload(i, 7))).collect();
    assert_eq!(got, want, "only the entries appended after the restart");
}

#[test]
fn a_restart_below_the_first_index_moves_the_start_back() {
    let storage = FaultStorage::new();
    let wal = Wal::open_with(Arc::new(storage.clone()), sim_opts()).expect("open");
    append(&wal, 1..=60, Term(1), 300);
    wal.save_hard_state(HardState { term: Term(1), vote: None, commit: LogIndex(50) })
        .expect("save");
    wal.compact_prefix(LogIndex(40)).expect("compact");
    wal.restart_at(LogIndex(10), Term(1)).expect("restart");
    assert_empty_at(&wal, 10, Term(1));
    append(&wal, 10..=12, Term(1), 5);
    drop(wal);
    let wal = Wal::open_with(Arc::new(storage), sim_opts()).expect("reopen");
    assert_eq!((wal.first_index(), wal.last_index()), (LogIndex(10), LogIndex(12)));
    assert_eq!(wal.entry(LogIndex(10)).expect("read").payload(), payload(10, 5).as_slice());
}

#[test]
fn queued_appends_are_written_first_then_discarded() {
    let storage = FaultStorage::new();
    let wal = Wal::open_with(Arc::new(storage), sim_opts()).expect("open");
    append(&wal, 1..=3, Term(1), 10);
    let p = payload(4, 10);
    let ticket =
        wal.submit(&[Entry { term: Term(1), index: LogIndex(4), payload: &p }]).expect("submit");
    wal.restart_at(LogIndex(100), Term(2)).expect("restart");
    wal.wait(ticket).expect("the queued append was written before the restart");
    assert_empty_at(&wal, 100, Term(2));
    assert!(wal.stats().entries >= 4, "the queued entry was written: {:?}", wal.stats());
}

#[test]
fn a_restart_commits_durably_even_without_group_syncs() {
    let storage = FaultStorage::new();
    let opts = Options { durability: raftwal_wal::Durability::UnsafeNoSync, ..sim_opts() };
    let wal = Wal::open_with(Arc::new(storage.clone()), opts.clone()).expect("open");
    append(&wal, 1..=30, Term(1), 300);
    wal.restart_at(LogIndex(90), Term(1)).expect("restart");
    drop(wal);
    let power = storage.crash_image(CrashSpec { loss: Loss::All, tear_last_write: false, seed: 5 });
    let wal = Wal::open_with(Arc::new(power), opts).expect("recover after a power loss");
    assert_empty_at(&wal, 90, Term(1));
}

#[test]
fn restart_at_index_zero_is_refused() {
    let wal = Wal::open_with(Arc::new(FaultStorage::new()), sim_opts()).expect("open");
    append(&wal, 1..=2, Term(1), 10);
    assert!(matches!(
        wal.restart_at(LogIndex(0), Term(1)),
        Err(Error::OutOfRange { index: LogIndex(0), .. })
    ));
    assert_eq!(wal.last_index(), LogIndex(2));
    assert!(!wal.is_poisoned());
}

/// The log one of the two allowed outcomes of a restart leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Old,
    New,
}

/// Recovers `image` and says whether it holds exactly the old log (entries `old_first..` of
/// `old`, index 1 first) or exactly the new empty one at `new`; also returns the files recovery
/// removed.
fn outcome(
    image: &FaultStorage,
    old: &[(Term, Vec<u8>)],
    old_first: u64,
    new: (u64, Term),
    what: &str,
) -> (Outcome, Vec<String>) {
    let wal = Wal::open_with(Arc::new(image.clone()), sim_opts())
        .unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
    let removed = wal.recovery().removed.clone();
    let (first, last) = (wal.first_index().get(), wal.last_index().get());
    let prev = wal.term(LogIndex(first - 1)).expect("term before the first index");
    if (first, last, prev) == (new.0, new.0 - 1, new.1) {
        return (Outcome::New, removed);
    }
    assert_eq!(
        (first, last),
        (old_first, old.len() as u64),
        "{what}: neither the old log nor the new one"
    );
    let old_prev = if first == 1 { Term(0) } else { old[(first - 2) as usize].0 };
    assert_eq!(prev, old_prev, "{what}: term before the old first index");
    let got: Vec<(Term, Vec<u8>)> = wal
        .read(LogIndex(first)..LogIndex(last + 1), u64::MAX)
        .expect("read")
        .iter()
        .map(|r| (r.term(), r.payload().to_vec()))
        .collect();
    assert_eq!(got.as_slice(), &old[(first - 1) as usize..], "{what}: the old log changed");
    (Outcome::Old, removed)
}

/// Builds a log of 40 entries over several segments (compacted to `compact_to`, at least 2),
/// then restarts it at `new` with crash images taken before every operation of the restart:
/// unsynced data all lost, all kept, some kept, the last write torn, and a process crash. Each
/// must recover to exactly the old or exactly the new log, twice in a row.
fn crash_through_a_restart(compact_to: u64, new: (u64, Term)) {
    let storage = FaultStorage::new();
    let wal = Wal::open_with(Arc::new(storage.clone()), sim_opts()).expect("open");
    let old: Vec<(Term, Vec<u8>)> = (1..=40).map(|i| (Term(1 + i / 15), payload(i, 300))).collect();
    for (i, (t, p)) in old.iter().enumerate() {
        wal.append(&[Entry { term: *t, index: LogIndex(i as u64 + 1), payload: p }])
            .expect("append");
    }
    wal.save_hard_state(HardState { term: Term(3), vote: None, commit: LogIndex(35) })
        .expect("save");
    wal.compact_prefix(LogIndex(compact_to)).expect("compact");
    let old_segments: Vec<String> =
        storage.names().into_iter().filter(|n| n.ends_with(".wal")).collect();
    assert!(old_segments.len() >= 2, "{old_segments:?}");
    let images: Arc<Mutex<Vec<(String, FaultStorage)>>> = Arc::default();
    let sink = images.clone();
    storage.set_hook(move |p| {
        let mut sink = sink.lock().expect("images");
        for (k, loss) in [Loss::All, Loss::None, Loss::Some, Loss::Some].into_iter().enumerate() {
            let spec = CrashSpec { loss, tear_last_write: k % 2 == 1, seed: k as u64 * 7919 };
            sink.push((format!("{} {spec:?}", p.op()), p.image(spec)));
        }
        sink.push((format!("{} process crash", p.op()), p.process_crash_image()));
    });
    wal.restart_at(LogIndex(new.0), new.1).expect("restart");
    storage.clear_hook();
    drop(wal);
    let restart_segment: Vec<String> =
        storage.names().into_iter().filter(|n| n.ends_with(".wal")).collect();
    assert_eq!(restart_segment.len(), 1);
    let images = std::mem::take(&mut *images.lock().expect("images"));
    assert!(images.len() >= 5 * 8, "only {} crash images", images.len());
    let (mut unfinished_removed, mut leftovers_removed) = (false, false);
    for (i, (op, image)) in images.iter().enumerate() {
        let what = format!("crash image {i} before {op}");
        let (got, removed) = outcome(image, &old, compact_to, new, &what);
        let (again, _) = outcome(image, &old, compact_to, new, &format!("{what}, again"));
        assert_eq!(again, got, "{what}: a second recovery disagrees");
        if i < 5 {
            assert_eq!(got, Outcome::Old, "{what}: before the restart wrote anything");
        }
        // The two intermediate states: the restart segment on disk while the hard state still
        // has the old start, and old segments on disk after the new start is durable.
        unfinished_removed |= got == Outcome::Old && removed.contains(&restart_segment[0]);
        leftovers_removed |=
            got == Outcome::New && old_segments.iter().any(|s| removed.contains(s));
    }
    assert!(unfinished_removed, "no image held an unfinished restart segment");
    assert!(leftovers_removed, "no image held old segments after the commit point");
    let (end, _) = outcome(&storage, &old, compact_to, new, "after the restart");
    assert_eq!(end, Outcome::New);
}

#[test]
fn every_crash_point_of_a_restart_far_ahead_recovers_old_or_new() {
    crash_through_a_restart(2, (500, Term(7)));
}

#[test]
fn every_crash_point_of_a_restart_inside_the_log_recovers_old_or_new() {
    crash_through_a_restart(2, (20, Term(1)));
}

#[test]
fn every_crash_point_of_a_restart_below_the_first_index_recovers_old_or_new() {
    // The new first index is below the old one: only the commit marker tells them apart.
    crash_through_a_restart(30, (5, Term(1)));
}

#[test]
fn an_unfinished_restart_stays_unfinished_after_recovery_and_new_hard_states() {
    // A crash just before the commit point leaves the restart segment on disk; recovery deletes
    // it. The next hard-state save takes the very sequence number the segment names as its
    // commit, so that deletion must be durable first, or a later crash would commit the
    // restart after the fact.
    let storage = FaultStorage::new();
    let wal = Wal::open_with(Arc::new(storage.clone()), sim_opts()).expect("open");
    let old: Vec<(Term, Vec<u8>)> = (1..=30).map(|i| (Term(1), payload(i, 300))).collect();
    for (i, (t, p)) in old.iter().enumerate() {
        wal.append(&[Entry { term: *t, index: LogIndex(i as u64 + 1), payload: p }])
            .expect("append");
    }
    let before_commit: Arc<Mutex<Option<FaultStorage>>> = Arc::default();
    let sink = before_commit.clone();
    let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    storage.set_hook(move |p| {
        // The second write of the restart is the hard-state slot: take the disk as it is then.
        if p.op() == "write" && writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 1 {
            let spec = CrashSpec { loss: Loss::None, tear_last_write: false, seed: 0 };
            *sink.lock().expect("image") = Some(p.image(spec));
        }
    });
    wal.restart_at(LogIndex(5), Term(1)).expect("restart");
    storage.clear_hook();
    let image = before_commit.lock().expect("image").take().expect("a write of the hard state");
    let hs = HardState { term: Term(9), vote: Some(NodeId(1)), commit: LogIndex(3) };
    for seed in 0..16 {
        let disk = image.crash_image(CrashSpec { loss: Loss::None, tear_last_write: false, seed });
        let wal = Wal::open_with(Arc::new(disk.clone()), sim_opts()).expect("recover");
        assert_eq!(wal.last_index(), LogIndex(30), "the restart did not commit");
        wal.save_hard_state(hs).expect("save");
        drop(wal);
        let after = disk.crash_image(CrashSpec { loss: Loss::All, tear_last_write: false, seed });
        let (got, _) = outcome(&after, &old, 1, (5, Term(1)), &format!("seed {seed}"));
        assert_eq!(got, Outcome::Old, "seed {seed}: a deleted restart segment came back");
    }
}

#[test]
fn a_failed_write_or_sync_in_a_restart_poisons_and_reopens_to_old_or_new() {
    // A restart makes two writes (segment header, hard-state slot), each followed by a sync.
    for (fail_write, n) in [(true, 0), (true, 1), (false, 0), (false, 1)] {
        let storage = FaultStorage::new();
        let wal = Wal::open_with(Arc::new(storage.clone()), sim_opts()).expect("open");
        let old: Vec<(Term, Vec<u8>)> = (1..=20).map(|i| (Term(1), payload(i, 300))).collect();
        for (i, (t, p)) in old.iter().enumerate() {
            wal.append(&[Entry { term: *t, index: LogIndex(i as u64 + 1), payload: p }])
                .expect("append");
        }
        if fail_write {
            storage.fail_write_after(n);
        } else {
            storage.fail_sync_after(n);
        }
        let what = format!("failing {} {n}", if fail_write { "write" } else { "sync" });
        assert!(
            matches!(wal.restart_at(LogIndex(300), Term(2)), Err(Error::Io { .. })),
            "{what}: the restart reports the failure"
        );
        assert!(wal.is_poisoned(), "{what}");
        let p = payload(0, 1);
        assert!(matches!(wal.restart_at(LogIndex(300), Term(2)), Err(Error::Poisoned)));
        assert!(matches!(
            wal.append(&[Entry { term: Term(2), index: LogIndex(300), payload: &p }]),
            Err(Error::Poisoned)
        ));
        assert!(matches!(
            wal.save_hard_state(HardState { term: Term(5), ..HardState::default() }),
            Err(Error::Poisoned)
        ));
        assert!(matches!(wal.compact_prefix(LogIndex(2)), Err(Error::Poisoned)));
        drop(wal);
        // A reopen in this process (the page cache as it is), and after a power loss.
        let power =
            storage.crash_image(CrashSpec { loss: Loss::All, tear_last_write: false, seed: 3 });
        outcome(&storage, &old, 1, (300, Term(2)), &format!("{what}, reopened"));
        outcome(&power, &old, 1, (300, Term(2)), &format!("{what}, after a power loss"));
    }
}

#[test]
fn restart_sets_the_segments_gauge() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let wal = metrics::with_local_recorder(&recorder, || {
        Wal::open_with(Arc::new(FaultStorage::new()), sim_opts()).expect("open")
    });
    append(&wal, 1..=30, Term(1), 500);
    wal.restart_at(LogIndex(1000), Term(1)).expect("restart");
    let gauge = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(key, ..)| key.key().name() == "raftwal_wal_segments")
        .map(|(.., value)| value);
    match gauge {
        Some(DebugValue::Gauge(g)) => assert_eq!(g.into_inner(), 1.0),
        other => panic!("segments gauge: {other:?}"),
    }
}
