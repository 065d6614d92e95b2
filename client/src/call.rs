//! The retry loop every unary call goes through: pick an endpoint, call with a deadline,
//! classify a failure, then follow the leader, move on, pause or give up.

use std::future::Future;
use std::sync::Mutex;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tonic::Status;
use tonic::transport::Channel;

use crate::backoff::Backoff;
use crate::config::ClientConfig;
use crate::error::{ClientError, Verdict, classify, describe};
use crate::router::{Route, Router};

/// Whether a repeated attempt of a call can change the outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Reads and status: an attempt that timed out changed nothing.
    ReadOnly,
    /// Appends and admin calls: an attempt that timed out may have taken effect, so running
    /// out of retries after one is `UnknownOutcome`, not `Unavailable`.
    Mutating,
}

/// What a client and everything it spawns share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ClientConfig,
    pub(crate) router: Router,
    rng: Mutex<SmallRng>,
}

impl Shared {
    pub(crate) fn new(config: ClientConfig) -> Result<Shared, ClientError> {
        let router = Router::new(&config)?;
        let rng = SmallRng::try_from_os_rng().map_err(|e| ClientError::Config {
            reason: format!("the operating system's random source failed: {e}"),
        })?;
        Ok(Shared { config, router, rng: Mutex::new(rng) })
    }

    /// A fresh random u64: producer ids and backoff seeds.
    pub(crate) fn random_u64(&self) -> u64 {
        self.rng.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).random()
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(
            self.config.retry_backoff_min,
            self.config.retry_backoff_max,
            self.random_u64(),
        )
    }

    /// A request carrying the client's deadline, so the server gives up when the client does.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.config.request_timeout);
        request
    }

    /// Runs `attempt` until it succeeds, fails with a final error, or the retry budget is
    /// spent.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        route: Route,
        effect: Effect,
        mut attempt: F,
    ) -> Result<Answer<T>, ClientError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut backoff = self.backoff();
        let mut target = self.router.target(route);
        let mut state = Attempts::default();
        let attempts_max = self.config.retries_max.saturating_add(1);
        loop {
            state.attempts += 1;
            let outcome =
                tokio::time::timeout(self.config.request_timeout, attempt(target.channel.clone()))
                    .await;
            let verdict = match outcome {
                Ok(Ok(answer)) => {
                    self.router.confirm(route, target.index);
                    return Ok(Answer {
                        value: answer,
                        endpoint: target.url,
                        attempts: state.attempts,
                    });
                }
                Ok(Err(status)) => {
                    state.last = format!("{}: {}", target.url, describe(&status));
                    classify(status)
                }
                Err(_elapsed) => {
                    state.last = format!(
                        "{}: no answer within request_timeout {:?}",
                        target.url, self.config.request_timeout
                    );
                    Verdict::Ambiguous
                }
            };
            let exhausted = state.attempts >= attempts_max;
            match verdict {
                Verdict::Final(ClientError::OffsetMismatch { next_offset })
                    if state.ambiguous && effect == Effect::Mutating =>
                {
                    // An earlier attempt may have committed and moved the log past the
                    // expected offset: the mismatch does not prove the append absent.
                    return Err(ClientError::UnknownOutcome {
                        attempts: state.attempts,
                        last: format!(
                            "offset mismatch (next offset {next_offset}) after an attempt that may have committed"
                        ),
                    });
                }
                Verdict::Final(error) => return Err(error),
                Verdict::Overloaded => {
                    state.overloaded += 1;
                    if state.overloaded > self.config.overloaded_retries_max || exhausted {
                        return Err(state.exhausted_overloaded(effect));
                    }
                    backoff.wait().await;
                }
                Verdict::NotLeader { leader_addr } => {
                    if exhausted {
                        return Err(state.exhausted(effect));
                    }
                    let redirect = leader_addr.and_then(|addr| self.router.redirect(route, &addr));
                    match redirect {
                        // A redirect to another node is followed at once, but two in a row
                        // pause first: nodes that disagree about the leader must not spin.
                        Some(next) if next.index != target.index && !state.redirected => {
                            state.redirected = true;
                            target = next;
                            continue;
                        }
                        Some(next) => target = next,
                        None => target = self.router.advance(route, target.index),
                    }
                    backoff.wait().await;
                }
                Verdict::Unreachable | Verdict::Ambiguous => {
                    state.ambiguous |= matches!(verdict, Verdict::Ambiguous);
                    if exhausted {
                        return Err(state.exhausted(effect));
                    }
                    target = self.router.advance(route, target.index);
                    backoff.wait().await;
                }
            }
            state.redirected = false;
        }
    }
}

/// A successful call's answer.
#[derive(Debug)]
pub(crate) struct Answer<T> {
    pub(crate) value: T,
    /// The URL of the endpoint that answered.
    pub(crate) endpoint: String,
    /// How many attempts the call made, the answered one included.
    pub(crate) attempts: u32,
}

/// The history of one call's attempts.
#[derive(Debug, Default)]
struct Attempts {
    attempts: u32,
    overloaded: u32,
    /// Some attempt may have taken effect.
    ambiguous: bool,
    /// The previous attempt followed a redirect without pausing.
    redirected: bool,
    last: String,
}

impl Attempts {
    fn exhausted(&self, effect: Effect) -> ClientError {
        let (attempts, last) = (self.attempts, self.last.clone());
        if self.ambiguous && effect == Effect::Mutating {
            ClientError::UnknownOutcome { attempts, last }
        } else {
            ClientError::Unavailable { attempts, last }
        }
    }

    fn exhausted_overloaded(&self, effect: Effect) -> ClientError {
        if self.ambiguous && effect == Effect::Mutating {
            return self.exhausted(effect);
        }
        ClientError::Overloaded { attempts: self.attempts, message: self.last.clone() }
    }
}
