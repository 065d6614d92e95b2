//! Capped exponential backoff with jitter.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The pauses between retries: `min`, doubling per failure up to `max`, each drawn uniformly
/// from the upper half of its step so that clients retrying together spread out.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    rng: SmallRng,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration, seed: u64) -> Backoff {
        assert!(min <= max, "backoff min {min:?} above max {max:?}");
        Backoff { min, max, step: min, rng: SmallRng::seed_from_u64(seed) }
    }

    /// The next pause; each call doubles the step until it reaches `max`.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let step = self.step;
        self.step = self.step.saturating_mul(2).min(self.max);
        let half = step / 2;
        let jitter_ns = u64::try_from((step - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(self.rng.random_range(0..=jitter_ns))
    }

    /// Back to the first step, after a success.
    pub(crate) fn reset(&mut self) {
        self.step = self.min;
    }

    /// Sleeps for the next pause.
    pub(crate) async fn wait(&mut self) {
        let pause = self.next_pause();
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_stays_in_the_upper_half() {
        let min = Duration::from_millis(10);
        let max = Duration::from_millis(100);
        let mut backoff = Backoff::new(min, max, 7);
        let mut step = min;
        for _ in 0..10 {
            let pause = backoff.next_pause();
            assert!(pause >= step / 2 && pause <= step, "{pause:?} outside {step:?}");
            step = (step * 2).min(max);
        }
        backoff.reset();
        assert!(backoff.next_pause() <= min);
    }

    #[test]
    fn zero_backoff_never_pauses() {
        let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO, 1);
        assert_eq!(backoff.next_pause(), Duration::ZERO);
    }
}
