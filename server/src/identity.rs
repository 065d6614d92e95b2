//! Who this node's data directory belongs to, and which data directory of each peer it knows.
//!
//! A node that lost its data directory has forgotten its votes and acknowledgements; if it came
//! back as the same voter, a committed entry could be lost. So every data directory gets an
//! incarnation (a random number made with it) in its `identity` file, together with the
//! cluster id and node id it was made for. Peers tell each other their incarnation when they
//! connect (raftwal-transport's hello and welcome), and each node remembers, durably in its
//! `peers` file, the first incarnation it admitted of each peer. A peer that comes back with
//! another one is refused, and told why; it stops with a clear error, and comes back only by
//! being removed and added again as a learner with an empty data directory, after which it is
//! a new peer. Byte layouts in docs/node-format.md.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use raftwal_consensus::NodeId;
use raftwal_transport::{PeerBook, Refusal};
use raftwal_wal::storage::Storage;

use crate::store;

/// The file that names the cluster, the node and the incarnation of a data directory.
pub const IDENTITY_FILE: &str = "identity";
/// The file of peers' incarnations this node admitted.
pub const PEERS_FILE: &str = "peers";

const IDENTITY_MAGIC: &[u8; 4] = b"RWID";
const PEERS_MAGIC: &[u8; 4] = b"RWPB";
const FORMAT_VERSION: u8 = 1;
const IDENTITY_BYTES: usize = 4 + 4 + 8 + 8 + 8 + 4;
/// Peers remembered at most (members past and present); a bound on the file.
const PEERS_MAX: usize = 4096;
/// The largest identity or peers file read (the peers file at `PEERS_MAX` is about 64 KiB).
const FILE_BYTES_MAX: u64 = 1 << 20;

/// The identity of a data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirIdentity {
    /// The cluster it was made for.
    pub cluster: u64,
    /// The node it was made for.
    pub node: NodeId,
    /// A random number made with the directory.
    pub incarnation: u64,
}

/// Reads the directory's identity, checking it belongs to `cluster` and `node`; makes one (with
/// a fresh incarnation from `seed`) when the directory has none.
pub fn load_or_create(
    dir: &dyn Storage,
    cluster: u64,
    node: NodeId,
    seed: u64,
) -> anyhow::Result<DirIdentity> {
    if let Some(bytes) = store::read_small_file(dir, IDENTITY_FILE, FILE_BYTES_MAX)? {
        let id = decode_identity(&bytes)
            .with_context(|| format!("the data directory's {IDENTITY_FILE} file is damaged"))?;
        if id.cluster != cluster || id.node != node {
            bail!(
                "refusing to start: this data directory belongs to node {} of cluster {:016x}, \
                 but the config says node {node} of cluster {cluster:016x}",
                id.node,
                id.cluster
            );
        }
        return Ok(id);
    }
    // Never zero, so that a directory made by this code is told from one made before it.
    let incarnation = seed.max(1);
    let id = DirIdentity { cluster, node, incarnation };
    store::replace_file(dir, IDENTITY_FILE, &encode_identity(&id))
        .with_context(|| format!("cannot write the data directory's {IDENTITY_FILE} file"))?;
    tracing::info!(incarnation = %format!("{incarnation:016x}"), "a new data directory");
    Ok(id)
}

fn encode_identity(id: &DirIdentity) -> Vec<u8> {
    let mut out = Vec::with_capacity(IDENTITY_BYTES);
    out.extend_from_slice(IDENTITY_MAGIC);
    out.extend_from_slice(&[FORMAT_VERSION, 0, 0, 0]);
    out.extend_from_slice(&id.cluster.to_le_bytes());
    out.extend_from_slice(&id.node.0.to_le_bytes());
    out.extend_from_slice(&id.incarnation.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode_identity(bytes: &[u8]) -> anyhow::Result<DirIdentity> {
    let body = checked(bytes, IDENTITY_MAGIC)?;
    if body.len() != IDENTITY_BYTES - 12 {
        bail!("{} bytes, not {}", bytes.len(), IDENTITY_BYTES);
    }
    let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    Ok(DirIdentity { cluster: u64_at(0), node: NodeId(u64_at(8)), incarnation: u64_at(16) })
}

/// The body of a file `magic | version | 3 zero bytes | body | crc32`, checked.
fn checked<'a>(bytes: &'a [u8], magic: &[u8; 4]) -> anyhow::Result<&'a [u8]> {
    if bytes.len() < 12 {
        bail!("too short");
    }
    let (data, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(data).to_le_bytes() != crc {
        bail!("checksum mismatch");
    }
    if &data[..4] != magic || data[4] != FORMAT_VERSION {
        bail!("not a raftwal file of a known version");
    }
    Ok(&data[8..])
}

/// The peers' incarnations this node admitted, kept in the `peers` file.
#[derive(Debug)]
pub struct KnownPeers {
    dir: Arc<dyn Storage>,
    known: Mutex<BTreeMap<NodeId, u64>>,
}

impl KnownPeers {
    /// Loads the book from `dir` (empty when there is no file yet).
    pub fn load(dir: Arc<dyn Storage>) -> anyhow::Result<KnownPeers> {
        let mut known = BTreeMap::new();
        if let Some(bytes) = store::read_small_file(dir.as_ref(), PEERS_FILE, FILE_BYTES_MAX)? {
            let body = checked(&bytes, PEERS_MAGIC)
                .with_context(|| format!("the data directory's {PEERS_FILE} file is damaged"))?;
            if body.len() % 16 != 0 {
                bail!("the data directory's {PEERS_FILE} file is damaged: a partial entry");
            }
            for entry in body.chunks_exact(16) {
                let node = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
                let incarnation = u64::from_le_bytes(entry[8..].try_into().expect("8 bytes"));
                known.insert(NodeId(node), incarnation);
            }
        }
        Ok(KnownPeers { dir, known: Mutex::new(known) })
    }

    fn save(&self, known: &BTreeMap<NodeId, u64>) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(12 + 16 * known.len());
        out.extend_from_slice(PEERS_MAGIC);
        out.extend_from_slice(&[FORMAT_VERSION, 0, 0, 0]);
        for (node, incarnation) in known {
            out.extend_from_slice(&node.0.to_le_bytes());
            out.extend_from_slice(&incarnation.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        store::replace_file(self.dir.as_ref(), PEERS_FILE, &out)
    }

    /// `peer` left the membership: a node with its id is a new peer from now on.
    pub fn forget(&self, peer: NodeId) -> std::io::Result<()> {
        let mut known = self.known.lock().expect("peers lock");
        if known.remove(&peer).is_some() {
            self.save(&known)?;
        }
        Ok(())
    }
}

impl PeerBook for KnownPeers {
    fn admit(&self, peer: NodeId, incarnation: u64) -> Result<(), Refusal> {
        let mut known = self.known.lock().expect("peers lock");
        match known.get(&peer) {
            Some(&k) if k == incarnation => Ok(()),
            Some(&k) => Err(Refusal::Stale(format!(
                "node {peer} came back with another data directory (incarnation {incarnation:016x}, \
                 known as {k:016x}): it lost its data, and with it its votes. Remove it \
                 (raftwal members remove {peer}) and add it back as a learner with an empty data \
                 directory and join = true"
            ))),
            None if known.len() >= PEERS_MAX => {
                Err(Refusal::Unavailable(format!("this node already knows {PEERS_MAX} peers")))
            }
            None => {
                // Durable before the peer's first vote or acknowledgement can arrive.
                known.insert(peer, incarnation);
                self.save(&known).map_err(|e| {
                    known.remove(&peer);
                    Refusal::Unavailable(format!("cannot record node {peer}'s data directory: {e}"))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftwal_wal::fault::FaultStorage;

    #[test]
    fn a_directory_keeps_its_identity_and_refuses_another_node_or_cluster() {
        let dir = FaultStorage::new();
        let made = load_or_create(&dir, 7, NodeId(2), 99).expect("made");
        assert_eq!(load_or_create(&dir, 7, NodeId(2), 12345).expect("read"), made);
        let err = load_or_create(&dir, 8, NodeId(2), 1).expect_err("another cluster");
        assert!(err.to_string().contains("belongs to node 2 of cluster"), "{err}");
        assert!(load_or_create(&dir, 7, NodeId(3), 1).is_err(), "another node");
    }

    #[test]
    fn the_first_incarnation_admitted_is_remembered_until_the_peer_is_forgotten() {
        let dir: Arc<dyn Storage> = Arc::new(FaultStorage::new());
        let book = KnownPeers::load(dir.clone()).expect("empty");
        book.admit(NodeId(3), 11).expect("first contact");
        book.admit(NodeId(3), 11).expect("the same directory");
        let again = KnownPeers::load(dir.clone()).expect("reload");
        let refusal = again.admit(NodeId(3), 12).expect_err("a wiped node");
        assert!(
            matches!(&refusal, Refusal::Stale(why) if why.contains("lost its data")),
            "{refusal}"
        );
        again.forget(NodeId(3)).expect("removed");
        KnownPeers::load(dir).expect("reload").admit(NodeId(3), 12).expect("re-added: a new peer");
    }
}
