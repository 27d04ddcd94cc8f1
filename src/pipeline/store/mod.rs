//! The state store: checkpoints of partition state with their log offsets,
//! intake (idempotency) records, the tracking read model, and what the
//! notifications sink has delivered (with the contacts intake kept). The
//! pipeline sees only the [`StateStore`] trait; redb (embedded) and
//! ScyllaDB implement it, and `crate::app` picks one at start-up.

pub mod embedded;
pub mod scylla;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
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

/// A status event newly applied to the read model, with the times of the
/// order's previous and first statuses (for stage and order latencies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub event: StatusEvent,
    pub prev_at_ms: Option<u64>,
    /// When the order was placed (its first status), if this event is not it.
    pub placed_at_ms: Option<u64>,
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
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "StoredView")]
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

/// How a view is stored. The read model holds a row per order for the
/// retention period, so its size is the read model's size: positional,
/// without the order id (the row's key) or the current status (the last
/// entry's), statuses as codes and times as deltas, a confirmed order's
/// value is about 30 bytes where the named form took about 230.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum StoredView {
    /// `[reason, [[seq, status code, ms since the previous entry], …]]`
    /// (the first entry's time is since the epoch).
    Compact(Option<String>, Vec<(u32, u8, i64)>),
    /// The named form of data directories written before 2026-12 (read only).
    Named {
        order_id: String,
        status: Status,
        reason: Option<String>,
        history: Vec<HistoryEntry>,
    },
}

/// Writes the `Compact` form from a borrowed view: the tracking sink
/// encodes every changed view, and `serde(into)` would clone each first.
impl Serialize for TrackingView {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut prev_ms = 0i64;
        let history: Vec<(u32, u8, i64)> = self
            .history
            .iter()
            .map(|h| {
                let at_ms = h.at_ms as i64;
                let delta = at_ms - prev_ms;
                prev_ms = at_ms;
                (h.seq, h.status.code(), delta)
            })
            .collect();
        (&self.reason, history).serialize(serializer)
    }
}

impl TryFrom<StoredView> for TrackingView {
    type Error = String;

    fn try_from(stored: StoredView) -> Result<TrackingView, String> {
        let (order_id, reason, history) = match stored {
            StoredView::Named {
                order_id,
                status,
                reason,
                history,
            } => {
                return Ok(TrackingView {
                    order_id,
                    status,
                    reason,
                    history,
                });
            }
            // The id is the row's key: `keyed` puts it back.
            StoredView::Compact(reason, entries) => {
                let mut at_ms = 0i64;
                let mut history = Vec::with_capacity(entries.len());
                for (seq, code, delta) in entries {
                    at_ms += delta;
                    let status = Status::from_code(code)
                        .ok_or_else(|| format!("unknown status code {code}"))?;
                    let at_ms = u64::try_from(at_ms).map_err(|_| "negative time".to_owned())?;
                    history.push(HistoryEntry { seq, status, at_ms });
                }
                (String::new(), reason, history)
            }
        };
        let status = history.last().ok_or("a view without history")?.status;
        Ok(TrackingView {
            order_id,
            status,
            reason,
            history,
        })
    }
}

impl TrackingView {
    /// The view read from the row of `order_id`: the stored form leaves
    /// the id out (it is the key), so every read puts it back here.
    pub(crate) fn keyed(mut self, order_id: &str) -> TrackingView {
        if self.order_id.is_empty() {
            self.order_id = order_id.to_owned();
        }
        self
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
    /// The disk under the store is full: unavailable until someone frees
    /// space (the embedded store reopens itself then; see there).
    #[error("state store unavailable: disk full: {0}")]
    DiskFull(String),
    #[error("state store data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::DiskFull(_))
    }
}

/// Attempts of a store call that fails with a retryable error (a timeout,
/// a node down) before the caller gives up: with the back-off below, about
/// 15 s in all, longer than a store node's restart or a paused process's
/// stale timers.
pub const STORE_ATTEMPTS: u32 = 10;
const STORE_BACKOFF_FIRST_MS: u64 = 25;
const STORE_BACKOFF_MAX_MS: u64 = 4_000;

/// Runs `call` until it succeeds, fails for good, or fails retryably
/// [`STORE_ATTEMPTS`] times. A full disk ([`StoreError::DiskFull`]) counts
/// no attempt: it lasts until someone frees space, however long that takes,
/// and stopping the instance would not free any. Only for calls that are
/// safe to repeat (checkpoints with the same epoch, idempotent upserts).
pub async fn with_retries<T, F, Fut>(what: &str, mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay_ms = STORE_BACKOFF_FIRST_MS;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e @ StoreError::DiskFull(_)) => {
                tracing::warn!(what, error = %e, "state store call failed; retrying once the disk has space");
            }
            Err(e) if e.is_retryable() && attempt < STORE_ATTEMPTS => {
                tracing::warn!(what, attempt, error = %e, "state store call failed; retrying");
                attempt += 1;
            }
            other => return other,
        }
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        delay_ms = (delay_ms * 2).min(STORE_BACKOFF_MAX_MS);
    }
}

#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The last checkpoint of `partition`, or `None` if it never had one.
    async fn load_checkpoint(
        &self,
        partition: u32,
    ) -> Result<Option<PartitionCheckpoint>, StoreError>;

    /// One row of `partition`'s last checkpoint with the offset it was
    /// taken at: `None` if the partition was never checkpointed. Lets any
    /// instance read state that another instance's runner owns.
    async fn load_row(
        &self,
        partition: u32,
        key: &[u8],
    ) -> Result<Option<(u64, Option<Vec<u8>>)>, StoreError>;

    /// Makes the caller the owner of `partition`: returns a new epoch,
    /// higher than any claimed before, and stores it so that from then on
    /// a checkpoint write with a lower epoch fails with `Fenced` (the
    /// former owner, if it is only paused, cannot overwrite this one).
    async fn claim_partition(&self, partition: u32) -> Result<u64, StoreError>;

    /// Writes one checkpoint atomically. Fails with `Fenced` if a higher
    /// epoch has claimed or written this partition.
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

/// MessagePack (named fields) of a stored record, the encoding of every
/// backend, so a record reads the same whichever store wrote it.
pub(crate) fn encode<T: Serialize>(
    value: &T,
    table: &str,
    key: &str,
) -> Result<Vec<u8>, StoreError> {
    // Encoding our own plain structs cannot fail in practice; report it as
    // unavailable rather than panic if it ever does.
    rmp_serde::to_vec_named(value)
        .map_err(|e| StoreError::Unavailable(format!("encoding {table}[{key:?}]: {e}")))
}

/// Decodes a stored record; bad bytes are `Corrupt`, naming the table and key.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    table: &str,
    key: &str,
) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{table}[{key:?}]: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirmed_view() -> TrackingView {
        let path = [
            Status::Accepted,
            Status::Reserved,
            Status::Paid,
            Status::Confirmed,
        ];
        TrackingView {
            order_id: "ord-0123456789abcdef0123456789abcdef".into(),
            status: Status::Confirmed,
            reason: None,
            history: path
                .iter()
                .enumerate()
                .map(|(i, s)| HistoryEntry {
                    seq: i as u32 + 1,
                    status: *s,
                    at_ms: 1_800_000_000_000 + [0, 40, 15, 30][i] * i as u64,
                })
                .collect(),
        }
    }

    /// A view survives the compact stored form, which stays small.
    #[test]
    fn stored_view_round_trips_compactly() {
        let view = confirmed_view();
        let bytes = encode(&view, "tracking", "k").unwrap();
        assert!(bytes.len() <= 40, "{} bytes", bytes.len());
        assert_eq!(
            decode::<TrackingView>(&bytes, "tracking", "k")
                .unwrap()
                .keyed(&view.order_id),
            view
        );
    }

    /// Rows written in the former named form are still read.
    #[test]
    fn named_views_of_older_data_dirs_are_read() {
        let view = confirmed_view();
        let named = rmp_serde::to_vec_named(&StoredView::Named {
            order_id: view.order_id.clone(),
            status: view.status,
            reason: Some("r".into()),
            history: view.history.clone(),
        })
        .unwrap();
        let back: TrackingView = decode(&named, "tracking", "k").unwrap();
        assert_eq!(back.history, view.history);
        assert_eq!(back.reason.as_deref(), Some("r"));
        let bad = rmp_serde::to_vec(&StoredView::Compact(None, vec![(1, 99, 5)])).unwrap();
        assert!(matches!(
            decode::<TrackingView>(&bad, "t", "k"),
            Err(StoreError::Corrupt(_))
        ));
    }

    /// Runs `with_retries` over a call failing with `error` `failures` times.
    async fn attempts_until(error: StoreError, failures: u32) -> (Result<(), StoreError>, u32) {
        let mut calls = 0;
        let result = with_retries("test", || {
            calls += 1;
            let outcome = if calls <= failures {
                Err(error.clone())
            } else {
                Ok(())
            };
            async move { outcome }
        })
        .await;
        (result, calls)
    }

    /// A full disk is waited out however long it lasts; other retryable
    /// errors give up after `STORE_ATTEMPTS`, and the rest at once.
    #[tokio::test(start_paused = true)]
    async fn retries_a_full_disk_without_limit() {
        let failures = 5 * STORE_ATTEMPTS;
        let (result, calls) =
            attempts_until(StoreError::DiskFull("no space".into()), failures).await;
        assert!(result.is_ok());
        assert_eq!(calls, failures + 1);

        let (result, calls) =
            attempts_until(StoreError::Unavailable("timeout".into()), failures).await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))));
        assert_eq!(calls, STORE_ATTEMPTS);

        let (result, calls) = attempts_until(StoreError::Corrupt("bad".into()), failures).await;
        assert!(matches!(result, Err(StoreError::Corrupt(_))));
        assert_eq!(calls, 1);
    }
}
