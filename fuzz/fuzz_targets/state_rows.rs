//! The checkpoint decoder `PartitionState::from_rows`. Input: rows as
//! `key_len: u16 LE | key | value_len: u16 LE | value`, repeated; a key
//! seen twice is dropped, as a store holds each key once. A state it
//! accepts must checkpoint back to itself and keep the invariants the
//! processor asserts, or the first record touching it would panic.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use libfuzzer_sys::fuzz_target;
use orderflow::stages::state::PartitionState;

fn take<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let len = u16::from_le_bytes(*len) as usize;
    let field = rest.get(..len)?;
    *data = &rest[len..];
    Some(field)
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut seen = BTreeSet::new();
    let mut rows = Vec::new();
    while let (Some(key), Some(value)) = (take(&mut rest), take(&mut rest)) {
        if seen.insert(key) {
            rows.push((key, value));
        }
    }
    let Ok(state) = PartitionState::from_rows(rows) else {
        return;
    };
    let mut held: BTreeMap<&str, u64> = BTreeMap::new();
    for hold in state.holds.values() {
        *held.entry(hold.sku.as_str()).or_default() += u64::from(hold.quantity);
    }
    for (sku, stock) in &state.stock {
        let total = stock
            .available
            .checked_add(stock.reserved)
            .and_then(|t| t.checked_add(stock.sold));
        assert_eq!(total, Some(stock.supplied), "stock of {sku:?} is not conserved");
    }
    for (sku, quantity) in &held {
        let stock = state.stock.get(*sku).expect("a held SKU has a stock row");
        assert!(stock.reserved >= *quantity, "holds of {sku:?} exceed its reserved stock");
    }
    let rows = state.all_rows();
    let again = PartitionState::from_rows(rows.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
        .expect("a state's own rows decode");
    assert_eq!(again, state);
    assert_eq!(again.hash(), state.hash());
});
