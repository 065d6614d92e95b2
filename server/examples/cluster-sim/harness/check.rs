//! The checker: what clients were told against what every node serves.

use super::*;

impl Sim {
    /// What node `i` serves: its first readable offset, its settled index, the records.
    pub(super) fn served_log(
        &self,
        i: usize,
    ) -> Option<(LogIndex, LogIndex, BTreeMap<LogIndex, Bytes>)> {
        let l = self.nodes[i].live.as_ref()?;
        let mut out = BTreeMap::new();
        let first = l.view.start.max(l.storage.wal().first_index());
        let mut next = first;
        loop {
            match read_page(l.storage.wal(), || l.view.clone(), l.readable, next, 1000, 64 << 20) {
                Ok(page) if page.records.is_empty() => break,
                Ok(page) => {
                    next = page.next;
                    out.extend(page.records);
                }
                Err(_) => return None,
            }
        }
        Some((first, l.readable, out))
    }

    pub(super) fn check(&mut self) {
        // Where every node ended, for the history of a failing seed.
        for i in 0..self.nodes.len() {
            if let Some(l) = self.nodes[i].live.as_ref() {
                let s = l.core.status();
                let wal = l.storage.wal();
                let tail: Vec<String> = (s.commit.0.saturating_sub(2)..=s.commit.0 + 3)
                    .filter_map(|i| wal.term(LogIndex(i)).ok().map(|t| format!("{i}:{t}")))
                    .collect();
                let line = format!(
                    "end: node {} {:?} term {} commit {} applied {} last {} first {} terms [{}] \
                     membership {:?}",
                    s.id,
                    s.role,
                    s.term,
                    s.commit,
                    s.applied,
                    s.last_index,
                    wal.first_index(),
                    tail.join(" "),
                    s.membership
                );
                self.log(line);
            }
        }
        if self.trace {
            self.log_conf_changes();
        }
        let mut v = Vec::new();
        // Liveness: after the heal, a leader and acknowledged appends.
        if self.leader_index().is_none() {
            v.push("no leader at the end, 3 s after every fault healed".to_string());
        }
        if self.last_ack_ms + 500 < END_MS {
            v.push(format!(
                "no append acknowledged in the last 500 ms of a healed cluster (last at {} ms)",
                self.last_ack_ms
            ));
        }
        self.check_committed_agree(&mut v);
        let log = self.check_logs(&mut v);
        let acked = self.check_acked(&log, &mut v);
        check_unique_and_in_producer_order(&log, &mut v);
        self.check_real_time(acked, &mut v);
        self.check_reads_and_follows(&log, &mut v);
        self.check_named_streams(&mut v);
        v.truncate(20);
        self.violations.extend(v);
    }

    /// Named streams: on every node each writer's stream holds its messages once each, in
    /// (epoch, sequence) order, its version counting them; the nodes agree (each holds a prefix
    /// of what the node that applied the most holds); and that node holds every message a
    /// writer was told was appended.
    fn check_named_streams(&mut self, v: &mut Vec<String>) {
        // Every node got a stream state back (3 s after healing), and nodes applied to the same
        // index hold the same state, producers and all.
        let mut states: BTreeMap<LogIndex, (u64, Bytes)> = BTreeMap::new();
        for n in &self.nodes {
            let Some(l) = n.live.as_ref() else { continue };
            if l.streams_missing.is_some() {
                v.push(format!("node {}: its stream state is still missing at the end", n.id));
                continue;
            }
            if let Ok(Reply::StreamsState { at, state }) = l.core.streams_state(LogIndex(0)) {
                match states.get(&at) {
                    Some((other, s)) if *s != state => v.push(format!(
                        "nodes {other} and {} hold different stream states applied to {at}",
                        n.id
                    )),
                    Some(_) => {}
                    None => {
                        states.insert(at, (n.id.0, state));
                    }
                }
            }
        }
        for k in 0..self.named.len() {
            let (name, acked) = (self.named[k].stream.clone(), self.named[k].acked.clone());
            let mut lists: Vec<(LogIndex, u64, Vec<String>)> = Vec::new();
            for n in &self.nodes {
                let Some(l) = n.live.as_ref().filter(|l| l.streams_missing.is_none()) else {
                    continue;
                };
                let Some(view) = l.streams.get(&name) else {
                    lists.push((l.readable, n.id.0, Vec::new()));
                    continue;
                };
                let lookup = |s: &str| l.streams.get(s).cloned();
                let messages = match raftwal_server::read::read_stream(
                    l.storage.wal(),
                    &lookup,
                    view,
                    0,
                    u64::MAX,
                ) {
                    Ok(m) => m,
                    Err(e) => {
                        v.push(format!("node {}: read of {name} failed: {e}", n.id));
                        continue;
                    }
                };
                let texts: Vec<String> = messages
                    .iter()
                    .map(|m| String::from_utf8_lossy(&m.data).into_owned())
                    .collect();
                if view.version != texts.len() as u64 {
                    v.push(format!(
                        "node {}: {name} says version {} but holds {} messages",
                        n.id,
                        view.version,
                        texts.len()
                    ));
                }
                let order: Vec<(u64, u64)> = texts
                    .iter()
                    .filter_map(|t| {
                        let (e, s) =
                            t.trim_end_matches(';').split_once("-e")?.1.split_once("-s")?;
                        Some((e.parse().ok()?, s.parse().ok()?))
                    })
                    .collect();
                if let Some(w) = order.windows(2).find(|w| w[0] >= w[1]) {
                    v.push(format!(
                        "node {}: {name} holds (epoch, sequence) {:?} then {:?}: a repeat or out of order",
                        n.id, w[0], w[1]
                    ));
                }
                lists.push((l.readable, n.id.0, texts));
            }
            let Some((_, most_id, most)) = lists.iter().max_by_key(|l| (l.0, l.2.len())).cloned()
            else {
                continue;
            };
            for (_, id, list) in &lists {
                if most.get(..list.len()) != Some(&list[..]) {
                    let at = list.iter().zip(&most).position(|(a, b)| a != b).unwrap_or(most.len());
                    v.push(format!(
                        "node {id}'s {name} ({} messages) is not a prefix of node {most_id}'s ({}): \
                         message {at} is {:?} there, {:?} here",
                        list.len(),
                        most.len(),
                        most.get(at),
                        list.get(at)
                    ));
                }
            }
            for m in &acked {
                if !most.contains(m) {
                    v.push(format!(
                        "{name}: {m} was acknowledged but node {most_id} does not hold it"
                    ));
                }
            }
        }
    }

    /// Every node's membership changes, by index and term (`SIM_TRACE=1`).
    fn log_conf_changes(&mut self) {
        let mut lines = Vec::new();
        for n in &self.nodes {
            let Some(l) = n.live.as_ref() else { continue };
            let wal = l.storage.wal();
            let (first, last) = (wal.first_index(), wal.last_index());
            let Ok(records) = wal.read(first..last.next(), u64::MAX) else { continue };
            for rec in records {
                let Ok(e) = raftwal_server::store::entry_of(rec) else { continue };
                if e.kind == raftwal_consensus::EntryKind::ConfChange {
                    let change = raftwal_consensus::ConfChange::decode(&e.data);
                    lines.push(format!("node {} log {}/{}: {change:?}", n.id, e.term, e.index));
                }
            }
        }
        for line in lines {
            self.log(line);
        }
    }

    /// State machine safety, on the nodes' own state: no two nodes hold entries of different
    /// terms at an index both consider committed (whether or not a client saw either).
    fn check_committed_agree(&self, v: &mut Vec<String>) {
        let nodes: Vec<(NodeId, LogIndex, LogIndex, &Wal)> = self
            .nodes
            .iter()
            .filter_map(|n| {
                let l = n.live.as_ref()?;
                let wal = l.storage.wal().as_ref();
                Some((n.id, wal.first_index(), l.core.status().commit.min(wal.last_index()), wal))
            })
            .collect();
        for (k, a) in nodes.iter().enumerate() {
            for b in &nodes[k + 1..] {
                let (from, to) = (a.1.max(b.1), a.2.min(b.2));
                let mut i = from;
                while i <= to {
                    let (ta, tb) = (a.3.term(i), b.3.term(i));
                    if let (Ok(ta), Ok(tb)) = (ta, tb)
                        && ta != tb
                    {
                        v.push(format!(
                            "index {i} is committed on node {} with term {ta} and on node {} \
                             with term {tb}",
                            a.0, b.0
                        ));
                        break;
                    }
                    i = i.next();
                }
            }
        }
    }

    /// Every node serves the same records on the range they all hold; returns the union.
    fn check_logs(&self, v: &mut Vec<String>) -> FinalLog {
        let mut held = Vec::new();
        let logs: Vec<(NodeId, LogIndex, BTreeMap<LogIndex, Bytes>)> = (0..self.nodes.len())
            .filter_map(|i| {
                let (first, readable, log) = self.served_log(i)?;
                // The range this node can vouch for (nothing, for the spare never added).
                if first <= readable {
                    held.push((first, readable));
                }
                Some((self.nodes[i].id, first, log))
            })
            .collect();
        let mut all: BTreeMap<LogIndex, Bytes> = BTreeMap::new();
        for (id, _, log) in &logs {
            for (o, b) in log {
                match all.get(o) {
                    Some(other) if other != b => v.push(format!(
                        "node {id} serves {b:?} at {o}, another node serves {other:?}"
                    )),
                    _ => {
                        all.insert(*o, b.clone());
                    }
                }
            }
        }
        // The same offsets served, too, by the final members on the range they all hold: one
        // may not hide what another serves.
        let members = self
            .leader_index()
            .map(|l| self.nodes[l].live.as_ref().expect("a leader runs").core.status())
            .map(|s| s.membership.members())
            .unwrap_or_default();
        let logs: Vec<_> = logs.into_iter().filter(|l| members.contains(&l.0)).collect();
        let common_from = logs.iter().map(|l| l.1).max().unwrap_or(LogIndex(1));
        let common_to = logs
            .iter()
            .map(|l| l.2.keys().next_back().copied().unwrap_or(LogIndex(0)))
            .min()
            .unwrap_or(LogIndex(0));
        if common_from > common_to {
            return FinalLog { all, held };
        }
        for (id, _, log) in &logs {
            for (o, _) in all.range(common_from..=common_to) {
                if !log.contains_key(o) {
                    v.push(format!("node {id} does not serve {o}, which another node serves"));
                }
            }
        }
        FinalLog { all, held }
    }

    /// No acknowledged append lost: every acknowledged offset holds exactly its record.
    /// Returns the acknowledged appends as (sent, acknowledged, first, last).
    fn check_acked(&self, log: &FinalLog, v: &mut Vec<String>) -> Vec<Acked> {
        let mut acked = Vec::new();
        for (n, op) in self.ops.iter().enumerate() {
            let (OpKind::Append { records, .. }, Some(OpResult::Appended { first, last })) =
                (&op.kind, &op.result)
            else {
                continue;
            };
            acked.push(Acked {
                sent: op.sent_ms,
                done: op.done_ms.expect("done"),
                first: *first,
                last: *last,
            });
            if last.0 - first.0 + 1 != records.len() as u64 {
                v.push(format!(
                    "op {n}: {} records acknowledged at {first}..={last}",
                    records.len()
                ));
                continue;
            }
            for (k, r) in records.iter().enumerate() {
                let o = LogIndex(first.0 + k as u64);
                if !log.holds(o) {
                    continue; // trimmed on every node that had it
                }
                match log.all.get(&o) {
                    Some(b) if b == r => {}
                    got => {
                        v.push(format!("op {n}: acknowledged {r:?} at {o}, the log has {got:?}"))
                    }
                }
            }
        }
        acked
    }

    /// Real-time order (an append acknowledged before another was sent has lower offsets), and
    /// a linearizable read sees every append acknowledged before it was sent.
    fn check_real_time(&self, acked: Vec<Acked>, v: &mut Vec<String>) {
        let mut by_ack = acked.clone();
        by_ack.sort_by_key(|a| a.done);
        let mut by_sent = acked;
        by_sent.sort_by_key(|a| a.sent);
        let mut k = 0;
        let mut max_last = LogIndex(0);
        for b in &by_sent {
            while k < by_ack.len() && by_ack[k].done < b.sent {
                max_last = max_last.max(by_ack[k].last);
                k += 1;
            }
            if max_last >= b.first {
                v.push(format!(
                    "an append sent at {} ms got {}, below {max_last} acknowledged before it",
                    b.sent, b.first
                ));
            }
        }
        for (n, op) in self.ops.iter().enumerate() {
            if let (OpKind::LinRead, Some(OpResult::ReadAt(at))) = (&op.kind, &op.result) {
                let before = by_ack
                    .iter()
                    .filter(|a| a.done < op.sent_ms)
                    .map(|a| a.last)
                    .max()
                    .unwrap_or(LogIndex(0));
                if *at < before {
                    v.push(format!("op {n}: linearizable read at {at} misses {before}"));
                }
            }
        }
    }

    /// What any read served never changes; a follow never skips, repeats or goes back.
    fn check_reads_and_follows(&self, log: &FinalLog, v: &mut Vec<String>) {
        let all = &log.all;
        for (n, op) in self.ops.iter().enumerate() {
            if let Some(OpResult::Records(records)) = &op.result {
                for (o, b) in records {
                    if log.holds(*o) && all.get(o) != Some(b) {
                        v.push(format!(
                            "op {n}: a read served {b:?} at {o}; the log has {:?}",
                            all.get(o)
                        ));
                    }
                }
            }
        }
        for c in &self.clients {
            let mut prev = LogIndex(0);
            for (o, b) in &c.followed {
                if b.as_ref() == b"<trimmed>" {
                    prev = o.prev();
                    continue;
                }
                if *o <= prev {
                    v.push(format!("client {}'s follow went from {prev} to {o}", c.id));
                }
                if log.holds(*o) {
                    if all.get(o) != Some(b) {
                        v.push(format!(
                            "client {}'s follow saw {b:?} at {o}; the log has {:?}",
                            c.id,
                            all.get(o)
                        ));
                    }
                    // Nothing served between the previous record and this one was skipped.
                    if let Some((skipped, _)) = all.range(prev.next()..*o).next() {
                        v.push(format!("client {}'s follow skipped {skipped}", c.id));
                    }
                }
                prev = *o;
            }
        }
    }
}

/// The log every node serves, merged, from the lowest first offset any node still has.
struct FinalLog {
    all: BTreeMap<LogIndex, Bytes>,
    /// Per node, the offsets it can vouch for: its first readable offset to its settled index.
    held: Vec<(LogIndex, LogIndex)>,
}

impl FinalLog {
    /// Whether some node still holds offset `o` (else it was trimmed wherever it was).
    fn holds(&self, o: LogIndex) -> bool {
        self.held.iter().any(|&(first, last)| first <= o && o <= last)
    }
}

/// An acknowledged append.
#[derive(Clone, Copy)]
struct Acked {
    sent: u64,
    done: u64,
    first: LogIndex,
    last: LogIndex,
}

/// No record twice; a producer's records are in the log in sequence order.
fn check_unique_and_in_producer_order(log: &FinalLog, v: &mut Vec<String>) {
    let mut seen: HashMap<&Bytes, LogIndex> = HashMap::new();
    for (o, b) in &log.all {
        if let Some(before) = seen.insert(b, *o) {
            v.push(format!("{b:?} is in the log twice: at {before} and {o}"));
        }
    }
    let mut last_seq: HashMap<&str, (u64, LogIndex)> = HashMap::new();
    for (o, b) in &log.all {
        let text = std::str::from_utf8(b).unwrap_or("");
        let mut parts = text.split('-');
        let (Some(who), Some(seq)) = (parts.next(), parts.next()) else { continue };
        let Some(seq) = seq.strip_prefix('s').and_then(|x| x.parse::<u64>().ok()) else {
            continue;
        };
        if let Some(&(prev, at)) = last_seq.get(who)
            && seq < prev
        {
            v.push(format!("{who}'s sequence {seq} is at {o}, after sequence {prev} at {at}"));
        }
        last_seq.insert(who, (seq, *o));
    }
}
