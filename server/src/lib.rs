//! raftwal-server: the raftwal node and the `raftwal` command.
//!
//! What it is: the node core, a deterministic state machine with no IO that owns the consensus
//! state machine and everything derived from the log (`core`); the shell that feeds it events
//! and carries out its actions on the WAL, the transport and the callers (`shell`); the
//! encoding of the node's entries (`envelope`); the WAL as consensus's store and the log-start
//! file (`store`); the gRPC client API (`api`), the HTTP admin port (`http`), configuration
//! (`config`) and node startup (`node`). What it is not: consensus, the WAL or the transport
//! themselves; those are their own crates.
//!
//! Data flow of an append: gRPC handler -> the driver's queue (bounded) -> the core proposes ->
//! Ready -> actions: App messages out + WAL write (fsync on the syncer) -> quorum
//! acknowledgements -> commit -> apply -> a Reply action answers the handler; readers wake on
//! the settled index.

#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod conn_limit;
pub mod core;
pub mod disk;
pub mod envelope;
pub mod http;
pub mod identity;
pub mod local;
pub mod node;
pub mod read;
pub mod shell;
pub mod store;
pub mod streams_api;
pub mod streams_grpc;
pub mod streams_http;

pub use config::NodeConfig;
pub use node::Node;
