//! A failed write or fsync poisons the WAL: nothing is acknowledged after it, and every later
//! call fails with `Poisoned`. The failed fsync is never retried.

use std::sync::Arc;

use raftwal_wal::fault::{CrashSpec, FaultStorage, Loss};
use raftwal_wal::{Entry, Error, HardState, LogIndex, Options, Term, Wal};

fn entry(index: u64, payload: &[u8]) -> Entry<'_> {
    Entry { term: Term(1), index: LogIndex(index), payload }
}

fn open(storage: &FaultStorage) -> Wal {
    // No preparer thread: its syncs would race for the injected failure.
    let opts = Options { prepare_segments: false, ..Options::default() };
    Wal::open_with(Arc::new(storage.clone()), opts).expect("open")
}

#[test]
fn failed_fsync_poisons_and_acknowledges_nothing_after() {
    let storage = FaultStorage::new();
    let wal = open(&storage);
    wal.append(&[entry(1, b"a")]).expect("first append");
    // Two submissions share one group; its sync fails.
    let t2 = wal.submit(&[entry(2, b"b")]).expect("submit");
    let t3 = wal.submit(&[entry(3, b"c")]).expect("submit");
    storage.fail_sync_after(0);
    let leader = wal.wait(t3);
    assert!(matches!(leader, Err(Error::Io { .. })), "leader sees the IO error: {leader:?}");
    assert!(matches!(wal.wait(t2), Err(Error::Poisoned)), "the other waiter is not acknowledged");
    assert!(wal.is_poisoned());
    assert_eq!(wal.last_index(), LogIndex(1), "nothing after the failure is visible");
    assert!(matches!(wal.submit(&[entry(4, b"d")]), Err(Error::Poisoned)));
    assert!(matches!(wal.append(&[entry(4, b"d")]), Err(Error::Poisoned)));
    assert!(matches!(
        wal.save_hard_state(HardState { term: Term(2), ..HardState::default() }),
        Err(Error::Poisoned)
    ));
    assert!(matches!(wal.truncate_suffix(LogIndex(1)), Err(Error::Poisoned)));
    assert!(matches!(wal.compact_prefix(LogIndex(2)), Err(Error::Poisoned)));
    assert!(matches!(wal.flush(), Err(Error::Poisoned)));
    // Reads of what was durable before still work.
    assert_eq!(wal.entry(LogIndex(1)).expect("read").payload(), b"a");
}

#[test]
fn failed_write_poisons() {
    let storage = FaultStorage::new();
    let wal = open(&storage);
    storage.fail_write_after(0);
    assert!(matches!(wal.append(&[entry(1, b"a")]), Err(Error::Io { .. })));
    assert!(matches!(wal.append(&[entry(1, b"a")]), Err(Error::Poisoned)));
    assert_eq!(wal.last_index(), LogIndex(0));
}

#[test]
fn failed_frame_write_poisons() {
    let storage = FaultStorage::new();
    let wal = open(&storage);
    wal.append(&[entry(1, b"a")]).expect("first append creates the segment");
    // The next write is a frame write into the existing segment.
    storage.fail_write_after(0);
    assert!(matches!(wal.append(&[entry(2, b"b")]), Err(Error::Io { .. })));
    assert!(matches!(wal.append(&[entry(2, b"b")]), Err(Error::Poisoned)));
    assert_eq!(wal.last_index(), LogIndex(1));
}

#[test]
fn failed_hard_state_sync_poisons() {
    let storage = FaultStorage::new();
    let wal = open(&storage);
    storage.fail_sync_after(0);
    let hs = HardState { term: Term(3), ..HardState::default() };
    assert!(matches!(wal.save_hard_state(hs), Err(Error::Io { .. })));
    assert_eq!(wal.hard_state(), HardState::default(), "the failed save is not reported as saved");
    assert!(matches!(wal.append(&[entry(1, b"a")]), Err(Error::Poisoned)));
}

#[test]
fn reopening_after_poison_recovers_the_acknowledged_prefix() {
    let storage = FaultStorage::new();
    let wal = open(&storage);
    wal.append(&[entry(1, b"a"), entry(2, b"b")]).expect("append");
    storage.fail_sync_after(0);
    assert!(wal.append(&[entry(3, b"c")]).is_err());
    drop(wal);
    // A power loss after the failure: the unsynced entry 3 is gone, the acknowledged ones stay.
    let image = storage.crash_image(CrashSpec { loss: Loss::All, tear_last_write: false, seed: 1 });
    let wal = open(&image);
    assert_eq!(wal.last_index(), LogIndex(2));
    assert_eq!(wal.entry(LogIndex(1)).expect("read").payload(), b"a");
    assert_eq!(wal.entry(LogIndex(2)).expect("read").payload(), b"b");
    // And it takes appends again, continuing the log.
    wal.append(&[entry(3, b"c2")]).expect("append after recovery");
}

const EMFILE: i32 = 24;
const ENOSPC: i32 = 28;

fn small_segments(storage: &FaultStorage, wait: std::time::Duration) -> Wal {
    let opts = Options {
        prepare_segments: false,
        segment_bytes: 4096,
        record_bytes_max: 1024,
        resource_wait_max: wait,
        ..Options::default()
    };
    Wal::open_with(Arc::new(storage.clone()), opts).expect("open")
}

#[test]
fn running_out_of_file_descriptors_or_space_at_a_new_segment_waits_and_does_not_poison() {
    // Before, the first EMFILE at a segment rollover poisoned the WAL and stopped the node.
    for errno in [EMFILE, ENOSPC] {
        let storage = FaultStorage::new();
        let wal = small_segments(&storage, std::time::Duration::from_secs(30));
        let payload = [7u8; 900];
        let mut index = 1;
        while wal.stats().segment_syncs == 0 || index < 4 {
            wal.append(&[entry(index, &payload)]).expect("fill the first segment");
            index += 1;
        }
        let segments_before = storage.names().len();
        // The next rollovers hit the error three times; the writes wait, then complete.
        storage.fail_creates(errno, 3);
        for _ in 0..10 {
            wal.append(&[entry(index, &payload)]).expect("an append through the shortage");
            index += 1;
        }
        assert!(!wal.is_poisoned(), "errno {errno} poisoned the WAL");
        assert_eq!(wal.stats().resource_waits, 3, "errno {errno}");
        assert!(storage.names().len() > segments_before, "new segments were made");
        assert_eq!(wal.entry(LogIndex(index - 1)).expect("read").payload(), &payload[..]);
    }
}

#[test]
fn a_shortage_longer_than_the_wait_poisons() {
    let storage = FaultStorage::new();
    let wal = small_segments(&storage, std::time::Duration::from_millis(50));
    let payload = [7u8; 900];
    storage.fail_creates(EMFILE, u64::MAX);
    let first = wal.append(&[entry(1, &payload)]);
    assert!(matches!(first, Err(Error::Io { .. })), "{first:?}");
    assert!(wal.is_poisoned());
    assert!(wal.stats().resource_waits >= 2, "it waited before giving up");
}
