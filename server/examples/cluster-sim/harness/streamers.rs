//! Pipelined producers, like the client's Appender.

use super::*;

impl Sim {
    pub(super) fn step_streamer(&mut self, k: usize) {
        let now = self.now;
        let st = &mut self.streamers[k];
        let in_flight = st.pending.iter().any(|p| p.2.is_some());
        if in_flight && now >= st.deadline_ms {
            st.broken = true;
            st.next_ms = now + 5;
        }
        if st.broken {
            if now < st.next_ms {
                return;
            }
            // A new stream: every unanswered append again, in order.
            st.broken = false;
            let ops: Vec<usize> = st.pending.iter().map(|p| p.0).collect();
            for p in st.pending.iter_mut() {
                p.2 = None;
            }
            for op in ops {
                self.stream_send(k, op);
            }
            return;
        }
        if st.pending.len() < st.window && now >= st.next_ms && now + 500 < END_MS {
            let seq = st.next_sequence;
            st.next_sequence += 1;
            let producer = st.producer;
            let records = vec![Bytes::from(format!("p{producer}-s{seq}-r0"))];
            let kind = OpKind::Append {
                records,
                producer: Some(ProducerSeq { id: producer, sequence: seq }),
                expected: None,
            };
            let op = self.new_op(producer, kind);
            self.streamers[k].pending.push_back((op, seq, None));
            self.streamers[k].next_ms = now + self.rng.below(3);
            self.stream_send(k, op);
        }
    }

    pub(super) fn stream_send(&mut self, k: usize, op: usize) {
        let i = self.index_of(self.streamers[k].node);
        let OpKind::Append { records, producer, .. } = self.ops[op].kind.clone() else {
            unreachable!("streamers append")
        };
        if self.nodes[i].live.is_none() {
            let other = self.any_node();
            let st = &mut self.streamers[k];
            st.node = other;
            st.broken = true;
            st.next_ms = self.now + 5;
            return;
        }
        let id = self.next_request;
        self.next_request += 1;
        self.stream_requests.insert(id, (k, op));
        let st = &mut self.streamers[k];
        if let Some(p) = st.pending.iter_mut().find(|p| p.0 == op) {
            p.2 = Some(id);
        }
        if !st.pending.iter().any(|p| p.2.is_some() && p.0 != op) {
            st.deadline_ms = self.now + REQUEST_TIMEOUT_MS;
        }
        let request = Request::Append(AppendReq { records, expected_next: None, producer });
        self.input(i, Input::Request { id, request });
    }

    pub(super) fn stream_reply(&mut self, k: usize, op: usize, outcome: Outcome) {
        let other = self.any_node();
        let st = &mut self.streamers[k];
        // An answer on a stream that was replaced since is dropped, as a real client's is.
        let live = st.pending.iter().any(|p| p.0 == op && p.2.is_some());
        if !live {
            return;
        }
        match outcome {
            Ok(Reply::Appended(ok)) => {
                st.pending.retain(|p| p.0 != op);
                self.last_ack_ms = self.now;
                self.finish(op, OpResult::Appended { first: ok.first, last: ok.last });
            }
            Err(RequestError::NotLeader { leader }) => {
                st.node = leader.unwrap_or(other);
                st.broken = true;
                st.next_ms = self.now + 2;
            }
            Err(RequestError::Overloaded(_) | RequestError::Lost | RequestError::Unknown(_)) => {
                st.broken = true;
                st.next_ms = self.now + 5;
            }
            Err(e) => {
                // Final: this append is not in the log; the ones after it go on.
                st.pending.retain(|p| p.0 != op);
                self.finish(op, OpResult::Failed(e.to_string()));
            }
            Ok(other) => self.finish(op, OpResult::Failed(format!("unexpected {other:?}"))),
        }
    }
}
