//! When a dead partition task is started again: the restart policy of the
//! supervisor, free of clocks and I/O (the caller passes the time), so its
//! back-off and its death window are tested on their own.
//!
//! A task that dies is restarted after a back-off that doubles with each
//! death still inside the window, from `initial_backoff_ms` up to
//! `max_backoff_ms`. A death beyond `max_deaths` within `window_ms` means
//! restarting does not help (a poison input, a broken dependency): the
//! supervisor gives up on the task instead of spinning.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Semaphore;

/// A task failure that the log or the state store being unavailable
/// explains (past the call's own retries): the supervisor starts the task
/// again later, the instance stays up.
pub trait Outage: std::fmt::Display {
    fn is_outage(&self) -> bool;
}

/// The bounds of [`Deaths`]; checked by `crate::config` before it is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Deaths within `window_ms` that are still restarted.
    pub max_deaths: u32,
    pub window_ms: u64,
}

impl RestartPolicy {
    pub fn from_config(c: &crate::config::SupervisorConfig) -> RestartPolicy {
        RestartPolicy {
            initial_backoff_ms: c.restart_initial_backoff_ms,
            max_backoff_ms: c.restart_max_backoff_ms,
            max_deaths: c.max_deaths,
            window_ms: c.death_window_ms,
        }
    }
}

/// What to do with a task that just died.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Start it again after `backoff_ms`; `deaths` counts this one.
    Restart { backoff_ms: u64, deaths: u32 },
    /// It died more than `max_deaths` times within the window.
    GiveUp { deaths: u32 },
}

/// The recent deaths of one task.
#[derive(Debug)]
pub struct Deaths {
    policy: RestartPolicy,
    /// Times of the deaths within the window, oldest first; at most
    /// `max_deaths + 1` long.
    recent_ms: VecDeque<u64>,
}

impl Deaths {
    pub fn new(policy: RestartPolicy) -> Deaths {
        assert!(policy.initial_backoff_ms > 0, "a zero back-off spins");
        assert!(policy.initial_backoff_ms <= policy.max_backoff_ms);
        assert!(policy.max_deaths > 0);
        assert!(policy.window_ms > 0);
        Deaths {
            policy,
            recent_ms: VecDeque::with_capacity(policy.max_deaths as usize + 1),
        }
    }

    /// The task died at `now_ms` (a monotonic clock, never going back).
    pub fn died(&mut self, now_ms: u64) -> Verdict {
        assert!(self.recent_ms.back().is_none_or(|last| *last <= now_ms));
        self.forget_older(now_ms);
        self.recent_ms.push_back(now_ms);
        let deaths = self.recent_ms.len() as u32;
        assert!(deaths <= self.policy.max_deaths + 1);
        if deaths > self.policy.max_deaths {
            return Verdict::GiveUp { deaths };
        }
        Verdict::Restart {
            backoff_ms: self.backoff_ms(deaths),
            deaths,
        }
    }

    /// Deaths a whole window before `now_ms` no longer count: the task
    /// ran that long since.
    fn forget_older(&mut self, now_ms: u64) {
        let window_ms = self.policy.window_ms;
        while self
            .recent_ms
            .front()
            .is_some_and(|t| now_ms - t >= window_ms)
        {
            self.recent_ms.pop_front();
        }
    }

    /// The back-off before the restart that follows death number `deaths`.
    fn backoff_ms(&self, deaths: u32) -> u64 {
        assert!(deaths >= 1);
        let doublings = (deaths - 1).min(63);
        let backoff = self
            .policy
            .initial_backoff_ms
            .saturating_mul(1u64 << doublings);
        backoff.min(self.policy.max_backoff_ms)
    }
}

/// Adds one permit to a readiness semaphore the first time it is sent, so
/// a restarted task that recovers again does not count twice.
#[derive(Debug)]
pub struct SignalOnce {
    permits: Arc<Semaphore>,
    sent: AtomicBool,
}

impl SignalOnce {
    pub fn new(permits: Arc<Semaphore>) -> Arc<SignalOnce> {
        Arc::new(SignalOnce {
            permits,
            sent: AtomicBool::new(false),
        })
    }

    pub fn send(&self) {
        if !self.sent.swap(true, Ordering::AcqRel) {
            self.permits.add_permits(1);
        }
    }
}

/// A task that ends before it recovered (its partition moved on, the
/// instance stops, or it was given up on, which `/readyz` reports on its
/// own) no longer holds readiness back.
impl Drop for SignalOnce {
    fn drop(&mut self) {
        self.send();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RestartPolicy = RestartPolicy {
        initial_backoff_ms: 100,
        max_backoff_ms: 1_000,
        max_deaths: 5,
        window_ms: 60_000,
    };

    fn backoff(v: Verdict) -> u64 {
        match v {
            Verdict::Restart { backoff_ms, .. } => backoff_ms,
            Verdict::GiveUp { .. } => panic!("gave up: {v:?}"),
        }
    }

    /// The back-off doubles per death and stops at the maximum.
    #[test]
    fn backoff_doubles_up_to_the_max() {
        let mut d = Deaths::new(POLICY);
        let backoffs: Vec<u64> = (0..5).map(|i| backoff(d.died(i))).collect();
        assert_eq!(backoffs, [100, 200, 400, 800, 1_000]);
    }

    /// One death more than `max_deaths` within the window gives up.
    #[test]
    fn gives_up_past_max_deaths_in_the_window() {
        let mut d = Deaths::new(POLICY);
        for t in 0..5 {
            assert!(matches!(d.died(t * 1_000), Verdict::Restart { .. }));
        }
        assert_eq!(d.died(59_999), Verdict::GiveUp { deaths: 6 });
    }

    /// Deaths older than the window are forgotten: back-off starts over.
    #[test]
    fn deaths_outside_the_window_are_forgotten() {
        let mut d = Deaths::new(POLICY);
        for t in 0..5 {
            d.died(t);
        }
        assert_eq!(
            d.died(70_000),
            Verdict::Restart {
                backoff_ms: 100,
                deaths: 1
            }
        );
    }

    /// A task that dies slower than the window allows runs forever.
    #[test]
    fn spaced_deaths_never_give_up() {
        let mut d = Deaths::new(RestartPolicy {
            max_deaths: 1,
            ..POLICY
        });
        for i in 0..100 {
            assert_eq!(backoff(d.died(i * 60_001)), 100);
        }
    }

    /// A huge death count saturates instead of overflowing.
    #[test]
    fn backoff_saturates() {
        let d = Deaths::new(RestartPolicy {
            max_backoff_ms: u64::MAX,
            ..POLICY
        });
        assert_eq!(d.backoff_ms(200), u64::MAX);
    }

    /// A zero back-off is refused: it would restart in a tight loop.
    #[test]
    #[should_panic(expected = "spins")]
    fn zero_backoff_is_refused() {
        Deaths::new(RestartPolicy {
            initial_backoff_ms: 0,
            ..POLICY
        });
    }

    /// Only the first send adds a permit.
    #[test]
    fn signal_once_adds_one_permit() {
        let permits = Arc::new(Semaphore::new(0));
        let s = SignalOnce::new(permits.clone());
        s.send();
        s.send();
        assert_eq!(permits.available_permits(), 1);
    }

    /// A signal counts once, sent or dropped unsent.
    #[test]
    fn a_signal_counts_once() {
        let permits = Arc::new(Semaphore::new(0));
        let sent = SignalOnce::new(permits.clone());
        sent.send();
        sent.send();
        drop(sent);
        assert_eq!(permits.available_permits(), 1);
        drop(SignalOnce::new(permits.clone()));
        assert_eq!(
            permits.available_permits(),
            2,
            "a task that ended unrecovered"
        );
    }
}
