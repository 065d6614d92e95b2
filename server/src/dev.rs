//! `raftwal certs init` and `raftwal dev`: certificates for a cluster, and a local 3-node
//! cluster on loopback made of three `raftwal node` processes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use raftwal_server::local;

/// Where `raftwal dev` keeps everything, relative to the current directory.
pub const DEV_DIR: &str = "raftwal-dev";
/// The file the CLI reads to find the dev cluster.
pub const CLUSTER_FILE: &str = "cluster.toml";

/// The dev cluster's addresses for node `id` (1-based) on `host`.
/// Node `id`'s Durable Streams HTTP address in a dev cluster.
fn streams_port(host: &str, id: u64) -> String {
    format!("{host}:{}", 7300 + id)
}

fn dev_ports(host: &str, id: u64) -> (String, String, String) {
    (
        format!("{host}:{}", 7000 + id),
        format!("{host}:{}", 7100 + id),
        format!("{host}:{}", 7200 + id),
    )
}

/// Creates `dir` (certificates, one config per node, cluster.toml) unless it exists.
pub fn dev_prepare(dir: &Path, host: &str, nodes: u64) -> anyhow::Result<()> {
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        local::certs_init(
            &certs,
            nodes,
            &["localhost".into(), "127.0.0.1".into(), host.to_string()],
        )?;
    }
    let abs = std::fs::canonicalize(dir)?;
    let cluster_id = local::random_cluster_id();
    let mut endpoints = Vec::new();
    for id in 1..=nodes {
        let (api, peer, http) = dev_ports(host, id);
        endpoints.push(format!("https://{api}"));
        let peers: Vec<String> = (1..=nodes)
            .filter(|&p| p != id)
            .map(|p| {
                let (api, peer, _) = dev_ports(host, p);
                format!("\"{p}@{peer}@{api}\"")
            })
            .collect();
        let config = format!(
            "# raftwal dev: node {id}. Edit freely; `raftwal config show --config {path}` shows the effect.\n\
             id = {id}\ncluster_id = {cluster_id}\ndata_dir = \"{data}\"\napi_listen = \"{api}\"\npeer_listen = \"{peer}\"\nhttp_listen = \"{http}\"\nstreams_listen = \"{streams}\"\n\
             peers = [{peers}]\ntls_ca = \"{certs}/ca.pem\"\ntls_cert = \"{certs}/node-{id}.pem\"\ntls_key = \"{certs}/node-{id}.key\"\n",
            path = abs.join(format!("node-{id}.toml")).display(),
            streams = streams_port(host, id),
            data = abs.join(format!("node-{id}")).display(),
            peers = peers.join(", "),
            certs = abs.join("certs").display(),
        );
        let path = dir.join(format!("node-{id}.toml"));
        if !path.exists() {
            local::write_file(&path, config.as_bytes())?;
        } else {
            // A dev directory made before clusters had ids: give its nodes one (the same).
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("read {}", path.display()))?;
            if !text.lines().any(|l| l.trim_start().starts_with("cluster_id")) {
                let text = format!("cluster_id = {cluster_id}\n{text}");
                local::write_file(&path, text.as_bytes())?;
            }
        }
    }
    let cluster = format!(
        "# How the raftwal CLI reaches the dev cluster in this directory.\nendpoints = [{}]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", "),
        abs.join("certs/ca.pem").display(),
        abs.join("certs/client.pem").display(),
        abs.join("certs/client.key").display(),
    );
    local::write_file(&dir.join(CLUSTER_FILE), cluster.as_bytes())?;
    Ok(())
}

/// The host an existing dev directory's node 1 listens on.
fn existing_host(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("node-1.toml")).ok()?;
    let line = text.lines().find(|l| l.trim_start().starts_with("api_listen"))?;
    let addr = line.split('"').nth(1)?;
    let (host, _) = addr.rsplit_once(':')?;
    Some(host.to_string())
}

/// Runs the dev cluster: three `raftwal node` processes, until Ctrl-C.
pub async fn dev(dir: PathBuf, host: &str, nodes: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let fresh = !dir.join("node-1").exists();
    // A cluster keeps the address it was made with (its configs and certificates name it).
    let made_with = existing_host(&dir);
    let host = match &made_with {
        Some(h) if h != host => {
            eprintln!(
                "note: {} was made for {h}; using {h} (a new --dir makes a cluster on another address)",
                dir.display()
            );
            h.as_str()
        }
        _ => host,
    };
    dev_prepare(&dir, host, nodes)?;
    check_ports_free(host, nodes)?;
    let exe = std::env::current_exe().context("find the raftwal executable")?;
    let mut children = Vec::new();
    for id in 1..=nodes {
        let log = std::fs::File::create(dir.join(format!("node-{id}.log")))?;
        let child = tokio::process::Command::new(&exe)
            .arg("node")
            .arg("--config")
            .arg(dir.join(format!("node-{id}.toml")))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("start a node process")?;
        children.push((id, child));
    }
    let shown = dir.display();
    println!(
        "raftwal dev: {nodes} nodes on loopback, data in {shown}/ ({})",
        if fresh { "a new cluster" } else { "recovering the existing log" }
    );
    for id in 1..=nodes {
        let (api, _, http) = dev_ports(host, id);
        let pid = children[(id - 1) as usize].1.id().unwrap_or(0);
        println!(
            "  node {id}: api https://{api}  streams https://{}  metrics http://{http}/metrics  pid {pid}  log {shown}/node-{id}.log",
            streams_port(host, id)
        );
    }
    println!(
        "\nFrom another terminal in this directory:\n  raftwal append hello world      # two records\n  \
         raftwal follow --from 1          # the log, then live records\n  raftwal status\n\
         Kill one node (kill <pid>) and the other two carry on. Ctrl-C stops the cluster.\n"
    );
    supervise(&mut children, &exe, &dir).await;
    println!("stopped. `raftwal dev` again recovers the same log.");
    Ok(())
}

/// Refuses to start when the dev cluster's addresses are taken, saying what to do instead.
fn check_ports_free(host: &str, nodes: u64) -> anyhow::Result<()> {
    for id in 1..=nodes {
        let (api, peer, http) = dev_ports(host, id);
        let free = std::net::TcpListener::bind(&api).is_ok()
            && std::net::TcpListener::bind(&http).is_ok()
            && std::net::TcpListener::bind(streams_port(host, id)).is_ok()
            && std::net::UdpSocket::bind(&peer).is_ok();
        if !free {
            bail!(
                "the dev cluster's addresses ({api}, {peer}, {http}) are in use: is another \
                 `raftwal dev` running? Stop it, or run this one on another loopback address \
                 with a fresh --dir, e.g. `raftwal dev --host 127.0.0.2 --dir raftwal-dev-2`"
            );
        }
    }
    Ok(())
}

/// Reports nodes that exit until ctrl-c, then stops them all (SIGTERM, then a kill).
async fn supervise(
    children: &mut [(u64, tokio::process::Child)],
    exe: &std::path::Path,
    dir: &std::path::Path,
) {
    let shown = dir.display();
    let nodes = children.len() as u64;
    let mut exited = vec![false; nodes as usize];
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                for (i, (id, child)) in children.iter_mut().enumerate() {
                    if !exited[i] && let Ok(Some(status)) = child.try_wait() {
                        exited[i] = true;
                        println!(
                            "node {id} exited ({status}); the others carry on. Restart it with:\n  {} node --config {}/node-{id}.toml",
                            exe.display(), shown
                        );
                    }
                }
            }
        }
    }
    println!("stopping...");
    for (_, child) in children.iter_mut() {
        if let Some(pid) = child.id() {
            // SIGTERM first: nodes stop cleanly; a kill follows if one does not.
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
    }
    for (id, child) in children.iter_mut() {
        match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill().await;
                println!("node {id} did not stop within 5 s; killed");
            }
        }
    }
}
