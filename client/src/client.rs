//! [`Client`]: unary appends, reads, status and admin calls, each through the retry loop.

use std::sync::Arc;

use tokio::sync::Mutex;

use crate::appender::Appender;
use crate::call::{Effect, Shared};
use crate::config::{AppenderConfig, ClientConfig};
use crate::error::ClientError;
use crate::follow::Follow;
use crate::proto;
use crate::proto::admin_client::AdminClient;
use crate::router::Route;
use crate::types::{AppendOptions, Appended, Membership, NodeId, Offset, ReadBatch, Record};

/// A connection to a raftwal cluster. Cheap to clone; clones share the channels, the leader
/// guess and the producer identity.
///
/// See the crate docs for how a call flows.
#[derive(Clone, Debug)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
    producer: Arc<Mutex<Producer>>,
}

/// This client's producer identity for unary appends.
///
/// Invariant: `next_sequence` only grows, so no two appends of this client share a sequence.
#[derive(Debug)]
pub(crate) struct Producer {
    pub(crate) id: u64,
    pub(crate) next_sequence: u64,
}

impl Producer {
    pub(crate) fn new(id: u64) -> Producer {
        Producer { id, next_sequence: 1 }
    }

    /// The sequence for a new append (never for a retry: a retry reuses its append's).
    pub(crate) fn take_sequence(&mut self) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence = sequence.checked_add(1).expect("2^64 appends of one producer");
        sequence
    }
}

impl Client {
    /// Validates the configuration and prepares a lazy channel per endpoint; nothing connects
    /// until the first call, so a node that is down does not fail this. Picks a random producer
    /// id for this client's appends. Must run inside a Tokio runtime.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let shared = Arc::new(Shared::new(config)?);
        let producer = Producer::new(shared.random_u64());
        Ok(Client { shared, producer: Arc::new(Mutex::new(producer)) })
    }

    /// A client that shares this one's connections and leader tracking but appends as a
    /// producer of its own (its own id and sequences), so that many concurrent writers can
    /// share a few connections, each with one append in flight.
    pub fn new_producer(&self) -> Client {
        let producer = Producer::new(self.shared.random_u64());
        Client { shared: self.shared.clone(), producer: Arc::new(Mutex::new(producer)) }
    }

    /// Appends `records` as one batch on the leader; they get consecutive offsets and commit
    /// together or not at all. See [`Client::append_with`].
    pub async fn append<R: Into<Vec<u8>>>(
        &self,
        records: impl IntoIterator<Item = R>,
    ) -> Result<Appended, ClientError> {
        self.append_with(records, AppendOptions::default()).await
    }

    /// Appends `records` as one batch, once acknowledged by a quorum (fsynced).
    ///
    /// The append carries this client's producer id and a new sequence; every retry of it
    /// (after a redirect, a timeout or a broken connection) reuses that sequence, so it commits
    /// at most once: a retry of an append that had committed gets the original offsets back
    /// with `duplicate = true`.
    ///
    /// Appends of one client (and its clones) are sent one at a time, in call order: by the
    /// producer rule ([`crate::dedup`]) a producer's sequences apply in increasing order, so a
    /// later sequence overtaking an earlier one would get the earlier one refused as out of
    /// order. Use an
    /// [`Appender`] to keep many appends in flight. Dropping the returned future before it
    /// completes leaves the append's outcome unknown, like `UnknownOutcome`.
    ///
    /// Errors: [`ClientError::OffsetMismatch`] when `options.expected_next_offset` is not the
    /// next offset; [`ClientError::InvalidArgument`] for an empty or oversized batch;
    /// [`ClientError::Overloaded`]; [`ClientError::UnknownOutcome`] when the retries ran out
    /// after an attempt that may have committed; [`ClientError::Unavailable`] when none could.
    pub async fn append_with<R: Into<Vec<u8>>>(
        &self,
        records: impl IntoIterator<Item = R>,
        options: AppendOptions,
    ) -> Result<Appended, ClientError> {
        let records: Vec<Vec<u8>> = records.into_iter().map(Into::into).collect();
        if records.is_empty() {
            return Err(ClientError::InvalidArgument {
                message: "an append needs at least one record".into(),
            });
        }
        let mut producer = self.producer.lock().await;
        let request = proto::AppendRequest {
            records,
            expected_next_offset: options.expected_next_offset.map(Offset::get),
            producer: Some(proto::Producer { id: producer.id, sequence: producer.take_sequence() }),
            request_id: 0,
        };
        let shared = &self.shared;
        let response = shared
            .call(Route::Leader, Effect::Mutating, |channel| {
                let request = shared.request(request.clone());
                async move { crate::log_client(channel).append(request).await }
            })
            .await?;
        drop(producer);
        Appended::from_answer(response.value.get_ref(), response.attempts)
    }

    /// Reads committed records from `from_offset`: at most `records_max` records (0: the
    /// server's default, 1,000) and about `bytes_max` bytes (0: the server's default, 4 MiB;
    /// at least one record when any is available).
    ///
    /// Any node may serve it (followers serve what they have committed), starting with the
    /// one that served the last read, moving on when one fails. A follower may lag: the batch's
    /// `commit_offset` says how far the serving node was.
    ///
    /// Errors: [`ClientError::Trimmed`] when `from_offset` is below the log's first offset;
    /// [`ClientError::Protocol`] when a node answers with offsets below `from_offset` or not
    /// increasing; [`ClientError::Unavailable`] when no node answered.
    pub async fn read(
        &self,
        from_offset: Offset,
        records_max: u32,
        bytes_max: u32,
    ) -> Result<ReadBatch, ClientError> {
        self.read_inner(from_offset, records_max, bytes_max, false).await
    }

    /// Like [`Client::read`], but linearizable: the node first confirms with a quorum what is
    /// committed and applies that much, so the batch reflects every append acknowledged
    /// before this call (on any node, at the cost of a round trip to a quorum).
    pub async fn read_linearizable(
        &self,
        from_offset: Offset,
        records_max: u32,
        bytes_max: u32,
    ) -> Result<ReadBatch, ClientError> {
        self.read_inner(from_offset, records_max, bytes_max, true).await
    }

    async fn read_inner(
        &self,
        from_offset: Offset,
        records_max: u32,
        bytes_max: u32,
        linearizable: bool,
    ) -> Result<ReadBatch, ClientError> {
        let shared = &self.shared;
        let request = proto::ReadRequest {
            from_offset: from_offset.get(),
            max_records: records_max,
            max_bytes: bytes_max,
            linearizable,
        };
        let answer = shared
            .call(Route::Any, Effect::ReadOnly, |channel| {
                let request = shared.request(request);
                async move { crate::log_client(channel).read(request).await }
            })
            .await?;
        let endpoint = answer.endpoint;
        let response = answer.value.into_inner();
        let mut next = from_offset;
        let mut records = Vec::with_capacity(response.records.len());
        for record in response.records {
            if record.offset < next.get() {
                return Err(ClientError::Protocol {
                    endpoint,
                    reason: format!(
                        "read from {from_offset} returned offset {} after {next}",
                        record.offset
                    ),
                });
            }
            next = Offset(record.offset).next();
            records.push(Record::from_proto(record));
        }
        Ok(ReadBatch {
            records,
            next_offset: next.max(Offset(response.next_offset)),
            commit_offset: Offset(response.commit_offset),
        })
    }

    /// Follows the committed log from `from_offset`: the history, then live records as they
    /// commit, resuming on any node after a failure. See [`Follow`].
    pub fn follow(&self, from_offset: Offset) -> Follow {
        Follow::new(Arc::clone(&self.shared), from_offset)
    }

    /// Starts a pipelined appender with its own producer id and a background task (so it
    /// must be called inside a Tokio runtime). See [`Appender`].
    pub fn appender(&self, config: AppenderConfig) -> Result<Appender, ClientError> {
        Appender::start(Arc::clone(&self.shared), config)
    }

    /// The believed leader's view of the cluster (or, when it cannot be reached, the view of
    /// the next node that answers).
    pub async fn status(&self) -> Result<proto::StatusResponse, ClientError> {
        let shared = &self.shared;
        let response = shared
            .call(Route::Leader, Effect::ReadOnly, |channel| {
                let request = shared.request(proto::StatusRequest {});
                async move { crate::log_client(channel).status(request).await }
            })
            .await?;
        Ok(response.value.into_inner())
    }

    /// Adds a node as a learner (it replicates but does not vote). `peer_addr` is its peer
    /// (QUIC) address, `api_addr` its client API address, both "host:port".
    pub async fn add_learner(
        &self,
        node_id: NodeId,
        peer_addr: &str,
        api_addr: &str,
    ) -> Result<Membership, ClientError> {
        let request = proto::AddLearnerRequest {
            node_id: node_id.get(),
            peer_addr: peer_addr.to_owned(),
            api_addr: api_addr.to_owned(),
        };
        let shared = &self.shared;
        let response = shared
            .call(Route::Leader, Effect::Mutating, |channel| {
                let request = shared.request(request.clone());
                async move { AdminClient::new(channel).add_learner(request).await }
            })
            .await?;
        Ok(Membership::from_proto(response.value.into_inner()))
    }

    /// Makes a learner a voter.
    pub async fn promote(&self, node_id: NodeId) -> Result<Membership, ClientError> {
        let shared = &self.shared;
        let response = shared
            .call(Route::Leader, Effect::Mutating, |channel| {
                let request = shared.request(proto::PromoteRequest { node_id: node_id.get() });
                async move { AdminClient::new(channel).promote(request).await }
            })
            .await?;
        Ok(Membership::from_proto(response.value.into_inner()))
    }

    /// Removes a node, voter or learner.
    pub async fn remove(&self, node_id: NodeId) -> Result<Membership, ClientError> {
        let shared = &self.shared;
        let response = shared
            .call(Route::Leader, Effect::Mutating, |channel| {
                let request = shared.request(proto::RemoveRequest { node_id: node_id.get() });
                async move { AdminClient::new(channel).remove(request).await }
            })
            .await?;
        Ok(Membership::from_proto(response.value.into_inner()))
    }

    /// Hands leadership to another voter; returns the leader the server reports afterwards.
    /// The client learns the new leader's address from the next "not leader" answer.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<NodeId, ClientError> {
        let shared = &self.shared;
        let response = shared
            .call(Route::Leader, Effect::Mutating, |channel| {
                let request = shared.request(proto::TransferLeaderRequest { to_node_id: to.get() });
                async move { AdminClient::new(channel).transfer_leader(request).await }
            })
            .await?;
        Ok(NodeId(response.value.into_inner().leader_id))
    }

    /// Discards the log below `before_offset` on every node; returns the log's new first
    /// offset.
    pub async fn trim(&self, before_offset: Offset) -> Result<Offset, ClientError> {
        let shared = &self.shared;
        let response = shared
            .call(Route::Leader, Effect::Mutating, |channel| {
                let request =
                    shared.request(proto::TrimRequest { before_offset: before_offset.get() });
                async move { AdminClient::new(channel).trim(request).await }
            })
            .await?;
        Ok(Offset(response.value.into_inner().first_offset))
    }

    /// The URL of the endpoint this client believes leads (for diagnostics).
    pub fn leader_endpoint(&self) -> String {
        self.shared.router.leader_url()
    }
}
