//! Replays the fuzz corpus (transport/fuzz/corpus/frame_decode) and deterministic mutations of
//! every file through the frame decoder, so the normal test run covers what the fuzzer guards:
//! no input panics, and anything accepted survives its own encode/decode round trip.

mod support;

use std::path::PathBuf;

use bytes::Bytes;
use raftwal_consensus::{Entry, EntryKind, LogIndex, MessageBody, SplitMix64, Term};
use raftwal_transport::{FrameLimits, decode, encode};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame_decode")
}

fn seeds() -> Vec<Vec<u8>> {
    let entry = |i: u64, len: usize| Entry {
        term: Term(2),
        index: LogIndex(i),
        kind: EntryKind::Normal,
        data: Bytes::from(vec![i as u8; len]),
    };
    let bodies = vec![
        MessageBody::PreVote { last_index: LogIndex(5), last_term: Term(2) },
        MessageBody::Vote { last_index: LogIndex(5), last_term: Term(2), transfer: false },
        MessageBody::VoteResp { reject: true },
        MessageBody::App {
            prev_index: LogIndex(1),
            prev_term: Term(1),
            entries: vec![entry(2, 3), entry(3, 0), entry(4, 17)],
            commit: LogIndex(1),
        },
        MessageBody::AppResp { index: LogIndex(4), reject: None },
        MessageBody::Heartbeat { commit: LogIndex(4), read: Some(1) },
        MessageBody::InstallLog {
            start: raftwal_consensus::LogStart {
                first_index: LogIndex(10),
                prev_term: Term(1),
                membership: raftwal_consensus::Membership::new([
                    raftwal_consensus::NodeId(1),
                    raftwal_consensus::NodeId(2),
                ]),
            },
            commit: LogIndex(12),
        },
        MessageBody::ReadIndexResp { context: 9, index: LogIndex(3) },
        MessageBody::RepairReq {
            last_index: LogIndex(5),
            last_term: Term(2),
            floor_index: LogIndex(9),
            floor_term: Term(2),
        },
        MessageBody::RepairStart {
            start: raftwal_consensus::LogStart {
                first_index: LogIndex(4),
                prev_term: Term(1),
                membership: raftwal_consensus::Membership::new([raftwal_consensus::NodeId(1)]),
            },
        },
        MessageBody::AckedThrough { index: LogIndex(5), term: Term(2) },
        MessageBody::RepairResp {
            prev_index: LogIndex(1),
            prev_term: Term(1),
            entries: vec![entry(2, 3), entry(3, 9)],
        },
    ];
    bodies.into_iter().map(|b| encode(&support::msg(1, 2, b)).to_vec()).collect()
}

fn check(input: &[u8]) -> bool {
    match decode(Bytes::copy_from_slice(input), &FrameLimits::default()) {
        Ok(msg) => {
            // Not byte-identical: rkyv accepts any value in padding bytes. But what was accepted
            // must survive its own round trip unchanged.
            let again = decode(Bytes::from(encode(&msg).to_vec()), &FrameLimits::default());
            assert_eq!(again.as_ref(), Ok(&msg), "an accepted message round-trips");
            true
        }
        Err(_) => false,
    }
}

#[test]
fn corpus_and_its_mutations_never_panic_the_decoder() {
    if std::env::var_os("REWRITE_CORPUS").is_some() {
        std::fs::create_dir_all(corpus_dir()).expect("corpus dir");
        for (i, seed) in seeds().iter().enumerate() {
            std::fs::write(corpus_dir().join(format!("seed-{i:02}")), seed).expect("write");
        }
    }
    let mut files: Vec<Vec<u8>> = std::fs::read_dir(corpus_dir())
        .expect("the corpus is in the repository")
        .map(|e| std::fs::read(e.expect("entry").path()).expect("read"))
        .collect();
    assert!(files.len() >= 8, "corpus has {} files", files.len());
    files.sort();
    let mut rng = SplitMix64::new(7);
    let (mut accepted, mut refused) = (0u32, 0u32);
    for file in &files {
        assert!(check(file), "every corpus seed is a valid frame");
        for _ in 0..2000 {
            let mut input = file.clone();
            match rng.below(4) {
                0 => {
                    let i = rng.below(input.len() as u64) as usize;
                    input[i] ^= 1 << rng.below(8);
                }
                1 => input.truncate(rng.below(input.len() as u64) as usize),
                2 => {
                    // Rewrite one of the header's length fields.
                    let at = [0usize, 16, 20][rng.below(3) as usize];
                    let value = rng.next_u64() as u32;
                    input[at..at + 4].copy_from_slice(&value.to_le_bytes());
                }
                _ => {
                    let i = rng.below(input.len() as u64) as usize;
                    input[i] = rng.next_u64() as u8;
                }
            }
            if check(&input) { accepted += 1 } else { refused += 1 }
        }
    }
    println!("{} corpus files: {accepted} mutations accepted, {refused} refused", files.len());
    assert!(refused > accepted, "most mutations must be refused");
}
