//! raftwal-transport: QUIC between raftwal peers.
//!
//! What it is: the frames consensus messages travel in, the mutual-TLS configuration that proves
//! which node is at the other end, and the endpoint that keeps one connection per peer with
//! separate streams for control, replication and catch-up. What it is not: it never interprets
//! a message beyond routing it; consensus validates what it means.

#![forbid(unsafe_code)]

pub mod certs;
mod endpoint;
pub mod frame;
mod handshake;
mod tls;

pub use endpoint::{Lane, SendError, StartError, Transport, TransportConfig, quinn_configs};
pub use frame::{EncodedFrame, FrameError, FrameLimits, decode, encode};
pub use handshake::{AdmitAll, PeerBook, PeerIdentity, Refusal};
pub use tls::{ALPN, Identity, TlsError, node_name};
