//! The client subcommands of `raftwal`. Without endpoint flags they talk to the dev cluster
//! started from the current directory (`raftwal-dev/cluster.toml`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use raftwal_client::{AppendOptions, Client, ClientConfig, ClientTls, FollowEvent, NodeId, Offset};
use tokio_stream::StreamExt;

use crate::dev::{CLUSTER_FILE, DEV_DIR};

/// Where the cluster is and how to reach it.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Client API endpoints, comma-separated (https://host:port, or http:// with --plaintext).
    #[arg(long, value_delimiter = ',', env = "RAFTWAL_ENDPOINTS", global = true)]
    endpoints: Vec<String>,
    /// The cluster CA certificate (PEM).
    #[arg(long, env = "RAFTWAL_CA", global = true)]
    ca: Option<PathBuf>,
    /// A client certificate (PEM), for clusters that require one.
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, global = true)]
    key: Option<PathBuf>,
}

/// The client subcommands.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Append records (the arguments, or one per stdin line with none given).
    Append {
        records: Vec<String>,
        /// Append only if the first record gets this offset.
        #[arg(long)]
        expect_offset: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Read committed records from an offset.
    Read {
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = 100)]
        max_records: u32,
        /// Reflect every append acknowledged before the read (a quorum round first).
        #[arg(long)]
        linearizable: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Print the committed log from an offset, then live records, until Ctrl-C.
    Follow {
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[command(flatten)]
        target: Target,
    },
    /// The cluster's status as one node sees it.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Membership changes.
    #[command(subcommand)]
    Members(MembersCommand),
    /// Leadership.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Named streams (docs/streams.md).
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Discard the log below an offset on every node.
    Trim {
        #[arg(long)]
        before: u64,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
pub enum MembersCommand {
    /// Add a node as a learner.
    Add {
        id: u64,
        /// Its peer (QUIC) address.
        #[arg(long)]
        peer_addr: String,
        /// Its client API address.
        #[arg(long)]
        api_addr: String,
        #[command(flatten)]
        target: Target,
    },
    /// Make a learner a voter.
    Promote {
        id: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a node.
    Remove {
        id: u64,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
pub enum StreamCommand {
    /// Create a stream (or confirm an identical one).
    Create {
        name: String,
        #[arg(long, default_value = "application/octet-stream")]
        content_type: String,
        /// A sliding time to live, in seconds.
        #[arg(long)]
        ttl: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Append records to a stream (the arguments, or one per stdin line with none given).
    Append {
        name: String,
        records: Vec<String>,
        /// Append only if the stream holds exactly this many records.
        #[arg(long)]
        expected_version: Option<u64>,
        /// Append as this idempotent producer (with --epoch and --seq; records given as
        /// arguments): a newer epoch of the same producer fences older ones.
        #[arg(long, requires_all = ["epoch", "seq"])]
        producer: Option<String>,
        #[arg(long, requires = "producer")]
        epoch: Option<u64>,
        #[arg(long, requires = "producer")]
        seq: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Read a stream from an offset (a byte position; empty name: all, from a log offset).
    Read {
        name: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Print a stream from an offset, then live records, until Ctrl-C or it closes.
    Follow {
        /// The stream; none: every stream and the single log, in log order.
        name: Option<String>,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[command(flatten)]
        target: Target,
    },
    /// List streams.
    Ls {
        /// Only names starting with this.
        #[arg(default_value = "")]
        prefix: String,
        #[command(flatten)]
        target: Target,
    },
    /// Describe a stream.
    Describe {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Close a stream: nothing more may be appended.
    Close {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a stream.
    Rm {
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
pub enum LeaderCommand {
    /// Hand leadership to a voter.
    Transfer {
        to: u64,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(serde::Deserialize)]
struct ClusterFile {
    endpoints: Vec<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

async fn connect(target: &Target) -> anyhow::Result<Client> {
    let mut t = target.clone();
    if t.endpoints.is_empty() {
        let path = PathBuf::from(DEV_DIR).join(CLUSTER_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("no --endpoints given and no dev cluster here ({} not found; run `raftwal dev` first)", path.display())
        })?;
        let f: ClusterFile =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        t.endpoints = f.endpoints;
        t.ca = t.ca.or(f.ca);
        t.cert = t.cert.or(f.cert);
        t.key = t.key.or(f.key);
    }
    let mut config = ClientConfig::new(t.endpoints.clone());
    if t.endpoints.iter().any(|e| e.starts_with("https://")) {
        let Some(ca) = &t.ca else {
            bail!("https endpoints need --ca (the cluster CA certificate)")
        };
        let ca = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
        let mut tls = ClientTls::new(ca);
        if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
            tls = tls.with_identity(std::fs::read(cert)?, std::fs::read(key)?);
        }
        config = config.with_tls(tls);
    }
    Ok(Client::connect(config).await?)
}

/// Runs one client subcommand.
pub async fn run(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Append { records, expect_offset, target } => {
            append(connect(&target).await?, records, expect_offset).await?
        }
        ClientCommand::Read { from, max_records, linearizable, target } => {
            let client = connect(&target).await?;
            let batch = if linearizable {
                client.read_linearizable(Offset(from), max_records, 0).await?
            } else {
                client.read(Offset(from), max_records, 0).await?
            };
            for r in &batch.records {
                crate::outln!("{}\t{}", r.offset, String::from_utf8_lossy(&r.data));
            }
            eprintln!(
                "next offset {}, committed through {}",
                batch.next_offset, batch.commit_offset
            );
        }
        ClientCommand::Follow { from, target } => follow(connect(&target).await?, from).await?,
        ClientCommand::Status { json, target } => {
            print_status(&connect(&target).await?.status().await?, json)
        }
        ClientCommand::Members(MembersCommand::Add { id, peer_addr, api_addr, target }) => {
            let m = connect(&target).await?.add_learner(NodeId(id), &peer_addr, &api_addr).await?;
            crate::outln!("{m:?}");
        }
        ClientCommand::Members(MembersCommand::Promote { id, target }) => {
            let m = connect(&target).await?.promote(NodeId(id)).await?;
            crate::outln!("{m:?}");
        }
        ClientCommand::Members(MembersCommand::Remove { id, target }) => {
            let m = connect(&target).await?.remove(NodeId(id)).await?;
            crate::outln!("{m:?}");
        }
        ClientCommand::Leader(LeaderCommand::Transfer { to, target }) => {
            let leader = connect(&target).await?.transfer_leader(NodeId(to)).await?;
            crate::outln!("leader is now node {leader}");
        }
        ClientCommand::Stream(cmd) => stream(cmd).await?,
        ClientCommand::Trim { before, target } => {
            let first = connect(&target).await?.trim(Offset(before)).await?;
            crate::outln!("the log now starts at offset {first}");
        }
    }
    Ok(())
}

/// `raftwal stream ...`.
async fn stream(cmd: StreamCommand) -> anyhow::Result<()> {
    use raftwal_client::proto;
    let line = |r: &proto::StreamRecord| {
        let data = String::from_utf8_lossy(&r.data);
        if r.stream.is_empty() {
            format!("{}\t{data}", r.offset)
        } else {
            format!("{}\t{}\t{data}", r.stream, r.offset)
        }
    };
    match cmd {
        StreamCommand::Create { name, content_type, ttl, target } => {
            let request = proto::CreateStreamRequest {
                name,
                content_type,
                ttl_secs: ttl,
                ..Default::default()
            };
            let info = connect(&target).await?.create_stream(request).await?;
            crate::outln!(
                "{} {} ({}, next offset {})",
                if info.created { "created" } else { "exists:" },
                info.name,
                info.content_type,
                info.next_offset
            );
        }
        StreamCommand::Append { name, records, expected_version, producer, epoch, seq, target } => {
            let client = connect(&target).await?;
            if let Some(id) = producer {
                if records.is_empty() {
                    bail!("--producer takes records given as arguments");
                }
                let n = records.len();
                let options = raftwal_client::StreamAppendOptions {
                    expected_version,
                    producer: Some(proto::StreamProducer {
                        id,
                        epoch: epoch.unwrap_or(0),
                        sequence: seq.unwrap_or(0),
                    }),
                    close: false,
                };
                let records = records.into_iter().map(String::into_bytes);
                let r = client.stream_append(&name, records, options).await?;
                if r.duplicate {
                    crate::outln!("a retry of an append {name} took before: nothing appended");
                } else {
                    crate::outln!(
                        "appended {n} records to {name}: version {}, next offset {}",
                        r.version,
                        r.next_offset
                    );
                }
            } else {
                stream_append(client, &name, records, expected_version).await?
            }
        }
        StreamCommand::Read { name, from, target } => {
            let r = connect(&target).await?.read_stream(&name, from, 0).await?;
            for rec in &r.records {
                crate::outln!("{}", line(rec));
            }
            eprintln!(
                "next offset {}{}{}",
                r.next_offset,
                if r.up_to_date { ", up to date" } else { "" },
                if r.closed { ", closed" } else { "" }
            );
        }
        StreamCommand::Follow { name, from, target } => {
            let client = connect(&target).await?;
            let mut follow = client.follow_stream(name.as_deref().unwrap_or(""), from);
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    event = follow.next() => match event {
                        None => return Ok(()),
                        Some(Ok(raftwal_client::StreamEvent::Records(records))) => {
                            for r in &records {
                                crate::outln!("{}", line(r));
                            }
                        }
                        Some(Ok(raftwal_client::StreamEvent::CaughtUp { next_offset, closed })) => {
                            if closed {
                                eprintln!("-- the stream is closed at offset {next_offset}");
                            } else {
                                eprintln!("-- caught up at offset {next_offset}; live records follow");
                            }
                        }
                        Some(Err(e)) => return Err(e.into()),
                    }
                }
            }
        }
        StreamCommand::Ls { prefix, target } => {
            let client = connect(&target).await?;
            let mut after = String::new();
            loop {
                let page = client.list_streams(&prefix, &after, 0).await?;
                for s in &page.streams {
                    crate::outln!(
                        "{}\t{}\tversion {}\tnext offset {}{}",
                        s.name,
                        s.content_type,
                        s.version,
                        s.next_offset,
                        if s.closed { "\tclosed" } else { "" }
                    );
                }
                match page.streams.last() {
                    Some(last) if page.more => after = last.name.clone(),
                    _ => break,
                }
            }
        }
        StreamCommand::Describe { name, target } => {
            let s = connect(&target).await?.describe_stream(&name).await?;
            crate::outln!("{s:#?}");
        }
        StreamCommand::Close { name, target } => {
            let r = connect(&target).await?.close_stream(&name, None).await?;
            crate::outln!("closed at offset {} (version {})", r.next_offset, r.version);
        }
        StreamCommand::Rm { name, target } => {
            connect(&target).await?.delete_stream(&name).await?;
            crate::outln!("deleted {name}");
        }
    }
    Ok(())
}

/// Records and bytes one stream append from standard input carries at most (one log entry
/// holds a stream append: well under the default `record_bytes_max`, 1 MiB).
const STREAM_BATCH_RECORDS: usize = 1000;
const STREAM_BATCH_BYTES: usize = 256 << 10;

/// `raftwal stream append`: the records given (one append), or one per line of standard input
/// in batches, each once and in order (an idempotent producer of its own makes retries safe).
async fn stream_append(
    client: Client,
    name: &str,
    records: Vec<String>,
    expected_version: Option<u64>,
) -> anyhow::Result<()> {
    use raftwal_client::{StreamAppendOptions, proto::StreamProducer};
    // Unique per run: the process id and the start time.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let producer_id = format!("raftwal-cli-{}-{started}", std::process::id());
    let mut sequence = 0;
    let mut send = async |records: Vec<Vec<u8>>, expected_version| {
        let options = StreamAppendOptions {
            expected_version,
            producer: Some(StreamProducer { id: producer_id.clone(), epoch: 0, sequence }),
            close: false,
        };
        sequence += 1;
        client.stream_append(name, records, options).await
    };
    if !records.is_empty() {
        let n = records.len();
        let r =
            send(records.into_iter().map(String::into_bytes).collect(), expected_version).await?;
        crate::outln!(
            "appended {n} records to {name}: version {}, next offset {}",
            r.version,
            r.next_offset
        );
        return Ok(());
    }
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let (mut batch, mut bytes, mut total, mut first) = (Vec::new(), 0usize, 0u64, true);
    let mut last = None;
    loop {
        let line = lines.next_line().await?;
        let full = batch.len() >= STREAM_BATCH_RECORDS || bytes >= STREAM_BATCH_BYTES;
        if (line.is_none() || full) && !batch.is_empty() {
            if first && line.is_some() && expected_version.is_some() {
                bail!(
                    "--expected-version takes input that fits one append ({STREAM_BATCH_RECORDS} \
                     records, {} KiB); this input is larger",
                    STREAM_BATCH_BYTES >> 10
                );
            }
            let n = batch.len() as u64;
            let expected = if first { expected_version } else { None };
            last = Some(send(std::mem::take(&mut batch), expected).await?);
            (bytes, total, first) = (0, total + n, false);
        }
        let Some(line) = line else { break };
        if line.is_empty() {
            continue;
        }
        bytes += line.len();
        batch.push(line.into_bytes());
    }
    let Some(r) = last else { bail!("nothing to append") };
    crate::outln!(
        "appended {total} records to {name}: version {}, next offset {}",
        r.version,
        r.next_offset
    );
    Ok(())
}

/// Records one append from standard input carries at most (the server's limit per append).
const STDIN_BATCH_RECORDS: usize = raftwal_server::envelope::BATCH_RECORDS_MAX as usize;
/// Record bytes one append from standard input carries at most (well under the server's
/// default `request_bytes_max`, 16 MiB).
const STDIN_BATCH_BYTES: usize = 4 << 20;

/// `raftwal append`: the records given (one append: all or nothing), or one record per line of
/// standard input, of any length: batches within the server's limits, pipelined, each batch
/// all or nothing and never applied twice (the client's producer sequence makes retries
/// safe); a progress line on a terminal and a summary at the end.
async fn append(
    client: Client,
    records: Vec<String>,
    expect_offset: Option<u64>,
) -> anyhow::Result<()> {
    let options = AppendOptions { expected_next_offset: expect_offset.map(Offset) };
    if !records.is_empty() {
        let records: Vec<Vec<u8>> = records.into_iter().map(String::into_bytes).collect();
        let a = client.append_with(records, options).await?;
        crate::outln!(
            "appended offsets {}..={}{}",
            a.first_offset,
            a.last_offset,
            if a.duplicate { " (a retry of an earlier append)" } else { "" }
        );
        return Ok(());
    }
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut batch_bytes = 0;
    let mut first_batch = true;
    let appender = client.appender(raftwal_client::AppenderConfig::default())?;
    let mut tickets = std::collections::VecDeque::new();
    let mut progress = Progress::new();
    loop {
        let line = lines.next_line().await?;
        let full = batch.len() >= STDIN_BATCH_RECORDS || batch_bytes >= STDIN_BATCH_BYTES;
        if (line.is_none() || full) && !batch.is_empty() {
            let records = std::mem::take(&mut batch);
            let n = records.len();
            batch_bytes = 0;
            if first_batch && line.is_none() {
                // All of it fits one append: all or nothing, as with records on the command line.
                let a = client.append_with(records, options).await?;
                progress.done(n, a.first_offset.get(), a.last_offset.get());
                break;
            }
            if first_batch && expect_offset.is_some() {
                bail!(
                    "--expect-offset takes input that fits one append ({STDIN_BATCH_RECORDS} \
                     records, {} MiB); this input is larger",
                    STDIN_BATCH_BYTES >> 20
                );
            }
            first_batch = false;
            tickets.push_back((n, appender.send(records).await?));
            // The appender's window bounds what is in flight; the oldest outcomes are taken
            // as new batches go out.
            while tickets.len() > raftwal_client::AppenderConfig::default().window as usize {
                let (n, t) = tickets.pop_front().expect("checked");
                let a = t.await?;
                progress.done(n, a.first_offset.get(), a.last_offset.get());
            }
        }
        let Some(line) = line else { break };
        batch_bytes += line.len();
        batch.push(line.into_bytes());
    }
    while let Some((n, t)) = tickets.pop_front() {
        let a = t.await?;
        progress.done(n, a.first_offset.get(), a.last_offset.get());
    }
    appender.close().await?;
    progress.finish()
}

/// Counts what a long append did; a progress line on a terminal.
struct Progress {
    started: std::time::Instant,
    shown: std::time::Instant,
    records: u64,
    batches: u64,
    first: Option<u64>,
    last: u64,
    terminal: bool,
}

impl Progress {
    fn new() -> Progress {
        use std::io::IsTerminal as _;
        let now = std::time::Instant::now();
        Progress {
            started: now,
            shown: now,
            records: 0,
            batches: 0,
            first: None,
            last: 0,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn done(&mut self, records: usize, first: u64, last: u64) {
        self.records += records as u64;
        self.batches += 1;
        self.first = Some(self.first.map_or(first, |f| f.min(first)));
        self.last = self.last.max(last);
        if self.terminal && self.shown.elapsed() >= std::time::Duration::from_millis(250) {
            self.shown = std::time::Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            eprint!("\rappended {} records ({:.0}/s)", self.records, self.records as f64 / secs);
        }
    }

    fn finish(self) -> anyhow::Result<()> {
        if self.terminal && self.batches > 1 {
            eprintln!();
        }
        let Some(first) = self.first else { bail!("nothing to append") };
        let secs = self.started.elapsed().as_secs_f64();
        crate::outln!(
            "appended {} records in {} append{} (offsets {first}..={}) in {secs:.1} s",
            self.records,
            self.batches,
            if self.batches == 1 { "" } else { "s" },
            self.last
        );
        Ok(())
    }
}

/// `raftwal follow`: prints records until ctrl-c or the end of the stream.
async fn follow(client: Client, from: u64) -> anyhow::Result<()> {
    let mut stream = client.follow(Offset(from));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            event = stream.next() => match event {
                None => return Ok(()),
                Some(Ok(FollowEvent::Records(records))) => {
                    for r in records {
                        crate::outln!("{}\t{}", r.offset, String::from_utf8_lossy(&r.data));
                    }
                }
                Some(Ok(FollowEvent::CaughtUp { next_offset })) => {
                    eprintln!("-- caught up at offset {next_offset}; live records follow");
                }
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }
}

/// `raftwal status`: a summary and a table of members, or JSON.
fn print_status(s: &raftwal_client::proto::StatusResponse, json: bool) {
    if json {
        let v = serde_json::json!({
            "node_id": s.node_id, "role": s.role, "term": s.term, "leader_id": s.leader_id,
            "leader_addr": s.leader_addr, "commit_offset": s.commit_offset,
            "applied_offset": s.applied_offset, "first_offset": s.first_offset,
            "last_offset": s.last_offset,
            "members": s.members.iter().map(|m| serde_json::json!({"id": m.id, "kind": m.kind, "addr": m.addr})).collect::<Vec<_>>(),
            "progress": s.progress.iter().map(|p| serde_json::json!({"id": p.id, "match_offset": p.match_offset, "next_offset": p.next_offset, "state": p.state, "active": p.active})).collect::<Vec<_>>(),
        });
        crate::outln!("{v}");
        return;
    }
    let at =
        if s.leader_addr.is_empty() { String::new() } else { format!(" at {}", s.leader_addr) };
    crate::outln!(
        "node {} ({}), term {}, leader {}{at}\ncommitted {}  applied {}  log {}..={}",
        s.node_id,
        s.role,
        s.term,
        s.leader_id,
        s.commit_offset,
        s.applied_offset,
        s.first_offset,
        s.last_offset
    );
    crate::outln!("\n| member | kind | address | match | state |\n|---|---|---|---|---|");
    for m in &s.members {
        let p = s.progress.iter().find(|p| p.id == m.id);
        let state = p.map_or("-".into(), |p| {
            format!("{}{}", p.state, if p.active { "" } else { " (inactive)" })
        });
        crate::outln!(
            "| {} | {} | {} | {} | {state} |",
            m.id,
            m.kind,
            m.addr,
            p.map_or("-".into(), |p| p.match_offset.to_string())
        );
    }
}
