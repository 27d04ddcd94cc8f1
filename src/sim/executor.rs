//! The simulated effect executor, following the production executor's
//! rules (`crate::pipeline::effects`) in simulated time: an authorization
//! makes at most `MAX_ATTEMPTS` attempts within a payment deadline that
//! includes the call in flight, then ends `payment_failed` /
//! `gateway_unavailable`; a capture or void is retried until it is done.
//! Calls take a latency; a failure may come before the gateway executed
//! the call or after (the answer is lost, the money moved), which is what
//! makes void-by-order necessary.

use std::collections::VecDeque;

use rand::Rng;
use rand::rngs::StdRng;

use crate::domain::{Effect, EffectKind, Message, PaymentOutcome};
use crate::pipeline::effects::REASON_GATEWAY_UNAVAILABLE;

use super::Breach;
use super::gateway::SimGateway;

pub const MAX_ATTEMPTS: u32 = 3;
pub const PAYMENT_DEADLINE_MS: u64 = 5_000;
const RETRY_BASE_MS: u64 = 100;
const MAX_BACKOFF_MS: u64 = 5_000;
pub const MAX_LATENCY_MS: u64 = 300;
/// Share of calls that fail (half before, half after executing).
pub const FAILURE_RATE: f64 = 0.1;

#[derive(Debug)]
struct Job {
    effect: Effect,
    attempt: u32,
    /// Authorizations only.
    deadline_ms: Option<u64>,
    not_before_ms: u64,
}

#[derive(Debug)]
struct Call {
    job: Job,
    done_ms: u64,
    /// `None`: the gateway was unavailable, or its answer was lost.
    answer: Option<Message>,
}

/// A result to append to `orders`, keyed by the effect's reply key.
pub type Report = (String, Message);

#[derive(Debug, Default)]
pub struct Executor {
    queue: VecDeque<Job>,
    inflight: Vec<Call>,
}

impl Executor {
    pub fn submit(&mut self, effect: Effect, now_ms: u64) {
        let deadline_ms =
            (effect.kind == EffectKind::Authorize).then_some(now_ms + PAYMENT_DEADLINE_MS);
        self.queue.push_back(Job {
            effect,
            attempt: 1,
            deadline_ms,
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
            let job = self.queue.remove(i).expect("index checked");
            let latency = rng.random_range(1..=MAX_LATENCY_MS);
            let fails_before = outage || rng.random_bool(failure_rate / 2.0);
            let fails_after = rng.random_bool(failure_rate / 2.0);
            let mut done_ms = now_ms + latency;
            let mut answer = match fails_before {
                true => None,
                false => Some(gateway.execute(&job.effect)?),
            };
            if fails_after {
                answer = None;
            }
            // The deadline cuts a slow call short: executed, answer lost.
            if let Some(deadline) = job.deadline_ms.filter(|d| done_ms > *d) {
                done_ms = deadline;
                answer = None;
            }
            self.inflight.push(Call {
                job,
                done_ms,
                answer,
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
            match call.answer {
                Some(body) => reports.push((call.job.effect.reply_key.clone(), body)),
                None => self.retry(call.job, call.done_ms, &mut reports),
            }
        }
        reports
    }

    fn retry(&mut self, mut job: Job, now_ms: u64, reports: &mut Vec<Report>) {
        let delay = backoff(job.attempt);
        let give_up = job
            .deadline_ms
            .is_some_and(|d| job.attempt >= MAX_ATTEMPTS || now_ms + delay >= d);
        if give_up {
            let body = Message::PaymentResult {
                order_id: job.effect.order_id.clone(),
                outcome: PaymentOutcome::Failed {
                    reason: REASON_GATEWAY_UNAVAILABLE.to_owned(),
                },
            };
            reports.push((job.effect.reply_key, body));
            return;
        }
        job.attempt += 1;
        job.not_before_ms = now_ms + delay;
        self.queue.push_back(job);
    }
}

/// `RETRY_BASE_MS × 2^(attempt-1)`, capped; no jitter (sim time is exact).
fn backoff(attempt: u32) -> u64 {
    RETRY_BASE_MS
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(MAX_BACKOFF_MS)
}
