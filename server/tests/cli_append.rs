//! `seq 1 120000 | raftwal append`: standard input of any length goes in batches within the
//! server's limits, pipelined, with a summary at the end; every line becomes one record, in
//! order, exactly once.

mod support;

use std::io::Write as _;
use std::process::{Command, Stdio};

use raftwal_client::Offset;
use support::Cluster;

const RAFTWAL: &str = env!("CARGO_BIN_EXE_raftwal");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_standard_input_is_appended_in_batches_exactly_once_in_order() {
    let c = Cluster::start(3, 0).await;
    let endpoints: Vec<String> =
        (1..=3).map(|id| format!("http://{}", c.configs[&id].api_listen)).collect();
    let lines = 120_000u32;
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(RAFTWAL)
            .args(["append", "--endpoints", &endpoints.join(",")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run raftwal append");
        let mut stdin = child.stdin.take().expect("stdin");
        let input: String = (1..=lines).map(|i| format!("{i}\n")).collect();
        stdin.write_all(input.as_bytes()).expect("write stdin");
        drop(stdin);
        child.wait_with_output().expect("wait")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("appended 120000 records in 12 appends"), "{stdout}");

    let client = c.client().await;
    let mut next = Offset(1);
    let mut seen = Vec::new();
    while seen.len() < lines as usize {
        let batch = client.read_linearizable(next, 10_000, 0).await.expect("read");
        assert!(!batch.records.is_empty(), "read stopped at {next} after {}", seen.len());
        for r in &batch.records {
            seen.push(String::from_utf8_lossy(&r.data).into_owned());
        }
        next = batch.next_offset;
    }
    let expected: Vec<String> = (1..=lines).map(|i| i.to_string()).collect();
    assert!(seen == expected, "every line once, in order");
    c.shutdown().await;
}
