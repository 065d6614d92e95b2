//! Checkpoints of the stream state: saved every so often and before a trim drops the log below
//! it, loaded at start (stream commands apply only above it), and fetched from a peer when this
//! node's log restarts at a leader's start (the commands that built the state are then gone).

use bytes::Bytes;
use raftwal_consensus::{EntryKind, LogIndex, LogStore};

use super::{Action, Fatal, NodeCore, Outcome, Reply, RequestError, fatal, streams};
use crate::envelope;

/// Stream commands applied between two saves of the state, at least.
const SAVE_EVERY_COMMANDS: u64 = 200_000;

/// Entries read at once while replaying the log after an install.
const REPLAY_PAGE: u64 = 4096;

/// What a node's data directory says of its stream state at start.
#[derive(Debug)]
pub enum StreamsCheckpoint {
    /// No checkpoint: the state is whatever the retained log builds (a data directory of a
    /// version that refused trims while streams existed, or one never trimmed).
    None,
    /// The state is missing: the log restarted at a leader's start and no peer's state was
    /// installed yet.
    Missing,
    /// The state applied to `at`.
    At { at: LogIndex, state: Bytes },
}

impl NodeCore {
    /// Takes the checkpoint found at start (before any entry is applied).
    pub fn restore_streams(&mut self, checkpoint: StreamsCheckpoint) {
        let start = self.first_index.prev();
        let planted = self.config.planted == Some(super::PlantedBug::SkipStreamDedup);
        match checkpoint {
            StreamsCheckpoint::None => {}
            // A whole log rebuilds the state itself.
            _ if start == LogIndex(0) => {}
            StreamsCheckpoint::At { at, state } if at >= start => {
                match streams::Streams::decode_state(&state, planted) {
                    Ok(s) => {
                        self.streams = s;
                        self.streams_floor = at;
                        let changed = self.streams.take_changed();
                        self.actions.push_back(Action::PublishStreams(changed));
                        tracing::info!(%at, "stream state loaded from its checkpoint");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the stream checkpoint is damaged; fetching a peer's state");
                        self.lose_streams(start);
                    }
                }
            }
            StreamsCheckpoint::At { at, .. } => {
                tracing::warn!(%at, %start, "the stream checkpoint is older than the log start; fetching a peer's state");
                self.lose_streams(start);
            }
            StreamsCheckpoint::Missing => self.lose_streams(start),
        }
    }

    /// The state is gone (the log restarts past its commands): recorded durably first, then
    /// fetched from a peer applied to at least `at_least`.
    pub(super) fn lose_streams(&mut self, at_least: LogIndex) {
        self.actions.push_back(Action::StreamsMissing { at_least });
        let dropped = self.streams.clear();
        if !dropped.is_empty() {
            self.actions.push_back(Action::PublishStreams(dropped));
        }
        self.streams_missing = Some(at_least);
        self.streams_floor = at_least;
        self.streams_unsaved = 0;
    }

    /// Saves the state when enough commands applied since the last save (the entry at `at`
    /// was the last applied).
    pub(super) fn save_streams_if_due(&mut self, at: LogIndex) {
        // At least as many commands as the last save had bytes / 16 (one index entry each):
        // each save rewrites the whole state, so saves get rarer as it grows and their total
        // cost stays linear in what was applied.
        let due = SAVE_EVERY_COMMANDS.max(self.streams_saved_bytes / 16);
        if self.streams_unsaved >= due {
            self.save_streams(at);
        }
    }

    /// Saves the state, applied to `at` (or to the checkpoint it came from, if later).
    pub(super) fn save_streams(&mut self, at: LogIndex) {
        if self.streams_missing.is_some() {
            return;
        }
        let at = at.max(self.streams_floor);
        let state = self.streams.encode_state();
        self.streams_saved_bytes = state.len() as u64;
        self.actions.push_back(Action::SaveStreams { at, state });
        self.streams_unsaved = 0;
    }

    /// This node's state for a peer, applied to the last applied entry (what
    /// [`super::Request::StreamsState`] answers).
    pub fn streams_state(&self, at_least: LogIndex) -> Outcome {
        if self.streams_missing.is_some() {
            return Err(RequestError::Overloaded("this node's stream state is missing too"));
        }
        let at = self.log.applied().max(self.streams_floor);
        if at < at_least {
            return Err(RequestError::Overloaded("this node has not applied that far yet"));
        }
        Ok(Reply::StreamsState { at, state: self.streams.encode_state() })
    }

    /// Installs a peer's state applied to `at`, then applies the stream commands this node
    /// applied since `at` from its own log. Refused unless the state is missing and `at` is
    /// between the index it must reach and what this node applied (its log holds the rest).
    pub(super) fn install_streams(
        &mut self,
        at: LogIndex,
        state: &Bytes,
    ) -> Result<Outcome, Fatal> {
        let Some(at_least) = self.streams_missing else { return Ok(Ok(Reply::Done)) };
        let applied = self.log.applied();
        if at < at_least || at > applied {
            return Ok(Err(RequestError::Invalid(format!(
                "a stream state applied to {at}; this node needs one between {at_least} and {applied}"
            ))));
        }
        let planted = self.config.planted == Some(super::PlantedBug::SkipStreamDedup);
        let mut installed = match streams::Streams::decode_state(state, planted) {
            Ok(s) => s,
            Err(e) => return Ok(Err(RequestError::Invalid(format!("the stream state: {e}")))),
        };
        // The commands after `at` that this node applied while the state was missing.
        let mut next = at.next();
        if self.config.planted == Some(super::PlantedBug::SkipStreamReplay) {
            next = applied.next();
        }
        while next <= applied {
            let end = LogIndex((applied.0 + 1).min(next.0 + REPLAY_PAGE));
            let entries = self
                .raw
                .store()
                .entries(next..end, u64::MAX)
                .map_err(|e| fatal("replay stream commands")(e.into()))?;
            if entries.is_empty() {
                // The log holds every entry up to what was applied: a gap is a broken store.
                return Err(fatal("replay stream commands")(raftwal_consensus::Error::Store(
                    raftwal_consensus::StoreError::Unavailable { index: next },
                )));
            }
            for e in entries {
                next = e.index.next();
                if e.kind == EntryKind::Normal
                    && let Ok(envelope::Payload::Stream(cmd)) = envelope::decode(&e.data)
                {
                    installed.apply(e.index, cmd);
                }
            }
        }
        self.streams = installed;
        self.streams_missing = None;
        self.streams_floor = at;
        let changed = self.streams.take_changed();
        self.actions.push_back(Action::PublishStreams(changed));
        self.save_streams(applied);
        self.actions.push_back(Action::StreamsInstalled);
        tracing::info!(%at, %applied, "stream state installed from a peer");
        Ok(Ok(Reply::Done))
    }
}
