//! Named streams as replicated state: every stream's life (create, append, close, delete,
//! fork, expiry) is a log command, applied in log order on every node by the one rule written
//! here. Time comes from the leader's timestamp in each command (kept monotonic by the state),
//! never from the applying node's clock, so every node reaches the same state.
//!
//! A stream's position is a byte offset: each message moves it by the message's length, and
//! every message is known by the offset of its end (the stream's tail right after it). A fork
//! shares its source's offsets up to its fork offset and continues from there. Where the bytes
//! of a message live: in the log entry of the command that appended it; each stream keeps an
//! index from its offsets to those entries (`StreamIndex`, 16 bytes per command that appended).
//!
//! Everything a command may be refused for that depends on the state (the stream is missing,
//! closed, another producer epoch, a stale `Stream-Seq`, ...) is decided here, at apply time:
//! two commands proposed together are judged in log order. Syntax (header formats, JSON) is
//! checked before anything is proposed.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use raftwal_consensus::LogIndex;

use crate::envelope::Malformed;

/// The most bytes a stream name may have.
pub const NAME_BYTES_MAX: usize = 1024;
/// Index entries per chunk: a reader's snapshot shares full chunks and copies at most one.
const INDEX_CHUNK: usize = 1024;

/// An idempotent producer's identity and the sequence of one of its writes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProducerTuple {
    /// The producer's id (any non-empty string).
    pub id: String,
    /// Its epoch: a higher epoch fences every lower one.
    pub epoch: u64,
    /// The write's sequence within the epoch, from 0.
    pub seq: u64,
}

/// Where a fork starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForkSpec {
    /// The source stream.
    pub from: String,
    /// The source incarnation the proposer resolved the fork against.
    pub from_incarnation: LogIndex,
    /// The fork offset (the source's tail when none was given).
    pub offset: u64,
    /// Whether the offset was given (it then takes part in the idempotency check).
    pub offset_given: bool,
    /// The sub-offset (0: none). Its prefix is materialized by the proposer as the fork's
    /// first message.
    pub sub_offset: u64,
}

/// A stream's settings as created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateSpec {
    /// The content type as given (or inherited); echoed verbatim.
    pub content_type: String,
    /// Sliding time to live in seconds.
    pub ttl_secs: Option<u64>,
    /// Absolute expiry: the string as given, and in ms since the epoch.
    pub expires_at: Option<(String, u64)>,
    /// Created closed.
    pub closed: bool,
    /// Created as a fork.
    pub fork: Option<ForkSpec>,
}

/// One replicated command on streams. `now_ms` is the leader's wall clock when it proposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Create a stream (or confirm an identical one), with its first messages.
    Create { name: String, now_ms: u64, spec: CreateSpec, messages: Vec<Bytes> },
    /// Append messages (one per write; none for a close alone), perhaps closing the stream.
    Append {
        name: String,
        now_ms: u64,
        /// The media type of the write (checked against the stream's unless closing only).
        content_type: Option<String>,
        messages: Vec<Bytes>,
        close: bool,
        producer: Option<ProducerTuple>,
        /// An opaque, byte-wise increasing writer sequence.
        stream_seq: Option<String>,
        /// The number of messages the stream must hold before this write.
        expected_version: Option<u64>,
    },
    /// Delete a stream (softly, while forks read through it).
    Delete { name: String, now_ms: u64 },
    /// A read refreshed a sliding time to live.
    Touch { name: String, now_ms: u64 },
    /// Remove the stream if it has expired by `now_ms` (the leader's sweep; else nothing).
    Expire { name: String, now_ms: u64 },
}

/// The longest time to live (ten years, in seconds).
pub const TTL_SECS_MAX: u64 = 10 * 366 * 24 * 3600;

/// The longest string field a command may carry besides its messages (content types, producer
/// ids, `Stream-Seq`, expiry strings, a fork's source).
pub const FIELD_BYTES_MAX: usize = 1024;

impl Command {
    /// Whether the command brings new data (a create or an append; a delete, touch or expiry
    /// is small and frees or keeps space). Refused while the disk is low.
    pub fn adds_data(&self) -> bool {
        matches!(self, Command::Create { .. } | Command::Append { .. })
    }

    /// Sets the command's time (the leader stamps it just before proposing).
    pub fn set_now_ms(&mut self, ms: u64) {
        match self {
            Command::Create { now_ms, .. }
            | Command::Append { now_ms, .. }
            | Command::Delete { now_ms, .. }
            | Command::Touch { now_ms, .. }
            | Command::Expire { now_ms, .. } => *now_ms = ms,
        }
    }

    /// Refuses a command no node's API builds: fields over their bounds, or messages that
    /// together exceed `messages_max` bytes (a log entry must hold them). Checked before
    /// anything is proposed, wherever a command comes from.
    pub fn check(&self, messages_max: u64) -> Result<(), String> {
        let field = |what: &str, s: &str| {
            if s.len() > FIELD_BYTES_MAX {
                Err(format!("{what} is over {FIELD_BYTES_MAX} bytes"))
            } else {
                Ok(())
            }
        };
        if self.name().is_empty() || self.name().len() > NAME_BYTES_MAX {
            return Err(format!("a stream name has 1 to {NAME_BYTES_MAX} bytes"));
        }
        let messages = match self {
            Command::Create { spec, messages, .. } => {
                field("the content type", &spec.content_type)?;
                if spec.ttl_secs.is_some_and(|t| t > TTL_SECS_MAX) {
                    return Err(format!("a time to live is at most {TTL_SECS_MAX} s"));
                }
                if let Some((s, _)) = &spec.expires_at {
                    field("the expiry", s)?;
                }
                if let Some(f) = &spec.fork {
                    field("the fork's source", &f.from)?;
                }
                messages
            }
            Command::Append { content_type, producer, stream_seq, messages, .. } => {
                field("the content type", content_type.as_deref().unwrap_or(""))?;
                field("the producer id", producer.as_ref().map_or("", |p| p.id.as_str()))?;
                field("the Stream-Seq", stream_seq.as_deref().unwrap_or(""))?;
                messages
            }
            Command::Delete { .. } | Command::Touch { .. } | Command::Expire { .. } => {
                return Ok(());
            }
        };
        if messages.len() as u64 > crate::envelope::BATCH_RECORDS_MAX {
            return Err(format!(
                "a command carries at most {} messages",
                crate::envelope::BATCH_RECORDS_MAX
            ));
        }
        // Each message takes its bytes and a 4-byte length in the entry.
        let bytes: u64 = messages.iter().map(|m| m.len() as u64 + 4).sum();
        if bytes > messages_max {
            return Err(format!(
                "the messages are over {messages_max} bytes (4 bytes of framing each included)"
            ));
        }
        Ok(())
    }

    /// The stream the command is about.
    pub fn name(&self) -> &str {
        match self {
            Command::Create { name, .. }
            | Command::Append { name, .. }
            | Command::Delete { name, .. }
            | Command::Touch { name, .. }
            | Command::Expire { name, .. } => name,
        }
    }
}

/// What a command did, for its caller. The HTTP API maps each to its status.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StreamOutcome {
    /// A new stream (201).
    Created { tail: u64, content_type: String, closed: bool },
    /// The stream exists with the same settings (200; the body was not appended).
    Exists { tail: u64, content_type: String, closed: bool },
    /// Messages appended, and/or the stream closed.
    Appended { tail: u64, closed: bool, version: u64 },
    /// The producer's write was applied before: nothing appended (204). `last_seq` is the
    /// highest sequence accepted in `epoch`.
    Duplicate { tail: u64, closed: bool, epoch: u64, last_seq: u64 },
    /// Deleted (or soft-deleted while forks read through it).
    Deleted,
    /// A sliding time to live was refreshed.
    Touched,
    /// No such stream (or it expired).
    NotFound,
    /// The stream was deleted while forks still read through it.
    Gone,
    /// The stream is closed: nothing may be appended.
    Closed { tail: u64 },
    /// The request conflicts with the stream's state.
    Conflict(String),
    /// `expected_version` did not match.
    VersionMismatch { version: u64 },
    /// The producer's epoch is older than the stream's for it: fenced.
    StaleEpoch { epoch: u64 },
    /// A sequence gap for the producer.
    SequenceGap { expected: u64, received: u64 },
    /// The request cannot apply (a new epoch must start at sequence 0; a fork offset beyond
    /// the source).
    Invalid(String),
}

/// Where a stream's messages live: for each command that appended, the stream offset after it
/// and its log index. Chunked, so that a reader's snapshot copies at most one chunk.
#[derive(Clone, Debug, Default)]
pub struct StreamIndex {
    chunks: Vec<Arc<Vec<(u64, LogIndex)>>>,
    len: usize,
}

impl StreamIndex {
    fn push(&mut self, end: u64, index: LogIndex) {
        if self.chunks.last().is_none_or(|c| c.len() >= INDEX_CHUNK) {
            self.chunks.push(Arc::new(Vec::with_capacity(INDEX_CHUNK)));
        }
        let last = self.chunks.last_mut().expect("pushed above");
        Arc::make_mut(last).push((end, index));
        self.len += 1;
    }

    fn get(&self, i: usize) -> (u64, LogIndex) {
        self.chunks[i / INDEX_CHUNK][i % INDEX_CHUNK]
    }

    /// The position of the first command whose end is beyond `offset`.
    pub fn first_after(&self, offset: u64) -> usize {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.get(mid).0 <= offset {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Where the messages of the command at log offset `index` lie in the stream (start and
    /// end offsets), if that command appended to it. Log offsets increase along the index.
    pub fn span_of(&self, index: LogIndex, base: u64) -> Option<(u64, u64)> {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.get(mid).1 < index {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == self.len || self.get(lo).1 != index {
            return None;
        }
        let start = if lo == 0 { base } else { self.get(lo - 1).0 };
        Some((start, self.get(lo).0))
    }

    /// The commands from position `from` on, as (start offset, end offset, log index).
    pub fn from(&self, from: usize, base: u64) -> impl Iterator<Item = (u64, u64, LogIndex)> + '_ {
        let mut start = if from == 0 { base } else { self.get(from - 1).0 };
        (from..self.len).map(move |i| {
            let (end, index) = self.get(i);
            let item = (start, end, index);
            start = end;
            item
        })
    }
}

/// What readers see of one stream: a snapshot, published whenever a command changes it.
#[derive(Clone, Debug)]
pub struct StreamView {
    /// The stream's name.
    pub name: String,
    /// The index of the command that created this incarnation.
    pub incarnation: LogIndex,
    /// Its content type, verbatim.
    pub content_type: String,
    /// Sliding time to live, seconds.
    pub ttl_secs: Option<u64>,
    /// Absolute expiry as given, and in ms.
    pub expires_at: Option<(String, u64)>,
    /// The last access a command recorded (leader ms).
    pub last_access_ms: u64,
    /// Closed: nothing more is appended.
    pub closed: bool,
    /// Deleted while forks read through it.
    pub soft_deleted: bool,
    /// The offset of its first own message's start (a fork's fork offset; else 0).
    pub base: u64,
    /// Its tail: the offset after its last message.
    pub tail: u64,
    /// Messages appended (the stream's version).
    pub version: u64,
    /// The fork's source, by name and incarnation, and the fork offset.
    pub fork: Option<(String, LogIndex, u64)>,
    /// Where its own messages live.
    pub index: StreamIndex,
}

impl StreamView {
    /// Whether it expired by `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at.as_ref().is_some_and(|(_, at)| now_ms >= *at)
            || self.ttl_secs.is_some_and(|ttl| {
                now_ms >= self.last_access_ms.saturating_add(ttl.saturating_mul(1000))
            })
    }
}

#[derive(Clone, Debug)]
struct Stream {
    view: StreamView,
    spec: CreateSpec,
    producers: BTreeMap<String, (u64, u64)>,
    closed_by: Option<ProducerTuple>,
    stream_seq: Option<String>,
    /// Forks reading through it.
    forks: u64,
}

/// Every stream, as applied from the log. See the module docs.
#[derive(Debug, Default)]
pub struct Streams {
    by_name: BTreeMap<String, Stream>,
    /// Streams a command changed since the last [`Streams::take_changed`].
    changed: BTreeMap<String, ()>,
    /// The simulation's planted bug: a producer's applied sequence applies again.
    skip_dedup: bool,
}

impl Streams {
    /// No streams.
    pub fn new(planted_skip_dedup: bool) -> Streams {
        Streams { skip_dedup: planted_skip_dedup, ..Streams::default() }
    }

    /// Whether there are none (the state machine's tests ask).
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Forgets every stream (the log restarted past their commands); returns their removal
    /// for readers.
    pub fn clear(&mut self) -> Vec<(String, Option<Arc<StreamView>>)> {
        let names = std::mem::take(&mut self.by_name).into_keys();
        self.changed.clear();
        names.map(|name| (name, None)).collect()
    }

    /// The readers' view of a stream.
    pub fn view(&self, name: &str) -> Option<&StreamView> {
        self.by_name.get(name).map(|s| &s.view)
    }

    /// The streams changed since the last call, with their views (`None`: removed).
    pub fn take_changed(&mut self) -> Vec<(String, Option<Arc<StreamView>>)> {
        let changed = std::mem::take(&mut self.changed);
        changed
            .into_keys()
            .map(|name| {
                let view = self.by_name.get(&name).map(|s| Arc::new(s.view.clone()));
                (name, view)
            })
            .collect()
    }

    /// The lowest log offset a stream still reads its records from (`None`: none does). A
    /// trim goes no lower, so no stream loses a record; the same on every node (the state).
    pub fn pin(&self) -> Option<LogIndex> {
        self.by_name.values().filter(|s| s.view.index.len > 0).map(|s| s.view.index.get(0).1).min()
    }

    /// Every stream with its settings, producers and index: a checkpoint's contents.
    pub fn encode_state(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(STATE_FORMAT);
        b.put_u32_le(self.by_name.len() as u32);
        for s in self.by_name.values() {
            let v = &s.view;
            put_str(&mut b, &v.name);
            b.put_u64_le(v.incarnation.0);
            put_str(&mut b, &v.content_type);
            put_opt_u64(&mut b, v.ttl_secs);
            put_opt_expiry(&mut b, v.expires_at.as_ref());
            b.put_u64_le(v.last_access_ms);
            b.put_u8(u8::from(v.closed));
            b.put_u8(u8::from(v.soft_deleted));
            b.put_u64_le(v.base);
            b.put_u64_le(v.tail);
            b.put_u64_le(v.version);
            match &v.fork {
                Some((from, incarnation, at)) => {
                    b.put_u8(1);
                    put_str(&mut b, from);
                    b.put_u64_le(incarnation.0);
                    b.put_u64_le(*at);
                }
                None => b.put_u8(0),
            }
            b.put_u64_le(v.index.len as u64);
            for chunk in &v.index.chunks {
                for (end, index) in chunk.iter() {
                    b.put_u64_le(*end);
                    b.put_u64_le(index.0);
                }
            }
            put_spec(&mut b, &s.spec);
            b.put_u32_le(s.producers.len() as u32);
            for (id, (epoch, seq)) in &s.producers {
                put_str(&mut b, id);
                b.put_u64_le(*epoch);
                b.put_u64_le(*seq);
            }
            put_opt_producer(&mut b, s.closed_by.as_ref());
            put_opt_str(&mut b, s.stream_seq.as_deref());
            b.put_u64_le(s.forks);
        }
        b.freeze()
    }

    /// The streams a checkpoint holds (`planted_skip_dedup` as for [`Streams::new`]); every
    /// one counts as changed, so that readers see them all.
    pub fn decode_state(data: &Bytes, planted_skip_dedup: bool) -> Result<Streams, Malformed> {
        let mut r = Reader { data, at: 0 };
        if r.u8()? != STATE_FORMAT {
            return Err(Malformed("unknown stream state format"));
        }
        let mut out = Streams::new(planted_skip_dedup);
        for _ in 0..r.u32()? {
            let name = r.str()?;
            let incarnation = LogIndex(r.u64()?);
            let content_type = r.str()?;
            let ttl_secs = r.opt_u64()?;
            let expires_at = r.opt_expiry()?;
            let last_access_ms = r.u64()?;
            let closed = r.u8()? == 1;
            let soft_deleted = r.u8()? == 1;
            let (base, tail, version) = (r.u64()?, r.u64()?, r.u64()?);
            let fork =
                if r.u8()? == 1 { Some((r.str()?, LogIndex(r.u64()?), r.u64()?)) } else { None };
            let len = r.u64()?;
            // Each entry takes 16 bytes: a length beyond the data is malformed, not a huge
            // allocation.
            if len > (data.len() as u64) / 16 {
                return Err(Malformed("a stream index longer than the state"));
            }
            let mut index = StreamIndex::default();
            for _ in 0..len {
                let end = r.u64()?;
                index.push(end, LogIndex(r.u64()?));
            }
            let spec = r.spec()?;
            let mut producers = BTreeMap::new();
            for _ in 0..r.u32()? {
                let id = r.str()?;
                producers.insert(id, (r.u64()?, r.u64()?));
            }
            let closed_by = r.opt_producer()?;
            let stream_seq = r.opt_str()?;
            let forks = r.u64()?;
            let view = StreamView {
                name: name.clone(),
                incarnation,
                content_type,
                ttl_secs,
                expires_at,
                last_access_ms,
                closed,
                soft_deleted,
                base,
                tail,
                version,
                fork,
                index,
            };
            let stream = Stream { view, spec, producers, closed_by, stream_seq, forks };
            out.changed.insert(name.clone(), ());
            out.by_name.insert(name, stream);
        }
        if r.at != data.len() {
            return Err(Malformed("trailing bytes after the stream state"));
        }
        Ok(out)
    }

    /// Applies the command of the entry at `index`.
    pub fn apply(&mut self, index: LogIndex, cmd: Command) -> StreamOutcome {
        let now = match &cmd {
            Command::Create { now_ms, .. }
            | Command::Append { now_ms, .. }
            | Command::Delete { now_ms, .. }
            | Command::Touch { now_ms, .. }
            | Command::Expire { now_ms, .. } => *now_ms,
        };
        // The command's own time, stamped by the leader that proposed it (monotonic per
        // leader); never a maximum over history, which a trim or a log restart would forget.
        let name = cmd.name().to_string();
        let existed = self.by_name.get(&name).is_some_and(|s| !s.view.soft_deleted);
        self.expire(&name, now);
        match cmd {
            Command::Create { name, spec, messages, .. } => {
                self.create(index, name, now, spec, messages)
            }
            Command::Append {
                name,
                content_type,
                messages,
                close,
                producer,
                stream_seq,
                expected_version,
                ..
            } => self.append(
                index,
                &name,
                now,
                AppendArgs {
                    content_type,
                    messages,
                    close,
                    producer,
                    stream_seq,
                    expected_version,
                },
            ),
            Command::Delete { name, .. } => self.delete(&name),
            Command::Expire { name, .. } => {
                let gone = self.by_name.get(&name).is_none_or(|s| s.view.soft_deleted);
                if existed && gone { StreamOutcome::Deleted } else { StreamOutcome::NotFound }
            }
            Command::Touch { name, .. } => match self.by_name.get_mut(&name) {
                Some(s) if !s.view.soft_deleted => {
                    s.view.last_access_ms = now;
                    self.changed.insert(name, ());
                    StreamOutcome::Touched
                }
                Some(_) => StreamOutcome::Gone,
                None => StreamOutcome::NotFound,
            },
        }
    }

    /// A stream that expired by `now` is deleted as if asked to (softly while forks read
    /// through it).
    fn expire(&mut self, name: &str, now: u64) {
        if self.by_name.get(name).is_some_and(|s| !s.view.soft_deleted && s.view.expired(now)) {
            self.delete(name);
        }
    }

    fn create(
        &mut self,
        index: LogIndex,
        name: String,
        now: u64,
        mut spec: CreateSpec,
        messages: Vec<Bytes>,
    ) -> StreamOutcome {
        if let Some(s) = self.by_name.get(&name) {
            if s.view.soft_deleted {
                return StreamOutcome::Conflict(
                    "the stream was deleted; forks still read it".into(),
                );
            }
            return if same_settings(&s.spec, &spec) {
                StreamOutcome::Exists {
                    tail: s.view.tail,
                    content_type: s.view.content_type.clone(),
                    closed: s.view.closed,
                }
            } else {
                StreamOutcome::Conflict("the stream exists with other settings".into())
            };
        }
        let mut base = 0;
        let mut fork = None;
        if let Some(f) = &spec.fork {
            self.expire(&f.from.clone(), now);
            let Some(source) = self.by_name.get(&f.from) else { return StreamOutcome::NotFound };
            if source.view.soft_deleted {
                return StreamOutcome::Conflict("the fork's source was deleted".into());
            }
            if source.view.incarnation != f.from_incarnation {
                return StreamOutcome::Conflict("the fork's source changed; retry".into());
            }
            if f.offset > source.view.tail {
                return StreamOutcome::Invalid(
                    "the fork offset is beyond the source's tail".into(),
                );
            }
            base = f.offset;
            fork = Some((f.from.clone(), source.view.incarnation, f.offset));
        }
        if let Some(f) = &spec.fork {
            self.by_name.get_mut(&f.from).expect("checked above").forks += 1;
        }
        let mut view = StreamView {
            name: name.clone(),
            incarnation: index,
            content_type: std::mem::take(&mut spec.content_type),
            ttl_secs: spec.ttl_secs,
            expires_at: spec.expires_at.clone(),
            last_access_ms: now,
            closed: spec.closed,
            soft_deleted: false,
            base,
            tail: base,
            version: 0,
            fork,
            index: StreamIndex::default(),
        };
        spec.content_type = view.content_type.clone();
        let bytes: u64 = messages.iter().map(|m| m.len() as u64).sum();
        if bytes > 0 {
            view.tail += bytes;
            view.version += messages.iter().filter(|m| !m.is_empty()).count() as u64;
            view.index.push(view.tail, index);
        }
        let outcome = StreamOutcome::Created {
            tail: view.tail,
            content_type: view.content_type.clone(),
            closed: view.closed,
        };
        let stream = Stream {
            view,
            spec,
            producers: BTreeMap::new(),
            closed_by: None,
            stream_seq: None,
            forks: 0,
        };
        self.by_name.insert(name.clone(), stream);
        self.changed.insert(name, ());
        outcome
    }

    fn append(&mut self, index: LogIndex, name: &str, now: u64, a: AppendArgs) -> StreamOutcome {
        let Some(s) = self.by_name.get_mut(name) else { return StreamOutcome::NotFound };
        if s.view.soft_deleted {
            return StreamOutcome::Gone;
        }
        let close_only = a.messages.is_empty();
        if s.view.closed {
            if let (Some(p), Some(by)) = (&a.producer, &s.closed_by)
                && p == by
            {
                return StreamOutcome::Duplicate {
                    tail: s.view.tail,
                    closed: true,
                    epoch: p.epoch,
                    last_seq: p.seq,
                };
            }
            // A retry of a write the stream took before it closed is that write's duplicate.
            if let Some(p) = &a.producer
                && let Some(&(epoch, last)) = s.producers.get(&p.id)
                && p.epoch == epoch
                && p.seq <= last
            {
                return StreamOutcome::Duplicate {
                    tail: s.view.tail,
                    closed: true,
                    epoch,
                    last_seq: last,
                };
            }
            if close_only && a.close && a.producer.is_none() {
                // Closing a closed stream again is idempotent.
                s.view.last_access_ms = now;
                self.changed.insert(name.to_string(), ());
                return StreamOutcome::Appended {
                    tail: s.view.tail,
                    closed: true,
                    version: s.view.version,
                };
            }
            return StreamOutcome::Closed { tail: s.view.tail };
        }
        if !close_only
            && let Some(ct) = &a.content_type
            && media_type(ct) != media_type(&s.view.content_type)
        {
            return StreamOutcome::Conflict(format!(
                "the stream's content type is {}, not {ct}",
                s.view.content_type
            ));
        }
        if let Some(p) = &a.producer {
            match s.producers.get(&p.id) {
                None if p.seq != 0 => {
                    return StreamOutcome::SequenceGap { expected: 0, received: p.seq };
                }
                None => {}
                Some(&(epoch, _)) if p.epoch < epoch => return StreamOutcome::StaleEpoch { epoch },
                Some(&(epoch, _)) if p.epoch > epoch && p.seq != 0 => {
                    return StreamOutcome::Invalid(
                        "a new producer epoch must start at sequence 0".into(),
                    );
                }
                Some(&(epoch, _)) if p.epoch > epoch => {}
                Some(&(epoch, last)) => {
                    if p.seq <= last && !self.skip_dedup {
                        return StreamOutcome::Duplicate {
                            tail: s.view.tail,
                            closed: s.view.closed,
                            epoch,
                            last_seq: last,
                        };
                    }
                    if p.seq > last + 1 {
                        return StreamOutcome::SequenceGap { expected: last + 1, received: p.seq };
                    }
                }
            }
        }
        if let Some(seq) = &a.stream_seq
            && s.stream_seq.as_ref().is_some_and(|last| seq.as_bytes() <= last.as_bytes())
        {
            return StreamOutcome::Conflict(format!(
                "Stream-Seq {seq} is not above the last one, {}",
                s.stream_seq.as_deref().unwrap_or_default()
            ));
        }
        if let Some(expected) = a.expected_version
            && expected != s.view.version
        {
            return StreamOutcome::VersionMismatch { version: s.view.version };
        }
        let bytes: u64 = a.messages.iter().map(|m| m.len() as u64).sum();
        if bytes > 0 {
            s.view.tail += bytes;
            s.view.version += a.messages.iter().filter(|m| !m.is_empty()).count() as u64;
            s.view.index.push(s.view.tail, index);
        }
        if let Some(p) = &a.producer {
            s.producers.insert(p.id.clone(), (p.epoch, p.seq));
        }
        if let Some(seq) = a.stream_seq {
            s.stream_seq = Some(seq);
        }
        if a.close {
            s.view.closed = true;
            s.closed_by = a.producer.clone();
        }
        s.view.last_access_ms = now;
        let outcome = StreamOutcome::Appended {
            tail: s.view.tail,
            closed: s.view.closed,
            version: s.view.version,
        };
        self.changed.insert(name.to_string(), ());
        outcome
    }

    fn delete(&mut self, name: &str) -> StreamOutcome {
        let Some(s) = self.by_name.get_mut(name) else { return StreamOutcome::NotFound };
        if s.view.soft_deleted {
            return StreamOutcome::Gone;
        }
        self.changed.insert(name.to_string(), ());
        if s.forks > 0 {
            s.view.soft_deleted = true;
            return StreamOutcome::Deleted;
        }
        // Removed; its source loses a reader, and a soft-deleted source with none left goes
        // too, up the chain.
        let mut parent = self.by_name.remove(name).and_then(|s| s.view.fork);
        while let Some((pname, incarnation, _)) = parent.take() {
            let Some(p) = self.by_name.get_mut(&pname) else { break };
            if p.view.incarnation != incarnation {
                break;
            }
            p.forks = p.forks.saturating_sub(1);
            if p.forks == 0 && p.view.soft_deleted {
                parent = self.by_name.remove(&pname).and_then(|s| s.view.fork);
                self.changed.insert(pname, ());
            }
        }
        StreamOutcome::Deleted
    }
}

struct AppendArgs {
    content_type: Option<String>,
    messages: Vec<Bytes>,
    close: bool,
    producer: Option<ProducerTuple>,
    stream_seq: Option<String>,
    expected_version: Option<u64>,
}

/// The media type of a content type: lowercased, without parameters.
pub fn media_type(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Whether a create repeats an existing stream's settings (an idempotent create).
fn same_settings(old: &CreateSpec, new: &CreateSpec) -> bool {
    let fork_same = match (&old.fork, &new.fork) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.from == b.from
                && (!b.offset_given || a.offset == b.offset)
                && a.sub_offset == b.sub_offset
        }
        _ => false,
    };
    media_type(&old.content_type) == media_type(&new.content_type)
        && old.ttl_secs == new.ttl_secs
        && old.expires_at.as_ref().map(|e| &e.0) == new.expires_at.as_ref().map(|e| &e.0)
        && old.closed == new.closed
        && fork_same
}

// ----- encoding -----

/// The format byte of an encoded stream state.
const STATE_FORMAT: u8 = 1;

const CMD_CREATE: u8 = 1;
const CMD_APPEND: u8 = 2;
const CMD_DELETE: u8 = 3;
const CMD_TOUCH: u8 = 4;
const CMD_EXPIRE: u8 = 5;

/// Encodes a command after the envelope's kind byte.
pub fn encode(kind: u8, cmd: &Command) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(kind);
    match cmd {
        Command::Create { name, now_ms, spec, messages } => {
            b.put_u8(CMD_CREATE);
            put_str(&mut b, name);
            b.put_u64_le(*now_ms);
            put_spec(&mut b, spec);
            put_messages(&mut b, messages);
        }
        Command::Append {
            name,
            now_ms,
            content_type,
            messages,
            close,
            producer,
            stream_seq,
            expected_version,
        } => {
            b.put_u8(CMD_APPEND);
            put_str(&mut b, name);
            b.put_u64_le(*now_ms);
            put_opt_str(&mut b, content_type.as_deref());
            b.put_u8(u8::from(*close));
            put_opt_producer(&mut b, producer.as_ref());
            put_opt_str(&mut b, stream_seq.as_deref());
            put_opt_u64(&mut b, *expected_version);
            put_messages(&mut b, messages);
        }
        Command::Delete { name, now_ms } => {
            b.put_u8(CMD_DELETE);
            put_str(&mut b, name);
            b.put_u64_le(*now_ms);
        }
        Command::Touch { name, now_ms } => {
            b.put_u8(CMD_TOUCH);
            put_str(&mut b, name);
            b.put_u64_le(*now_ms);
        }
        Command::Expire { name, now_ms } => {
            b.put_u8(CMD_EXPIRE);
            put_str(&mut b, name);
            b.put_u64_le(*now_ms);
        }
    }
    b.freeze()
}

/// Decodes a command from an entry payload without its kind byte. Messages share `data`.
pub fn decode(data: &Bytes) -> Result<Command, Malformed> {
    let mut r = Reader { data, at: 0 };
    let cmd = match r.u8()? {
        CMD_CREATE => {
            let name = r.str()?;
            let now_ms = r.u64()?;
            let spec = r.spec()?;
            let messages = r.messages()?;
            Command::Create { name, now_ms, spec, messages }
        }
        CMD_APPEND => {
            let name = r.str()?;
            let now_ms = r.u64()?;
            let content_type = r.opt_str()?;
            let close = r.u8()? == 1;
            let producer = r.opt_producer()?;
            let stream_seq = r.opt_str()?;
            let expected_version = r.opt_u64()?;
            let messages = r.messages()?;
            Command::Append {
                name,
                now_ms,
                content_type,
                messages,
                close,
                producer,
                stream_seq,
                expected_version,
            }
        }
        CMD_DELETE => Command::Delete { name: r.str()?, now_ms: r.u64()? },
        CMD_TOUCH => Command::Touch { name: r.str()?, now_ms: r.u64()? },
        CMD_EXPIRE => Command::Expire { name: r.str()?, now_ms: r.u64()? },
        _ => return Err(Malformed("unknown stream command")),
    };
    if r.at != data.len() {
        return Err(Malformed("trailing bytes after a stream command"));
    }
    Ok(cmd)
}

/// The messages of a command (what a reader serves), without decoding the rest twice.
pub fn messages_of(cmd: Command) -> Vec<Bytes> {
    match cmd {
        Command::Create { messages, .. } | Command::Append { messages, .. } => messages,
        Command::Delete { .. } | Command::Touch { .. } | Command::Expire { .. } => Vec::new(),
    }
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u32_le(s.len() as u32);
    b.put_slice(s.as_bytes());
}

fn put_opt_str(b: &mut BytesMut, s: Option<&str>) {
    match s {
        Some(s) => {
            b.put_u8(1);
            put_str(b, s);
        }
        None => b.put_u8(0),
    }
}

fn put_opt_u64(b: &mut BytesMut, v: Option<u64>) {
    match v {
        Some(v) => {
            b.put_u8(1);
            b.put_u64_le(v);
        }
        None => b.put_u8(0),
    }
}

fn put_opt_expiry(b: &mut BytesMut, e: Option<&(String, u64)>) {
    match e {
        Some((s, ms)) => {
            b.put_u8(1);
            put_str(b, s);
            b.put_u64_le(*ms);
        }
        None => b.put_u8(0),
    }
}

fn put_opt_producer(b: &mut BytesMut, p: Option<&ProducerTuple>) {
    match p {
        Some(p) => {
            b.put_u8(1);
            put_str(b, &p.id);
            b.put_u64_le(p.epoch);
            b.put_u64_le(p.seq);
        }
        None => b.put_u8(0),
    }
}

/// A create's settings: the same bytes in a command and in a checkpoint.
fn put_spec(b: &mut BytesMut, spec: &CreateSpec) {
    put_str(b, &spec.content_type);
    put_opt_u64(b, spec.ttl_secs);
    put_opt_expiry(b, spec.expires_at.as_ref());
    b.put_u8(u8::from(spec.closed));
    match &spec.fork {
        Some(f) => {
            b.put_u8(1);
            put_str(b, &f.from);
            b.put_u64_le(f.from_incarnation.0);
            b.put_u64_le(f.offset);
            b.put_u8(u8::from(f.offset_given));
            b.put_u64_le(f.sub_offset);
        }
        None => b.put_u8(0),
    }
}

fn put_messages(b: &mut BytesMut, messages: &[Bytes]) {
    b.put_u32_le(messages.len() as u32);
    for m in messages {
        b.put_u32_le(m.len() as u32);
        b.put_slice(m);
    }
}

struct Reader<'a> {
    data: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, Malformed> {
        let end = self.at.checked_add(n).ok_or(Malformed("length overflow"))?;
        if end > self.data.len() {
            return Err(Malformed("short stream command"));
        }
        let range = self.at..end;
        self.at = end;
        Ok(range)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        let r = self.take(1)?;
        Ok(self.data[r.start])
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        let r = self.take(4)?;
        Ok(u32::from_le_bytes(self.data[r].try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        let r = self.take(8)?;
        Ok(u64::from_le_bytes(self.data[r].try_into().expect("8 bytes")))
    }

    fn str(&mut self) -> Result<String, Malformed> {
        let len = self.u32()? as usize;
        let r = self.take(len)?;
        std::str::from_utf8(&self.data[r]).map(str::to_string).map_err(|_| Malformed("not UTF-8"))
    }

    fn opt_str(&mut self) -> Result<Option<String>, Malformed> {
        Ok(if self.u8()? == 1 { Some(self.str()?) } else { None })
    }

    fn opt_producer(&mut self) -> Result<Option<ProducerTuple>, Malformed> {
        Ok(if self.u8()? == 1 {
            Some(ProducerTuple { id: self.str()?, epoch: self.u64()?, seq: self.u64()? })
        } else {
            None
        })
    }

    fn spec(&mut self) -> Result<CreateSpec, Malformed> {
        let content_type = self.str()?;
        let ttl_secs = self.opt_u64()?;
        let expires_at = self.opt_expiry()?;
        let closed = self.u8()? == 1;
        let fork = if self.u8()? == 1 {
            Some(ForkSpec {
                from: self.str()?,
                from_incarnation: LogIndex(self.u64()?),
                offset: self.u64()?,
                offset_given: self.u8()? == 1,
                sub_offset: self.u64()?,
            })
        } else {
            None
        };
        Ok(CreateSpec { content_type, ttl_secs, expires_at, closed, fork })
    }

    fn opt_expiry(&mut self) -> Result<Option<(String, u64)>, Malformed> {
        Ok(if self.u8()? == 1 { Some((self.str()?, self.u64()?)) } else { None })
    }

    fn opt_u64(&mut self) -> Result<Option<u64>, Malformed> {
        Ok(if self.u8()? == 1 { Some(self.u64()?) } else { None })
    }

    fn messages(&mut self) -> Result<Vec<Bytes>, Malformed> {
        let n = self.u32()? as usize;
        let mut out = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let len = self.u32()? as usize;
            let r = self.take(len)?;
            out.push(self.data.slice(r));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str, now_ms: u64, ct: &str) -> Command {
        Command::Create {
            name: name.into(),
            now_ms,
            spec: CreateSpec {
                content_type: ct.into(),
                ttl_secs: None,
                expires_at: None,
                closed: false,
                fork: None,
            },
            messages: Vec::new(),
        }
    }

    fn append(name: &str, data: &'static str, producer: Option<(&str, u64, u64)>) -> Command {
        Command::Append {
            name: name.into(),
            now_ms: 1,
            content_type: Some("text/plain".into()),
            messages: vec![Bytes::from_static(data.as_bytes())],
            close: false,
            producer: producer.map(|(id, epoch, seq)| ProducerTuple { id: id.into(), epoch, seq }),
            stream_seq: None,
            expected_version: None,
        }
    }

    #[test]
    fn commands_round_trip_and_bad_bytes_are_errors() {
        let cmds = vec![
            create("a/b", 5, "text/plain"),
            append("a/b", "xyz", Some(("p", 2, 3))),
            Command::Delete { name: "s".into(), now_ms: 9 },
            Command::Touch { name: "s".into(), now_ms: 10 },
            Command::Expire { name: "s".into(), now_ms: 11 },
        ];
        for cmd in cmds {
            let enc = encode(4, &cmd);
            assert_eq!(decode(&enc.slice(1..)), Ok(cmd.clone()));
            for cut in 1..enc.len() - 1 {
                assert!(decode(&enc.slice(1..cut)).is_err(), "{cmd:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn appends_move_the_tail_and_the_index_finds_them() {
        let mut s = Streams::new(false);
        assert!(matches!(
            s.apply(LogIndex(1), create("s", 1, "text/plain")),
            StreamOutcome::Created { tail: 0, .. }
        ));
        assert_eq!(
            s.apply(LogIndex(2), append("s", "hello", None)),
            StreamOutcome::Appended { tail: 5, closed: false, version: 1 }
        );
        s.apply(LogIndex(3), append("other", "zz", None));
        assert_eq!(
            s.apply(LogIndex(4), append("s", "!!", None)),
            StreamOutcome::Appended { tail: 7, closed: false, version: 2 }
        );
        let v = s.view("s").expect("stream");
        assert_eq!(v.index.first_after(0), 0);
        assert_eq!(v.index.first_after(5), 1);
        assert_eq!(v.index.first_after(7), 2);
        let all: Vec<_> = v.index.from(0, 0).collect();
        assert_eq!(all, vec![(0, 5, LogIndex(2)), (5, 7, LogIndex(4))]);
    }

    #[test]
    fn producers_are_fenced_by_epoch_and_deduplicated_by_sequence() {
        let mut s = Streams::new(false);
        s.apply(LogIndex(1), create("s", 1, "text/plain"));
        assert!(matches!(
            s.apply(LogIndex(2), append("s", "a", Some(("p", 0, 0)))),
            StreamOutcome::Appended { .. }
        ));
        assert!(matches!(
            s.apply(LogIndex(3), append("s", "b", Some(("p", 0, 1)))),
            StreamOutcome::Appended { .. }
        ));
        assert_eq!(
            s.apply(LogIndex(4), append("s", "b", Some(("p", 0, 0)))),
            StreamOutcome::Duplicate { tail: 2, closed: false, epoch: 0, last_seq: 1 }
        );
        assert_eq!(
            s.apply(LogIndex(5), append("s", "c", Some(("p", 0, 3)))),
            StreamOutcome::SequenceGap { expected: 2, received: 3 }
        );
        // A new primary takes over with epoch 1: the old one is fenced.
        assert!(matches!(
            s.apply(LogIndex(6), append("s", "n", Some(("p", 1, 0)))),
            StreamOutcome::Appended { .. }
        ));
        assert_eq!(
            s.apply(LogIndex(7), append("s", "old", Some(("p", 0, 2)))),
            StreamOutcome::StaleEpoch { epoch: 1 }
        );
        assert!(matches!(
            s.apply(LogIndex(8), append("s", "x", Some(("p", 2, 1)))),
            StreamOutcome::Invalid(_)
        ));
        assert_eq!(s.view("s").expect("s").tail, 3);
    }

    #[test]
    fn a_closed_stream_refuses_appends_except_the_closing_retry() {
        let mut s = Streams::new(false);
        s.apply(LogIndex(1), create("s", 1, "text/plain"));
        let mut closing = append("s", "end", Some(("p", 0, 0)));
        if let Command::Append { close, .. } = &mut closing {
            *close = true;
        }
        assert!(matches!(
            s.apply(LogIndex(2), closing.clone()),
            StreamOutcome::Appended { closed: true, tail: 3, .. }
        ));
        assert!(matches!(
            s.apply(LogIndex(3), closing),
            StreamOutcome::Duplicate { closed: true, .. }
        ));
        // ... and so is a retry of a write it took before it closed (not "closed").
        let earlier = append("s", "end", Some(("p", 0, 0)));
        assert!(matches!(
            s.apply(LogIndex(5), earlier),
            StreamOutcome::Duplicate { closed: true, .. }
        ));
        assert_eq!(
            s.apply(LogIndex(4), append("s", "more", None)),
            StreamOutcome::Closed { tail: 3 }
        );
    }

    #[test]
    fn the_leaders_sweep_removes_only_streams_expired_by_its_command_time() {
        let mut s = Streams::new(false);
        let ttl = |name: &str| Command::Create {
            name: name.into(),
            now_ms: 1_000,
            spec: CreateSpec {
                content_type: "text/plain".into(),
                ttl_secs: Some(5),
                expires_at: None,
                closed: false,
                fork: None,
            },
            messages: Vec::new(),
        };
        s.apply(LogIndex(1), ttl("a"));
        s.apply(LogIndex(2), ttl("b"));
        // "b" is read (touched) at 5 s: it lives until 10 s.
        s.apply(LogIndex(3), Command::Touch { name: "b".into(), now_ms: 5_000 });
        let expire = |name: &str, now_ms| Command::Expire { name: name.into(), now_ms };
        assert_eq!(s.apply(LogIndex(4), expire("a", 6_500)), StreamOutcome::Deleted);
        assert_eq!(s.apply(LogIndex(5), expire("b", 6_600)), StreamOutcome::NotFound);
        assert!(s.view("a").is_none() && s.view("b").is_some());
        assert_eq!(s.apply(LogIndex(6), expire("b", 10_000)), StreamOutcome::Deleted);
        assert!(s.is_empty());
    }

    #[test]
    fn forks_hold_their_source_until_deleted_and_expiry_uses_command_time() {
        let mut s = Streams::new(false);
        s.apply(LogIndex(1), create("src", 1, "text/plain"));
        s.apply(LogIndex(2), append("src", "abc", None));
        let fork = Command::Create {
            name: "f".into(),
            now_ms: 3,
            spec: CreateSpec {
                content_type: "text/plain".into(),
                ttl_secs: Some(10),
                expires_at: None,
                closed: false,
                fork: Some(ForkSpec {
                    from: "src".into(),
                    from_incarnation: LogIndex(1),
                    offset: 3,
                    offset_given: true,
                    sub_offset: 0,
                }),
            },
            messages: Vec::new(),
        };
        assert!(matches!(s.apply(LogIndex(3), fork), StreamOutcome::Created { tail: 3, .. }));
        assert_eq!(
            s.apply(LogIndex(4), Command::Delete { name: "src".into(), now_ms: 4 }),
            StreamOutcome::Deleted
        );
        assert!(s.view("src").expect("soft").soft_deleted);
        assert_eq!(s.apply(LogIndex(5), append("src", "x", None)), StreamOutcome::Gone);
        // The fork's TTL ran out by the time of the next command: it goes, and its source
        // with it.
        assert_eq!(
            s.apply(LogIndex(6), Command::Touch { name: "f".into(), now_ms: 20_000 }),
            StreamOutcome::NotFound
        );
        assert!(s.view("f").is_none() && s.view("src").is_none());
    }

    #[test]
    fn a_state_round_trips_and_goes_on_as_the_original() {
        let mut a = Streams::new(false);
        a.apply(LogIndex(1), create("src", 1, "text/plain"));
        for i in 0..2500u64 {
            a.apply(LogIndex(2 + i), append("src", "ab", Some(("p", 0, i))));
        }
        let mut fork = create("f", 5, "text/plain");
        if let Command::Create { spec, .. } = &mut fork {
            spec.ttl_secs = Some(60);
            spec.fork = Some(ForkSpec {
                from: "src".into(),
                from_incarnation: LogIndex(1),
                offset: 4,
                offset_given: true,
                sub_offset: 0,
            });
        }
        a.apply(LogIndex(3000), fork);
        a.apply(LogIndex(3001), Command::Delete { name: "src".into(), now_ms: 6 });
        let state = a.encode_state();
        let mut b = Streams::decode_state(&state, false).expect("decodes");
        assert_eq!(b.encode_state(), state, "the same state");
        assert_eq!(b.pin(), Some(LogIndex(2)));
        assert_eq!(b.take_changed().len(), 2, "readers see every stream");
        // Both go on the same way: a duplicate, a fenced epoch, an append to the fork.
        for (i, cmd) in [
            append("src", "x", Some(("p", 0, 3))),
            append("f", "y", Some(("q", 0, 0))),
            append("f", "z", Some(("q", 0, 0))),
        ]
        .into_iter()
        .enumerate()
        {
            let at = LogIndex(4000 + i as u64);
            assert_eq!(a.apply(at, cmd.clone()), b.apply(at, cmd));
        }
        assert_eq!(a.encode_state(), b.encode_state());
        for cut in [0, 1, 7, state.len() / 2, state.len() - 1] {
            assert!(Streams::decode_state(&state.slice(..cut), false).is_err(), "cut at {cut}");
        }
        let mut long = state.to_vec();
        long.push(0);
        assert!(Streams::decode_state(&Bytes::from(long), false).is_err());
    }
}
