//! The retry loop every unary call goes through: pick an endpoint, call with a deadline,
//! classify a failure, then follow the leader, move on, pause or give up.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tonic::Status;
use tonic::transport::Channel;

use crate::backoff::Backoff;
use crate::config::ClientConfig;
use crate::error::{ClientError, Verdict, classify, describe};
use crate::proto;
use crate::router::{Route, Router, Target};

/// Whether a repeated attempt of a call can change the outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Reads and status: an attempt that timed out changed nothing.
    ReadOnly,
    /// Appends and admin calls: an attempt that timed out may have taken effect, so running
    /// out of retries after one is `UnknownOutcome`, not `Unavailable`.
    Mutating,
    /// A write that a repeat could apply twice (a stream append with neither a producer nor
    /// an expected version): after an attempt that may have taken effect the call stops with
    /// `UnknownOutcome` instead of repeating it.
    Once,
}

/// What a client and everything it spawns share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ClientConfig,
    pub(crate) router: Router,
    rng: Mutex<SmallRng>,
    /// The last leader check: when, of which endpoint, and the leader it found elsewhere.
    /// Calls stalled on one endpoint at once share it.
    leader_check: Mutex<Option<(Instant, usize, Option<String>)>>,
}

/// A node's status, or `None` when it does not answer within `timeout`.
async fn status_of(channel: Channel, timeout: Duration) -> Option<proto::StatusResponse> {
    let mut request = tonic::Request::new(proto::StatusRequest {});
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, crate::log_client(channel).status(request)).await {
        Ok(Ok(answer)) => Some(answer.into_inner()),
        _ => None,
    }
}

/// What an attempt abandoned after a leader check reports.
pub(crate) fn abandoned(url: &str, leader_addr: &str) -> String {
    format!("{url}: no answer while {leader_addr} leads (abandoned after a leader check)")
}

/// How long a leader check's answer is shared with other stalled calls.
const LEADER_CHECK_SHARED: Duration = Duration::from_millis(100);

impl Shared {
    pub(crate) fn new(config: ClientConfig) -> Result<Shared, ClientError> {
        let router = Router::new(&config)?;
        let rng = SmallRng::try_from_os_rng().map_err(|e| ClientError::Config {
            reason: format!("the operating system's random source failed: {e}"),
        })?;
        Ok(Shared { config, router, rng: Mutex::new(rng), leader_check: Mutex::new(None) })
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

    /// Asks every node who leads, after the call to `target` went unanswered for a while.
    /// Returns the client address of another node that says it leads, unless `target` answers
    /// as the leader of a term at least as late (then it is only slow).
    pub(crate) async fn leader_elsewhere(&self, target: &Target) -> Option<String> {
        {
            let cached = self.leader_check.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, index, found)) = &*cached
                && *index == target.index
                && at.elapsed() < LEADER_CHECK_SHARED
            {
                return found.clone();
            }
        }
        // Short: the silent node's own answer is what is awaited, and a paused one never
        // gives it.
        let timeout = self.leader_check_every();
        let mut asked = tokio::task::JoinSet::new();
        for other in self.router.others(target.index) {
            asked.spawn(status_of(other.channel, timeout));
        }
        let theirs = async {
            let mut out = Vec::new();
            while let Some(answer) = asked.join_next().await {
                out.extend(answer.ok().flatten());
            }
            out
        };
        let (mine, theirs) = tokio::join!(status_of(target.channel.clone(), timeout), theirs);
        let leader = theirs
            .into_iter()
            .filter(|s| s.role == "leader" && !s.leader_addr.is_empty())
            .max_by_key(|s| s.term);
        let found = match (leader, mine) {
            (None, _) => None,
            (Some(l), Some(m)) if m.role == "leader" && m.term >= l.term => None,
            (Some(l), _) => Some(l.leader_addr),
        };
        *self.leader_check.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), target.index, found.clone()));
        found
    }

    /// How often a stalled call checks who leads after its first check, and how long a check
    /// waits for the nodes' answers: a quarter of `leader_check_after`, at least 50 ms.
    pub(crate) fn leader_check_every(&self) -> Duration {
        (self.config.leader_check_after / 4).max(Duration::from_millis(50))
    }

    /// Resolves when a leader check finds another node leading while `target` is silent;
    /// never, on another route or with the check turned off.
    async fn deposed(&self, route: Route, target: &Target) -> String {
        let after = self.config.leader_check_after;
        if route != Route::Leader || after.is_zero() {
            return std::future::pending().await;
        }
        tokio::time::sleep(after).await;
        loop {
            if let Some(addr) = self.leader_elsewhere(target).await {
                return addr;
            }
            tokio::time::sleep(self.leader_check_every()).await;
        }
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
            let call =
                tokio::time::timeout(self.config.request_timeout, attempt(target.channel.clone()));
            let verdict = tokio::select! {
                outcome = call => match outcome {
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
                },
                leader_addr = self.deposed(route, &target) => {
                    // The attempt is dropped (cancelled) without an answer: it may still take
                    // effect, as after a timeout. Then it is followed like a "not leader".
                    state.ambiguous = true;
                    state.last = abandoned(&target.url, &leader_addr);
                    Verdict::NotLeader { leader_addr: Some(leader_addr) }
                }
            };
            let exhausted = state.attempts >= attempts_max;
            match verdict {
                Verdict::Final(
                    error @ (ClientError::StreamVersionMismatch { .. }
                    | ClientError::Fenced { .. }
                    | ClientError::StreamClosed { .. }
                    | ClientError::SequenceGap { .. }),
                ) if state.ambiguous && effect != Effect::ReadOnly => {
                    // As for an offset mismatch: an earlier attempt may have appended, and this
                    // refusal does not prove it did not.
                    return Err(ClientError::UnknownOutcome {
                        attempts: state.attempts,
                        last: format!("{error} after an attempt that may have appended"),
                    });
                }
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
                Verdict::Ambiguous if effect == Effect::Once => {
                    return Err(ClientError::UnknownOutcome {
                        attempts: state.attempts,
                        last: state.last,
                    });
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
        if self.ambiguous && effect != Effect::ReadOnly {
            ClientError::UnknownOutcome { attempts, last }
        } else {
            ClientError::Unavailable { attempts, last }
        }
    }

    fn exhausted_overloaded(&self, effect: Effect) -> ClientError {
        if self.ambiguous && effect != Effect::ReadOnly {
            return self.exhausted(effect);
        }
        ClientError::Overloaded { attempts: self.attempts, message: self.last.clone() }
    }
}
