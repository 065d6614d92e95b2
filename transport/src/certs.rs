//! Making the cluster's certificates: a CA, node certificates naming `node-{id}.raftwal`, and
//! client certificates. `raftwal certs init` and the tests use this; keys are ECDSA P-256.

use raftwal_consensus::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::tls::node_name;

pub use rcgen::Error as CertError;
use rcgen::date_time_ymd;

/// A certificate and its private key, PEM encoded.
#[derive(Clone, Debug)]
pub struct CertBundle {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// A cluster certificate authority that can issue certificates.
pub struct ClusterCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

/// When a certificate is valid, as (year, month, day) in UTC.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    /// Not valid before.
    pub not_before: (i32, u8, u8),
    /// Not valid after.
    pub not_after: (i32, u8, u8),
}

impl ClusterCa {
    /// A new CA whose certificate is valid from 2020 to 2100.
    pub fn generate(common_name: &str) -> Result<ClusterCa, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2100, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa { cert, key })
    }

    /// The CA certificate every node and client trusts.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for node `id`, usable as both TLS server and client, also naming
    /// `extra_names` (host names or IP addresses clients dial).
    pub fn issue_node(&self, id: NodeId, extra_names: &[String]) -> Result<CertBundle, CertError> {
        let mut names = vec![node_name(id)];
        names.extend_from_slice(extra_names);
        self.issue(&format!("raftwal node {id}"), names, None)
    }

    /// A node certificate with a chosen validity (tests of expired certificates).
    pub fn issue_node_valid(
        &self,
        id: NodeId,
        validity: Validity,
    ) -> Result<CertBundle, CertError> {
        self.issue(&format!("raftwal node {id}"), vec![node_name(id)], Some(validity))
    }

    /// A client certificate.
    pub fn issue_client(&self, name: &str) -> Result<CertBundle, CertError> {
        self.issue(name, Vec::new(), None)
    }

    fn issue(
        &self,
        common_name: &str,
        names: Vec<String>,
        validity: Option<Validity>,
    ) -> Result<CertBundle, CertError> {
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let validity =
            validity.unwrap_or(Validity { not_before: (2020, 1, 1), not_after: (2100, 1, 1) });
        let ymd = |(y, m, d): (i32, u8, u8)| date_time_ymd(y, m, d);
        params.not_before = ymd(validity.not_before);
        params.not_after = ymd(validity.not_after);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(CertBundle { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}
