//! What a normal Raft entry holds: one client record, or an internal command of the node.
//!
//! ```text
//! byte 0: kind
//!   0 RECORD        record bytes follow (a single record, or a later record of a batch)
//!   1 BATCH_HEAD    producer id u64 | sequence u64 | count u32 | flags u8, then the first
//!                   record's bytes; `count` records (this one included) form one batch
//!   2 ADDRESS       node id u64 | peer addr len u16 | peer addr | api addr len u16 | api addr
//!   3 TRIM          before u64: discard the log below this index on every node
//!   4 STREAM        a command on named streams (`core::streams`, its own encoding)
//! ```
//! Integers are little endian. Flags bit 0: the batch has a producer (else id and sequence are
//! zero). Only RECORD and BATCH_HEAD entries are records; readers never see the others.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use raftwal_consensus::{LogIndex, NodeId};

const KIND_RECORD: u8 = 0;
const KIND_BATCH_HEAD: u8 = 1;
const KIND_ADDRESS: u8 = 2;
const KIND_TRIM: u8 = 3;
const KIND_STREAM: u8 = 4;
/// The most records one append (one batch) may hold.
pub const BATCH_RECORDS_MAX: u64 = 10_000;
const BATCH_HEAD_BYTES: usize = 1 + 8 + 8 + 4 + 1;
const FLAG_PRODUCER: u8 = 1;

/// A producer's identity and the sequence of one of its appends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProducerSeq {
    /// The producer.
    pub id: u64,
    /// Its append's sequence.
    pub sequence: u64,
}

/// A node's addresses, replicated so that every member can reach a node added later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addresses {
    /// The node.
    pub id: NodeId,
    /// Its QUIC peer address.
    pub peer: SocketAddr,
    /// Its client API address, as clients should dial it.
    pub api: String,
}

/// A decoded entry payload. `data` slices share the entry's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A record that is not the first of a batch (or a lone record without a producer).
    Record(Bytes),
    /// The first record of a batch of `count` records.
    BatchHead { producer: Option<ProducerSeq>, count: u32, data: Bytes },
    /// A node's addresses.
    Address(Addresses),
    /// Discard the log below `before`.
    Trim { before: LogIndex },
    /// A command on named streams.
    Stream(crate::core::streams::Command),
}

/// Why an entry payload could not be decoded: the log holds bytes no node wrote.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed entry payload: {0}")]
pub struct Malformed(pub &'static str);

/// Encodes one append's records as entry payloads. A lone record without a producer is a plain
/// RECORD; anything else starts with a BATCH_HEAD so the batch is applied as one.
pub fn encode_batch(records: &[Bytes], producer: Option<ProducerSeq>) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(records.len());
    for (i, record) in records.iter().enumerate() {
        if i == 0 && (records.len() > 1 || producer.is_some()) {
            let mut b = BytesMut::with_capacity(BATCH_HEAD_BYTES + record.len());
            b.put_u8(KIND_BATCH_HEAD);
            let p = producer.unwrap_or(ProducerSeq { id: 0, sequence: 0 });
            b.put_u64_le(p.id);
            b.put_u64_le(p.sequence);
            b.put_u32_le(records.len() as u32);
            b.put_u8(if producer.is_some() { FLAG_PRODUCER } else { 0 });
            b.put_slice(record);
            out.push(b.freeze());
        } else {
            let mut b = BytesMut::with_capacity(1 + record.len());
            b.put_u8(KIND_RECORD);
            b.put_slice(record);
            out.push(b.freeze());
        }
    }
    out
}

/// Encodes a node's addresses.
pub fn encode_address(a: &Addresses) -> Bytes {
    let peer = a.peer.to_string();
    let mut b = BytesMut::with_capacity(13 + peer.len() + a.api.len());
    b.put_u8(KIND_ADDRESS);
    b.put_u64_le(a.id.0);
    b.put_u16_le(peer.len() as u16);
    b.put_slice(peer.as_bytes());
    b.put_u16_le(a.api.len() as u16);
    b.put_slice(a.api.as_bytes());
    b.freeze()
}

/// Encodes a trim command.
pub fn encode_trim(before: LogIndex) -> Bytes {
    let mut b = BytesMut::with_capacity(9);
    b.put_u8(KIND_TRIM);
    b.put_u64_le(before.0);
    b.freeze()
}

/// Encodes a command on named streams.
pub fn encode_stream(cmd: &crate::core::streams::Command) -> Bytes {
    crate::core::streams::encode(KIND_STREAM, cmd)
}

/// Decodes an entry payload.
pub fn decode(data: &Bytes) -> Result<Payload, Malformed> {
    let Some(&kind) = data.first() else {
        return Err(Malformed("empty payload"));
    };
    match kind {
        KIND_RECORD => Ok(Payload::Record(data.slice(1..))),
        KIND_BATCH_HEAD => {
            if data.len() < BATCH_HEAD_BYTES {
                return Err(Malformed("short batch head"));
            }
            let id = u64_at(data, 1);
            let sequence = u64_at(data, 9);
            let count = u32::from_le_bytes(data[17..21].try_into().expect("4 bytes"));
            let flags = data[21];
            if count == 0 {
                return Err(Malformed("batch of zero records"));
            }
            let producer = (flags & FLAG_PRODUCER != 0).then_some(ProducerSeq { id, sequence });
            Ok(Payload::BatchHead { producer, count, data: data.slice(BATCH_HEAD_BYTES..) })
        }
        KIND_ADDRESS => {
            let mut at = 1;
            let id = NodeId(take_u64(data, &mut at)?);
            let peer = take_str(data, &mut at)?;
            let api = take_str(data, &mut at)?;
            let peer = peer.parse().map_err(|_| Malformed("bad peer address"))?;
            Ok(Payload::Address(Addresses { id, peer, api }))
        }
        KIND_TRIM => {
            let mut at = 1;
            Ok(Payload::Trim { before: LogIndex(take_u64(data, &mut at)?) })
        }
        KIND_STREAM => crate::core::streams::decode(&data.slice(1..)).map(Payload::Stream),
        _ => Err(Malformed("unknown payload kind")),
    }
}

/// The record bytes of an entry payload, if it is a record (without decoding the rest).
pub fn record_bytes(data: &Bytes) -> Option<Bytes> {
    match *data.first()? {
        KIND_RECORD => Some(data.slice(1..)),
        KIND_BATCH_HEAD if data.len() >= BATCH_HEAD_BYTES => Some(data.slice(BATCH_HEAD_BYTES..)),
        _ => None,
    }
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"))
}

fn take_u64(data: &[u8], at: &mut usize) -> Result<u64, Malformed> {
    if data.len() < *at + 8 {
        return Err(Malformed("short integer"));
    }
    let v = u64_at(data, *at);
    *at += 8;
    Ok(v)
}

fn take_str(data: &[u8], at: &mut usize) -> Result<String, Malformed> {
    if data.len() < *at + 2 {
        return Err(Malformed("short string length"));
    }
    let len = u16::from_le_bytes([data[*at], data[*at + 1]]) as usize;
    *at += 2;
    if data.len() < *at + len {
        return Err(Malformed("short string"));
    }
    let s = std::str::from_utf8(&data[*at..*at + len]).map_err(|_| Malformed("not UTF-8"))?;
    *at += len;
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_round_trips_with_its_head_first() {
        let records =
            vec![Bytes::from_static(b"a"), Bytes::from_static(b""), Bytes::from_static(b"ccc")];
        let p = Some(ProducerSeq { id: 7, sequence: 9 });
        let enc = encode_batch(&records, p);
        assert_eq!(
            decode(&enc[0]),
            Ok(Payload::BatchHead { producer: p, count: 3, data: Bytes::from_static(b"a") })
        );
        assert_eq!(decode(&enc[1]), Ok(Payload::Record(Bytes::new())));
        assert_eq!(decode(&enc[2]), Ok(Payload::Record(Bytes::from_static(b"ccc"))));
        for (e, r) in enc.iter().zip(&records) {
            assert_eq!(record_bytes(e).as_ref(), Some(r));
        }
    }

    #[test]
    fn a_lone_record_without_producer_is_plain() {
        let enc = encode_batch(&[Bytes::from_static(b"x")], None);
        assert_eq!(decode(&enc[0]), Ok(Payload::Record(Bytes::from_static(b"x"))));
    }

    #[test]
    fn internal_entries_round_trip_and_are_not_records() {
        let a = Addresses {
            id: NodeId(4),
            peer: "127.0.0.1:9".parse().expect("addr"),
            api: "h:1".into(),
        };
        let enc = encode_address(&a);
        assert_eq!(decode(&enc), Ok(Payload::Address(a)));
        assert_eq!(record_bytes(&enc), None);
        let t = encode_trim(LogIndex(42));
        assert_eq!(decode(&t), Ok(Payload::Trim { before: LogIndex(42) }));
        assert_eq!(record_bytes(&t), None);
    }

    #[test]
    fn malformed_payloads_are_errors_never_panics() {
        for bad in [&b""[..], &[1, 2, 3], &[2, 1], &[3, 0, 0], &[9], &[1; 21]] {
            assert!(decode(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
        let mut zero = encode_batch(&[Bytes::new(), Bytes::new()], None)[0].to_vec();
        zero[17..21].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(decode(&Bytes::from(zero)), Err(Malformed("batch of zero records")));
    }
}
