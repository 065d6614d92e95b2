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

/// Makes the first `sync_data` from now on sleep 200 ms; the flag is set when it starts.
fn stall_first_sync(storage: &FaultStorage) -> Arc<AtomicBool> {
    let stalled = Arc::new(AtomicBool::new(false));
    let flag = stalled.clone();
    storage.set_hook(move |p| {
        if p.op() == "sync" && !flag.swap(true, Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    stalled
}

/// A caller waiting for `ticket` on its own thread.
struct Sleeper {
    done: mpsc::Receiver<()>,
    thread: std::thread::JoinHandle<()>,
}

fn wait_in_background(wal: &Arc<Wal>, ticket: raftwal_wal::Ticket) -> Sleeper {
    let (tx, done) = mpsc::channel();
    let wal = wal.clone();
    let thread = std::thread::spawn(move || {
        wal.wait(ticket).expect("the sleeper's append");
        tx.send(()).expect("report");
    });
    Sleeper { done, thread }
}

impl Sleeper {
    /// Fails with `hung` unless the wait returns within `limit` (a lost wakeup hangs forever).
    fn finish_within(self, limit: Duration, hung: &str) {
        self.done.recv_timeout(limit).expect(hung);
        self.thread.join().expect("sleeper thread");
    }
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
    let stalled = stall_first_sync(&storage);
    let leader = {
        let wal = wal.clone();
        std::thread::spawn(move || wal.wait(first).expect("leader's own append"))
    };
    while !stalled.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let sleeper = wait_in_background(&wal, last);
    leader.join().expect("leader thread");
    sleeper.finish_within(
        Duration::from_secs(20),
        "the caller asleep on a pending ticket was never handed the writer",
    );
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
    let stalled = stall_first_sync(&storage);
    // The truncation must first write what is queued: it leads both groups itself.
    let truncator = {
        let wal = wal.clone();
        std::thread::spawn(move || wal.truncate_suffix(LogIndex(3)).expect("a no-op truncation"))
    };
    while !stalled.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let sleeper = wait_in_background(&wal, second);
    truncator.join().expect("truncator thread");
    sleeper.finish_within(
        Duration::from_secs(20),
        "a caller whose ticket a truncation made durable was never woken",
    );
    assert_eq!(wal.last_index(), LogIndex(2));
}
