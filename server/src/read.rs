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

/// One message of a stream, known by the offset of its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMessage {
    /// The stream offset right after it.
    pub end: u64,
    /// Its bytes.
    pub data: Bytes,
}

/// The messages of `stream` whose end is beyond `from`, in order, about `bytes_max` bytes of
/// them (at least one when there is one). A fork reads its source's messages up to its fork
/// offset (through every level of the chain), then its own. `streams` looks a source up by
/// name; a source of another incarnation is a bug in the state and an error here.
pub fn read_stream(
    wal: &Wal,
    streams: &dyn Fn(&str) -> Option<std::sync::Arc<crate::core::streams::StreamView>>,
    stream: &crate::core::streams::StreamView,
    from: u64,
    bytes_max: u64,
) -> Result<Vec<StreamMessage>, ReadError> {
    let mut out = Vec::new();
    let mut bytes = 0;
    read_stream_into(wal, streams, stream, from, stream.tail, bytes_max, &mut out, &mut bytes, 0)?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn read_stream_into(
    wal: &Wal,
    streams: &dyn Fn(&str) -> Option<std::sync::Arc<crate::core::streams::StreamView>>,
    stream: &crate::core::streams::StreamView,
    from: u64,
    limit: u64,
    bytes_max: u64,
    out: &mut Vec<StreamMessage>,
    bytes: &mut u64,
    depth: usize,
) -> Result<(), ReadError> {
    if depth > 1000 {
        return Err(ReadError::Failed("a fork chain deeper than 1000 levels".into()));
    }
    if from < stream.base
        && let Some((source, incarnation, _)) = &stream.fork
    {
        let Some(view) = streams(source) else {
            return Err(ReadError::Failed(format!("the fork source {source} is gone")));
        };
        if view.incarnation != *incarnation {
            return Err(ReadError::Failed(format!("the fork source {source} was replaced")));
        }
        read_stream_into(wal, streams, &view, from, stream.base, bytes_max, out, bytes, depth + 1)?;
        if *bytes >= bytes_max {
            return Ok(());
        }
    }
    let at = stream.index.first_after(from.max(stream.base));
    for (start, end, index) in stream.index.from(at, stream.base) {
        if start >= limit || *bytes >= bytes_max {
            break;
        }
        let records = wal.read(index..index.next(), u64::MAX).map_err(|e| {
            ReadError::Failed(format!("read the entry of stream {} at {index}: {e}", stream.name))
        })?;
        let Some(rec) = records.into_iter().next() else {
            return Err(ReadError::Failed(format!(
                "entry {index} of stream {} is missing",
                stream.name
            )));
        };
        let entry = store::entry_of(rec).map_err(|e| ReadError::Failed(e.to_string()))?;
        let cmd = match envelope::decode(&entry.data) {
            Ok(envelope::Payload::Stream(cmd)) => cmd,
            _ => {
                return Err(ReadError::Failed(format!(
                    "entry {index} of stream {} is not a stream command",
                    stream.name
                )));
            }
        };
        let mut pos = start;
        for data in crate::core::streams::messages_of(cmd) {
            if data.is_empty() {
                continue;
            }
            pos += data.len() as u64;
            if pos > limit {
                break;
            }
            if pos > from {
                *bytes += data.len() as u64;
                out.push(StreamMessage { end: pos, data });
            }
        }
        debug_assert!(pos <= end || pos > limit);
    }
    Ok(())
}
