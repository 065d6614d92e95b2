//! A raw producer (`x`): appends over the generated gRPC client with its own producer id and
//! sequence, and retries an append whose outcome is unknown with the same sequence until it
//! gets a definite answer (across leader changes, kills and partitions), so that the server's
//! producer deduplication is what keeps each record in the log at most once.
//!
//! The [`raftwal_client::Client`] retries with the same sequence too, but gives up after its
//! retry budget and moves to the next sequence; this producer does not give up until the run
//! ends, which exercises retries long after the first attempt.

use std::sync::Arc;
use std::time::Duration;

use raftwal_client::proto::log_client::LogClient;
use raftwal_client::proto::{AppendRequest, Producer};
use raftwal_client::{ClientConfig, TRAILER_LEADER_ADDR};
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::history::{AppendOutcome, Recorder, record_bytes};

/// How long after the workload is told to stop a pending append keeps being retried.
const DRAIN: Duration = Duration::from_secs(30);

/// One lazy channel per endpoint, with the client configuration's TLS and timeouts.
pub fn channels(config: &ClientConfig) -> anyhow::Result<Vec<(String, Channel)>> {
    let mut out = Vec::new();
    for url in &config.endpoints {
        let mut endpoint = Endpoint::from_shared(url.clone())?
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout);
        if let Some(tls) = &config.tls {
            let mut t = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let (Some(cert), Some(key)) = (&tls.cert_pem, &tls.key_pem) {
                t = t.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &tls.domain {
                t = t.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(t)?;
        }
        out.push((url.clone(), endpoint.connect_lazy()));
    }
    Ok(out)
}

/// Runs the raw producer until `stop`, then finishes its pending append (for up to 30 s).
pub async fn raw_producer(
    endpoints: Vec<(String, Channel)>,
    producer_id: u64,
    record_size: usize,
    pause: Duration,
    rec: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) {
    let mut current = 0usize;
    let mut sequence = 0u64;
    while !*stop.borrow() {
        sequence += 1;
        let id = format!("x-{sequence}");
        let index = rec.invoke_append("x", vec![id.clone()], None);
        let request = AppendRequest {
            records: vec![record_bytes(&id, record_size)],
            expected_next_offset: None,
            producer: Some(Producer { id: producer_id, sequence }),
            request_id: 0,
        };
        let mut drain_deadline = None;
        let outcome = loop {
            if *stop.borrow() {
                let deadline =
                    *drain_deadline.get_or_insert_with(|| tokio::time::Instant::now() + DRAIN);
                if tokio::time::Instant::now() >= deadline {
                    break AppendOutcome::Unknown { error: "run ended while retrying".into() };
                }
            }
            let (_, channel) = &endpoints[current];
            let answer = LogClient::new(channel.clone()).append(request.clone()).await;
            match answer {
                Ok(response) => {
                    let r = response.into_inner();
                    break if r.duplicate && r.first_offset == 0 {
                        AppendOutcome::Unknown {
                            error: "the server no longer knows this duplicate's offsets".into(),
                        }
                    } else {
                        AppendOutcome::Acked {
                            first: r.first_offset,
                            last: r.last_offset,
                            duplicate: r.duplicate,
                        }
                    };
                }
                Err(status) => match status.code() {
                    Code::InvalidArgument | Code::OutOfRange => {
                        break AppendOutcome::Failed { error: status.to_string() };
                    }
                    // Out of order or stale: for a retry of this producer's latest sequence
                    // neither should happen; its outcome is not known.
                    Code::FailedPrecondition => {
                        break AppendOutcome::Unknown {
                            error: format!("refused on retry: {}", status.message()),
                        };
                    }
                    _ => {
                        // Follow a named leader at once; otherwise the next node, after a pause.
                        let leader = status
                            .metadata()
                            .get(TRAILER_LEADER_ADDR)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|addr| endpoints.iter().position(|(u, _)| u.ends_with(addr)));
                        match leader {
                            Some(i) if i != current => current = i,
                            _ => {
                                current = (current + 1) % endpoints.len();
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                },
            }
        };
        rec.complete_append(index, outcome);
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
}
