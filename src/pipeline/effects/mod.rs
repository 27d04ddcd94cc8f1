//! The effect executor: runs the processor's effects (payment calls)
//! outside the state machine and appends their results to the log, where
//! the processor applies them in order. A partition never waits for a
//! payment: it goes on with other orders while calls are in flight.
//!
//! Effects are at-least-once (they are re-run after a crash from the
//! processor's outbox); the gateway's idempotency keys make that safe.
//!
//! Reliability rules (the gateway itself is wrapped in a circuit breaker,
//! `crate::gateway::breaker`, and the HTTP client has connect and request
//! timeouts):
//! - Only retryable failures (`GatewayError::Unavailable`: network errors,
//!   timeouts, 429, 5xx, an open circuit) are retried, with exponential
//!   back-off (`gateway.retry_base_ms`, doubling, capped at 5 s) and jitter.
//!   A refusal, a 2xx that does not show what was asked
//!   (`GatewayError::Unexpected`) and refused credentials
//!   (`GatewayError::AuthFailed`, 401/403) are answers: retrying under the
//!   same key and secret cannot change them.
//! - An **authorization** makes at most `gateway.max_attempts` attempts and
//!   must finish within `gateway.payment_deadline_ms` from its start, the
//!   call in flight included (rejections by an open circuit spend no
//!   attempt: the authorization waits, backing off, for the gateway to come
//!   back until its deadline); otherwise its result is
//!   `PaymentOutcome::Failed` with the reason of its last error
//!   (`GatewayError::reason`: `gateway_unavailable`, `gateway_auth_failed`,
//!   `gateway_unexpected_status`, `gateway_amount_mismatch`,
//!   `gateway_currency_mismatch`), and the processor releases the stock
//!   and voids (by order) whatever the gateway may have authorized. Its
//!   log line says "failed after retries" only when it was retried.
//! - A **capture or void** is never given up while the process runs: money
//!   must move as the processor decided. After `max_attempts` failed
//!   attempts (at once on refused credentials) it is parked (holding no
//!   in-flight slot) and tried again after 1 s, 2 s, ... up to 30 s (with
//!   jitter) until it succeeds or ends for good (a refusal or an unexpected
//!   answer). One that ends for good is reported `EffectFailed`: the
//!   processor keeps it in its outbox, marked, not run again until an
//!   operator retries or drops it (`orderflow parked`), and counts it in
//!   `orderflow_effects_failed`. The parked count is the
//!   `orderflow_queue_depth{queue="effects_parked"}` gauge.
//! - **Captures and voids held are bounded** by `gateway.max_parked_effects`
//!   (in flight or parked: each takes its place when the executor takes
//!   it, so the parked ones never exceed the bound). At the bound the
//!   executor takes no new effect from its queue until one of them ends:
//!   the queue fills, runners wait to submit, their backlog grows and
//!   intake sheds new orders (`503 overloaded`). Nothing is dropped: a
//!   capture or void is money the processor decided to move.
//! - **Results reach the log in process**: the reporter retries a failed
//!   append with back-off (10 ms doubling to 5 s) until it succeeds,
//!   holding at most [`MAX_HELD_RESULTS`] results (then effect tasks wait
//!   to hand theirs over, holding their slot, so the executor slows down
//!   instead of growing); the results waiting for a retry are the
//!   `orderflow_queue_depth{queue="effect_results_retrying"}` gauge. Order
//!   per partition is kept, and a result appended twice is harmless: the
//!   processor applies a payment result only to an order awaiting it and
//!   an `EffectDone` only removes its effect from the outbox.
//! - **Results of one partition share records**: what is ready when an
//!   append can start goes out as one [`Message::Results`] record (cut
//!   at [`MAX_RESULTS_PER_RECORD`] results and at `log.max_record_bytes`;
//!   a lone result is a plain record). While one append is in flight the
//!   next results gather, so the busier the partition, the fewer records
//!   per order: the `orders` log carries about one record per order plus
//!   a share of a results record, instead of three.
//! - At shutdown (every runner gone) calls in flight and parked effects
//!   are abandoned, and results the log still refuses after one last
//!   attempt are dropped: they are all still in the checkpointed outbox and
//!   run again at the next start, under the same idempotency keys.
//!
//! The decisions among these rules (retry, park, give up, and after how
//! long) are [`policy::RetryPolicy`], pure and clock-free, which the
//! simulation (`crate::sim`) runs too; this module does the I/O around it:
//! calls, timeouts, sleeps, in-flight slots, metrics and the closing signal.

pub mod policy;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::GatewayConfig;
use crate::domain::message::{KeyedResult, MAX_RESULTS_PER_RECORD};
use crate::domain::{Effect, EffectKind, Message, PaymentOutcome, RecordKind};
use crate::gateway::{AuthorizeOutcome, AuthorizeRequest, GatewayError, PaymentGateway};
use crate::pipeline::log::{Log, LogError, Record, Topic};
use crate::telemetry::metrics::Metrics;

use policy::{Answer, Decision, RetryPolicy, Tries};

/// Reason of `payment_failed` when every attempt failed.
pub use crate::gateway::REASON_GATEWAY_UNAVAILABLE;

/// Effects queued for the executor before runners wait (back-pressure).
pub const EFFECT_QUEUE_DEPTH: usize = 65_536;

#[derive(Clone)]
pub struct EffectSender {
    tx: mpsc::Sender<Effect>,
    depth: prometheus::IntGauge,
    /// Dropped with the last sender: tells an executor waiting for room
    /// (`gateway.max_parked_effects`) that no runner is left.
    _open: Arc<watch::Sender<()>>,
}

impl EffectSender {
    /// Queues an effect, waiting while the queue is full.
    pub async fn submit(&self, effect: Effect) -> Result<(), Effect> {
        let result = self.tx.send(effect).await.map_err(|e| e.0);
        self.depth
            .set((self.tx.max_capacity() - self.tx.capacity()) as i64);
        result
    }
}

struct Executor {
    /// Results on their way to the log (see `spawn_reporter`).
    reports: mpsc::Sender<KeyedResult>,
    gateway: Arc<dyn PaymentGateway>,
    retrier: Retrier,
    inflight: Arc<Semaphore>,
    parked: prometheus::IntGauge,
}

/// A capture's or void's place among the `gateway.max_parked_effects`
/// the executor may hold; released once its result is handed over.
type Place = Option<OwnedSemaphorePermit>;

/// Starts the executor; it stops when every `EffectSender` is dropped, and
/// then abandons what is still in flight (see the module doc). Result
/// records stay within `max_record_bytes` (`log.max_record_bytes`).
pub fn spawn(
    log: Arc<dyn Log>,
    gateway: Arc<dyn PaymentGateway>,
    metrics: Arc<Metrics>,
    config: GatewayConfig,
    max_record_bytes: usize,
) -> (EffectSender, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Effect>(EFFECT_QUEUE_DEPTH);
    let (open, mut senders_gone) = watch::channel(());
    let (closing_tx, closing) = watch::channel(false);
    let inflight = Arc::new(Semaphore::new(config.max_inflight));
    let places = Arc::new(Semaphore::new(config.max_parked_effects));
    let max_parked = config.max_parked_effects;
    let held_full = metrics.effects_held_full.clone();
    let depth = metrics.queue_depth.with_label_values(&["effects"]);
    let parked = metrics.queue_depth.with_label_values(&["effects_parked"]);
    let retrying = metrics
        .queue_depth
        .with_label_values(&["effect_results_retrying"]);
    let (reports, reporter) = spawn_reporter(log, retrying, max_record_bytes);
    let exec = Arc::new(Executor {
        reports,
        gateway,
        retrier: Retrier {
            metrics,
            policy: RetryPolicy::new(&config),
            config,
            closing,
        },
        inflight: inflight.clone(),
        parked,
    });
    let queued = depth.clone();
    let handle = tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        while let Some(effect) = rx.recv().await {
            // Also here, not only on submit: the gauge must fall to zero
            // when the executor drains the queue and nothing new comes.
            queued.set(rx.len() as i64);
            let place = match effect.kind {
                EffectKind::Authorize => None,
                EffectKind::Capture | EffectKind::Void => {
                    match places.clone().try_acquire_owned() {
                        Ok(place) => Some(place),
                        Err(_) => {
                            held_full.inc();
                            tracing::warn!(
                                max_parked_effects = max_parked,
                                order_id = %effect.order_id,
                                op = effect.kind.as_str(),
                                "effect executor full: it holds gateway.max_parked_effects captures and voids (in flight or parked); it takes no new effect until one of them ends"
                            );
                            tokio::select! {
                                place = places.clone().acquire_owned() => Some(place.expect("semaphore never closed")),
                                // Every runner is gone: what is queued stays in the outboxes.
                                _ = senders_gone.changed() => break,
                            }
                        }
                    }
                }
            };
            let permit = inflight
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let exec = exec.clone();
            tasks.spawn(async move {
                exec.run(effect, permit, place).await;
            });
            while tasks.try_join_next().is_some() {}
        }
        closing_tx.send_replace(true);
        while tasks.join_next().await.is_some() {}
        // The last sender of results goes with the executor; the reporter
        // then appends what is queued and ends, before the log is closed.
        drop(exec);
        let _ = reporter.await;
    });
    let sender = EffectSender {
        tx,
        depth,
        _open: Arc::new(open),
    };
    (sender, handle)
}

/// Results waiting for the reporter before effect tasks wait (back-pressure).
pub const REPORT_QUEUE_DEPTH: usize = 65_536;
/// Most results appended at once to one partition.
const REPORT_BATCH_MAX: usize = 4_096;
/// Results the reporter holds (waiting for an append, or for a retry of
/// one that failed) before it takes no more and effect tasks wait.
pub const MAX_HELD_RESULTS: usize = 65_536;
/// First wait before a failed append of results is tried again; it
/// doubles with each failure up to [`REPORT_RETRY_MAX_MS`].
pub const REPORT_RETRY_FIRST_MS: u64 = 10;
pub const REPORT_RETRY_MAX_MS: u64 = 5_000;

/// Appends effect results in batches: everything waiting for a partition
/// in one append, and in as few records as fit ([`result_records`]),
/// partitions independently. One append per result made the orders log
/// do an append (and its wake-ups) per payment call: the benchmark showed
/// 2 appends per order this way. A failed append is retried in process
/// with back-off (module doc); until then the order would sit `reserved`,
/// as the outbox re-runs effects only at a restart.
fn spawn_reporter(
    log: Arc<dyn Log>,
    retrying: prometheus::IntGauge,
    max_record_bytes: usize,
) -> (mpsc::Sender<KeyedResult>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<KeyedResult>(REPORT_QUEUE_DEPTH);
    let reporter = Reporter {
        partitions: log.partition_count(Topic::Orders),
        log,
        lanes: BTreeMap::new(),
        held: 0,
        retrying,
        max_record_bytes,
    };
    (tx, tokio::spawn(reporter.run(rx)))
}

/// The records that carry `results` of one partition, in order: one
/// [`Message::Results`] record for up to [`MAX_RESULTS_PER_RECORD`] of
/// them, split further while a record would exceed `max_bytes` (key and
/// value, as the log counts it); a lone result is a plain record of its
/// own. The simulation appends its results through this too.
pub fn result_records(results: &[KeyedResult], max_bytes: usize) -> Vec<Record> {
    let mut records = Vec::new();
    for chunk in results.chunks(MAX_RESULTS_PER_RECORD) {
        push_fitting(chunk, max_bytes, &mut records);
    }
    records
}

fn push_fitting(results: &[KeyedResult], max_bytes: usize, records: &mut Vec<Record>) {
    let (key, value) = KeyedResult::record(results);
    let record = Record {
        kind: RecordKind::Internal,
        key: key.as_bytes().to_vec(),
        value,
    };
    if results.len() > 1 && record.key.len() + record.value.len() > max_bytes {
        let (first, second) = results.split_at(results.len() / 2);
        push_fitting(first, max_bytes, records);
        push_fitting(second, max_bytes, records);
        return;
    }
    records.push(record);
}

/// The results of one `orders` partition on their way to the log, in order.
struct Lane {
    results: VecDeque<KeyedResult>,
    /// An append of the first results is in flight (they are out of
    /// `results` meanwhile).
    in_flight: usize,
    /// Appends failed in a row.
    failures: u32,
    /// When the next attempt may start after a failure.
    retry_at: Option<Instant>,
    /// The wait after the next failure.
    delay_ms: u64,
}

impl Lane {
    fn new() -> Lane {
        Lane {
            results: VecDeque::new(),
            in_flight: 0,
            failures: 0,
            retry_at: None,
            delay_ms: REPORT_RETRY_FIRST_MS,
        }
    }

    /// Whether an append may start now (`closing`: without waiting out a
    /// back-off, for the last attempt).
    fn ready(&self, now: Instant, closing: bool) -> bool {
        self.in_flight == 0
            && !self.results.is_empty()
            && (closing || self.retry_at.is_none_or(|at| at <= now))
    }
}

type AppendDone = (u32, Vec<KeyedResult>, Result<u64, LogError>);

struct Reporter {
    log: Arc<dyn Log>,
    partitions: u32,
    lanes: BTreeMap<u32, Lane>,
    /// Results in the lanes and in flight (at most [`MAX_HELD_RESULTS`]).
    held: usize,
    /// `orderflow_queue_depth{queue="effect_results_retrying"}`.
    retrying: prometheus::IntGauge,
    max_record_bytes: usize,
}

impl Reporter {
    async fn run(mut self, mut rx: mpsc::Receiver<KeyedResult>) {
        let mut appends = FuturesUnordered::new();
        let mut batch = Vec::with_capacity(REPORT_BATCH_MAX);
        let mut open = true;
        loop {
            let now = Instant::now();
            for (&p, lane) in self.lanes.iter_mut() {
                if lane.ready(now, !open) {
                    let n = lane.results.len().min(REPORT_BATCH_MAX);
                    let chunk: Vec<KeyedResult> = lane.results.drain(..n).collect();
                    lane.in_flight = n;
                    let records = result_records(&chunk, self.max_record_bytes);
                    let log = self.log.clone();
                    appends.push(async move {
                        let result = log.append(Topic::Orders, p, records).await;
                        (p, chunk, result)
                    });
                }
            }
            self.publish();
            if !open && appends.is_empty() {
                debug_assert_eq!(self.held, 0, "the last attempt settles every lane");
                return;
            }
            let next_retry = self
                .lanes
                .values()
                .filter(|l| l.in_flight == 0 && !l.results.is_empty())
                .filter_map(|l| l.retry_at)
                .min();
            let room = MAX_HELD_RESULTS.saturating_sub(self.held);
            tokio::select! {
                Some(done) = appends.next(), if !appends.is_empty() => self.settle(done, !open),
                n = rx.recv_many(&mut batch, room.min(REPORT_BATCH_MAX)), if open && room > 0 => {
                    if n == 0 {
                        open = false;
                    }
                    for result in batch.drain(..) {
                        let p = crate::domain::partition::partition_for_key(result.key.as_bytes(), self.partitions);
                        self.lanes.entry(p).or_insert_with(Lane::new).results.push_back(result);
                        self.held += 1;
                    }
                }
                _ = tokio::time::sleep_until(next_retry.unwrap_or(now)), if next_retry.is_some() => {}
            }
        }
    }

    /// Takes the outcome of an append: done, or back in its lane for a
    /// retry after a back-off, or dropped when retrying cannot help (or the
    /// executor is closing): the effects are still in the outbox.
    fn settle(&mut self, (p, chunk, result): AppendDone, closing: bool) {
        let lane = self.lanes.get_mut(&p).expect("a lane with an append");
        lane.in_flight = 0;
        let n = chunk.len();
        let error = match result {
            Ok(_) => {
                if lane.failures > 0 {
                    tracing::info!(
                        partition = p,
                        failed_appends = lane.failures,
                        "effect results appended after failed attempts"
                    );
                }
                lane.failures = 0;
                lane.retry_at = None;
                lane.delay_ms = REPORT_RETRY_FIRST_MS;
                self.held -= n;
                return;
            }
            Err(e) => e,
        };
        let hopeless = matches!(
            error,
            LogError::RecordTooLarge { .. } | LogError::NoSuchPartition { .. }
        );
        if hopeless || closing {
            tracing::error!(partition = p, results = n, error = %error, "cannot log effect results; they are re-run after restart");
            self.held -= n;
            return;
        }
        lane.failures += 1;
        let delay_ms = lane.delay_ms;
        lane.retry_at = Some(Instant::now() + Duration::from_millis(delay_ms));
        lane.delay_ms = (delay_ms * 2).min(REPORT_RETRY_MAX_MS);
        if lane.failures == 1 {
            tracing::warn!(partition = p, results = n, error = %error, retry_in_ms = delay_ms, "effect results: append failed; retrying until the log takes writes again");
        } else {
            tracing::debug!(partition = p, results = n, error = %error, failed_appends = lane.failures, retry_in_ms = delay_ms, "cannot log effect results; retrying");
        }
        for result in chunk.into_iter().rev() {
            lane.results.push_front(result);
        }
    }

    /// Publishes how many results wait for a retry.
    fn publish(&self) {
        let waiting: usize = self
            .lanes
            .values()
            .filter(|l| l.failures > 0)
            .map(|l| l.results.len() + l.in_flight)
            .sum();
        self.retrying.set(waiting as i64);
    }
}

/// How a retried call ended.
#[derive(Debug, PartialEq, Eq)]
enum Attempted<T> {
    /// The last answer: the policy decided `Done` or `GiveUp`.
    Answered(Result<T, GatewayError>),
    /// A capture or void spent its round on `error`; it waits `wait`
    /// before the next round.
    Parked { error: GatewayError, wait: Duration },
    /// The executor is closing: the effect stays in the outbox.
    Closing,
}

/// The retry policy's clock for one effect: milliseconds since its first
/// attempt, rounded up, so a deadline check errs early, never late.
#[derive(Clone, Copy, Debug)]
struct Since(Instant);

impl Since {
    fn now() -> Since {
        Since(Instant::now())
    }

    fn ms(self) -> u64 {
        self.0.elapsed().as_nanos().div_ceil(1_000_000) as u64
    }

    fn at(self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

/// Calls, timeouts, back-off sleeps and the closing signal around the
/// retry policy, apart from the log so it can be tested alone.
struct Retrier {
    metrics: Arc<Metrics>,
    config: GatewayConfig,
    policy: RetryPolicy,
    closing: watch::Receiver<bool>,
}

impl Retrier {
    /// Calls `f` until the policy stops or parks `tries` (one round),
    /// sleeping the back-offs it asks for; the call in flight is cut at the
    /// authorization's deadline. `since` is the clock `tries` started on.
    async fn attempts<T, F, Fut>(&self, tries: &mut Tries, since: Since, mut f: F) -> Attempted<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, GatewayError>>,
    {
        let op = tries.kind().as_str();
        let deadline = tries.deadline_ms().map(|ms| since.at(ms));
        let mut closing = self.closing.clone();
        loop {
            let started = Instant::now();
            let call = f();
            let result = tokio::select! {
                biased;
                _ = closing.wait_for(|c| *c) => return Attempted::Closing,
                r = async {
                    match deadline {
                        Some(d) => tokio::time::timeout_at(d, call).await.unwrap_or_else(|_| {
                            Err(GatewayError::Unavailable(format!(
                                "payment deadline of {} ms passed",
                                self.config.payment_deadline_ms
                            )))
                        }),
                        None => call.await,
                    }
                } => r,
            };
            let answer = Answer::of(&result);
            if answer != Answer::CircuitOpen {
                self.metrics
                    .gateway_latency
                    .with_label_values(&[op])
                    .observe(started.elapsed().as_secs_f64());
            }
            self.metrics
                .gateway_calls
                .with_label_values(&[op, answer.label()])
                .inc();
            let jitter = rand::rng().random();
            let (delay_ms, error) = match (
                self.policy.decide(tries, answer, since.ms(), jitter),
                result,
            ) {
                (Decision::RetryAfter { delay_ms }, Err(e)) => (delay_ms, e),
                (Decision::Park { delay_ms }, Err(error)) => {
                    let wait = Duration::from_millis(delay_ms);
                    return Attempted::Parked { error, wait };
                }
                (Decision::Done | Decision::GiveUp, result) => return Attempted::Answered(result),
                (decision, Ok(_)) => unreachable!("{decision:?} after a success"),
            };
            tracing::debug!(op, attempt = tries.spent(), delay_ms, %error, "gateway call failed; retrying");
            tokio::select! {
                biased;
                _ = closing.wait_for(|c| *c) => return Attempted::Closing,
                _ = tokio::time::sleep(Duration::from_millis(delay_ms)) => {}
            }
        }
    }

    /// Sleeps `d` unless the executor closes first (then `false`).
    async fn pause(&self, d: Duration) -> bool {
        let mut closing = self.closing.clone();
        tokio::select! {
            biased;
            _ = closing.wait_for(|c| *c) => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// How a capture or void ended.
enum Settled {
    Done,
    /// Refused for good, or answered unexpectedly: retrying cannot help.
    Failed {
        reason: &'static str,
    },
    /// The executor closes (shutdown): the outbox runs it at the next start.
    Closing,
}

/// Why a capture or void failed when the gateway refused it.
pub const REASON_GATEWAY_REFUSED: &str = "gateway_refused";

impl Executor {
    /// Runs one effect and hands its result to the reporter. The in-flight
    /// slot of an authorization, and the place of a capture or void, are
    /// held until the result is handed over: while the log refuses results,
    /// the executor slows down instead of piling up finished tasks.
    async fn run(&self, effect: Effect, permit: OwnedSemaphorePermit, place: Place) {
        let (body, slot) = match effect.kind {
            EffectKind::Authorize => {
                let outcome = self.authorize(&effect).await;
                let body = outcome.map(|outcome| Message::PaymentResult {
                    order_id: effect.order_id.clone(),
                    outcome,
                });
                (body, Some(permit))
            }
            EffectKind::Capture | EffectKind::Void => {
                let (order_id, kind) = (effect.order_id.clone(), effect.kind);
                let body = match self.settle(&effect, permit).await {
                    Settled::Done => Some(Message::EffectDone { order_id, kind }),
                    Settled::Failed { reason } => Some(Message::EffectFailed {
                        order_id,
                        kind,
                        reason: reason.to_owned(),
                    }),
                    Settled::Closing => None,
                };
                (body, None)
            }
        };
        if let Some(body) = body {
            self.report(&effect.reply_key, body).await;
        }
        drop((slot, place));
    }

    /// The authorization's outcome, or `None` when abandoned at shutdown.
    async fn authorize(&self, effect: &Effect) -> Option<PaymentOutcome> {
        let req = AuthorizeRequest {
            order_id: effect.order_id.clone(),
            amount: effect.amount,
            currency: effect.currency.clone(),
            token: effect.token.clone(),
            idempotency_key: effect.idempotency_key(),
        };
        let since = Since::now();
        let mut tries = self.retrier.policy.start(EffectKind::Authorize, 0);
        let answered = self
            .retrier
            .attempts(&mut tries, since, || self.gateway.authorize(&req))
            .await;
        authorization_outcome(&effect.order_id, answered, tries.answers())
    }

    /// Capture or void, retried (parked between rounds) until it is done
    /// or refused for good (retrying cannot help: it is reported failed,
    /// and waits in the processor's outbox for an operator), or the
    /// executor closes first.
    async fn settle(&self, effect: &Effect, permit: OwnedSemaphorePermit) -> Settled {
        let key = effect.idempotency_key();
        let op = effect.kind.as_str();
        let mut permit = Some(permit);
        let since = Since::now();
        let mut tries = self.retrier.policy.start(effect.kind, 0);
        loop {
            let slot = match permit.take() {
                Some(p) => p,
                None => {
                    let mut closing = self.retrier.closing.clone();
                    tokio::select! {
                        biased;
                        _ = closing.wait_for(|c| *c) => return Settled::Closing,
                        p = self.inflight.clone().acquire_owned() => p.expect("semaphore never closed"),
                    }
                }
            };
            let answered = match effect.kind {
                EffectKind::Capture => {
                    self.retrier
                        .attempts(&mut tries, since, || {
                            self.gateway
                                .capture(&effect.payment_id, effect.amount, &key)
                        })
                        .await
                }
                _ => {
                    self.retrier
                        .attempts(&mut tries, since, || {
                            self.gateway
                                .void(&effect.order_id, &effect.payment_id, &key)
                        })
                        .await
                }
            };
            drop(slot);
            match answered {
                Attempted::Closing => return Settled::Closing,
                Attempted::Answered(Ok(())) => return Settled::Done,
                Attempted::Answered(Err(e)) => {
                    // The policy ends a capture or void only on a refusal
                    // or an unexpected answer: retrying cannot help.
                    let reason = match e {
                        GatewayError::Refused(_) => REASON_GATEWAY_REFUSED,
                        _ => e.reason(),
                    };
                    let answers = tries.answers();
                    tracing::error!(order_id = %effect.order_id, op, reason, error = %e, answers, "gateway call failed for good; the effect waits for an operator (`orderflow parked list`)");
                    return Settled::Failed { reason };
                }
                Attempted::Parked {
                    error: e @ GatewayError::AuthFailed(_),
                    wait,
                } => {
                    tracing::error!(order_id = %effect.order_id, op, reason = e.reason(), error = %e, retry_in_ms = wait.as_millis() as u64, "gateway call failed: credentials refused; parked, will retry");
                    if !self.park(wait).await {
                        return Settled::Closing;
                    }
                }
                Attempted::Parked { error: e, wait } => {
                    tracing::warn!(order_id = %effect.order_id, op, error = %e, retry_in_ms = wait.as_millis() as u64, "gateway unavailable; parked, will retry");
                    if !self.park(wait).await {
                        return Settled::Closing;
                    }
                }
            }
        }
    }

    /// Waits out a park, counted in the parked gauge; false when the
    /// executor closes first.
    async fn park(&self, wait: Duration) -> bool {
        self.parked.inc();
        let go_on = self.retrier.pause(wait).await;
        self.parked.dec();
        go_on
    }

    /// Hands a result to the reporter, which appends it to the home
    /// partition (retrying while the log refuses it). Abandoned only when
    /// the executor closes while the reporter is full: the effect is still
    /// in the outbox.
    async fn report(&self, reply_key: &str, body: Message) {
        let result = KeyedResult {
            key: reply_key.to_owned(),
            body,
        };
        let mut closing = self.retrier.closing.clone();
        let sent = tokio::select! {
            biased;
            sent = self.reports.send(result) => sent.is_ok(),
            _ = closing.wait_for(|c| *c) => false,
        };
        if !sent {
            tracing::error!(
                "the effect reporter is full or stopped at shutdown; the result is re-run after restart"
            );
        }
    }
}

/// Maps the authorization's last answer (after `answers` answers in all);
/// `None` when abandoned.
fn authorization_outcome(
    order_id: &str,
    answered: Attempted<AuthorizeOutcome>,
    answers: u32,
) -> Option<PaymentOutcome> {
    match answered {
        Attempted::Closing => None,
        Attempted::Answered(Ok(AuthorizeOutcome::Authorized { payment_id })) => {
            Some(PaymentOutcome::Authorized { payment_id })
        }
        Attempted::Answered(Ok(AuthorizeOutcome::Declined { code })) => {
            Some(PaymentOutcome::Declined { code })
        }
        // An authorization never parks (the policy gives up instead).
        Attempted::Answered(Err(e)) | Attempted::Parked { error: e, .. } => {
            let reason = e.reason();
            // Only an outage is worth less than an error: the others mean
            // the gateway answered what orderflow cannot take.
            let outage = e.is_retryable();
            match (outage, answers > 1) {
                (true, true) => {
                    tracing::warn!(order_id = %order_id, reason, error = %e, answers, "authorization failed after retries")
                }
                (true, false) => {
                    tracing::warn!(order_id = %order_id, reason, error = %e, "authorization failed")
                }
                (false, true) => {
                    tracing::error!(order_id = %order_id, reason, error = %e, answers, "authorization failed after retries")
                }
                (false, false) => {
                    tracing::error!(order_id = %order_id, reason, error = %e, "authorization failed")
                }
            }
            Some(PaymentOutcome::Failed {
                reason: reason.to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Envelope;
    use crate::pipeline::log::memory::{MemoryLog, Refusal};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn retrier(max_attempts: u32, deadline_ms: u64) -> (Retrier, watch::Sender<bool>) {
        let (tx, closing) = watch::channel(false);
        let config = GatewayConfig {
            max_attempts,
            retry_base_ms: 100,
            payment_deadline_ms: deadline_ms,
            ..GatewayConfig::default()
        };
        (
            Retrier {
                metrics: Arc::new(Metrics::new()),
                policy: RetryPolicy::new(&config),
                config,
                closing,
            },
            tx,
        )
    }

    impl Retrier {
        /// One round of a fresh effect of `kind`.
        async fn first_round<T, F, Fut>(&self, kind: EffectKind, f: F) -> Attempted<T>
        where
            F: FnMut() -> Fut,
            Fut: std::future::Future<Output = Result<T, GatewayError>>,
        {
            let mut tries = self.policy.start(kind, 0);
            self.attempts(&mut tries, Since::now(), f).await
        }
    }

    /// Retryable failures are retried up to `max_attempts`, refusals never,
    /// and a success after failures is returned.
    #[tokio::test(start_paused = true)]
    async fn retries_only_retryable_and_bounded() {
        let (r, _tx) = retrier(4, 60_000);
        let calls = AtomicU32::new(0);
        let got: Attempted<()> = r
            .first_round(EffectKind::Authorize, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(GatewayError::Unavailable("503".into()))
            })
            .await;
        assert!(matches!(
            got,
            Attempted::Answered(Err(GatewayError::Unavailable(_)))
        ));
        assert_eq!(calls.swap(0, Ordering::SeqCst), 4);

        let got: Attempted<()> = r
            .first_round(EffectKind::Authorize, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(GatewayError::Refused("400".into()))
            })
            .await;
        assert!(matches!(
            got,
            Attempted::Answered(Err(GatewayError::Refused(_)))
        ));
        assert_eq!(calls.swap(0, Ordering::SeqCst), 1);

        let got = r
            .first_round(EffectKind::Authorize, || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(GatewayError::Unavailable("reset".into()))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(got, Attempted::Answered(Ok(7)));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// An authorization that cannot finish before the deadline (a call
    /// that hangs) ends `payment_failed` / `gateway_unavailable` at the
    /// deadline, whatever `max_attempts` allows.
    #[tokio::test(start_paused = true)]
    async fn deadline_bounds_total_time() {
        let (r, _tx) = retrier(100, 2_000);
        let start = Instant::now();
        let got: Attempted<AuthorizeOutcome> = r
            .first_round(EffectKind::Authorize, || async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(AuthorizeOutcome::Declined { code: "x".into() })
            })
            .await;
        assert_eq!(start.elapsed(), Duration::from_millis(2_000));
        assert_eq!(
            authorization_outcome("o1", got, 1),
            Some(PaymentOutcome::Failed {
                reason: REASON_GATEWAY_UNAVAILABLE.into()
            })
        );
        // Fast failures stop before a back-off would cross the deadline.
        let calls = AtomicU32::new(0);
        let start = Instant::now();
        let got: Attempted<()> = r
            .first_round(EffectKind::Authorize, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(GatewayError::Unavailable("503".into()))
            })
            .await;
        assert!(matches!(got, Attempted::Answered(Err(_))));
        assert!(start.elapsed() < Duration::from_millis(2_000));
        assert!(calls.load(Ordering::SeqCst) < 100);
    }

    /// A capture that spends its round parks for 1 s plus at most a quarter, keeping the last error.
    #[tokio::test(start_paused = true)]
    async fn capture_parks_after_its_round() {
        let (r, _tx) = retrier(3, 60_000);
        let calls = AtomicU32::new(0);
        let got: Attempted<()> = r
            .first_round(EffectKind::Capture, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(GatewayError::Unavailable("503".into()))
            })
            .await;
        let Attempted::Parked { error, wait } = got else {
            panic!("{got:?}")
        };
        assert_eq!(error, GatewayError::Unavailable("503".into()));
        assert!((1_000..=1_250).contains(&wait.as_millis()), "{wait:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// An executor over the in-process simulator, with default settings.
    fn with_simulator(
        log: Arc<MemoryLog>,
        metrics: Arc<Metrics>,
    ) -> (EffectSender, tokio::task::JoinHandle<()>) {
        let config = GatewayConfig::default();
        let gateway = Arc::new(crate::gateway::simulator::Simulator::new(&config));
        spawn(log, gateway, metrics, config, TEST_MAX_RECORD_BYTES)
    }

    const TEST_MAX_RECORD_BYTES: usize = 1 << 20;

    /// The results the log took so far, in order (those of a results
    /// record one by one).
    fn messages(log: &MemoryLog) -> Vec<Message> {
        bodies(&log.records())
    }

    fn bodies(records: &[(u32, Record)]) -> Vec<Message> {
        records
            .iter()
            .flat_map(|(_, r)| match Envelope::decode(&r.value).unwrap().body {
                Message::Results { results } => results.into_iter().map(|r| r.body).collect(),
                one => vec![one],
            })
            .collect()
    }

    /// Waits until the log holds `n` results.
    async fn holds_results(log: &MemoryLog, n: usize) {
        log.until(|records| bodies(records).len() >= n).await;
    }

    fn effect(order: &str, kind: EffectKind) -> Effect {
        Effect {
            order_id: order.into(),
            kind,
            reply_key: format!("SKU-{order}"),
            amount: 100,
            currency: "USD".into(),
            token: if kind == EffectKind::Authorize {
                "tok_visa".into()
            } else {
                String::new()
            },
            payment_id: if kind == EffectKind::Capture {
                format!("pi_{order}")
            } else {
                String::new()
            },
        }
    }

    /// Results of a partition become one record, cut at
    /// `MAX_RESULTS_PER_RECORD` results and at the byte limit; a lone
    /// result is a plain record; nothing is lost or reordered.
    #[test]
    fn result_records_fit_the_limits() {
        let results: Vec<KeyedResult> = (0..3 * MAX_RESULTS_PER_RECORD + 10)
            .map(|n| KeyedResult {
                key: format!("SKU-{}", n % 7),
                body: Message::EffectDone {
                    order_id: format!("order-{n}"),
                    kind: EffectKind::Capture,
                },
            })
            .collect();
        let bodies =
            |records: Vec<Record>| bodies(&records.into_iter().map(|r| (0, r)).collect::<Vec<_>>());
        let all: Vec<Message> = results.iter().map(|r| r.body.clone()).collect();
        let roomy = result_records(&results, 1 << 20);
        assert_eq!(roomy.len(), 4, "cut at the count");
        assert_eq!(bodies(roomy), all);
        let tight = result_records(&results, 256);
        assert!(tight.len() > 8, "{} records", tight.len());
        assert!(tight.iter().all(|r| r.key.len() + r.value.len() <= 256));
        assert_eq!(bodies(tight), all);
        let one = result_records(&results[..1], 1024);
        assert_eq!(one[0].key, b"SKU-0");
        assert_eq!(Envelope::decode(&one[0].value).unwrap().body, all[0]);
    }

    /// A payment result whose append fails is appended in process once the
    /// log takes writes again, with no restart; meanwhile it is counted as
    /// waiting for a retry, and the retries back off, doubling from 10 ms
    /// up to 5 s.
    #[tokio::test(start_paused = true)]
    async fn results_reach_the_log_without_restart() {
        let log = Arc::new(MemoryLog::new(4));
        log.refuse(Some(Refusal::Unavailable));
        let metrics = Arc::new(Metrics::new());
        let (tx, executor) = with_simulator(log.clone(), metrics.clone());
        let waiting = metrics
            .queue_depth
            .with_label_values(&["effect_results_retrying"]);
        tx.submit(effect("o1", EffectKind::Authorize))
            .await
            .unwrap();
        // 10, 20, ... 2 560 ms, then the 5 s cap twice.
        let want_ms = [10, 20, 40, 80, 160, 320, 640, 1_280, 2_560, 5_000, 5_000];
        log.refused(want_ms.len() + 1).await;
        assert_eq!(waiting.get(), 1, "counted while it waits");
        let at = log.refused_at.lock().unwrap().clone();
        let waits_ms: Vec<u128> = at.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
        assert_eq!(waits_ms[..want_ms.len()], want_ms, "{waits_ms:?}");
        assert!(messages(&log).is_empty());

        log.refuse(None);
        holds_results(&log, 1).await;
        let [Message::PaymentResult { order_id, outcome }] = &messages(&log)[..] else {
            panic!("{:?}", messages(&log))
        };
        assert_eq!(order_id, "o1");
        assert!(
            matches!(outcome, PaymentOutcome::Authorized { .. }),
            "{outcome:?}"
        );
        drop(tx);
        executor.await.unwrap();
        assert_eq!(waiting.get(), 0, "nothing waiting once appended");
        assert_eq!(messages(&log).len(), 1, "appended once");
    }

    /// The queue gauge falls back to zero once the executor has taken what was queued.
    #[tokio::test(start_paused = true)]
    async fn queue_gauge_is_current_when_idle() {
        let log = Arc::new(MemoryLog::new(4));
        let metrics = Arc::new(Metrics::new());
        let (tx, executor) = with_simulator(log.clone(), metrics.clone());
        let depth = metrics.queue_depth.with_label_values(&["effects"]);
        for id in ["o1", "o2"] {
            tx.submit(effect(id, EffectKind::Authorize)).await.unwrap();
        }
        assert_eq!(depth.get(), 2, "both queued before the executor ran");
        holds_results(&log, 2).await;
        assert_eq!(depth.get(), 0, "nothing queued any more");
        drop(tx);
        executor.await.unwrap();
    }

    /// Results still refused when the executor closes get one last attempt
    /// and are dropped (they are in the outbox), so shutdown never hangs on
    /// a log that refuses everything.
    #[tokio::test(start_paused = true)]
    async fn closing_drops_results_the_log_refuses() {
        let log = Arc::new(MemoryLog::new(4));
        log.refuse(Some(Refusal::Unavailable));
        let (tx, executor) = with_simulator(log.clone(), Arc::new(Metrics::new()));
        tx.submit(effect("o1", EffectKind::Authorize))
            .await
            .unwrap();
        log.refused(1).await;
        let before = *log.refusals.borrow();
        drop(tx);
        executor.await.unwrap();
        assert_eq!(*log.refusals.borrow(), before + 1, "one last attempt");
        assert!(messages(&log).is_empty());
    }

    /// Captures fail (unavailable) while `down`; every call is noted by
    /// idempotency key, and counted in a watch to wait on.
    #[derive(Default)]
    struct DownForCaptures {
        down: std::sync::atomic::AtomicBool,
        calls: std::sync::Mutex<Vec<String>>,
        count: watch::Sender<usize>,
    }

    #[async_trait::async_trait]
    impl PaymentGateway for DownForCaptures {
        async fn authorize(
            &self,
            req: &AuthorizeRequest,
        ) -> Result<AuthorizeOutcome, GatewayError> {
            self.note(&req.idempotency_key);
            Ok(AuthorizeOutcome::Authorized {
                payment_id: format!("pi_{}", req.order_id),
            })
        }
        async fn capture(&self, _: &str, _: u64, key: &str) -> Result<(), GatewayError> {
            self.note(key);
            if self.down.load(Ordering::SeqCst) {
                return Err(GatewayError::Unavailable("503".into()));
            }
            Ok(())
        }
        async fn void(&self, _: &str, _: &str, key: &str) -> Result<(), GatewayError> {
            self.note(key);
            Ok(())
        }
    }

    impl DownForCaptures {
        fn note(&self, key: &str) {
            self.calls.lock().unwrap().push(key.to_owned());
            self.count.send_modify(|n| *n += 1);
        }

        fn calls_of(&self, key: &str) -> usize {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|k| *k == key)
                .count()
        }

        /// Waits until `key` was called `n` times.
        async fn called(&self, key: &str, n: usize) {
            let mut rx = self.count.subscribe();
            rx.wait_for(|_| self.calls_of(key) >= n).await.unwrap();
        }
    }

    /// At `max_parked_effects` captures held (parked during an outage) the
    /// executor takes no new effect and counts that it is full: the third
    /// capture and the authorization behind it wait through several park
    /// rounds, nothing is dropped, and all of them run once the gateway is
    /// back.
    #[tokio::test(start_paused = true)]
    async fn parked_captures_are_bounded_by_back_pressure() {
        let log = Arc::new(MemoryLog::new(4));
        let gateway = Arc::new(DownForCaptures::default());
        gateway.down.store(true, Ordering::SeqCst);
        let metrics = Arc::new(Metrics::new());
        let config = GatewayConfig {
            max_attempts: 1,
            max_parked_effects: 2,
            ..GatewayConfig::default()
        };
        let (tx, executor) = spawn(
            log.clone(),
            gateway.clone(),
            metrics.clone(),
            config,
            TEST_MAX_RECORD_BYTES,
        );
        let parked = metrics.queue_depth.with_label_values(&["effects_parked"]);
        for order in ["c1", "c2", "c3"] {
            tx.submit(effect(order, EffectKind::Capture)).await.unwrap();
        }
        tx.submit(effect("a4", EffectKind::Authorize))
            .await
            .unwrap();
        // Four rounds each, parked in between: the executor had all that
        // time to take the third capture, and did not.
        gateway.called("c1:capture", 4).await;
        gateway.called("c2:capture", 4).await;
        assert_eq!(gateway.calls_of("c3:capture"), 0, "no third capture held");
        assert_eq!(
            gateway.calls_of("a4:authorize"),
            0,
            "nor anything behind it"
        );
        assert_eq!(metrics.effects_held_full.get(), 1, "full, once");
        assert!(messages(&log).is_empty());

        gateway.down.store(false, Ordering::SeqCst);
        holds_results(&log, 4).await;
        let mut done: Vec<String> = messages(&log)
            .iter()
            .map(|m| match m {
                Message::EffectDone { order_id, kind } => format!("{order_id}:{}", kind.as_str()),
                Message::PaymentResult { order_id, .. } => format!("{order_id}:result"),
                other => panic!("{other:?}"),
            })
            .collect();
        done.sort();
        assert_eq!(
            done,
            ["a4:result", "c1:capture", "c2:capture", "c3:capture"]
        );
        assert_eq!(parked.get(), 0);
        drop(tx);
        executor.await.unwrap();
    }

    /// An executor waiting for room among its parked captures still ends
    /// when every runner is gone (shutdown never hangs on an outage).
    #[tokio::test(start_paused = true)]
    async fn waiting_for_room_ends_with_the_runners() {
        let gateway = Arc::new(DownForCaptures::default());
        gateway.down.store(true, Ordering::SeqCst);
        let config = GatewayConfig {
            max_attempts: 1,
            max_parked_effects: 1,
            ..GatewayConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let (tx, executor) = spawn(
            Arc::new(MemoryLog::new(4)),
            gateway.clone(),
            metrics.clone(),
            config,
            TEST_MAX_RECORD_BYTES,
        );
        tx.submit(effect("c1", EffectKind::Capture)).await.unwrap();
        tx.submit(effect("c2", EffectKind::Capture)).await.unwrap();
        // A second call comes after a park, by which time the executor
        // has taken c2 and found no room.
        gateway.called("c1:capture", 2).await;
        assert_eq!(metrics.effects_held_full.get(), 1);
        drop(tx);
        executor.await.unwrap();
        assert_eq!(gateway.calls_of("c2:capture"), 0);
    }
    /// Closing abandons a call in flight and a back-off alike.
    #[tokio::test(start_paused = true)]
    async fn closing_abandons() {
        let (r, tx) = retrier(4, 60_000);
        let closer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send_replace(true);
        });
        let got: Attempted<()> = r
            .first_round(EffectKind::Capture, || async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(())
            })
            .await;
        assert_eq!(got, Attempted::Closing);
        closer.await.unwrap();
        assert!(!r.pause(Duration::from_secs(10)).await);
    }
}
