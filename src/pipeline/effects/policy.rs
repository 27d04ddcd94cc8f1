//! The effect executor's retry rules as a pure decision: no clock, no
//! randomness, no I/O. The production executor (`super::Retrier`,
//! `super::Executor::settle`) and the simulation's executor
//! (`crate::sim`) both ask it what to do after every gateway answer, so
//! the simulation runs the production decisions, not a copy of them.
//!
//! The caller brings the time (milliseconds on any clock that does not go
//! back, the same one for one effect) and the jitter (a `u64` it draws:
//! random in production, seeded in the simulation). The rules are those of
//! the parent module's doc.

use crate::config::GatewayConfig;
use crate::domain::EffectKind;
use crate::gateway::GatewayError;
use crate::gateway::breaker::CIRCUIT_OPEN;

/// Longest back-off between two attempts of one round.
pub const MAX_BACKOFF_MS: u64 = 5_000;
/// First and longest wait of a parked capture or void.
pub const PARK_FIRST_MS: u64 = 1_000;
pub const PARK_MAX_MS: u64 = 30_000;

/// What a gateway call came back with, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// An answer from the gateway (a decline is one too).
    Ok,
    /// Network error, timeout, 429, 5xx: retrying may help.
    Retryable,
    /// The circuit breaker answered, not the gateway.
    CircuitOpen,
    /// The gateway refused the request itself: retrying cannot help.
    Refused,
    /// A 2xx that does not show what was asked (wrong status, amount or
    /// currency): retrying under the same key replays it.
    Unexpected,
    /// 401/403: the gateway refuses orderflow's credentials; retrying
    /// with the same key cannot help.
    AuthFailed,
}

impl Answer {
    pub fn of<T>(result: &Result<T, GatewayError>) -> Answer {
        match result {
            Ok(_) => Answer::Ok,
            Err(GatewayError::Unavailable(m)) if m == CIRCUIT_OPEN => Answer::CircuitOpen,
            Err(GatewayError::Unavailable(_)) => Answer::Retryable,
            Err(GatewayError::Refused(_)) => Answer::Refused,
            Err(GatewayError::Unexpected { .. }) => Answer::Unexpected,
            Err(GatewayError::AuthFailed(_)) => Answer::AuthFailed,
        }
    }

    /// The `outcome` label of `orderflow_gateway_calls_total`.
    pub fn label(self) -> &'static str {
        match self {
            Answer::Ok => "ok",
            Answer::Retryable => "unavailable",
            Answer::CircuitOpen => "circuit_open",
            Answer::Refused => "refused",
            Answer::Unexpected => "unexpected",
            Answer::AuthFailed => "auth_failed",
        }
    }

    fn is_retryable(self) -> bool {
        matches!(self, Answer::Retryable | Answer::CircuitOpen)
    }
}

/// What to do after an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Stop and report the answer: a success, or a capture or void the
    /// gateway refused for good (logged; retrying cannot help).
    Done,
    /// Call again after this delay, in the same round.
    RetryAfter { delay_ms: u64 },
    /// A capture or void spent its round, or was refused for its
    /// credentials: wait this long holding no in-flight slot, then start a
    /// new round.
    Park { delay_ms: u64 },
    /// The authorization ends `payment_failed` (with the reason of its
    /// last error): attempts spent, the deadline too close, a refusal, an
    /// unexpected answer or refused credentials.
    GiveUp,
}

/// The retry parameters, from `[gateway]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub retry_base_ms: u64,
    pub payment_deadline_ms: u64,
}

/// One effect's progress through the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tries {
    kind: EffectKind,
    /// Attempts spent in the current round.
    spent: u32,
    /// Answers received, every round and circuit-open rejections included.
    answers: u32,
    /// Authorizations only: the call in flight is cut at this time.
    deadline_ms: Option<u64>,
    /// Next wait of a parked capture or void.
    park_ms: u64,
}

impl Tries {
    pub fn kind(&self) -> EffectKind {
        self.kind
    }

    /// Attempts spent in the current round.
    pub fn spent(&self) -> u32 {
        self.spent
    }

    /// Answers received so far: more than one means the effect was retried.
    pub fn answers(&self) -> u32 {
        self.answers
    }

    /// When an authorization must have its answer, the call in flight
    /// included; `None` for a capture or void.
    pub fn deadline_ms(&self) -> Option<u64> {
        self.deadline_ms
    }
}

impl RetryPolicy {
    pub fn new(config: &GatewayConfig) -> RetryPolicy {
        RetryPolicy {
            max_attempts: config.max_attempts,
            retry_base_ms: config.retry_base_ms,
            payment_deadline_ms: config.payment_deadline_ms,
        }
    }

    /// The bookkeeping of an effect whose first attempt starts at `now_ms`.
    pub fn start(&self, kind: EffectKind, now_ms: u64) -> Tries {
        let deadline_ms = (kind == EffectKind::Authorize)
            .then(|| now_ms.saturating_add(self.payment_deadline_ms));
        Tries {
            kind,
            spent: 0,
            answers: 0,
            deadline_ms,
            park_ms: PARK_FIRST_MS,
        }
    }

    /// The decision after the answer of the attempt `tries` just made,
    /// received at `now_ms`; `jitter` spreads the delays of effects that
    /// failed together.
    pub fn decide(&self, tries: &mut Tries, answer: Answer, now_ms: u64, jitter: u64) -> Decision {
        // The breaker answered, not the gateway: an open circuit spends no
        // attempt of a deadline-bound call, which waits (up to its
        // deadline) for the gateway to come back instead of failing every
        // order placed during a short outage.
        let free = answer == Answer::CircuitOpen && tries.deadline_ms.is_some();
        if !free {
            tries.spent += 1;
        }
        tries.answers = tries.answers.saturating_add(1);
        let authorize = tries.kind == EffectKind::Authorize;
        match answer {
            Answer::Ok => return Decision::Done,
            Answer::Refused | Answer::Unexpected | Answer::AuthFailed if authorize => {
                return Decision::GiveUp;
            }
            Answer::Refused | Answer::Unexpected => return Decision::Done,
            // Money must still move as the processor decided, and the key
            // may be accepted again (a permission granted to a restricted
            // key): no retry in this round, a new one after a park.
            Answer::AuthFailed => return Self::park(tries, jitter),
            Answer::Retryable | Answer::CircuitOpen => {}
        }
        debug_assert!(answer.is_retryable());
        if tries.spent < self.max_attempts {
            let delay_ms = self.backoff_ms(tries.spent.max(1), jitter);
            let past_deadline = tries
                .deadline_ms
                .is_some_and(|d| now_ms.saturating_add(delay_ms) >= d);
            return match past_deadline {
                true => Decision::GiveUp,
                false => Decision::RetryAfter { delay_ms },
            };
        }
        if authorize {
            return Decision::GiveUp;
        }
        // Money must move as the processor decided: a capture or void is
        // never given up, only parked for longer and longer.
        Self::park(tries, jitter)
    }

    /// Parks a capture or void: 1 s, 2 s, ... up to 30 s, plus jitter.
    fn park(tries: &mut Tries, jitter: u64) -> Decision {
        let delay_ms = tries.park_ms + pick(jitter, tries.park_ms / 4);
        tries.park_ms = (tries.park_ms * 2).min(PARK_MAX_MS);
        tries.spent = 0;
        Decision::Park { delay_ms }
    }

    /// `retry_base_ms × 2^(attempt-1)`, capped, of which the upper half is
    /// jitter.
    fn backoff_ms(&self, attempt: u32, jitter: u64) -> u64 {
        assert!(attempt >= 1, "attempts count from 1");
        let base = self
            .retry_base_ms
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(MAX_BACKOFF_MS);
        base - base / 2 + pick(jitter, base / 2)
    }
}

/// A value in `0..=max` from the caller's random draw.
fn pick(jitter: u64, max: u64) -> u64 {
    jitter % max.saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            retry_base_ms: 100,
            payment_deadline_ms: 2_000,
        }
    }

    /// An authorization gives up after `max_attempts` retryable failures.
    #[test]
    fn authorization_attempts_are_bounded() {
        let p = policy(3);
        let mut t = p.start(EffectKind::Authorize, 0);
        assert_eq!(
            p.decide(&mut t, Answer::Retryable, 10, 0),
            Decision::RetryAfter { delay_ms: 50 }
        );
        assert_eq!(
            p.decide(&mut t, Answer::Retryable, 80, 0),
            Decision::RetryAfter { delay_ms: 100 }
        );
        assert_eq!(
            p.decide(&mut t, Answer::Retryable, 200, 0),
            Decision::GiveUp
        );
    }

    /// A retry whose back-off would reach the deadline is not started.
    #[test]
    fn authorization_never_retries_past_the_deadline() {
        let p = policy(100);
        let mut t = p.start(EffectKind::Authorize, 1_000);
        assert_eq!(t.deadline_ms(), Some(3_000));
        let jitter = 50; // the longest back-off of the first attempt: 100 ms
        assert_eq!(
            p.decide(&mut t, Answer::Retryable, 2_899, jitter),
            Decision::RetryAfter { delay_ms: 100 }
        );
        let mut t = p.start(EffectKind::Authorize, 1_000);
        assert_eq!(
            p.decide(&mut t, Answer::Retryable, 2_900, jitter),
            Decision::GiveUp
        );
        // A call the deadline cut short answers at the deadline itself.
        let mut t = p.start(EffectKind::Authorize, 1_000);
        assert_eq!(
            p.decide(&mut t, Answer::Retryable, 3_000, 0),
            Decision::GiveUp
        );
    }

    /// An open circuit spends no attempt of an authorization, only time.
    #[test]
    fn circuit_open_spends_no_authorization_attempt() {
        let p = RetryPolicy {
            payment_deadline_ms: 60_000,
            ..policy(2)
        };
        let mut t = p.start(EffectKind::Authorize, 0);
        for now_ms in 0..20 {
            assert_eq!(
                p.decide(&mut t, Answer::CircuitOpen, now_ms, 0),
                Decision::RetryAfter { delay_ms: 50 }
            );
        }
        assert_eq!(t.spent(), 0);
        assert!(matches!(
            p.decide(&mut t, Answer::Retryable, 100, 0),
            Decision::RetryAfter { .. }
        ));
        assert_eq!(
            p.decide(&mut t, Answer::Retryable, 200, 0),
            Decision::GiveUp
        );
    }

    /// A capture or void is never given up: after its round it parks, for
    /// 1 s, 2 s, ... up to 30 s, and an open circuit spends its attempts.
    #[test]
    fn capture_never_gives_up() {
        let p = policy(2);
        for kind in [EffectKind::Capture, EffectKind::Void] {
            let mut t = p.start(kind, 0);
            assert_eq!(t.deadline_ms(), None);
            let mut parks = Vec::new();
            for now_ms in 0..40 {
                match p.decide(&mut t, Answer::CircuitOpen, now_ms * 1_000_000, 0) {
                    Decision::RetryAfter { delay_ms } => assert_eq!(delay_ms, 50),
                    Decision::Park { delay_ms } => parks.push(delay_ms),
                    other => panic!("{kind:?} decided {other:?}"),
                }
            }
            assert_eq!(parks.len(), 20, "one park every 2 attempts");
            assert_eq!(&parks[..6], [1_000, 2_000, 4_000, 8_000, 16_000, 30_000]);
            assert!(parks[6..].iter().all(|&d| d == 30_000));
            assert_eq!(p.decide(&mut t, Answer::Ok, 0, 0), Decision::Done);
        }
    }

    /// A refusal or an unexpected answer ends an authorization as failed
    /// and a capture or void as done, without a retry.
    #[test]
    fn refusals_are_not_retried() {
        let p = policy(4);
        for answer in [Answer::Refused, Answer::Unexpected] {
            let mut t = p.start(EffectKind::Authorize, 0);
            assert_eq!(p.decide(&mut t, answer, 0, 0), Decision::GiveUp);
            assert_eq!(t.answers(), 1);
            let mut t = p.start(EffectKind::Capture, 0);
            assert_eq!(p.decide(&mut t, answer, 0, 0), Decision::Done);
        }
        let mut t = p.start(EffectKind::Authorize, 0);
        assert_eq!(p.decide(&mut t, Answer::Ok, 0, 0), Decision::Done);
    }

    /// Refused credentials end an authorization at its first answer, and
    /// park a capture or void at once (no retry within the round).
    #[test]
    fn auth_failures_are_not_retried() {
        let p = policy(4);
        let mut t = p.start(EffectKind::Authorize, 0);
        assert_eq!(p.decide(&mut t, Answer::AuthFailed, 0, 0), Decision::GiveUp);
        assert_eq!(t.answers(), 1);
        for kind in [EffectKind::Capture, EffectKind::Void] {
            let mut t = p.start(kind, 0);
            assert_eq!(
                p.decide(&mut t, Answer::AuthFailed, 0, 0),
                Decision::Park { delay_ms: 1_000 }
            );
            assert_eq!(
                p.decide(&mut t, Answer::AuthFailed, 0, 0),
                Decision::Park { delay_ms: 2_000 }
            );
            assert_eq!(p.decide(&mut t, Answer::Ok, 0, 0), Decision::Done);
        }
    }

    /// Back-off doubles from the base up to 5 s; jitter moves it within its upper half.
    #[test]
    fn backoff_doubles_with_bounded_jitter() {
        let p = policy(100);
        for attempt in 1..40 {
            let base = (100u64 << (attempt - 1).min(16)).min(MAX_BACKOFF_MS);
            for jitter in [0, 1, 7, 12_345, u64::MAX] {
                let d = p.backoff_ms(attempt, jitter);
                assert!((base - base / 2..=base).contains(&d), "{attempt}: {d}");
            }
        }
        assert_eq!(p.backoff_ms(30, 2_500), MAX_BACKOFF_MS);
    }

    /// Park jitter adds at most a quarter of the park.
    #[test]
    fn park_jitter_is_bounded() {
        let p = policy(1);
        let mut t = p.start(EffectKind::Void, 0);
        assert_eq!(
            p.decide(&mut t, Answer::Retryable, 0, 250),
            Decision::Park { delay_ms: 1_250 }
        );
        assert_eq!(
            p.decide(&mut t, Answer::Retryable, 0, 501),
            Decision::Park { delay_ms: 2_000 }
        );
    }

    /// Gateway results map to the answers and metric labels of the executor.
    #[test]
    fn answers_of_results() {
        let open: Result<(), _> = Err(GatewayError::Unavailable(CIRCUIT_OPEN.into()));
        assert_eq!(Answer::of(&open), Answer::CircuitOpen);
        let down: Result<(), _> = Err(GatewayError::Unavailable("503".into()));
        assert_eq!(Answer::of(&down).label(), "unavailable");
        let refused: Result<(), _> = Err(GatewayError::Refused("400".into()));
        assert_eq!(Answer::of(&refused), Answer::Refused);
        let key: Result<(), _> = Err(GatewayError::AuthFailed("401".into()));
        assert_eq!(Answer::of(&key).label(), "auth_failed");
        assert_eq!(Answer::of(&Ok::<_, GatewayError>(())), Answer::Ok);
    }
}
