//! The tracking read model: a consumer of `order-status` that dedupes by
//! `(order_id, seq)`, persists each order's view in the state store together
//! with its own position (one atomic write), counts metrics, and fans new
//! events out to live SSE subscribers.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::broadcast;

use crate::domain::StatusEvent;
use crate::pipeline::store::{Applied, StateStore, StoreError, TrackingView, with_retries};
use crate::pipeline::supervisor::Stop;
use crate::sinks::metrics::Metrics;

/// Events buffered per live subscription before a slow client lags.
pub const SUBSCRIBER_BUFFER: usize = 64;

pub struct Tracking {
    store: Arc<dyn StateStore>,
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
    pub fn new(store: Arc<dyn StateStore>, metrics: Arc<Metrics>) -> Tracking {
        Tracking {
            store,
            metrics,
            live: Arc::new(DashMap::new()),
        }
    }

    pub async fn get(&self, order_id: &str) -> Result<Option<TrackingView>, StoreError> {
        self.store.get_tracking(order_id).await
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

    /// Hands events newly applied from `order-status` partition
    /// `partition` to live subscribers and metrics.
    pub fn publish(&self, partition: u32, applied: &[Applied]) {
        for a in applied {
            self.metrics
                .observe_status(partition, &a.event, a.prev_at_ms, a.placed_at_ms);
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

    fn has_subscriber(&self, order_id: &[u8]) -> bool {
        std::str::from_utf8(order_id).is_ok_and(|id| self.live.contains_key(id))
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }
}

/// Name of the tracking sink's positions in the state store.
pub const SINK_NAME: &str = "tracking";
/// Status records applied per store transaction.
const SINK_BATCH_RECORDS: usize = 4096;
const SINK_READ_WAIT_MS: u64 = 50;

#[derive(thiserror::Error, Debug)]
pub enum SinkError {
    #[error("tracking sink, partition {partition}: {source}")]
    Log {
        partition: u32,
        source: crate::pipeline::log::LogError,
    },
    #[error("tracking sink, partition {partition}: {source}")]
    Store { partition: u32, source: StoreError },
}

/// Consumes one `order-status` partition into the read model from `next`
/// until `stop` leaves `Stop::Run`: `Drain` applies what the log holds
/// now first, `Now` only the batch in hand (the next owner goes on from
/// the stored position).
pub async fn run_sink(
    tracking: Arc<Tracking>,
    log: Arc<dyn crate::pipeline::log::Log>,
    partition: u32,
    next: u64,
    stop: tokio::sync::watch::Receiver<Stop>,
) -> Result<(), SinkError> {
    let metrics = tracking.metrics.clone();
    let result = consume(tracking, log, partition, next, stop).await;
    // Whoever consumes the partition next watches its orders in flight;
    // kept here they would look stuck forever.
    metrics.forget_status_partition(partition);
    result
}

async fn consume(
    tracking: Arc<Tracking>,
    log: Arc<dyn crate::pipeline::log::Log>,
    partition: u32,
    mut next: u64,
    mut stop: tokio::sync::watch::Receiver<Stop>,
) -> Result<(), SinkError> {
    use crate::pipeline::log::Topic;
    use std::time::Duration;
    let lag = tracking
        .metrics
        .partition_lag
        .with_label_values(&["order-status", &partition.to_string()]);
    loop {
        let mode = *stop.borrow();
        if mode == Stop::Now {
            return Ok(());
        }
        let stopping = mode == Stop::Drain;
        let wait = Duration::from_millis(if stopping { 0 } else { SINK_READ_WAIT_MS });
        let records = tokio::select! {
            r = log.read(Topic::OrderStatus, partition, next, SINK_BATCH_RECORDS, wait) => r.map_err(|source| SinkError::Log { partition, source })?,
            changed = stop.changed(), if !stopping => {
                if changed.is_err() {
                    return Ok(());
                }
                continue;
            }
        };
        let Some(last) = records.last() else {
            if stopping {
                return Ok(());
            }
            continue;
        };
        next = last.offset + 1;
        let mut events = Vec::with_capacity(records.len());
        for r in &records {
            match StatusEvent::decode(&r.value) {
                Ok(e) => events.push(e),
                Err(e) => {
                    tracing::error!(partition, offset = r.offset, error = %e, "undecodable status record skipped")
                }
            }
        }
        // Applying is idempotent (deduped by seq), so a retry is safe.
        let position = [(partition, next)];
        let applied = with_retries("apply_tracking", || {
            tracking.store.apply_tracking(SINK_NAME, &position, &events)
        })
        .await
        .map_err(|source| SinkError::Store { partition, source })?;
        tracking.publish(partition, &applied);
        log.release_before(Topic::OrderStatus, partition, next);
        if let Ok((_, high)) = log.offsets(Topic::OrderStatus, partition) {
            lag.set(high.saturating_sub(next) as i64);
        }
    }
}

/// Distributed deployment: every instance follows every `order-status`
/// partition from its end, so a customer's live stream works on any
/// instance while the partition's read model is written by its owner.
/// Only records of orders someone here is watching are decoded; SSE
/// streams dedupe by `seq` what the owner's sink also hands them.
pub async fn run_live_feed(
    tracking: Arc<Tracking>,
    log: Arc<dyn crate::pipeline::log::Log>,
    partition: u32,
    mut stop: tokio::sync::watch::Receiver<Stop>,
) -> Result<(), SinkError> {
    use crate::pipeline::log::Topic;
    use std::time::Duration;
    let (_, mut next) = log
        .offsets(Topic::OrderStatus, partition)
        .map_err(|source| SinkError::Log { partition, source })?;
    let wait = Duration::from_millis(SINK_READ_WAIT_MS);
    loop {
        let records = tokio::select! {
            r = log.read(Topic::OrderStatus, partition, next, SINK_BATCH_RECORDS, wait) => r.map_err(|source| SinkError::Log { partition, source })?,
            _ = async { let _ = stop.wait_for(|s| *s != Stop::Run).await; } => return Ok(()),
        };
        let Some(last) = records.last() else {
            continue;
        };
        next = last.offset + 1;
        for r in records.iter().filter(|r| tracking.has_subscriber(&r.key)) {
            if let Ok(event) = StatusEvent::decode(&r.value) {
                tracking.fan_out(&event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Status;
    use crate::pipeline::store::embedded::EmbeddedStore;

    fn event(seq: u32, status: Status) -> StatusEvent {
        StatusEvent {
            order_id: "o1".into(),
            seq,
            status,
            reason: None,
            at_ms: u64::from(seq),
            refused_skus: Vec::new(),
            released_lines: 0,
        }
    }

    /// Live events reach subscribers; channels go when the order ends or
    /// when the last subscriber leaves, so the map stays bounded.
    #[tokio::test]
    async fn subscriptions_fan_out_and_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let t = Tracking::new(store, Arc::new(Metrics::new()));
        let mut sub = t.subscribe("o1");
        t.publish(
            0,
            &[Applied {
                event: event(1, Status::Accepted),
                prev_at_ms: None,
                placed_at_ms: None,
            }],
        );
        assert_eq!(sub.recv().await.unwrap().seq, 1);
        t.publish(
            0,
            &[Applied {
                event: event(2, Status::OutOfStock),
                prev_at_ms: Some(1),
                placed_at_ms: Some(1),
            }],
        );
        assert_eq!(sub.recv().await.unwrap().status, Status::OutOfStock);
        assert_eq!(t.live_channels(), 0, "a terminal status closes the channel");
        drop(sub);
        let late = t.subscribe("o1");
        assert_eq!(t.live_channels(), 1);
        drop(late);
        assert_eq!(t.live_channels(), 0, "a late viewer leaves nothing behind");
    }
}
