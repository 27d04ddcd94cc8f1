//! Partition state and its logical hash. How it is written to the store
//! is `super::snapshot`'s business; bounds are in `super::processor::Limits`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::parked::ParkedRecord;
use crate::domain::{Effect, EffectKind, Envelope, Message, RecordKind, Status};

use super::finished::Finished;

/// A loaded snapshot's state breaks an invariant the processor keeps: the
/// stored data is corrupt (never the input's fault; retrying cannot help).
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum StateError {
    #[error("SKU {sku:?} is not in the stock run from bucket {first}")]
    ForeignSku { sku: String, first: u16 },
    #[error("SKU {sku:?} appears twice in the stock (run from bucket {first})")]
    DuplicateSku { sku: String, first: u16 },
    #[error("stock of {sku:?} breaks conservation: {counters}")]
    NotConserved { sku: String, counters: String },
    #[error("holds of {sku:?} exceed the stock's reserved count")]
    HoldsExceedReserved { sku: String },
}

impl StateError {
    pub fn fault(&self) -> crate::domain::fault::Fault {
        crate::domain::fault::Fault::Internal
    }
}

/// Largest `available` a stock change may set, at every edge (HTTP, CLI,
/// log records): far above any real stock, and far enough below `u64::MAX`
/// that no sequence of changes can wrap the counters (they are checked
/// anyway).
pub const MAX_AVAILABLE: u64 = 1_000_000_000_000;

/// Stock counters of one SKU. `supplied` is everything ever made available
/// (initial stock plus restocks, minus reductions), kept so conservation is
/// checked on every change: supplied = available + reserved + sold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    pub supplied: u64,
}

impl Stock {
    /// Whether supplied = available + reserved + sold, without wrapping.
    pub fn is_conserved(&self) -> bool {
        self.available
            .checked_add(self.reserved)
            .and_then(|t| t.checked_add(self.sold))
            == Some(self.supplied)
    }

    pub fn assert_conserved(&self) {
        assert!(self.is_conserved(), "stock conservation broken: {self:?}");
    }

    /// The counters after setting `available` (an admin change), or `None`
    /// if `supplied` would leave `u64`.
    pub fn with_available(&self, available: u64) -> Option<Stock> {
        let supplied = (self.supplied - self.available).checked_add(available)?;
        Some(Stock {
            available,
            supplied,
            ..self.clone()
        })
    }
}

/// Buckets of the stock table: a snapshot rewrites only the runs of buckets
/// whose SKUs changed. A power of two, so a bucket is a bit mask of a hash.
pub const STOCK_BUCKETS: usize = 1024;

/// The stock counters of a partition's SKUs, in [`STOCK_BUCKETS`] buckets
/// by a hash of the SKU, with the buckets changed since the last snapshot
/// (which is bookkeeping of the snapshot writer, not state: equality and
/// `Debug` leave it out).
#[derive(Clone)]
pub struct StockTable {
    buckets: Vec<BTreeMap<String, Stock>>,
    len: usize,
    dirty: BTreeSet<u16>,
}

impl PartialEq for StockTable {
    fn eq(&self, other: &StockTable) -> bool {
        self.buckets == other.buckets
    }
}

impl Eq for StockTable {}

impl std::fmt::Debug for StockTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Default for StockTable {
    fn default() -> Self {
        StockTable {
            buckets: vec![BTreeMap::new(); STOCK_BUCKETS],
            len: 0,
            dirty: BTreeSet::new(),
        }
    }
}

impl StockTable {
    /// The bucket of `sku`. Not the partitioner's hash: every SKU of a
    /// partition has the same partitioner hash modulo the partition count,
    /// which would leave most buckets empty.
    pub fn bucket_of(sku: &str) -> u16 {
        (crc32c::crc32c(sku.as_bytes()) as usize % STOCK_BUCKETS) as u16
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, sku: &str) -> Option<&Stock> {
        self.buckets[usize::from(Self::bucket_of(sku))].get(sku)
    }

    /// The counters of `sku` to change; its bucket goes in the next snapshot.
    pub fn get_mut(&mut self, sku: &str) -> Option<&mut Stock> {
        let bucket = Self::bucket_of(sku);
        let stock = self.buckets[usize::from(bucket)].get_mut(sku)?;
        self.dirty.insert(bucket);
        Some(stock)
    }

    /// Sets the counters of `sku`, adding it if new.
    pub fn insert(&mut self, sku: String, stock: Stock) {
        let bucket = Self::bucket_of(&sku);
        if self.buckets[usize::from(bucket)]
            .insert(sku, stock)
            .is_none()
        {
            self.len += 1;
        }
        self.dirty.insert(bucket);
    }

    /// Every SKU in bucket order, then SKU order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Stock)> {
        self.buckets.iter().flatten()
    }

    pub fn bucket(&self, bucket: u16) -> &BTreeMap<String, Stock> {
        &self.buckets[usize::from(bucket)]
    }

    /// Puts the rows of a loaded stock page back (every SKU must hash to
    /// one of `buckets`, the page's run, and appear in one page only).
    pub fn restore_rows(
        &mut self,
        buckets: std::ops::Range<u16>,
        rows: Vec<(String, Stock)>,
    ) -> Result<(), StateError> {
        let first = buckets.start;
        for (sku, stock) in rows {
            let bucket = Self::bucket_of(&sku);
            if !buckets.contains(&bucket) {
                return Err(StateError::ForeignSku { sku, first });
            }
            if self.buckets[usize::from(bucket)]
                .insert(sku.clone(), stock)
                .is_some()
            {
                return Err(StateError::DuplicateSku { sku, first });
            }
            self.len += 1;
        }
        Ok(())
    }

    /// The buckets changed since the last call, in order.
    pub fn take_dirty(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LineState {
    /// A reserve message is on its way to the line's partition.
    Pending,
    Held,
    /// The line's partition had too little stock.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaLine {
    pub sku: String,
    pub quantity: u32,
    pub state: LineState,
}

/// An order in flight at its home partition, from acceptance until a
/// terminal status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    pub lines: Vec<SagaLine>,
    /// Key that routes replies back to this (home) partition.
    pub home_key: String,
    pub amount: u64,
    pub currency: String,
    /// Payment token (never a card number) until authorization is asked.
    pub token: String,
    /// Set once every line is held and the authorization effect is out.
    pub authorizing: bool,
    /// The contact email, put on the order's terminal status event for
    /// the notifications sink; kept nowhere once the order is finished.
    pub email: Option<String>,
}

/// An order in flight. Once terminal it leaves `orders` for the finished set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRec {
    pub seq: u32,
    pub status: Status,
    pub saga: Option<Saga>,
}

/// A line held on this partition for some order's saga (local or remote).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub sku: String,
    pub quantity: u32,
}

/// All state of one partition. Ordered maps only: iteration order is part
/// of determinism (the finished set's hash index is only looked up).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionState {
    pub stock: StockTable,
    /// Orders in flight at this (their home) partition.
    pub orders: BTreeMap<String, OrderRec>,
    pub holds: BTreeMap<(String, u16), Hold>,
    /// Per source partition, the highest message id applied: (offset, index).
    pub watermarks: BTreeMap<u32, (u64, u32)>,
    /// Effects asked for and not yet reported done.
    pub outbox: BTreeMap<(String, EffectKind), Effect>,
    /// Captures and voids of the outbox the gateway refused for good, with
    /// the reason: not run again until an operator retries them. Every key
    /// is one of the outbox's.
    pub failed_effects: BTreeMap<(String, EffectKind), String>,
    /// The park lane of this partition: records set aside, by offset.
    pub parked: BTreeMap<u64, ParkedRecord>,
    /// Orders that finished recently (idempotency).
    pub finished: Finished,
    /// The park lane's indexes (derived from `parked`, not part of the
    /// state), so that parking and the check every record makes while the
    /// lane is not empty cost O(log n), not a scan of the lane.
    lane: LaneIndex,
}

/// Indexes of the park lane: which parked records hold back later records
/// with their key (SKU) or about their order, and a digest of each
/// record's bytes to tell a re-sent copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct LaneIndex {
    by_key: BTreeMap<Vec<u8>, BTreeSet<u64>>,
    by_order: BTreeMap<String, BTreeSet<u64>>,
    by_digest: BTreeMap<[u8; 32], BTreeSet<u64>>,
    /// Bytes the lane holds (see [`parked_size`]).
    bytes: usize,
    /// The lane changed since the last snapshot took it.
    changed: Unsaved,
}

/// A change flag for snapshots, which equality ignores: two states are
/// equal whatever was written when.
#[derive(Clone, Copy, Debug, Default)]
struct Unsaved(bool);

impl PartialEq for Unsaved {
    fn eq(&self, _: &Unsaved) -> bool {
        true
    }
}

impl Eq for Unsaved {}

/// SHA-256 over what makes two parked records copies of each other.
fn lane_digest(r: &ParkedRecord) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([r.kind as u8]);
    h.update((r.key.len() as u64).to_le_bytes());
    h.update(&r.key);
    h.update(&r.value);
    h.finalize().into()
}

/// The keys and orders a parked record holds back: its own, and for a
/// results record (`Message::Results`) those of each of its results.
fn held_back(r: &ParkedRecord) -> (Vec<Vec<u8>>, Vec<String>) {
    let mut keys = vec![r.key.clone()];
    let mut orders: Vec<String> = r.order_id.iter().cloned().collect();
    if r.kind == RecordKind::Internal
        && let Ok(Envelope {
            body: Message::Results { results },
            ..
        }) = Envelope::decode(&r.value)
    {
        for result in results {
            orders.extend(result.body.order_id().map(str::to_owned));
            keys.push(result.key.into_bytes());
        }
    }
    (keys, orders)
}

impl LaneIndex {
    fn add(&mut self, offset: u64, r: &ParkedRecord) {
        let (keys, orders) = held_back(r);
        for key in keys {
            self.by_key.entry(key).or_default().insert(offset);
        }
        for id in orders {
            self.by_order.entry(id).or_default().insert(offset);
        }
        self.by_digest
            .entry(lane_digest(r))
            .or_default()
            .insert(offset);
        self.bytes += parked_size(r);
        self.changed = Unsaved(true);
    }

    fn remove(&mut self, offset: u64, r: &ParkedRecord) {
        fn take<K: Ord + std::borrow::Borrow<Q>, Q: Ord + ?Sized>(
            map: &mut BTreeMap<K, BTreeSet<u64>>,
            at: &Q,
            offset: u64,
        ) {
            if let Some(set) = map.get_mut(at) {
                set.remove(&offset);
                if set.is_empty() {
                    map.remove(at);
                }
            }
        }
        let (keys, orders) = held_back(r);
        for key in keys {
            take(&mut self.by_key, key.as_slice(), offset);
        }
        for id in orders {
            take(&mut self.by_order, id.as_str(), offset);
        }
        take(&mut self.by_digest, &lane_digest(r), offset);
        self.bytes -= parked_size(r);
        self.changed = Unsaved(true);
    }
}

/// What a parked record counts against `max_parked_bytes`.
pub fn parked_size(r: &ParkedRecord) -> usize {
    r.key.len() + r.value.len() + r.reason.len() + r.order_id.as_ref().map_or(0, String::len)
}

impl PartitionState {
    /// Sets a record aside in the park lane.
    pub fn park(&mut self, offset: u64, record: ParkedRecord) {
        self.unpark(offset);
        self.lane.add(offset, &record);
        self.parked.insert(offset, record);
    }

    /// Takes a record out of the park lane.
    pub fn unpark(&mut self, offset: u64) -> Option<ParkedRecord> {
        let record = self.parked.remove(&offset)?;
        self.lane.remove(offset, &record);
        Some(record)
    }

    pub fn parked_bytes(&self) -> usize {
        self.lane.bytes
    }

    /// Whether the lane changed since the last call (the next snapshot
    /// rewrites its pages only then).
    pub fn take_lane_changed(&mut self) -> bool {
        std::mem::take(&mut self.lane.changed.0)
    }

    pub fn has_blocked(&self) -> bool {
        !self.parked.is_empty()
    }

    /// The offset of a parked record with the same kind, key and bytes.
    pub fn parked_copy_of(&self, record: &ParkedRecord) -> Option<u64> {
        let offset = *self.lane.by_digest.get(&lane_digest(record))?.first()?;
        let parked = &self.parked[&offset];
        // A digest collision is out of reach, but a wrong answer here would
        // drop a record: compare the bytes.
        (parked.kind == record.kind && parked.key == record.key && parked.value == record.value)
            .then_some(offset)
    }

    /// The offset of the parked record (the first) that holds back a
    /// record with `key` about `order_id`, if any.
    pub fn blocked_by(&self, key: &[u8], order_id: Option<&str>) -> Option<u64> {
        if self.parked.is_empty() {
            return None;
        }
        let first = |set: Option<&BTreeSet<u64>>| set.and_then(|s| s.first().copied());
        let by_key = first(self.lane.by_key.get(key));
        let by_order = order_id.and_then(|id| first(self.lane.by_order.get(id)));
        by_key.into_iter().chain(by_order).min()
    }

    /// The stock invariants the inventory stage asserts on every change. A
    /// snapshot that breaks them is corrupt: refusing it here names the
    /// SKU, where loading it would panic at the first record for the SKU.
    pub fn check_stock(&self) -> Result<(), StateError> {
        for (sku, stock) in self.stock.iter() {
            if !stock.is_conserved() {
                return Err(StateError::NotConserved {
                    sku: sku.clone(),
                    counters: format!("{stock:?}"),
                });
            }
        }
        let mut held: BTreeMap<&str, u64> = BTreeMap::new();
        for hold in self.holds.values() {
            let sum = held.entry(&hold.sku).or_default();
            *sum = sum.saturating_add(u64::from(hold.quantity));
        }
        for (sku, quantity) in held {
            if self.stock.get(sku).is_none_or(|s| s.reserved < quantity) {
                return Err(StateError::HoldsExceedReserved {
                    sku: sku.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// SHA-256 over the logical state (hex): every part in a canonical
    /// order, independent of how a snapshot cuts it into pages and chunks.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        let mut item = |tag: u8, bytes: &[u8]| {
            h.update([tag]);
            h.update((bytes.len() as u32).to_le_bytes());
            h.update(bytes);
        };
        let mut skus: Vec<(&String, &Stock)> = self.stock.iter().collect();
        skus.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for row in skus {
            item(b'S', &encode(&row));
        }
        for row in &self.orders {
            item(b'O', &encode(&row));
        }
        for row in &self.holds {
            item(b'H', &encode(&row));
        }
        for row in &self.watermarks {
            item(b'W', &encode(&row));
        }
        for row in &self.outbox {
            item(b'X', &encode(&row));
        }
        for row in &self.failed_effects {
            item(b'F', &encode(&row));
        }
        for row in &self.parked {
            item(b'P', &encode(&row));
        }
        for (number, e) in self.finished.iter() {
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&number.to_le_bytes());
            bytes[8..24].copy_from_slice(&e.key.0);
            bytes[24..].copy_from_slice(&e.stamp.to_le_bytes());
            item(b'F', &bytes);
        }
        hex::encode(h.finalize())
    }

    /// Rebuilds the derived indexes after the parts were loaded.
    pub(crate) fn reindex(&mut self) {
        self.lane = LaneIndex::default();
        for (offset, record) in &self.parked {
            self.lane.add(*offset, record);
        }
        // As loaded: the snapshot already holds it.
        self.lane.changed = Unsaved(false);
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec(v).expect("state always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stock change that would overflow `supplied` is refused, not wrapped.
    #[test]
    fn stock_changes_never_wrap() {
        let sold = Stock {
            available: 0,
            reserved: 0,
            sold: u64::MAX - 5,
            supplied: u64::MAX - 5,
        };
        assert_eq!(sold.with_available(5).unwrap().supplied, u64::MAX);
        assert!(sold.with_available(6).is_none());
        let wrapped = Stock {
            available: u64::MAX,
            reserved: 1,
            sold: 0,
            supplied: 0,
        };
        assert!(!wrapped.is_conserved());
    }

    /// Buckets hold their SKUs; changes mark buckets for the next snapshot.
    #[test]
    fn stock_table_buckets() {
        let mut t = StockTable::default();
        t.insert("A".into(), Stock::default());
        t.insert("B".into(), Stock::default());
        t.insert("A".into(), Stock::default());
        assert_eq!(t.len(), 2);
        let dirty = t.take_dirty();
        let mut expected = vec![StockTable::bucket_of("A"), StockTable::bucket_of("B")];
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(dirty, expected);
        assert!(t.take_dirty().is_empty());
        t.get_mut("A").unwrap().available = 3;
        assert_eq!(t.take_dirty(), [StockTable::bucket_of("A")]);
        let bucket = StockTable::bucket_of("A");
        let wrong = (bucket + 1) % STOCK_BUCKETS as u16;
        let rows: Vec<_> = t.bucket(bucket).clone().into_iter().collect();
        assert!(
            t.clone()
                .restore_rows(wrong..wrong + 1, rows.clone())
                .is_err()
        );
        assert!(
            t.clone().restore_rows(bucket..bucket + 1, rows).is_err(),
            "twice"
        );
    }

    /// Holds beyond the reserved stock, or of a SKU without stock, are refused.
    #[test]
    fn refuses_hold_beyond_reserved() {
        let mut s = PartitionState::default();
        s.holds.insert(
            ("o1".into(), 0),
            Hold {
                sku: "A".into(),
                quantity: 2,
            },
        );
        assert!(
            s.check_stock()
                .unwrap_err()
                .to_string()
                .contains("reserved")
        );
        s.stock.insert(
            "A".into(),
            Stock {
                available: 0,
                reserved: 1,
                sold: 0,
                supplied: 1,
            },
        );
        assert!(s.check_stock().is_err());
        s.stock.get_mut("A").unwrap().reserved = 2;
        s.stock.get_mut("A").unwrap().supplied = 2;
        assert!(s.check_stock().is_ok());
    }

    mod lane {
        use proptest::prelude::*;

        use super::super::*;
        use crate::domain::RecordKind;

        fn record(offset: u64, key: u8, order: Option<u8>, value: u8) -> ParkedRecord {
            ParkedRecord {
                partition: 0,
                offset,
                timestamp_ms: 0,
                kind: RecordKind::Internal,
                key: vec![b'k', key],
                value: vec![value; usize::from(value)],
                reason: "r".into(),
                order_id: order.map(|o| format!("o-{o}")),
            }
        }

        proptest! {
            /// The lane's indexes answer as a scan of the lane does, after
            /// any sequence of parks and unparks.
            #[test]
            fn indexes_agree_with_a_scan(
                ops in prop::collection::vec(
                    (0u64..30, 0u8..4, prop::option::of(0u8..4), 0u8..3, any::<bool>()), 1..200),
            ) {
                let mut state = PartitionState::default();
                for (offset, key, order, value, park) in ops {
                    if park {
                        state.park(offset, record(offset, key, order, value));
                    } else {
                        state.unpark(offset);
                    }
                    let bytes: usize = state.parked.values().map(parked_size).sum();
                    prop_assert_eq!(state.parked_bytes(), bytes);
                    for key in 0u8..4 {
                        for order in (0u8..4).map(Some).chain([None]) {
                            let id = order.map(|o| format!("o-{o}"));
                            let scan = state.parked.iter().find(|(_, r)| {
                                r.key == [b'k', key] || (id.is_some() && r.order_id == id)
                            }).map(|(o, _)| *o);
                            prop_assert_eq!(state.blocked_by(&[b'k', key], id.as_deref()), scan);
                        }
                        for value in 0u8..3 {
                            let probe = record(99, key, None, value);
                            let scan = state.parked.iter().find(|(_, r)| {
                                r.key == probe.key && r.value == probe.value
                            }).map(|(o, _)| *o);
                            prop_assert_eq!(state.parked_copy_of(&probe).is_some(), scan.is_some());
                        }
                    }
                }
            }
        }
    }
}
