//! Salvage: a replica that can fetch entries again from its peers opens a damaged log by
//! cutting it just before the damage. The cut keeps only verified entries, says how far the log
//! reached before it, tells the caller before anything is deleted, and leaves a log that takes
//! appends from the cut on and reopens cleanly. Damage to the hard state still refuses.

use std::sync::Arc;

use raftwal_wal::fault::{CrashSpec, FaultStorage, Loss};
use raftwal_wal::{Entry, Error, HardState, LogIndex, Options, Salvage, Term, Wal};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SEGMENT_BYTES: u64 = 4096;

fn opts() -> Options {
    Options {
        segment_bytes: SEGMENT_BYTES,
        record_bytes_max: 1024,
        group_bytes_max: 4096,
        ..Options::default()
    }
}

fn term_of(i: u64) -> Term {
    Term(1 + i / 10)
}

fn payload(i: u64) -> Vec<u8> {
    (0..(i * 37 % 300) as usize).map(|b| (b as u64 * 31 + i) as u8).collect()
}

/// `n` entries, one write group each, in many small segments; commit saved at `n`.
fn build(n: u64) -> FaultStorage {
    let storage = FaultStorage::new();
    let wal = Wal::open_with(Arc::new(storage.clone()), opts()).expect("open");
    append(&wal, 1..=n, 0);
    wal.save_hard_state(HardState { term: term_of(n), vote: None, commit: LogIndex(n) })
        .expect("hard state");
    storage
}

/// Appends `range` with payloads shifted by `salt` (0: the original entries).
fn append(wal: &Wal, range: std::ops::RangeInclusive<u64>, salt: u8) {
    for i in range {
        let mut p = payload(i);
        p.iter_mut().for_each(|b| *b = b.wrapping_add(salt));
        wal.append(&[Entry { term: term_of(i), index: LogIndex(i), payload: &p }]).expect("append");
    }
}

fn copy(storage: &FaultStorage) -> FaultStorage {
    storage.crash_image(CrashSpec { loss: Loss::None, tear_last_write: false, seed: 0 })
}

fn segments(storage: &FaultStorage) -> Vec<String> {
    storage.names().into_iter().filter(|s| s.ends_with(".wal")).collect()
}

/// Opens salvaging, checking that the hook runs before any file is deleted.
fn open_salvaging(image: &FaultStorage) -> Result<(Wal, Vec<Salvage>), Error> {
    let mut seen = Vec::new();
    let names_before = image.names();
    let probe = image.clone();
    let wal = Wal::open_salvaging(Arc::new(image.clone()), opts(), &mut |s| {
        for name in &s.dropped {
            assert!(probe.names().contains(name), "{name} deleted before the hook ran");
        }
        assert!(
            names_before.iter().filter(|n| n.ends_with(".wal")).all(|n| probe.names().contains(n)),
            "a segment was deleted before the hook ran"
        );
        seen.push(s.clone());
        Ok(())
    })?;
    Ok((wal, seen))
}

/// Every record served must be the one written.
fn assert_prefix_intact(wal: &Wal) {
    let (first, last) = (wal.first_index(), wal.last_index());
    for r in wal.read(first..last.next(), u64::MAX).expect("read verified records") {
        assert_eq!(r.payload(), payload(r.index().get()).as_slice(), "index {}", r.index());
    }
}

/// The cut log takes appends from the cut on (as a leader resends them), and the next plain
/// open finds it whole.
fn assert_repairable(image: &FaultStorage, wal: Wal, n: u64) {
    let from = wal.last_index().get() + 1;
    append(&wal, from..=n, 0);
    drop(wal);
    let again = Wal::open_with(Arc::new(image.clone()), opts()).expect("reopens without salvage");
    assert_eq!(again.last_index(), LogIndex(n));
    assert_prefix_intact(&again);
}

#[test]
fn a_flip_anywhere_in_a_sealed_segment_is_cut_before_and_repaired() {
    let n = 200;
    let storage = build(n);
    let segs = segments(&storage);
    assert!(segs.len() >= 5, "several sealed segments: {}", segs.len());
    let sealed = &segs[..segs.len() - 1];
    let mut rng = SmallRng::seed_from_u64(11);
    for round in 0..300 {
        let image = copy(&storage);
        let seg = &sealed[rng.random_range(0..sealed.len())];
        let len = image.file_bytes(seg).expect("exists").len() as u64;
        let used = image
            .file_bytes(seg)
            .expect("exists")
            .iter()
            .rposition(|&b| b != 0)
            .map_or(64, |p| p as u64 + 1);
        let byte =
            if round % 10 == 0 { rng.random_range(0..64) } else { rng.random_range(64..used) };
        assert!(byte < len);
        image.flip_bit(seg, byte, rng.random_range(0..8));
        // A plain open refuses ...
        assert!(
            matches!(Wal::open_with(Arc::new(copy(&image)), opts()), Err(Error::Corrupt { .. })),
            "flip at {seg}:{byte} not refused by a plain open"
        );
        // ... a salvaging one cuts before the damage and says how far the log reached.
        let (wal, seen) = open_salvaging(&image).expect("salvage opens");
        let s = wal.salvage().expect("salvaged").clone();
        assert_eq!(seen, vec![s.clone()], "the hook saw what was cut");
        assert_eq!(&s.segment, seg, "the damage is named");
        assert_eq!(wal.last_index(), s.kept_last);
        assert!(s.kept_last < LogIndex(n), "something was cut");
        assert_eq!(s.seen_last, Some((LogIndex(n), term_of(n))), "the later segments show n");
        assert!(wal.hard_state().commit <= s.kept_last, "commit lowered to the kept log");
        assert!(!s.dropped.is_empty() || byte < 64, "later segments dropped");
        for d in &s.dropped {
            assert!(!image.names().contains(d), "{d} deleted after the hook");
        }
        assert_prefix_intact(&wal);
        assert_repairable(&image, wal, n);
    }
}

#[test]
fn a_sealed_segment_cut_short_is_salvaged_at_its_end() {
    let n = 200;
    let storage = build(n);
    let segs = segments(&storage);
    let image = copy(&storage);
    let victim = &segs[3];
    image.truncate_file(victim, 64 + 100);
    assert!(matches!(Wal::open_with(Arc::new(copy(&image)), opts()), Err(Error::Corrupt { .. })));
    let (wal, _) = open_salvaging(&image).expect("salvage opens");
    let s = wal.salvage().expect("salvaged").clone();
    assert_eq!(&s.segment, victim, "the short segment is named");
    assert!(!s.dropped.is_empty(), "the segments after it are dropped");
    assert_eq!(s.seen_last, Some((LogIndex(n), term_of(n))));
    assert_prefix_intact(&wal);
    assert_repairable(&image, wal, n);
}

#[test]
fn a_flip_followed_by_a_later_group_in_the_active_segment_is_cut_there() {
    let n = 20;
    // One big segment: every frame is in the active one.
    let storage = FaultStorage::new();
    let big = Options { segment_bytes: 1 << 20, ..opts() };
    let wal = Wal::open_with(Arc::new(storage.clone()), big.clone()).expect("open");
    append(&wal, 1..=n, 0);
    drop(wal);
    let seg = segments(&storage).pop().expect("one segment");
    let image = copy(&storage);
    // The payload of some early entry (frames start at 64; entry 1 has a 37-byte payload).
    image.flip_bit(&seg, 64 + 40 + 3, 2);
    let mut seen = None;
    let wal = Wal::open_salvaging(Arc::new(image.clone()), big.clone(), &mut |s| {
        seen = Some(s.clone());
        Ok(())
    })
    .expect("salvage opens");
    let s = seen.expect("hook ran");
    assert_eq!(wal.last_index(), LogIndex(0), "entry 1 was damaged: nothing kept");
    assert_eq!(s.kept_last, LogIndex(0));
    assert_eq!(s.seen_last, Some((LogIndex(n), term_of(n))));
    assert!(s.dropped.is_empty());
    // The same damage is found again by a second salvage before anything is appended.
    drop(wal);
    let mut again = None;
    let wal = Wal::open_salvaging(Arc::new(image.clone()), big.clone(), &mut |s| {
        again = Some(s.clone());
        Ok(())
    })
    .expect("second salvage opens");
    assert_eq!(again.map(|s| s.kept_last), Some(LogIndex(0)));
    append(&wal, 1..=n, 0);
    drop(wal);
    let plain = Wal::open_with(Arc::new(image), big).expect("repaired log opens plainly");
    assert_eq!(plain.last_index(), LogIndex(n));
}

#[test]
fn a_failing_hook_fails_the_open_and_changes_nothing() {
    let storage = build(200);
    let image = copy(&storage);
    let segs = segments(&image);
    image.flip_bit(&segs[2], 64 + 5, 1);
    let before: Vec<_> =
        image.names().into_iter().map(|n| (n.clone(), image.file_bytes(&n))).collect();
    let err = Wal::open_salvaging(Arc::new(image.clone()), opts(), &mut |_| {
        Err(std::io::Error::other("cannot remember the floor"))
    })
    .expect_err("the hook's error fails the open");
    assert!(err.to_string().contains("cannot remember the floor"), "{err}");
    let after: Vec<_> =
        image.names().into_iter().map(|n| (n.clone(), image.file_bytes(&n))).collect();
    assert_eq!(before, after, "nothing deleted or written");
}

#[test]
fn damage_to_both_hard_state_slots_still_refuses() {
    let storage = build(50);
    let image = copy(&storage);
    image.flip_bit("meta", 20, 1);
    image.flip_bit("meta", 512 + 20, 1);
    let err = Wal::open_salvaging(Arc::new(image), opts(), &mut |_| Ok(()))
        .expect_err("no peer can give back a term and vote");
    assert!(matches!(err, Error::Corrupt { ref segment, .. } if segment == "meta"), "{err}");
}

#[test]
fn how_far_the_log_reached_is_judged_by_term_then_index() {
    // 1..=100 at term 1, then a truncation at 50 (a new leader's log) and 50..=60 at term 2:
    // segments behind the cut still hold stale term-1 frames up to 100.
    let storage = FaultStorage::new();
    let wal = Wal::open_with(Arc::new(storage.clone()), opts()).expect("open");
    let p = vec![7u8; 200];
    for i in 1..=100 {
        wal.append(&[Entry { term: Term(1), index: LogIndex(i), payload: &p }]).expect("append");
    }
    wal.truncate_suffix(LogIndex(50)).expect("truncate");
    for i in 50..=60 {
        wal.append(&[Entry { term: Term(2), index: LogIndex(i), payload: &p }]).expect("append");
    }
    drop(wal);
    let image = copy(&storage);
    // Damage early in the first segment (index 1's payload).
    let first = segments(&image).into_iter().next().expect("a segment");
    image.flip_bit(&first, 64 + 40 + 5, 0);
    let (wal, _) = open_salvaging(&image).expect("salvage opens");
    let s = wal.salvage().expect("salvaged").clone();
    assert_eq!(
        s.seen_last,
        Some((LogIndex(60), Term(2))),
        "the log's real end (2/60) wins over stale term-1 frames at higher indexes"
    );
}
