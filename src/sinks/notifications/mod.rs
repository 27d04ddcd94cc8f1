//! The notifications sink: a consumer of `order-status` that tells the
//! outside world about status changes, through signed webhooks
//! ([`webhook`]) and SMTP email ([`email`]).
//!
//! One task per `order-status` partition, like the tracking sink. Every
//! event is matched against the *targets* (each webhook endpoint, and
//! email); each (target, event) it wants is a *delivery*.
//!
//! Ordering: the deliveries of one order to one target form a chain that
//! runs one at a time in `seq` order (all events of an order are in one
//! partition), retries included: seq 3 is not sent before seq 2 is
//! delivered or given up. Different orders go in parallel, at most
//! `max_in_flight` per target.
//!
//! Retries: exponential backoff with jitter, bounded by `max_attempts` and
//! `retry_total_ms`; a delivery that runs out, or that the target refuses
//! for good (a 4xx, an SMTP 5xx), is given up: logged, counted, and treated
//! as settled so the chain goes on.
//!
//! Effectively once, across restarts and SIGKILL:
//! - The store keeps, per (target, order), the highest settled seq, and the
//!   sink's position per partition. Both are written in one transaction
//!   right after deliveries are acknowledged (all those acknowledged since
//!   the last write).
//! - The position only moves up to the first event with an unsettled
//!   delivery; a restart reads on from there and skips every (target,
//!   event) the store has as settled (and duplicated status events, by
//!   `(order_id, seq)`).
//! - A delivery's in-flight slot is freed only after its record is
//!   durable. So what a crash can repeat — acknowledged by the receiver but
//!   not yet recorded — is at most `max_in_flight` deliveries per target
//!   (email: per batch too). Every repeat carries the same
//!   `Orderflow-Event-Id` (and email `Message-ID`) for receivers to dedupe.
//!
//! Emails need the order's contact email, which status events do not
//! carry: intake stores it (`StateStore::put_contact`) for orders placed
//! over HTTP. Orders produced straight to the log have none and get
//! webhooks only.
//!
//! Shutdown: no new deliveries start; the attempts in flight finish (at
//! most `timeout_ms`), what was acknowledged is recorded, and the rest is
//! delivered after the restart.
//!
//! A partition with no stored position (notifications just turned on)
//! starts at the log's end, recorded at once: status changes from then on
//! are notified, not the history.

pub mod config;
pub mod email;

pub mod webhook;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

pub use self::config::{EmailConfig, EventFilter, NotificationsConfig, SmtpTls, WebhookConfig};
pub use self::webhook::{VerifyError, sign, verify_signature};
use crate::domain::StatusEvent;
use crate::pipeline::log::{Log, LogError, Topic};
use crate::pipeline::store::{Notified, StateStore, StoreError, with_retries};
use crate::pipeline::supervisor::Stop;
use crate::sinks::metrics::Metrics;

/// Name of the notifications sink's positions in the state store.
pub const SINK_NAME: &str = "notifications";
/// Status records read per log read.
const READ_BATCH: usize = 1024;
const READ_WAIT: Duration = Duration::from_millis(50);
/// A position that moved without any delivery is written at most this often.
const POSITION_EVERY: Duration = Duration::from_secs(1);

/// Why one attempt failed.
#[derive(Clone, Debug)]
pub enum AttemptError {
    /// Trying again may help (network, timeout, 5xx, 429; SMTP 4xx).
    Transient {
        detail: String,
        retry_after: Option<Duration>,
    },
    /// Trying again cannot help (other 4xx, SMTP 5xx, a bad address).
    Permanent(String),
}

impl AttemptError {
    pub fn detail(&self) -> &str {
        match self {
            AttemptError::Transient { detail, .. } | AttemptError::Permanent(detail) => detail,
        }
    }
}

#[derive(thiserror::Error, Debug)]
pub enum NotifyError {
    #[error("notifications sink, partition {partition}: {source}")]
    Log { partition: u32, source: LogError },
    #[error("notifications sink, partition {partition}: {source}")]
    Store { partition: u32, source: StoreError },
    #[error("notifications sink, partition {partition}: a delivery task failed: {detail}")]
    Task { partition: u32, detail: String },
}

/// Backoff between attempts: `base * 2^(n-1)` capped at `max`, then
/// "equal jitter" (a random point in its upper half).
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
    pub total: Duration,
}

impl RetryPolicy {
    pub fn from_config(c: &NotificationsConfig) -> RetryPolicy {
        RetryPolicy {
            max_attempts: c.max_attempts,
            base: Duration::from_millis(c.retry_base_ms),
            max: Duration::from_millis(c.retry_max_ms),
            total: Duration::from_millis(c.retry_total_ms),
        }
    }

    /// The wait after failed attempt number `attempt` (1-based); a
    /// `Retry-After` hint lengthens it, up to `max`.
    pub fn delay(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        let half = exp / 2;
        let jitter = Duration::from_nanos(rand::random_range(0..=half.as_nanos() as u64));
        let delay = half + jitter;
        match hint {
            Some(h) => delay.max(h.min(self.max)),
            None => delay,
        }
    }
}

enum Kind {
    Webhook(webhook::Webhook),
    Email(email::Mailer),
}

/// A webhook endpoint or email, with its in-flight slots and metrics.
struct Target {
    kind: Kind,
    /// Store key: `webhook:<name>` or `email`.
    key: String,
    /// Metrics label: the endpoint name, or `email`.
    label: String,
    permits: Arc<Semaphore>,
    depth: IntGauge,
}

impl Target {
    fn wants(&self, event: &StatusEvent) -> bool {
        match &self.kind {
            Kind::Webhook(w) => w.wants(event),
            Kind::Email(_) => email::wants(event.status),
        }
    }

    async fn attempt(&self, job: &Job) -> Result<(), AttemptError> {
        match &self.kind {
            Kind::Webhook(w) => w.attempt(&job.event).await,
            Kind::Email(m) => match &job.email {
                Some(to) => m.send(to, &job.event).await,
                None => Err(AttemptError::Permanent("no contact email".into())),
            },
        }
    }
}

/// Everything the partition tasks share.
pub struct Notifier {
    targets: Vec<Target>,
    policy: RetryPolicy,
    max_pending_events: usize,
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
}

/// The running sink's shared part: the notifier the partition tasks use
/// and the email batcher.
pub struct Running {
    pub notifier: Arc<Notifier>,
    mailer: Option<JoinHandle<()>>,
}

impl Running {
    /// After every partition task has stopped: waits for the email batcher
    /// to send what it holds.
    pub async fn join(self) {
        drop(self.notifier);
        if let Some(m) = self.mailer {
            // Ends once the last partition task dropped the notifier.
            let _ = m.await;
        }
    }
}

impl Notifier {
    /// Resolves secrets and builds the targets; fails (naming what is
    /// missing, never a secret) if a secret is absent.
    fn new(
        config: &NotificationsConfig,
        store: Arc<dyn StateStore>,
        metrics: Arc<Metrics>,
    ) -> Result<(Notifier, Option<JoinHandle<()>>), String> {
        config.validate()?;
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut targets = Vec::new();
        let target = |kind, key: String, label: String, slots: usize| Target {
            depth: metrics
                .queue_depth
                .with_label_values(&[&format!("notifications:{label}")]),
            kind,
            key,
            label,
            permits: Arc::new(Semaphore::new(slots)),
        };
        for w in &config.webhooks {
            let hook = webhook::Webhook::new(w, timeout)?;
            targets.push(target(
                Kind::Webhook(hook),
                format!("webhook:{}", w.name),
                w.name.clone(),
                config.max_in_flight,
            ));
        }
        let mut mailer_task = None;
        if let Some(e) = &config.email {
            let (mailer, task) = email::Mailer::spawn(e, timeout, metrics.clone())?;
            mailer_task = Some(task);
            // Enough slots for one batch filling while another is sent.
            let slots = config.max_in_flight.max(e.max_batch.saturating_mul(2));
            targets.push(target(
                Kind::Email(mailer),
                config::EMAIL_TARGET.to_owned(),
                config::EMAIL_TARGET.to_owned(),
                slots,
            ));
        }
        Ok((
            Notifier {
                targets,
                policy: RetryPolicy::from_config(config),
                max_pending_events: config.max_pending_events,
                store,
                metrics,
            },
            mailer_task,
        ))
    }
}

/// Builds the targets and starts the email batcher. The partition tasks
/// ([`run_partition`]) are started by whoever owns the partitions.
pub fn start(
    config: &NotificationsConfig,
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Running> {
    let (notifier, mailer) =
        Notifier::new(config, store, metrics).map_err(|e| anyhow::anyhow!("notifications: {e}"))?;
    tracing::info!(
        targets = notifier.targets.len(),
        "notifications sink started"
    );
    Ok(Running {
        notifier: Arc::new(notifier),
        mailer,
    })
}

/// Where partition `partition`'s task starts: its stored position, or for
/// a partition without one (notifications just turned on) the log's end,
/// so that only status changes from now on are notified, not the history.
/// That start is recorded at once, so a crash cannot skip what follows.
async fn start_position(n: &Notifier, log: &dyn Log, partition: u32) -> Result<u64, NotifyError> {
    let store_err = |source| NotifyError::Store { partition, source };
    let positions = n.store.sink_positions(SINK_NAME).await.map_err(store_err)?;
    if let Some(&next) = positions.get(&partition) {
        return Ok(next);
    }
    let (_, high) = log
        .offsets(Topic::OrderStatus, partition)
        .map_err(|source| NotifyError::Log { partition, source })?;
    n.store
        .record_notified(SINK_NAME, &[(partition, high)], &[])
        .await
        .map_err(store_err)?;
    Ok(high)
}

/// One delivery: an event for a target.
struct Job {
    target: usize,
    offset: u64,
    event: Arc<StatusEvent>,
    /// The contact email, for the email target.
    email: Option<String>,
}

enum Outcome {
    Delivered,
    /// Given up: refused for good, or out of attempts or time.
    Abandoned(String),
    /// Stopped by shutdown before it settled: delivered after the restart.
    Interrupted,
}

struct Done {
    job: Job,
    outcome: Outcome,
    /// Held until the settled record is durable (bounds crash repeats).
    permit: Option<OwnedSemaphorePermit>,
    started: Instant,
}

/// Runs one delivery to its end: waits for a slot, then attempts with
/// backoff until delivered, given up, or interrupted by shutdown.
async fn deliver(n: Arc<Notifier>, job: Job, mut shutdown: watch::Receiver<bool>) -> Done {
    let target = &n.targets[job.target];
    let started = Instant::now();
    let permit = tokio::select! {
        p = target.permits.clone().acquire_owned() => p.ok(),
        _ = shutdown.wait_for(|s| *s) => None,
    };
    let Some(permit) = permit else {
        return Done {
            job,
            outcome: Outcome::Interrupted,
            permit: None,
            started,
        };
    };
    // The retry budget counts from the first attempt, not from the wait for a slot.
    let first_attempt = Instant::now();
    let mut attempt = 1;
    let outcome = loop {
        match target.attempt(&job).await {
            Ok(()) => break Outcome::Delivered,
            Err(AttemptError::Permanent(detail)) => break Outcome::Abandoned(detail),
            Err(AttemptError::Transient {
                detail,
                retry_after,
            }) => {
                let delay = n.policy.delay(attempt, retry_after);
                if attempt >= n.policy.max_attempts
                    || first_attempt.elapsed() + delay > n.policy.total
                {
                    break Outcome::Abandoned(format!("{detail} (after {attempt} attempts)"));
                }
                n.metrics
                    .notification_retries
                    .with_label_values(&[&target.label])
                    .inc();
                tracing::debug!(target = %target.label, order_id = %job.event.order_id, seq = job.event.seq, attempt, error = %detail, "notification attempt failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|s| *s) => break Outcome::Interrupted,
                }
                attempt += 1;
            }
        }
    };
    Done {
        job,
        outcome,
        permit: Some(permit),
        started,
    }
}

/// The deliveries of one order to one target, run one at a time.
#[derive(Default)]
struct Chain {
    /// Highest seq settled in the store or enqueued here: anything at or
    /// below it is a duplicate.
    max_seq: u32,
    running: bool,
    queue: VecDeque<Job>,
}

/// One partition's consumer state.
struct Partition {
    n: Arc<Notifier>,
    log: Arc<dyn Log>,
    partition: u32,
    /// Next offset to read.
    next: u64,
    /// Offsets with unsettled deliveries → how many.
    pending: BTreeMap<u64, u32>,
    chains: HashMap<(usize, String), Chain>,
    running: JoinSet<Done>,
    /// Settled since the last write, with their in-flight slots.
    settled: Vec<Notified>,
    permits: Vec<OwnedSemaphorePermit>,
    written_position: u64,
    written_at: Instant,
    shutdown: watch::Receiver<bool>,
}

/// Delivers the status events of one `order-status` partition until `stop`
/// leaves `Stop::Run`; then reads no more, lets the deliveries in flight
/// settle (or be interrupted) and records what settled.
pub async fn run_partition(
    n: Arc<Notifier>,
    log: Arc<dyn Log>,
    partition: u32,
    stop: watch::Receiver<Stop>,
) -> Result<(), NotifyError> {
    let next = start_position(&n, log.as_ref(), partition).await?;
    // Deliveries only need "stopping or not".
    let (shutdown_tx, mut shutdown) = watch::channel(false);
    let mut stop = stop;
    tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s != Stop::Run).await;
        shutdown_tx.send_replace(true);
        // Keep the sender until every receiver is gone, so nobody sees it close.
        shutdown_tx.closed().await;
    });
    let mut p = Partition {
        n,
        log: log.clone(),
        partition,
        next,
        pending: BTreeMap::new(),
        chains: HashMap::new(),
        running: JoinSet::new(),
        settled: Vec::new(),
        permits: Vec::new(),
        written_position: next,
        written_at: Instant::now(),
        shutdown: shutdown.clone(),
    };
    loop {
        let stopping = *shutdown.borrow();
        if stopping && p.running.is_empty() {
            p.drop_queued();
            p.flush(true).await?;
            return Ok(());
        }
        let room = !stopping && p.pending.len() < p.n.max_pending_events;
        tokio::select! {
            Some(joined) = p.running.join_next(), if !p.running.is_empty() => {
                p.complete(joined, stopping)?;
                while let Some(joined) = p.running.try_join_next() {
                    p.complete(joined, stopping)?;
                }
                p.flush(false).await?;
            }
            _ = shutdown.changed(), if !stopping => {}
            read = log.read(Topic::OrderStatus, partition, p.next, READ_BATCH, READ_WAIT), if room => {
                let records = match read {
                    // Retention deleted records this sink never read (it was
                    // turned off meanwhile): go on from the oldest one kept.
                    Err(LogError::OffsetOutOfRange { low, .. }) if p.next < low && p.pending.is_empty() => {
                        tracing::warn!(partition, from = p.next, to = low, "status records deleted before they were notified; skipping them");
                        p.next = low;
                        continue;
                    }
                    r => r.map_err(|source| NotifyError::Log { partition, source })?,
                };
                if let Some(last) = records.last() {
                    p.next = last.offset + 1;
                    p.admit(&records).await?;
                }
                p.flush(false).await?;
            }
            // Nothing to read or wait for (cannot happen while deliveries
            // are pending, but never spin if it does).
            _ = tokio::time::sleep(READ_WAIT), if !room && p.running.is_empty() => {}
        }
    }
}

impl Partition {
    fn store_err(&self, source: StoreError) -> NotifyError {
        NotifyError::Store {
            partition: self.partition,
            source,
        }
    }

    /// Turns new status records into deliveries, skipping what is settled.
    async fn admit(
        &mut self,
        records: &[crate::pipeline::log::LogRecord],
    ) -> Result<(), NotifyError> {
        let mut wanted: Vec<(usize, u64, Arc<StatusEvent>)> = Vec::new();
        for r in records {
            let event = match StatusEvent::decode(&r.value) {
                Ok(e) => Arc::new(e),
                Err(e) => {
                    tracing::error!(partition = self.partition, offset = r.offset, error = %e, "undecodable status record skipped");
                    continue;
                }
            };
            for (t, target) in self.n.targets.iter().enumerate() {
                if target.wants(&event) {
                    wanted.push((t, r.offset, event.clone()));
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        // What the store has settled, for (target, order)s not in memory.
        let mut lookup: Vec<(usize, String)> = wanted
            .iter()
            .map(|(t, _, e)| (*t, e.order_id.clone()))
            .filter(|k| !self.chains.contains_key(k))
            .collect();
        lookup.sort();
        lookup.dedup();
        let keys: Vec<(String, String)> = lookup
            .iter()
            .map(|(t, id)| (self.n.targets[*t].key.clone(), id.clone()))
            .collect();
        let store = &self.n.store;
        let stored = with_retries("notified", || store.notified(&keys))
            .await
            .map_err(|e| self.store_err(e))?;
        let mut floors: HashMap<(usize, String), u32> = lookup
            .into_iter()
            .zip(stored)
            .map(|(k, seq)| (k, seq.unwrap_or(0)))
            .collect();
        // Contacts, for the email deliveries.
        let mut email_ids: Vec<String> = wanted
            .iter()
            .filter(|(t, _, _)| matches!(self.n.targets[*t].kind, Kind::Email(_)))
            .map(|(_, _, e)| e.order_id.clone())
            .collect();
        email_ids.sort();
        email_ids.dedup();
        let contacts: HashMap<String, Option<String>> = if email_ids.is_empty() {
            HashMap::new()
        } else {
            let store = &self.n.store;
            let found = with_retries("get_contacts", || store.get_contacts(&email_ids))
                .await
                .map_err(|e| self.store_err(e))?;
            email_ids.into_iter().zip(found).collect()
        };

        for (t, offset, event) in wanted {
            let key = (t, event.order_id.clone());
            let floor = match self.chains.get(&key) {
                Some(c) => c.max_seq,
                None => floors.get(&key).copied().unwrap_or(0),
            };
            if event.seq <= floor {
                continue; // settled before, or a duplicated status event
            }
            let target = &self.n.targets[t];
            let email = match target.kind {
                Kind::Email(_) => match contacts.get(&event.order_id).cloned().flatten() {
                    Some(to) => Some(to),
                    None => {
                        // Produced straight to the log: no contact, no email.
                        self.n
                            .metrics
                            .notification_deliveries
                            .with_label_values(&[&target.label, "no_contact"])
                            .inc();
                        floors.insert(key, event.seq);
                        continue;
                    }
                },
                Kind::Webhook(_) => None,
            };
            target.depth.inc();
            *self.pending.entry(offset).or_insert(0) += 1;
            let job = Job {
                target: t,
                offset,
                event: event.clone(),
                email,
            };
            let chain = self.chains.entry(key).or_default();
            chain.max_seq = event.seq;
            if chain.running {
                chain.queue.push_back(job);
            } else {
                chain.running = true;
                self.running
                    .spawn(deliver(self.n.clone(), job, self.shutdown.clone()));
            }
        }
        Ok(())
    }

    /// Accounts for a finished delivery and starts the next of its chain.
    fn complete(
        &mut self,
        joined: Result<Done, tokio::task::JoinError>,
        stopping: bool,
    ) -> Result<(), NotifyError> {
        let done = joined.map_err(|e| NotifyError::Task {
            partition: self.partition,
            detail: e.to_string(),
        })?;
        let Done {
            job,
            outcome,
            permit,
            started,
        } = done;
        let target = &self.n.targets[job.target];
        let metrics = &self.n.metrics;
        target.depth.dec();
        let key = (job.target, job.event.order_id.clone());
        let outcome_label = match &outcome {
            Outcome::Delivered => "delivered",
            Outcome::Abandoned(_) => "abandoned",
            Outcome::Interrupted => "interrupted",
        };
        metrics
            .notification_deliveries
            .with_label_values(&[&target.label, outcome_label])
            .inc();
        if let Outcome::Interrupted = outcome {
            // Not settled: the position stays before it, the next run sends it.
            if let Some(chain) = self.chains.get_mut(&key) {
                chain.running = false;
            }
            return Ok(());
        }
        metrics
            .notification_latency
            .with_label_values(&[&target.label])
            .observe(started.elapsed().as_secs_f64());
        if let Outcome::Abandoned(detail) = &outcome {
            tracing::warn!(target = %target.label, order_id = %job.event.order_id, seq = job.event.seq, error = %detail, "notification given up");
        }
        self.settled.push(Notified {
            target: target.key.clone(),
            order_id: job.event.order_id.clone(),
            seq: job.event.seq,
        });
        self.permits.extend(permit);
        if let Some(count) = self.pending.get_mut(&job.offset) {
            *count -= 1;
            if *count == 0 {
                self.pending.remove(&job.offset);
            }
        }
        if let Some(chain) = self.chains.get_mut(&key) {
            chain.running = false;
            if !stopping && let Some(next) = chain.queue.pop_front() {
                chain.running = true;
                self.running
                    .spawn(deliver(self.n.clone(), next, self.shutdown.clone()));
            }
        }
        Ok(())
    }

    /// The position: the first offset with an unsettled delivery, else the next to read.
    fn position(&self) -> u64 {
        self.pending.keys().next().copied().unwrap_or(self.next)
    }

    /// Writes what settled (with the position) in one transaction, then
    /// frees the slots. A position that moved alone waits for `POSITION_EVERY`.
    async fn flush(&mut self, force: bool) -> Result<(), NotifyError> {
        let position = self.position();
        let moved = position > self.written_position;
        if self.settled.is_empty()
            && (!moved || (!force && self.written_at.elapsed() < POSITION_EVERY))
        {
            return Ok(());
        }
        // Recording keeps the larger seq and offset: safe to repeat.
        let (store, at) = (&self.n.store, [(self.partition, position)]);
        with_retries("record_notified", || {
            store.record_notified(SINK_NAME, &at, &self.settled)
        })
        .await
        .map_err(|e| self.store_err(e))?;
        self.settled.clear();
        self.permits.clear();
        self.written_position = self.written_position.max(position);
        self.written_at = Instant::now();
        // Settled chains are in the store now: drop the idle ones.
        self.chains.retain(|_, c| c.running || !c.queue.is_empty());
        self.log
            .release_before(Topic::OrderStatus, self.partition, position);
        Ok(())
    }

    /// At shutdown: queued deliveries will not start (the next run sends them).
    fn drop_queued(&mut self) {
        for chain in self.chains.values_mut() {
            for job in chain.queue.drain(..) {
                self.n.targets[job.target].depth.dec();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delays double up to the cap, stay in the jittered upper half, and
    /// honour a longer `Retry-After` up to the cap.
    #[test]
    fn backoff_with_jitter() {
        let p = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            total: Duration::from_secs(60),
        };
        for _ in 0..100 {
            for (attempt, full) in [
                (1, 100),
                (2, 200),
                (3, 400),
                (4, 800),
                (5, 1000),
                (30, 1000),
            ] {
                let d = p.delay(attempt, None).as_millis() as u64;
                assert!((full / 2..=full).contains(&d), "attempt {attempt}: {d} ms");
            }
        }
        assert_eq!(
            p.delay(1, Some(Duration::from_millis(700))),
            Duration::from_millis(700)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(30))),
            Duration::from_secs(1)
        );
    }
}
