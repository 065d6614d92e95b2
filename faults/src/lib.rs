//! raftwal-faults: a fault harness over real `raftwal node` processes.
//!
//! What it is: a program that starts a 3- or 5-node cluster in a fresh temp directory, drives
//! it through the public gRPC API with the Rust client (producers with deduplicated retries,
//! a pipelined appender, expected-offset appends, linearizable readers, followers), injects
//! faults at random times drawn from a seed (kill -9, SIGSTOP, nftables partitions, damaged
//! files on a stopped node, a full tmpfs), then heals everything, restarts every node, reads
//! every node's log back and checks the whole history. What it is not: a simulator (the
//! consensus and cluster simulators replay exactly from a seed; this harness runs real
//! processes and real time, so a seed replays the same fault schedule, not the same run).
//!
//! Data flow: [`workload`] tasks record operations into a [`history::Recorder`] while the
//! [`nemesis`] injects one fault at a time through [`cluster`] (processes), [`net`]
//! (partitions) and [`disk`] (damage, full disk); [`run`] heals and reads the logs back,
//! [`checker`] checks the history against them, [`report`] summarises availability per fault
//! kind and prints the last line. [`selftest`] proves the checker catches doctored histories.

#![forbid(unsafe_code)]

pub mod checker;
pub mod cluster;
pub mod disk;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod raw;
pub mod report;
pub mod run;
pub mod selftest;
pub mod workload;
