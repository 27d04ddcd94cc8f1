//! The tracking read model: a consumer of `order-status` that dedupes by
//! `(order_id, seq)`, persists each order's view in the state store together
//! with its own position (one atomic write), counts metrics, and fans new
//! events out to live SSE subscribers.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::broadcast;

use crate::domain::StatusEvent;
use crate::pipeline::store::{Applied, StateStore, StoreError, TrackingView};
use crate::sinks::metrics::Metrics;

/// Events buffered per live subscription before a slow client lags.
pub const SUBSCRIBER_BUFFER: usize = 64;

pub struct Tracking {
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    live: DashMap<String, broadcast::Sender<StatusEvent>>,
}

impl Tracking {
    pub fn new(store: Arc<dyn StateStore>, metrics: Arc<Metrics>) -> Tracking {
        Tracking {
            store,
            metrics,
            live: DashMap::new(),
        }
    }

    pub async fn get(&self, order_id: &str) -> Result<Option<TrackingView>, StoreError> {
        self.store.get_tracking(order_id).await
    }

    /// Live events of one order from now on. Subscribe before reading the
    /// current view so that no event falls between the two.
    pub fn subscribe(&self, order_id: &str) -> broadcast::Receiver<StatusEvent> {
        self.live
            .entry(order_id.to_owned())
            .or_insert_with(|| broadcast::channel(SUBSCRIBER_BUFFER).0)
            .subscribe()
    }

    /// Hands newly applied events to live subscribers and metrics.
    pub fn publish(&self, applied: &[Applied]) {
        for Applied { event, prev_at_ms } in applied {
            self.metrics.observe_status(event, *prev_at_ms);
            // A terminal status is the last event of an order: its channel
            // goes, and so does one nobody listens to any more.
            self.live.remove_if(&event.order_id, |_, tx| {
                let _ = tx.send(event.clone());
                event.status.is_terminal() || tx.receiver_count() == 0
            });
        }
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
/// until `shutdown`, after which it drains what is there and returns.
pub async fn run_sink(
    tracking: Arc<Tracking>,
    log: Arc<dyn crate::pipeline::log::Log>,
    partition: u32,
    mut next: u64,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), SinkError> {
    use crate::pipeline::log::Topic;
    use std::time::Duration;
    let lag = tracking
        .metrics
        .partition_lag
        .with_label_values(&["order-status", &partition.to_string()]);
    loop {
        let stopping = *shutdown.borrow();
        let wait = Duration::from_millis(if stopping { 0 } else { SINK_READ_WAIT_MS });
        let records = tokio::select! {
            r = log.read(Topic::OrderStatus, partition, next, SINK_BATCH_RECORDS, wait) => r.map_err(|source| SinkError::Log { partition, source })?,
            _ = shutdown.changed(), if !stopping => continue,
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
            match rmp_serde::from_slice::<StatusEvent>(&r.value) {
                Ok(e) => events.push(e),
                Err(e) => {
                    tracing::error!(partition, offset = r.offset, error = %e, "undecodable status record skipped")
                }
            }
        }
        let applied = tracking
            .store
            .apply_tracking(SINK_NAME, &[(partition, next)], &events)
            .await
            .map_err(|source| SinkError::Store { partition, source })?;
        tracking.publish(&applied);
        log.release_before(Topic::OrderStatus, partition, next);
        if let Ok((_, high)) = log.offsets(Topic::OrderStatus, partition) {
            lag.set(high.saturating_sub(next) as i64);
        }
    }
}
