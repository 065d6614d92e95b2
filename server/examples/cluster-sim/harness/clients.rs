//! The simulated clients: producers that retry, expected-offset appends, reads, followers,
//! trims and leader transfers.

use super::*;

impl Sim {
    pub(super) fn new_op(&mut self, client: u64, kind: OpKind) -> usize {
        self.ops.push(Op { client, kind, sent_ms: self.now, done_ms: None, result: None });
        self.ops.len() - 1
    }

    pub(super) fn step_client(&mut self, c: usize) {
        self.follow(c);
        if let Some((op, node, index, by)) = self.clients[c].waiting_read {
            let i = self.index_of(node);
            let readable = self.nodes[i].live.as_ref().map(|l| l.readable);
            if let Some(r) = readable
                && r >= index
            {
                self.finish(op, OpResult::ReadAt(r));
                self.clients[c].waiting_read = None;
            } else if self.now >= by || readable.is_none() {
                self.finish(op, OpResult::Unknown);
                self.clients[c].waiting_read = None;
            }
            return;
        }
        if let Some((op, _, id, deadline)) = self.clients[c].current {
            if self.now >= deadline {
                self.requests.remove(&id);
                self.clients[c].current = None;
                self.retry_or_give_up(op, "timed out");
            }
            return;
        }
        if self.now < self.clients[c].next_ms {
            return;
        }
        if let Some(op) = self.clients[c].queued.take() {
            self.attempt(c, op);
            return;
        }
        let client = self.clients[c].id;
        let kind = match self.rng.below(100) {
            0..=69 => {
                let seq = self.clients[c].next_sequence;
                self.clients[c].next_sequence += 1;
                let n = 1 + self.rng.below(3);
                let records =
                    (0..n).map(|r| Bytes::from(format!("c{client}-s{seq}-r{r}"))).collect();
                OpKind::Append {
                    records,
                    producer: Some(ProducerSeq { id: 100 + client, sequence: seq }),
                    expected: None,
                }
            }
            70..=77 => {
                let tag = self.rng.next_u64();
                let i = self.index_of(self.clients[c].leader_guess);
                let guess = self.nodes[i].live.as_ref().map_or(LogIndex(1), |l| l.readable.next());
                OpKind::Append {
                    records: vec![Bytes::from(format!("c{client}-x{tag}"))],
                    producer: None,
                    expected: Some(guess),
                }
            }
            78..=87 => OpKind::LinRead,
            88..=95 => OpKind::Read { from: LogIndex(1 + self.rng.below(60)) },
            96..=97 => OpKind::Trim { before: LogIndex(self.rng.below(40)) },
            // No leader moves in the last second: the run ends by checking there is one.
            _ if self.now + 1000 > END_MS => OpKind::LinRead,
            _ => OpKind::Transfer { to: self.any_node() },
        };
        let op = self.new_op(client, kind);
        self.attempt(c, op);
    }

    pub(super) fn attempt(&mut self, c: usize, op: usize) {
        let node = self.clients[c].leader_guess;
        let i = self.index_of(node);
        let kind = self.ops[op].kind.clone();
        if let OpKind::Read { from } = kind {
            // A plain read: served by whichever node the client reaches.
            let result = match self.nodes[i].live.as_ref() {
                Some(l) => match read_page(
                    l.storage.wal(),
                    || l.view.clone(),
                    l.readable,
                    from,
                    20,
                    1 << 20,
                ) {
                    Ok(page) => OpResult::Records(page.records),
                    Err(e) => OpResult::Failed(e.to_string()),
                },
                None => OpResult::Failed("node down".into()),
            };
            self.finish(op, result);
            self.clients[c].next_ms = self.now + 1 + self.rng.below(5);
            return;
        }
        let request = match kind {
            OpKind::Append { records, producer, expected } => {
                Request::Append(AppendReq { records, expected_next: expected, producer })
            }
            OpKind::LinRead => Request::ReadIndex,
            OpKind::Trim { before } => Request::Trim { before },
            OpKind::Transfer { to } => Request::Transfer { to },
            OpKind::Read { .. } => unreachable!("served above"),
        };
        if self.nodes[i].live.is_none() {
            self.clients[c].leader_guess = self.any_node();
            self.clients[c].next_ms = self.now + 5;
            self.retry_or_give_up(op, "node down");
            return;
        }
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(id, op);
        self.clients[c].current = Some((op, node, id, self.now + REQUEST_TIMEOUT_MS));
        self.input(i, Input::Request { id, request });
    }

    pub(super) fn reply(&mut self, id: u64, outcome: Outcome) {
        if let Some(change) = self.member_requests.remove(&id) {
            self.member_reply(change, outcome);
            return;
        }
        if let Some((k, op)) = self.stream_requests.remove(&id) {
            self.stream_reply(k, op, outcome);
            return;
        }
        if let Some(k) = self.named_requests.remove(&id) {
            self.named_reply(k, outcome);
            return;
        }
        let Some(op) = self.requests.remove(&id) else { return };
        let c = self.ops[op].client as usize;
        if self.clients[c].current.is_some_and(|(o, ..)| o == op) {
            self.clients[c].current = None;
        }
        match outcome {
            Ok(Reply::Appended(ok)) => {
                self.finish(op, OpResult::Appended { first: ok.first, last: ok.last });
                self.last_ack_ms = self.now;
            }
            Ok(Reply::Index(index)) => match self.ops[op].kind {
                OpKind::LinRead => {
                    let node = self.clients[c].leader_guess;
                    self.clients[c].waiting_read =
                        Some((op, node, index, self.now + REQUEST_TIMEOUT_MS));
                }
                _ => self.finish(op, OpResult::Done(Some(index))),
            },
            Ok(Reply::Done) => self.finish(op, OpResult::Done(None)),
            Ok(Reply::Stream(_) | Reply::StreamsState { .. }) => {
                unreachable!("the simulated clients send no stream commands")
            }
            Err(RequestError::NotLeader { leader }) => {
                let guess = leader.unwrap_or(self.any_node());
                self.clients[c].leader_guess = guess;
                self.clients[c].next_ms = self.now + 2;
                self.retry_or_give_up(op, "not leader");
            }
            Err(RequestError::Overloaded(_)) => {
                self.clients[c].next_ms = self.now + 5;
                self.retry_or_give_up(op, "overloaded");
            }
            Err(RequestError::Lost) => self.retry_or_give_up(op, "lost"),
            Err(RequestError::Unknown(_)) => self.retry_or_give_up(op, "unknown"),
            Err(e) => self.finish(op, OpResult::Failed(e.to_string())),
        }
    }

    /// A producer append is retried with the same sequence until it is answered (that is what
    /// dedup is for); anything else ends with an unknown outcome.
    pub(super) fn retry_or_give_up(&mut self, op: usize, why: &str) {
        let c = self.ops[op].client as usize;
        let retry = matches!(self.ops[op].kind, OpKind::Append { producer: Some(_), .. })
            && self.now < END_MS - 500;
        if retry {
            let line = format!("client {c} will retry op {op} ({why})");
            self.log(line);
            self.clients[c].queued = Some(op);
            self.clients[c].next_ms = self.clients[c].next_ms.max(self.now + 1);
        } else {
            self.finish(op, OpResult::Unknown);
        }
    }

    pub(super) fn finish(&mut self, op: usize, result: OpResult) {
        let c = self.ops[op].client as usize;
        let line = format!("client {c} op {op} {:?} -> {result:?}", self.ops[op].kind);
        self.log(line);
        self.ops[op].done_ms = Some(self.now);
        self.ops[op].result = Some(result);
        // Clients pause before their next op; pipelined producers (ids from 200) do not.
        if let Some(client) = self.clients.get_mut(c) {
            client.next_ms = client.next_ms.max(self.now + 1 + self.rng.below(4));
        }
    }

    /// The client's follower of the log reads on from where it stopped, on its node.
    pub(super) fn follow(&mut self, c: usize) {
        let i = self.index_of(self.clients[c].follow_node);
        let next = self.clients[c].follow_next;
        let page = match self.nodes[i].live.as_ref() {
            Some(l) => read_page(l.storage.wal(), || l.view.clone(), l.readable, next, 50, 1 << 20),
            None => {
                self.clients[c].follow_node = self.any_node();
                return;
            }
        };
        match page {
            Ok(page) => {
                self.clients[c].follow_next = page.next.max(next);
                self.clients[c].followed.extend(page.records);
            }
            Err(raftwal_server::read::ReadError::Trimmed { first, .. }) => {
                // Behind a trim: a real follower is told where the log starts and resumes there.
                self.clients[c].followed.push((first, Bytes::from_static(b"<trimmed>")));
                self.clients[c].follow_next = first;
            }
            Err(e) => self.violations.push(format!("follow read failed: {e}")),
        }
        if self.rng.below(200) == 0 {
            self.clients[c].follow_node = self.any_node();
        }
    }
}
