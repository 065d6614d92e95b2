//! raftwal-bench: benchmark programs that print figures (and JSON lines with `--json`).
//!
//! Each mode measures raftwal and, in the same run, a baseline that shows what the hardware
//! allows, so every figure comes with the ratio that says how close raftwal gets.
//! Modes: `wal` (the write-ahead log against raw `pwrite` + `fdatasync`), `fsync` (what a sync
//! costs into fallocated vs pre-written blocks), `transport` (append messages between two
//! endpoints against a plain quinn stream), `append`/`follow`/`mixed` (a cluster under load
//! through the real client), `etcd` (the same put load against etcd, for
//! `bench/compare-etcd.sh`), `streams` (the streams HTTP API over many streams, and a restart).

#![forbid(unsafe_code)]

mod catch_up;
mod cluster;
mod etcd;
mod fsync;
mod latency;
mod load;
mod streams;
mod transport;
mod wal;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "raftwal-bench", about = "raftwal benchmark programs")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Append to the WAL from 1, 8 and 64 writers; compare with raw pwrite + fdatasync.
    Wal(wal::Args),
    /// fdatasync cost into fallocated-only vs pre-written blocks.
    Fsync(fsync::Args),
    /// Append messages between two transports on loopback; compare with a plain quinn stream.
    Transport(transport::Args),
    /// Appends to a cluster: closed loop (clients x depth) or open loop (--rate).
    Append(load::Args),
    /// Appends plus Follow streams: consumer throughput and append-to-delivery latency.
    Follow(load::Args),
    /// Appends, followers and reads at once.
    Mixed(load::Args),
    /// The comparison load: etcd KV.Put over its gRPC API (see bench/compare-etcd.sh).
    Etcd(etcd::Args),
    /// A follower restarted far behind, and a learner added to the same log: catch-up speed.
    CatchUp(catch_up::Args),
    /// Appends over the streams HTTP API to 1, 100, 10,000 streams; restart with many streams.
    Streams(streams::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().mode {
        Mode::Wal(args) => wal::run(&args),
        Mode::Fsync(args) => fsync::run(&args),
        Mode::Transport(args) => transport::run(&args),
        Mode::Append(args) => run_load(load::Mode::Append, &args),
        Mode::Follow(args) => run_load(load::Mode::Follow, &args),
        Mode::Mixed(args) => run_load(load::Mode::Mixed, &args),
        Mode::Streams(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(streams::run(&args))
        }
        Mode::CatchUp(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(catch_up::run(&args))
        }
        Mode::Etcd(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = runtime.block_on(etcd::run(&args))?;
            etcd::print(&report, args.json)
        }
    }
}

fn run_load(mode: load::Mode, args: &load::Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(load::run(mode, args))?;
    load::print(&report, args.json)
}
