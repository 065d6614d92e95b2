//! What two peers say before any message: which cluster they belong to and which incarnation of
//! their data directory they are.
//!
//! TLS proves which node is at the other end (its certificate names it); it cannot tell a node
//! from the same node after it lost its data, nor a node of one cluster from a node of another
//! cluster under the same CA. So, once TLS is done, the dialer opens a hello stream and the
//! acceptor answers with a welcome stream, each a 32-byte header:
//!
//! ```text
//! offset  size  field
//! 0       4     magic "RWP1"
//! 4       1     version (1)
//! 5       1     kind: 0xfe hello (dialer), 0xff welcome (acceptor)
//! 6       2     zero
//! 8       8     sender node id, LE
//! 16      8     cluster id, LE
//! 24      8     incarnation of the sender's data directory, LE
//! ```
//!
//! Each side refuses a peer of another cluster, and asks its [`PeerBook`] whether the peer's
//! incarnation is the one it knows (the node's book remembers the first one it admits,
//! durably, and refuses any other: a node that lost its data, and with it its votes and
//! acknowledgements, must not take part again as the same voter). A refused side is told why
//! with a close code, and [`crate::Transport::refusal`] reports it to its node.

use std::fmt;

use raftwal_consensus::NodeId;

/// Magic, version, kind, sender: the first 16 bytes of every stream header.
pub(crate) const STREAM_MAGIC: &[u8; 4] = b"RWP1";
pub(crate) const STREAM_VERSION: u8 = 1;
pub(crate) const STREAM_HEADER_BYTES: usize = 16;
/// A hello or welcome: the stream header, the cluster id and the incarnation.
pub(crate) const GREETING_BYTES: usize = 32;
pub(crate) const HELLO_KIND: u8 = 0xfe;
pub(crate) const WELCOME_KIND: u8 = 0xff;

/// QUIC application close codes.
pub(crate) const CLOSE_SHUTDOWN: u32 = 0;
pub(crate) const CLOSE_UNKNOWN_PEER: u32 = 1;
pub(crate) const CLOSE_PROTOCOL: u32 = 2;
/// The peer is of another cluster.
pub(crate) const CLOSE_OTHER_CLUSTER: u32 = 3;
/// The peer's data directory is not the incarnation this node knows.
pub(crate) const CLOSE_STALE_PEER: u32 = 4;

/// Who a node is beyond its certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    /// The cluster it belongs to.
    pub cluster: u64,
    /// The incarnation of its data directory (a random number made with the directory).
    pub incarnation: u64,
}

/// Why a peer's incarnation was not admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The peer's data directory is not the one known: it lost its data. The peer is told so,
    /// and must not take part as this node.
    #[error("{0}")]
    Stale(String),
    /// This node cannot decide now (its book could not be written): the connection closes as
    /// a protocol failure and the peer retries later, not told it is stale.
    #[error("{0}")]
    Unavailable(String),
}

/// Decides whether a peer's data-directory incarnation is the one this node knows.
pub trait PeerBook: Send + Sync + fmt::Debug {
    /// Admits `peer` at `incarnation`, or says why not. A book that remembers incarnations must
    /// make a new one durable before it admits it (votes and acknowledgements follow).
    fn admit(&self, peer: NodeId, incarnation: u64) -> Result<(), Refusal>;
}

/// A book that admits every incarnation (tests and tools without a data directory).
#[derive(Debug, Default, Clone, Copy)]
pub struct AdmitAll;

impl PeerBook for AdmitAll {
    fn admit(&self, _peer: NodeId, _incarnation: u64) -> Result<(), Refusal> {
        Ok(())
    }
}

pub(crate) fn header_bytes(kind: u8, from: NodeId) -> [u8; STREAM_HEADER_BYTES] {
    let mut header = [0u8; STREAM_HEADER_BYTES];
    header[..4].copy_from_slice(STREAM_MAGIC);
    header[4] = STREAM_VERSION;
    header[5] = kind;
    header[8..].copy_from_slice(&from.0.to_le_bytes());
    header
}

/// The kind byte of a well-formed header from `expected`.
pub(crate) fn parse_header(header: &[u8; STREAM_HEADER_BYTES], expected: NodeId) -> Option<u8> {
    if &header[..4] != STREAM_MAGIC || header[4] != STREAM_VERSION || header[6..8] != [0, 0] {
        return None;
    }
    let from = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    (from == expected.0).then_some(header[5])
}

pub(crate) fn greeting(kind: u8, from: NodeId, me: PeerIdentity) -> [u8; GREETING_BYTES] {
    let mut out = [0u8; GREETING_BYTES];
    out[..STREAM_HEADER_BYTES].copy_from_slice(&header_bytes(kind, from));
    out[16..24].copy_from_slice(&me.cluster.to_le_bytes());
    out[24..].copy_from_slice(&me.incarnation.to_le_bytes());
    out
}

/// The identity in a greeting of `kind` from `expected`.
pub(crate) fn parse_greeting(
    bytes: &[u8; GREETING_BYTES],
    kind: u8,
    expected: NodeId,
) -> Option<PeerIdentity> {
    let header: &[u8; STREAM_HEADER_BYTES] = bytes[..16].try_into().expect("16 bytes");
    (parse_header(header, expected)? == kind).then(|| PeerIdentity {
        cluster: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
        incarnation: u64::from_le_bytes(bytes[24..].try_into().expect("8 bytes")),
    })
}

/// Why a greeting was refused, as a close code and reason for the peer, or `None` to admit.
pub(crate) fn judge(
    book: &dyn PeerBook,
    me: PeerIdentity,
    peer: NodeId,
    theirs: PeerIdentity,
) -> Option<(u32, String)> {
    if theirs.cluster != me.cluster {
        let why = format!(
            "node {peer} belongs to cluster {:016x}, this node to cluster {:016x}",
            theirs.cluster, me.cluster
        );
        return Some((CLOSE_OTHER_CLUSTER, why));
    }
    match book.admit(peer, theirs.incarnation) {
        Ok(()) => None,
        Err(Refusal::Stale(why)) => Some((CLOSE_STALE_PEER, why)),
        Err(Refusal::Unavailable(why)) => Some((CLOSE_PROTOCOL, why)),
    }
}

/// What a peer's close says about us, for [`crate::Transport::refusal`]: another cluster, or a
/// data directory it does not know as this node's.
pub(crate) fn refusal_of(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = close.error_code.into_inner();
            (code == u64::from(CLOSE_OTHER_CLUSTER) || code == u64::from(CLOSE_STALE_PEER))
                .then(|| String::from_utf8_lossy(&close.reason).into_owned())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_round_trip_and_name_their_sender_and_kind() {
        let me = PeerIdentity { cluster: 0xabc, incarnation: 42 };
        let hello = greeting(HELLO_KIND, NodeId(3), me);
        assert_eq!(parse_greeting(&hello, HELLO_KIND, NodeId(3)), Some(me));
        assert_eq!(parse_greeting(&hello, WELCOME_KIND, NodeId(3)), None, "the wrong kind");
        assert_eq!(parse_greeting(&hello, HELLO_KIND, NodeId(4)), None, "another sender");
        let mut bad = hello;
        bad[0] = b'X';
        assert_eq!(parse_greeting(&bad, HELLO_KIND, NodeId(3)), None);
    }

    #[test]
    fn another_cluster_or_a_refused_incarnation_is_judged_with_its_code() {
        #[derive(Debug)]
        struct Knows(u64);
        impl PeerBook for Knows {
            fn admit(&self, _: NodeId, incarnation: u64) -> Result<(), Refusal> {
                if incarnation == self.0 {
                    Ok(())
                } else {
                    Err(Refusal::Stale("lost its data".into()))
                }
            }
        }
        let me = PeerIdentity { cluster: 1, incarnation: 5 };
        let same = PeerIdentity { cluster: 1, incarnation: 7 };
        assert_eq!(judge(&Knows(7), me, NodeId(2), same), None);
        let other = PeerIdentity { cluster: 2, incarnation: 7 };
        assert_eq!(judge(&Knows(7), me, NodeId(2), other).map(|r| r.0), Some(CLOSE_OTHER_CLUSTER));
        let wiped = PeerIdentity { cluster: 1, incarnation: 8 };
        assert_eq!(
            judge(&Knows(7), me, NodeId(2), wiped),
            Some((CLOSE_STALE_PEER, "lost its data".to_string()))
        );
    }
}
