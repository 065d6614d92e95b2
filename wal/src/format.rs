//! Byte layouts of segment headers, frames and hard-state slots. Pure functions, no IO.
//!
//! Every integer is fixed width and little endian; every layout carries a format version or
//! sits behind a header that does. docs/wal-format.md is the reference for these layouts.

use crate::types::{HardState, LogIndex, NodeId, Term};

/// The on-disk format version written in every segment header and hard-state slot.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes of a segment header.
pub const SEGMENT_HEADER_BYTES: u64 = 64;
/// Bytes of a frame header; payloads start right after it, 8-byte aligned.
pub const FRAME_HEADER_BYTES: u64 = 40;
/// Frames start (and so payloads start) on this alignment.
pub const FRAME_ALIGN: u64 = 8;
const _: () = assert!(FRAME_HEADER_BYTES.is_multiple_of(FRAME_ALIGN), "payloads start aligned");
/// Bytes between the two hard-state slots (one sector, so a torn write hits one slot only).
pub const META_SLOT_STRIDE: u64 = 512;
/// Bytes of one encoded hard-state slot.
pub const META_SLOT_BYTES: usize = 64;

const SEGMENT_MAGIC: [u8; 8] = *b"RWALSEG\0";
const META_MAGIC: [u8; 4] = *b"RWMT";

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("slice of 4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("slice of 8 bytes"))
}

/// Rounds `n` up to the frame alignment.
pub const fn align_up(n: u64) -> u64 {
    (n + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1)
}

/// Total bytes a frame with a payload of `payload_bytes` occupies, padding included.
pub const fn frame_bytes(payload_bytes: u64) -> u64 {
    align_up(FRAME_HEADER_BYTES + payload_bytes)
}

/// Segment header flag: this segment restarts the whole log (see [`RestartMark`]).
const SEGMENT_FLAG_RESTART: u32 = 1;
/// Every flag this version knows; a header with any other bit set is refused, so a flag added
/// later is never silently ignored.
const SEGMENT_FLAGS_KNOWN: u32 = SEGMENT_FLAG_RESTART;

/// The header at the start of every segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Monotonic id; a segment with a higher id supersedes entries of lower ids from its
    /// `first_index` on (this is how suffix truncation is made durable).
    pub segment_id: u64,
    /// Index of the first frame this segment holds (or will hold).
    pub first_index: LogIndex,
    /// Set on the segment a [`crate::Wal::restart_at`] creates.
    pub restart: Option<RestartMark>,
}

/// What a restart segment carries. The restart is committed once the hard-state slot with
/// sequence number `commit_seq` (which holds `first_index` and `prev_term` as the log start)
/// is durable; from then on every segment with a lower id is obsolete. Until then the restart
/// segment itself is obsolete. docs/wal-format.md has the crash argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartMark {
    /// Term of the entry at the segment's `first_index - 1`.
    pub prev_term: Term,
    /// Sequence number of the hard-state slot whose write commits the restart.
    pub commit_seq: u64,
}

impl SegmentHeader {
    /// Layout: magic[8] | version u32 | flags u32 | segment_id u64 | first_index u64 |
    /// restart_prev_term u64 | restart_commit_seq u64 | reserved[12] | crc32(bytes 0..60) u32.
    /// The two restart fields are zero unless flag bit 0 (restart) is set.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES as usize] {
        let mut b = [0u8; SEGMENT_HEADER_BYTES as usize];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.segment_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_index.get().to_le_bytes());
        if let Some(mark) = self.restart {
            b[12..16].copy_from_slice(&SEGMENT_FLAG_RESTART.to_le_bytes());
            b[32..40].copy_from_slice(&mark.prev_term.get().to_le_bytes());
            b[40..48].copy_from_slice(&mark.commit_seq.to_le_bytes());
        }
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and verifies a header. The error says what was wrong, for the corruption report.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, String> {
        if b.len() < SEGMENT_HEADER_BYTES as usize {
            return Err(format!("segment shorter than its header ({} bytes)", b.len()));
        }
        let crc = u32_at(b, 60);
        if crc32fast::hash(&b[0..60]) != crc {
            return Err("segment header checksum mismatch".into());
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err("bad segment magic".into());
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(format!("unsupported segment format version {version}"));
        }
        let flags = u32_at(b, 12);
        if flags & !SEGMENT_FLAGS_KNOWN != 0 {
            return Err(format!("unknown segment header flags {flags:#x}"));
        }
        let restart = (flags & SEGMENT_FLAG_RESTART != 0)
            .then(|| RestartMark { prev_term: Term(u64_at(b, 32)), commit_seq: u64_at(b, 40) });
        Ok(SegmentHeader {
            segment_id: u64_at(b, 16),
            first_index: LogIndex(u64_at(b, 24)),
            restart,
        })
    }
}

/// A frame header as read from disk, after its own checksum was verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload bytes (padding excluded).
    pub payload_len: u32,
    /// Checksum of the header fields (which include `payload_crc`): the frame's identity in
    /// the chain.
    pub header_crc: u32,
    /// Raft term.
    pub term: Term,
    /// Raft index.
    pub index: LogIndex,
    /// Index of the first entry of the write group this frame was written in. Recovery uses it
    /// to tell a torn last group (damage followed only by frames of the same group) from
    /// corruption (damage followed by a frame of a later group, which was written only after the
    /// damaged group's sync returned).
    pub group_first_index: LogIndex,
    /// `header_crc` of the frame before this one in the log.
    pub prev_crc: u32,
    /// Checksum of the payload bytes.
    pub payload_crc: u32,
}

/// Layout of a frame header (40 bytes):
/// payload_len u32 | header_crc u32 | term u64 | index u64 | group_first_index u64 |
/// prev_crc u32 | payload_crc u32. `header_crc` = crc32(salt ++ bytes 0..4 ++ bytes 8..40).
///
/// `salt` is a random secret of this WAL (kept in the hard-state file, never sent anywhere).
/// Without it a client could put a well-formed frame inside a record's payload; recovery's
/// look past damage for a later write group would then take it for one and report a plain
/// crash as corruption, keeping the node down.
fn header_crc(h: &[u8], salt: u32) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&salt.to_le_bytes());
    c.update(&h[0..4]);
    c.update(&h[8..40]);
    c.finalize()
}

impl FrameHeader {
    /// Parses the header at the start of `b` and verifies its checksum and that the whole
    /// frame fits in `b`. Does not look at the payload.
    pub fn decode(b: &[u8], salt: u32) -> Option<FrameHeader> {
        if b.len() < FRAME_HEADER_BYTES as usize {
            return None;
        }
        let h = &b[..FRAME_HEADER_BYTES as usize];
        let payload_len = u32_at(h, 0);
        let stored = u32_at(h, 4);
        if frame_bytes(u64::from(payload_len)) > b.len() as u64 || header_crc(h, salt) != stored {
            return None;
        }
        Some(FrameHeader {
            payload_len,
            header_crc: stored,
            term: Term(u64_at(h, 8)),
            index: LogIndex(u64_at(h, 16)),
            group_first_index: LogIndex(u64_at(h, 24)),
            prev_crc: u32_at(h, 32),
            payload_crc: u32_at(h, 36),
        })
    }

    /// Bytes of the whole frame, padding included.
    pub fn frame_bytes(&self) -> u64 {
        frame_bytes(u64::from(self.payload_len))
    }

    /// Verifies the payload checksum and that the padding is zero, given the whole frame.
    pub fn verify_body(&self, frame: &[u8]) -> bool {
        let start = FRAME_HEADER_BYTES as usize;
        let end = start + self.payload_len as usize;
        let total = self.frame_bytes() as usize;
        frame.len() >= total
            && crc32fast::hash(&frame[start..end]) == self.payload_crc
            && frame[end..total].iter().all(|&b| b == 0)
    }
}

/// Appends an unchained frame to `buf`: everything but `group_first_index`, `prev_crc` and
/// `header_crc`, which [`chain_frame`] fills in once the frame's place in the log is known.
/// `payload_crc` is `crc32fast::hash(payload)`, computed by the caller outside any lock.
pub fn encode_frame_unchained(
    buf: &mut Vec<u8>,
    term: Term,
    index: LogIndex,
    payload: &[u8],
    payload_crc: u32,
) {
    let start = buf.len();
    let len = u32::try_from(payload.len()).expect("record size is limited far below 4 GiB");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(&term.get().to_le_bytes());
    buf.extend_from_slice(&index.get().to_le_bytes());
    buf.extend_from_slice(&[0u8; 12]);
    buf.extend_from_slice(&payload_crc.to_le_bytes());
    buf.extend_from_slice(payload);
    let total = frame_bytes(payload.len() as u64) as usize;
    buf.resize(start + total, 0);
}

/// Fills in the chain fields of a frame produced by [`encode_frame_unchained`] and returns its
/// `header_crc`, which the next frame must carry as its `prev_crc`.
pub fn chain_frame(frame: &mut [u8], group_first_index: LogIndex, prev_crc: u32, salt: u32) -> u32 {
    frame[24..32].copy_from_slice(&group_first_index.get().to_le_bytes());
    frame[32..36].copy_from_slice(&prev_crc.to_le_bytes());
    let crc = header_crc(&frame[..FRAME_HEADER_BYTES as usize], salt);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    crc
}

/// One hard-state slot: the hard state plus where the log starts after compaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaSlot {
    /// Higher wins; the two slots alternate.
    pub seq: u64,
    /// The Raft hard state.
    pub hard_state: HardState,
    /// The first index readable after compaction.
    pub first_index: LogIndex,
    /// Term of the entry at `first_index - 1` (0 when the log starts at 1).
    pub first_prev_term: Term,
    /// This WAL's secret frame-checksum salt, chosen at creation, never changed.
    pub salt: u32,
}

impl MetaSlot {
    /// Where in the hard-state file this slot is written: slot `seq % 2`, so a save never
    /// overwrites the slot it supersedes.
    pub fn file_offset(&self) -> u64 {
        (self.seq % 2) * META_SLOT_STRIDE
    }

    /// Layout: magic[4] | version u32 | seq u64 | term u64 | vote u64 (0 = none) | commit u64 |
    /// first_index u64 | first_prev_term u64 | salt u32 | crc32(bytes 0..60) u32.
    pub fn encode(&self) -> [u8; META_SLOT_BYTES] {
        let mut b = [0u8; META_SLOT_BYTES];
        b[0..4].copy_from_slice(&META_MAGIC);
        b[4..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.hard_state.term.get().to_le_bytes());
        let vote = self.hard_state.vote.map_or(0, NodeId::get);
        b[24..32].copy_from_slice(&vote.to_le_bytes());
        b[32..40].copy_from_slice(&self.hard_state.commit.get().to_le_bytes());
        b[40..48].copy_from_slice(&self.first_index.get().to_le_bytes());
        b[48..56].copy_from_slice(&self.first_prev_term.get().to_le_bytes());
        b[56..60].copy_from_slice(&self.salt.to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and verifies one slot; `None` when it is torn, empty or foreign.
    pub fn decode(b: &[u8]) -> Option<MetaSlot> {
        if b.len() < META_SLOT_BYTES
            || b[0..4] != META_MAGIC
            || u32_at(b, 4) != FORMAT_VERSION
            || crc32fast::hash(&b[0..60]) != u32_at(b, 60)
        {
            return None;
        }
        let vote = u64_at(b, 24);
        Some(MetaSlot {
            seq: u64_at(b, 8),
            hard_state: HardState {
                term: Term(u64_at(b, 16)),
                vote: (vote != 0).then_some(NodeId(vote)),
                commit: LogIndex(u64_at(b, 32)),
            },
            first_index: LogIndex(u64_at(b, 40)),
            first_prev_term: Term(u64_at(b, 48)),
            salt: u32_at(b, 56),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_and_payload_is_aligned() {
        let mut buf = vec![0u8; 8];
        encode_frame_unchained(&mut buf, Term(3), LogIndex(9), b"hello", crc32fast::hash(b"hello"));
        let crc = chain_frame(&mut buf[8..], LogIndex(7), 0xdead_beef, 42);
        let h = FrameHeader::decode(&buf[8..], 42).expect("valid header");
        assert_eq!(FrameHeader::decode(&buf[8..], 43), None, "another salt does not verify");
        assert_eq!(h.header_crc, crc);
        assert_eq!((h.term, h.index, h.group_first_index), (Term(3), LogIndex(9), LogIndex(7)));
        assert_eq!(h.prev_crc, 0xdead_beef);
        assert!(h.verify_body(&buf[8..]));
        assert_eq!(buf.len() % 8, 0);
        assert_eq!((8 + FRAME_HEADER_BYTES) % FRAME_ALIGN, 0);
    }

    #[test]
    fn every_bit_flip_in_a_frame_is_detected() {
        let mut buf = Vec::new();
        encode_frame_unchained(&mut buf, Term(1), LogIndex(1), b"abc", crc32fast::hash(b"abc"));
        chain_frame(&mut buf, LogIndex(1), 5, 9);
        for bit in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let ok = FrameHeader::decode(&b, 9).is_some_and(|h| h.verify_body(&b));
            assert!(!ok, "flip of bit {bit} went undetected");
        }
    }

    #[test]
    fn meta_slot_round_trips_and_rejects_flips() {
        let s = MetaSlot {
            seq: 4,
            hard_state: HardState { term: Term(2), vote: Some(NodeId(3)), commit: LogIndex(10) },
            first_index: LogIndex(5),
            first_prev_term: Term(1),
            salt: 0x1234_5678,
        };
        let b = s.encode();
        assert_eq!(MetaSlot::decode(&b), Some(s));
        for bit in 0..b.len() * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(MetaSlot::decode(&c), None, "flip of bit {bit}");
        }
    }

    #[test]
    fn segment_header_round_trips() {
        let h = SegmentHeader { segment_id: 7, first_index: LogIndex(100), restart: None };
        assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[20] ^= 1;
        assert!(SegmentHeader::decode(&b).is_err());
    }

    #[test]
    fn restart_segment_header_round_trips_and_rejects_flips() {
        let mark = RestartMark { prev_term: Term(9), commit_seq: 41 };
        let h = SegmentHeader { segment_id: 3, first_index: LogIndex(1000), restart: Some(mark) };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        assert_eq!(u32_at(&b, 12), SEGMENT_FLAG_RESTART);
        for bit in 0..b.len() * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(SegmentHeader::decode(&c), Ok(h), "flip of bit {bit}");
        }
    }

    #[test]
    fn unknown_segment_flags_are_refused() {
        let mut b =
            SegmentHeader { segment_id: 1, first_index: LogIndex(1), restart: None }.encode();
        b[12] = 2;
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        assert!(
            SegmentHeader::decode(&b).is_err_and(|e| e.contains("unknown segment header flags"))
        );
    }
}
