//! How a client reaches the cluster: endpoints, TLS, timeouts and the retry budget.

use std::time::Duration;

use crate::error::ClientError;

/// The most endpoints a client tracks: the configured ones plus leaders it learned of.
pub(crate) const ENDPOINTS_MAX: usize = 64;

/// The largest [`AppenderConfig::window`].
pub const APPENDER_WINDOW_MAX: u32 = 4096;

/// How a [`Client`](crate::Client) reaches the cluster.
///
/// Every endpoint of one client uses the same scheme: all `https://` (then `tls` is required) or
/// all `http://` (plaintext; then `tls` must be `None`).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The nodes' client API URLs, such as `"https://127.0.0.1:7001"`. At least one; any node
    /// will do, the client finds the leader.
    pub endpoints: Vec<String>,
    /// TLS for `https://` endpoints.
    pub tls: Option<ClientTls>,
    /// The longest a unary call (or a pipelined append without any answer) may take before
    /// the client gives up on that attempt. An append whose attempt timed out has an unknown
    /// outcome and is retried with the same producer sequence.
    pub request_timeout: Duration,
    /// The longest a TCP (and TLS) connection may take to open.
    pub connect_timeout: Duration,
    /// The first pause between retries; it doubles after each failed attempt.
    pub retry_backoff_min: Duration,
    /// The longest pause between retries.
    pub retry_backoff_max: Duration,
    /// How many times a call is retried after its first attempt (redirects to the leader
    /// included) before the client reports the failure.
    pub retries_max: u32,
    /// How many times a call answered RESOURCE_EXHAUSTED is retried (with backoff) before
    /// [`ClientError::Overloaded`] is returned. These retries count toward `retries_max` too.
    pub overloaded_retries_max: u32,
    /// The interval of HTTP/2 keep-alive pings, which detect a dead connection under an idle
    /// follow stream. A node that misses a ping for this long is taken as gone.
    pub keepalive_interval: Duration,
    /// A call to the leader with no answer after this long makes the client ask the nodes who
    /// leads (again every quarter of this, at least 50 ms, until the answer comes); when another node
    /// leads and the silent one does not answer as leader of a later term, the attempt is
    /// abandoned (its outcome unknown, as after a timeout) and the call follows the new
    /// leader. A paused or cut-off leader then costs about an election, not `request_timeout`.
    /// Zero turns it off.
    pub leader_check_after: Duration,
}

impl ClientConfig {
    /// A configuration with these endpoints, plaintext, and the default timeouts:
    /// request 10 s, connect 3 s, backoff 20 ms doubling to 1 s, 10 retries (3 when
    /// overloaded), keep-alive every 10 s, leader check after 500 ms.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> ClientConfig {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            retry_backoff_min: Duration::from_millis(20),
            retry_backoff_max: Duration::from_secs(1),
            retries_max: 10,
            overloaded_retries_max: 3,
            keepalive_interval: Duration::from_secs(10),
            leader_check_after: Duration::from_millis(500),
        }
    }

    /// The same configuration with TLS.
    pub fn with_tls(mut self, tls: ClientTls) -> ClientConfig {
        self.tls = Some(tls);
        self
    }

    /// Rejects a configuration that cannot work, before any connection is tried.
    pub(crate) fn validate(&self) -> Result<(), ClientError> {
        let invalid = |reason: String| Err(ClientError::Config { reason });
        if self.endpoints.is_empty() {
            return invalid("no endpoints".into());
        }
        if self.endpoints.len() > ENDPOINTS_MAX {
            return invalid(format!("{} endpoints, at most {ENDPOINTS_MAX}", self.endpoints.len()));
        }
        for endpoint in &self.endpoints {
            match (endpoint_scheme(endpoint), &self.tls) {
                (Some(Scheme::Https), Some(_)) | (Some(Scheme::Http), None) => {}
                (Some(Scheme::Https), None) => {
                    return invalid(format!("{endpoint}: https:// needs a TLS configuration"));
                }
                (Some(Scheme::Http), Some(_)) => {
                    return invalid(format!(
                        "{endpoint}: http:// is plaintext but TLS is configured; use https://"
                    ));
                }
                (None, _) => {
                    return invalid(format!("{endpoint}: not an http:// or https:// URL"));
                }
            }
        }
        if let Some(tls) = &self.tls
            && tls.cert_pem.is_some() != tls.key_pem.is_some()
        {
            return invalid(
                "TLS: a client certificate needs its key, and a key its certificate".into(),
            );
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return invalid("request_timeout and connect_timeout must be above zero".into());
        }
        if self.retry_backoff_min > self.retry_backoff_max {
            return invalid("retry_backoff_min is above retry_backoff_max".into());
        }
        if self.keepalive_interval.is_zero() {
            return invalid("keepalive_interval must be above zero".into());
        }
        Ok(())
    }
}

/// TLS settings for `https://` endpoints (rustls with the ring provider).
#[derive(Clone)]
pub struct ClientTls {
    /// The PEM certificate(s) of the authority that signed the nodes' certificates. Only these
    /// are trusted; the system's roots are not used.
    pub ca_pem: Vec<u8>,
    /// The client's PEM certificate chain, for mutual TLS. Needs `key_pem`.
    pub cert_pem: Option<Vec<u8>>,
    /// The client's PEM private key, for mutual TLS. Needs `cert_pem`.
    pub key_pem: Option<Vec<u8>>,
    /// The name to expect in the nodes' certificates, when it is not the endpoint's host (for
    /// example when the endpoints are IP addresses and the certificates name a DNS name).
    pub domain: Option<String>,
}

impl ClientTls {
    /// Server authentication only, trusting this authority.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> ClientTls {
        ClientTls { ca_pem: ca_pem.into(), cert_pem: None, key_pem: None, domain: None }
    }

    /// The same settings, presenting this certificate and key (mutual TLS).
    pub fn with_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.cert_pem = Some(cert_pem.into());
        self.key_pem = Some(key_pem.into());
        self
    }

    /// The same settings, expecting this name in the nodes' certificates.
    pub fn with_domain(mut self, domain: impl Into<String>) -> ClientTls {
        self.domain = Some(domain.into());
        self
    }
}

impl std::fmt::Debug for ClientTls {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("cert_pem_bytes", &self.cert_pem.as_ref().map(Vec::len))
            .field("key_pem", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .field("domain", &self.domain)
            .finish()
    }
}

/// Settings of an [`Appender`](crate::Appender).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppenderConfig {
    /// How many appends may be in flight (sent, not yet answered) at once; `send` waits for a
    /// free place beyond that. 1 to [`APPENDER_WINDOW_MAX`]; default 64. The server also has a
    /// window (`Status.append_stream_window`) and stops reading beyond it.
    pub window: u32,
}

impl Default for AppenderConfig {
    fn default() -> AppenderConfig {
        AppenderConfig { window: 64 }
    }
}

impl AppenderConfig {
    pub(crate) fn validate(&self) -> Result<(), ClientError> {
        if self.window == 0 || self.window > APPENDER_WINDOW_MAX {
            return Err(ClientError::Config {
                reason: format!(
                    "appender window {}, must be 1 to {APPENDER_WINDOW_MAX}",
                    self.window
                ),
            });
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

pub(crate) fn endpoint_scheme(endpoint: &str) -> Option<Scheme> {
    if endpoint.starts_with("https://") {
        Some(Scheme::Https)
    } else if endpoint.starts_with("http://") {
        Some(Scheme::Http)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_https_without_tls_and_http_with_tls() {
        assert!(ClientConfig::new(["https://127.0.0.1:1"]).validate().is_err());
        let tls = ClientTls::new(b"ca".to_vec());
        assert!(
            ClientConfig::new(["http://127.0.0.1:1"]).with_tls(tls.clone()).validate().is_err()
        );
        assert!(ClientConfig::new(["https://127.0.0.1:1"]).with_tls(tls).validate().is_ok());
        assert!(ClientConfig::new(["http://127.0.0.1:1"]).validate().is_ok());
    }

    #[test]
    fn rejects_a_certificate_without_its_key() {
        let mut tls = ClientTls::new(b"ca".to_vec());
        tls.cert_pem = Some(b"cert".to_vec());
        assert!(ClientConfig::new(["https://127.0.0.1:1"]).with_tls(tls).validate().is_err());
    }

    #[test]
    fn rejects_no_endpoints_and_unknown_schemes() {
        assert!(ClientConfig::new(Vec::<String>::new()).validate().is_err());
        assert!(ClientConfig::new(["127.0.0.1:1"]).validate().is_err());
    }
}
