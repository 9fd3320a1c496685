//! The one retry policy of every request to the store: exponential backoff
//! with jitter for as long as a time budget allows without progress. Every
//! byte that arrives (a range's body, a part stored) resets the budget, so
//! a long transfer over a flaky network keeps going while a dead store
//! fails within the budget. Only transient failures are retried (network,
//! timeouts, 5xx, 408, 429 and SlowDown); the SDK's own retries are off, so
//! attempts never multiply across layers.

use std::time::Duration;

use tokio::time::Instant;

use super::StorageError;

/// How long and how often to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Longest time spent retrying without progress.
    pub budget: Duration,
    /// The first wait; each next one doubles, up to `max_wait`.
    pub first_wait: Duration,
    /// The longest wait between two attempts.
    pub max_wait: Duration,
}

impl RetryPolicy {
    /// Retries for up to `budget` without progress.
    pub fn with_budget(budget: Duration) -> Self {
        Self {
            budget,
            first_wait: Duration::from_millis(200),
            max_wait: Duration::from_secs(5),
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::with_budget(Duration::from_secs(120))
    }
}

/// The retry state of one transfer (or one request).
#[derive(Debug)]
pub struct Retrier {
    policy: RetryPolicy,
    /// Since when no progress was made; `None` before the first failure.
    stalled_since: Option<Instant>,
    /// Failures since the last progress.
    failures: u32,
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait this long, then try again; the budget left after that.
    Retry {
        /// The wait before the next attempt.
        wait: Duration,
        /// The budget left once it starts.
        left: Duration,
    },
    /// The budget is spent: this long was spent retrying.
    GiveUp(Duration),
}

impl Retrier {
    /// A fresh state under `policy`.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            stalled_since: None,
            failures: 0,
        }
    }

    /// Notes progress: the budget starts again at the next failure.
    pub fn progressed(&mut self) {
        self.stalled_since = None;
        self.failures = 0;
    }

    /// Time spent without progress since the first failure.
    pub fn stalled_for(&self) -> Duration {
        self.stalled_since.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// Decides what follows a transient failure.
    pub fn failed(&mut self) -> Next {
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        self.failures += 1;
        let spent = since.elapsed();
        let Some(left) = self.policy.budget.checked_sub(spent).filter(|l| !l.is_zero()) else {
            return Next::GiveUp(spent);
        };
        let wait = backoff(&self.policy, self.failures).min(left);
        Next::Retry {
            wait,
            left: left - wait,
        }
    }
}

/// The wait before attempt `failures + 1`: doubling from the first wait,
/// capped, with up to half of it again as jitter so that the clients of a
/// store that comes back do not all return at once.
fn backoff(policy: &RetryPolicy, failures: u32) -> Duration {
    let base = policy
        .first_wait
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(policy.max_wait);
    let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * base.as_millis() as u64 / 510;
    (base + Duration::from_millis(jitter)).min(policy.max_wait)
}

/// Runs `attempt` until it succeeds, fails for good, or the policy's budget
/// is spent without a success; `on_retry` hears of each wait. The error
/// that ends it says how long was spent retrying.
pub async fn retry<T, F, Fut>(
    policy: RetryPolicy,
    mut attempt: F,
    mut on_retry: impl FnMut(&StorageError, Duration),
) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StorageError>>,
{
    let mut retrier = Retrier::new(policy);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if e.is_transient() => match retrier.failed() {
                Next::Retry { wait, left } => {
                    on_retry(&e, left + wait);
                    tokio::time::sleep(wait).await;
                }
                Next::GiveUp(spent) => return Err(e.gave_up(spent, None)),
            },
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_the_budget() {
        let policy = RetryPolicy {
            budget: Duration::from_secs(3),
            first_wait: Duration::from_millis(100),
            max_wait: Duration::from_secs(1),
        };
        let waits: Vec<Duration> = (1..=6).map(|n| backoff(&policy, n)).collect();
        assert!(waits[0] >= Duration::from_millis(100) && waits[0] <= Duration::from_millis(150));
        assert!(waits[2] >= Duration::from_millis(400) && waits[2] <= Duration::from_millis(600));
        assert_eq!(waits[5], Duration::from_secs(1));
        let mut r = Retrier::new(policy);
        assert!(matches!(r.failed(), Next::Retry { .. }));
        r.progressed();
        assert_eq!(r.stalled_for(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_when_the_budget_is_spent_and_not_on_permanent_errors() {
        let policy = RetryPolicy::with_budget(Duration::from_secs(10));
        let unavailable = || StorageError::Unavailable {
            url: "s3://b/k".into(),
            op: "GetObject",
            detail: "connection refused".into(),
        };
        let started = tokio::time::Instant::now();
        let mut attempts = 0;
        let err = retry(
            policy,
            || {
                attempts += 1;
                std::future::ready(Err::<(), _>(unavailable()))
            },
            |_, _| {},
        )
        .await
        .unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_secs(16),
            "{took:?}"
        );
        assert!(attempts > 3, "{attempts} attempts");
        assert!(err.to_string().contains("retried for 10"), "{err}");

        let mut attempts = 0;
        let err = retry(
            policy,
            || {
                attempts += 1;
                std::future::ready(Err::<(), _>(StorageError::NotFound {
                    url: "s3://b/k".into(),
                    op: "GetObject",
                }))
            },
            |_, _| {},
        )
        .await
        .unwrap_err();
        assert_eq!(attempts, 1);
        assert!(matches!(err, StorageError::NotFound { .. }));
    }
}
