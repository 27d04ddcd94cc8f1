//! Partition state and its logical hash. How it is written to the store
//! is `super::snapshot`'s business; bounds are in `super::processor::Limits`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::parked::ParkedRecord;
use crate::domain::{Effect, EffectKind, Status};

use super::finished::Finished;

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

/// Buckets of the stock table: a snapshot rewrites only the buckets whose
/// SKUs changed. A power of two, so a bucket is a bit mask of a hash.
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

    /// Puts a loaded bucket back (all its SKUs must hash to it).
    pub fn restore_bucket(
        &mut self,
        bucket: u16,
        rows: BTreeMap<String, Stock>,
    ) -> Result<(), String> {
        if let Some(sku) = rows.keys().find(|sku| Self::bucket_of(sku) != bucket) {
            return Err(format!("SKU {sku:?} is not in stock bucket {bucket}"));
        }
        let slot = &mut self.buckets[usize::from(bucket)];
        self.len = self.len - slot.len() + rows.len();
        *slot = rows;
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
    /// The park lane of this partition: records set aside, by offset.
    pub parked: BTreeMap<u64, ParkedRecord>,
    /// Orders that finished recently (idempotency).
    pub finished: Finished,
    /// Record keys and order ids that parked records hold back, with how
    /// many hold each (derived from `parked`, not part of the state).
    blocked: BTreeMap<Blocker, usize>,
    /// Bytes the park lane holds (derived from `parked`).
    parked_bytes: usize,
}

/// What a parked record holds back: later records with its key (SKU) or
/// about its order wait behind it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Blocker {
    Key(Vec<u8>),
    Order(String),
}

fn blockers(r: &ParkedRecord) -> impl Iterator<Item = Blocker> + '_ {
    std::iter::once(Blocker::Key(r.key.clone())).chain(r.order_id.clone().map(Blocker::Order))
}

/// What a parked record counts against `max_parked_bytes`.
pub fn parked_size(r: &ParkedRecord) -> usize {
    r.key.len() + r.value.len() + r.reason.len() + r.order_id.as_ref().map_or(0, String::len)
}

impl PartitionState {
    /// Sets a record aside in the park lane.
    pub fn park(&mut self, offset: u64, record: ParkedRecord) {
        for b in blockers(&record) {
            *self.blocked.entry(b).or_default() += 1;
        }
        self.parked_bytes += parked_size(&record);
        if let Some(old) = self.parked.insert(offset, record) {
            self.forget_parked(&old);
        }
    }

    /// Takes a record out of the park lane.
    pub fn unpark(&mut self, offset: u64) -> Option<ParkedRecord> {
        let record = self.parked.remove(&offset)?;
        self.forget_parked(&record);
        Some(record)
    }

    fn forget_parked(&mut self, record: &ParkedRecord) {
        self.parked_bytes -= parked_size(record);
        for b in blockers(record) {
            if let std::collections::btree_map::Entry::Occupied(mut e) = self.blocked.entry(b) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    pub fn parked_bytes(&self) -> usize {
        self.parked_bytes
    }

    pub fn has_blocked(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// The offset of the parked record (the first) that holds back a
    /// record with `key` about `order_id`, if any.
    pub fn blocked_by(&self, key: &[u8], order_id: Option<&str>) -> Option<u64> {
        if self.blocked.is_empty() {
            return None;
        }
        let held = self.blocked.contains_key(&Blocker::Key(key.to_vec()))
            || order_id.is_some_and(|id| self.blocked.contains_key(&Blocker::Order(id.to_owned())));
        if !held {
            return None;
        }
        self.parked
            .iter()
            .find(|(_, r)| {
                r.key == key || (order_id.is_some() && r.order_id.as_deref() == order_id)
            })
            .map(|(offset, _)| *offset)
    }

    /// The stock invariants the inventory stage asserts on every change. A
    /// snapshot that breaks them is corrupt: refusing it here names the
    /// SKU, where loading it would panic at the first record for the SKU.
    pub fn check_stock(&self) -> Result<(), String> {
        for (sku, stock) in self.stock.iter() {
            if !stock.is_conserved() {
                return Err(format!("stock of {sku:?} breaks conservation: {stock:?}"));
            }
        }
        let mut held: BTreeMap<&str, u64> = BTreeMap::new();
        for hold in self.holds.values() {
            let sum = held.entry(&hold.sku).or_default();
            *sum = sum.saturating_add(u64::from(hold.quantity));
        }
        for (sku, quantity) in held {
            if self.stock.get(sku).is_none_or(|s| s.reserved < quantity) {
                return Err(format!(
                    "holds of {sku:?} exceed the stock's reserved count"
                ));
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
        let parked = std::mem::take(&mut self.parked);
        self.blocked.clear();
        self.parked_bytes = 0;
        for (offset, record) in parked {
            self.park(offset, record);
        }
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
        let rows = t.bucket(bucket).clone();
        assert!(t.clone().restore_bucket(wrong, rows).is_err());
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
        assert!(s.check_stock().unwrap_err().contains("reserved"));
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
}
