//! Mutual TLS between peers: every node holds a certificate from the cluster CA whose DNS
//! subject alternative name is `node-{id}.raftwal`. A dialer checks that name for the node it
//! dials (rustls does, as for any server name); an acceptor learns who dialed from the name in
//! the client certificate and refuses messages that claim another sender. TLS 1.3 only, one
//! crypto provider (ring), no 0-RTT.

use std::sync::Arc;

use raftwal_consensus::NodeId;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The ALPN protocol peers speak; a connection that negotiates anything else is refused.
pub const ALPN: &[u8] = b"raftwal-peer/1";

/// The DNS name a node's certificate carries.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.raftwal")
}

/// Why a TLS identity could not be loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The PEM input has no certificate or key where one is needed, or cannot be parsed.
    #[error("bad PEM in {what}: {reason}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration (a key that does not match its certificate, ...).
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

/// What a node proves itself with and whom it trusts.
#[derive(Debug)]
pub struct Identity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity { ca: self.ca.clone(), chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl Identity {
    /// Loads the cluster CA certificate(s), this node's certificate chain and its private key.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Identity, TlsError> {
        let certs = |what, pem: &str| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Pem { what, reason: e.to_string() })?;
            if certs.is_empty() {
                return Err(TlsError::Pem { what, reason: "no certificate".into() });
            }
            Ok(certs)
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem { what: "private key", reason: e.to_string() })?;
        Ok(Identity {
            ca: certs("CA certificate", ca_pem)?,
            chain: certs("certificate", cert_pem)?,
            key,
        })
    }

    /// The key QUIC derives stateless reset tokens from: the same across restarts of this
    /// node (it comes from the node's private key), so that a restarted node answers a packet
    /// of a connection its previous process had with a reset the peer accepts, and the peer
    /// drops that connection at once instead of waiting for its idle timeout.
    pub(crate) fn stateless_reset_key(&self) -> ring::hmac::Key {
        let secret = self.derive(b"stateless reset key");
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret)
    }

    /// The key of the connection ids this node issues, also the same across restarts: a QUIC
    /// endpoint answers a packet with a reset only if the packet's connection id carries its
    /// key's mark, so a restarted node must recognise the ids its previous process issued.
    pub(crate) fn connection_id_key(&self) -> u64 {
        let secret = self.derive(b"connection id key");
        u64::from_le_bytes(secret[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
    }

    /// A secret for `purpose`, derived from the private key.
    fn derive(&self, purpose: &[u8]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"raftwal-transport v1\0");
        ctx.update(purpose);
        ctx.update(b"\0");
        ctx.update(self.key.secret_der());
        ctx.finish().as_ref().try_into().expect("a SHA-256 digest has 32 bytes")
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in &self.ca {
            roots.add(ca.clone()).map_err(|e| TlsError::Config(e.to_string()))?;
        }
        Ok(Arc::new(roots))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// The QUIC server side: requires a client certificate from the cluster CA.
pub(crate) fn server_config(
    identity: &Identity,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(identity.roots()?, provider())
        .build()
        .map_err(config_err)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(config_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT data could be replayed; Raft messages must not be.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(config_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// The QUIC client side: presents our certificate, trusts only the cluster CA.
pub(crate) fn client_config(
    identity: &Identity,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_err)?
        .with_root_certificates(identity.roots()?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(config_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(config_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}

/// Whether `cert` (already verified against the CA by the handshake) names node `id`.
pub(crate) fn cert_names_node(cert: &CertificateDer<'_>, id: NodeId) -> bool {
    let Ok(name) = ServerName::try_from(node_name(id)) else { return false };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
}
