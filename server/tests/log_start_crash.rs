//! The two-file commit that moves a node's log start (a trim, or a log restart at a leader's
//! start): the log-start file names both starts, the WAL changes, then the file names only the
//! new one. A crash at every storage operation of both directories, with unsynced writes lost,
//! kept or torn, must leave a WAL whose first index has a record in the file (else the node
//! refuses to start, or starts with the wrong membership). docs/node-format.md has the argument.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use raftwal_consensus::{Entry, EntryKind, LogIndex, Membership, NodeId, Term};
use raftwal_server::core::StartChange;
use raftwal_server::shell::NodeStorage;
use raftwal_server::store::{StartRecord, WalBatch, read_log_start};
use raftwal_wal::Wal;
use raftwal_wal::fault::{CrashSpec, FaultStorage, Loss};

type Images = Arc<Mutex<Vec<(&'static str, FaultStorage, FaultStorage)>>>;

fn specs(seed: u64) -> Vec<CrashSpec> {
    [Loss::All, Loss::None, Loss::Some]
        .into_iter()
        .flat_map(|loss| [false, true].map(|tear| CrashSpec { loss, tear_last_write: tear, seed }))
        .collect()
}

fn options() -> raftwal_wal::Options {
    raftwal_wal::Options { segment_bytes: 8 << 10, record_bytes_max: 512, ..Default::default() }
}

fn record(first: u64, members: &[u64]) -> StartRecord {
    StartRecord {
        first_index: LogIndex(first),
        membership: Membership::new(members.iter().map(|&m| NodeId(m))),
        addresses: vec![],
    }
}

/// Images of both directories at every operation of either, while `run` moves the start.
fn crash_everywhere(wal_fs: &FaultStorage, dir_fs: &FaultStorage, run: impl FnOnce()) -> Images {
    let images: Images = Arc::new(Mutex::new(Vec::new()));
    let (seen, other) = (images.clone(), dir_fs.clone());
    let mut n = 0u64;
    wal_fs.set_hook(move |point| {
        n += 1;
        for spec in specs(n) {
            let pair = (point.op(), point.image(spec), other.crash_image(spec));
            seen.lock().expect("images").push(pair);
        }
    });
    let (seen, other) = (images.clone(), wal_fs.clone());
    let mut n = 1 << 32;
    dir_fs.set_hook(move |point| {
        n += 1;
        for spec in specs(n) {
            let pair = (point.op(), other.crash_image(spec), point.image(spec));
            seen.lock().expect("images").push(pair);
        }
    });
    run();
    wal_fs.clear_hook();
    dir_fs.clear_hook();
    images
}

fn check(images: &Images, starts: &[StartRecord]) -> usize {
    let images = images.lock().expect("images");
    for (op, wal_image, dir_image) in images.iter() {
        let wal = Wal::open_with(Arc::new(wal_image.clone()), options())
            .unwrap_or_else(|e| panic!("crash before {op}: the WAL does not recover: {e}"));
        let first = wal.first_index();
        let found = read_log_start(dir_image, first)
            .unwrap_or_else(|e| panic!("crash before {op}: first index {first}: {e:#}"));
        match found {
            Some(r) => assert!(
                starts.contains(&r),
                "crash before {op}: a record that was never written: {r:?}"
            ),
            None => assert_eq!(first, LogIndex(1), "crash before {op}: no record for {first}"),
        }
        assert!(
            starts.iter().any(|s| s.first_index == first),
            "crash before {op}: the WAL starts at {first}, which no move asked for"
        );
    }
    images.len()
}

#[test]
fn a_crash_anywhere_in_a_trim_or_a_log_restart_leaves_a_matching_start() {
    let wal_fs = FaultStorage::new();
    let dir_fs = FaultStorage::new();
    let wal = Arc::new(Wal::open_with(Arc::new(wal_fs.clone()), options()).expect("wal"));
    let entries: Vec<Entry> = (1..=300u64)
        .map(|i| Entry {
            term: Term(1 + i / 100),
            index: LogIndex(i),
            kind: EntryKind::Normal,
            data: Bytes::from(vec![i as u8; 100]),
        })
        .collect();
    wal.append(&WalBatch::new(&entries).entries()).expect("append");
    let storage = NodeStorage::new(wal.clone(), Arc::new(dir_fs.clone()));

    let (origin, trimmed, restarted) =
        (record(1, &[1, 2, 3]), record(150, &[1, 2]), record(900, &[2, 3]));
    let images = crash_everywhere(&wal_fs, &dir_fs, || {
        storage.move_start(&origin, &trimmed, StartChange::Compact).expect("trim");
    });
    let trims = check(&images, &[origin.clone(), trimmed.clone()]);
    assert_eq!(wal.first_index(), LogIndex(150));
    let images = crash_everywhere(&wal_fs, &dir_fs, || {
        let restart = StartChange::Restart { prev_term: Term(9) };
        storage.move_start(&trimmed, &restarted, restart).expect("restart");
    });
    let restarts = check(&images, &[trimmed, restarted]);
    assert_eq!(wal.first_index(), LogIndex(900));
    assert!(trims > 20 && restarts > 20, "crash images: {trims} trim, {restarts} restart");
}
