//! Group commit hand-offs: a leader that stops after its bounded run of groups must wake a
//! caller that is actually asleep on a pending ticket, or queued groups wait forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use raftwal_wal::fault::FaultStorage;
use raftwal_wal::{Entry, LogIndex, Options, Term, Wal};

fn submit_one(wal: &Wal, index: u64) -> raftwal_wal::Ticket {
    wal.submit(&[Entry { term: Term(1), index: LogIndex(index), payload: b"x" }]).expect("submit")
}

#[test]
fn a_leader_hands_off_to_a_caller_sleeping_on_a_pending_ticket() {
    let storage = FaultStorage::new();
    // One entry per group, so seven submissions are seven groups: more than one leader may
    // write before handing off.
    let opts = Options { group_entries_max: 1, prepare_segments: false, ..Options::default() };
    let wal = Arc::new(Wal::open_with(Arc::new(storage.clone()), opts).expect("open"));
    let first = submit_one(&wal, 1);
    // Tickets 2..=7; the caller waits on the last one only, leaving 2..=6 unwaited.
    let mut last = first;
    for i in 2..=7 {
        last = submit_one(&wal, i);
    }

    // Stall the leader's first group sync until the other caller is asleep in `wait`.
    let stalled = Arc::new(AtomicBool::new(false));
    {
        let stalled = stalled.clone();
        storage.set_hook(move |p| {
            if p.op() == "sync" && !stalled.swap(true, Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }
    let leader = {
        let wal = wal.clone();
        std::thread::spawn(move || wal.wait(first).expect("leader's own append"))
    };
    while !stalled.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let (done_tx, done_rx) = mpsc::channel();
    let sleeper = {
        let wal = wal.clone();
        std::thread::spawn(move || {
            wal.wait(last).expect("the sleeper's append");
            done_tx.send(()).expect("report");
        })
    };
    leader.join().expect("leader thread");
    done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the caller asleep on a pending ticket was never handed the writer");
    sleeper.join().expect("sleeper thread");
    assert_eq!(wal.last_index(), LogIndex(7));
}

#[test]
fn a_truncation_that_writes_queued_groups_wakes_their_sleeping_callers() {
    let storage = FaultStorage::new();
    let opts = Options { group_entries_max: 1, prepare_segments: false, ..Options::default() };
    let wal = Arc::new(Wal::open_with(Arc::new(storage.clone()), opts).expect("open"));
    // Two queued groups; their caller will wait only on the second.
    let _unwaited = submit_one(&wal, 1);
    let second = submit_one(&wal, 2);
    let stalled = Arc::new(AtomicBool::new(false));
    {
        let stalled = stalled.clone();
        storage.set_hook(move |p| {
            if p.op() == "sync" && !stalled.swap(true, Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }
    // The truncation must first write what is queued: it leads both groups itself.
    let truncator = {
        let wal = wal.clone();
        std::thread::spawn(move || wal.truncate_suffix(LogIndex(3)).expect("a no-op truncation"))
    };
    while !stalled.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let (done_tx, done_rx) = mpsc::channel();
    let sleeper = {
        let wal = wal.clone();
        std::thread::spawn(move || {
            wal.wait(second).expect("the sleeper's append");
            done_tx.send(()).expect("report");
        })
    };
    truncator.join().expect("truncator thread");
    done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a caller whose ticket a truncation made durable was never woken");
    sleeper.join().expect("sleeper thread");
    assert_eq!(wal.last_index(), LogIndex(2));
}
