//! The in-memory index of the log: which segment holds which entries, at which offsets, and
//! the views readers get of them.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{FRAME_HEADER_BYTES, FrameHeader};
use crate::storage::{Mapping, StorageFile};
use crate::types::{LogIndex, Term};

/// File name of the segment with this id. Names sort in id order.
pub(crate) fn segment_name(id: u64) -> String {
    format!("{id:020}.wal")
}

/// Parses a segment file name back into its id.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One segment as the index knows it.
pub(crate) struct SegmentIndex {
    pub(crate) id: u64,
    pub(crate) name: String,
    /// First index this segment holds; entries from here on in earlier segments are superseded.
    pub(crate) first_index: LogIndex,
    pub(crate) file: Arc<dyn StorageFile>,
    pub(crate) map: Arc<dyn Mapping>,
    /// Frame offsets of the live entries `first_index ..` of this segment.
    /// Invariant: strictly increasing, each below the segment size.
    pub(crate) offsets: Vec<u32>,
}

impl fmt::Debug for SegmentIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentIndex")
            .field("name", &self.name)
            .field("first_index", &self.first_index)
            .field("entries", &self.offsets.len())
            .finish()
    }
}

impl SegmentIndex {
    /// One past the last index this segment holds.
    pub(crate) fn end_index(&self) -> LogIndex {
        LogIndex(self.first_index.get().saturating_add(self.offsets.len() as u64))
    }
}

/// What readers see: the readable range and where each entry lives.
#[derive(Debug, Default)]
pub(crate) struct LogView {
    /// First readable index (moves forward with compaction).
    pub(crate) first_index: LogIndex,
    /// Term of the entry at `first_index - 1`.
    pub(crate) first_prev_term: Term,
    /// Last durable index (last written one under `Durability::UnsafeNoSync`).
    /// Invariant: `first_index <= last_index + 1`.
    pub(crate) last_index: LogIndex,
    /// Term of `last_index`.
    pub(crate) last_term: Term,
    /// Segments in id order; together they hold `[segments[0].first_index, last_index]`.
    pub(crate) segments: Vec<SegmentIndex>,
    /// The WAL's frame-checksum salt.
    pub(crate) salt: u32,
}

impl LogView {
    /// The segment and frame offset of `index`, if the log holds it physically.
    pub(crate) fn locate(&self, index: LogIndex) -> Option<(&SegmentIndex, u32)> {
        let pos = self.segments.partition_point(|s| s.first_index <= index);
        let seg = self.segments.get(pos.checked_sub(1)?)?;
        let slot = usize::try_from(index.get() - seg.first_index.get()).ok()?;
        seg.offsets.get(slot).map(|&off| (seg, off))
    }

    /// The segment, offset and verified header (payload unchecked) of `index`.
    fn frame(&self, index: LogIndex) -> Result<(&SegmentIndex, u32, FrameHeader)> {
        let (seg, off) = self.locate(index).ok_or(Error::OutOfRange {
            index,
            first: self.first_index,
            last: self.last_index,
        })?;
        Ok((seg, off, self.decode_at(seg, off, index)?))
    }

    fn decode_at(&self, seg: &SegmentIndex, off: u32, index: LogIndex) -> Result<FrameHeader> {
        let bytes = seg.map.bytes().get(off as usize..).unwrap_or(&[]);
        match FrameHeader::decode(bytes, self.salt) {
            Some(h) if h.index == index => Ok(h),
            _ => Err(Error::Corrupt {
                segment: seg.name.clone(),
                offset: u64::from(off),
                reason: format!("frame header of index {index} no longer verifies"),
            }),
        }
    }

    /// Reads and verifies the frame header of `index` (payload unchecked).
    pub(crate) fn header(&self, index: LogIndex) -> Result<FrameHeader> {
        Ok(self.frame(index)?.2)
    }

    /// The chain link of `index`: its header CRC and term, if the log still holds its frame
    /// (after compaction the entry before the first segment is gone). The next frame carries
    /// this CRC as its `prev_crc`.
    pub(crate) fn link(&self, index: LogIndex) -> Result<Option<(u32, Term)>> {
        self.locate(index)
            .map(|(seg, off)| self.decode_at(seg, off, index).map(|h| (h.header_crc, h.term)))
            .transpose()
    }

    /// A verified view of the entry at `index`.
    pub(crate) fn record(&self, index: LogIndex) -> Result<Record> {
        let (seg, off, h) = self.frame(index)?;
        let frame = &seg.map.bytes()[off as usize..];
        if !h.verify_body(frame) {
            return Err(Error::Corrupt {
                segment: seg.name.clone(),
                offset: u64::from(off),
                reason: format!("payload checksum of index {index} no longer verifies"),
            });
        }
        Ok(Record {
            map: seg.map.clone(),
            payload_at: off + FRAME_HEADER_BYTES as u32,
            len: h.payload_len,
            term: h.term,
            index,
        })
    }

    /// The term of `index`, including `first_index - 1` (the compaction boundary).
    pub(crate) fn term(&self, index: LogIndex) -> Result<Term> {
        if index.next() == self.first_index {
            return Ok(self.first_prev_term);
        }
        if index < self.first_index || index > self.last_index {
            return Err(Error::OutOfRange {
                index,
                first: self.first_index,
                last: self.last_index,
            });
        }
        Ok(self.header(index)?.term)
    }
}

/// A zero-copy view of one entry, straight from the segment's memory map. Its checksum was
/// verified when it was handed out. It keeps the segment's map alive, even past compaction.
#[derive(Clone)]
pub struct Record {
    map: Arc<dyn Mapping>,
    payload_at: u32,
    len: u32,
    term: Term,
    index: LogIndex,
}

impl Record {
    /// The record bytes, 8-byte aligned in memory.
    pub fn payload(&self) -> &[u8] {
        let start = self.payload_at as usize;
        &self.map.bytes()[start..start + self.len as usize]
    }

    /// The entry's term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// The entry's index.
    pub fn index(&self) -> LogIndex {
        self.index
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("index", &self.index)
            .field("term", &self.term)
            .field("len", &self.len)
            .finish()
    }
}
