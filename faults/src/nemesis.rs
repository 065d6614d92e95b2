//! The nemesis: injects one fault at a time, at random times drawn from the seed, heals it,
//! and records what happened (including a node that did not come back, and why).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use rand::Rng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;

use crate::cluster::Cluster;
use crate::disk;
use crate::history::{FaultEvent, Recorder};
use crate::net::Net;

/// Every kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    Kill,
    KillLeader,
    KillAll,
    Pause,
    PauseLeader,
    Partition,
    PartitionLeader,
    PartitionOneWay,
    PartitionBridge,
    Bitflip,
    Truncate,
    Meta,
    LogStart,
    DiskFull,
}

impl FaultKind {
    pub const ALL: [FaultKind; 14] = [
        FaultKind::Kill,
        FaultKind::KillLeader,
        FaultKind::KillAll,
        FaultKind::Pause,
        FaultKind::PauseLeader,
        FaultKind::Partition,
        FaultKind::PartitionLeader,
        FaultKind::PartitionOneWay,
        FaultKind::PartitionBridge,
        FaultKind::Bitflip,
        FaultKind::Truncate,
        FaultKind::Meta,
        FaultKind::LogStart,
        FaultKind::DiskFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::KillLeader => "kill-leader",
            FaultKind::KillAll => "kill-all",
            FaultKind::Pause => "pause",
            FaultKind::PauseLeader => "pause-leader",
            FaultKind::Partition => "partition",
            FaultKind::PartitionLeader => "partition-leader",
            FaultKind::PartitionOneWay => "partition-oneway",
            FaultKind::PartitionBridge => "partition-bridge",
            FaultKind::Bitflip => "bitflip",
            FaultKind::Truncate => "truncate",
            FaultKind::Meta => "meta",
            FaultKind::LogStart => "log-start",
            FaultKind::DiskFull => "disk-full",
        }
    }

    pub fn needs_net(self) -> bool {
        matches!(
            self,
            FaultKind::Partition
                | FaultKind::PartitionLeader
                | FaultKind::PartitionOneWay
                | FaultKind::PartitionBridge
        )
    }

    /// Parses a comma-separated list: kind names, `all`, or the groups `kills`, `pauses`,
    /// `partitions`, `disk`.
    pub fn parse_list(list: &str) -> anyhow::Result<Vec<FaultKind>> {
        let mut out = Vec::new();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let group: Vec<FaultKind> = match word {
                "all" => FaultKind::ALL.to_vec(),
                "kills" => vec![FaultKind::Kill, FaultKind::KillLeader, FaultKind::KillAll],
                "pauses" => vec![FaultKind::Pause, FaultKind::PauseLeader],
                "partitions" => FaultKind::ALL.into_iter().filter(|k| k.needs_net()).collect(),
                "disk" => vec![
                    FaultKind::Bitflip,
                    FaultKind::Truncate,
                    FaultKind::Meta,
                    FaultKind::LogStart,
                    FaultKind::DiskFull,
                ],
                name => match FaultKind::ALL.into_iter().find(|k| k.name() == name) {
                    Some(k) => vec![k],
                    None => bail!(
                        "unknown fault kind {name:?}; kinds: {}, or all, kills, pauses, partitions, disk",
                        FaultKind::ALL.map(FaultKind::name).join(", ")
                    ),
                },
            };
            for k in group {
                if !out.contains(&k) {
                    out.push(k);
                }
            }
        }
        if out.is_empty() {
            bail!("--faults names no fault kind");
        }
        Ok(out)
    }
}

/// How long a node may take to come back before the harness says it did not.
const COME_BACK: Duration = Duration::from_secs(15);
/// How long a node with a damaged log may take to start, repair itself from its peers and
/// follow the leader again.
const REPAIR_WITHIN: Duration = Duration::from_secs(20);

/// Injects faults until told to stop.
#[derive(Debug)]
pub struct Nemesis {
    pub kinds: Vec<FaultKind>,
    pub net: Option<Net>,
    pub rng: SmallRng,
    pub rec: Arc<Recorder>,
}

/// A fault in progress, for its event record.
struct Event {
    kind: FaultKind,
    detail: String,
    /// When the fault took effect (after finding the leader, if it needed one).
    effect_us: Option<u64>,
    notes: Vec<String>,
    node_not_back: bool,
}

impl Nemesis {
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.rng.random_range(lo..=hi))
    }

    fn pick(&mut self, ids: &[u64]) -> u64 {
        ids[self.rng.random_range(0..ids.len())]
    }

    /// Injects faults for `duration`, one at a time with quiet gaps of 0.2-0.9 s between them
    /// (dense enough for over 40 faults in two minutes, with 3 nodes or 5).
    pub async fn run(&mut self, cluster: &mut Cluster, duration: Duration) {
        let deadline = tokio::time::Instant::now() + duration;
        // Kinds are drawn like cards from a shuffled deck, so every kind comes up once before
        // any comes up twice.
        let mut deck: Vec<FaultKind> = Vec::new();
        loop {
            let gap = self.ms(200, 900);
            tokio::time::sleep(gap).await;
            if tokio::time::Instant::now() + Duration::from_secs(2) >= deadline {
                break;
            }
            if deck.is_empty() {
                deck = self.kinds.clone();
                deck.shuffle(&mut self.rng);
            }
            let Some(kind) = deck.pop() else { break };
            let start_us = self.rec.now_us();
            let mut event = Event {
                kind,
                detail: String::new(),
                effect_us: None,
                notes: Vec::new(),
                node_not_back: false,
            };
            if let Err(e) = self.inject(cluster, &mut event).await {
                event.notes.push(format!("harness error: {e:#}"));
            }
            let healed_us = self.rec.now_us();
            let start_us = event.effect_us.unwrap_or(start_us);
            eprintln!(
                "[{:>7.1}s] {:<16} {}{}",
                start_us as f64 / 1e6,
                kind.name(),
                event.detail,
                if event.notes.is_empty() {
                    String::new()
                } else {
                    format!("; {}", event.notes.join("; "))
                }
            );
            self.rec.fault(FaultEvent {
                kind: kind.name().to_string(),
                detail: event.detail,
                start_us,
                healed_us,
                notes: event.notes,
                node_not_back: event.node_not_back,
            });
        }
    }

    async fn leader_or_random(&mut self, cluster: &Cluster) -> (u64, bool) {
        match cluster.leader().await {
            Some(id) => (id, true),
            None => (self.pick(&cluster.ids()), false),
        }
    }

    /// Restarts node `id` and waits for it; notes it if it does not come back.
    async fn come_back(&mut self, cluster: &mut Cluster, id: u64, event: &mut Event) -> bool {
        if let Err(e) = cluster.start(id) {
            event.notes.push(format!("could not start node {id}: {e:#}"));
            event.node_not_back = true;
            return false;
        }
        match cluster.wait_ready(id, COME_BACK).await {
            Ok(()) => true,
            Err(why) => {
                event.notes.push(format!("NODE DID NOT COME BACK: {why}"));
                event.node_not_back = true;
                false
            }
        }
    }

    async fn inject(&mut self, cluster: &mut Cluster, event: &mut Event) -> anyhow::Result<()> {
        let ids = cluster.ids();
        match event.kind {
            FaultKind::Kill | FaultKind::KillLeader => {
                let (id, leader) = if event.kind == FaultKind::Kill {
                    let id = self.pick(&ids);
                    (id, !self.leader_note(cluster, id).await.is_empty())
                } else {
                    self.leader_or_random(cluster).await
                };
                let down = self.ms(300, 2000);
                event.detail = format!(
                    "kill -9 node {id}{} for {down:?}",
                    if leader {
                        " (the leader)"
                    } else if event.kind == FaultKind::KillLeader {
                        " (no leader known; a random node)"
                    } else {
                        ""
                    }
                );
                cluster.kill9(id).await;
                event.effect_us = Some(self.rec.now_us());
                tokio::time::sleep(down).await;
                self.come_back(cluster, id, event).await;
            }
            FaultKind::KillAll => {
                let down = self.ms(300, 2000);
                event.detail = format!("kill -9 every node for {down:?}");
                for &id in &ids {
                    cluster.kill9(id).await;
                }
                event.effect_us = Some(self.rec.now_us());
                tokio::time::sleep(down).await;
                for &id in &ids {
                    if let Err(e) = cluster.start(id) {
                        event.notes.push(format!("could not start node {id}: {e:#}"));
                    }
                }
                for &id in &ids {
                    if let Err(why) = cluster.wait_ready(id, COME_BACK).await {
                        event.notes.push(format!("NODE DID NOT COME BACK: {why}"));
                        event.node_not_back = true;
                    }
                }
            }
            FaultKind::Pause | FaultKind::PauseLeader => {
                let (id, leader) = if event.kind == FaultKind::Pause {
                    let id = self.pick(&ids);
                    (id, !self.leader_note(cluster, id).await.is_empty())
                } else {
                    self.leader_or_random(cluster).await
                };
                let hold = self.ms(500, 3000);
                event.detail = format!(
                    "SIGSTOP node {id}{} for {hold:?}",
                    if leader { " (the leader)" } else { "" }
                );
                cluster.signal_pause(id, true)?;
                event.effect_us = Some(self.rec.now_us());
                tokio::time::sleep(hold).await;
                cluster.signal_pause(id, false)?;
                if let Err(why) = cluster.wait_ready(id, COME_BACK).await {
                    event.notes.push(format!("NODE DID NOT RECOVER after SIGCONT: {why}"));
                    event.node_not_back = true;
                }
            }
            kind if kind.needs_net() => self.partition(cluster, event).await?,
            FaultKind::DiskFull => self.disk_full(cluster, event).await?,
            _ => self.damage(cluster, event).await?,
        }
        Ok(())
    }

    async fn partition(&mut self, cluster: &mut Cluster, event: &mut Event) -> anyhow::Result<()> {
        let Some(mut net) = self.net.take() else { bail!("partitions are unavailable") };
        let result = self.partition_with(&mut net, cluster, event).await;
        let healed = net.heal();
        self.net = Some(net);
        result?;
        healed?;
        for id in cluster.ids() {
            if let Err(why) = cluster.wait_ready(id, COME_BACK).await {
                event.notes.push(format!("NODE DID NOT RECOVER after the partition healed: {why}"));
                event.node_not_back = true;
            }
        }
        Ok(())
    }

    async fn partition_with(
        &mut self,
        net: &mut Net,
        cluster: &mut Cluster,
        event: &mut Event,
    ) -> anyhow::Result<()> {
        let mut ids = cluster.ids();
        let ip = |id: u64| cluster.spec(id).ip;
        let hold = self.ms(1000, 3500);
        let leader = cluster.leader().await;
        match event.kind {
            FaultKind::Partition => {
                ids.shuffle(&mut self.rng);
                let minority = self.rng.random_range(1..=(ids.len() - 1) / 2);
                let (a, b) = ids.split_at(minority);
                event.detail = format!("split minority {a:?} from majority {b:?} for {hold:?}");
                net.split(
                    &a.iter().map(|&i| ip(i)).collect::<Vec<_>>(),
                    &b.iter().map(|&i| ip(i)).collect::<Vec<_>>(),
                )?;
            }
            FaultKind::PartitionLeader => {
                let (leader, known) = match leader {
                    Some(l) => (l, true),
                    None => (self.pick(&ids), false),
                };
                let rest: Vec<u64> = ids.iter().copied().filter(|&i| i != leader).collect();
                event.detail = format!(
                    "isolate node {leader}{} from {rest:?} for {hold:?}",
                    if known { " (the leader)" } else { " (no leader known)" }
                );
                net.split(&[ip(leader)], &rest.iter().map(|&i| ip(i)).collect::<Vec<_>>())?;
            }
            FaultKind::PartitionOneWay => {
                let leader = match leader {
                    Some(l) => l,
                    None => self.pick(&ids),
                };
                let rest: Vec<u64> = ids.iter().copied().filter(|&i| i != leader).collect();
                if self.rng.random_bool(0.5) {
                    event.detail = format!(
                        "one-way: drop everything node {leader} (leader) sends to {rest:?} (it still hears them) for {hold:?}"
                    );
                    for &r in &rest {
                        net.cut(ip(leader), ip(r))?;
                    }
                } else {
                    event.detail = format!(
                        "one-way: drop everything {rest:?} send to node {leader} (leader) (they still hear it) for {hold:?}"
                    );
                    for &r in &rest {
                        net.cut(ip(r), ip(leader))?;
                    }
                }
            }
            _ => {
                ids.shuffle(&mut self.rng);
                let bridge = ids[0];
                let rest = &ids[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                event.detail = format!(
                    "bridge: {a:?} and {b:?} cannot talk, node {bridge} talks to both, for {hold:?}"
                );
                net.split(
                    &a.iter().map(|&i| ip(i)).collect::<Vec<_>>(),
                    &b.iter().map(|&i| ip(i)).collect::<Vec<_>>(),
                )?;
            }
        }
        // In effect once every rule is in place (each is one nft command).
        event.effect_us = Some(self.rec.now_us());
        tokio::time::sleep(hold).await;
        Ok(())
    }

    /// The leader, to say so in a fault's description: " (the leader)" or "".
    async fn leader_note(&self, cluster: &Cluster, id: u64) -> &'static str {
        if cluster.leader().await == Some(id) { " (the leader)" } else { "" }
    }

    async fn damage(&mut self, cluster: &mut Cluster, event: &mut Event) -> anyhow::Result<()> {
        let id = self.pick(&cluster.ids());
        let data_dir = cluster.spec(id).data_dir.clone();
        cluster.kill9(id).await;
        let damage = match event.kind {
            FaultKind::Bitflip => disk::flip_segment_bit(&data_dir, &mut self.rng),
            FaultKind::Truncate => disk::truncate_segment(&data_dir, &mut self.rng),
            FaultKind::Meta => disk::damage_meta(&data_dir, &mut self.rng),
            _ => disk::damage_log_start(&data_dir, &mut self.rng),
        };
        let damage = match damage {
            Ok(d) => d,
            Err(e) => {
                event.detail = format!("node {id} stopped; no damage done: {e:#}");
                self.come_back(cluster, id, event).await;
                return Ok(());
            }
        };
        event.detail = format!("kill -9 node {id}, {}, start it", damage.detail);
        let started = std::time::Instant::now();
        if self.come_back(cluster, id, event).await {
            let log = cluster.log_since_start(id);
            // A tail cut below the saved commit index: the node follows at once but votes
            // again only after the next election (its floor is "any later term").
            let tail_cut = log.contains("ends below its saved commit index");
            let repairing = tail_cut
                || log.contains("damage in the WAL")
                || log.contains("log-start file is damaged");
            if !repairing {
                event
                    .notes
                    .push(format!("node {id} came back with the damage (nothing to repair)"));
                return Ok(());
            }
            // It must repair itself from its peers with no help: back at its floor and
            // following the leader's commit.
            let deadline = started + REPAIR_WITHIN;
            loop {
                let log = cluster.log_since_start(id);
                let done = tail_cut
                    || log.contains("repair from peers complete")
                    || !log.contains("repairing from peers");
                if done && self.catching_up(cluster, id).await {
                    let what = if tail_cut {
                        "follows again (a committed tail was cut; it votes again once a later \
                         term's leader appends to it)"
                    } else {
                        "repaired itself from peers"
                    };
                    event.notes.push(format!(
                        "node {id} {what} in {:.2} s",
                        started.elapsed().as_secs_f64()
                    ));
                    return Ok(());
                }
                if std::time::Instant::now() >= deadline {
                    event.notes.push(format!(
                        "NODE DID NOT REPAIR ITSELF within {REPAIR_WITHIN:?}; its log ends: {}",
                        cluster.log_tail(id, 3)
                    ));
                    event.node_not_back = true;
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // A node that refuses its damaged files: put the bytes back so the run can go on, and
        // say so.
        cluster.kill9(id).await;
        damage.undo()?;
        event.notes.push(format!("harness restored the damaged file of node {id}"));
        if self.come_back(cluster, id, event).await {
            event.notes.push(format!("node {id} came back after the restore"));
        }
        Ok(())
    }

    async fn disk_full(&mut self, cluster: &mut Cluster, event: &mut Event) -> anyhow::Result<()> {
        let (id, leader) = if self.rng.random_bool(0.5) {
            self.leader_or_random(cluster).await
        } else {
            (self.pick(&cluster.ids()), false)
        };
        let Some(mount) = cluster.spec(id).mount.clone() else {
            bail!("node {id} has no tmpfs of its own (not root)")
        };
        let hold = self.ms(2500, 5000);
        let filled = fill_blocking(&mount).await?;
        event.detail = format!(
            "filled node {id}'s tmpfs{} with a {} MiB ballast for {hold:?}, then freed it",
            if leader { " (the leader)" } else { "" },
            filled >> 20
        );
        tokio::time::sleep(hold).await;
        let during = cluster.exited(id);
        disk::free(&mount);
        if let Some(why) = during {
            event.notes.push(format!(
                "node {id} {why} while the disk was full; its log ends: {}",
                cluster.log_tail(id, 2)
            ));
        }
        // Freed: does it carry on by itself (alive, following the leader's commit)?
        tokio::time::sleep(Duration::from_secs(2)).await;
        let carried_on = self.catching_up(cluster, id).await;
        if carried_on {
            return Ok(());
        }
        let state = cluster.exited(id);
        event.notes.push(match state {
            Some(why) => format!("NODE DID NOT RECOVER after the disk was freed: node {id} {why}"),
            None => format!(
                "NODE DID NOT RECOVER after the disk was freed: node {id} runs but does not keep up with the leader's commit; its log ends: {}",
                cluster.log_tail(id, 3)
            ),
        });
        event.node_not_back = true;
        cluster.kill9(id).await;
        if self.come_back(cluster, id, event).await {
            event.notes.push(format!("node {id} came back after a restart"));
        }
        Ok(())
    }

    /// Whether node `id` runs and its commit reaches the leader's within 5 s.
    async fn catching_up(&mut self, cluster: &mut Cluster, id: u64) -> bool {
        if cluster.exited(id).is_some() {
            return false;
        }
        let Some(leader) = cluster.wait_leader(Duration::from_secs(5)).await else { return false };
        let Some(target) = cluster.status(leader).await.map(|s| s.commit_offset) else {
            return false;
        };
        for _ in 0..25 {
            if let Some(s) = cluster.status(id).await
                && s.commit_offset >= target
                && s.applied_offset >= target
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }
}

async fn fill_blocking(mount: &Path) -> anyhow::Result<u64> {
    let mount = mount.to_path_buf();
    tokio::task::spawn_blocking(move || disk::fill(&mount)).await?
}
