//! The WAL as consensus's log store, and the node's on-disk layout around it.
//!
//! A WAL payload is the entry kind (one byte) followed by the entry data. Entries handed to
//! consensus share the WAL's memory map: no copy.
//!
//! Layout of a node's data directory:
//! ```text
//! wal/         the raftwal-wal log and hard state
//! log-start    the membership as of the WAL's first index - 1 (after a trim), checksummed
//! ```

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use raftwal_consensus::{
    Entry, EntryKind, LogIndex, LogStart, LogStore, Membership, StoreError, Term,
};
use raftwal_wal::{Record, Wal};

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

/// Entry bytes as the WAL stores them.
pub fn wal_payload(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + entry.data.len());
    out.push(entry.kind as u8);
    out.extend_from_slice(&entry.data);
    out
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

/// The file that keeps the membership as of the log start.
pub fn log_start_path(data_dir: &Path) -> PathBuf {
    data_dir.join("log-start")
}

/// Reads the membership as of the log start `first_index`; `None` when the log was never
/// trimmed. The file keeps one or two (first index, membership) pairs: a trim writes the old and
/// the new start, compacts the WAL, then writes only the new one, so a crash at any point leaves
/// a pair that matches the WAL's first index.
pub fn read_log_start(
    data_dir: &Path,
    first_index: LogIndex,
) -> anyhow::Result<Option<Membership>> {
    let path = log_start_path(data_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    };
    let damaged = |why: &str| anyhow::anyhow!("{} is damaged: {why}", path.display());
    if bytes.len() < 8 {
        return Err(damaged("too short"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(damaged("checksum mismatch"));
    }
    let count = u32::from_le_bytes(body[..4].try_into().expect("4 bytes"));
    let mut at = 4;
    for _ in 0..count {
        if body.len() < at + 12 {
            return Err(damaged("truncated"));
        }
        let first = LogIndex(u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes")));
        let len = u32::from_le_bytes(body[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
        at += 12;
        let m = body.get(at..at + len).ok_or_else(|| damaged("truncated"))?;
        at += len;
        if first == first_index {
            return Membership::decode(m).map(Some).ok_or_else(|| damaged("bad membership"));
        }
    }
    if first_index == LogIndex(1) {
        return Ok(None);
    }
    Err(damaged(&format!("no membership for the log start {first_index}")))
}

/// Writes the (first index, membership) pairs, atomically and durably (write, sync, rename,
/// sync the directory).
pub fn write_log_start(data_dir: &Path, starts: &[(LogIndex, Membership)]) -> std::io::Result<()> {
    let mut bytes = (starts.len() as u32).to_le_bytes().to_vec();
    for (first, m) in starts {
        let m = m.encode();
        bytes.extend_from_slice(&first.0.to_le_bytes());
        bytes.extend_from_slice(&(m.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&m);
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let tmp = data_dir.join("log-start.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, log_start_path(data_dir))?;
    std::fs::File::open(data_dir)?.sync_all()
}
