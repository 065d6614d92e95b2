//! Repair from peers: damage in a node's log (a bit flip in a sealed segment, a damaged
//! log-start file) no longer stops the node. It starts, keeps the entries before the damage,
//! remembers how far its log reached (the repair floor: until its log is back there it neither
//! campaigns nor votes for a shorter log), fetches the rest again, and rejoins. The cluster
//! takes appends throughout. A node alone holds the only copy: it refuses, naming the file,
//! the offset and what to do.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use raftwal_client::Offset;
use support::{Cluster, read_all};

/// A little over the smallest segment a node accepts (one largest entry must fit).
const SEGMENT_BYTES: u64 = (8 << 20) + (64 << 10);

fn segments(data_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(data_dir.join("wal"))
        .expect("wal dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    out.sort();
    out
}

fn flip_bit(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open");
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at).expect("read");
    b[0] ^= 0x08;
    file.write_all_at(&b, at).expect("write");
    file.sync_all().expect("sync");
}

/// Appends `n` batches of 16 records of 64 KiB (1 MiB each); returns the last offset.
async fn append_mib(client: &raftwal_client::Client, n: usize, tag: u8) -> u64 {
    let mut last = 0;
    for i in 0..n {
        let records: Vec<Vec<u8>> = (0..16).map(|j| vec![tag ^ (i as u8) ^ j; 64 << 10]).collect();
        last = client.append(records).await.expect("append").last_offset.0;
    }
    last
}

/// Three nodes with small segments, the leader, a follower to damage, and a client.
async fn three_nodes_and_a_follower() -> (Cluster, u64, u64, raftwal_client::Client) {
    let c = Cluster::start_with(3, 0, |_, cfg| cfg.segment_bytes = SEGMENT_BYTES).await;
    let leader = c.leader().await;
    let victim = (1..=3).find(|&id| id != leader).expect("a follower");
    let client = c.client().await;
    (c, leader, victim, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bit_flip_in_a_followers_sealed_segment_is_repaired_from_peers() {
    let (mut c, leader, victim, client) = three_nodes_and_a_follower().await;
    let before = append_mib(&client, 28, 1).await;
    c.wait_applied(victim, before).await;
    c.stop_node(victim).await;
    let data_dir = c.configs[&victim].data_dir.clone();
    let segs = segments(&data_dir);
    assert!(segs.len() >= 3, "several segments: {segs:?}");
    // In the middle of the first sealed segment's records.
    flip_bit(&segs[0], 4 << 20);

    // The cluster keeps taking appends while the victim restarts and repairs.
    let writer = {
        let client = c.client().await;
        tokio::spawn(async move {
            let mut last = 0;
            for i in 0..40u32 {
                last = client
                    .append(vec![i.to_le_bytes().to_vec()])
                    .await
                    .expect("appends never stop")
                    .last_offset
                    .0;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            last
        })
    };
    c.start_node(victim).await;
    assert!(
        data_dir.join("repair-floor").exists(),
        "the repair floor is durable before the node runs"
    );
    let last = writer.await.expect("writer");
    c.wait_applied(victim, last).await;
    wait_repair_complete(&c, victim).await;

    // The leader acknowledged `last` but may settle it a moment later.
    c.wait_applied(leader, last).await;
    let expected = read_all(&c.client_of(leader).await).await;
    let got = read_all(&c.client_of(victim).await).await;
    assert!(got == expected, "the repaired node holds every record at its offset");

    // The next start finds the repair done and clears its floor.
    c.stop_node(victim).await;
    c.start_node(victim).await;
    assert!(!data_dir.join("repair-floor").exists(), "the finished repair's floor is cleared");
    c.shutdown().await;
}

/// Every record from `from` on, as (offset, data).
async fn read_from(client: &raftwal_client::Client, from: Offset) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let batch = client.read(next, 1000, 0).await.expect("read");
        if batch.records.is_empty() {
            return out;
        }
        out.extend(batch.records.into_iter().map(|r| (r.offset.0, r.data.to_vec())));
        next = batch.next_offset;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_log_start_file_is_repaired_from_the_leader() {
    let (mut c, leader, victim, client) = three_nodes_and_a_follower().await;
    let mid = append_mib(&client, 20, 2).await;
    client.trim(Offset(mid - 100)).await.expect("trim");
    let last = append_mib(&client, 2, 3).await;
    c.wait_applied(victim, last).await;
    // Trimmed far enough to drop a segment: the log-start file exists.
    let log_start = c.configs[&victim].data_dir.join("log-start");
    for _ in 0..500 {
        if log_start.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.stop_node(victim).await;
    assert!(log_start.exists(), "the trim wrote a log-start file");
    flip_bit(&log_start, 6);
    c.start_node(victim).await;
    let last = append_mib(&client, 1, 4).await;
    c.wait_applied(victim, last).await;
    let from = Offset(mid - 100);
    // The leader acknowledged `last` but may settle it a moment later.
    c.wait_applied(leader, last).await;
    let expected = read_from(&c.client_of(leader).await, from).await;
    let got = read_from(&c.client_of(victim).await, from).await;
    assert!(!got.is_empty() && got == expected, "the repaired node serves the leader's log");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn damage_on_a_node_alone_refuses_naming_file_offset_and_remedy() {
    let mut c = Cluster::start_with(1, 0, |_, cfg| cfg.segment_bytes = SEGMENT_BYTES).await;
    let client = c.client().await;
    append_mib(&client, 12, 5).await;
    c.stop_node(1).await;
    let segs = segments(&c.configs[&1].data_dir);
    assert!(segs.len() >= 2, "a sealed segment");
    flip_bit(&segs[0], 2 << 20);
    let err = raftwal_server::Node::start(c.configs[&1].clone()).await.expect_err("refused");
    let msg = format!("{err:#}");
    let name = segs[0].file_name().expect("name").to_string_lossy().into_owned();
    assert!(msg.contains(&name), "names the file: {msg}");
    assert!(msg.contains("offset"), "names the offset: {msg}");
    assert!(msg.contains("only copy") && msg.contains("backup"), "says what to do: {msg}");
    assert!(!c.configs[&1].data_dir.join("repair-floor").exists(), "nothing changed");
    assert!(segments(&c.configs[&1].data_dir) == segs, "no segment removed");
}

/// Three nodes; 50 appends of ten 1000-byte records, applied on a follower that is then
/// stopped. Returns the cluster, the leader, that follower, a client and its data directory.
async fn appended_then_follower_stopped() -> (Cluster, u64, u64, raftwal_client::Client, PathBuf) {
    let mut c = Cluster::start(3, 0).await;
    let leader = c.leader().await;
    let victim = (1..=3).find(|&id| id != leader).expect("a follower");
    let client = c.client().await;
    let mut last = 0;
    for i in 0..50u32 {
        last = client.append(vec![vec![i as u8; 1000]; 10]).await.expect("append").last_offset.0;
    }
    c.wait_applied(victim, last).await;
    c.stop_node(victim).await;
    let data_dir = c.configs[&victim].data_dir.clone();
    (c, leader, victim, client, data_dir)
}

/// Waits (up to 10 s) until node `id`'s repair from peers is complete.
async fn wait_repair_complete(c: &Cluster, id: u64) {
    for _ in 0..500 {
        if c.nodes[&id].shared.status.read().repair_floor.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.nodes[&id].shared.status.read().repair_floor, None, "repair completes");
}

/// Cuts the active segment's written part in half: a synced tail gone (or torn, to recovery).
fn cut_active_segment_in_half(data_dir: &Path) {
    let seg = segments(data_dir).pop().expect("the active segment");
    let used = std::fs::read(&seg).expect("read").iter().rposition(|&b| b != 0).expect("frames");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .and_then(|f| f.set_len(used as u64 / 2))
        .expect("truncate");
}

/// A follower's active segment cut short below its saved commit index: recovery sees a torn
/// tail, but the node's own hard state proves those entries were committed (and acknowledged).
/// It used to refuse to start ("the commit index is beyond the log"). Now it repairs: it
/// follows and serves at once, and votes again once a leader elected after the damage has
/// appended to it (how far its log reached is unknown, so nothing less proves it whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_synced_tail_cut_below_the_commit_index_is_repaired() {
    let (mut c, leader, victim, client, data_dir) = appended_then_follower_stopped().await;
    cut_active_segment_in_half(&data_dir);

    c.start_node(victim).await;
    assert!(data_dir.join("repair-floor").exists(), "a repair floor is kept");
    let last = client.append(["after"]).await.expect("append").last_offset.0;
    c.wait_applied(victim, last).await;
    // The leader acknowledged `last` but may settle it a moment later.
    c.wait_applied(leader, last).await;
    let expected = read_all(&c.client_of(leader).await).await;
    assert!(read_all(&c.client_of(victim).await).await == expected, "it serves the log again");
    assert!(c.nodes[&victim].shared.status.read().repair_floor.is_some(), "no vote yet");

    // A leader of a later term (not the victim: it may not campaign) appends to it.
    let other = (1..=3).find(|&id| id != leader && id != victim).expect("a third node");
    client.transfer_leader(raftwal_client::NodeId(other)).await.expect("transfer");
    client.append(["later term"]).await.expect("append");
    wait_repair_complete(&c, victim).await;
    c.shutdown().await;
}

/// Damage after the sync in a follower's last write group looks like a torn write to
/// recovery, and its saved commit index (which Raft lets lag) proves nothing. The leader, which
/// counted the follower for those entries, proves it: the node raises its repair floor durably,
/// fetches the entries again, and completes the repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tail_cut_the_leader_saw_acknowledged_becomes_a_repair() {
    let (mut c, leader, victim, client, data_dir) = appended_then_follower_stopped().await;
    {
        // As after a crash before the follower saved the commit index of its last appends.
        let opts = raftwal_wal::Options {
            segment_bytes: c.configs[&victim].segment_bytes,
            record_bytes_max: raftwal_server::config::WAL_ENTRY_BYTES_MAX,
            ..Default::default()
        };
        let wal = raftwal_wal::Wal::open(data_dir.join("wal"), opts).expect("open the WAL");
        wal.lower_commit(raftwal_consensus::LogIndex(3)).expect("lower the commit index");
    }
    cut_active_segment_in_half(&data_dir);

    c.start_node(victim).await;
    for _ in 0..250 {
        if data_dir.join("repair-floor").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(data_dir.join("repair-floor").exists(), "the leader's proof became a durable floor");
    let after = client.append(["after"]).await.expect("append").last_offset.0;
    c.wait_applied(victim, after).await;
    c.wait_applied(leader, after).await;
    let expected = read_all(&c.client_of(leader).await).await;
    assert!(read_all(&c.client_of(victim).await).await == expected, "it serves the log again");
    wait_repair_complete(&c, victim).await;
    c.shutdown().await;
}
