//! The WAL as consensus's log store, and the node's on-disk layout around it.
//!
//! A WAL payload is the entry kind (one byte) followed by the entry data. Entries handed to
//! consensus share the WAL's memory map: no copy.
//!
//! Layout of a node's data directory (byte layouts and the crash argument in
//! docs/node-format.md):
//! ```text
//! wal/         the raftwal-wal log and hard state
//! log-start    the membership and addresses as of the WAL's first index - 1, checksummed
//! repair-floor while a repair from peers is under way: how far the log reached before
//!              damage cut it (index, term), checksummed
//! ```
//! Both go through the WAL's `Storage` trait, so a crash test on `FaultStorage` reaches them.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use raftwal_consensus::{
    Entry, EntryKind, LogIndex, LogStart, LogStore, Membership, StoreError, Term,
};
use raftwal_wal::storage::Storage;
use raftwal_wal::{Entry as WalEntry, Record, Wal};

use crate::envelope::{self, Addresses, Payload};

/// Consensus's read-only view of the WAL.
#[derive(Debug, Clone)]
pub struct WalStore {
    wal: Arc<Wal>,
    membership: Membership,
}

impl WalStore {
    /// A view of `wal` whose log starts with `membership` in effect.
    pub fn new(wal: Arc<Wal>, membership: Membership) -> WalStore {
        WalStore { wal, membership }
    }

    /// The membership as of the log start changed (a trim).
    pub fn set_start_membership(&mut self, membership: Membership) {
        self.membership = membership;
    }

    /// The WAL.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }
}

/// Consensus entries encoded as the WAL stores them (the kind byte, then the data), owned
/// here so that the borrowed [`WalEntry`] views can be handed to the WAL.
#[derive(Debug)]
pub struct WalBatch {
    heads: Vec<(Term, LogIndex)>,
    payloads: Vec<Vec<u8>>,
}

impl WalBatch {
    /// Encodes `entries`.
    pub fn new(entries: &[Entry]) -> WalBatch {
        let heads = entries.iter().map(|e| (e.term, e.index)).collect();
        let payloads = entries
            .iter()
            .map(|e| {
                let mut out = Vec::with_capacity(1 + e.data.len());
                out.push(e.kind as u8);
                out.extend_from_slice(&e.data);
                out
            })
            .collect();
        WalBatch { heads, payloads }
    }

    /// The entries to append.
    pub fn entries(&self) -> Vec<WalEntry<'_>> {
        self.heads
            .iter()
            .zip(&self.payloads)
            .map(|(&(term, index), payload)| WalEntry { term, index, payload })
            .collect()
    }
}

/// An entry read from the WAL, sharing its map.
pub fn entry_of(record: Record) -> Result<Entry, StoreError> {
    let kind = record.payload().first().and_then(|&k| EntryKind::from_u8(k)).ok_or_else(|| {
        StoreError::Failed(format!("entry {} has no valid kind", record.index()).into())
    })?;
    let (term, index) = (record.term(), record.index());
    let data = Bytes::from_owner(Tail(record)).slice(1..);
    Ok(Entry { term, index, kind, data })
}

/// A record's bytes as an owner for `Bytes`.
struct Tail(Record);

impl AsRef<[u8]> for Tail {
    fn as_ref(&self) -> &[u8] {
        self.0.payload()
    }
}

fn failed(e: raftwal_wal::Error) -> StoreError {
    StoreError::Failed(Box::new(e))
}

impl LogStore for WalStore {
    fn start(&self) -> LogStart {
        let first_index = self.wal.first_index();
        let prev_term = self.wal.term(first_index.prev()).unwrap_or(Term(0));
        LogStart { first_index, prev_term, membership: self.membership.clone() }
    }

    fn first_index(&self) -> LogIndex {
        self.wal.first_index()
    }

    fn last_index(&self) -> LogIndex {
        self.wal.last_index()
    }

    fn term(&self, index: LogIndex) -> Result<Term, StoreError> {
        if index < self.wal.first_index().prev() {
            return Err(StoreError::Compacted { index });
        }
        if index > self.wal.last_index() {
            return Err(StoreError::Unavailable { index });
        }
        self.wal.term(index).map_err(failed)
    }

    fn entries(&self, range: Range<LogIndex>, bytes_max: u64) -> Result<Vec<Entry>, StoreError> {
        if range.start < self.wal.first_index() {
            return Err(StoreError::Compacted { index: range.start });
        }
        if range.end > self.wal.last_index().next() {
            return Err(StoreError::Unavailable { index: range.end.prev() });
        }
        self.wal.read(range, bytes_max).map_err(failed)?.into_iter().map(entry_of).collect()
    }
}

/// The file (in the node's data directory) that keeps the membership as of the log start.
pub const LOG_START_FILE: &str = "log-start";

/// What the node keeps about its log start: the membership in effect just before it and the
/// replicated node addresses known then (both would otherwise be lost with the trimmed entries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartRecord {
    /// The WAL's first index this record belongs to.
    pub first_index: LogIndex,
    /// The membership as of `first_index - 1`.
    pub membership: Membership,
    /// Node addresses replicated before `first_index`.
    pub addresses: Vec<Addresses>,
}

/// Reads the record for the log start `first_index` from the data directory `dir`; `None` when
/// the log was never trimmed or restarted. The file keeps one or two records: a trim or restart
/// writes the old and the new start, changes the WAL, then writes only the new one, so a crash
/// at any point leaves a record that matches the WAL's first index (docs/node-format.md).
pub fn read_log_start(
    dir: &dyn Storage,
    first_index: LogIndex,
) -> anyhow::Result<Option<StartRecord>> {
    load_log_start(dir, first_index)?.map_err(|damage| anyhow::anyhow!(damage))
}

/// Like [`read_log_start`], telling the two failures apart: the outer error is one reading the
/// file (no reason to discard anything), the inner one damage to what it holds.
pub fn load_log_start(
    dir: &dyn Storage,
    first_index: LogIndex,
) -> anyhow::Result<Result<Option<StartRecord>, String>> {
    let Some(bytes) = read_small_file(dir, LOG_START_FILE, LOG_START_BYTES_MAX)? else {
        return Ok(Ok(None));
    };
    let damaged = |why: &str| format!("{LOG_START_FILE} is damaged: {why}");
    let records = match decode_log_start(&bytes) {
        Ok(records) => records,
        Err(why) => return Ok(Err(damaged(why))),
    };
    if let Some(r) = records.into_iter().find(|r| r.first_index == first_index) {
        return Ok(Ok(Some(r)));
    }
    if first_index == LogIndex(1) {
        return Ok(Ok(None));
    }
    Ok(Err(damaged(&format!("no record for the log start {first_index}"))))
}

/// The largest log-start file this node reads: two records of a membership and addresses.
const LOG_START_BYTES_MAX: u64 = 16 << 20;

fn decode_log_start(bytes: &[u8]) -> Result<Vec<StartRecord>, &'static str> {
    if bytes.len() < 8 {
        return Err("too short");
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err("checksum mismatch");
    }
    let mut at = 0;
    let mut take = |n: usize| -> Result<&[u8], &'static str> {
        let s = body.get(at..at + n).ok_or("truncated")?;
        at += n;
        Ok(s)
    };
    let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let count = u32_of(take(4)?);
    let mut out = Vec::new();
    for _ in 0..count.min(2) {
        let first_index = LogIndex(u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")));
        let len = u32_of(take(4)?) as usize;
        let membership = Membership::decode(take(len)?).ok_or("bad membership")?;
        let n = u32_of(take(4)?);
        let mut addresses = Vec::new();
        for _ in 0..n {
            let len = u32_of(take(4)?) as usize;
            let raw = Bytes::copy_from_slice(take(len)?);
            match envelope::decode(&raw) {
                Ok(Payload::Address(a)) => addresses.push(a),
                _ => return Err("bad address"),
            }
        }
        out.push(StartRecord { first_index, membership, addresses });
    }
    Ok(out)
}

fn encode_log_start(records: &[StartRecord]) -> Vec<u8> {
    let mut bytes = (records.len() as u32).to_le_bytes().to_vec();
    for r in records {
        let m = r.membership.encode();
        bytes.extend_from_slice(&r.first_index.0.to_le_bytes());
        bytes.extend_from_slice(&(m.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&m);
        bytes.extend_from_slice(&(r.addresses.len() as u32).to_le_bytes());
        for a in &r.addresses {
            let e = envelope::encode_address(a);
            bytes.extend_from_slice(&(e.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&e);
        }
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// The file (in the node's data directory) that keeps the repair floor while a repair from
/// peers is under way (docs/reliability.md).
pub const REPAIR_FLOOR_FILE: &str = "repair-floor";

/// Reads the repair floor: `None` when no repair is under way.
pub fn read_repair_floor(dir: &dyn Storage) -> anyhow::Result<Option<(LogIndex, Term)>> {
    let Some(bytes) = read_small_file(dir, REPAIR_FLOOR_FILE, 64)? else { return Ok(None) };
    let damaged = |why: &str| {
        anyhow::anyhow!(
            "{REPAIR_FLOOR_FILE} is damaged ({why}): it holds how far this node's log reached \
             before damage cut it, which the node must not forget; remove this node from the \
             cluster, empty its data directory and add it again"
        )
    };
    if bytes.len() != 20 {
        return Err(damaged("wrong size"));
    }
    let (body, crc) = bytes.split_at(16);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(damaged("checksum mismatch"));
    }
    let word = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    Ok(Some((LogIndex(word(0)), Term(word(8)))))
}

/// Writes the repair floor atomically and durably, keeping the higher of it and one already
/// written (two repairs before the first completed keep the further reach).
pub fn raise_repair_floor(dir: &dyn Storage, floor: (LogIndex, Term)) -> std::io::Result<()> {
    let old = read_repair_floor(dir).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    let floor = match old {
        Some((index, term)) if (term, index) >= (floor.1, floor.0) => (index, term),
        _ => floor,
    };
    let mut bytes = floor.0.0.to_le_bytes().to_vec();
    bytes.extend_from_slice(&floor.1.0.to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    replace_file(dir, REPAIR_FLOOR_FILE, &bytes)
}

/// Removes the repair floor once the log is back at it (durably).
pub fn clear_repair_floor(dir: &dyn Storage) -> std::io::Result<()> {
    remove_small_file(dir, REPAIR_FLOOR_FILE)
}

/// The file (in the node's data directory) that keeps the stream state's checkpoint, or the
/// mark that it is missing (docs/node-format.md).
pub const STREAMS_FILE: &str = "streams";

const STREAMS_MAGIC: &[u8; 8] = b"RWSTRM01";
/// A checkpoint larger than this is damage, not a state this node wrote; a peer's state larger
/// than this is refused too.
pub const STREAMS_BYTES_MAX: u64 = 4 << 30;

/// Reads the stream checkpoint. A damaged one is reported as one (the node then fetches a
/// peer's state rather than refusing to start).
pub fn read_streams(dir: &dyn Storage) -> anyhow::Result<crate::core::StreamsCheckpoint> {
    use crate::core::StreamsCheckpoint;
    let Some(bytes) = read_small_file(dir, STREAMS_FILE, STREAMS_BYTES_MAX)? else {
        return Ok(StreamsCheckpoint::None);
    };
    let damaged = |why: &str| anyhow::anyhow!("{STREAMS_FILE} is damaged ({why})");
    if bytes.len() < 8 + 1 + 8 + 4 || &bytes[..8] != STREAMS_MAGIC {
        return Err(damaged("not a stream checkpoint"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(damaged("checksum mismatch"));
    }
    let at = LogIndex(u64::from_le_bytes(body[9..17].try_into().expect("8 bytes")));
    match body[8] {
        0 => Ok(StreamsCheckpoint::Missing),
        1 => Ok(StreamsCheckpoint::At { at, state: bytes::Bytes::copy_from_slice(&body[17..]) }),
        _ => Err(damaged("unknown kind")),
    }
}

/// Writes the stream state applied to `at` (`None`: the mark that it is missing) atomically
/// and durably.
pub fn write_streams(dir: &dyn Storage, at: LogIndex, state: Option<&[u8]>) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(8 + 1 + 8 + state.map_or(0, <[u8]>::len) + 4);
    bytes.extend_from_slice(STREAMS_MAGIC);
    bytes.push(u8::from(state.is_some()));
    bytes.extend_from_slice(&at.0.to_le_bytes());
    bytes.extend_from_slice(state.unwrap_or_default());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    replace_file(dir, STREAMS_FILE, &bytes)
}

/// Removes the small file `name` from `dir` durably; one already gone is no error.
pub fn remove_small_file(dir: &dyn Storage, name: &str) -> std::io::Result<()> {
    match dir.remove(name) {
        Ok(()) => dir.sync_dir(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes the records atomically and durably (see [`replace_file`]).
pub fn write_log_start(dir: &dyn Storage, records: &[StartRecord]) -> std::io::Result<()> {
    replace_file(dir, LOG_START_FILE, &encode_log_start(records))
}

/// Replaces the small file `name` in `dir` atomically and durably: `name.tmp` written and
/// synced, renamed over `name`, the directory synced. A crash leaves the old file or the new.
pub fn replace_file(dir: &dyn Storage, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = format!("{name}.tmp");
    match dir.remove(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let file = dir.create(&tmp)?;
    file.write_at(bytes, 0)?;
    file.sync_data()?;
    dir.rename(&tmp, name)?;
    dir.sync_dir()
}

/// The bytes of the small file `name` in `dir`, or `None` when there is none. A file larger
/// than `bytes_max` is refused as damage rather than read.
pub fn read_small_file(
    dir: &dyn Storage,
    name: &str,
    bytes_max: u64,
) -> anyhow::Result<Option<Vec<u8>>> {
    let file = match dir.open(name) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::anyhow!("cannot open {name}: {e}")),
    };
    let len = file.size().map_err(|e| anyhow::anyhow!("cannot read {name}: {e}"))?;
    if len > bytes_max {
        anyhow::bail!("{name} is damaged: larger than any this node writes");
    }
    let mut bytes = vec![0u8; len as usize];
    let read =
        file.read_at(&mut bytes, 0).map_err(|e| anyhow::anyhow!("cannot read {name}: {e}"))?;
    bytes.truncate(read);
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftwal_consensus::NodeId;

    #[test]
    fn the_record_matching_the_first_index_is_read_back_and_damage_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = raftwal_wal::storage::FsStorage::new(tmp.path()).expect("dir");
        assert_eq!(read_log_start(&dir, LogIndex(1)).expect("absent"), None);
        let a = Addresses {
            id: NodeId(4),
            peer: "127.0.0.1:9".parse().expect("addr"),
            api: "h:1".into(),
        };
        let old = StartRecord {
            first_index: LogIndex(1),
            membership: Membership::new([NodeId(1)]),
            addresses: vec![],
        };
        let new = StartRecord {
            first_index: LogIndex(50),
            membership: Membership::new([NodeId(1), NodeId(4)]),
            addresses: vec![a],
        };
        write_log_start(&dir, &[old.clone(), new.clone()]).expect("write");
        assert_eq!(read_log_start(&dir, LogIndex(1)).expect("read"), Some(old));
        assert_eq!(read_log_start(&dir, LogIndex(50)).expect("read"), Some(new.clone()));
        assert!(read_log_start(&dir, LogIndex(7)).is_err(), "no record for that start");
        write_log_start(&dir, std::slice::from_ref(&new)).expect("write again over it");
        let path = tmp.path().join(LOG_START_FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[6] ^= 1;
        std::fs::write(&path, bytes).expect("write");
        let err = read_log_start(&dir, LogIndex(50)).expect_err("damaged");
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
