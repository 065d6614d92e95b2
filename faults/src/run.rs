//! One run: make and start the cluster, drive the workload while the nemesis injects faults,
//! heal everything, restart every node, read every node's log back, check, report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use raftwal_client::{Client, Offset};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::checker;
use crate::cluster::{Cluster, find_raftwal, is_root};
use crate::disk;
use crate::history::{NodeLog, Recorder, record_id};
use crate::nemesis::{FaultKind, Nemesis};
use crate::net::Net;
use crate::report::{self, Report};
use crate::workload::{Shape, Workload};

/// What a run does.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub nodes: u64,
    pub kinds: Vec<FaultKind>,
    pub duration: Duration,
    pub seed: u64,
    pub raftwal_bin: Option<PathBuf>,
    /// Keep the run's directory (configs, node logs) afterwards; it is kept anyway when the
    /// run found something.
    pub keep: bool,
    pub tmpfs_mb: u64,
    pub shape: Shape,
}

impl RunOptions {
    pub fn new(nodes: u64, kinds: Vec<FaultKind>, duration: Duration, seed: u64) -> RunOptions {
        RunOptions {
            nodes,
            kinds,
            duration,
            seed,
            raftwal_bin: None,
            keep: false,
            tmpfs_mb: 1024,
            shape: Shape {
                producers: 3,
                readers: 2,
                followers: 2,
                record_bytes: 1024,
                producer_pause: Duration::from_millis(5),
                appender_pause: Duration::from_millis(3),
            },
        }
    }
}

/// Everything a run produced.
#[derive(Debug)]
pub struct RunOutput {
    pub report: Report,
    pub dir: PathBuf,
}

pub async fn run(opts: RunOptions) -> anyhow::Result<RunOutput> {
    if opts.nodes < 3 || opts.nodes > 9 {
        bail!("--nodes must be 3 to 9");
    }
    let root = is_root();
    let bin = find_raftwal(opts.raftwal_bin.clone())?;
    let mut skipped = Vec::new();
    let mut kinds = opts.kinds.clone();
    let mut net = None;
    if kinds.iter().any(|k| k.needs_net()) {
        match Net::new(root) {
            Ok(n) => net = Some(n),
            Err(e) => {
                skipped.push(format!("partition faults: {e:#}"));
                kinds.retain(|k| !k.needs_net());
            }
        }
    }
    if !root && kinds.contains(&FaultKind::DiskFull) {
        skipped.push("disk-full: needs root to mount a tmpfs per node".into());
        kinds.retain(|&k| k != FaultKind::DiskFull);
    }
    for s in &skipped {
        eprintln!("faults: skipping {s}");
    }
    if kinds.is_empty() {
        bail!("no fault kind is left to inject (see the skipped kinds above)");
    }

    let temp =
        tempfile::Builder::new().prefix("raftwal-faults-").tempdir().context("make a temp dir")?;
    let dir = temp.path().to_path_buf();
    eprintln!(
        "faults: seed {} nodes {} faults {} for {:?}; raftwal {}; dir {}{}",
        opts.seed,
        opts.nodes,
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
        opts.duration,
        bin.display(),
        dir.display(),
        if root {
            format!(" (data dirs on {} MiB tmpfs mounts)", opts.tmpfs_mb)
        } else {
            String::new()
        }
    );
    let tmpfs = root.then_some(opts.tmpfs_mb);
    let mut cluster = Cluster::create(&dir, bin, opts.nodes, tmpfs).await?;
    let result = drive(&opts, &mut cluster, kinds, net, skipped).await;
    cluster.shutdown().await;
    drop(cluster);
    let report = result?;
    let keep = opts.keep || report.check.violations > 0 || !report.findings.is_empty();
    if keep {
        let _ = temp.keep();
        eprintln!("faults: kept {} (configs and node logs)", dir.display());
    }
    Ok(RunOutput { report, dir })
}

async fn drive(
    opts: &RunOptions,
    cluster: &mut Cluster,
    kinds: Vec<FaultKind>,
    net: Option<Net>,
    skipped: Vec<String>,
) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    for id in cluster.ids() {
        cluster.start(id)?;
    }
    let Some(leader) = cluster.wait_leader(Duration::from_secs(30)).await else {
        bail!(
            "no leader within 30 s of starting the cluster; node 1's log ends: {}",
            cluster.log_tail(1, 5)
        );
    };
    eprintln!("faults: node {leader} leads; starting the workload");
    let rec = Arc::new(Recorder::new(t0));
    let config = cluster.client_config();
    let client = Client::connect(config.clone()).await.context("connect the workload client")?;
    let workload_start = rec.now_us();
    let workload = Workload::start(&client, &config, opts.shape, rec.clone())?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut nemesis =
        Nemesis { kinds, net, rng: SmallRng::seed_from_u64(opts.seed), rec: rec.clone() };
    nemesis.run(cluster, opts.duration).await;

    eprintln!("faults: fault phase over; healing everything");
    let mut findings = Vec::new();
    if let Some(net) = nemesis.net.as_mut()
        && let Err(e) = net.heal()
    {
        findings.push(format!("harness: could not remove the partition rules: {e:#}"));
    }
    cluster.resume_all();
    for spec in cluster.specs.clone() {
        if let Some(mount) = &spec.mount {
            disk::free(mount);
        }
    }
    for id in cluster.ids() {
        if cluster.exited(id).is_some() {
            cluster.start(id)?;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The availability window ends when the clients are told to stop: after that no new
    // appends are invoked, so a quiet drain is no outage.
    let stop_us = rec.now_us();
    let drained = workload.stop(Duration::from_secs(60)).await;
    if !drained {
        findings.push("workload: some operations were still in flight 60 s after healing".into());
    }
    rec.set_workload_window(workload_start, stop_us);

    eprintln!("faults: restarting every node");
    for id in cluster.ids() {
        cluster.kill9(id).await;
    }
    for id in cluster.ids() {
        cluster.start(id)?;
    }
    for id in cluster.ids() {
        if let Err(why) = cluster.wait_ready(id, Duration::from_secs(30)).await {
            findings.push(format!("after healing and a restart of every node: {why}"));
        }
    }
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let logs = match leader {
        Some(leader) => read_logs(cluster, leader, &mut findings).await,
        None => {
            findings.push("no leader within 30 s of restarting every node after healing".into());
            cluster
                .ids()
                .into_iter()
                .map(|node| NodeLog { node, records: None, error: Some("no leader".into()) })
                .collect()
        }
    };
    let history = rec.snapshot();
    let check = checker::check(&history, &logs);
    let mut report = report::build(opts.seed, opts.nodes, &history, check, skipped, findings);
    report.duration_s = opts.duration.as_secs_f64();
    Ok(report)
}

/// Waits until every node has applied the leader's commit, then reads every node's log,
/// the leader's first.
async fn read_logs(cluster: &Cluster, leader: u64, findings: &mut Vec<String>) -> Vec<NodeLog> {
    let mut target = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let statuses = cluster.statuses().await;
        let commit = statuses.iter().map(|(_, s)| s.commit_offset).max().unwrap_or(0);
        let all = statuses.len() == cluster.specs.len()
            && statuses
                .iter()
                .all(|(_, s)| s.applied_offset >= commit && s.commit_offset == commit);
        target = target.max(commit);
        if all {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let lagging: Vec<String> = statuses
                .iter()
                .map(|(id, s)| {
                    format!("node {id} commit {} applied {}", s.commit_offset, s.applied_offset)
                })
                .collect();
            findings.push(format!(
                "nodes did not converge within 60 s after healing: {} (of {} nodes answered)",
                lagging.join(", "),
                cluster.specs.len()
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut order = vec![leader];
    order.extend(cluster.ids().into_iter().filter(|&id| id != leader));
    let mut logs = Vec::new();
    for id in order {
        let log = match read_node_log(cluster, id, target).await {
            Ok(records) => NodeLog { node: id, records: Some(records), error: None },
            Err(e) => NodeLog { node: id, records: None, error: Some(format!("{e:#}")) },
        };
        logs.push(log);
    }
    logs
}

/// Node `id`'s log from offset 1 up to at least `target`, read from that node only.
async fn read_node_log(
    cluster: &Cluster,
    id: u64,
    target: u64,
) -> anyhow::Result<Vec<(u64, String)>> {
    let client = cluster.node_client(id).await?;
    let mut out = Vec::new();
    let mut from = 1u64;
    loop {
        let batch = client
            .read(Offset(from), 1000, 0)
            .await
            .with_context(|| format!("read node {id}'s log from {from}"))?;
        out.extend(batch.records.iter().map(|r| (r.offset.get(), record_id(&r.data))));
        let next = batch.next_offset.get();
        if next <= from && batch.records.is_empty() {
            if from > target.max(batch.commit_offset.get()) {
                break;
            }
            bail!("node {id}'s read from {from} made no progress (commit {})", batch.commit_offset);
        }
        from = next;
        if batch.records.is_empty() && from > target.max(batch.commit_offset.get()) {
            break;
        }
        if from > batch.commit_offset.get() && from > target {
            break;
        }
    }
    Ok(out)
}
