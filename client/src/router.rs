//! The endpoints a client knows, a lazy gRPC channel to each, and which one it believes leads.
//!
//! Invariant: `leader < slots.len()` and `reader < slots.len()`, and `slots` is never empty
//! (the configuration has at least one endpoint and slots are only added).

use std::sync::{Mutex, MutexGuard};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{ClientConfig, ENDPOINTS_MAX, Scheme, endpoint_scheme};
use crate::error::ClientError;

/// Which endpoint a call starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// The believed leader: appends, admin calls, status.
    Leader,
    /// Any node: reads and follows. Starts from the last node that served one.
    Any,
}

/// One endpoint picked for an attempt.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) index: usize,
    pub(crate) url: String,
    pub(crate) channel: Channel,
}

#[derive(Debug)]
pub(crate) struct Router {
    scheme: Scheme,
    template: EndpointTemplate,
    state: Mutex<RouterState>,
}

#[derive(Debug)]
struct RouterState {
    slots: Vec<Slot>,
    leader: usize,
    reader: usize,
}

#[derive(Debug)]
struct Slot {
    url: String,
    /// "host:port", to recognise a leader address that names a known endpoint.
    authority: String,
    channel: Channel,
}

/// What every channel shares: timeouts, keep-alive and TLS.
#[derive(Debug)]
struct EndpointTemplate {
    config: ClientConfig,
    tls: Option<ClientTlsConfig>,
}

impl Router {
    /// Builds a lazy channel per configured endpoint; nothing connects yet. Must run inside a
    /// Tokio runtime (a channel spawns its worker task).
    pub(crate) fn new(config: &ClientConfig) -> Result<Router, ClientError> {
        config.validate()?;
        let scheme = config
            .endpoints
            .first()
            .and_then(|e| endpoint_scheme(e))
            .ok_or_else(|| ClientError::Config { reason: "no endpoints".into() })?;
        let tls = config.tls.as_ref().map(tls_config);
        let template = EndpointTemplate { config: config.clone(), tls };
        let mut slots = Vec::with_capacity(config.endpoints.len());
        // `validate` tied every endpoint's scheme to the presence of TLS, so all share one.
        for url in &config.endpoints {
            slots.push(template.slot(url.clone())?);
        }
        Ok(Router {
            scheme,
            template,
            state: Mutex::new(RouterState { slots, leader: 0, reader: 0 }),
        })
    }

    /// Where a call on this route starts.
    pub(crate) fn target(&self, route: Route) -> Target {
        let state = self.lock();
        let index = match route {
            Route::Leader => state.leader,
            Route::Any => state.reader,
        };
        state.target(index)
    }

    /// Records that `index` answered a call on this route.
    pub(crate) fn confirm(&self, route: Route, index: usize) {
        let mut state = self.lock();
        assert!(index < state.slots.len(), "endpoint {index} out of {}", state.slots.len());
        match route {
            Route::Leader => state.leader = index,
            Route::Any => state.reader = index,
        }
    }

    /// Moves this route past `failed` to the next endpoint and returns it. When another call
    /// already moved the route elsewhere, keeps that choice.
    pub(crate) fn advance(&self, route: Route, failed: usize) -> Target {
        let mut state = self.lock();
        let count = state.slots.len();
        let current = match route {
            Route::Leader => &mut state.leader,
            Route::Any => &mut state.reader,
        };
        if *current == failed {
            *current = (failed + 1) % count;
        }
        let index = *current;
        state.target(index)
    }

    /// Points this route at the node a "not leader" answer named (a client API address such
    /// as "127.0.0.1:7001"), adding it as an endpoint with the configured scheme when it is
    /// new. `None` when the address is unusable or the endpoint table is full.
    pub(crate) fn redirect(&self, route: Route, leader_addr: &str) -> Option<Target> {
        let authority = parse_addr(leader_addr)?;
        let mut state = self.lock();
        let index = match state.slots.iter().position(|s| s.authority == authority) {
            Some(index) => index,
            None => {
                if state.slots.len() >= ENDPOINTS_MAX {
                    return None;
                }
                let url = format!("{}://{authority}", self.scheme.as_str());
                let slot = self.template.slot(url).ok()?;
                if slot.authority != authority {
                    return None;
                }
                state.slots.push(slot);
                state.slots.len() - 1
            }
        };
        match route {
            Route::Leader => state.leader = index,
            Route::Any => state.reader = index,
        }
        Some(state.target(index))
    }

    /// Every endpoint but `index`.
    pub(crate) fn others(&self, index: usize) -> Vec<Target> {
        let state = self.lock();
        (0..state.slots.len()).filter(|&i| i != index).map(|i| state.target(i)).collect()
    }

    /// The URL of the believed leader.
    pub(crate) fn leader_url(&self) -> String {
        let state = self.lock();
        state.slots[state.leader].url.clone()
    }

    fn lock(&self) -> MutexGuard<'_, RouterState> {
        // A panic while holding this lock leaves the state consistent (every write is a
        // single assignment or push), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl RouterState {
    fn target(&self, index: usize) -> Target {
        let slot = &self.slots[index];
        Target { index, url: slot.url.clone(), channel: slot.channel.clone() }
    }
}

impl EndpointTemplate {
    fn slot(&self, url: String) -> Result<Slot, ClientError> {
        let invalid =
            |e: tonic::transport::Error| ClientError::Config { reason: format!("{url}: {e}") };
        let keepalive = self.config.keepalive_interval;
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(invalid)?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(keepalive)
            .keep_alive_timeout(keepalive)
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| ClientError::Tls { reason: format!("{url}: {e}") })?;
        }
        let authority = endpoint
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .ok_or_else(|| ClientError::Config { reason: format!("{url}: no host:port") })?;
        Ok(Slot { url, authority, channel: endpoint.connect_lazy() })
    }
}

fn tls_config(tls: &crate::config::ClientTls) -> ClientTlsConfig {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
    if let (Some(cert), Some(key)) = (&tls.cert_pem, &tls.key_pem) {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    config
}

/// A leader address from a server is "host:port" and nothing else: no scheme (the client keeps
/// its configured one, so a server can never switch it from TLS to plaintext), no path, no
/// user info.
fn parse_addr(addr: &str) -> Option<String> {
    let addr = addr.trim();
    let bad = |c: char| c.is_whitespace() || matches!(c, '/' | '@' | '?' | '#');
    if addr.is_empty() || addr.len() > 255 || addr.chars().any(bad) || !addr.contains(':') {
        return None;
    }
    Some(addr.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_address_is_host_and_port_only() {
        assert_eq!(parse_addr("127.0.0.1:7001").as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(parse_addr("[::1]:7001").as_deref(), Some("[::1]:7001"));
        assert_eq!(parse_addr("http://127.0.0.1:7001"), None);
        assert_eq!(parse_addr("127.0.0.1:7001/x"), None);
        assert_eq!(parse_addr(""), None);
        assert_eq!(parse_addr("127.0.0.1"), None);
    }

    #[tokio::test]
    async fn redirect_adds_an_endpoint_with_the_configured_scheme_once() {
        let router = Router::new(&ClientConfig::new(["http://127.0.0.1:1"])).expect("valid");
        let target = router.redirect(Route::Leader, "127.0.0.1:2").expect("usable");
        assert_eq!(target.url, "http://127.0.0.1:2");
        assert_eq!(target.index, 1);
        let again = router.redirect(Route::Leader, "127.0.0.1:2").expect("usable");
        assert_eq!(again.index, 1);
        assert_eq!(router.leader_url(), "http://127.0.0.1:2");
        assert_eq!(router.redirect(Route::Leader, "127.0.0.1:1").map(|t| t.index), Some(0));
    }

    #[tokio::test]
    async fn advance_wraps_and_keeps_a_concurrent_choice() {
        let config = ClientConfig::new(["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        let router = Router::new(&config).expect("valid");
        assert_eq!(router.advance(Route::Leader, 0).index, 1);
        // Another call already moved past 0: a late failure report for 0 does not move it.
        assert_eq!(router.advance(Route::Leader, 0).index, 1);
        assert_eq!(router.advance(Route::Leader, 1).index, 0);
        assert_eq!(router.target(Route::Any).index, 0);
    }
}
