//! Writers of named streams (the Durable Streams producer: id, epoch, sequence), in runs with
//! `Options::named`: each creates its stream, then appends one message at a time, retrying an
//! unanswered one with the same (epoch, sequence) until it is answered, and now and then starts
//! a new epoch. The checker then reads each stream on every node.

use raftwal_server::core::streams::{Command, CreateSpec, ProducerTuple, StreamOutcome};

use super::*;

/// What a named writer sends.
#[derive(Debug, Clone)]
pub(super) enum NamedOp {
    Create,
    Append { message: String, epoch: u64, seq: u64 },
}

pub(super) struct NamedWriter {
    pub(super) stream: String,
    producer: String,
    created: bool,
    epoch: u64,
    /// The next sequence in `epoch`.
    seq: u64,
    /// The op being sent (again until answered), its request id and deadline.
    current: Option<(NamedOp, Option<(u64, u64)>)>,
    node: NodeId,
    next_ms: u64,
    /// Messages the stream acknowledged (applied, or a duplicate of an applied one).
    pub(super) acked: Vec<String>,
}

impl NamedWriter {
    pub(super) fn new(k: usize, node: NodeId) -> NamedWriter {
        NamedWriter {
            stream: format!("/named/{k}"),
            producer: format!("w{k}"),
            created: false,
            epoch: 0,
            seq: 0,
            current: None,
            node,
            next_ms: 0,
            acked: Vec::new(),
        }
    }
}

impl Sim {
    pub(super) fn step_named(&mut self, k: usize) {
        let now = self.now;
        let w = &mut self.named[k];
        if let Some((_, Some((id, deadline)))) = &w.current {
            if now < *deadline {
                return;
            }
            // No answer: the same op again (its outcome is unknown), on another node.
            self.named_requests.remove(id);
            let other = self.any_node();
            let w = &mut self.named[k];
            if let Some(c) = w.current.as_mut() {
                c.1 = None;
            }
            w.node = other;
            return;
        }
        if now < w.next_ms || now + 500 >= END_MS {
            return;
        }
        if w.current.is_none() {
            let op = if !w.created {
                NamedOp::Create
            } else {
                if self.named_rng.below(15) == 0 {
                    // A new primary: a new epoch fences the old one.
                    w.epoch += 1;
                    w.seq = 0;
                }
                let message = format!("{}-e{}-s{};", w.producer, w.epoch, w.seq);
                NamedOp::Append { message, epoch: w.epoch, seq: w.seq }
            };
            w.current = Some((op, None));
        }
        self.named_send(k);
    }

    fn named_send(&mut self, k: usize) {
        let i = self.index_of(self.named[k].node);
        let Some((op, _)) = self.named[k].current.clone() else { return };
        if self.nodes[i].live.is_none() {
            let other = self.any_node();
            self.named[k].node = other;
            self.named[k].next_ms = self.now + 5;
            return;
        }
        let w = &self.named[k];
        // The leader stamps a command's time; the simulation's streams have no time to live.
        let cmd = match op {
            NamedOp::Create => Command::Create {
                name: w.stream.clone(),
                now_ms: 0,
                spec: CreateSpec {
                    content_type: "text/plain".into(),
                    ttl_secs: None,
                    expires_at: None,
                    closed: false,
                    fork: None,
                },
                messages: Vec::new(),
            },
            NamedOp::Append { message, epoch, seq } => Command::Append {
                name: w.stream.clone(),
                now_ms: 0,
                content_type: Some("text/plain".into()),
                messages: vec![Bytes::from(message)],
                close: false,
                producer: Some(ProducerTuple { id: w.producer.clone(), epoch, seq }),
                stream_seq: None,
                expected_version: None,
            },
        };
        let id = self.next_request;
        self.next_request += 1;
        self.named_requests.insert(id, k);
        let deadline = self.now + REQUEST_TIMEOUT_MS;
        if let Some(c) = self.named[k].current.as_mut() {
            c.1 = Some((id, deadline));
        }
        self.input(i, Input::Request { id, request: Request::Stream(cmd) });
    }

    pub(super) fn named_reply(&mut self, k: usize, outcome: Outcome) {
        let Some((op, _)) = self.named[k].current.clone() else { return };
        let line = format!("named writer {k} {op:?} -> {outcome:?}");
        self.log(line);
        let w = &mut self.named[k];
        match (outcome, op) {
            (
                Ok(Reply::Stream(StreamOutcome::Created { .. } | StreamOutcome::Exists { .. })),
                NamedOp::Create,
            ) => {
                w.created = true;
                w.current = None;
            }
            (
                Ok(Reply::Stream(StreamOutcome::Appended { .. } | StreamOutcome::Duplicate { .. })),
                NamedOp::Append { message, .. },
            ) => {
                w.acked.push(message);
                w.seq += 1;
                w.current = None;
                self.last_ack_ms = self.now;
            }
            (Ok(Reply::Stream(other)), op) => {
                // Nothing else fences or refuses a writer that retries its own sequence.
                self.violations.push(format!("named writer {k}: {op:?} refused: {other:?}"));
                self.named[k].current = None;
                self.named[k].next_ms = END_MS;
            }
            (Err(RequestError::NotLeader { leader }), _) => {
                w.node = leader.unwrap_or(w.node);
                if let Some(c) = w.current.as_mut() {
                    c.1 = None;
                }
                w.next_ms = self.now + 2;
            }
            (_, _) => {
                // Lost, unknown, overloaded: the same op again shortly.
                if let Some(c) = w.current.as_mut() {
                    c.1 = None;
                }
                w.next_ms = self.now + 5;
            }
        }
    }
}

impl Sim {
    /// What the node's streams API does while its stream state is missing: asks the other
    /// live nodes for theirs and installs the first applied to at least what it needs, once it
    /// has applied as far itself.
    pub(super) fn fetch_streams(&mut self) {
        for i in 0..self.nodes.len() {
            let Some(need) = self.nodes[i].live.as_ref().and_then(|l| l.streams_missing) else {
                continue;
            };
            let readable = self.nodes[i].live.as_ref().map_or(LogIndex(0), |l| l.readable);
            let offer = (0..self.nodes.len()).filter(|&j| j != i).find_map(|j| {
                match self.nodes[j].live.as_ref()?.core.streams_state(need) {
                    Ok(Reply::StreamsState { at, state }) if at >= need && at <= readable => {
                        Some((at, state))
                    }
                    _ => None,
                }
            });
            if let Some((at, state)) = offer {
                let line =
                    format!("node {} installs a peer's stream state at {at}", self.nodes[i].id);
                self.log(line);
                let id = self.next_request;
                self.next_request += 1;
                self.input(
                    i,
                    Input::Request { id, request: Request::InstallStreams { at, state } },
                );
            }
        }
    }
}
