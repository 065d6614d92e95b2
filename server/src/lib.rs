//! raftwal-server: the raftwal node and the `raftwal` command.
//!
//! What it is: a driver thread that owns the consensus state machine and turns its Readies
//! into WAL writes and peer messages (`driver`), the replicated state of the log (`state`,
//! `envelope`), the WAL as consensus's store (`store`), the gRPC client API (`api`), the HTTP
//! admin port (`http`), configuration (`config`) and node startup (`node`). What it is not:
//! consensus, the WAL or the transport themselves; those are their own crates.
//!
//! Data flow of an append: gRPC handler -> driver queue (bounded) -> `propose` -> Ready ->
//! App messages out + WAL write/fsync -> quorum acknowledgements -> commit -> apply -> the
//! handler's reply; readers wake on the settled index.

#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod driver;
pub mod envelope;
pub mod http;
pub mod local;
pub mod node;
pub mod state;
pub mod store;

pub use config::NodeConfig;
pub use node::Node;
