//! The network and the clock: sends, delivery with delays and loss, ticks, faults, partitions.

use super::*;

impl Sim {
    pub(super) fn send(&mut self, i: usize, msg: Message) {
        self.stats.messages += 1;
        let from_incarnation = self.nodes[i].incarnation;
        let faults = !self.liveness;
        let copies = if faults && self.rng.chance(self.params.dup_ppm) { 2 } else { 1 };
        for _ in 0..copies {
            let lost = (faults && self.rng.chance(self.params.drop_ppm))
                || self.net.len() >= IN_FLIGHT_MAX;
            let mut delay = self.rng.between(1, self.params.delay_max);
            if faults && self.rng.chance(self.params.long_delay_ppm) {
                delay += self.rng.between(5, 40);
            }
            let mut deliver_at = self.now + delay;
            if !faults {
                // Healed links deliver in order (as the transport's ordered streams do), so
                // that the liveness bound measures consensus, not reordering churn.
                let last = self.link_last.entry((msg.from, msg.to)).or_default();
                deliver_at = deliver_at.max(*last);
                *last = deliver_at;
            }
            self.net_seq += 1;
            let flight = Flight { msg: msg.clone(), from_incarnation, lost };
            self.net.insert((deliver_at, self.net_seq), flight);
        }
    }

    pub(super) fn deliver(&mut self) -> Check {
        let mut due = Vec::new();
        while let Some(entry) = self.net.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            due.push(entry.remove());
        }
        if !self.liveness {
            // Reordering across and within links. Healed links keep their (step, send) order.
            self.rng.shuffle(&mut due);
        }
        for flight in due {
            let Flight { msg, from_incarnation, lost } = flight;
            let (from, to) = (msg.from, msg.to);
            let to_i = (to.0 - 1) as usize;
            let from_i = (from.0 - 1) as usize;
            let delivered = !lost
                && !self.cuts.contains(&(from, to))
                && self.nodes.get(to_i).is_some_and(|n| n.raw.is_some());
            let install = matches!(msg.body, MessageBody::InstallLog { .. });
            if !delivered {
                self.stats.dropped += 1;
            } else {
                self.trace(format_args!("deliver {msg}"));
                let raw = self.raw(to_i);
                if let Err(err) = raw.step(msg.clone()) {
                    return Err(self.fail(format!("node {to} refused {msg}: {err}")));
                }
                self.drain(to_i)?;
            }
            if install {
                let sender = &mut self.nodes[from_i];
                if sender.incarnation == from_incarnation
                    && let Some(raw) = sender.raw.as_mut()
                {
                    raw.report_log_start(to, delivered);
                    self.drain(from_i)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn ticks(&mut self) -> Check {
        for i in self.up() {
            if !self.liveness && self.rng.chance(self.params.tick_skip_ppm) {
                continue;
            }
            if let Err(err) = self.raw(i).tick() {
                return Err(self.fail(format!("node {} tick: {err}", self.nodes[i].id)));
            }
            self.drain(i)?;
        }
        Ok(())
    }

    // ----- faults -----

    pub(super) fn faults(&mut self) -> Check {
        if self.rng.chance(self.params.crash_ppm) {
            // Leaders are the most interesting nodes to crash: half of the crashes pick one.
            let leaders = self.leaders_up();
            let pool =
                if self.rng.chance(500_000) && !leaders.is_empty() { leaders } else { self.up() };
            if let Some(i) = self.rng.pick(&pool) {
                self.crash(i);
            }
        }
        if self.rng.chance(self.params.partition_ppm) {
            self.partition();
        }
        if !self.cuts.is_empty() && self.rng.chance(self.params.heal_ppm) {
            self.cuts.clear();
            self.trace(format_args!("heal"));
        }
        Ok(())
    }

    pub(super) fn partition(&mut self) {
        let ids: Vec<NodeId> = self.nodes.iter().filter(|n| !n.retired).map(|n| n.id).collect();
        let kind = self.rng.below(3);
        let side: BTreeSet<NodeId> = if kind == 2 {
            self.rng.pick(&ids).into_iter().collect()
        } else {
            ids.iter().copied().filter(|_| self.rng.chance(500_000)).collect()
        };
        if side.is_empty() || side.len() == ids.len() {
            return;
        }
        self.cuts.clear();
        for &a in &side {
            for &b in ids.iter().filter(|b| !side.contains(b)) {
                self.cuts.insert((a, b));
                if kind != 1 {
                    self.cuts.insert((b, a));
                }
            }
        }
        self.stats.partitions += 1;
        let way = if kind == 1 { "one-way from" } else { "isolating" };
        self.trace(format_args!("partition {way} {side:?}"));
    }

    pub(super) fn enter_liveness(&mut self) -> Check {
        self.liveness = true;
        // A voter far behind needs time in proportion to what it lacks (the messages and the
        // window are small): one step per missing entry, on top of the commit deadline.
        let last = self.nodes.iter().map(|n| n.view.last_index()).max().unwrap_or_default();
        let voters = self.known_membership.1.all_voters();
        let behind = self.nodes.iter().filter(|n| voters.contains(&n.id)).map(|n| n.applied).min();
        self.catch_up_steps = last.0.saturating_sub(behind.unwrap_or_default().0);
        self.cuts.clear();
        self.params.delay_max = self.params.delay_max.min(3);
        self.params.persist_delay_max = self.params.persist_delay_max.min(3);
        self.trace(format_args!("liveness phase: heal, restart, no more drops"));
        for i in 0..self.nodes.len() {
            if !self.nodes[i].retired && self.nodes[i].raw.is_none() {
                self.start_node(i)?;
            }
        }
        Ok(())
    }

    // ----- workload -----
}
