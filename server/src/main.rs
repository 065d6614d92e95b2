//! `raftwal`: run a node, a local dev cluster, make certificates, show configuration, and talk
//! to a cluster (`append`, `read`, `follow`, `status`, `members`, `leader`, `trim`).

#![forbid(unsafe_code)]

mod cli;
mod dev;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use raftwal_server::{Node, config};

#[derive(Parser, Debug)]
#[command(name = "raftwal", version, about = "A Raft-replicated write-ahead log")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Settings for one node: a TOML file, then `RAFTWAL_*` variables, then these flags.
#[derive(clap::Args, Debug, Clone)]
struct NodeArgs {
    /// The TOML configuration file.
    #[arg(long, env = "RAFTWAL_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id.
    #[arg(long)]
    id: Option<u64>,
    /// The data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC address for clients.
    #[arg(long)]
    api_listen: Option<String>,
    /// QUIC address for peers.
    #[arg(long)]
    peer_listen: Option<String>,
    /// HTTP admin address.
    #[arg(long)]
    http_listen: Option<String>,
    /// The other founding members, ID@PEER_ADDR@API_ADDR, comma-separated.
    #[arg(long)]
    peers: Option<String>,
    /// Join an existing cluster instead of founding one.
    #[arg(long)]
    join: bool,
    /// Serve clients without TLS (peers always use mutual TLS).
    #[arg(long)]
    client_plaintext: bool,
    /// Any other setting, KEY=VALUE (see `raftwal config show`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl NodeArgs {
    fn resolve(&self) -> anyhow::Result<config::Resolved> {
        let mut flags: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                flags.push((k.to_string(), v));
            }
        };
        put("id", self.id.map(|v| v.to_string()));
        put("data_dir", self.data_dir.as_ref().map(|p| p.display().to_string()));
        put("api_listen", self.api_listen.clone());
        put("peer_listen", self.peer_listen.clone());
        put("http_listen", self.http_listen.clone());
        put("peers", self.peers.clone());
        put("join", self.join.then(|| "true".to_string()));
        put("client_plaintext", self.client_plaintext.then(|| "true".to_string()));
        for kv in &self.set {
            let (k, v) =
                kv.split_once('=').with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
            flags.push((k.trim().to_string(), v.to_string()));
        }
        config::resolve(self.config.as_deref(), std::env::vars(), &flags)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one node until SIGINT or SIGTERM.
    Node(NodeArgs),
    /// Run a local 3-node cluster on loopback, data under ./raftwal-dev, until Ctrl-C.
    Dev {
        /// Where the cluster keeps its data, certificates and logs.
        #[arg(long, default_value = dev::DEV_DIR)]
        dir: PathBuf,
        /// The loopback address the nodes listen on (ports 7001-7003 for clients, 7101-7103
        /// for peers, 7201-7203 for HTTP, 7301-7303 for streams). Fixed by the first run: the
        /// configs remember it.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
    },
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the effective settings and where each came from.
    Show(NodeArgs),
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Make a cluster CA, node certificates and a client certificate.
    Init {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Node certificates for ids 1..=N.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Extra host names or IP addresses every node certificate names (clients dial these).
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        names: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAFTWAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes to stdout; a closed pipe (`raftwal read | head`) ends the program quietly instead of
/// panicking as `println!` would.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if writeln!(out, $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(args) => {
            let resolved = args.resolve()?;
            raftwal_server::http::prometheus();
            let node = Node::start(resolved.config).await?;
            tokio::select! {
                r = wait_for_signal() => r?,
                why = node.failed() => {
                    let _ = node.shutdown().await;
                    anyhow::bail!("the node failed and stopped: {why}");
                }
            }
            tracing::info!("stopping");
            node.shutdown().await
        }
        Command::Dev { dir, host } => dev::dev(dir, &host, 3).await,
        Command::Config(ConfigCommand::Show(args)) => {
            outln!("{}", args.resolve()?.show().trim_end());
            Ok(())
        }
        Command::Certs(CertsCommand::Init { dir, nodes, names }) => {
            raftwal_server::local::certs_init(&dir, nodes, &names)?;
            outln!("wrote ca.pem, node-1..{nodes}.pem/.key, client.pem/.key to {}", dir.display());
            outln!(
                "a new cluster id for every node's config: cluster_id = {}",
                raftwal_server::local::random_cluster_id()
            );
            Ok(())
        }
        Command::Client(cmd) => cli::run(cmd).await,
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
