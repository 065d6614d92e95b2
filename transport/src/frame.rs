//! The wire format of one consensus message: a fixed header, an rkyv archive of everything but
//! the entry payloads, then the payloads as raw bytes, never re-encoded.
//!
//! ```text
//! offset  size  field
//!      0     4  frame_bytes   bytes after this field (header rest + archive + payloads), LE
//!      4     1  version       FRAME_VERSION
//!      5     3  reserved      zero
//!      8     8  group         the consensus group id, LE
//!     16     4  archive_bytes LE
//!     20     4  payload_bytes LE; equals the sum of the archived entry lengths
//!     24     .  archive       rkyv (little endian, 32-bit relative pointers), validated
//!      .     .  payloads      each entry's data, in entry order
//! ```
//! Every length is checked against [`FrameLimits`] before anything is allocated.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use raftwal_consensus::{
    Entry, EntryKind, GroupId, LogIndex, LogStart, Membership, Message, MessageBody, NodeId,
    RejectHint, Term,
};
use rkyv::rancor;
use rkyv::util::AlignedVec;

/// The frame layout's version, written in every frame.
pub const FRAME_VERSION: u8 = 1;
/// Bytes before the archive, counting the length prefix.
pub const FRAME_HEADER_BYTES: usize = 24;
const LEN_PREFIX_BYTES: usize = 4;

/// Limits a receiver enforces before it allocates.
#[derive(Clone, Copy, Debug)]
pub struct FrameLimits {
    /// The largest archive (message metadata, without payloads).
    pub archive_bytes_max: u32,
    /// The largest frame (archive plus payloads).
    pub frame_bytes_max: u32,
}

impl Default for FrameLimits {
    /// A 1 MiB archive holds ~30,000 entry headers; a 96 MiB frame holds a default 1 MiB append
    /// many times over and a 64 MiB batch with room for its headers.
    fn default() -> FrameLimits {
        FrameLimits { archive_bytes_max: 1 << 20, frame_bytes_max: 96 << 20 }
    }
}

/// Archive bytes of an append message besides its entries' headers (ids, term, indexes, the
/// vector's length), rounded well up.
const APP_ARCHIVE_FIXED_BYTES: usize = 256;

impl FrameLimits {
    /// The most entries one append message may carry for its archive to stay within
    /// `archive_bytes_max`: every entry costs a fixed-size header whatever its payload, so a
    /// sender that bounds messages only by payload bytes can build one this receiver refuses.
    pub fn app_entries_max(&self) -> usize {
        let per_entry = std::mem::size_of::<ArchivedWireEntry>();
        (self.archive_bytes_max as usize).saturating_sub(APP_ARCHIVE_FIXED_BYTES) / per_entry
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The bytes end before the frame does.
    #[error("truncated frame: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// A length is over its limit.
    #[error("{field} of {bytes} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Which length.
        field: &'static str,
        /// Its value.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The header is malformed.
    #[error("bad frame header: {reason}")]
    BadHeader {
        /// What is wrong.
        reason: &'static str,
    },
    /// The archive failed rkyv's validation or describes an impossible message.
    #[error("bad frame archive: {reason}")]
    BadArchive {
        /// What is wrong.
        reason: String,
    },
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
struct WireMessage {
    from: u64,
    to: u64,
    term: u64,
    body: WireBody,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
struct WireEntry {
    term: u64,
    index: u64,
    kind: u8,
    len: u32,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
struct WireMembership {
    voters: Vec<u64>,
    voters_outgoing: Vec<u64>,
    learners: Vec<u64>,
    learners_next: Vec<u64>,
    auto_leave: bool,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
enum WireBody {
    PreVote { last_index: u64, last_term: u64 },
    PreVoteResp { reject: bool },
    Vote { last_index: u64, last_term: u64, transfer: bool },
    VoteResp { reject: bool },
    App { prev_index: u64, prev_term: u64, commit: u64, entries: Vec<WireEntry> },
    AppResp { index: u64, reject: Option<(u64, u64)> },
    Heartbeat { commit: u64, read: Option<u64> },
    HeartbeatResp { read: Option<u64> },
    InstallLog { first_index: u64, prev_term: u64, membership: WireMembership, commit: u64 },
    TimeoutNow,
    ReadIndex { context: u64 },
    ReadIndexResp { context: u64, index: u64 },
    RepairReq { last_index: u64, last_term: u64, floor_index: u64, floor_term: u64 },
    RepairResp { prev_index: u64, prev_term: u64, entries: Vec<WireEntry> },
    AckedThrough { index: u64, term: u64 },
    RepairStart { first_index: u64, prev_term: u64, membership: WireMembership },
}

fn ids(set: &std::collections::BTreeSet<NodeId>) -> Vec<u64> {
    set.iter().map(|id| id.0).collect()
}

fn wire_membership(m: &Membership) -> WireMembership {
    WireMembership {
        voters: ids(&m.voters),
        voters_outgoing: ids(&m.voters_outgoing),
        learners: ids(&m.learners),
        learners_next: ids(&m.learners_next),
        auto_leave: m.auto_leave,
    }
}

fn membership_from_wire(m: &ArchivedWireMembership) -> Membership {
    let set = |v: &rkyv::vec::ArchivedVec<rkyv::rend::u64_le>| {
        v.iter().map(|id| NodeId(id.to_native())).collect()
    };
    Membership {
        voters: set(&m.voters),
        voters_outgoing: set(&m.voters_outgoing),
        learners: set(&m.learners),
        learners_next: set(&m.learners_next),
        auto_leave: m.auto_leave,
    }
}

fn wire_entries(entries: &[Entry]) -> Vec<WireEntry> {
    entries
        .iter()
        .map(|e| WireEntry {
            term: e.term.0,
            index: e.index.0,
            kind: e.kind as u8,
            len: u32::try_from(e.data.len()).expect("entries are far below 4 GiB"),
        })
        .collect()
}

fn to_wire(msg: &Message) -> WireMessage {
    let body = match &msg.body {
        MessageBody::PreVote { last_index, last_term } => {
            WireBody::PreVote { last_index: last_index.0, last_term: last_term.0 }
        }
        MessageBody::PreVoteResp { reject } => WireBody::PreVoteResp { reject: *reject },
        MessageBody::Vote { last_index, last_term, transfer } => {
            WireBody::Vote { last_index: last_index.0, last_term: last_term.0, transfer: *transfer }
        }
        MessageBody::VoteResp { reject } => WireBody::VoteResp { reject: *reject },
        MessageBody::App { prev_index, prev_term, entries, commit } => WireBody::App {
            prev_index: prev_index.0,
            prev_term: prev_term.0,
            commit: commit.0,
            entries: wire_entries(entries),
        },
        MessageBody::AppResp { index, reject } => {
            WireBody::AppResp { index: index.0, reject: reject.map(|h| (h.index.0, h.term.0)) }
        }
        MessageBody::Heartbeat { commit, read } => {
            WireBody::Heartbeat { commit: commit.0, read: *read }
        }
        MessageBody::HeartbeatResp { read } => WireBody::HeartbeatResp { read: *read },
        MessageBody::InstallLog { start, commit } => WireBody::InstallLog {
            first_index: start.first_index.0,
            prev_term: start.prev_term.0,
            membership: wire_membership(&start.membership),
            commit: commit.0,
        },
        MessageBody::RepairStart { start } => WireBody::RepairStart {
            first_index: start.first_index.0,
            prev_term: start.prev_term.0,
            membership: wire_membership(&start.membership),
        },
        MessageBody::TimeoutNow => WireBody::TimeoutNow,
        MessageBody::ReadIndex { context } => WireBody::ReadIndex { context: *context },
        MessageBody::ReadIndexResp { context, index } => {
            WireBody::ReadIndexResp { context: *context, index: index.0 }
        }
        MessageBody::RepairReq { last_index, last_term, floor_index, floor_term } => {
            WireBody::RepairReq {
                last_index: last_index.0,
                last_term: last_term.0,
                floor_index: floor_index.0,
                floor_term: floor_term.0,
            }
        }
        MessageBody::AckedThrough { index, term } => {
            WireBody::AckedThrough { index: index.0, term: term.0 }
        }
        MessageBody::RepairResp { prev_index, prev_term, entries } => WireBody::RepairResp {
            prev_index: prev_index.0,
            prev_term: prev_term.0,
            entries: wire_entries(entries),
        },
    };
    WireMessage { from: msg.from.0, to: msg.to.0, term: msg.term.0, body }
}

/// The payloads a message carries beside its archive, in order.
fn payloads(msg: &Message) -> &[Entry] {
    match &msg.body {
        MessageBody::App { entries, .. } | MessageBody::RepairResp { entries, .. } => entries,
        _ => &[],
    }
}

/// An encoded frame: its header and archive in one buffer, then the payloads as they were
/// (shared, not copied), ready for a vectored stream write.
#[derive(Debug)]
pub struct EncodedFrame {
    /// Header and archive.
    pub head: Bytes,
    /// The entry payloads.
    pub payloads: Vec<Bytes>,
}

impl EncodedFrame {
    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.payloads.iter().map(Bytes::len).sum::<usize>()
    }

    /// Whether the frame is empty (it never is).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Header, archive and payloads in one buffer (tests, fuzzing, small frames).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.head);
        for p in &self.payloads {
            out.extend_from_slice(p);
        }
        out
    }
}

/// Encodes `msg`.
pub fn encode(msg: &Message) -> EncodedFrame {
    let archive = rkyv::to_bytes::<rancor::Error>(&to_wire(msg))
        .expect("serializing plain integers and vectors cannot fail");
    let payloads: Vec<Bytes> = payloads(msg).iter().map(|e| e.data.clone()).collect();
    let payload_bytes: usize = payloads.iter().map(Bytes::len).sum();
    let frame_bytes = FRAME_HEADER_BYTES - LEN_PREFIX_BYTES + archive.len() + payload_bytes;
    let mut head = BytesMut::with_capacity(FRAME_HEADER_BYTES + archive.len());
    head.put_u32_le(u32::try_from(frame_bytes).expect("frames are far below 4 GiB"));
    head.put_u8(FRAME_VERSION);
    head.put_bytes(0, 3);
    head.put_u64_le(msg.group.0);
    head.put_u32_le(archive.len() as u32);
    head.put_u32_le(payload_bytes as u32);
    head.extend_from_slice(&archive);
    EncodedFrame { head: head.freeze(), payloads }
}

/// Reads the length prefix of a frame: the bytes that follow it, checked against the limit
/// before the caller allocates for them.
pub fn frame_len(prefix: [u8; 4], limits: &FrameLimits) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix);
    if len > limits.frame_bytes_max {
        return Err(FrameError::TooLarge {
            field: "frame",
            bytes: u64::from(len),
            max: u64::from(limits.frame_bytes_max),
        });
    }
    if (len as usize) < FRAME_HEADER_BYTES - LEN_PREFIX_BYTES {
        return Err(FrameError::BadHeader { reason: "frame shorter than its header" });
    }
    Ok(len as usize)
}

/// Decodes one whole frame (length prefix included). Payloads are slices of `frame`: no copy.
pub fn decode(frame: Bytes, limits: &FrameLimits) -> Result<Message, FrameError> {
    if frame.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Truncated { needed: FRAME_HEADER_BYTES, have: frame.len() });
    }
    let mut header = &frame[..FRAME_HEADER_BYTES];
    let len = frame_len(header.get_u32_le().to_le_bytes(), limits)?;
    if frame.len() != LEN_PREFIX_BYTES + len {
        return Err(FrameError::Truncated { needed: LEN_PREFIX_BYTES + len, have: frame.len() });
    }
    if header.get_u8() != FRAME_VERSION {
        return Err(FrameError::BadHeader { reason: "unknown frame version" });
    }
    if header.get_u8() != 0 || header.get_u16_le() != 0 {
        return Err(FrameError::BadHeader { reason: "reserved bytes are not zero" });
    }
    let group = GroupId(header.get_u64_le());
    let archive_bytes = header.get_u32_le();
    let payload_bytes = header.get_u32_le();
    if archive_bytes > limits.archive_bytes_max {
        return Err(FrameError::TooLarge {
            field: "archive",
            bytes: u64::from(archive_bytes),
            max: u64::from(limits.archive_bytes_max),
        });
    }
    let body_bytes = u64::from(archive_bytes) + u64::from(payload_bytes);
    if body_bytes != (len - (FRAME_HEADER_BYTES - LEN_PREFIX_BYTES)) as u64 {
        return Err(FrameError::BadHeader { reason: "archive and payload lengths do not add up" });
    }
    let archive_end = FRAME_HEADER_BYTES + archive_bytes as usize;
    // rkyv needs its input aligned; a network buffer is not. The archive is small (no
    // payloads), so the copy is cheap.
    let mut aligned = AlignedVec::<16>::with_capacity(archive_bytes as usize);
    aligned.extend_from_slice(&frame[FRAME_HEADER_BYTES..archive_end]);
    let wire = rkyv::access::<ArchivedWireMessage, rancor::Error>(&aligned)
        .map_err(|e| FrameError::BadArchive { reason: e.to_string() })?;
    from_wire(group, wire, frame.slice(archive_end..))
}

fn bad(reason: &str) -> FrameError {
    FrameError::BadArchive { reason: reason.to_string() }
}

/// Entries from their archived heads, each taking its payload from the front of `payloads`.
fn from_wire_entries(
    entries: &rkyv::vec::ArchivedVec<ArchivedWireEntry>,
    payloads: &mut Bytes,
) -> Result<Vec<Entry>, FrameError> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries.iter() {
        let len = e.len.to_native() as usize;
        if len > payloads.len() {
            return Err(bad("entry lengths exceed the payload bytes"));
        }
        let kind = EntryKind::from_u8(e.kind).ok_or_else(|| bad("unknown entry kind"))?;
        out.push(Entry {
            term: Term(e.term.to_native()),
            index: LogIndex(e.index.to_native()),
            kind,
            data: payloads.split_to(len),
        });
    }
    Ok(out)
}

fn from_wire(
    group: GroupId,
    w: &ArchivedWireMessage,
    mut payloads: Bytes,
) -> Result<Message, FrameError> {
    let idx = |v: &rkyv::rend::u64_le| LogIndex(v.to_native());
    let term = |v: &rkyv::rend::u64_le| Term(v.to_native());
    let body = match &w.body {
        ArchivedWireBody::PreVote { last_index, last_term } => {
            MessageBody::PreVote { last_index: idx(last_index), last_term: term(last_term) }
        }
        ArchivedWireBody::PreVoteResp { reject } => MessageBody::PreVoteResp { reject: *reject },
        ArchivedWireBody::Vote { last_index, last_term, transfer } => MessageBody::Vote {
            last_index: idx(last_index),
            last_term: term(last_term),
            transfer: *transfer,
        },
        ArchivedWireBody::VoteResp { reject } => MessageBody::VoteResp { reject: *reject },
        ArchivedWireBody::App { prev_index, prev_term, commit, entries } => MessageBody::App {
            prev_index: idx(prev_index),
            prev_term: term(prev_term),
            entries: from_wire_entries(entries, &mut payloads)?,
            commit: idx(commit),
        },
        ArchivedWireBody::RepairReq { last_index, last_term, floor_index, floor_term } => {
            MessageBody::RepairReq {
                last_index: idx(last_index),
                last_term: term(last_term),
                floor_index: idx(floor_index),
                floor_term: term(floor_term),
            }
        }
        ArchivedWireBody::AckedThrough { index, term: t } => {
            MessageBody::AckedThrough { index: idx(index), term: term(t) }
        }
        ArchivedWireBody::RepairResp { prev_index, prev_term, entries } => {
            MessageBody::RepairResp {
                prev_index: idx(prev_index),
                prev_term: term(prev_term),
                entries: from_wire_entries(entries, &mut payloads)?,
            }
        }
        ArchivedWireBody::AppResp { index, reject } => MessageBody::AppResp {
            index: idx(index),
            reject: reject.as_ref().map(|h| RejectHint { index: idx(&h.0), term: term(&h.1) }),
        },
        ArchivedWireBody::Heartbeat { commit, read } => MessageBody::Heartbeat {
            commit: idx(commit),
            read: read.as_ref().map(|r| r.to_native()),
        },
        ArchivedWireBody::HeartbeatResp { read } => {
            MessageBody::HeartbeatResp { read: read.as_ref().map(|r| r.to_native()) }
        }
        ArchivedWireBody::InstallLog { first_index, prev_term, membership, commit } => {
            MessageBody::InstallLog {
                start: LogStart {
                    first_index: idx(first_index),
                    prev_term: term(prev_term),
                    membership: membership_from_wire(membership),
                },
                commit: idx(commit),
            }
        }
        ArchivedWireBody::RepairStart { first_index, prev_term, membership } => {
            MessageBody::RepairStart {
                start: LogStart {
                    first_index: idx(first_index),
                    prev_term: term(prev_term),
                    membership: membership_from_wire(membership),
                },
            }
        }
        ArchivedWireBody::TimeoutNow => MessageBody::TimeoutNow,
        ArchivedWireBody::ReadIndex { context } => {
            MessageBody::ReadIndex { context: context.to_native() }
        }
        ArchivedWireBody::ReadIndexResp { context, index } => {
            MessageBody::ReadIndexResp { context: context.to_native(), index: idx(index) }
        }
    };
    if !payloads.is_empty() {
        return Err(bad("payload bytes beyond the archived entries"));
    }
    Ok(Message {
        group,
        from: NodeId(w.from.to_native()),
        to: NodeId(w.to.to_native()),
        term: Term(w.term.to_native()),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message {
            group: GroupId(7),
            from: NodeId(1),
            to: NodeId(2),
            term: Term(3),
            body: MessageBody::App {
                prev_index: LogIndex(9),
                prev_term: Term(2),
                entries: vec![
                    Entry {
                        term: Term(3),
                        index: LogIndex(10),
                        kind: EntryKind::Normal,
                        data: Bytes::from_static(b"hello"),
                    },
                    Entry {
                        term: Term(3),
                        index: LogIndex(11),
                        kind: EntryKind::Noop,
                        data: Bytes::new(),
                    },
                ],
                commit: LogIndex(8),
            },
        }
    }

    #[test]
    fn round_trips_with_payloads_beside_the_archive() {
        let msg = sample();
        let frame = encode(&msg);
        let bytes = Bytes::from(frame.to_vec());
        assert_eq!(decode(bytes.clone(), &FrameLimits::default()), Ok(msg));
        // The payload is the frame's tail, verbatim.
        assert!(bytes.ends_with(b"hello"));
    }

    fn app_of(count: usize) -> Message {
        let entries = (0..count as u64)
            .map(|i| Entry {
                term: Term(3),
                index: LogIndex(10 + i),
                kind: EntryKind::Normal,
                data: Bytes::new(),
            })
            .collect();
        let mut msg = sample();
        msg.term = Term(u64::MAX >> 2);
        if let MessageBody::App { entries: e, prev_index, commit, .. } = &mut msg.body {
            *e = entries;
            *prev_index = LogIndex(9);
            *commit = LogIndex(u64::MAX >> 2);
        }
        msg
    }

    #[test]
    fn an_append_of_app_entries_max_entries_fits_the_archive_limit() {
        let limits = FrameLimits::default();
        let max = limits.app_entries_max();
        assert!(max >= 8192, "the consensus default fits: {max}");
        let fits = Bytes::from(encode(&app_of(max)).to_vec());
        assert!(decode(fits, &limits).is_ok());
        // The bound is close, not loose: a few percent more entries no longer fit.
        let over = Bytes::from(encode(&app_of(max + max / 50)).to_vec());
        assert!(matches!(
            decode(over, &limits),
            Err(FrameError::TooLarge { field: "archive", .. })
        ));
    }

    #[test]
    fn refuses_truncation_and_oversized_lengths_before_allocating() {
        let bytes = encode(&sample()).to_vec();
        for cut in 0..bytes.len() {
            let err = decode(Bytes::copy_from_slice(&bytes[..cut]), &FrameLimits::default());
            assert!(matches!(err, Err(FrameError::Truncated { .. })), "cut {cut}: {err:?}");
        }
        let limits = FrameLimits { archive_bytes_max: 1 << 20, frame_bytes_max: 64 };
        assert!(matches!(
            frame_len(u32::MAX.to_le_bytes(), &limits),
            Err(FrameError::TooLarge { .. })
        ));
        let mut grown = bytes.clone();
        grown[0..4].copy_from_slice(&(bytes.len() as u32 + 100).to_le_bytes());
        assert!(decode(Bytes::from(grown), &FrameLimits::default()).is_err());
    }

    #[test]
    fn refuses_corrupted_archives_without_panicking() {
        let bytes = encode(&sample()).to_vec();
        for i in 4..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                // Any outcome but a panic is acceptable; most flips must be refused.
                let _ = decode(Bytes::from(bad), &FrameLimits::default());
            }
        }
    }
}
