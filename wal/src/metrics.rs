//! The WAL's metrics, through the `metrics` facade. Handles are created when the WAL opens, so
//! install the recorder before opening (handles made earlier stay no-ops).

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

pub(crate) struct WalMetrics {
    /// `raftwal_wal_fsync_duration_seconds`: every fdatasync of a segment or the hard state.
    pub(crate) fsync_seconds: Histogram,
    /// `raftwal_wal_group_entries`: entries per write group.
    pub(crate) group_entries: Histogram,
    /// `raftwal_wal_group_bytes`: encoded bytes per write group.
    pub(crate) group_bytes: Histogram,
    /// `raftwal_wal_bytes_written_total`: frame bytes written to segments.
    pub(crate) bytes_written: Counter,
    /// `raftwal_wal_segments`: segment files in use.
    pub(crate) segments: Gauge,
    /// `raftwal_wal_resource_waits_total`: times a new segment waited for file descriptors,
    /// space or memory (its writes waited; the WAL was not poisoned).
    pub(crate) resource_waits: Counter,
}

impl WalMetrics {
    pub(crate) fn new() -> WalMetrics {
        WalMetrics {
            fsync_seconds: histogram!("raftwal_wal_fsync_duration_seconds"),
            group_entries: histogram!("raftwal_wal_group_entries"),
            group_bytes: histogram!("raftwal_wal_group_bytes"),
            bytes_written: counter!("raftwal_wal_bytes_written_total"),
            segments: gauge!("raftwal_wal_segments"),
            resource_waits: counter!("raftwal_wal_resource_waits_total"),
        }
    }
}
