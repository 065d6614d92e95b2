//! The free space of the data disk, watched so that appends stop before the disk is full.
//!
//! A full disk takes a node down: a WAL write that fails poisons the WAL and the node stops, and
//! all nodes of a cluster usually fill together. So each node measures the free space of its
//! data directory's filesystem every tick and, below `disk_free_min_bytes`, refuses appends with
//! RESOURCE_EXHAUSTED while it still serves reads, follows and trims. The headroom (at least two
//! segments) is what a trim needs: its log entry, perhaps a new segment, and the log-start file;
//! the trim then deletes whole segments and appends resume by themselves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use crate::shell::Shared;

/// Bytes an unprivileged process may still allocate on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Why an append is refused for lack of space, if it is.
pub fn refusal(shared: &Shared, min_free: u64) -> Option<String> {
    // The watcher decides (`disk_low`); the free bytes only go into the message.
    let free = shared.disk_free_bytes.load(Ordering::Relaxed);
    shared.disk_low.load(Ordering::Relaxed).then(|| {
        format!(
            "node {} has {} MiB free on its data disk, under disk_free_min_bytes ({} MiB): \
             appends are refused until space is freed (trim the log: `raftwal trim --before \
             OFFSET`); reads, follows and trims go on",
            shared.id,
            free >> 20,
            min_free >> 20
        )
    })
}

/// Measures the free space of `dir` every `every` until shutdown, publishing it in `shared`
/// and as the gauge `raftwal_server_disk_free_bytes`; logs when it crosses `min_free`.
pub async fn watch_free_space(
    shared: Arc<Shared>,
    dir: PathBuf,
    min_free: u64,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let gauge = metrics::gauge!("raftwal_server_disk_free_bytes");
    let mut low = false;
    let mut failed = false;
    loop {
        let path = dir.clone();
        match tokio::task::spawn_blocking(move || free_bytes(&path)).await {
            Ok(Ok(free)) => {
                failed = false;
                shared.disk_free_bytes.store(free, Ordering::Relaxed);
                gauge.set(free as f64);
                let now_low = min_free > 0 && free < min_free;
                shared.disk_low.store(now_low, Ordering::Relaxed);
                if now_low && !low {
                    tracing::warn!(
                        free_mib = free >> 20,
                        min_mib = min_free >> 20,
                        "the data disk is nearly full: appends are refused until space is freed"
                    );
                } else if !now_low && low {
                    tracing::info!(free_mib = free >> 20, "the data disk has room again");
                }
                low = now_low;
            }
            Ok(Err(e)) if !failed => {
                failed = true;
                tracing::warn!(error = %e, dir = %dir.display(), "cannot measure free disk space");
            }
            _ => {}
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
