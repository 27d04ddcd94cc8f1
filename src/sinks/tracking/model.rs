//! The read model of one `order-status` partition: a bounded map from
//! order key to a compact view, in the order orders were first seen.
//!
//! A pure function of the partition's status records in log order: the
//! same records give the same model, which is why it needs no snapshot
//! (docs/design.md, "The tracking read model"). Bounds: at most
//! `max_orders` views (the oldest go first, finished or not) and none
//! older than `retention_ms` after its first status, in log time (the
//! latest `at_ms` seen).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};

use crate::domain::{OrderKey, Status, StatusEvent};

/// Statuses one order can have at most (accepted, reserved, paid, confirmed).
pub const MAX_HISTORY: usize = 4;

/// One step of an order's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub seq: u32,
    pub status: Status,
    pub at_ms: u64,
}

/// What `GET /v1/orders/{id}` shows of an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackingView {
    pub order_id: String,
    pub status: Status,
    pub reason: Option<String>,
    pub history: Vec<HistoryEntry>,
}

/// A status event the model took (not a duplicate), with the times of the
/// order's previous and first statuses (for stage and order latencies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub event: StatusEvent,
    pub prev_at_ms: Option<u64>,
    /// When the order was placed (its first status), if this event is not it.
    pub placed_at_ms: Option<u64>,
}

/// What happened to one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied(Applied),
    /// Seen before (a replay re-emitted it), or past the last status.
    Duplicate,
    /// An order id also used on another home partition: the model keeps
    /// the history of the first one it saw.
    Conflict,
    /// The order is not in the model and this is not its first status
    /// (it was forgotten, or its first status was before the replay point).
    Unknown,
}

/// The bounds of one partition's model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelLimits {
    pub max_orders: usize,
    pub retention_ms: u64,
}

impl ModelLimits {
    pub fn from_config(c: &crate::config::TrackingConfig) -> ModelLimits {
        ModelLimits {
            max_orders: c.max_orders,
            retention_ms: c.retention_ms,
        }
    }
}

/// A view in 64 bytes: times as deltas, statuses as codes.
#[derive(Clone, Debug)]
struct View {
    first_at_ms: u64,
    /// Offset of the order's first status record (the replay point while
    /// it is the oldest view).
    first_offset: u64,
    /// Time of each later entry since the first (saturating at ~49 days).
    deltas_ms: [u32; MAX_HISTORY - 1],
    statuses: [u8; MAX_HISTORY],
    first_seq: u32,
    /// Home partition of the order (its statuses' source).
    home: Option<u32>,
    len: u8,
    reason: Option<Box<str>>,
}

impl View {
    fn last_seq(&self) -> u32 {
        self.first_seq + u32::from(self.len) - 1
    }

    fn at_ms(&self, i: usize) -> u64 {
        match i {
            0 => self.first_at_ms,
            i => self.first_at_ms + u64::from(self.deltas_ms[i - 1]),
        }
    }

    fn history(&self) -> Vec<HistoryEntry> {
        (0..usize::from(self.len))
            .map(|i| HistoryEntry {
                seq: self.first_seq + i as u32,
                status: Status::from_code(self.statuses[i]).expect("stored from a status"),
                at_ms: self.at_ms(i),
            })
            .collect()
    }
}

/// The key is a hash already: its low bits are the table's hash.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }
}

type Views = HashMap<OrderKey, View, BuildHasherDefault<KeyHasher>>;

/// See the module documentation.
pub struct PartitionModel {
    limits: ModelLimits,
    views: Views,
    /// Keys in the order their views were made, with the view's first offset.
    order: VecDeque<(OrderKey, u64)>,
    /// The latest log time seen: "now" for the retention.
    latest_ms: u64,
    /// The next offset to apply.
    next_offset: u64,
}

impl PartitionModel {
    pub fn new(limits: ModelLimits, next_offset: u64) -> PartitionModel {
        assert!(
            limits.max_orders > 0,
            "a read model holds at least one order"
        );
        PartitionModel {
            limits,
            views: Views::default(),
            order: VecDeque::new(),
            latest_ms: 0,
            next_offset,
        }
    }

    pub fn len(&self) -> usize {
        self.views.len()
    }

    /// Empties the model to be rebuilt from `next_offset` on.
    pub fn restart_at(&mut self, next_offset: u64) {
        *self = PartitionModel::new(self.limits, next_offset);
    }

    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Where a rebuild must start to hold every view this model holds:
    /// the first offset of the oldest view, else the next offset.
    pub fn replay_point(&self) -> u64 {
        self.order
            .front()
            .map_or(self.next_offset, |(_, offset)| *offset)
    }

    /// The view of `order_id`, if held.
    pub fn get(&self, order_id: &str) -> Option<TrackingView> {
        let view = self.views.get(&OrderKey::of(order_id))?;
        let history = view.history();
        Some(TrackingView {
            order_id: order_id.to_owned(),
            status: history.last().expect("a view has a status").status,
            reason: view.reason.as_deref().map(str::to_owned),
            history,
        })
    }

    /// Applies the record at `offset` (records in log order). Records the
    /// position even for an undecodable record (`event` = `None`).
    pub fn apply(&mut self, offset: u64, event: Option<&StatusEvent>) -> Option<Outcome> {
        debug_assert!(offset >= self.next_offset, "records in log order");
        self.next_offset = offset + 1;
        let event = event?;
        self.latest_ms = self.latest_ms.max(event.at_ms);
        let outcome = self.apply_event(offset, event);
        self.expire();
        Some(outcome)
    }

    fn apply_event(&mut self, offset: u64, event: &StatusEvent) -> Outcome {
        let key = OrderKey::of(&event.order_id);
        let home = event.src.map(|s| s.src_partition);
        let Some(view) = self.views.get_mut(&key) else {
            if event.seq != 1 {
                return Outcome::Unknown;
            }
            self.insert(key, offset, event, home);
            return Outcome::Applied(Applied {
                event: event.clone(),
                prev_at_ms: None,
                placed_at_ms: None,
            });
        };
        if view.home.is_some() && home.is_some() && view.home != home {
            return Outcome::Conflict;
        }
        let len = usize::from(view.len);
        if event.seq <= view.last_seq() || len == MAX_HISTORY {
            return Outcome::Duplicate;
        }
        // One writer per order emits its statuses in seq order and the
        // partition keeps that order: a gap means a record between was
        // lost (undecodable), and the view cannot show it.
        if event.seq != view.last_seq() + 1 {
            return Outcome::Unknown;
        }
        let prev_at_ms = view.at_ms(len - 1);
        let delta = event.at_ms.saturating_sub(view.first_at_ms);
        view.deltas_ms[len - 1] = u32::try_from(delta).unwrap_or(u32::MAX);
        view.statuses[len] = event.status.code();
        view.len += 1;
        view.reason = event.reason.as_deref().map(Box::from);
        Outcome::Applied(Applied {
            event: event.clone(),
            prev_at_ms: Some(prev_at_ms),
            placed_at_ms: Some(view.first_at_ms),
        })
    }

    fn insert(&mut self, key: OrderKey, offset: u64, event: &StatusEvent, home: Option<u32>) {
        if self.views.len() == self.limits.max_orders {
            self.pop_oldest();
        }
        let mut statuses = [u8::MAX; MAX_HISTORY];
        statuses[0] = event.status.code();
        self.views.insert(
            key,
            View {
                first_at_ms: event.at_ms,
                first_offset: offset,
                deltas_ms: [0; MAX_HISTORY - 1],
                statuses,
                first_seq: event.seq,
                home,
                len: 1,
                reason: event.reason.as_deref().map(Box::from),
            },
        );
        self.order.push_back((key, offset));
    }

    fn pop_oldest(&mut self) {
        if let Some((key, offset)) = self.order.pop_front()
            && self
                .views
                .get(&key)
                .is_some_and(|v| v.first_offset == offset)
        {
            self.views.remove(&key);
        }
    }

    /// Forgets views older than the retention, oldest first.
    fn expire(&mut self) {
        while let Some((key, _)) = self.order.front() {
            let old = self.views.get(key).is_none_or(|v| {
                v.first_at_ms.saturating_add(self.limits.retention_ms) < self.latest_ms
            });
            if !old {
                break;
            }
            self.pop_oldest();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MsgId;

    fn event(id: &str, seq: u32, status: Status, at_ms: u64) -> StatusEvent {
        StatusEvent {
            order_id: id.into(),
            seq,
            status,
            reason: None,
            at_ms,
            refused_skus: Vec::new(),
            released_lines: 0,
            src: Some(MsgId {
                src_partition: 0,
                src_offset: 0,
                index: 0,
            }),
            email: None,
        }
    }

    fn model(max_orders: usize, retention_ms: u64) -> PartitionModel {
        PartitionModel::new(
            ModelLimits {
                max_orders,
                retention_ms,
            },
            0,
        )
    }

    /// Events build the history in seq order; repeats are dropped.
    #[test]
    fn history_in_order_without_repeats() {
        let mut m = model(10, 1_000_000);
        let path = [
            Status::Accepted,
            Status::Reserved,
            Status::Paid,
            Status::Confirmed,
        ];
        for (i, s) in path.iter().enumerate() {
            let e = event("o1", i as u32 + 1, *s, 100 + i as u64 * 10);
            let offset = 2 * i as u64;
            assert!(matches!(
                m.apply(offset, Some(&e)),
                Some(Outcome::Applied(_))
            ));
            assert_eq!(m.apply(offset + 1, Some(&e)), Some(Outcome::Duplicate));
        }
        let v = m.get("o1").unwrap();
        assert_eq!(v.status, Status::Confirmed);
        assert_eq!(v.history.len(), 4);
        assert_eq!(v.history[3].at_ms, 130);
        assert_eq!(v.history[3].seq, 4);
        assert!(m.get("o2").is_none());
        let late = event("o2", 2, Status::Reserved, 200);
        assert_eq!(m.apply(20, Some(&late)), Some(Outcome::Unknown));
    }

    /// The latency inputs: the previous and first status times.
    #[test]
    fn applied_carries_previous_and_first_times() {
        let mut m = model(10, 1_000_000);
        m.apply(0, Some(&event("o", 1, Status::Accepted, 100)));
        m.apply(1, Some(&event("o", 2, Status::Reserved, 150)));
        let Some(Outcome::Applied(a)) = m.apply(2, Some(&event("o", 3, Status::Paid, 190))) else {
            panic!("applied")
        };
        assert_eq!((a.prev_at_ms, a.placed_at_ms), (Some(150), Some(100)));
    }

    /// The count bound drops the oldest orders first; the replay point
    /// follows the oldest view kept.
    #[test]
    fn count_bound_and_replay_point() {
        let mut m = model(2, 1_000_000);
        for (offset, id) in ["a", "b", "c"].iter().enumerate() {
            m.apply(offset as u64 * 10, Some(&event(id, 1, Status::Accepted, 1)));
        }
        assert_eq!(m.len(), 2);
        assert!(m.get("a").is_none() && m.get("c").is_some());
        assert_eq!(m.replay_point(), 10);
        assert_eq!(m.next_offset(), 21);
        m.apply(21, None);
        assert_eq!(m.next_offset(), 22, "an undecodable record still moves on");
    }

    /// Views older than the retention (log time) are forgotten.
    #[test]
    fn retention_by_log_time() {
        let mut m = model(10, 1_000);
        m.apply(0, Some(&event("a", 1, Status::Accepted, 1_000)));
        m.apply(1, Some(&event("b", 1, Status::Accepted, 1_500)));
        m.apply(2, Some(&event("c", 1, Status::Accepted, 2_001)));
        assert!(m.get("a").is_none(), "1,000 + 1,000 < 2,001");
        assert!(m.get("b").is_some());
        assert_eq!(m.replay_point(), 1);
    }

    /// An order id seen from two home partitions keeps the first one's history.
    #[test]
    fn conflicting_home_partitions() {
        let mut m = model(10, 1_000_000);
        m.apply(0, Some(&event("o", 1, Status::Accepted, 1)));
        let mut other = event("o", 2, Status::OutOfStock, 2);
        other.src = Some(MsgId {
            src_partition: 3,
            src_offset: 0,
            index: 0,
        });
        assert_eq!(m.apply(1, Some(&other)), Some(Outcome::Conflict));
        assert_eq!(m.get("o").unwrap().status, Status::Accepted);
    }

    /// A view is small.
    #[test]
    fn views_are_compact() {
        assert!(
            std::mem::size_of::<View>() <= 72,
            "{}",
            std::mem::size_of::<View>()
        );
    }
}
