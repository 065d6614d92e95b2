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

/// Runs `raftwal ARGS` against the cluster with `stdin`; returns success and standard output.
async fn raftwal(c: &Cluster, args: &[&str], stdin: String) -> (bool, String, String) {
    let endpoints: Vec<String> =
        (1..=3).map(|id| format!("http://{}", c.configs[&id].api_listen)).collect();
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["--endpoints".to_string(), endpoints.join(",")]);
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(RAFTWAL)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run raftwal");
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(stdin.as_bytes()).expect("write stdin");
        drop(input);
        let out = child.wait_with_output().expect("wait");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_subcommands_create_append_read_list_close_and_remove() {
    let c = Cluster::start(3, 0).await;
    let ok = |r: (bool, String, String)| {
        assert!(r.0, "{} {}", r.1, r.2);
        r.1
    };
    let out = ok(raftwal(
        &c,
        &["stream", "create", "orders/1", "--content-type", "text/plain"],
        String::new(),
    )
    .await);
    assert!(out.starts_with("created orders/1"), "{out}");
    // Standard input of several batches, each once and in order.
    let lines: String = (1..=2500).map(|i| format!("{i}\n")).collect();
    let out = ok(raftwal(&c, &["stream", "append", "orders/1"], lines).await);
    assert!(out.contains("appended 2500 records to orders/1: version 2500"), "{out}");
    let out = ok(raftwal(
        &c,
        &["stream", "append", "orders/1", "--expected-version", "2500", "last"],
        String::new(),
    )
    .await);
    assert!(out.contains("version 2501"), "{out}");
    let (success, _, err) = raftwal(
        &c,
        &["stream", "append", "orders/1", "--expected-version", "7", "x"],
        String::new(),
    )
    .await;
    assert!(!success && err.contains("version is 2501"), "{err}");
    let out = ok(raftwal(&c, &["stream", "read", "orders/1"], String::new()).await);
    let read: Vec<&str> = out.lines().map(|l| l.rsplit('\t').next().unwrap_or("")).collect();
    assert_eq!(read.len(), 2501);
    assert_eq!((read[0], read[2499], read[2500]), ("1", "2500", "last"));
    ok(raftwal(&c, &["stream", "create", "orders/2"], String::new()).await);
    let out = ok(raftwal(&c, &["stream", "ls", "orders/"], String::new()).await);
    let names: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap_or("")).collect();
    assert_eq!(names, ["orders/1", "orders/2"]);
    ok(raftwal(&c, &["stream", "close", "orders/1"], String::new()).await);
    // A follow of a closed stream prints it and ends.
    let out =
        ok(raftwal(&c, &["stream", "follow", "orders/1", "--from", "0"], String::new()).await);
    assert_eq!(out.lines().count(), 2501);
    ok(raftwal(&c, &["stream", "rm", "orders/1"], String::new()).await);
    let (success, _, err) = raftwal(&c, &["stream", "describe", "orders/1"], String::new()).await;
    assert!(!success && err.contains("not found"), "{err}");
    c.shutdown().await;
}
