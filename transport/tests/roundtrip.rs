//! Every message kind, with arbitrary field values, survives encode then decode unchanged, and
//! entry payloads come back as slices of the received frame.

use bytes::Bytes;
use proptest::prelude::*;
use raftwal_consensus::{
    Entry, EntryKind, GroupId, LogIndex, LogStart, Membership, Message, MessageBody, NodeId,
    RejectHint, Term,
};
use raftwal_transport::{FrameLimits, decode, encode};

fn index() -> impl Strategy<Value = LogIndex> {
    any::<u64>().prop_map(LogIndex)
}

fn term() -> impl Strategy<Value = Term> {
    any::<u64>().prop_map(Term)
}

fn entry() -> impl Strategy<Value = Entry> {
    (term(), index(), 0u8..3, prop::collection::vec(any::<u8>(), 0..300)).prop_map(
        |(term, index, kind, data)| Entry {
            term,
            index,
            kind: EntryKind::from_u8(kind).expect("0..3 are kinds"),
            data: Bytes::from(data),
        },
    )
}

fn ids() -> impl Strategy<Value = std::collections::BTreeSet<NodeId>> {
    prop::collection::btree_set(any::<u64>().prop_map(NodeId), 0..6)
}

fn body() -> impl Strategy<Value = MessageBody> {
    prop_oneof![
        (index(), term())
            .prop_map(|(last_index, last_term)| MessageBody::PreVote { last_index, last_term }),
        any::<bool>().prop_map(|reject| MessageBody::PreVoteResp { reject }),
        (index(), term(), any::<bool>()).prop_map(|(last_index, last_term, transfer)| {
            MessageBody::Vote { last_index, last_term, transfer }
        }),
        any::<bool>().prop_map(|reject| MessageBody::VoteResp { reject }),
        (index(), term(), prop::collection::vec(entry(), 0..8), index()).prop_map(
            |(prev_index, prev_term, entries, commit)| MessageBody::App {
                prev_index,
                prev_term,
                entries,
                commit
            }
        ),
        (index(), prop::option::of((index(), term()))).prop_map(|(index, hint)| {
            MessageBody::AppResp {
                index,
                reject: hint.map(|(index, term)| RejectHint { index, term }),
            }
        }),
        (index(), prop::option::of(any::<u64>()))
            .prop_map(|(commit, read)| MessageBody::Heartbeat { commit, read }),
        prop::option::of(any::<u64>()).prop_map(|read| MessageBody::HeartbeatResp { read }),
        (index(), term(), ids(), ids(), ids(), ids(), any::<bool>(), index()).prop_map(
            |(
                first_index,
                prev_term,
                voters,
                voters_outgoing,
                learners,
                learners_next,
                auto_leave,
                commit,
            )| {
                MessageBody::InstallLog {
                    start: LogStart {
                        first_index,
                        prev_term,
                        membership: Membership {
                            voters,
                            voters_outgoing,
                            learners,
                            learners_next,
                            auto_leave,
                        },
                    },
                    commit,
                }
            }
        ),
        Just(MessageBody::TimeoutNow),
        any::<u64>().prop_map(|context| MessageBody::ReadIndex { context }),
        (any::<u64>(), index())
            .prop_map(|(context, index)| MessageBody::ReadIndexResp { context, index }),
        (index(), term(), index(), term()).prop_map(
            |(last_index, last_term, floor_index, floor_term)| MessageBody::RepairReq {
                last_index,
                last_term,
                floor_index,
                floor_term
            }
        ),
        (index(), term()).prop_map(|(index, term)| MessageBody::AckedThrough { index, term }),
        (index(), term(), ids(), ids()).prop_map(|(first_index, prev_term, voters, learners)| {
            MessageBody::RepairStart {
                start: LogStart {
                    first_index,
                    prev_term,
                    membership: Membership { voters, learners, ..Membership::default() },
                },
            }
        }),
        (index(), term(), prop::collection::vec(entry(), 0..8)).prop_map(
            |(prev_index, prev_term, entries)| MessageBody::RepairResp {
                prev_index,
                prev_term,
                entries
            }
        ),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (any::<u64>(), any::<u64>(), any::<u64>(), term(), body()).prop_map(
        |(group, from, to, term, body)| Message {
            group: GroupId(group),
            from: NodeId(from),
            to: NodeId(to),
            term,
            body,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(msg in message()) {
        let frame = Bytes::from(encode(&msg).to_vec());
        let decoded = decode(frame.clone(), &FrameLimits::default()).expect("decodes");
        if let MessageBody::App { entries, .. } = &decoded.body {
            for e in entries.iter().filter(|e| !e.data.is_empty()) {
                let inside = frame.as_ptr_range().contains(&e.data.as_ptr());
                prop_assert!(inside, "payloads are slices of the frame, not copies");
            }
        }
        prop_assert_eq!(decoded, msg);
    }
}
