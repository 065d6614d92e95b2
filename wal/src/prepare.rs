//! Segment preparation in the background: the next segment is created, preallocated, filled
//! with zeros and synced before the writer needs it.
//!
//! Why: `fdatasync` after writing into blocks that `fallocate` reserved but never wrote must
//! also commit the extent conversion through the filesystem journal; into blocks already
//! written it is a pure data flush: `raftwal-bench fsync` measured p50 ~200 µs vs ~122 µs for
//! 32 KiB writes here. But the zero-fill doubles the bytes written, and its writeback delays the
//! writer's syncs: at 64 appenders the tails grew more than throughput did, so this is off by
//! default (ARCHITECTURE.md has the figures).
//!
//! A prepared file is a temporary (`prep-N.tmp`) until the writer stamps its header, syncs it
//! and renames it into place; recovery deletes any temporary left by a crash. Preparation
//! never poisons the WAL: on any error the writer falls back to creating a fresh segment.

use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::storage::{Storage, StorageFile};

/// Name prefix and suffix of prepared, not yet used segment files.
pub(crate) const PREP_PREFIX: &str = "prep-";
pub(crate) const PREP_SUFFIX: &str = ".tmp";

const ZERO_CHUNK_BYTES: usize = 1 << 20;

pub(crate) struct Prepared {
    pub(crate) name: String,
    pub(crate) file: Arc<dyn StorageFile>,
}

#[derive(Default)]
struct State {
    ready: Option<Prepared>,
    shutdown: bool,
    /// Set after a failure; the writer then creates segments itself.
    failed: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

pub(crate) struct Preparer {
    shared: Arc<Shared>,
    storage: Arc<dyn Storage>,
    thread: Option<JoinHandle<()>>,
}

impl Preparer {
    pub(crate) fn start(
        storage: Arc<dyn Storage>,
        segment_bytes: u64,
    ) -> std::io::Result<Preparer> {
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), cv: Condvar::new() });
        let thread = {
            let (shared, storage) = (shared.clone(), storage.clone());
            std::thread::Builder::new()
                .name("raftwal-wal-prepare".into())
                .spawn(move || run(&shared, storage.as_ref(), segment_bytes))?
        };
        Ok(Preparer { shared, storage, thread: Some(thread) })
    }

    /// A prepared segment, if one is ready; the next one starts preparing at once.
    pub(crate) fn take(&self) -> Option<Prepared> {
        let mut state = self.shared.state.lock();
        let taken = state.ready.take();
        self.shared.cv.notify_all();
        taken
    }
}

impl Drop for Preparer {
    fn drop(&mut self) {
        self.shared.state.lock().shutdown = true;
        self.shared.cv.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(unused) = self.shared.state.lock().ready.take() {
            // Best effort: recovery removes it otherwise.
            let _ = self.storage.remove(&unused.name);
        }
    }
}

fn run(shared: &Shared, storage: &dyn Storage, segment_bytes: u64) {
    let zeros = vec![0u8; ZERO_CHUNK_BYTES];
    let mut seq = 0u64;
    loop {
        {
            let mut state = shared.state.lock();
            while state.ready.is_some() && !state.shutdown {
                shared.cv.wait(&mut state);
            }
            if state.shutdown || state.failed {
                return;
            }
        }
        let name = format!("{PREP_PREFIX}{seq}{PREP_SUFFIX}");
        seq += 1;
        match prepare(storage, &name, segment_bytes, &zeros, shared) {
            Ok(Some(file)) => {
                let mut state = shared.state.lock();
                state.ready = Some(Prepared { name, file });
            }
            Ok(None) => {
                let _ = storage.remove(&name);
                return;
            }
            Err(_) => {
                let _ = storage.remove(&name);
                shared.state.lock().failed = true;
                metrics::counter!("raftwal_wal_segment_prepare_failures_total").increment(1);
                return;
            }
        }
    }
}

/// Creates and fills one file; `None` when shutdown interrupted it.
fn prepare(
    storage: &dyn Storage,
    name: &str,
    segment_bytes: u64,
    zeros: &[u8],
    shared: &Shared,
) -> std::io::Result<Option<Arc<dyn StorageFile>>> {
    let file = storage.create(name)?;
    file.allocate(segment_bytes)?;
    let mut offset = 0u64;
    while offset < segment_bytes {
        if shared.state.lock().shutdown {
            return Ok(None);
        }
        let n = (segment_bytes - offset).min(zeros.len() as u64) as usize;
        file.write_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    file.sync_data()?;
    Ok(Some(file))
}
