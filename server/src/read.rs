//! Serving records: what a reader of the log sees, the one rule for the gRPC API and the
//! simulation. A reader sees the record entries up to the settled index that the view does not
//! hide, from the WAL's maps, never an internal entry.

use bytes::Bytes;
use raftwal_consensus::{EntryKind, LogIndex};
use raftwal_wal::Wal;

use crate::core::ReadView;
use crate::{envelope, store};

/// Records read from the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The records and their offsets, in order.
    pub records: Vec<(LogIndex, Bytes)>,
    /// Where the next read should start.
    pub next: LogIndex,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The offset asked for is below the log's start.
    #[error("offset {from} was trimmed; the log starts at {first}")]
    Trimmed {
        /// The offset asked for.
        from: LogIndex,
        /// The log's first readable offset.
        first: LogIndex,
    },
    /// The WAL could not be read.
    #[error("read: {0}")]
    Failed(String),
}

/// The first offset readers may ask for.
pub fn first_readable(wal: &Wal, view: &ReadView) -> LogIndex {
    view.start.max(wal.first_index())
}

/// Records in `[from, readable]`, at most `records_max` of them and about `bytes_max` bytes
/// (at least one record when there is one). `view` is called after each page is read: a trim or
/// a log restart between the read and the view would otherwise serve entries by what the
/// state no longer says of them.
pub fn read_page(
    wal: &Wal,
    view: impl Fn() -> ReadView,
    readable: LogIndex,
    from: LogIndex,
    records_max: usize,
    bytes_max: u64,
) -> Result<Page, ReadError> {
    let from = from.max(LogIndex(1));
    let first = first_readable(wal, &view());
    if from < first {
        return Err(ReadError::Trimmed { from, first });
    }
    let mut out = Vec::new();
    let mut next = from;
    let mut bytes = 0u64;
    while next <= readable && out.len() < records_max && bytes < bytes_max {
        let end = LogIndex((readable.0 + 1).min(next.0 + records_max as u64));
        let page = wal.read(next..end, bytes_max - bytes).map_err(|e| {
            // A trim or a log restart may have moved the start since it was checked.
            let first = wal.first_index();
            if next < first {
                ReadError::Trimmed { from, first }
            } else {
                ReadError::Failed(e.to_string())
            }
        })?;
        let view = view();
        if view.start > next {
            // The state moved past what was read (a trim or restart in between): what it says
            // about those entries is gone, so they are not served.
            return Err(ReadError::Trimmed { from, first: view.start });
        }
        for rec in page {
            if out.len() >= records_max || (bytes >= bytes_max && !out.is_empty()) {
                break;
            }
            let index = rec.index();
            next = index.next();
            let entry = store::entry_of(rec).map_err(|e| ReadError::Failed(e.to_string()))?;
            if entry.kind != EntryKind::Normal || view.is_hidden(index) {
                continue;
            }
            if let Some(data) = envelope::record_bytes(&entry.data) {
                bytes += data.len() as u64;
                out.push((index, data));
            }
        }
    }
    Ok(Page { records: out, next })
}
