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
    let mut records = Vec::new();
    let next = scan(wal, view, readable, from, records_max, bytes_max, |index, data| {
        Ok(envelope::record_bytes(data).map_or((0, 0), |data| {
            let len = data.len() as u64;
            records.push((index, data));
            (1, len)
        }))
    })?;
    Ok(Page { records, next })
}

/// One record of the whole log as a reader of every stream sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllRecord {
    /// Its log offset; several messages of one stream command share it.
    pub position: LogIndex,
    /// Its stream; `None` for a record of the single log (the `Log` service's appends).
    pub stream: Option<String>,
    /// Where it starts in its stream (its log offset for the single log).
    pub offset: u64,
    /// Where the next record of its stream starts.
    pub next_offset: u64,
    /// Its bytes.
    pub data: Bytes,
}

/// Every record in `[from, readable]` in log order: the single log's records and every
/// stream's messages that are in a stream (an append a stream refused is in the log but in
/// no stream, and a deleted stream's records are in none any more). `streams` looks a stream
/// up by name. The messages of one command are never split across pages.
pub fn read_all(
    wal: &Wal,
    view: impl Fn() -> ReadView,
    streams: &dyn Fn(&str) -> Option<std::sync::Arc<crate::core::streams::StreamView>>,
    readable: LogIndex,
    from: LogIndex,
    records_max: usize,
    bytes_max: u64,
) -> Result<(Vec<AllRecord>, LogIndex), ReadError> {
    let mut out = Vec::new();
    let next = scan(wal, view, readable, from, records_max, bytes_max, |index, data| {
        if let Some(data) = envelope::record_bytes(data) {
            let len = data.len() as u64 + message_overhead("");
            out.push(AllRecord {
                position: index,
                stream: None,
                offset: index.0,
                next_offset: index.0 + 1,
                data,
            });
            return Ok((1, len));
        }
        let Ok(envelope::Payload::Stream(cmd)) = envelope::decode(data) else {
            return Ok((0, 0));
        };
        let Some(stream) = streams(cmd.name()).filter(|s| !s.soft_deleted) else {
            return Ok((0, 0));
        };
        let Some((start, end)) = stream.index.span_of(index, stream.base) else {
            return Ok((0, 0));
        };
        let (mut count, mut bytes, mut pos) = (0, 0, start);
        for data in crate::core::streams::messages_of(cmd) {
            if data.is_empty() {
                continue;
            }
            let len = data.len() as u64;
            out.push(AllRecord {
                position: index,
                stream: Some(stream.name.clone()),
                offset: pos,
                next_offset: pos + len,
                data,
            });
            let cost = len + message_overhead(&stream.name);
            (count, bytes, pos) = (count + 1, bytes + cost, pos + len);
        }
        if pos != end {
            return Err(ReadError::Failed(format!(
                "entry {index} of stream {} holds {} bytes, its index says {}",
                stream.name,
                pos - start,
                end - start
            )));
        }
        Ok((count, bytes))
    })?;
    Ok((out, next))
}

/// Walks the normal entries in `[from, readable]` that the view does not hide, handing each
/// entry's payload to `take`, which says how many records and bytes it kept; stops after
/// `records_max` records or about `bytes_max` bytes (at least one entry's worth). Returns
/// where the next walk starts.
fn scan(
    wal: &Wal,
    view: impl Fn() -> ReadView,
    readable: LogIndex,
    from: LogIndex,
    records_max: usize,
    bytes_max: u64,
    mut take: impl FnMut(LogIndex, &Bytes) -> Result<(usize, u64), ReadError>,
) -> Result<LogIndex, ReadError> {
    let from = from.max(LogIndex(1));
    let first = first_readable(wal, &view());
    if from < first {
        return Err(ReadError::Trimmed { from, first });
    }
    let mut next = from;
    let (mut records, mut bytes) = (0usize, 0u64);
    while next <= readable && records < records_max && bytes < bytes_max {
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
            if records >= records_max || (bytes >= bytes_max && records > 0) {
                break;
            }
            let index = rec.index();
            next = index.next();
            let entry = store::entry_of(rec).map_err(|e| ReadError::Failed(e.to_string()))?;
            if entry.kind != EntryKind::Normal || view.is_hidden(index) {
                continue;
            }
            let (n, b) = take(index, &entry.data)?;
            records += n;
            bytes += b;
        }
    }
    Ok(next)
}

/// Messages one read of a stream returns at most (beyond one command's).
pub const STREAM_MESSAGES_MAX: usize = 10_000;

/// What a message costs a read besides its bytes: its offsets and position, and its stream's
/// name where an answer repeats it (so that a stream of tiny records cannot make one answer
/// huge).
fn message_overhead(name: &str) -> u64 {
    32 + name.len() as u64
}

/// One message of a stream, known by the offset of its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMessage {
    /// The stream offset right after it.
    pub end: u64,
    /// The log offset of the command that holds it.
    pub position: LogIndex,
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
        if start >= limit || *bytes >= bytes_max || out.len() >= STREAM_MESSAGES_MAX {
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
                *bytes += data.len() as u64 + message_overhead(&stream.name);
                out.push(StreamMessage { end: pos, position: index, data });
            }
        }
        debug_assert!(pos <= end || pos > limit);
    }
    Ok(())
}
