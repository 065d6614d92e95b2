//! The README's main command as a newcomer runs it: `raftwal dev` in an empty directory, then
//! `raftwal append`, `read`, `follow` and `status` from "another terminal" (the same directory,
//! no flags), a node process killed while the cluster carries on, Ctrl-C, and a second
//! `raftwal dev` that recovers the same log.
//!
//! The cluster listens on a random 127.x.y.z address (fixed ports there), so it cannot collide
//! with a dev cluster a developer is running on 127.0.0.1 or with another test.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const RAFTWAL: &str = env!("CARGO_BIN_EXE_raftwal");

struct Dev {
    dir: std::path::PathBuf,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Dev {
    fn start(dir: &Path, host: &str) -> Dev {
        let mut child = Command::new(RAFTWAL)
            .args(["dev", "--host", host])
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start raftwal dev");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Dev { dir: dir.to_path_buf(), child, lines, seen: Vec::new() }
    }

    /// Waits for an output line containing `needle`.
    fn expect_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
        }
        panic!("no line with {needle:?}; saw:\n{}\n{}", self.seen.join("\n"), node_logs(&self.dir));
    }

    fn pid_of_node(&self, id: u64) -> u32 {
        let line = self
            .seen
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("node {id}:")))
            .expect("node line");
        let after = line.split("pid ").nth(1).expect("pid");
        after.split_whitespace().next().expect("pid value").parse().expect("pid number")
    }

    fn interrupt(&mut self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        self.expect_line("stopped.");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "raftwal dev exits cleanly on Ctrl-C: {status}");
    }
}

impl Drop for Dev {
    /// On a failed assertion: Ctrl-C the cluster so its node processes do not outlive the test.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
    }
}

/// Runs a CLI command in `dir` until it succeeds (the cluster may still be electing).
fn cli(dir: &Path, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out: Output =
            Command::new(RAFTWAL).args(args).current_dir(dir).output().expect("run raftwal");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "raftwal {args:?} kept failing: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            node_logs(dir)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last lines of every node's log, for a failure message.
fn node_logs(dir: &Path) -> String {
    let mut out = String::new();
    for id in 1..=3 {
        let path = dir.join("raftwal-dev").join(format!("node-{id}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        out.push_str(&format!("--- {}:\n{tail}\n", path.display()));
    }
    out
}

/// The leader's id, once the node the CLI asks knows one other than `not`.
fn wait_for_leader(dir: &Path, not: Option<u64>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = cli(dir, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(status.trim()).expect("status JSON");
        let leader = status["leader_id"].as_u64().expect("leader id");
        if leader != 0
            && Some(leader) != not
            && status["role"] != "pre-candidate"
            && status["role"] != "candidate"
        {
            return leader;
        }
        assert!(Instant::now() < deadline, "no leader: {status}\n{}", node_logs(dir));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn random_host() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    let n = t ^ std::process::id().rotate_left(13);
    format!("127.{}.{}.{}", 1 + n % 250, 1 + (n >> 8) % 250, 1 + (n >> 16) % 250)
}

#[test]
fn raftwal_dev_runs_a_cluster_that_survives_a_killed_node_and_recovers_after_ctrl_c() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = random_host();
    let mut dev = Dev::start(dir.path(), &host);
    dev.expect_line("Ctrl-C stops the cluster");
    assert!(dev.seen.iter().any(|l| l.contains("a new cluster")));

    // Wait for a leader first, so that no append below is ever retried by a new CLI process.
    let leader = wait_for_leader(dir.path(), None);
    let out = cli(dir.path(), &["append", "hello", "world"]);
    assert!(out.contains("appended offsets"), "{out}");
    let out = cli(dir.path(), &["read", "--from", "1"]);
    assert!(out.contains("\thello") && out.contains("\tworld"), "{out}");

    // Kill the leader's process: the other two elect a new leader and take appends.
    let pid = dev.pid_of_node(leader);
    assert!(
        Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill").success()
    );
    dev.expect_line(&format!("node {leader} exited"));
    wait_for_leader(dir.path(), Some(leader));
    let out = cli(dir.path(), &["append", "after-the-kill"]);
    assert!(out.contains("appended offsets"), "{out}");

    // Follow prints the history, then the caught-up marker (on stderr).
    let mut follow = Command::new(RAFTWAL)
        .args(["follow", "--from", "1"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("follow");
    let mut follow_out = BufReader::new(follow.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(follow_out.next().expect("a record line").expect("utf-8"));
    }
    follow.kill().expect("stop follow");
    let _ = follow.wait();
    assert!(
        seen[0].ends_with("\thello")
            && seen[1].ends_with("\tworld")
            && seen[2].ends_with("\tafter-the-kill"),
        "{seen:?}"
    );

    dev.interrupt();

    // Run again: the same log comes back.
    let mut dev = Dev::start(dir.path(), &host);
    dev.expect_line("Ctrl-C stops the cluster");
    assert!(dev.seen.iter().any(|l| l.contains("recovering the existing log")));
    // A node that was down while records were appended serves what it has until it catches
    // up (reads are committed reads, possibly behind the leader); soon every node has it all.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cli(dir.path(), &["read", "--from", "1"]);
        if out.contains("\thello") && out.contains("\tafter-the-kill") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log did not come back: {out}\n{}",
            node_logs(dir.path())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    dev.interrupt();
}
