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
//! Effectively once, across restarts and SIGKILL, with state bounded by
//! the deliveries in progress (never a row per order):
//! - Each partition's snapshot in the store ([`Scope::Notifications`]) is
//!   its **position** (the first offset with an unsettled delivery), per
//!   source `orders` partition the highest status id before the position,
//!   and the (target, offset) deliveries settled beyond the position. It
//!   is written at most every [`FLUSH_EVERY`] while deliveries settle.
//! - A restart reads on from the position: a status event whose id is not
//!   above its source's mark is a replay's duplicate (the processor
//!   re-emits statuses with the same ids after a crash) and is skipped, and
//!   so is every (target, offset) already settled.
//! - A delivery's in-flight slot is freed only after its record is
//!   durable. So what a crash can repeat — acknowledged by the receiver but
//!   not yet recorded — is at most `max_in_flight` deliveries per target
//!   (email: per batch too). Every repeat carries the same
//!   `Orderflow-Event-Id` (and email `Message-ID`) for receivers to dedupe.
//! - Records read ahead of the position are bounded by
//!   `max_pending_events`: past it, reading waits for deliveries to settle.
//!
//! Emails need the order's contact email: the processor puts it on the
//! order's terminal status events (it keeps it while the order is in
//! flight; nothing stores it). An order without one gets webhooks only.
//!
//! Shutdown: no new deliveries start; the attempts in flight finish (at
//! most `timeout_ms`), what was acknowledged is recorded, and the rest is
//! delivered after the restart.
//!
//! A partition with no stored position (notifications just turned on)
//! starts at the log's end, recorded at once: status changes from then on
//! are notified, not the history.

pub mod email;

pub mod webhook;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

pub use self::webhook::{VerifyError, sign, verify_signature};
pub use crate::config::notifications::{
    EmailConfig, EventFilter, NotificationsConfig, SmtpTls, WebhookConfig,
};
use serde::{Deserialize, Serialize};

use crate::domain::StatusEvent;
use crate::pipeline::log::{Log, LogError, Topic};
use crate::pipeline::restart::SignalOnce;
use crate::pipeline::sink::{SinkFailure, StatusSink};
use crate::pipeline::store::{Scope, SnapshotWrite, StateStore, StoreError, with_retries};
use crate::pipeline::supervisor::Stop;
use crate::telemetry::metrics::Metrics;

/// Status records read per log read.
const READ_BATCH: usize = 1024;
const READ_WAIT: Duration = Duration::from_millis(50);
/// Settled deliveries are recorded at most this often (one store write
/// for all of them), unless half a target's slots wait for it.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A position that moved without any delivery is written at most this often.
const POSITION_EVERY: Duration = Duration::from_secs(1);

/// A partition's snapshot: see the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SinkState {
    /// Per source `orders` partition, the highest status id before the position.
    marks: BTreeMap<u32, (u64, u32)>,
    /// `(target key, offset)` of deliveries settled at or after the position.
    settled: BTreeSet<(String, u64)>,
}

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

impl crate::pipeline::restart::Outage for NotifyError {
    fn is_outage(&self) -> bool {
        match self {
            NotifyError::Log { source, .. } => source.is_retryable(),
            NotifyError::Store { source, .. } => source.is_retryable(),
            NotifyError::Task { .. } => false,
        }
    }
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
    /// Snapshot key: `webhook:<name>` or `email`.
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
    /// The fewest in-flight slots of any target (flush policy).
    min_slots: usize,
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
    ) -> Result<(Notifier, Option<JoinHandle<()>>), crate::config::ConfigError> {
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
                crate::config::notifications::EMAIL_TARGET.to_owned(),
                crate::config::notifications::EMAIL_TARGET.to_owned(),
                slots,
            ));
        }
        let min_slots = targets
            .iter()
            .map(|t| t.permits.available_permits())
            .min()
            .unwrap_or(1);
        Ok((
            Notifier {
                targets,
                policy: RetryPolicy::from_config(config),
                max_pending_events: config.max_pending_events,
                min_slots,
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

/// Where partition `partition`'s task starts: its snapshot, or for a
/// partition without one (notifications just turned on) the log's end, so
/// that only status changes from now on are notified, not the history.
/// That start is recorded at once, so a crash cannot skip what follows.
async fn start_position(
    n: &Notifier,
    log: &dyn Log,
    partition: u32,
    epoch: u64,
) -> Result<(u64, SinkState), NotifyError> {
    let store_err = |source| NotifyError::Store { partition, source };
    let store = &n.store;
    let loaded = with_retries("load notifications position", || {
        store.load(Scope::Notifications, partition)
    })
    .await
    .map_err(store_err)?;
    if let Some(snapshot) = loaded {
        let state = rmp_serde::from_slice(&snapshot.manifest).map_err(|e| {
            store_err(StoreError::Corrupt(format!(
                "notifications snapshot of partition {partition}: {e}"
            )))
        })?;
        return Ok((snapshot.next_offset, state));
    }
    let (_, high) = log
        .offsets(Topic::OrderStatus, partition)
        .await
        .map_err(|source| NotifyError::Log { partition, source })?;
    let state = SinkState::default();
    let write = snapshot(partition, epoch, high, &state);
    with_retries("write notifications position", || store.commit(&write))
        .await
        .map_err(store_err)?;
    Ok((high, state))
}

fn snapshot(partition: u32, epoch: u64, position: u64, state: &SinkState) -> SnapshotWrite {
    let manifest = rmp_serde::to_vec(state).expect("a sink state always serializes");
    SnapshotWrite::manifest_only(Scope::Notifications, partition, epoch, position, manifest)
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
    running: bool,
    queue: VecDeque<Job>,
}

/// One partition's consumer state.
struct Partition {
    n: Arc<Notifier>,
    log: Arc<dyn Log>,
    partition: u32,
    epoch: u64,
    /// Next offset to read.
    next: u64,
    /// Per source partition, the highest status id read (duplicates are
    /// at or below it).
    marks: BTreeMap<u32, (u64, u32)>,
    /// The snapshot at the current position (kept current as the position
    /// moves): marks of what lies before it, deliveries settled after it.
    at_position: SinkState,
    /// Status ids read at or after the position, to fold into
    /// `at_position.marks` as the position passes them.
    window: VecDeque<(u64, u32, (u64, u32))>,
    /// Offsets with unsettled deliveries → how many.
    pending: BTreeMap<u64, u32>,
    chains: HashMap<(usize, String), Chain>,
    running: JoinSet<Done>,
    /// Deliveries settled since the last write, and their in-flight slots
    /// (freed once the write is durable).
    unwritten: usize,
    permits: Vec<OwnedSemaphorePermit>,
    written_position: u64,
    written_at: Instant,
    shutdown: watch::Receiver<bool>,
}

/// Notifications of each status partition owned here, as the supervisor
/// runs them.
pub struct NotificationsSink {
    pub notifier: Arc<Notifier>,
    /// The `order-status` log (a release view shared with the read model).
    pub log: Arc<dyn Log>,
}

impl StatusSink for NotificationsSink {
    fn task(&self) -> &'static str {
        "notifications"
    }

    fn gates_readiness(&self) -> bool {
        true
    }

    fn run(
        &self,
        partition: u32,
        stop: watch::Receiver<Stop>,
        started: Option<Arc<SignalOnce>>,
    ) -> BoxFuture<'static, Result<(), SinkFailure>> {
        let (n, log) = (self.notifier.clone(), self.log.clone());
        let started = started.expect("notifications gate readiness");
        Box::pin(async move {
            run_partition(n, log, partition, stop, started)
                .await
                .map_err(|e| Box::new(e) as SinkFailure)
        })
    }
}

/// Delivers the status events of one `order-status` partition until `stop`
/// leaves `Stop::Run`; then reads no more, lets the deliveries in flight
/// settle (or be interrupted) and records what settled. Signals `started`
/// once its start position is known.
pub async fn run_partition(
    n: Arc<Notifier>,
    log: Arc<dyn Log>,
    partition: u32,
    stop: watch::Receiver<Stop>,
    started: Arc<SignalOnce>,
) -> Result<(), NotifyError> {
    let store = n.store.clone();
    let epoch = with_retries("claim notifications", || {
        store.claim(Scope::Notifications, partition)
    })
    .await
    .map_err(|source| NotifyError::Store { partition, source })?;
    let (next, state) = start_position(&n, log.as_ref(), partition, epoch).await?;
    started.send();
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
        epoch,
        next,
        marks: state.marks.clone(),
        at_position: state,
        window: VecDeque::new(),
        pending: BTreeMap::new(),
        chains: HashMap::new(),
        running: JoinSet::new(),
        unwritten: 0,
        permits: Vec::new(),
        written_position: next,
        written_at: Instant::now(),
        shutdown: shutdown.clone(),
    };
    let lag = p.n.metrics.partition_lag.with_label_values(&[
        Topic::OrderStatus.name(),
        &partition.to_string(),
        "notifications",
    ]);
    loop {
        let stopping = *shutdown.borrow();
        if stopping && p.running.is_empty() {
            p.drop_queued();
            p.advance();
            return match p.flush(true).await {
                Err(NotifyError::Store {
                    source: StoreError::Fenced { .. },
                    ..
                }) => Ok(()),
                other => other,
            };
        }
        let room = !stopping
            && p.pending.len() < p.n.max_pending_events
            && p.window.len() < p.n.max_pending_events;
        let flush_in = FLUSH_EVERY.saturating_sub(p.written_at.elapsed());
        tokio::select! {
            Some(joined) = p.running.join_next(), if !p.running.is_empty() => {
                p.complete(joined, stopping)?;
                while let Some(joined) = p.running.try_join_next() {
                    p.complete(joined, stopping)?;
                }
                p.advance();
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
                    p.admit(&records);
                    p.advance();
                }
                if let Ok((_, high)) = log.offsets(Topic::OrderStatus, partition).await {
                    lag.set(high.saturating_sub(p.next) as i64);
                }
                p.flush(false).await?;
            }
            // Settled deliveries wait for the next flush.
            _ = tokio::time::sleep(flush_in), if p.unwritten > 0 => {
                p.flush(false).await?;
            }
            // Nothing to read or wait for (cannot happen while deliveries
            // are pending, but never spin if it does).
            _ = tokio::time::sleep(READ_WAIT), if !room && p.running.is_empty() => {}
        }
    }
}

impl Partition {
    /// Turns new status records into deliveries, skipping duplicates and
    /// what is settled.
    fn admit(&mut self, records: &[crate::pipeline::log::LogRecord]) {
        for r in records {
            let event = match StatusEvent::decode(&r.value) {
                Ok(e) => Arc::new(e),
                Err(e) => {
                    tracing::error!(partition = self.partition, offset = r.offset, error = %e, "undecodable status record skipped");
                    continue;
                }
            };
            if let Some(src) = event.src {
                let id = (src.src_offset, src.index);
                if self.marks.get(&src.src_partition).is_some_and(|m| id <= *m) {
                    continue; // re-emitted by a replay: the original was handled
                }
                self.marks.insert(src.src_partition, id);
                self.window.push_back((r.offset, src.src_partition, id));
            }
            for (t, target) in self.n.targets.iter().enumerate() {
                if !target.wants(&event) {
                    continue;
                }
                if self
                    .at_position
                    .settled
                    .contains(&(target.key.clone(), r.offset))
                {
                    continue;
                }
                let email = match target.kind {
                    Kind::Email(_) => match &event.email {
                        Some(to) => Some(to.clone()),
                        None => {
                            // No contact: no email.
                            self.n
                                .metrics
                                .notification_deliveries
                                .with_label_values(&[&target.label, "no_contact"])
                                .inc();
                            continue;
                        }
                    },
                    Kind::Webhook(_) => None,
                };
                target.depth.inc();
                *self.pending.entry(r.offset).or_insert(0) += 1;
                let job = Job {
                    target: t,
                    offset: r.offset,
                    event: event.clone(),
                    email,
                };
                let chain = self.chains.entry((t, event.order_id.clone())).or_default();
                if chain.running {
                    chain.queue.push_back(job);
                } else {
                    chain.running = true;
                    self.running
                        .spawn(deliver(self.n.clone(), job, self.shutdown.clone()));
                }
            }
        }
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
        self.at_position
            .settled
            .insert((target.key.clone(), job.offset));
        self.unwritten += 1;
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

    /// Moves `at_position` to the current position: the marks of the
    /// records the position passed, and only the settled deliveries at or
    /// after it.
    fn advance(&mut self) {
        let position = self.position();
        while let Some(&(offset, src, id)) = self.window.front() {
            if offset >= position {
                break;
            }
            self.at_position.marks.insert(src, id);
            self.window.pop_front();
        }
        self.at_position
            .settled
            .retain(|(_, offset)| *offset >= position);
    }

    /// Records `at_position` (one small snapshot), then frees the slots of
    /// what settled. Settled deliveries wait up to [`FLUSH_EVERY`] (less
    /// when half of the slots wait), a position that moved alone up to
    /// `POSITION_EVERY`.
    async fn flush(&mut self, force: bool) -> Result<(), NotifyError> {
        let position = self.position();
        let moved = position > self.written_position;
        let elapsed = self.written_at.elapsed();
        let slots_waiting = self.permits.len() * 2 >= self.n.min_slots;
        let settled = self.unwritten > 0;
        let due = force
            || (settled && (elapsed >= FLUSH_EVERY || slots_waiting))
            || (moved && elapsed >= POSITION_EVERY);
        if !due || (!settled && !moved) {
            return Ok(());
        }
        let write = snapshot(self.partition, self.epoch, position, &self.at_position);
        let store = &self.n.store;
        with_retries("record notifications", || store.commit(&write))
            .await
            .map_err(|source| NotifyError::Store {
                partition: self.partition,
                source,
            })?;
        self.unwritten = 0;
        self.permits.clear();
        self.written_position = position;
        self.written_at = Instant::now();
        // Settled chains are recorded now: drop the idle ones.
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
