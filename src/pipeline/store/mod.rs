//! The state store: checkpoints of partition state with their log offsets,
//! intake (idempotency) records, the tracking read model, and what the
//! notifications sink has delivered (with the contacts intake kept). The
//! pipeline sees only the [`StateStore`] trait; redb (embedded) and
//! ScyllaDB implement it, and `crate::app` picks one at start-up.

pub mod embedded;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::{Status, StatusEvent};

/// A partition's state as the store keeps it: opaque rows (key → value)
/// that the processor encodes, plus the offsets it was taken at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionCheckpoint {
    /// The next `orders` offset to process after loading this state.
    pub next_offset: u64,
    /// Ownership epoch of the writer (fencing; always 1 when embedded).
    pub epoch: u64,
    pub rows: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One checkpoint: the rows changed since the last one and the new offset,
/// written atomically (all or nothing, never seen half-done).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointWrite {
    pub partition: u32,
    pub epoch: u64,
    pub next_offset: u64,
    pub puts: Vec<(Vec<u8>, Vec<u8>)>,
    pub deletes: Vec<Vec<u8>>,
}

/// What intake remembers of an accepted order, to answer a repeated
/// request with the first answer (also after a restart) and to check
/// tracking tokens. The token itself is never stored in clear.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntakeRecord {
    pub order_id: String,
    /// SHA-256 of the tracking token, compared in constant time.
    pub token_sha256: [u8; 32],
    /// The token sealed with the store's sealing secret, so the first
    /// answer can be repeated. See `crate::http::tokens`.
    pub sealed_token: Vec<u8>,
    pub partition: u32,
    pub offset: u64,
}

/// One step of an order's history in the read model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub seq: u32,
    pub status: Status,
    pub at_ms: u64,
}

/// A status event newly applied to the read model, with the time of the
/// order's previous status (for stage latencies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub event: StatusEvent,
    pub prev_at_ms: Option<u64>,
}

/// A settled notification: every status event of `order_id` up to `seq`
/// has been delivered to `target` (or given up on after its retries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notified {
    pub target: String,
    pub order_id: String,
    pub seq: u32,
}

/// The tracking read model's view of one order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingView {
    pub order_id: String,
    pub status: Status,
    pub reason: Option<String>,
    pub history: Vec<HistoryEntry>,
}

impl TrackingView {
    /// Applies `event` if it is the next one; returns false for a duplicate
    /// or an out-of-order `seq` (consumers dedupe by `(order_id, seq)`).
    pub fn apply(view: &mut Option<TrackingView>, event: &StatusEvent) -> bool {
        let last = view
            .as_ref()
            .map_or(0, |v| v.history.last().map_or(0, |h| h.seq));
        if event.seq <= last {
            return false;
        }
        let entry = HistoryEntry {
            seq: event.seq,
            status: event.status,
            at_ms: event.at_ms,
        };
        match view {
            Some(v) => {
                v.status = event.status;
                v.reason = event.reason.clone();
                v.history.push(entry);
            }
            None => {
                *view = Some(TrackingView {
                    order_id: event.order_id.clone(),
                    status: event.status,
                    reason: event.reason.clone(),
                    history: vec![entry],
                })
            }
        }
        true
    }
}

#[derive(thiserror::Error, Debug, Clone)]
pub enum StoreError {
    /// A newer owner of the partition has written: this writer must stop.
    #[error(
        "checkpoint of partition {partition} fenced: epoch {epoch} < stored epoch {stored_epoch}"
    )]
    Fenced {
        partition: u32,
        epoch: u64,
        stored_epoch: u64,
    },
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("state store data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The last checkpoint of `partition`, or `None` if it never had one.
    async fn load_checkpoint(
        &self,
        partition: u32,
    ) -> Result<Option<PartitionCheckpoint>, StoreError>;

    /// Writes one checkpoint atomically. Fails with `Fenced` if a higher
    /// epoch has written this partition.
    async fn write_checkpoint(&self, write: CheckpointWrite) -> Result<(), StoreError>;

    async fn get_intake(&self, order_id: &str) -> Result<Option<IntakeRecord>, StoreError>;

    /// Inserts `record` unless one exists for its order id; returns the
    /// record that is stored afterwards (the first one wins).
    async fn put_intake(&self, record: IntakeRecord) -> Result<IntakeRecord, StoreError>;

    /// Next offset per `order-status` partition that sink `sink` has applied.
    async fn sink_positions(&self, sink: &str) -> Result<BTreeMap<u32, u64>, StoreError>;

    /// Applies status events to the tracking read model and moves the
    /// sink's positions, in one atomic write. Duplicates (by `(order_id,
    /// seq)`) are skipped; returns the events that were new, in order.
    async fn apply_tracking(
        &self,
        sink: &str,
        positions: &[(u32, u64)],
        events: &[StatusEvent],
    ) -> Result<Vec<Applied>, StoreError>;

    async fn get_tracking(&self, order_id: &str) -> Result<Option<TrackingView>, StoreError>;

    /// A 32-byte secret named `name`, created at random on first use and
    /// kept in the store from then on.
    async fn secret(&self, name: &str) -> Result<[u8; 32], StoreError>;

    /// Remembers the contact email of an order, for email notifications.
    /// Only intake writes it, before it appends the order. It need not be
    /// durable on return, but must be no later than the next `put_intake`
    /// returns (so every order answered `202` has its contact durable).
    async fn put_contact(&self, order_id: &str, email: &str) -> Result<(), StoreError>;

    /// The contact email of each order id, in input order (`None`: unknown).
    async fn get_contacts(&self, order_ids: &[String]) -> Result<Vec<Option<String>>, StoreError>;

    /// The highest settled notification seq of each `(target, order_id)`,
    /// in input order (`None`: nothing settled yet).
    async fn notified(&self, keys: &[(String, String)]) -> Result<Vec<Option<u32>>, StoreError>;

    /// Records settled notifications (each `(target, order_id)` keeps the
    /// larger seq) and moves the sink's positions (each keeps the larger
    /// offset), in one atomic write.
    async fn record_notified(
        &self,
        sink: &str,
        positions: &[(u32, u64)],
        settled: &[Notified],
    ) -> Result<(), StoreError>;
}
