//! The simulated effect executor: calls take a simulated latency, and a
//! failure may come before the gateway executed the call or after (the
//! answer is lost, the money moved), which is what makes void-by-order
//! necessary. What to do after each answer (retry after how long, park,
//! give up) is the production retry policy
//! (`crate::pipeline::effects::policy`), with the parameters of
//! [`gateway_config`] and a jitter drawn from the step's seeded entropy: an
//! authorization makes at most `MAX_ATTEMPTS` attempts within a payment
//! deadline that includes the call in flight, then ends `payment_failed` /
//! `gateway_unavailable`; a capture or void is retried, and parked between
//! rounds, until it is done. There is no circuit breaker and no in-flight
//! limit: an outage is calls failing, and a parked call is a queued one.

use std::collections::VecDeque;

use rand::Rng;
use rand::rngs::StdRng;

use crate::config::GatewayConfig;
use crate::domain::{Effect, Message, PaymentOutcome};
use crate::pipeline::effects::REASON_GATEWAY_UNAVAILABLE;
use crate::pipeline::effects::policy::{Answer, Decision, RetryPolicy, Tries};

use super::Breach;
use super::gateway::SimGateway;

/// The simulation's `[gateway]` retry settings.
pub const MAX_ATTEMPTS: u32 = 3;
pub const PAYMENT_DEADLINE_MS: u64 = 5_000;
const RETRY_BASE_MS: u64 = 100;
pub const MAX_LATENCY_MS: u64 = 300;
/// Share of calls that fail (half before, half after executing).
pub const FAILURE_RATE: f64 = 0.1;

/// The gateway settings the simulated executor runs the policy with.
pub fn gateway_config() -> GatewayConfig {
    GatewayConfig {
        max_attempts: MAX_ATTEMPTS,
        payment_deadline_ms: PAYMENT_DEADLINE_MS,
        retry_base_ms: RETRY_BASE_MS,
        ..GatewayConfig::default()
    }
}

#[derive(Debug)]
struct Job {
    effect: Effect,
    /// From the first attempt on (an authorization's deadline starts
    /// when its call first starts, as in production).
    tries: Option<Tries>,
    not_before_ms: u64,
}

#[derive(Debug)]
struct Call {
    job: Job,
    done_ms: u64,
    /// `None`: the gateway was unavailable, or its answer was lost.
    answer: Option<Message>,
    /// The policy's jitter for this call's retry, if it needs one.
    jitter: u64,
}

/// A result to append to `orders`, keyed by the effect's reply key.
pub type Report = (String, Message);

#[derive(Debug)]
pub struct Executor {
    policy: RetryPolicy,
    queue: VecDeque<Job>,
    inflight: Vec<Call>,
}

impl Default for Executor {
    fn default() -> Executor {
        Executor {
            policy: RetryPolicy::new(&gateway_config()),
            queue: VecDeque::new(),
            inflight: Vec::new(),
        }
    }
}

impl Executor {
    /// Queues an effect handed over at `now_ms`.
    pub fn submit(&mut self, effect: Effect, now_ms: u64) {
        self.queue.push_back(Job {
            effect,
            tries: None,
            not_before_ms: now_ms,
        });
    }

    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.inflight.is_empty()
    }

    /// The process died: queued and in-flight calls are gone (the effects
    /// are still in the checkpointed outboxes, or re-emitted by replay).
    pub fn abandon(&mut self) {
        self.queue.clear();
        self.inflight.clear();
    }

    /// When something is next due: a back-off ends or a call answers.
    pub fn next_due_ms(&self) -> Option<u64> {
        let queued = self.queue.iter().map(|j| j.not_before_ms);
        let calls = self.inflight.iter().map(|c| c.done_ms);
        queued.chain(calls).min()
    }

    /// Starts up to `count` calls whose back-off is over, oldest first.
    /// `failure_rate` and `outage` shape the gateway's answers.
    pub fn start(
        &mut self,
        count: usize,
        now_ms: u64,
        (failure_rate, outage): (f64, bool),
        rng: &mut StdRng,
        gateway: &mut SimGateway,
    ) -> Result<(), Breach> {
        let mut started = 0;
        let mut i = 0;
        while started < count && i < self.queue.len() {
            if self.queue[i].not_before_ms > now_ms {
                i += 1;
                continue;
            }
            let mut job = self.queue.remove(i).expect("index checked");
            let kind = job.effect.kind;
            let tries = job
                .tries
                .get_or_insert_with(|| self.policy.start(kind, now_ms));
            let deadline_ms = tries.deadline_ms();
            let latency = rng.random_range(1..=MAX_LATENCY_MS);
            let fails_before = outage || rng.random_bool(failure_rate / 2.0);
            let fails_after = rng.random_bool(failure_rate / 2.0);
            let jitter = rng.random();
            let mut done_ms = now_ms + latency;
            let mut answer = match fails_before {
                true => None,
                false => Some(gateway.execute(&job.effect)?),
            };
            if fails_after {
                answer = None;
            }
            // The deadline cuts a slow call short: executed, answer lost.
            if let Some(deadline) = deadline_ms.filter(|d| done_ms > *d) {
                done_ms = deadline;
                answer = None;
            }
            self.inflight.push(Call {
                job,
                done_ms,
                answer,
                jitter,
            });
            started += 1;
        }
        Ok(())
    }

    /// The results of the calls answered by `now_ms`, in answer order;
    /// failed calls are retried or given up on.
    pub fn deliver(&mut self, now_ms: u64) -> Vec<Report> {
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.inflight.len() {
            if self.inflight[i].done_ms <= now_ms {
                due.push(self.inflight.remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|c| c.done_ms);
        let mut reports = Vec::new();
        for call in due {
            if let Some(report) = self.decide(call) {
                reports.push(report);
            }
        }
        reports
    }

    /// The policy's decision on a call's answer: its report, or a retry.
    fn decide(&mut self, call: Call) -> Option<Report> {
        let Call {
            mut job,
            done_ms,
            answer,
            jitter,
        } = call;
        let class = match answer {
            Some(_) => Answer::Ok,
            None => Answer::Retryable,
        };
        let tries = job.tries.as_mut().expect("a call that ran has started");
        match self.policy.decide(tries, class, done_ms, jitter) {
            Decision::Done => {
                let body = answer.expect("only an answer is done");
                Some((job.effect.reply_key, body))
            }
            Decision::GiveUp => {
                let body = Message::PaymentResult {
                    order_id: job.effect.order_id.clone(),
                    outcome: PaymentOutcome::Failed {
                        reason: REASON_GATEWAY_UNAVAILABLE.to_owned(),
                    },
                };
                Some((job.effect.reply_key, body))
            }
            Decision::RetryAfter { delay_ms } | Decision::Park { delay_ms } => {
                job.not_before_ms = done_ms + delay_ms;
                self.queue.push_back(job);
                None
            }
        }
    }
}
