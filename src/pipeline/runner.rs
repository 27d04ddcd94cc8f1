//! The partition runner: the one writer of an `orders` partition. It loads
//! the partition's checkpoint, restarts the effects left in its outbox,
//! then reads the log in order, feeds each record to the processor, makes
//! the processor's output durable (saga messages to `orders`, statuses to
//! `order-status`), hands effects to the executor and checkpoints every N
//! messages or T ms. A checkpoint is written only after everything emitted
//! before it is durable, so recovery (checkpoint + replay) never loses an
//! emitted message; replays re-emit with the same ids and receivers dedupe.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::CheckpointConfig;
use crate::domain::RecordKind;
use crate::domain::partition::partition_for_key;
use crate::pipeline::effects::EffectSender;
use crate::pipeline::inventory::{Inventory, StockCounts};
use crate::pipeline::log::{Log, LogError, LogRecord, Record, Topic};
use crate::pipeline::store::{CheckpointWrite, StateStore, StoreError};
use crate::sinks::metrics::Metrics;
use crate::stages::processor::{Input, Retention};
use crate::stages::{Output, PartitionState, Processor};

/// Records read per batch.
pub const READ_BATCH_RECORDS: usize = 4096;
/// How long a read waits for new records before the runner looks at its
/// checkpoint timer and shutdown signal again.
const READ_WAIT_MS: u64 = 50;
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
    #[error("partition {partition}: the effect executor stopped")]
    ExecutorGone { partition: u32 },
}

pub struct RunnerDeps {
    pub log: Arc<dyn Log>,
    pub store: Arc<dyn StateStore>,
    pub effects: EffectSender,
    pub inventory: Arc<Inventory>,
    pub metrics: Arc<Metrics>,
    pub checkpoint: CheckpointConfig,
    /// How long finished orders are remembered (deterministic, log time).
    pub retention: Retention,
    /// Ownership epoch (fences the checkpoints of a former owner).
    pub epoch: u64,
    /// Receives one permit once this partition has recovered (readiness).
    pub recovered: Arc<tokio::sync::Semaphore>,
}

/// What a runner reports when it stops cleanly.
#[derive(Debug, Clone)]
pub struct RunnerExit {
    pub partition: u32,
    pub next_offset: u64,
    pub state_hash: String,
}

/// Loads a partition's checkpointed state: `(state, next_offset)`.
pub async fn load_state(
    store: &dyn StateStore,
    partition: u32,
) -> Result<(PartitionState, u64), RunnerError> {
    let Some(cp) = store
        .load_checkpoint(partition)
        .await
        .map_err(|source| RunnerError::Store { partition, source })?
    else {
        return Ok((PartitionState::default(), 0));
    };
    let state =
        PartitionState::from_rows(cp.rows.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
            .map_err(|detail| RunnerError::BadCheckpoint { partition, detail })?;
    Ok((state, cp.next_offset))
}

/// Runs partition `partition` until `shutdown` turns true, then drains
/// what it read, checkpoints and returns.
pub async fn run(
    partition: u32,
    deps: RunnerDeps,
    mut shutdown: watch::Receiver<bool>,
) -> Result<RunnerExit, RunnerError> {
    let partitions = deps.log.partition_count(Topic::Orders);
    let (state, mut next) = load_state(deps.store.as_ref(), partition).await?;
    let mut processor = Processor::new(partition, partitions, state).with_retention(deps.retention);
    publish_all_stock(&deps, &processor, next);
    for effect in processor.pending_effects() {
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
        .map_err(|source| RunnerError::Log { partition, source })?;
    let mut recovering = true;
    tracing::info!(
        partition,
        next_offset = next,
        catch_up_to,
        "partition checkpoint loaded, replaying the tail"
    );
    let lag = deps
        .metrics
        .partition_lag
        .with_label_values(&["orders", &partition.to_string()]);
    let mut out = Output::default();
    let mut since_checkpoint: u64 = 0;
    let mut last_checkpoint = Instant::now();
    let every = Duration::from_millis(deps.checkpoint.every_ms);
    loop {
        if recovering && next >= catch_up_to {
            recovering = false;
            tracing::info!(partition, next_offset = next, "partition recovered");
            deps.recovered.add_permits(1);
        }
        let stopping = *shutdown.borrow();
        let wait = if stopping {
            Duration::ZERO
        } else {
            Duration::from_millis(READ_WAIT_MS)
        };
        let records = tokio::select! {
            r = deps.log.read(Topic::Orders, partition, next, READ_BATCH_RECORDS, wait) => r.map_err(|source| RunnerError::Log { partition, source })?,
            _ = shutdown.changed(), if !stopping => continue,
        };
        if records.is_empty() && stopping {
            break;
        }
        out.clear();
        for r in &records {
            processor.apply(input(r), &mut out);
            next = r.offset + 1;
        }
        since_checkpoint += records.len() as u64;
        for problem in &out.problems {
            tracing::error!(partition, %problem, "record skipped");
        }
        flush_output(&deps, partition, &mut out).await?;
        publish_stock(&deps, &processor, &out, partition, next);
        if let Ok((_, high)) = deps.log.offsets(Topic::Orders, partition) {
            lag.set(high.saturating_sub(next) as i64);
        }
        if since_checkpoint >= deps.checkpoint.every_messages
            || (since_checkpoint > 0 && last_checkpoint.elapsed() >= every)
        {
            checkpoint(&deps, partition, &mut processor, next).await?;
            since_checkpoint = 0;
            last_checkpoint = Instant::now();
        }
    }
    checkpoint(&deps, partition, &mut processor, next).await?;
    Ok(RunnerExit {
        partition,
        next_offset: next,
        state_hash: processor.state.hash(),
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

/// Makes the output durable: messages and statuses grouped by partition
/// (order kept within each), then hands effects to the executor.
async fn flush_output(
    deps: &RunnerDeps,
    partition: u32,
    out: &mut Output,
) -> Result<(), RunnerError> {
    let orders_n = deps.log.partition_count(Topic::Orders);
    let status_n = deps.log.partition_count(Topic::OrderStatus);
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
    let appends = batches
        .into_iter()
        .map(|((topic, p), records)| append_with_retry(deps.log.as_ref(), topic, p, records));
    for result in futures::future::join_all(appends).await {
        result.map_err(|source| RunnerError::Log { partition, source })?;
    }
    for effect in out.effects.drain(..) {
        deps.effects
            .submit(effect)
            .await
            .map_err(|_| RunnerError::ExecutorGone { partition })?;
    }
    Ok(())
}

/// Appends, backing off while the log is only full; other errors are fatal
/// for the runner (it must not checkpoint past output it could not write).
pub(crate) async fn append_with_retry(
    log: &dyn Log,
    topic: Topic,
    partition: u32,
    records: Vec<Record>,
) -> Result<u64, LogError> {
    let mut delay_ms = 1;
    loop {
        match log.append(topic, partition, records.clone()).await {
            Err(LogError::Full { .. }) => {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                delay_ms = (delay_ms * 2).min(MAX_APPEND_BACKOFF_MS);
            }
            other => return other,
        }
    }
}

async fn checkpoint(
    deps: &RunnerDeps,
    partition: u32,
    processor: &mut Processor,
    next: u64,
) -> Result<(), RunnerError> {
    let started = Instant::now();
    let (puts, deletes) = processor.state.take_changes();
    let write = CheckpointWrite {
        partition,
        epoch: deps.epoch,
        next_offset: next,
        puts,
        deletes,
    };
    deps.store
        .write_checkpoint(write)
        .await
        .map_err(|source| RunnerError::Store { partition, source })?;
    deps.log.release_before(Topic::Orders, partition, next);
    deps.metrics
        .checkpoint_latency
        .with_label_values(&[&partition.to_string()])
        .observe(started.elapsed().as_secs_f64());
    Ok(())
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
        .keys()
        .map(|sku| counts(processor, sku));
    deps.inventory.publish(processor.partition, all, next);
}

fn publish_stock(
    deps: &RunnerDeps,
    processor: &Processor,
    out: &Output,
    partition: u32,
    next: u64,
) {
    let mut touched: Vec<&String> = out.stock_touched.iter().collect();
    touched.sort_unstable();
    touched.dedup();
    deps.inventory.publish(
        partition,
        touched.into_iter().map(|sku| counts(processor, sku)),
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
    retention: Retention,
) -> Result<PartitionState, LogError> {
    let partitions = log.partition_count(Topic::Orders);
    let mut processor =
        Processor::new(partition, partitions, PartitionState::default()).with_retention(retention);
    let mut out = Output::default();
    let mut next = 0;
    while next < until {
        let records = log
            .read(
                Topic::Orders,
                partition,
                next,
                READ_BATCH_RECORDS,
                Duration::ZERO,
            )
            .await?;
        if records.is_empty() {
            break;
        }
        for r in records.iter().take_while(|r| r.offset < until) {
            processor.apply(input(r), &mut out);
            next = r.offset + 1;
        }
        out.clear();
    }
    processor.state.dirty.clear();
    Ok(processor.state)
}
