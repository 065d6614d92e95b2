//! The client's one error type, and how a gRPC status becomes a retry decision or an error.

use std::error::Error as _;

use tonic::{Code, Status};

use crate::proto;
use crate::types::Offset;

/// Trailer naming the leader's client API address ("host:port"), on UNAVAILABLE.
pub const TRAILER_LEADER_ADDR: &str = "raftwal-leader-addr";
/// Trailer naming the leader's node id, on UNAVAILABLE.
pub const TRAILER_LEADER_ID: &str = "raftwal-leader-id";
/// Trailer carrying the log's actual next offset, on FAILED_PRECONDITION.
pub const TRAILER_NEXT_OFFSET: &str = "raftwal-next-offset";
/// Trailer carrying the log's first offset, on OUT_OF_RANGE.
pub const TRAILER_FIRST_OFFSET: &str = "raftwal-first-offset";

/// Trailer carrying a stream's version, on FAILED_PRECONDITION (an expected version missed).
pub const TRAILER_STREAM_VERSION: &str = "raftwal-stream-version";
/// Trailer carrying the epoch that fenced a stream producer, on FAILED_PRECONDITION.
pub const TRAILER_PRODUCER_EPOCH: &str = "raftwal-producer-epoch";
/// Trailer carrying a closed stream's final next offset, on FAILED_PRECONDITION.
pub const TRAILER_STREAM_CLOSED: &str = "raftwal-stream-closed";
/// Trailer carrying the producer sequence a stream expected, on FAILED_PRECONDITION.
pub const TRAILER_PRODUCER_EXPECTED_SEQ: &str = "raftwal-producer-expected-seq";

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// `expected_next_offset` was not the log's next offset. Nothing was appended.
    #[error("offset mismatch: the log's next offset is {next_offset}")]
    OffsetMismatch {
        /// The log's actual next offset.
        next_offset: Offset,
    },
    /// The leader stayed over one of its limits (RESOURCE_EXHAUSTED) through the client's
    /// retries. Nothing was appended; retry later.
    #[error("the cluster is overloaded after {attempts} attempts: {message}")]
    Overloaded {
        /// How many attempts the call made.
        attempts: u32,
        /// The server's last message.
        message: String,
    },
    /// A record or the request is over a size limit (OUT_OF_RANGE from the gRPC message size
    /// limit on either side). Nothing was appended.
    #[error("too large: {message}")]
    TooLarge {
        /// What the limit said.
        message: String,
    },
    /// The server refused the request as malformed (INVALID_ARGUMENT: a record over the
    /// server's size limit, an empty append, a bad range), or the client refused it before
    /// sending. Nothing was appended.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// The reason.
        message: String,
    },
    /// The offset asked for is below the log's first offset: it was trimmed.
    #[error("offsets below {first_offset} were trimmed")]
    Trimmed {
        /// The log's first offset.
        first_offset: Offset,
    },
    /// No node could serve the call within the retry budget, and no attempt may have taken
    /// effect (each failed before the request reached a server, or a server refused it).
    #[error("unavailable after {attempts} attempts; last: {last}")]
    Unavailable {
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The retry budget ran out and at least one attempt may have taken effect (its deadline
    /// expired or its connection broke after the request was sent). An append with this
    /// outcome may or may not be in the log; see the crate docs for where it can be.
    #[error(
        "unknown outcome after {attempts} attempts (the request may have taken effect); last: {last}"
    )]
    UnknownOutcome {
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The TLS settings could not be used (unreadable certificate or key).
    #[error("TLS configuration: {reason}")]
    Tls {
        /// What was wrong.
        reason: String,
    },
    /// The client configuration is invalid.
    #[error("configuration: {reason}")]
    Config {
        /// What was wrong.
        reason: String,
    },
    /// A server broke the protocol (for example a read answer going backwards).
    #[error("protocol violation by {endpoint}: {reason}")]
    Protocol {
        /// The endpoint that sent it.
        endpoint: String,
        /// What was wrong.
        reason: String,
    },
    /// No such stream (it never existed, expired, or was deleted).
    #[error("not found: {message}")]
    NotFound {
        /// The server's message.
        message: String,
    },
    /// A stream of that name exists with other settings.
    #[error("already exists: {message}")]
    AlreadyExists {
        /// The server's message.
        message: String,
    },
    /// A stream append's expected version was not the stream's. Nothing was appended.
    #[error("the stream's version is {version}, not the one expected")]
    StreamVersionMismatch {
        /// The stream's version (the records it holds).
        version: u64,
    },
    /// A newer epoch of this stream producer took over: this one is fenced. Nothing was
    /// appended.
    #[error("fenced: producer epoch {epoch} took over")]
    Fenced {
        /// The epoch that fenced this one.
        epoch: u64,
    },
    /// The stream is closed: nothing more may be appended.
    #[error("the stream is closed at offset {next_offset}")]
    StreamClosed {
        /// Its final next offset.
        next_offset: u64,
    },
    /// A stream producer's sequence skipped one. Nothing was appended.
    #[error("producer sequence gap: the stream expected {expected}")]
    SequenceGap {
        /// The sequence the stream expected.
        expected: u64,
    },
    /// The [`Appender`](crate::Appender) this append went through has stopped.
    #[error("the appender stopped")]
    Closed,
    /// Any other status from a server, returned as is and not retried.
    #[error("server error: {0}")]
    Other(Status),
}

/// What the retry loop does with a failed attempt.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// A node refused because it is not the leader; the leader's address when it named one.
    NotLeader { leader_addr: Option<String> },
    /// The request never left the client (connection or TLS handshake failed).
    Unreachable,
    /// The request may have been applied: a deadline, a cancellation, a broken connection.
    Ambiguous,
    /// The node is over a limit; retry after a pause.
    Overloaded,
    /// Not retried: the call fails with this error.
    Final(ClientError),
}

/// Classifies a failed call's status.
pub(crate) fn classify(status: Status) -> Verdict {
    let from_transport = status.source().is_some();
    match status.code() {
        Code::Unavailable if is_connect_error(&status) => Verdict::Unreachable,
        // UNAVAILABLE made by the client's transport (a keep-alive timeout, a closed
        // connection) may follow a request that was sent.
        Code::Unavailable if from_transport => Verdict::Ambiguous,
        Code::Unavailable => {
            Verdict::NotLeader { leader_addr: trailer_str(&status, TRAILER_LEADER_ADDR) }
        }
        Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => Verdict::Ambiguous,
        // UNKNOWN is the server's "the outcome is unknown" (it stopped, or its log restarted,
        // with the request in flight); from the transport it is a broken stream. Internal
        // from the transport is a broken connection; from a server it is final.
        Code::Unknown => Verdict::Ambiguous,
        Code::Internal if from_transport => Verdict::Ambiguous,
        Code::ResourceExhausted => Verdict::Overloaded,
        Code::FailedPrecondition => Verdict::Final(failed_precondition(status)),
        Code::InvalidArgument => {
            Verdict::Final(ClientError::InvalidArgument { message: status.message().to_owned() })
        }
        Code::NotFound => {
            Verdict::Final(ClientError::NotFound { message: status.message().to_owned() })
        }
        Code::AlreadyExists => {
            Verdict::Final(ClientError::AlreadyExists { message: status.message().to_owned() })
        }
        Code::OutOfRange => match trailer_u64(&status, TRAILER_FIRST_OFFSET) {
            Some(first) => Verdict::Final(ClientError::Trimmed { first_offset: Offset(first) }),
            None => Verdict::Final(ClientError::TooLarge { message: status.message().to_owned() }),
        },
        _ => Verdict::Final(ClientError::Other(status)),
    }
}

/// A FAILED_PRECONDITION by the trailer that names its cause.
fn failed_precondition(status: Status) -> ClientError {
    let of = |name| trailer_u64(&status, name);
    if let Some(next) = of(TRAILER_NEXT_OFFSET) {
        ClientError::OffsetMismatch { next_offset: Offset(next) }
    } else if let Some(version) = of(TRAILER_STREAM_VERSION) {
        ClientError::StreamVersionMismatch { version }
    } else if let Some(epoch) = of(TRAILER_PRODUCER_EPOCH) {
        ClientError::Fenced { epoch }
    } else if let Some(next_offset) = of(TRAILER_STREAM_CLOSED) {
        ClientError::StreamClosed { next_offset }
    } else if let Some(expected) = of(TRAILER_PRODUCER_EXPECTED_SEQ) {
        ClientError::SequenceGap { expected }
    } else {
        ClientError::Other(status)
    }
}

/// Classifies the per-request error of an AppendStream answer (the proto's `Error`).
pub(crate) fn classify_stream_error(error: &proto::Error) -> Verdict {
    let code = Code::from_i32(error.code);
    let message = error.message.clone();
    match code {
        Code::Unavailable => Verdict::NotLeader {
            leader_addr: Some(error.leader_addr.clone()).filter(|a| !a.is_empty()),
        },
        Code::DeadlineExceeded | Code::Cancelled | Code::Aborted | Code::Unknown => {
            Verdict::Ambiguous
        }
        Code::ResourceExhausted => Verdict::Overloaded,
        Code::FailedPrecondition => match error.next_offset {
            Some(next) => Verdict::Final(ClientError::OffsetMismatch { next_offset: Offset(next) }),
            None => Verdict::Final(ClientError::Other(Status::new(code, message))),
        },
        Code::InvalidArgument => Verdict::Final(ClientError::InvalidArgument { message }),
        Code::OutOfRange => Verdict::Final(ClientError::TooLarge { message }),
        _ => Verdict::Final(ClientError::Other(Status::new(code, message))),
    }
}

/// A one-line description of a status for `Unavailable`/`UnknownOutcome`, with the transport
/// cause when there is one (tonic's message alone often says only "transport error").
pub(crate) fn describe(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = status.source();
    // Bounded: a source chain is a handful of links; the bound guards a cyclic one.
    for _ in 0..8 {
        let Some(error) = source else { break };
        // tonic repeats "transport error" at two levels; say each cause once.
        let cause = error.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = error.source();
    }
    text
}

/// True when the status comes from failing to open a connection (TCP or TLS), so the request
/// never reached a server.
fn is_connect_error(status: &Status) -> bool {
    let mut source = status.source();
    for _ in 0..16 {
        let Some(error) = source else { return false };
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}

fn trailer_str(status: &Status, name: &str) -> Option<String> {
    let value = status.metadata().get(name)?.to_str().ok()?.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

fn trailer_u64(status: &Status, name: &str) -> Option<u64> {
    trailer_str(status, name)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_trailer(mut status: Status, name: &'static str, value: &str) -> Status {
        status.metadata_mut().insert(name, value.parse().expect("an ASCII value"));
        status
    }

    #[test]
    fn not_leader_carries_the_leaders_address_when_named() {
        let s = with_trailer(Status::unavailable("not leader"), TRAILER_LEADER_ADDR, "127.0.0.1:7");
        assert!(
            matches!(classify(s), Verdict::NotLeader { leader_addr: Some(a) } if a == "127.0.0.1:7")
        );
        let s = with_trailer(Status::unavailable("not leader"), TRAILER_LEADER_ADDR, "");
        assert!(matches!(classify(s), Verdict::NotLeader { leader_addr: None }));
    }

    #[test]
    fn offset_mismatch_and_trimmed_read_their_trailers() {
        let s = with_trailer(Status::failed_precondition("m"), TRAILER_NEXT_OFFSET, "42");
        assert!(matches!(
            classify(s),
            Verdict::Final(ClientError::OffsetMismatch { next_offset: Offset(42) })
        ));
        let s = with_trailer(Status::out_of_range("t"), TRAILER_FIRST_OFFSET, "7");
        assert!(matches!(
            classify(s),
            Verdict::Final(ClientError::Trimmed { first_offset: Offset(7) })
        ));
        let s = Status::out_of_range("decoded message length too large");
        assert!(matches!(classify(s), Verdict::Final(ClientError::TooLarge { .. })));
    }

    #[test]
    fn a_deadline_is_ambiguous_and_a_server_internal_error_is_final() {
        assert!(matches!(classify(Status::deadline_exceeded("d")), Verdict::Ambiguous));
        assert!(matches!(classify(Status::internal("fsync failed")), Verdict::Final(_)));
    }

    #[test]
    fn a_malformed_trailer_is_ignored() {
        let s = with_trailer(Status::failed_precondition("m"), TRAILER_NEXT_OFFSET, "x1");
        assert!(matches!(classify(s), Verdict::Final(ClientError::Other(_))));
    }
}
