//! Certificates at the node level: clients over TLS (with and without client certificates) and
//! a peer whose certificate comes from another CA.

mod support;

use std::time::Duration;

use raftwal_client::{Client, ClientConfig, ClientTls};
use raftwal_consensus::LogIndex;
use raftwal_transport::certs::ClusterCa;
use support::Cluster;

fn tls_endpoint(c: &Cluster, id: u64) -> String {
    format!("https://{}", c.configs[&id].api_listen)
}

async fn append_via(config: ClientConfig) -> Result<(), String> {
    let mut config = config;
    config.retries_max = 2;
    config.request_timeout = Duration::from_secs(5);
    let client = Client::connect(config).await.map_err(|e| e.to_string())?;
    client.append([b"x".to_vec()]).await.map(|_| ()).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_need_the_cluster_ca_and_when_required_a_certificate_from_it() {
    let c = Cluster::start_with(3, 0, |_, cfg| {
        cfg.client_plaintext = false;
        cfg.client_auth = true;
    })
    .await;
    let leader = c.leader().await;
    let certs = c.certs_dir();
    let ca_pem = std::fs::read(certs.join("ca.pem")).expect("ca");
    let endpoints = vec![tls_endpoint(&c, leader)];

    // Positive control: the client certificate the cluster CA issued.
    let cert = std::fs::read(certs.join("client.pem")).expect("cert");
    let key = std::fs::read(certs.join("client.key")).expect("key");
    let good = ClientConfig::new(endpoints.clone())
        .with_tls(ClientTls::new(ca_pem.clone()).with_identity(cert, key));
    append_via(good).await.expect("a client with a certificate from the cluster CA appends");

    // No client certificate.
    let bare = ClientConfig::new(endpoints.clone()).with_tls(ClientTls::new(ca_pem.clone()));
    assert!(append_via(bare).await.is_err(), "a client without a certificate is refused");

    // A client certificate from another CA.
    let other = ClusterCa::generate("another CA").expect("ca");
    let stranger = other.issue_client("stranger").expect("cert");
    let foreign = ClientConfig::new(endpoints.clone()).with_tls(
        ClientTls::new(ca_pem.clone()).with_identity(stranger.cert_pem, stranger.key_pem),
    );
    assert!(append_via(foreign).await.is_err(), "a client certificate from another CA is refused");

    // A client that trusts another CA refuses the node.
    let wrong_trust =
        ClientConfig::new(endpoints.clone()).with_tls(ClientTls::new(other.cert_pem()));
    assert!(append_via(wrong_trust).await.is_err(), "the node's certificate is not trusted");

    // Plaintext to a TLS port.
    let plain = ClientConfig::new(vec![format!("http://{}", c.configs[&leader].api_listen)]);
    assert!(append_via(plain).await.is_err(), "plaintext is refused");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_with_a_certificate_from_another_ca_never_joins_the_group() {
    let c = Cluster::start_with(3, 0, |dir, cfg| {
        if cfg.id == 3 {
            let other = ClusterCa::generate("intruder CA").expect("ca");
            let b = other.issue_node(raftwal_consensus::NodeId(3), &[]).expect("cert");
            std::fs::write(dir.join("intruder.pem"), b.cert_pem).expect("write");
            std::fs::write(dir.join("intruder.key"), b.key_pem).expect("write");
            std::fs::write(dir.join("intruder-ca.pem"), other.cert_pem()).expect("write");
            cfg.tls_cert = dir.join("intruder.pem");
            cfg.tls_key = dir.join("intruder.key");
            cfg.tls_ca = dir.join("intruder-ca.pem");
        }
    })
    .await;
    // Nodes 1 and 2 are a quorum of three: they elect a leader and commit without node 3.
    let client =
        Client::connect(ClientConfig::new([c.endpoint(1), c.endpoint(2)])).await.expect("connect");
    let mut last = 0;
    for i in 0..20 {
        last = client
            .append([format!("r{i}")])
            .await
            .expect("the two honest nodes commit")
            .last_offset
            .0;
    }
    c.wait_applied(1, last).await;
    c.wait_applied(2, last).await;
    // Node 3 has received nothing: not one entry beyond its own bootstrap, and no leader.
    let intruder = &c.nodes[&3].shared;
    assert!(*intruder.readable.borrow() <= LogIndex(3));
    assert_eq!(intruder.status.read().leader, None);
    assert_eq!(intruder.wal.last_index(), LogIndex(3), "only its own bootstrap entries");
    c.shutdown().await;
}
