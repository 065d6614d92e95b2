//! Appends from several producers while nodes are stopped, restarted and leadership moves,
//! then the log is checked on every node: every acknowledged append is there at its offsets,
//! no record appears twice (retries were deduplicated), and every node serves the same log.
//!
//! `RAFTWAL_CHAOS_ROUNDS` (default 6) and `RAFTWAL_CHAOS_SEED` make longer or other runs:
//! `RAFTWAL_CHAOS_ROUNDS=60 RAFTWAL_CHAOS_SEED=7 cargo nextest run -p raftwal-server --test chaos`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use raftwal_client::{ClientError, NodeId};
use raftwal_consensus::SplitMix64;
use support::{Cluster, read_all};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_lose_no_acknowledged_append_and_duplicate_none() {
    let mut c = Cluster::start(3, 0).await;
    c.leader().await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let client = c.client().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut unknown = 0u32;
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let records: Vec<Vec<u8>> =
                    (0..(i % 3 + 1)).map(|k| format!("w{w}-{i}-{k}").into_bytes()).collect();
                match client.append(records.clone()).await {
                    Ok(a) => {
                        for (k, r) in records.into_iter().enumerate() {
                            acked.insert(a.first_offset.0 + k as u64, r);
                        }
                    }
                    // A node stopped with the append in flight: it may or may not be in.
                    Err(ClientError::UnknownOutcome { .. }) => unknown += 1,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
                i += 1;
            }
            (acked, unknown)
        }));
    }
    let env = |name: &str, default: u64| {
        std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    };
    let mut rng = SplitMix64::new(env("RAFTWAL_CHAOS_SEED", 0x5eed));
    for _ in 0..env("RAFTWAL_CHAOS_ROUNDS", 6) {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let leader = c.leader().await;
        if rng.below(2) == 0 {
            // Stop a node (the leader half the time), let the others go on, bring it back.
            let victim = if rng.below(2) == 0 { leader } else { 1 + rng.below(3) };
            c.stop_node(victim).await;
            tokio::time::sleep(Duration::from_millis(400)).await;
            c.start_node(victim).await;
        } else {
            let to = (1..=3).find(|&id| id != leader).expect("another node");
            let client = c.client_of(leader).await;
            let _ = client.transfer_leader(NodeId(to)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeMap::new();
    for w in writers {
        let (a, _unknown) = w.await.expect("writer");
        acked.extend(a);
    }
    assert!(acked.len() > 50, "appends went through the faults: {}", acked.len());
    // Settle: one more append through the leader, then every node applies through it.
    let leader = c.leader().await;
    let last = c.client_of(leader).await.append(["end"]).await.expect("append").last_offset.0;
    let mut logs = Vec::new();
    for id in 1..=3 {
        c.wait_applied(id, last).await;
        logs.push(read_all(&c.client_of(id).await).await);
    }
    assert!(logs.iter().all(|l| *l == logs[0]), "every node serves the same log");
    let log: BTreeMap<u64, Vec<u8>> = logs[0].iter().cloned().collect();
    for (offset, data) in &acked {
        assert_eq!(log.get(offset), Some(data), "acknowledged offset {offset} kept its record");
    }
    let mut seen = BTreeSet::new();
    for (offset, data) in &logs[0] {
        assert!(
            seen.insert(data.clone()),
            "record {:?} appears twice (at {offset})",
            String::from_utf8_lossy(data)
        );
    }
    c.shutdown().await;
}
