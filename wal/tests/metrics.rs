//! The WAL reports its figures through the `metrics` facade under the names ARCHITECTURE.md
//! lists, with real values.

use std::sync::Arc;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use raftwal_wal::fault::FaultStorage;
use raftwal_wal::{Entry, LogIndex, Options, Term, Wal};

#[test]
fn appends_record_fsync_latency_group_sizes_bytes_and_segments() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let opts = Options {
        segment_bytes: 4096,
        record_bytes_max: 1024,
        group_bytes_max: 4096,
        ..Options::default()
    };
    // Handles are made at open, so the recorder must be in place then.
    let wal = metrics::with_local_recorder(&recorder, || {
        Wal::open_with(Arc::new(FaultStorage::new()), opts).expect("open")
    });
    for i in 1..=20u64 {
        wal.append(&[Entry { term: Term(1), index: LogIndex(i), payload: &[1u8; 500] }])
            .expect("append");
    }
    let mut seen = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        seen.insert(key.key().name().to_string(), value);
    }
    let histogram_len = |name: &str| match seen.get(name) {
        Some(DebugValue::Histogram(v)) => v.len(),
        other => panic!("{name}: expected a histogram, got {other:?}"),
    };
    assert!(
        histogram_len("raftwal_wal_fsync_duration_seconds") >= 20,
        "one sample per group sync at least"
    );
    assert_eq!(histogram_len("raftwal_wal_group_entries"), 20);
    assert_eq!(histogram_len("raftwal_wal_group_bytes"), 20);
    match seen.get("raftwal_wal_bytes_written_total") {
        Some(DebugValue::Counter(n)) => {
            assert_eq!(*n, 20 * 544, "20 frames of 40 + 500 + 4 padding")
        }
        other => panic!("bytes written: {other:?}"),
    }
    match seen.get("raftwal_wal_segments") {
        Some(DebugValue::Gauge(g)) => assert!(g.into_inner() >= 3.0, "4 KiB segments rolled over"),
        other => panic!("segments gauge: {other:?}"),
    }
}
