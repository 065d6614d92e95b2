//! Opening a WAL directory: read the hard state, scan every segment, tell a torn tail from
//! corruption, and rebuild the index. docs/wal-format.md gives the algorithm and the crash
//! argument; this file follows it step by step.
//!
//! Recovery writes nothing but deletions of files it has proven obsolete (and, on a fresh
//! directory, the hard-state file), so a crash during recovery leaves a state that recovers to
//! the same log.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{
    FRAME_ALIGN, FRAME_HEADER_BYTES, FrameHeader, META_SLOT_BYTES, META_SLOT_STRIDE, MetaSlot,
    SEGMENT_HEADER_BYTES, SegmentHeader,
};
use crate::prepare::{PREP_PREFIX, PREP_SUFFIX};
use crate::segment::{LogView, SegmentIndex, parse_segment_name};
use crate::storage::{Storage, StorageFile};
use crate::types::{HardState, LogIndex, Term};

pub(crate) const META_FILE: &str = "meta";
pub(crate) const META_TMP_FILE: &str = "meta.tmp";

/// A tail cut at recovery: damage after which only frames of the same, unsynced write group
/// (or nothing) follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Segment file name.
    pub segment: String,
    /// Offset of the first byte discarded.
    pub offset: u64,
    /// What was found there.
    pub reason: String,
}

/// What `open` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    /// First readable index.
    pub first_index: LogIndex,
    /// Last durable index (`first_index - 1` when the log is empty).
    pub last_index: LogIndex,
    /// The recovered hard state.
    pub hard_state: HardState,
    /// The torn tail that was cut, if there was one.
    pub torn_tail: Option<TornTail>,
    /// Segment files in use.
    pub segments: usize,
    /// Files removed as obsolete (superseded, compacted, discarded by a restart, the segment of
    /// an unfinished restart, or a segment whose creation was torn).
    pub removed: Vec<String>,
}

/// Damage that [`crate::Wal::open_salvaging`] cut the log at instead of refusing to open: the
/// log keeps every entry before `kept_last + 1` and drops the rest, for the caller to fetch
/// again from peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Salvage {
    /// The damaged file.
    pub segment: String,
    /// Offset of the damage in it.
    pub offset: u64,
    /// What was found there.
    pub reason: String,
    /// The last index kept (`first_index - 1` when nothing is).
    pub kept_last: LogIndex,
    /// The highest (index, term) of any frame whose header still verifies at or after the
    /// damage, in the damaged segment or any later one: how far this log reached before the
    /// cut, as far as the disk still shows. `None` when no such frame is left.
    pub seen_last: Option<(LogIndex, Term)>,
    /// Segments dropped whole because they lie past the damage.
    pub dropped: Vec<String>,
}

/// Called with the salvage before recovery deletes or cuts anything, so the caller can first
/// make durable what it must remember about the dropped entries. An error stops the open.
pub type SalvageHook<'a> = &'a mut dyn FnMut(&Salvage) -> std::io::Result<()>;

pub(crate) struct Recovered {
    pub(crate) view: LogView,
    pub(crate) meta: MetaSlot,
    pub(crate) meta_file: Arc<dyn StorageFile>,
    /// Where the last segment can take more frames, if it ended cleanly.
    pub(crate) append_at: Option<u64>,
    pub(crate) next_segment_id: u64,
    /// `header_crc` of the last entry (0 when unknown).
    pub(crate) last_crc: u32,
    pub(crate) report: RecoveryReport,
    /// The damage the log was cut at, when salvaging.
    pub(crate) salvage: Option<Salvage>,
}

fn corrupt(segment: &str, offset: u64, reason: impl Into<String>) -> Error {
    Error::Corrupt { segment: segment.to_string(), offset, reason: reason.into() }
}

/// A salt no client can predict: std's hasher keys come from the operating system's random
/// source, and this needs no cryptographic strength, only secrecy from the clients.
fn random_salt() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    (h.finish() >> 16) as u32
}

/// Reads the hard-state file, creating it in a fresh directory.
fn recover_meta(
    storage: &dyn Storage,
    names: &[String],
    has_segments: bool,
    removed: &mut Vec<String>,
) -> Result<(MetaSlot, Arc<dyn StorageFile>)> {
    if names.iter().any(|n| n == META_TMP_FILE) {
        // A creation that did not reach its rename; the real file, if any, is intact.
        storage.remove(META_TMP_FILE).map_err(Error::io("remove meta.tmp"))?;
        storage.sync_dir().map_err(Error::io("sync dir"))?;
        removed.push(META_TMP_FILE.into());
    }
    if !names.iter().any(|n| n == META_FILE) {
        if has_segments {
            return Err(corrupt(META_FILE, 0, "hard-state file missing while segments exist"));
        }
        let slot = MetaSlot {
            seq: 1,
            first_index: LogIndex(1),
            salt: random_salt(),
            ..MetaSlot::default()
        };
        let tmp = storage.create(META_TMP_FILE).map_err(Error::io("create meta"))?;
        let mut bytes = vec![0u8; 2 * META_SLOT_STRIDE as usize];
        // Slot `seq % 2`, as every later save does, so the next save goes to the other slot.
        let at = slot.file_offset() as usize;
        bytes[at..at + META_SLOT_BYTES].copy_from_slice(&slot.encode());
        tmp.write_at(&bytes, 0).map_err(Error::io("write meta"))?;
        tmp.sync_data().map_err(Error::io("sync meta"))?;
        storage.rename(META_TMP_FILE, META_FILE).map_err(Error::io("rename meta"))?;
        storage.sync_dir().map_err(Error::io("sync dir"))?;
        let file = storage.open(META_FILE).map_err(Error::io("open meta"))?;
        return Ok((slot, file));
    }
    let file = storage.open(META_FILE).map_err(Error::io("open meta"))?;
    let mut bytes = vec![0u8; 2 * META_SLOT_STRIDE as usize];
    file.read_at(&mut bytes, 0).map_err(Error::io("read meta"))?;
    let slots = [0u64, 1].map(|i| {
        let at = (i * META_SLOT_STRIDE) as usize;
        MetaSlot::decode(&bytes[at..at + META_SLOT_BYTES])
    });
    let best = slots.into_iter().flatten().max_by_key(|s| s.seq);
    match best {
        Some(slot) if slot.first_index.get() >= 1 => Ok((slot, file)),
        Some(_) => Err(corrupt(META_FILE, 0, "hard-state slot with first index 0")),
        None => Err(corrupt(META_FILE, 0, "neither hard-state slot verifies")),
    }
}

/// The result of scanning one segment's frames front to back.
struct Scan {
    offsets: Vec<u32>,
    last_term: Term,
    last_crc: u32,
    /// Offset just past the last valid frame.
    end: u64,
    /// Set when the scan stopped on something other than zeros to the end of the segment.
    damage: Option<(u64, String)>,
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Scans frames from the segment header on. `prev` is the (crc, term) of the entry before
/// `first_index`, when the log holds it.
fn scan_segment(bytes: &[u8], first_index: LogIndex, prev: Option<(u32, Term)>, salt: u32) -> Scan {
    // Segments are at most 4 GiB (`Options::validate`); a larger file on disk is looked at
    // only that far, so every frame offset fits the index's u32.
    let bytes = &bytes[..bytes.len().min(u32::MAX as usize)];
    let mut scan = Scan {
        offsets: Vec::new(),
        last_term: prev.map_or(Term(0), |p| p.1),
        last_crc: prev.map_or(0, |p| p.0),
        end: SEGMENT_HEADER_BYTES,
        damage: None,
    };
    let mut chain_known = prev.is_some();
    let mut pos = SEGMENT_HEADER_BYTES as usize;
    loop {
        let expected = LogIndex(first_index.get().saturating_add(scan.offsets.len() as u64));
        let rest = &bytes[pos.min(bytes.len())..];
        if rest.len() < FRAME_HEADER_BYTES as usize {
            if !all_zero(rest) {
                scan.damage = Some((pos as u64, "partial frame header at end of segment".into()));
            }
            return scan;
        }
        let reason = match FrameHeader::decode(rest, salt) {
            None if all_zero(rest) => return scan,
            None => "frame header checksum mismatch or frame overruns the segment".to_string(),
            Some(h) if h.index != expected => {
                format!("frame holds index {} where index {expected} belongs", h.index)
            }
            Some(h) if chain_known && h.prev_crc != scan.last_crc => {
                format!("chain broken at index {expected}: previous-frame checksum differs")
            }
            Some(h) if h.term < scan.last_term => {
                format!("term regresses at index {expected}")
            }
            Some(h) if !h.verify_body(rest) => {
                format!("payload checksum mismatch at index {expected}")
            }
            Some(h) => {
                scan.offsets.push(u32::try_from(pos).expect("segments are below 4 GiB"));
                scan.last_term = h.term;
                scan.last_crc = h.header_crc;
                chain_known = true;
                pos += h.frame_bytes() as usize;
                scan.end = pos as u64;
                continue;
            }
        };
        scan.damage = Some((pos as u64, reason));
        return scan;
    }
}

/// Looks past damage at `from` (where index `damaged_index` belonged) for a valid frame of a
/// later write group. Such a frame was written only after the damaged group's sync returned,
/// so the damage hit synced data: corruption. Frames of the damaged group itself prove nothing:
/// an unsynced group may reach the disk in any order of blocks.
fn later_group_after(bytes: &[u8], from: u64, damaged_index: LogIndex, salt: u32) -> Option<u64> {
    let mut pos = from as usize + FRAME_ALIGN as usize;
    while pos + FRAME_HEADER_BYTES as usize <= bytes.len() {
        let rest = &bytes[pos..];
        if !all_zero(&rest[..FRAME_HEADER_BYTES as usize])
            && let Some(h) = FrameHeader::decode(rest, salt)
            && h.group_first_index > damaged_index
            && h.verify_body(rest)
        {
            return Some(pos as u64);
        }
        pos += FRAME_ALIGN as usize;
    }
    None
}

/// The highest (index, term), by term then index, of any frame header that verifies at an
/// aligned offset from
/// `from` on. A header carries its own checksum, salted with this WAL's secret, so a match in
/// damaged or stale bytes is as unlikely as a checksum collision.
fn highest_frame(bytes: &[u8], from: u64, salt: u32) -> Option<(LogIndex, Term)> {
    let mut best: Option<(LogIndex, Term)> = None;
    let mut pos = from as usize;
    while pos + FRAME_HEADER_BYTES as usize <= bytes.len() {
        let rest = &bytes[pos..];
        if !all_zero(&rest[..FRAME_HEADER_BYTES as usize])
            && let Some(h) = FrameHeader::decode(rest, salt)
            && best.is_none_or(|(i, t)| (h.term, h.index) > (t, i))
        {
            best = Some((h.index, h.term));
        }
        pos += FRAME_ALIGN as usize;
    }
    best
}

/// The highest (index, term), by term then index, of the frames in a dropped segment: its
/// frames are followed in order while they chain (the last one is the highest), and only past
/// damage, or in a segment whose header is damaged, is every aligned offset looked at.
fn reach_of(bytes: &[u8], salt: u32) -> Option<(LogIndex, Term)> {
    let Ok(header) = SegmentHeader::decode(bytes) else {
        return highest_frame(bytes, SEGMENT_HEADER_BYTES, salt);
    };
    let scan = scan_segment(bytes, header.first_index, None, salt);
    let chained = (!scan.offsets.is_empty()).then(|| {
        (LogIndex(header.first_index.get() + scan.offsets.len() as u64 - 1), scan.last_term)
    });
    let past_damage = scan.damage.and_then(|(at, _)| highest_frame(bytes, at, salt));
    chained.into_iter().chain(past_damage).max_by_key(|&(index, term)| (term, index))
}

/// Deletes `names` from `storage`; one already gone is no error.
fn remove_all(storage: &dyn Storage, names: &[String], op: &'static str) -> Result<()> {
    for name in names {
        match storage.remove(name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::Io { op, source: e }),
        }
    }
    Ok(())
}

/// Where salvage cuts: the damage found first, in log order.
struct Cut {
    segment: String,
    offset: u64,
    reason: String,
    /// Offset in the cut segment from which frames are no longer trusted, when the cut segment
    /// stays (its frames before the damage are kept).
    scan_from: Option<u64>,
}

struct Opened {
    id: u64,
    name: String,
    file: Arc<dyn StorageFile>,
    map: Arc<dyn crate::storage::Mapping>,
}

/// Recovers the log in `storage`. With `salvage`, damage in a segment cuts the log just before
/// it (see [`Salvage`]) instead of failing the open; damage to the hard state, or segments that
/// disagree with it, fail it either way.
pub(crate) fn recover(
    storage: &dyn Storage,
    mut salvage: Option<SalvageHook<'_>>,
) -> Result<Recovered> {
    let salvaging = salvage.is_some();
    // The first damage in log order, and the segments past it.
    let mut cut: Option<Cut> = None;
    let mut dropped: Vec<Opened> = Vec::new();
    let names = storage.list().map_err(Error::io("list dir"))?;
    let mut removed = Vec::new();
    let mut seg_ids: Vec<(u64, String)> =
        names.iter().filter_map(|n| parse_segment_name(n).map(|id| (id, n.clone()))).collect();
    seg_ids.sort();
    let (mut meta, meta_file) = recover_meta(storage, &names, !seg_ids.is_empty(), &mut removed)?;
    // Prepared segments that were never renamed into place hold no frames.
    let unused: Vec<&String> =
        names.iter().filter(|n| n.starts_with(PREP_PREFIX) && n.ends_with(PREP_SUFFIX)).collect();
    for name in &unused {
        storage.remove(name).map_err(Error::io("remove unused prepared segment"))?;
        removed.push((*name).clone());
    }
    if !unused.is_empty() {
        storage.sync_dir().map_err(Error::io("sync dir"))?;
    }

    let mut opened = Vec::with_capacity(seg_ids.len());
    for (id, name) in &seg_ids {
        let file = storage.open(name).map_err(Error::io("open segment"))?;
        let map = file.map().map_err(Error::io("map segment"))?;
        opened.push(Opened { id: *id, name: name.clone(), file, map });
    }

    // A last segment whose header never became durable is a creation torn by a crash, provided
    // no frame was ever written behind it.
    if let Some(last) = opened.last()
        && let Err(reason) = SegmentHeader::decode(last.map.bytes())
    {
        if later_group_after(
            last.map.bytes(),
            SEGMENT_HEADER_BYTES - FRAME_ALIGN,
            LogIndex(0),
            meta.salt,
        )
        .is_some()
        {
            if !salvaging {
                return Err(corrupt(&last.name, 0, reason));
            }
            let last = opened.pop().expect("checked non-empty");
            cut = Some(Cut { segment: last.name.clone(), offset: 0, reason, scan_from: None });
            dropped.push(last);
        } else {
            let last = opened.pop().expect("checked non-empty");
            storage.remove(&last.name).map_err(Error::io("remove torn segment"))?;
            storage.sync_dir().map_err(Error::io("sync dir"))?;
            removed.push(last.name);
        }
    }

    // Decode every header up front. A segment wholly superseded by a later one (a later
    // segment starts at or below its first index) is obsolete whatever it holds: a truncation
    // removes several such segments and a crash may keep any subset of those removals.
    let mut headers = Vec::with_capacity(opened.len());
    let mut bad_header = None;
    for (i, seg) in opened.iter().enumerate() {
        let reason = match SegmentHeader::decode(seg.map.bytes()) {
            Ok(h) if h.segment_id == seg.id => {
                headers.push(h);
                continue;
            }
            Ok(_) => "segment header names another segment id".to_string(),
            Err(r) => r,
        };
        if !salvaging {
            return Err(corrupt(&seg.name, 0, reason));
        }
        cut = Some(Cut { segment: seg.name.clone(), offset: 0, reason, scan_from: None });
        bad_header = Some(i);
        break;
    }
    if let Some(i) = bad_header {
        dropped.extend(opened.drain(i..));
    }
    let mut obsolete: Vec<String> = Vec::new();

    // Restarts. A restart segment whose committing hard-state slot is not durable is an
    // unfinished restart: obsolete. Nothing is written behind it before that slot is, so it
    // can only be the last segment. The last committed restart segment makes every segment
    // before it obsolete, whatever those hold.
    if let Some(mark) = headers.last().and_then(|h| h.restart)
        && mark.commit_seq > meta.seq
    {
        headers.pop();
        obsolete.push(opened.pop().expect("as many segments as headers").name);
    }
    if let Some(at) = headers.iter().rposition(|h| h.restart.is_some()) {
        let (seg, header) = (&opened[at], headers[at]);
        let mark = header.restart.expect("found by its mark");
        if mark.commit_seq > meta.seq {
            return Err(corrupt(
                &seg.name,
                0,
                format!(
                    "restart segment followed by other segments, but its hard-state slot {} \
                     is not durable (the hard state is at {})",
                    mark.commit_seq, meta.seq
                ),
            ));
        }
        // The committing slot holds this restart's start; later slots keep it or compact past
        // it. Anything else means the hard state and the segments disagree.
        if meta.first_index < header.first_index
            || (meta.first_index == header.first_index && meta.first_prev_term != mark.prev_term)
        {
            return Err(corrupt(
                META_FILE,
                0,
                format!(
                    "hard state starts the log at {} (term {} before it) but restart segment \
                     {} restarted it at {} (term {} before it)",
                    meta.first_index,
                    meta.first_prev_term,
                    seg.name,
                    header.first_index,
                    mark.prev_term
                ),
            ));
        }
        headers.drain(..at);
        obsolete.extend(opened.drain(..at).map(|s| s.name));
    }

    let mut later_min = LogIndex(u64::MAX);
    let mut superseded = vec![false; opened.len()];
    for i in (0..opened.len()).rev() {
        superseded[i] = later_min <= headers[i].first_index;
        later_min = later_min.min(headers[i].first_index);
    }
    let mut kept = Vec::with_capacity(opened.len());
    for ((seg, header), gone) in opened.into_iter().zip(headers).zip(superseded) {
        if gone {
            obsolete.push(seg.name);
        } else {
            kept.push((seg, header));
        }
    }

    // Likewise, segments wholly below the first index were compacted (any subset of their
    // removals may have been lost); never the last one.
    let compacted = kept.windows(2).take_while(|w| w[1].1.first_index <= meta.first_index).count();
    obsolete.extend(kept.drain(..compacted).map(|(seg, _)| seg.name));

    let mut view = LogView {
        first_index: meta.first_index,
        first_prev_term: meta.first_prev_term,
        last_index: meta.first_index.prev(),
        last_term: meta.first_prev_term,
        segments: Vec::new(),
        salt: meta.salt,
    };
    let mut torn_tail = None;
    let mut append_at = None;
    // Damage inside a sealed segment. It is corruption unless a later segment supersedes the
    // index it hit: (segment, offset, index it hit, reason).
    let mut pending_damage: Option<(String, u64, LogIndex, String)> = None;
    let count = kept.len();
    let mut kept = kept.into_iter().enumerate();
    while let Some((i, (seg, header))) = kept.next() {
        let is_last = i + 1 == count;
        let first = header.first_index;
        if let Some((name, offset, index, reason)) = pending_damage.take()
            && index < first
        {
            if !salvaging {
                return Err(corrupt(&name, offset, reason));
            }
            // The damaged segment stays, holding the entries before the damage.
            cut = Some(Cut { segment: name, offset, reason, scan_from: Some(offset) });
            dropped.push(seg);
            dropped.extend(kept.map(|(_, (seg, _))| seg));
            break;
        }
        if !view.segments.is_empty() && first > view.last_index.next() {
            let reason = format!(
                "segment starts at {first} but the log before it ends at {}",
                view.last_index
            );
            if !salvaging {
                return Err(corrupt(&seg.name, 0, reason));
            }
            cut = Some(Cut { segment: seg.name.clone(), offset: 0, reason, scan_from: None });
            dropped.push(seg);
            dropped.extend(kept.map(|(_, (seg, _))| seg));
            break;
        }
        // Entries from `first` on in earlier segments are superseded by this one: this is how
        // a suffix truncation was made durable.
        for s in view.segments.iter_mut() {
            if s.end_index() > first {
                let keep = first.get().saturating_sub(s.first_index.get());
                s.offsets.truncate(usize::try_from(keep).expect("fits: below offsets.len()"));
            }
        }
        view.segments.retain(|s| {
            let superseded = s.first_index >= first;
            if superseded {
                obsolete.push(s.name.clone());
            }
            !superseded
        });
        let prev = view.link(first.prev())?;
        let scan = scan_segment(seg.map.bytes(), first, prev, meta.salt);
        let seg_end = LogIndex(first.get().saturating_add(scan.offsets.len() as u64));
        view.last_index = seg_end.prev();
        view.last_term = if scan.offsets.is_empty() {
            prev.map_or(view.first_prev_term, |p| p.1)
        } else {
            scan.last_term
        };
        match scan.damage {
            None if is_last => append_at = Some(scan.end),
            None => {}
            Some((offset, reason)) if is_last => {
                if let Some(at) = later_group_after(seg.map.bytes(), offset, seg_end, meta.salt) {
                    let reason =
                        format!("{reason}; a frame of a later write group follows at offset {at}");
                    if !salvaging {
                        return Err(corrupt(&seg.name, offset, reason));
                    }
                    cut = Some(Cut {
                        segment: seg.name.clone(),
                        offset,
                        reason,
                        scan_from: Some(offset),
                    });
                } else {
                    torn_tail = Some(TornTail { segment: seg.name.clone(), offset, reason });
                }
            }
            Some((offset, reason)) => {
                pending_damage = Some((seg.name.clone(), offset, seg_end, reason));
            }
        }
        view.segments.push(SegmentIndex {
            id: seg.id,
            name: seg.name,
            first_index: first,
            file: seg.file,
            map: seg.map,
            offsets: scan.offsets,
        });
    }

    // The segments must hold every index from the first readable one to the last.
    match view.segments.first() {
        None => {
            view.last_index = view.first_index.prev();
            view.last_term = view.first_prev_term;
        }
        Some(s) if s.first_index > view.first_index => {
            return Err(corrupt(
                &s.name,
                0,
                format!(
                    "log starts at {} but the hard state says {}",
                    s.first_index, view.first_index
                ),
            ));
        }
        Some(_) if view.last_index.next() < view.first_index => {
            return Err(corrupt(
                META_FILE,
                0,
                format!(
                    "log ends at {} below its first index {}",
                    view.last_index, view.first_index
                ),
            ));
        }
        Some(_) if view.last_index.next() == view.first_index => {
            view.last_term = view.first_prev_term;
        }
        Some(_) => {}
    }
    // Salvage: say what is dropped before anything is deleted, so the caller can remember it.
    let salvaged = match (cut, salvage.as_mut()) {
        (None, _) => None,
        (Some(cut), None) => return Err(corrupt(&cut.segment, cut.offset, cut.reason)),
        (Some(cut), Some(hook)) => {
            let in_cut = cut.scan_from.and_then(|from| {
                let seg = view.segments.iter().find(|s| s.name == cut.segment)?;
                highest_frame(seg.map.bytes(), from, meta.salt)
            });
            // By (term, index), as votes compare logs: a stale frame a truncation left behind
            // may carry a higher index with a lower term.
            let seen_last = dropped
                .iter()
                .filter_map(|d| reach_of(d.map.bytes(), meta.salt))
                .chain(in_cut)
                .max_by_key(|&(index, term)| (term, index));
            let s = Salvage {
                segment: cut.segment,
                offset: cut.offset,
                reason: cut.reason,
                kept_last: view.last_index,
                seen_last,
                dropped: dropped.iter().map(|d| d.name.clone()).collect(),
            };
            hook(&s).map_err(Error::io("keep what salvage drops"))?;
            Some(s)
        }
    };
    // After a process crash (no power loss) the bytes read above may sit only in the page
    // cache: a hard-state save or a group whose sync never ran, a segment whose name was never
    // synced. Make everything recovery trusts durable before anyone acts on it; otherwise a
    // later power loss could take back a vote this node has already honoured. This comes
    // before the deletions below: each is justified by a hard-state slot (compaction, restart)
    // or a segment header (truncation) read here, and must not outlive it in a power loss.
    meta_file.sync_data().map_err(Error::io("fdatasync hard state"))?;
    for seg in &view.segments {
        seg.file.sync_data().map_err(Error::io("fdatasync segment"))?;
    }
    storage.sync_dir().map_err(Error::io("sync dir"))?;
    // In id order (names sort by id): a segment that justifies deleting earlier ones is never
    // deleted before them.
    obsolete.sort();
    remove_all(storage, &obsolete, "remove obsolete segment")?;
    // Durable before anyone writes: the first hard-state save after this takes the very `seq`
    // an unfinished restart segment names as its commit, so that segment must never come back.
    if !obsolete.is_empty() {
        storage.sync_dir().map_err(Error::io("sync dir after removing obsolete segments"))?;
    }
    removed.extend(obsolete);
    if salvaged.is_some() {
        // The saved commit index comes down to the kept log before the dropped segments go,
        // so a crash between leaves either the same damage to cut again or a consistent log.
        // (Not before the deletions above: a slot written earlier could take the sequence
        // number an unfinished restart segment names.)
        if meta.hard_state.commit > view.last_index {
            let mut slot = meta;
            slot.seq += 1;
            slot.hard_state.commit = view.last_index;
            meta_file
                .write_at(&slot.encode(), slot.file_offset())
                .map_err(Error::io("write hard state"))?;
            meta_file.sync_data().map_err(Error::io("fdatasync hard state"))?;
            meta = slot;
        }
        let names: Vec<String> = dropped.drain(..).map(|d| d.name).collect();
        remove_all(storage, &names, "remove dropped segment")?;
        storage.sync_dir().map_err(Error::io("sync dir after removing dropped segments"))?;
        removed.extend(names);
    }
    let last_crc = view.link(view.last_index)?.map_or(0, |(crc, _)| crc);
    let next_segment_id = seg_ids.last().map_or(1, |(id, _)| id + 1);
    let report = RecoveryReport {
        first_index: view.first_index,
        last_index: view.last_index,
        hard_state: meta.hard_state,
        torn_tail,
        segments: view.segments.len(),
        removed,
    };
    Ok(Recovered {
        view,
        meta,
        meta_file,
        append_at,
        next_segment_id,
        last_crc,
        report,
        salvage: salvaged,
    })
}
