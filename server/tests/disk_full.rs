//! A full disk on every node, on real filesystems: each node's data directory is a small tmpfs
//! of its own. Appends are refused cleanly (RESOURCE_EXHAUSTED) before the disk fills, reads go
//! on, a trim frees space and appends resume by themselves; and a node restarted on a disk that
//! is completely full comes up and serves reads. Mounting needs root: without it the test says
//! so and does nothing.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use raftwal_client::{Client, ClientConfig, ClientError, Offset};
use support::Cluster;

/// Each node's filesystem.
const DISK_BYTES: u64 = 96 << 20;
/// The smallest segment the node accepts (one 8 MiB record must fit).
const SEGMENT_BYTES: u64 = 9 << 20;
const MIN_FREE: u64 = 24 << 20;
const RECORD: usize = 256 << 10;

/// Unmounts what it mounted, even when the test fails.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = Command::new("umount").arg("-l").arg(dir).status();
        }
    }
}

fn mount_tmpfs(dir: &Path) -> bool {
    std::fs::create_dir_all(dir).expect("mount point");
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={DISK_BYTES},mode=0700"), "tmpfs"])
        .arg(dir)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Three nodes, each with its data on a tmpfs of its own (in drop order: the nodes, the
/// mounts, the directory); `None` (saying so) without root.
async fn cluster_on_tmpfs() -> Option<(tempfile::TempDir, Mounts, Cluster)> {
    let root = tempfile::tempdir().expect("tempdir");
    let mut mounts = Mounts(Vec::new());
    for id in 1..=3 {
        let dir = root.path().join(format!("disk-{id}"));
        if !mount_tmpfs(&dir) {
            eprintln!("skipped: mounting a tmpfs needs root (this test runs as root in CI)");
            return None;
        }
        mounts.0.push(dir);
    }
    let disks: Vec<PathBuf> = mounts.0.clone();
    let c = Cluster::start_with(3, 0, |_, cfg| {
        cfg.data_dir = disks[cfg.id as usize - 1].join("data");
        cfg.segment_bytes = SEGMENT_BYTES;
        cfg.disk_free_min_bytes = MIN_FREE;
    })
    .await;
    Some((root, mounts, c))
}

/// A client that hears RESOURCE_EXHAUSTED at once instead of retrying through it.
async fn impatient(c: &Cluster) -> Client {
    let endpoints: Vec<String> = c.nodes.keys().map(|&id| c.endpoint(id)).collect();
    let mut config = ClientConfig::new(endpoints);
    config.overloaded_retries_max = 0;
    config.request_timeout = Duration::from_secs(10);
    Client::connect(config).await.expect("connect")
}

/// Fills the disk with ballast until the filesystem refuses more; returns the file.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).expect("ballast");
    let chunk = vec![0xa5u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_appends_serves_reads_and_recovers_after_a_trim() {
    let Some((_root, mounts, mut c)) = cluster_on_tmpfs().await else { return };
    c.leader().await;
    let client = impatient(&c).await;

    // Fill until the leader refuses: cleanly, naming the disk.
    let mut acked = Vec::new();
    let refusal = loop {
        let record = vec![acked.len() as u8; RECORD];
        match client.append([record.clone()]).await {
            Ok(a) => acked.push((a.first_offset.0, record)),
            Err(ClientError::Overloaded { message, .. }) if message.contains("disk_free_min") => {
                break message;
            }
            // This client does not retry through overload: a leader change (a new leader
            // applying its log, a transfer in progress) is waited out here.
            Err(ClientError::Overloaded { .. }) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("an append failed otherwise than by a full disk: {e}"),
        }
        assert!(acked.len() < 1000, "the disk never filled");
    };
    assert!(refusal.contains("node "), "the refusal names the node: {refusal}");
    assert!(acked.len() > 50, "appends ran until the watermark: {}", acked.len());
    let last = acked.last().expect("acked").0;

    // Every node is alive and serves every acknowledged record.
    for id in 1..=3 {
        c.wait_applied(id, last).await;
        let reader = c.client_of(id).await;
        for (offset, record) in acked.iter().step_by(17) {
            let got = reader.read(Offset(*offset), 1, 0).await.expect("read");
            assert_eq!(&got.records[0].data[..], &record[..], "node {id} offset {offset}");
        }
    }

    // A trim frees whole segments on every node; appends resume with nothing touched by hand.
    // The trim goes through a client that retries through overload, as a user's would: a
    // low-disk leader hands leadership over now and then, and while a transfer is in progress
    // it refuses proposals (RESOURCE_EXHAUSTED, retry). The impatient client above gave up on
    // the first such refusal (1 run in 6 here).
    c.client().await.trim(Offset(last)).await.expect("trim");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.append([b"after the trim".to_vec()]).await {
            Ok(_) => break,
            Err(ClientError::Overloaded { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("appends did not resume after the trim: {e}"),
        }
    }

    // A follower restarted on a disk that is full to the last byte comes up and serves reads.
    let leader = c.leader().await;
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");
    c.stop_node(follower).await;
    let ballast = fill(&mounts.0[follower as usize - 1]);
    c.start_node(follower).await;
    // It serves what it knows committed: once the leader has told it so again.
    c.wait_applied(follower, last).await;
    let reader = c.client_of(follower).await;
    let got = reader.read(Offset(last), 1, 0).await.expect("a read on a full disk");
    assert_eq!(got.records[0].data[..], acked.last().expect("acked").1[..]);
    std::fs::remove_file(ballast).expect("remove the ballast");
    c.shutdown().await;
}

/// Writes ballast into `dir` until its filesystem has less than `left` bytes free.
fn fill_until(dir: &Path, left: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).expect("ballast");
    let chunk = vec![0x5au8; 1 << 20];
    while raftwal_server::disk::free_bytes(dir).expect("statvfs") >= left {
        f.write_all(&chunk).expect("ballast write");
        f.sync_all().expect("ballast sync");
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_disk_alone_is_low_hands_leadership_to_a_node_with_room() {
    let Some((_root, mounts, c)) = cluster_on_tmpfs().await else { return };
    let leader = c.leader().await;
    let client = impatient(&c).await;
    client.append([b"before".to_vec()]).await.expect("append");

    // Only the leader's disk runs low (something else filled it): it refuses appends, and
    // hands leadership to a node whose disk has room, so appends go on.
    let ballast = fill_until(&mounts.0[leader as usize - 1], MIN_FREE / 2);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut refused = 0;
    loop {
        match client.append([b"after".to_vec()]).await {
            Ok(_) if c.leader().await != leader => break,
            Ok(_) => {}
            Err(ClientError::Overloaded { .. }) => refused += 1,
            Err(e) => panic!("an append failed otherwise than by a low disk or overload: {e}"),
        }
        assert!(Instant::now() < deadline, "node {leader} kept leadership on a low disk");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(c.leader().await, leader);
    eprintln!("leadership moved off the low disk after {refused} refused appends");
    std::fs::remove_file(ballast).expect("remove the ballast");
    c.shutdown().await;
}
