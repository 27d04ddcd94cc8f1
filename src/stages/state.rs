//! Partition state, the rows it is checkpointed as, and its hash.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::parked::ParkedRecord;
use crate::domain::{Effect, EffectKind, Status};

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
    pub fn assert_conserved(&self) {
        assert_eq!(
            self.supplied,
            self.available + self.reserved + self.sold,
            "stock conservation broken: {self:?}"
        );
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
/// terminal status. Dropped from state once the order is terminal.
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
}

/// What the home partition remembers of an order. Terminal orders stay as
/// a few bytes so a repeated order id is recognised (idempotency).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRec {
    pub seq: u32,
    pub status: Status,
    pub saga: Option<Saga>,
    /// The authorization captured for a confirmed order.
    pub payment_id: Option<String>,
    /// When the order reached its terminal status (log time): it is
    /// forgotten after the retention period (see `Retention`).
    #[serde(default)]
    pub terminal_at_ms: Option<u64>,
}

/// A line held on this partition for some order's saga (local or remote).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub sku: String,
    pub quantity: u32,
}

/// A row of state that changed since the last checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StateKey {
    Stock(String),
    Order(String),
    Hold(String, u16),
    Watermark(u32),
    Outbox(String, EffectKind),
    /// A parked record, by its offset in this partition.
    Parked(u64),
}

/// All state of one partition. Ordered maps only: iteration order is part
/// of determinism.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    pub stock: BTreeMap<String, Stock>,
    pub orders: BTreeMap<String, OrderRec>,
    pub holds: BTreeMap<(String, u16), Hold>,
    /// Per source partition, the highest message id applied: (offset, index).
    pub watermarks: BTreeMap<u32, (u64, u32)>,
    /// Effects asked for and not yet reported done.
    pub outbox: BTreeMap<(String, EffectKind), Effect>,
    /// The park lane of this partition: records set aside, by offset.
    pub parked: BTreeMap<u64, ParkedRecord>,
    /// Record keys and order ids that parked records hold back, with how
    /// many hold each (derived from `parked`, not part of the state).
    #[serde(skip)]
    pub blocked: BTreeMap<Blocker, usize>,
    /// Rows changed since the last checkpoint (not part of the state).
    #[serde(skip)]
    pub dirty: BTreeSet<StateKey>,
    /// Terminal orders by (terminal time, id), oldest first: the expiry
    /// index, derived from `orders` (not part of the state).
    #[serde(skip)]
    pub expiry: BTreeSet<(u64, String)>,
}

const ROW_STOCK: u8 = b'S';
const ROW_ORDER: u8 = b'O';
const ROW_HOLD: u8 = b'H';
const ROW_WATERMARK: u8 = b'W';
const ROW_OUTBOX: u8 = b'X';
const ROW_PARKED: u8 = b'P';

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

fn kind_byte(kind: EffectKind) -> u8 {
    match kind {
        EffectKind::Authorize => 0,
        EffectKind::Capture => 1,
        EffectKind::Void => 2,
    }
}

fn kind_from_byte(b: u8) -> Option<EffectKind> {
    match b {
        0 => Some(EffectKind::Authorize),
        1 => Some(EffectKind::Capture),
        2 => Some(EffectKind::Void),
        _ => None,
    }
}

fn encode_key(key: &StateKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    match key {
        StateKey::Stock(sku) => {
            out.push(ROW_STOCK);
            out.extend_from_slice(sku.as_bytes());
        }
        StateKey::Order(id) => {
            out.push(ROW_ORDER);
            out.extend_from_slice(id.as_bytes());
        }
        StateKey::Hold(id, line) => {
            out.push(ROW_HOLD);
            out.extend_from_slice(id.as_bytes());
            out.push(0);
            out.extend_from_slice(&line.to_be_bytes());
        }
        StateKey::Watermark(src) => {
            out.push(ROW_WATERMARK);
            out.extend_from_slice(&src.to_be_bytes());
        }
        StateKey::Outbox(id, kind) => {
            out.push(ROW_OUTBOX);
            out.extend_from_slice(id.as_bytes());
            out.push(0);
            out.push(kind_byte(*kind));
        }
        StateKey::Parked(offset) => {
            out.push(ROW_PARKED);
            out.extend_from_slice(&offset.to_be_bytes());
        }
    }
    out
}

/// The checkpoint row key of `sku`'s stock counters.
pub fn stock_row_key(sku: &str) -> Vec<u8> {
    encode_key(&StateKey::Stock(sku.to_owned()))
}

/// Stock counters from a checkpoint row (see [`stock_row_key`]).
pub fn decode_stock_row(value: &[u8]) -> Result<Stock, String> {
    decode(b"stock", value)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec(v).expect("state rows always serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| {
        format!(
            "undecodable state row {}: {e}",
            String::from_utf8_lossy(key)
        )
    })
}

fn split_id(rest: &[u8]) -> Result<(String, &[u8]), String> {
    let nul = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or("state row key without separator")?;
    let id = String::from_utf8(rest[..nul].to_vec()).map_err(|_| "state row key is not UTF-8")?;
    Ok((id, &rest[nul + 1..]))
}

/// The changed rows since the last call: puts (present) and deletes (gone).
pub type RowChanges = (Vec<(Vec<u8>, Vec<u8>)>, Vec<Vec<u8>>);

impl PartitionState {
    pub fn touch(&mut self, key: StateKey) {
        self.dirty.insert(key);
    }

    /// Sets a record aside in the park lane.
    pub fn park(&mut self, offset: u64, record: ParkedRecord) {
        for b in blockers(&record) {
            *self.blocked.entry(b).or_default() += 1;
        }
        self.parked.insert(offset, record);
        self.touch(StateKey::Parked(offset));
    }

    /// Takes a record out of the park lane.
    pub fn unpark(&mut self, offset: u64) -> Option<ParkedRecord> {
        let record = self.parked.remove(&offset)?;
        for b in blockers(&record) {
            if let std::collections::btree_map::Entry::Occupied(mut e) = self.blocked.entry(b) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        self.touch(StateKey::Parked(offset));
        Some(record)
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

    /// Takes the changed rows for a checkpoint and clears the dirty set.
    pub fn take_changes(&mut self) -> RowChanges {
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        for key in std::mem::take(&mut self.dirty) {
            let value = match &key {
                StateKey::Stock(sku) => self.stock.get(sku).map(encode),
                StateKey::Order(id) => self.orders.get(id).map(encode),
                StateKey::Hold(id, line) => self.holds.get(&(id.clone(), *line)).map(encode),
                StateKey::Watermark(src) => self.watermarks.get(src).map(encode),
                StateKey::Outbox(id, kind) => self.outbox.get(&(id.clone(), *kind)).map(encode),
                StateKey::Parked(offset) => self.parked.get(offset).map(encode),
            };
            match value {
                Some(v) => puts.push((encode_key(&key), v)),
                None => deletes.push(encode_key(&key)),
            }
        }
        (puts, deletes)
    }

    /// Every row of the state, as a first checkpoint writes it.
    pub fn all_rows(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut rows = Vec::new();
        for (k, v) in &self.stock {
            rows.push((encode_key(&StateKey::Stock(k.clone())), encode(v)));
        }
        for (k, v) in &self.orders {
            rows.push((encode_key(&StateKey::Order(k.clone())), encode(v)));
        }
        for ((id, line), v) in &self.holds {
            rows.push((encode_key(&StateKey::Hold(id.clone(), *line)), encode(v)));
        }
        for (k, v) in &self.watermarks {
            rows.push((encode_key(&StateKey::Watermark(*k)), encode(v)));
        }
        for ((id, kind), v) in &self.outbox {
            rows.push((encode_key(&StateKey::Outbox(id.clone(), *kind)), encode(v)));
        }
        for (offset, v) in &self.parked {
            rows.push((encode_key(&StateKey::Parked(*offset)), encode(v)));
        }
        rows
    }

    /// Rebuilds the state from checkpoint rows.
    pub fn from_rows<'a>(
        rows: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<PartitionState, String> {
        let mut s = PartitionState::default();
        for (key, value) in rows {
            let (&tag, rest) = key.split_first().ok_or("empty state row key")?;
            let text = || {
                String::from_utf8(rest.to_vec())
                    .map_err(|_| "state row key is not UTF-8".to_string())
            };
            match tag {
                ROW_STOCK => {
                    s.stock.insert(text()?, decode(key, value)?);
                }
                ROW_ORDER => {
                    let id = text()?;
                    let rec: OrderRec = decode(key, value)?;
                    if let Some(at) = rec.terminal_at_ms {
                        s.expiry.insert((at, id.clone()));
                    }
                    s.orders.insert(id, rec);
                }
                ROW_HOLD => {
                    let (id, tail) = split_id(rest)?;
                    let line = u16::from_be_bytes(tail.try_into().map_err(|_| "bad hold key")?);
                    s.holds.insert((id, line), decode(key, value)?);
                }
                ROW_WATERMARK => {
                    let src = u32::from_be_bytes(rest.try_into().map_err(|_| "bad watermark key")?);
                    s.watermarks.insert(src, decode(key, value)?);
                }
                ROW_OUTBOX => {
                    let (id, tail) = split_id(rest)?;
                    let kind = tail
                        .first()
                        .copied()
                        .and_then(kind_from_byte)
                        .ok_or("bad outbox key")?;
                    s.outbox.insert((id, kind), decode(key, value)?);
                }
                ROW_PARKED => {
                    let offset = u64::from_be_bytes(rest.try_into().map_err(|_| "bad parked key")?);
                    s.park(offset, decode(key, value)?);
                }
                other => return Err(format!("unknown state row tag {other:#x}")),
            }
        }
        s.check_stock()?;
        Ok(s)
    }

    /// The stock invariants the inventory stage asserts on every change. A
    /// checkpoint that breaks them is corrupt: refusing it here names the
    /// row, where loading it would panic at the first record for the SKU.
    fn check_stock(&self) -> Result<(), String> {
        for (sku, stock) in &self.stock {
            let total = stock
                .available
                .checked_add(stock.reserved)
                .and_then(|t| t.checked_add(stock.sold));
            if total != Some(stock.supplied) {
                return Err(format!(
                    "stock row of {sku:?} breaks conservation: {stock:?}"
                ));
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
                    "holds of {sku:?} exceed the stock row's reserved count"
                ));
            }
        }
        Ok(())
    }

    /// SHA-256 over the canonical encoding of the whole state (hex).
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for (k, v) in self.all_rows() {
            h.update((k.len() as u32).to_le_bytes());
            h.update(&k);
            h.update((v.len() as u32).to_le_bytes());
            h.update(&v);
        }
        hex::encode(h.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// State survives the trip through checkpoint rows, hash included.
    #[test]
    fn rows_roundtrip() {
        let mut s = PartitionState::default();
        s.stock.insert(
            "A".into(),
            Stock {
                available: 3,
                reserved: 1,
                sold: 2,
                supplied: 6,
            },
        );
        s.holds.insert(
            ("o1".into(), 2),
            Hold {
                sku: "A".into(),
                quantity: 1,
            },
        );
        s.watermarks.insert(3, (10, 1));
        s.orders.insert(
            "o1".into(),
            OrderRec {
                seq: 2,
                status: Status::Reserved,
                saga: None,
                payment_id: None,
                terminal_at_ms: None,
            },
        );
        let rows = s.all_rows();
        let back =
            PartitionState::from_rows(rows.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
                .unwrap();
        assert_eq!(back, s);
        assert_eq!(back.hash(), s.hash());
    }

    /// A stock row breaking conservation (fuzz find, `state_rows`) is refused.
    #[test]
    fn refuses_unconserved_stock() {
        let rows: [(&[u8], &[u8]); 1] = [(b"S", b"\x94\x01\x00\x007\x00\x00\x00\x00\x00")];
        let e = PartitionState::from_rows(rows).unwrap_err();
        assert!(e.contains("conservation"), "{e}");
    }

    /// Holds beyond the reserved stock, or of a SKU without stock, are refused.
    #[test]
    fn refuses_hold_beyond_reserved() {
        let hold = rmp_serde::to_vec(&Hold {
            sku: "A".into(),
            quantity: 2,
        })
        .unwrap();
        let stock = rmp_serde::to_vec(&Stock {
            available: 0,
            reserved: 1,
            sold: 0,
            supplied: 1,
        })
        .unwrap();
        let rows: [(&[u8], &[u8]); 2] = [(b"Ho1\x00\x00\x00", &hold), (b"SA", &stock)];
        let e = PartitionState::from_rows(rows).unwrap_err();
        assert!(e.contains("reserved"), "{e}");
        let rows: [(&[u8], &[u8]); 1] = [(b"Ho1\x00\x00\x00", &hold)];
        assert!(PartitionState::from_rows(rows).is_err());
    }

    /// Dirty keys become puts, removed entries become deletes.
    #[test]
    fn changes() {
        let mut s = PartitionState::default();
        s.stock.insert("A".into(), Stock::default());
        s.touch(StateKey::Stock("A".into()));
        s.touch(StateKey::Stock("B".into()));
        let (puts, deletes) = s.take_changes();
        assert_eq!(puts.len(), 1);
        assert_eq!(deletes, vec![b"SB".to_vec()]);
        assert!(s.dirty.is_empty());
    }
}
