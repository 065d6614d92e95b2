//! raftwal-client: the gRPC API of raftwal (`raftwal.v1`, generated from
//! `client/proto/raftwal/v1/raftwal.proto`) and a Rust client that follows the leader.
//!
//! What it is: [`Client`] appends to, reads and follows one durable, totally ordered log
//! replicated by Raft, and administers the cluster; [`Appender`] pipelines appends; [`Follow`]
//! streams the committed log. It finds the leader by itself, retries what is safe to retry, and
//! reports every failure as a typed [`ClientError`]. What it is not: a server, a cache, or a
//! consumer-group library. It keeps no state on disk (a producer id lives as long as its
//! [`Client`] or [`Appender`]), and it never reorders or repeats records it hands back.
//!
//! # How a call flows
//!
//! 1. [`Client::connect`] prepares a lazy channel per configured endpoint (nothing connects yet)
//!    and picks a random producer id.
//! 2. An append or admin call goes to the endpoint the client believes leads (at first the first
//!    configured one); a read, a follow or a status may be served by any node.
//! 3. The attempt runs under `request_timeout`. Its outcome decides what comes next:
//!    - an answer: the endpoint is remembered as the leader (or reader) and the call returns;
//!    - UNAVAILABLE with trailer `raftwal-leader-addr`: the client switches to that address
//!      (same scheme as configured, added as a new endpoint if unknown) and retries, at once
//!      the first time;
//!    - a refused connection, UNAVAILABLE without a leader, a deadline or a broken connection:
//!      the next endpoint, after a capped exponential pause with jitter;
//!    - RESOURCE_EXHAUSTED: the same endpoint after a pause, a few times, then
//!      [`ClientError::Overloaded`];
//!    - anything else is final: [`ClientError::OffsetMismatch`], [`ClientError::Trimmed`],
//!      [`ClientError::InvalidArgument`], [`ClientError::TooLarge`], [`ClientError::Other`].
//! 4. After `retries_max` retries the call fails with [`ClientError::UnknownOutcome`] if some
//!    attempt of an append or admin call may have taken effect, else [`ClientError::Unavailable`].
//!
//! # Appends are at most once
//!
//! Every append carries a producer id and a sequence. A new append takes the next sequence; a
//! retry of it reuses its sequence, so when an earlier attempt committed and only its answer was
//! lost, the server answers with the original offsets and `duplicate = true` instead of
//! appending again. The server applies a producer's sequence only when it is above the last one
//! it applied (the producer rule, written once in [`dedup`] and used by the server); so a
//! producer's records land in sequence order, and an append reported as
//! [`ClientError::UnknownOutcome`] is either in the log before every later append of its
//! producer or never will be. A sequence below the latest applied one that was never applied is
//! refused (FAILED_PRECONDITION, out of order), and one older than the last 64 the server
//! remembers is refused as stale (its outcome unknown).
//!
//! A [`Client`] sends its own appends one at a time (clones share its producer). For many in
//! flight, use an [`Appender`] (one stream, a bounded window, its own producer); its ordering
//! guarantee is documented on the type.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod appender;
mod backoff;
mod call;
mod client;
mod config;
pub mod dedup;
mod error;
mod follow;
mod router;
mod streams;
mod types;

/// The largest response a node sends: a read page of up to 32 MiB of records with its framing.
/// tonic's default of 4 MiB would refuse a default 4 MiB page of large records, or one 8 MiB
/// record.
const RESPONSE_BYTES_MAX: usize = 33 << 20;

/// A client of the log service that accepts every response a node may send.
pub(crate) fn log_client(
    channel: tonic::transport::Channel,
) -> proto::log_client::LogClient<tonic::transport::Channel> {
    proto::log_client::LogClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

pub use appender::{AppendTicket, Appender};
pub use client::Client;
pub use config::{APPENDER_WINDOW_MAX, AppenderConfig, ClientConfig, ClientTls};
pub use error::{
    ClientError, TRAILER_FIRST_OFFSET, TRAILER_LEADER_ADDR, TRAILER_LEADER_ID, TRAILER_NEXT_OFFSET,
    TRAILER_PRODUCER_EPOCH, TRAILER_PRODUCER_EXPECTED_SEQ, TRAILER_STREAM_CLOSED,
    TRAILER_STREAM_VERSION,
};
pub use follow::Follow;
pub use streams::{StreamAppendOptions, StreamEvent, StreamFollow};
pub use types::{
    AppendOptions, Appended, FollowEvent, Member, Membership, NodeId, Offset, ReadBatch, Record,
};

/// A client of the streams service that accepts every response a node may send.
pub(crate) fn streams_client(
    channel: tonic::transport::Channel,
) -> proto::streams_client::StreamsClient<tonic::transport::Channel> {
    proto::streams_client::StreamsClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
}

pub mod proto {
    //! The generated `raftwal.v1` messages, clients and server traits.
    #![allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
    tonic::include_proto!("raftwal.v1");
}
