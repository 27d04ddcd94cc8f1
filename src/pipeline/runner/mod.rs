//! The partition runner: the one writer of an `orders` partition. It loads
//! the partition's checkpoint, restarts the effects left in its outbox,
//! then reads the log in order, feeds each record to the processor, makes
//! the processor's output durable (saga messages to `orders`, statuses to
//! `order-status`), hands effects to the executor and checkpoints every N
//! messages or T ms, in the background (one write in flight at a time, so
//! the partition does not wait for the store). A checkpoint is written only
//! after everything emitted before it is durable, so recovery (checkpoint + replay) never loses an
//! emitted message; replays re-emit with the same ids and receivers dedupe.
//!
//! The decisions (what a batch appends, when effects are released, when a
//! checkpoint is due and what it holds) are [`core::PartitionCore`], free
//! of I/O and clocks, which the simulation (`crate::sim`) drives too; [`run`]
//! is the async shell around it: reads, appends, the executor, the
//! checkpoint task, metrics and the stop signal.

pub mod core;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::CheckpointConfig;
use crate::domain::RecordKind;
use crate::domain::partition::partition_for_key;
use crate::pipeline::backlog::Backlog;
use crate::pipeline::effects::EffectSender;
use crate::pipeline::inventory::{Inventory, StockCounts};
use crate::pipeline::log::{Log, LogError, LogRecord, Record, Topic};
use crate::pipeline::restart::SignalOnce;
use crate::pipeline::store::{Scope, SnapshotWrite, StateStore, StoreError, with_retries};
use crate::pipeline::supervisor::Stop;
use crate::stages::processor::{Input, Limits};
use crate::stages::snapshot::{self, Manifest};
use crate::stages::{Output, PartitionState, Processor};
use crate::telemetry::metrics::Metrics;

use self::core::PartitionCore;

/// Records read per batch.
pub const READ_BATCH_RECORDS: usize = 4096;
/// How long a read waits for new records before the runner looks at its
/// checkpoint timer and shutdown signal again.
const READ_WAIT_MS: u64 = 50;
/// How long one read of a replay waits for records it knows are there.
const REPLAY_READ_WAIT_MS: u64 = 1_000;
/// Empty reads in a row, below the end, before a replay gives up (the
/// log holds the records but does not deliver them).
const REPLAY_EMPTY_READS: u32 = 30;
/// Longest back-off while the log is busy (`Full`).
const MAX_APPEND_BACKOFF_MS: u64 = 1_000;

#[derive(thiserror::Error, Debug)]
pub enum RunnerError {
    #[error("partition {partition}: {source}")]
    Log { partition: u32, source: LogError },
    #[error("partition {partition}: {source}")]
    Store { partition: u32, source: StoreError },
    #[error("partition {partition}: checkpoint is unreadable: {detail}")]
    BadCheckpoint { partition: u32, detail: String },
    #[error("partition {partition}: the checkpoint write failed: {detail}")]
    CheckpointTask { partition: u32, detail: String },
    #[error("partition {partition}: the effect executor stopped")]
    ExecutorGone { partition: u32 },
}

impl crate::pipeline::restart::Outage for RunnerError {
    fn is_outage(&self) -> bool {
        match self {
            RunnerError::Log { source, .. } => source.is_retryable(),
            RunnerError::Store { source, .. } => source.is_retryable(),
            _ => false,
        }
    }
}

pub struct RunnerDeps {
    pub log: Arc<dyn Log>,
    pub store: Arc<dyn StateStore>,
    pub effects: EffectSender,
    pub inventory: Arc<Inventory>,
    pub metrics: Arc<Metrics>,
    pub checkpoint: CheckpointConfig,
    /// The bounds of the partition's state (deterministic).
    pub limits: Limits,
    /// Ownership epoch (fences the checkpoints of a former owner).
    pub epoch: u64,
    /// Sent once this partition has recovered (readiness).
    pub recovered: Arc<SignalOnce>,
    /// Where intake reads how far behind this partition is.
    pub backlog: Arc<Backlog>,
    /// Test seam of the park lane (`Processor::poison_customer`).
    pub poison_customer: Option<String>,
    /// Test seam of the supervisor: panics on the next batches.
    pub panic_fault: Option<Arc<PanicFault>>,
}

/// A debug build's injected runner panic: the next `times` batches read
/// (by this runner or the ones restarted after it) panic before they are
/// applied, as a bug in processing would.
#[derive(Debug)]
pub struct PanicFault {
    remaining: AtomicU32,
}

impl PanicFault {
    pub fn new(times: u32) -> PanicFault {
        PanicFault {
            remaining: AtomicU32::new(times),
        }
    }

    /// Whether this batch is to panic; counts it.
    fn fires(&self) -> bool {
        self.remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// What a runner reports when it stops cleanly.
#[derive(Debug, Clone)]
pub struct RunnerExit {
    pub partition: u32,
    pub next_offset: u64,
    pub state_hash: String,
}

/// Loads a partition's last snapshot: `(state, next_offset, manifest)`,
/// or an empty state at offset 0 for a partition that never checkpointed.
/// Deletes again the blobs the snapshot replaced (a crash may have cut
/// that short). Store calls are retried while the store is unavailable.
pub async fn load_state(
    store: &dyn StateStore,
    partition: u32,
    limits: &Limits,
) -> Result<(PartitionState, u64, Manifest), RunnerError> {
    let store_err = |source| RunnerError::Store { partition, source };
    let bad = |e: snapshot::SnapshotError| RunnerError::BadCheckpoint {
        partition,
        detail: e.to_string(),
    };
    let loaded = with_retries("load snapshot", || store.load(Scope::Orders, partition))
        .await
        .map_err(store_err)?;
    let Some(loaded) = loaded else {
        return Ok((PartitionState::default(), 0, Manifest::empty(partition)));
    };
    let manifest = Manifest::decode(partition, &loaded.manifest).map_err(bad)?;
    let refs = manifest.blobs();
    let blobs = with_retries("read snapshot blobs", || {
        store.read_blobs(Scope::Orders, partition, &refs)
    })
    .await
    .map_err(store_err)?;
    let blobs = refs
        .iter()
        .zip(blobs)
        .filter_map(|(r, b)| b.map(|b| (*r, b)))
        .collect();
    let state = snapshot::restore(&manifest, &blobs, limits.finished).map_err(bad)?;
    with_retries("delete replaced blobs", || {
        store.delete_blobs(Scope::Orders, partition, &manifest.garbage)
    })
    .await
    .map_err(store_err)?;
    Ok((state, loaded.next_offset, manifest))
}

/// Runs partition `partition` until `stop` leaves `Stop::Run`; then, for
/// `Drain`, processes what the log holds now, for `Now` only the batch in
/// hand (ownership moves: the next owner replays the rest), checkpoints
/// and returns.
pub async fn run(
    partition: u32,
    deps: RunnerDeps,
    mut stop: watch::Receiver<Stop>,
) -> Result<RunnerExit, RunnerError> {
    let started = Instant::now();
    let partitions = deps.log.partition_count(Topic::Orders);
    let status_partitions = deps.log.partition_count(Topic::OrderStatus);
    let (state, loaded_next, manifest) =
        load_state(deps.store.as_ref(), partition, &deps.limits).await?;
    let _owned = deps.backlog.own(partition, loaded_next);
    let processor = Processor::new(partition, partitions, state)
        .with_limits(deps.limits)
        .with_poison_customer(deps.poison_customer.clone());
    // The checkpoint clock's origin is set when the loop starts (below):
    // resubmitting the outbox may wait for the executor's queue.
    let mut core = PartitionCore::recover(
        processor,
        loaded_next,
        manifest,
        status_partitions,
        deps.checkpoint.clone(),
        0,
    );
    publish_all_stock(&deps, core.processor(), loaded_next);
    publish_parked(&deps, core.processor(), partition);
    // Only now: until the loaded counters are published, stock reads go to
    // the checkpoint rather than to an empty map.
    deps.inventory.set_owned(partition, true);
    for effect in core.pending_effects() {
        deps.effects
            .submit(effect)
            .await
            .map_err(|_| RunnerError::ExecutorGone { partition })?;
    }
    // Recovered = checkpoint loaded and the tail replayed up to the end of
    // the log as it was at start; only then is the partition's state current.
    let (_, catch_up_to) = deps
        .log
        .offsets(Topic::Orders, partition)
        .await
        .map_err(|source| RunnerError::Log { partition, source })?;
    let mut recovering = true;
    tracing::info!(
        partition,
        next_offset = loaded_next,
        catch_up_to,
        "partition checkpoint loaded, replaying the tail"
    );
    let lag =
        deps.metrics
            .partition_lag
            .with_label_values(&["orders", &partition.to_string(), "runner"]);
    let mut writing: Option<CheckpointTask> = None;
    let clock = Instant::now();
    let now_ms = || clock.elapsed().as_millis() as u64;
    loop {
        let next = core.next_offset();
        if recovering && next >= catch_up_to {
            recovering = false;
            let replayed = next.saturating_sub(loaded_next);
            deps.metrics
                .partition_replayed_records
                .with_label_values(&[&partition.to_string()])
                .inc_by(replayed);
            deps.metrics
                .partition_restore_latency
                .observe(started.elapsed().as_secs_f64());
            tracing::info!(
                partition,
                next_offset = next,
                replayed,
                restore_ms = started.elapsed().as_millis() as u64,
                "partition recovered"
            );
            deps.recovered.send();
        }
        let mode = *stop.borrow();
        if mode == Stop::Now {
            break;
        }
        let stopping = mode == Stop::Drain;
        let wait = if stopping {
            Duration::ZERO
        } else {
            Duration::from_millis(READ_WAIT_MS)
        };
        let records = tokio::select! {
            r = deps.log.read(Topic::Orders, partition, next, READ_BATCH_RECORDS, wait) => r.map_err(|source| RunnerError::Log { partition, source })?,
            changed = stop.changed(), if !stopping => {
                if changed.is_err() {
                    break; // the supervisor is gone: stop as for `Now`
                }
                continue;
            }
        };
        if records.is_empty() && stopping {
            break;
        }
        if !records.is_empty() && deps.panic_fault.as_ref().is_some_and(|f| f.fires()) {
            panic!("injected fault: partition {partition} runner panics on this batch");
        }
        let flush = core.apply(records.iter().map(input));
        for problem in &flush.problems {
            tracing::error!(partition, %problem, "record skipped");
        }
        let next = core.next_offset();
        // Before the statuses are appended: whoever sees an order's status
        // then reads stock that includes it. Safe before durability: the
        // input is durable, so a replay computes the very same counts.
        deps.inventory.refused(partition, &flush.stock_refused);
        publish_stock(&deps, core.processor(), &flush.stock_touched, next);
        append_all(&deps, partition, flush.appends).await?;
        for effect in core.confirm_durable() {
            deps.effects
                .submit(effect)
                .await
                .map_err(|_| RunnerError::ExecutorGone { partition })?;
        }
        publish_parked(&deps, core.processor(), partition);
        publish_sizes(&deps, core.state(), partition);
        deps.backlog.processed(partition, next);
        if let Ok((_, high)) = deps.log.offsets(Topic::Orders, partition).await {
            lag.set(high.saturating_sub(next) as i64);
        }
        // One checkpoint in flight at a time: a due one waits for the
        // previous to finish, without blocking the partition.
        let previous_done = writing.as_ref().is_none_or(|w| w.is_finished());
        if previous_done && core.checkpoint_due(now_ms()) {
            finish_checkpoint(&mut writing, partition).await?;
            let write = core.take_checkpoint(deps.epoch, now_ms());
            writing = Some(start_checkpoint(&deps, write));
        }
    }
    finish_checkpoint(&mut writing, partition).await?;
    let last = core.take_checkpoint(deps.epoch, now_ms());
    finish_checkpoint(&mut Some(start_checkpoint(&deps, last)), partition).await?;
    Ok(RunnerExit {
        partition,
        next_offset: core.next_offset(),
        state_hash: core.state().hash(),
    })
}

fn input(r: &LogRecord) -> Input<'_> {
    Input {
        offset: r.offset,
        timestamp_ms: r.timestamp_ms,
        kind: r.kind,
        key: &r.key,
        value: &r.value,
    }
}

/// Makes a batch's output durable: its records grouped by partition
/// (order kept within each), the partitions in parallel.
async fn append_all(
    deps: &RunnerDeps,
    partition: u32,
    batches: BTreeMap<(Topic, u32), Vec<Record>>,
) -> Result<(), RunnerError> {
    let appends = batches
        .into_iter()
        .map(|((topic, p), records)| append_with_retry(deps.log.as_ref(), topic, p, records));
    for result in futures::future::join_all(appends).await {
        result.map_err(|source| RunnerError::Log { partition, source })?;
    }
    Ok(())
}

/// Takes the records `out` asks to append, by topic and partition (order
/// kept within each): saga messages to `orders` by key, statuses to
/// `order-status` by order id, park-lane events to the source partition's
/// lane. Public for the simulation (`crate::sim`), which appends them to
/// its simulated logs.
pub fn output_batches(
    out: &mut Output,
    partition: u32,
    orders_n: u32,
    status_n: u32,
) -> BTreeMap<(Topic, u32), Vec<Record>> {
    let mut batches: BTreeMap<(Topic, u32), Vec<Record>> = BTreeMap::new();
    for m in out.messages.drain(..) {
        let p = partition_for_key(m.key.as_bytes(), orders_n);
        batches.entry((Topic::Orders, p)).or_default().push(Record {
            kind: m.kind,
            key: m.key.into_bytes(),
            value: m.value,
        });
    }
    for s in &out.statuses {
        let p = partition_for_key(s.order_id.as_bytes(), status_n);
        let value = s.encode();
        batches
            .entry((Topic::OrderStatus, p))
            .or_default()
            .push(Record {
                kind: RecordKind::Internal,
                key: s.order_id.as_bytes().to_vec(),
                value,
            });
    }
    // The park lane's partition is the source partition's number.
    for event in out.parked.drain(..) {
        batches
            .entry((Topic::Parked, partition))
            .or_default()
            .push(Record {
                kind: RecordKind::Internal,
                key: Vec::new(),
                value: event.encode(),
            });
    }
    batches
}

/// Appends, backing off while the log is only full, or unavailable for a
/// while by its own account (`may_recover`: a full disk, until space is
/// freed); other errors are fatal for the runner (it must not checkpoint
/// past output it could not write).
pub(crate) async fn append_with_retry(
    log: &dyn Log,
    topic: Topic,
    partition: u32,
    records: Vec<Record>,
) -> Result<u64, LogError> {
    let mut delay_ms = 1;
    let mut warned = false;
    loop {
        match log.append(topic, partition, records.clone()).await {
            Err(LogError::Full { .. }) => {}
            Err(LogError::Unavailable(reason)) if log.may_recover() => {
                if !warned {
                    warned = true;
                    tracing::warn!(
                        topic = topic.name(),
                        partition,
                        %reason,
                        "append failed; retrying until the log takes writes again"
                    );
                }
            }
            other => return other,
        }
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        delay_ms = (delay_ms * 2).min(MAX_APPEND_BACKOFF_MS);
    }
}

/// A checkpoint being written while the partition goes on.
type CheckpointTask = tokio::task::JoinHandle<Result<(), RunnerError>>;

/// Starts writing `write` (the snapshot's new blobs and manifest, and the
/// next offset) in the background: the checkpoint covers only output
/// already durable (the core refuses otherwise), and the next one starts
/// only after this one finished, so they land in order.
fn start_checkpoint(deps: &RunnerDeps, write: SnapshotWrite) -> CheckpointTask {
    let started = Instant::now();
    let (partition, next) = (write.partition, write.next_offset);
    let (store, log, metrics) = (deps.store.clone(), deps.log.clone(), deps.metrics.clone());
    tokio::spawn(async move {
        let label = partition.to_string();
        metrics
            .checkpoint_bytes
            .with_label_values(&[&label])
            .observe(write.bytes() as f64);
        // Repeating a commit is safe: same blobs, same manifest, same epoch.
        with_retries("commit snapshot", || store.commit(&write))
            .await
            .map_err(|source| RunnerError::Store { partition, source })?;
        log.release_before(Topic::Orders, partition, next);
        // Nothing reads `orders-parked` back (the lane is listed from the
        // checkpoints): the audit trail is kept up to `log.retention_bytes`.
        log.release_before(Topic::Parked, partition, u64::MAX);
        metrics
            .checkpoint_latency
            .with_label_values(&[&label])
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    })
}

/// Waits for the checkpoint in flight, if any, and returns its outcome.
async fn finish_checkpoint(
    writing: &mut Option<CheckpointTask>,
    partition: u32,
) -> Result<(), RunnerError> {
    match writing.take() {
        None => Ok(()),
        Some(task) => task.await.map_err(|e| RunnerError::CheckpointTask {
            partition,
            detail: e.to_string(),
        })?,
    }
}

/// Park-lane gauges. The age uses the wall clock: it is a metric, not a
/// state transition.
fn publish_parked(deps: &RunnerDeps, processor: &Processor, partition: u32) {
    let label = partition.to_string();
    let parked = &processor.state.parked;
    deps.metrics
        .parked_records
        .with_label_values(&[&label])
        .set(parked.len() as i64);
    let now_ms = crate::wall_clock::now_ms();
    let oldest_ms = parked.values().map(|r| r.timestamp_ms).min();
    deps.metrics
        .parked_oldest_age
        .with_label_values(&[&label])
        .set(oldest_ms.map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0));
    deps.metrics
        .effects_failed
        .with_label_values(&[&label])
        .set(processor.state.failed_effects.len() as i64);
}

/// The size gauges of the partition's bounded structures.
fn publish_sizes(deps: &RunnerDeps, state: &PartitionState, partition: u32) {
    let label = partition.to_string();
    let sizes = [
        ("finished_orders", state.finished.len()),
        ("orders_in_flight", state.orders.len()),
        ("holds", state.holds.len()),
        ("outbox", state.outbox.len()),
        ("skus", state.stock.len()),
        ("parked_bytes", state.parked_bytes()),
    ];
    for (structure, size) in sizes {
        deps.metrics
            .state_entries
            .with_label_values(&[structure, &label])
            .set(size as i64);
    }
}

fn counts(processor: &Processor, sku: &str) -> StockCounts {
    let s = processor.state.stock.get(sku).cloned().unwrap_or_default();
    StockCounts {
        sku: sku.to_owned(),
        available: s.available,
        reserved: s.reserved,
        sold: s.sold,
    }
}

fn publish_all_stock(deps: &RunnerDeps, processor: &Processor, next: u64) {
    let all = processor
        .state
        .stock
        .iter()
        .map(|(sku, _)| counts(processor, sku));
    deps.inventory.publish(processor.partition, all, next);
}

/// Publishes the counts of the SKUs a batch touched (sorted, once each).
fn publish_stock(deps: &RunnerDeps, processor: &Processor, touched: &[String], next: u64) {
    deps.inventory.publish(
        processor.partition,
        touched.iter().map(|sku| counts(processor, sku)),
        next,
    );
}

/// Rebuilds a partition's state from offset 0 with every output and effect
/// suppressed (the replay harness; invariant 5 compares its hash with the
/// live run's).
pub async fn replay(
    log: &dyn Log,
    partition: u32,
    until: u64,
    limits: Limits,
) -> Result<PartitionState, LogError> {
    replay_inspected(log, partition, until, limits, &mut ()).await
}

/// Watches a replay record by record (`orderflow replay --order`).
pub trait Inspect {
    /// Called before `record` is applied to `state`; `true` asks for
    /// [`Inspect::after`] on it.
    fn before(&mut self, record: &LogRecord, state: &PartitionState) -> bool;
    /// What applying `record` produced and the state it left.
    fn after(&mut self, record: &LogRecord, state: &PartitionState, out: &Output);
}

impl Inspect for () {
    fn before(&mut self, _: &LogRecord, _: &PartitionState) -> bool {
        false
    }
    fn after(&mut self, _: &LogRecord, _: &PartitionState, _: &Output) {}
}

/// [`replay`], showing `inspect` the records it asks for (up to `until`,
/// or the end of the log).
pub async fn replay_inspected(
    log: &dyn Log,
    partition: u32,
    until: u64,
    limits: Limits,
    inspect: &mut dyn Inspect,
) -> Result<PartitionState, LogError> {
    let partitions = log.partition_count(Topic::Orders);
    let mut processor =
        Processor::new(partition, partitions, PartitionState::default()).with_limits(limits);
    let mut out = Output::default();
    // Up to the end as it is now: a remote log (Kafka) may answer a read
    // before its fetch arrived, so an empty read proves nothing.
    let (low, high) = log.offsets(Topic::Orders, partition).await?;
    let until = until.min(high);
    if low > 0 && until > 0 {
        // Retention deleted the start: a replay from it would differ.
        return Err(LogError::OffsetOutOfRange {
            topic: Topic::Orders.name(),
            partition,
            offset: 0,
            low,
            high,
        });
    }
    let mut next = 0;
    let mut empty_reads = 0;
    while next < until {
        let wait = Duration::from_millis(REPLAY_READ_WAIT_MS);
        let records = log
            .read(Topic::Orders, partition, next, READ_BATCH_RECORDS, wait)
            .await?;
        if records.is_empty() {
            empty_reads += 1;
            if empty_reads == REPLAY_EMPTY_READS {
                return Err(LogError::Unavailable(format!(
                    "no record at offset {next} of `orders` partition {partition} after {REPLAY_EMPTY_READS} reads, below its end {until}"
                )));
            }
            continue;
        }
        empty_reads = 0;
        for r in records.iter().take_while(|r| r.offset < until) {
            let watched = inspect.before(r, &processor.state);
            if watched {
                // Only this record's output: earlier ones of the batch pile up.
                out.clear();
            }
            processor.apply(input(r), &mut out);
            if watched {
                inspect.after(r, &processor.state, &out);
                out.clear();
            }
            next = r.offset + 1;
        }
        out.clear();
    }
    Ok(processor.state)
}
