//! The WAL on real files in temporary directories.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use raftwal_wal::{Entry, Error, HardState, LogIndex, NodeId, Options, Term, Wal};

/// Real files exercise the prepared-segment path (off by default).
fn opts() -> Options {
    Options {
        segment_bytes: 64 << 10,
        record_bytes_max: 16 << 10,
        group_bytes_max: 64 << 10,
        prepare_segments: true,
        ..Options::default()
    }
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|b| (b as u64).wrapping_mul(7).wrapping_add(i) as u8).collect()
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

fn append_range(wal: &Wal, range: std::ops::Range<u64>, len: usize) {
    for i in range {
        let p = payload(i, len);
        wal.append(&[Entry { term: Term(1), index: LogIndex(i), payload: &p }]).expect("append");
    }
}

#[test]
fn segments_roll_over_are_preallocated_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(dir.path(), opts()).expect("open");
    // About one segment's worth at a time, with a pause so the background preparer (which
    // races the writer) has the next segment ready on a loaded machine too.
    for start in (1..301).step_by(50) {
        append_range(&wal, start..start + 50, 1000);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let segs = segments(dir.path());
    assert!(segs.len() >= 5, "rolled over into {} segments", segs.len());
    for s in &segs {
        let md = std::fs::metadata(s).expect("metadata");
        assert_eq!(md.len(), 64 << 10, "segment has its full size");
        assert!(md.blocks() * 512 >= 64 << 10, "segment blocks are allocated, not a hole");
    }
    assert!(
        wal.stats().segments_prepared > 0,
        "rollover used prepared segments: {:?}",
        wal.stats()
    );
    drop(wal);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8 name"))
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "an unused prepared segment was left behind: {leftovers:?}");
    let wal = Wal::open(dir.path(), opts()).expect("reopen");
    assert_eq!((wal.first_index(), wal.last_index()), (LogIndex(1), LogIndex(300)));
    assert!(wal.recovery().torn_tail.is_none());
    for r in wal.read(LogIndex(1)..LogIndex(301), u64::MAX).expect("read") {
        assert_eq!(r.payload(), payload(r.index().get(), 1000).as_slice());
        assert_eq!(r.payload().as_ptr() as usize % 8, 0, "payloads are 8-byte aligned in the map");
    }
    // Appending continues in place after a clean reopen.
    append_range(&wal, 301..311, 1000);
    assert_eq!(wal.last_index(), LogIndex(310));
}

#[test]
fn records_at_the_size_limit_and_beyond() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(dir.path(), opts()).expect("open");
    let max = payload(1, 16 << 10);
    wal.append(&[Entry { term: Term(1), index: LogIndex(1), payload: &max }]).expect("max size");
    let over = payload(2, (16 << 10) + 1);
    match wal.append(&[Entry { term: Term(1), index: LogIndex(2), payload: &over }]) {
        Err(Error::RecordTooLarge { bytes, limit }) => assert_eq!((bytes, limit), (16385, 16384)),
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    let many: Vec<Vec<u8>> = (0..5).map(|i| payload(i, 16 << 10)).collect();
    let entries: Vec<Entry<'_>> = many
        .iter()
        .enumerate()
        .map(|(i, p)| Entry { term: Term(1), index: LogIndex(2 + i as u64), payload: p })
        .collect();
    assert!(matches!(wal.append(&entries), Err(Error::AppendTooLarge { .. })));
    drop(wal);
    let wal = Wal::open(dir.path(), opts()).expect("reopen");
    assert_eq!(wal.entry(LogIndex(1)).expect("read").payload(), max.as_slice());
    assert_eq!(wal.last_index(), LogIndex(1));
}

#[test]
fn an_empty_log_opens_reopens_and_reads_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    for _ in 0..2 {
        let wal = Wal::open(dir.path(), opts()).expect("open");
        assert_eq!((wal.first_index(), wal.last_index()), (LogIndex(1), LogIndex(0)));
        assert_eq!(wal.hard_state(), HardState::default());
        assert_eq!(wal.term(LogIndex(0)).expect("term 0"), Term(0));
        assert!(wal.read(LogIndex(1)..LogIndex(1), 10).expect("empty range").is_empty());
        assert!(matches!(wal.entry(LogIndex(1)), Err(Error::OutOfRange { .. })));
        assert!(matches!(wal.read(LogIndex(1)..LogIndex(2), 10), Err(Error::OutOfRange { .. })));
    }
}

#[test]
fn a_second_open_in_this_process_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _wal = Wal::open(dir.path(), opts()).expect("open");
    assert!(matches!(Wal::open(dir.path(), opts()), Err(Error::Locked { .. })));
}

/// Not a test on its own: the child process of `a_directory_held_by_another_process_is_refused`.
#[test]
#[ignore = "run as a child process by a_directory_held_by_another_process_is_refused"]
fn lock_holder_child() {
    let Ok(dir) = std::env::var("RAFTWAL_TEST_LOCK_DIR") else { return };
    let _wal = Wal::open(&dir, opts()).expect("child opens");
    println!("locked");
    std::io::stdout().flush().expect("flush");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn a_directory_held_by_another_process_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "lock_holder_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("RAFTWAL_TEST_LOCK_DIR", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).expect("read child") > 0, "child exited before locking");
        if line.trim_end().ends_with("locked") {
            break;
        }
    }
    match Wal::open(dir.path(), opts()) {
        Err(Error::Locked { dir: d }) => assert_eq!(d, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(child.stdin.take());
    assert!(child.wait().expect("child exits").success());
    Wal::open(dir.path(), opts()).expect("open after the other process let go");
}

#[test]
fn hard_state_truncation_and_compaction_persist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(dir.path(), opts()).expect("open");
    append_range(&wal, 1..201, 1000);
    let hs = HardState { term: Term(4), vote: Some(NodeId(2)), commit: LogIndex(120) };
    wal.save_hard_state(hs).expect("save");
    assert!(matches!(
        wal.truncate_suffix(LogIndex(120)),
        Err(Error::TruncateCommitted { from: LogIndex(120), commit: LogIndex(120) })
    ));
    wal.truncate_suffix(LogIndex(150)).expect("truncate");
    let p = payload(999, 10);
    wal.append(&[Entry { term: Term(4), index: LogIndex(150), payload: &p }])
        .expect("append after truncate");
    let before = segments(dir.path()).len();
    wal.compact_prefix(LogIndex(100)).expect("compact");
    assert!(segments(dir.path()).len() < before, "compaction deleted whole segments");
    drop(wal);
    let wal = Wal::open(dir.path(), opts()).expect("reopen");
    assert_eq!(wal.hard_state(), hs);
    assert_eq!((wal.first_index(), wal.last_index()), (LogIndex(100), LogIndex(150)));
    assert_eq!(wal.term(LogIndex(99)).expect("boundary"), Term(1));
    assert_eq!(wal.entry(LogIndex(150)).expect("read").payload(), p.as_slice());
    assert!(matches!(wal.entry(LogIndex(99)), Err(Error::OutOfRange { .. })));
    assert!(matches!(wal.truncate_suffix(LogIndex(99)), Err(Error::OutOfRange { .. })));
}

#[test]
fn the_commit_index_raised_on_another_thread_never_goes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(dir.path(), opts()).expect("open");
    append_range(&wal, 1..51, 100);
    wal.save_hard_state(HardState { term: Term(2), vote: Some(NodeId(1)), commit: LogIndex(10) })
        .expect("save");
    // The syncer raises the commit index; term and vote stay.
    wal.raise_commit(LogIndex(40)).expect("raise");
    wal.raise_commit(LogIndex(30)).expect("a lower one changes nothing");
    let raised = HardState { term: Term(2), vote: Some(NodeId(1)), commit: LogIndex(40) };
    assert_eq!(wal.hard_state(), raised);
    // A term change saved with an older commit index keeps the raised one.
    wal.save_hard_state(HardState { term: Term(3), vote: None, commit: LogIndex(20) })
        .expect("save");
    let merged = HardState { term: Term(3), vote: None, commit: LogIndex(40) };
    assert_eq!(wal.hard_state(), merged);
    drop(wal);
    assert_eq!(Wal::open(dir.path(), opts()).expect("reopen").hard_state(), merged);
}

#[test]
fn damage_under_a_live_map_is_never_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(dir.path(), opts()).expect("open");
    append_range(&wal, 1..11, 100);
    let seg = &segments(dir.path())[0];
    // Frames of 100-byte payloads take 144 bytes; flip a payload byte of index 3.
    let at = 64 + 2 * 144 + 40 + 5;
    let file = std::fs::OpenOptions::new().write(true).read(true).open(seg).expect("open segment");
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at).expect("read");
    file.write_all_at(&[b[0] ^ 0x10], at).expect("write");
    match wal.entry(LogIndex(3)) {
        Err(Error::Corrupt { offset, .. }) => assert_eq!(offset, 64 + 2 * 144),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(wal.read(LogIndex(1)..LogIndex(11), u64::MAX), Err(Error::Corrupt { .. })));
    assert_eq!(
        wal.entry(LogIndex(2)).expect("neighbours still read").payload(),
        payload(2, 100).as_slice()
    );
}

/// Starts `threads` appenders of `per_thread` records each. Indexes are handed out under a lock
/// that also covers `submit`, as a Raft driver would; each thread then waits for its ticket.
fn spawn_appenders(
    wal: &Arc<Wal>,
    threads: usize,
    per_thread: usize,
    payload_len: usize,
) -> Vec<std::thread::JoinHandle<()>> {
    let next = Arc::new(Mutex::new(1u64));
    (0..threads)
        .map(|_| {
            let (wal, next) = (wal.clone(), next.clone());
            std::thread::spawn(move || {
                for _ in 0..per_thread {
                    let ticket = {
                        let mut n = next.lock().expect("lock");
                        let p = payload(*n, payload_len);
                        let t = wal
                            .submit(&[Entry { term: Term(1), index: LogIndex(*n), payload: &p }])
                            .expect("submit");
                        *n += 1;
                        t
                    };
                    wal.wait(ticket).expect("wait");
                }
            })
        })
        .collect()
}

#[test]
fn concurrent_appenders_share_groups_and_keep_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Arc::new(Wal::open(dir.path(), opts()).expect("open"));
    for t in spawn_appenders(&wal, 16, 100, 200) {
        t.join().expect("appender thread");
    }
    assert_eq!(wal.last_index(), LogIndex(1600));
    for r in wal.read(LogIndex(1)..LogIndex(1601), u64::MAX).expect("read") {
        assert_eq!(r.payload(), payload(r.index().get(), 200).as_slice());
    }
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = Options { segment_bytes: 1024, record_bytes_max: 4096, ..opts() };
    assert!(matches!(Wal::open(dir.path(), bad), Err(Error::InvalidOptions(_))));
    for huge in [
        Options { record_bytes_max: u64::MAX, ..opts() },
        Options { group_bytes_max: u64::MAX, ..opts() },
        Options { segment_bytes: u64::MAX, ..opts() },
    ] {
        assert!(matches!(Wal::open(dir.path(), huge), Err(Error::InvalidOptions(_))));
    }
}

#[test]
fn appends_that_do_not_continue_the_log_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(dir.path(), opts()).expect("open");
    append_range(&wal, 1..3, 10);
    let p = payload(0, 1);
    assert!(matches!(
        wal.append(&[Entry { term: Term(1), index: LogIndex(4), payload: &p }]),
        Err(Error::NonContiguous { expected: LogIndex(3), got: LogIndex(4) })
    ));
    assert!(matches!(
        wal.append(&[Entry { term: Term(0), index: LogIndex(3), payload: &p }]),
        Err(Error::TermRegression { .. })
    ));
}

#[test]
fn sixty_four_appenders_with_flushers_and_readers_all_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Arc::new(Wal::open(dir.path(), opts()).expect("open"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let helpers: Vec<_> = (0..2)
        .map(|k| {
            let (wal, stop) = (wal.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if k == 0 {
                        wal.flush().expect("flush");
                    } else {
                        let last = wal.last_index();
                        if last >= LogIndex(1) {
                            let r = wal.entry(last).expect("read the last durable entry");
                            assert_eq!(r.payload(), payload(last.get(), 64).as_slice());
                        }
                    }
                }
            })
        })
        .collect();
    let appenders = spawn_appenders(&wal, 64, 50, 64);
    for t in appenders {
        t.join().expect("appender");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in helpers {
        t.join().expect("helper");
    }
    assert_eq!(wal.last_index(), LogIndex(64 * 50));
    let stats = wal.stats();
    assert_eq!(stats.entries, 64 * 50);
    assert!(stats.groups < stats.entries, "some groups held more than one append");
}
