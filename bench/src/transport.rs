//! `transport`: append messages of 1 KiB entries from one endpoint to another on loopback
//! through raftwal-transport, then the same frame bytes over one plain quinn stream with the
//! same TLS and window settings. The ratio says what the transport's framing, queues and
//! validation cost against QUIC itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftwal_consensus::{Entry, EntryKind, GroupId, LogIndex, Message, MessageBody, NodeId, Term};
use raftwal_transport::certs::ClusterCa;
use raftwal_transport::{Identity, SendError, Transport, TransportConfig, encode, quinn_configs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds to measure each side (after a one-second warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Entries per append message.
    #[arg(long, default_value_t = 64)]
    entries: usize,
    /// Bytes per entry.
    #[arg(long, default_value_t = 1024)]
    entry_bytes: usize,
}

struct Side {
    msgs_per_s: f64,
    mb_per_s: f64,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let ca = ClusterCa::generate("raftwal bench CA")?;
        let identity = |id: u64| -> anyhow::Result<Identity> {
            let bundle = ca.issue_node(NodeId(id), &[])?;
            Ok(Identity::from_pem(&ca.cert_pem(), &bundle.cert_pem, &bundle.key_pem)?)
        };
        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        let config = |id| -> anyhow::Result<TransportConfig> {
            Ok(TransportConfig::new(NodeId(id), loopback, identity(id)?))
        };
        let message = append(args.entries, args.entry_bytes);
        let ours = measure_transport(config(1)?, config(2)?, &message, args).await?;
        let raw = measure_raw(config(1)?, config(2)?, &message, args).await?;
        let ratio = ours.mb_per_s / raw.mb_per_s;
        if args.json {
            let line = serde_json::json!({
                "mode": "transport",
                "entries_per_msg": args.entries,
                "entry_bytes": args.entry_bytes,
                "msgs_per_s": ours.msgs_per_s.round(),
                "mb_per_s": (ours.mb_per_s * 10.0).round() / 10.0,
                "raw_msgs_per_s": raw.msgs_per_s.round(),
                "raw_mb_per_s": (raw.mb_per_s * 10.0).round() / 10.0,
                "ratio": (ratio * 100.0).round() / 100.0,
            });
            println!("{line}");
        } else {
            println!(
                "| path | messages/s | MB/s (entry payload) |\n|---|---|---|\n\
                 | raftwal-transport | {:.0} | {:.1} |\n| plain quinn stream | {:.0} | {:.1} |\n\
                 ratio {:.2} ({} x {} B entries per message, loopback, TLS 1.3)",
                ours.msgs_per_s,
                ours.mb_per_s,
                raw.msgs_per_s,
                raw.mb_per_s,
                ratio,
                args.entries,
                args.entry_bytes
            );
        }
        Ok(())
    })
}

fn append(entries: usize, entry_bytes: usize) -> Message {
    let data = Bytes::from(vec![0x5a; entry_bytes]);
    let entries = (0..entries as u64)
        .map(|i| Entry {
            term: Term(2),
            index: LogIndex(100 + i),
            kind: EntryKind::Normal,
            data: data.clone(),
        })
        .collect();
    Message {
        group: GroupId(1),
        from: NodeId(1),
        to: NodeId(2),
        term: Term(2),
        body: MessageBody::App {
            prev_index: LogIndex(99),
            prev_term: Term(2),
            entries,
            commit: LogIndex(99),
        },
    }
}

/// One second of warm-up, then `seconds` measured: what a counter gained in the measured part.
struct Window {
    warmup_end: Instant,
    end: Instant,
    start: Option<(u64, Instant)>,
}

impl Window {
    fn new(seconds: u64) -> Window {
        let warmup_end = Instant::now() + Duration::from_secs(1);
        Window { warmup_end, end: warmup_end + Duration::from_secs(seconds.max(1)), start: None }
    }

    /// Whether to go on sending; notes the counter when the warm-up ends.
    fn running(&mut self, counter: &AtomicU64) -> bool {
        let now = Instant::now();
        if self.start.is_none() && now >= self.warmup_end {
            self.start = Some((counter.load(Ordering::Relaxed), now));
        }
        now < self.end
    }

    /// (what the counter gained, seconds) since the warm-up ended.
    fn gained(&self, counter: &AtomicU64) -> (f64, f64) {
        let (start, from) = self.start.expect("the warm-up ends before the run");
        ((counter.load(Ordering::Relaxed) - start) as f64, from.elapsed().as_secs_f64())
    }
}

fn payload_bytes(msg: &Message) -> u64 {
    match &msg.body {
        MessageBody::App { entries, .. } => entries.iter().map(|e| e.data.len() as u64).sum(),
        _ => 0,
    }
}

async fn measure_transport(
    mut sender: TransportConfig,
    receiver: TransportConfig,
    message: &Message,
    args: &Args,
) -> anyhow::Result<Side> {
    let (rx_transport, mut inbox) = Transport::start(receiver)?;
    sender.peers.insert(NodeId(2), rx_transport.local_addr());
    let (tx_transport, _tx_inbox) = Transport::start(sender)?;
    // The acceptor admits only known peers.
    rx_transport.add_peer(NodeId(1), tx_transport.local_addr());
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while inbox.recv().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut window = Window::new(args.seconds);
    while window.running(&received) {
        match tx_transport.send(message) {
            Ok(()) => {}
            Err(SendError::QueueFull { .. }) => {
                tokio::time::sleep(Duration::from_micros(200)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (msgs, secs) = window.gained(&received);
    let (msgs_per_s, mb_per_s) = (msgs / secs, msgs * payload_bytes(message) as f64 / secs / 1e6);
    tx_transport.shutdown().await;
    rx_transport.shutdown().await;
    Ok(Side { msgs_per_s, mb_per_s })
}

async fn measure_raw(
    sender: TransportConfig,
    receiver: TransportConfig,
    message: &Message,
    args: &Args,
) -> anyhow::Result<Side> {
    let (server_config, _) = quinn_configs(&receiver)?;
    let (_, client_config) = quinn_configs(&sender)?;
    let server = quinn::Endpoint::server(server_config, receiver.listen)?;
    let mut client = quinn::Endpoint::client(sender.listen)?;
    client.set_default_client_config(client_config);
    let frame = encode(message).to_vec();
    let frame_len = frame.len() as u64;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let addr = server.local_addr()?;
    let connecting = client.connect(addr, &raftwal_transport::node_name(NodeId(2)))?;
    let accepting = async {
        let incoming = server.accept().await.ok_or_else(|| anyhow::anyhow!("no connection"))?;
        incoming.await.map_err(anyhow::Error::from)
    };
    let (incoming, conn) = tokio::join!(accepting, connecting);
    let (incoming, conn) = (incoming?, conn?);
    tokio::spawn(async move {
        let Ok(mut recv) = incoming.accept_uni().await else { return };
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    let mut send = conn.open_uni().await?;
    let frame = Bytes::from(frame);
    let mut window = Window::new(args.seconds);
    while window.running(&received) {
        send.write_chunk(frame.clone()).await?;
    }
    let (bytes, secs) = window.gained(&received);
    let msgs_per_s = bytes / frame_len as f64 / secs;
    conn.close(quinn::VarInt::from_u32(0), b"done");
    client.wait_idle().await;
    server.close(quinn::VarInt::from_u32(0), b"done");
    Ok(Side { msgs_per_s, mb_per_s: msgs_per_s * payload_bytes(message) as f64 / 1e6 })
}
