//! The tracking read model: every instance keeps, in memory, a bounded view
//! of every order's status history for every `order-status` partition
//! ([`model`]), fed by its own consumer of that topic, and fans new events
//! out to live SSE subscribers. `GET /v1/orders/{id}`, SSE streams and the
//! tracking page read it.
//!
//! It is not snapshotted: the model is a pure function of the retained
//! status records, so a start replays them from the **replay point** (the
//! first record of the oldest order the model holds), which the owner of
//! each `order-status` partition writes to the state store every few
//! seconds ([`run_owner`]) and up to which the embedded log may delete
//! segments. An instance is ready once its models have caught up with the
//! log as it was at start.

pub mod model;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use futures::future::BoxFuture;
use tokio::sync::{broadcast, watch};

use self::model::PartitionModel;
pub use self::model::{Applied, HistoryEntry, ModelLimits, Outcome, TrackingView};
use crate::domain::StatusEvent;
use crate::domain::partition::partition_for_key;
use crate::pipeline::log::{Log, LogError, Topic};
use crate::pipeline::restart::SignalOnce;
use crate::pipeline::sink::{SinkFailure, StatusSink};
use crate::pipeline::store::{Scope, SnapshotWrite, StateStore, StoreError, with_retries};
use crate::pipeline::supervisor::Stop;
use crate::telemetry::metrics::Metrics;

/// Events buffered per live subscription before a slow client lags.
pub const SUBSCRIBER_BUFFER: usize = 64;
/// Status records applied per read.
const READ_BATCH_RECORDS: usize = 4096;
const READ_WAIT_MS: u64 = 50;
/// How often the owner of a partition writes its replay point.
const REPLAY_POINT_EVERY: Duration = Duration::from_secs(5);

pub struct Tracking {
    models: Vec<RwLock<PartitionModel>>,
    /// Partitions whose owner is this instance: it counts their metrics.
    owned: Vec<AtomicBool>,
    /// Per partition, the offset after the last record its model applied.
    applied: Vec<watch::Sender<u64>>,
    metrics: Arc<Metrics>,
    live: Arc<DashMap<String, broadcast::Sender<StatusEvent>>>,
}

/// A live subscription to one order's status events. Dropping the last
/// subscription of an order removes its channel, so the map stays bounded
/// by the streams open now.
pub struct Subscription {
    order_id: String,
    rx: broadcast::Receiver<StatusEvent>,
    live: Arc<DashMap<String, broadcast::Sender<StatusEvent>>>,
}

impl Subscription {
    pub async fn recv(&mut self) -> Result<StatusEvent, broadcast::error::RecvError> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // `self.rx` is still alive here, so "only us" is a count of 1.
        self.live
            .remove_if(&self.order_id, |_, tx| tx.receiver_count() <= 1);
    }
}

impl Tracking {
    /// Models for `partitions` status partitions holding `limits` in all
    /// (each partition's model gets its share of `max_orders`).
    pub fn new(partitions: u32, limits: ModelLimits, metrics: Arc<Metrics>) -> Tracking {
        assert!(partitions > 0, "order-status has no partition");
        let share = ModelLimits {
            max_orders: limits.max_orders.div_ceil(partitions as usize).max(1),
            ..limits
        };
        Tracking {
            models: (0..partitions)
                .map(|_| RwLock::new(PartitionModel::new(share, 0)))
                .collect(),
            owned: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            applied: (0..partitions).map(|_| watch::Sender::new(0)).collect(),
            metrics,
            live: Arc::new(DashMap::new()),
        }
    }

    fn partition_of(&self, order_id: &str) -> usize {
        partition_for_key(order_id.as_bytes(), self.models.len() as u32) as usize
    }

    /// The view of `order_id`, if the read model holds it.
    pub fn get(&self, order_id: &str) -> Option<TrackingView> {
        let model = &self.models[self.partition_of(order_id)];
        model
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(order_id)
    }

    /// Orders the read model holds, over every partition.
    pub fn len(&self) -> usize {
        self.models
            .iter()
            .map(|m| m.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live events of one order from now on. Subscribe before reading the
    /// current view so that no event falls between the two.
    pub fn subscribe(&self, order_id: &str) -> Subscription {
        let rx = self
            .live
            .entry(order_id.to_owned())
            .or_insert_with(|| broadcast::channel(SUBSCRIBER_BUFFER).0)
            .subscribe();
        Subscription {
            order_id: order_id.to_owned(),
            rx,
            live: self.live.clone(),
        }
    }

    /// Open live channels (one per order with a subscriber).
    pub fn live_channels(&self) -> usize {
        self.live.len()
    }

    /// The supervisor tells which partitions this instance owns.
    pub fn set_owned(&self, partition: u32, owned: bool) {
        self.owned[partition as usize].store(owned, Ordering::SeqCst);
    }

    /// Resolves once every partition's model has applied the log as it is
    /// now (what the runners appended while they recovered included), so
    /// that every order acknowledged before is visible.
    pub async fn wait_current(&self, log: &dyn Log) -> Result<(), LogError> {
        for (partition, applied) in (0..).zip(&self.applied) {
            let (_, high) = log.offsets(Topic::OrderStatus, partition).await?;
            let _ = applied.subscribe().wait_for(|next| *next >= high).await;
        }
        Ok(())
    }

    fn replay_point(&self, partition: u32) -> u64 {
        self.models[partition as usize]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .replay_point()
    }

    /// Applies records of `partition` to its model, then hands what was
    /// new to live subscribers and (on the owner) to the metrics.
    fn apply(&self, partition: u32, records: &[crate::pipeline::log::LogRecord]) {
        let mut applied = Vec::new();
        let mut conflicts = 0;
        let size = {
            let mut model = self.models[partition as usize]
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for r in records {
                let event = match StatusEvent::decode(&r.value) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::error!(partition, offset = r.offset, error = %e, "undecodable status record skipped");
                        None
                    }
                };
                match model.apply(r.offset, event.as_ref()) {
                    Some(Outcome::Applied(a)) => applied.push(a),
                    Some(Outcome::Conflict) => conflicts += 1,
                    _ => {}
                }
            }
            model.len()
        };
        let label = partition.to_string();
        self.metrics
            .state_entries
            .with_label_values(&["tracking_orders", &label])
            .set(size as i64);
        if conflicts > 0 {
            self.metrics.tracking_conflicts.inc_by(conflicts);
        }
        let owned = self.owned[partition as usize].load(Ordering::SeqCst);
        for a in &applied {
            if owned {
                self.metrics
                    .observe_status(partition, &a.event, a.prev_at_ms, a.placed_at_ms);
            }
            self.fan_out(&a.event);
        }
    }

    /// Hands an event to this instance's live subscribers. A terminal
    /// status is the last event of an order: its channel goes, and so does
    /// one nobody listens to any more.
    fn fan_out(&self, event: &StatusEvent) {
        self.live.remove_if(&event.order_id, |_, tx| {
            let _ = tx.send(event.clone());
            event.status.is_terminal() || tx.receiver_count() == 0
        });
    }
}

#[derive(thiserror::Error, Debug)]
pub enum SinkError {
    #[error("tracking, partition {partition}: {source}")]
    Log { partition: u32, source: LogError },
    #[error("tracking, partition {partition}: {source}")]
    Store { partition: u32, source: StoreError },
}

impl crate::pipeline::restart::Outage for SinkError {
    fn is_outage(&self) -> bool {
        match self {
            SinkError::Log { source, .. } => source.is_retryable(),
            SinkError::Store { source, .. } => source.is_retryable(),
        }
    }
}

/// Feeds partition `partition`'s model from the stored replay point (or
/// the log's oldest record) until `stop` turns true. Runs on every
/// instance, for every `order-status` partition.
pub async fn run_consumer(
    tracking: Arc<Tracking>,
    log: Arc<dyn Log>,
    store: Arc<dyn StateStore>,
    partition: u32,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SinkError> {
    let log_err = |source| SinkError::Log { partition, source };
    let stored = with_retries("load replay point", || {
        store.load(Scope::Tracking, partition)
    })
    .await
    .map_err(|source| SinkError::Store { partition, source })?;
    let (low, high) = log
        .offsets(Topic::OrderStatus, partition)
        .await
        .map_err(log_err)?;
    let mut next = stored.map_or(low, |s| s.next_offset).max(low);
    tracking.models[partition as usize]
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .restart_at(next);
    tracing::info!(partition, from = next, to = high, "read model replaying");
    let applied = &tracking.applied[partition as usize];
    applied.send_replace(next);
    let lag = tracking.metrics.partition_lag.with_label_values(&[
        Topic::OrderStatus.name(),
        &partition.to_string(),
        "read_model",
    ]);
    lag.set(high.saturating_sub(next) as i64);
    let wait = Duration::from_millis(READ_WAIT_MS);
    loop {
        let read = tokio::select! {
            r = log.read(Topic::OrderStatus, partition, next, READ_BATCH_RECORDS, wait) => r,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let records = match read {
            // Retention deleted records before the replay point: go on from
            // the oldest one kept.
            Err(LogError::OffsetOutOfRange { low, .. }) if next < low => {
                tracing::warn!(
                    partition,
                    from = next,
                    to = low,
                    "status records deleted before the read model applied them"
                );
                next = low;
                applied.send_replace(next);
                continue;
            }
            r => r.map_err(log_err)?,
        };
        let Some(last) = records.last() else {
            continue;
        };
        next = last.offset + 1;
        tracking.apply(partition, &records);
        applied.send_replace(next);
        if let Ok((_, high)) = log.offsets(Topic::OrderStatus, partition).await {
            lag.set(high.saturating_sub(next) as i64);
        }
    }
}

/// The read model's owner of each status partition owned here, as the
/// supervisor runs it.
pub struct OwnerSink {
    pub tracking: Arc<Tracking>,
    pub store: Arc<dyn StateStore>,
    /// The `order-status` log (a release view when notifications read it too).
    pub log: Arc<dyn Log>,
}

impl StatusSink for OwnerSink {
    fn task(&self) -> &'static str {
        "tracking_owner"
    }

    fn run(
        &self,
        partition: u32,
        stop: watch::Receiver<Stop>,
        _started: Option<Arc<SignalOnce>>,
    ) -> BoxFuture<'static, Result<(), SinkFailure>> {
        let (t, store, log) = (self.tracking.clone(), self.store.clone(), self.log.clone());
        Box::pin(async move {
            run_owner(t, store, log, partition, stop)
                .await
                .map_err(|e| Box::new(e) as SinkFailure)
        })
    }

    fn caught_up(&self) -> BoxFuture<'static, Result<(), LogError>> {
        let (t, log) = (self.tracking.clone(), self.log.clone());
        Box::pin(async move { t.wait_current(log.as_ref()).await })
    }
}

/// On the owner of `order-status` partition `partition`: claims it, then
/// writes the model's replay point every [`REPLAY_POINT_EVERY`] (and when
/// stopping) and lets the log delete what lies before it.
pub async fn run_owner(
    tracking: Arc<Tracking>,
    store: Arc<dyn StateStore>,
    log: Arc<dyn Log>,
    partition: u32,
    mut stop: watch::Receiver<Stop>,
) -> Result<(), SinkError> {
    let store_err = |source| SinkError::Store { partition, source };
    let epoch = with_retries("claim replay point", || {
        store.claim(Scope::Tracking, partition)
    })
    .await
    .map_err(store_err)?;
    tracking.set_owned(partition, true);
    let result = async {
        let mut written = None;
        loop {
            let stopping = tokio::select! {
                _ = tokio::time::sleep(REPLAY_POINT_EVERY) => false,
                _ = stop.wait_for(|s| *s != Stop::Run) => true,
            };
            let point = tracking.replay_point(partition);
            if written != Some(point) {
                let write = SnapshotWrite::manifest_only(
                    Scope::Tracking,
                    partition,
                    epoch,
                    point,
                    Vec::new(),
                );
                match with_retries("write replay point", || store.commit(&write)).await {
                    Ok(()) => {}
                    // Another instance owns it now: it writes from here on.
                    Err(StoreError::Fenced { .. }) => return Ok(()),
                    Err(e) => return Err(store_err(e)),
                }
                log.release_before(Topic::OrderStatus, partition, point);
                written = Some(point);
            }
            if stopping {
                return Ok(());
            }
        }
    }
    .await;
    tracking.set_owned(partition, false);
    // Whoever owns the partition next watches its orders in flight; kept
    // here they would look stuck forever.
    tracking.metrics.forget_status_partition(partition);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Status;

    fn event(seq: u32, status: Status) -> StatusEvent {
        StatusEvent {
            order_id: "o1".into(),
            seq,
            status,
            reason: None,
            at_ms: u64::from(seq),
            refused_skus: Vec::new(),
            released_lines: 0,
            src: None,
            email: None,
        }
    }

    fn tracking() -> Tracking {
        let limits = ModelLimits {
            max_orders: 100,
            retention_ms: 1_000_000,
        };
        Tracking::new(2, limits, Arc::new(Metrics::new()))
    }

    /// Live events reach subscribers; channels go when the order ends or
    /// when the last subscriber leaves, so the map stays bounded.
    #[tokio::test]
    async fn subscriptions_fan_out_and_clean_up() {
        let t = tracking();
        let mut sub = t.subscribe("o1");
        t.fan_out(&event(1, Status::Accepted));
        assert_eq!(sub.recv().await.unwrap().seq, 1);
        t.fan_out(&event(2, Status::OutOfStock));
        assert_eq!(sub.recv().await.unwrap().status, Status::OutOfStock);
        assert_eq!(t.live_channels(), 0, "a terminal status closes the channel");
        drop(sub);
        let late = t.subscribe("o1");
        assert_eq!(t.live_channels(), 1);
        drop(late);
        assert_eq!(t.live_channels(), 0, "a late viewer leaves nothing behind");
    }

    /// Records applied to a partition show in `get` and go to subscribers.
    #[tokio::test]
    async fn applied_records_are_visible_and_live() {
        let t = tracking();
        let p = t.partition_of("o1") as u32;
        let mut sub = t.subscribe("o1");
        let records: Vec<_> = [event(1, Status::Accepted), event(1, Status::Accepted)]
            .iter()
            .enumerate()
            .map(|(i, e)| crate::pipeline::log::LogRecord {
                offset: i as u64,
                timestamp_ms: 0,
                kind: crate::domain::RecordKind::Internal,
                key: b"o1".to_vec(),
                value: e.encode(),
            })
            .collect();
        t.apply(p, &records);
        assert_eq!(t.get("o1").unwrap().status, Status::Accepted);
        assert_eq!(sub.recv().await.unwrap().seq, 1);
        assert!(
            sub.rx.try_recv().is_err(),
            "the duplicate is not sent again"
        );
        assert_eq!(t.len(), 1);
    }
}
