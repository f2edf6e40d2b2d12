//! The one retry policy of Leasehold: every loop that waits out a failure (a write, a migration,
//! the LISTEN connection, the subscription ledger, a broker reconnect, a refused filter, a
//! webhook) pauses by a [`Policy`], so how Leasehold backs off is decided, and tested, here.
//!
//! A pause doubles from `first` up to `max`, and is shortened by a random share of up to
//! `jitter` of itself so that nodes that failed together do not retry together.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long to pause before each retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    first: Duration,
    max: Duration,
    jitter: f64,
}

impl Policy {
    /// `first`, doubling up to `max`, each pause between half and all of that.
    pub const fn new(first: Duration, max: Duration) -> Policy {
        Policy {
            first,
            max,
            jitter: 0.5,
        }
    }

    /// The share of each pause that is random (0: none, exactly `first`, `2 × first`, ...).
    pub const fn jitter(self, jitter: f64) -> Policy {
        Policy { jitter, ..self }
    }

    /// The pause before retry `attempt` (1 is the first), for `rand` in [0, 1): 0 gives the
    /// shortest pause. Pure, for callers that keep their own count or their own randomness.
    pub fn delay(&self, attempt: u32, rand: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        let nominal = self.first.saturating_mul(1 << doublings).min(self.max);
        nominal.mul_f64(1.0 - self.jitter + self.jitter * rand.clamp(0.0, 1.0))
    }
}

/// One failure's retry: which attempt failed, and the pause before the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub attempt: u32,
    pub wait: Duration,
}

/// A [`Policy`] applied to one run of failures: each failure pauses longer, until [`reset`].
///
/// [`reset`]: Backoff::reset
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: Policy,
    attempt: u32,
}

impl Backoff {
    pub fn new(policy: Policy) -> Backoff {
        Backoff { policy, attempt: 0 }
    }

    /// A success: the next failure pauses `first` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Counts a failure and returns its pause; `rand` in [0, 1) as for [`Policy::delay`].
    pub fn fail_with(&mut self, rand: f64) -> Retry {
        self.attempt = self.attempt.saturating_add(1);
        Retry {
            attempt: self.attempt,
            wait: self.policy.delay(self.attempt, rand),
        }
    }

    /// Counts a failure and returns its pause.
    pub fn fail(&mut self) -> Retry {
        self.fail_with(fastrand::f64())
    }

    /// Counts a failure, hands it to `report` (the caller's log line or event, with the pause
    /// it announces), then pauses; `false` when `cancel` fires first, at once.
    pub async fn wait(&mut self, report: impl FnOnce(Retry), cancel: &CancellationToken) -> bool {
        let retry = self.fail();
        report(retry);
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(retry.wait) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pauses_double_up_to_the_cap() {
        let p = Policy::new(100 * MS, 1000 * MS).jitter(0.0);
        let d: Vec<_> = (1..=6).map(|a| p.delay(a, 0.3)).collect();
        assert_eq!(
            d,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(
            p.delay(u32::MAX, 0.0),
            1000 * MS,
            "no overflow on a long outage"
        );
        assert_eq!(p.delay(0, 0.0), 100 * MS);
    }

    #[test]
    fn jitter_shortens_a_pause_by_at_most_its_share() {
        let p = Policy::new(100 * MS, 1000 * MS);
        assert_eq!(p.delay(1, 0.0), 50 * MS);
        assert_eq!(p.delay(1, 1.0), 100 * MS);
        assert_eq!(
            p.delay(1, 7.0),
            100 * MS,
            "out-of-range randomness is clamped"
        );
        let p = p.jitter(0.2);
        for _ in 0..1000 {
            let d = p.delay(2, fastrand::f64());
            assert!(d >= 160 * MS && d <= 200 * MS, "{d:?}");
        }
    }

    #[test]
    fn a_backoff_counts_failures_until_reset() {
        let mut b = Backoff::new(Policy::new(10 * MS, 25 * MS).jitter(0.0));
        let got: Vec<_> = (0..3).map(|_| b.fail()).collect();
        let want = [(1, 10), (2, 20), (3, 25)].map(|(attempt, ms)| Retry {
            attempt,
            wait: ms * MS,
        });
        assert_eq!(got, want);
        b.reset();
        assert_eq!(b.fail_with(0.9), want[0]);
    }

    #[tokio::test]
    async fn a_wait_reports_then_pauses_and_ends_at_once_when_cancelled() {
        let mut b = Backoff::new(Policy::new(20 * MS, 20 * MS));
        let cancel = CancellationToken::new();
        let mut seen = None;
        assert!(b.wait(|r| seen = Some(r), &cancel).await);
        assert_eq!(seen.map(|r| r.attempt), Some(1));

        let mut b = Backoff::new(Policy::new(Duration::from_secs(3600), Duration::MAX));
        let started = std::time::Instant::now();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(10 * MS).await;
            c.cancel();
        });
        assert!(!b.wait(|_| {}, &cancel).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!b.wait(|_| {}, &cancel).await, "already cancelled");
    }
}
