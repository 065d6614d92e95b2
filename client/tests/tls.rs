//! Mutual TLS against a fake node with real certificates.

mod common;

use common::{FakeLog, FakeNode, TestPki, config, serve_with};
use raftwal_client::{Client, ClientError, ClientTls, Offset};

#[tokio::test]
async fn appends_and_reads_over_mutual_tls() {
    let pki = TestPki::new();
    let log = FakeLog::new();
    let leader = serve_with(FakeNode::leader("leader", &log), Some(pki.server_tls())).await;
    let tls = ClientTls::new(pki.ca_pem.clone())
        .with_identity(pki.client_cert_pem.clone(), pki.client_key_pem.clone())
        .with_domain("localhost");
    let client = Client::connect(config(&[&leader.url]).with_tls(tls)).await.expect("connect");

    let appended = client.append(["secret"]).await.expect("append over TLS");
    let batch = client.read(appended.first_offset, 0, 0).await.expect("read over TLS");
    assert_eq!(batch.records.len(), 1);
    assert_eq!(batch.records[0].offset, Offset(1));
    assert_eq!(&batch.records[0].data[..], b"secret");
}

#[tokio::test]
async fn a_client_without_a_certificate_or_trusting_another_authority_is_refused() {
    let pki = TestPki::new();
    let log = FakeLog::new();
    let leader = serve_with(FakeNode::leader("leader", &log), Some(pki.server_tls())).await;
    let mut base = config(&[&leader.url]);
    base.retries_max = 1;

    // No client certificate: the server refuses the handshake. Under TLS 1.3 the client
    // learns it only after it sent the request, so the outcome is reported as unknown.
    let anonymous = ClientTls::new(pki.ca_pem.clone()).with_domain("localhost");
    let client = Client::connect(base.clone().with_tls(anonymous)).await.expect("connect");
    let error = client.append(["x"]).await.expect_err("no client certificate");
    assert!(
        matches!(error, ClientError::Unavailable { .. } | ClientError::UnknownOutcome { .. }),
        "{error:?}"
    );

    // Trusting another authority: the client refuses the server's certificate before sending.
    let stranger = TestPki::new();
    let distrustful = ClientTls::new(stranger.ca_pem.clone())
        .with_identity(pki.client_cert_pem.clone(), pki.client_key_pem.clone())
        .with_domain("localhost");
    let client = Client::connect(base.with_tls(distrustful)).await.expect("connect");
    match client.append(["x"]).await {
        Err(ClientError::Unavailable { attempts, .. }) => assert_eq!(attempts, 2),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(common::lock(&log).seen.is_empty(), "nothing reached the server");
}
