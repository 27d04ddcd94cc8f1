//! The invariants of docs/design.md, as the simulation checks them: the status
//! consumer's view (dedupe by `(order_id, seq)`, valid paths, one terminal
//! status), stock counters after every step, and the end-of-run checks
//! (everything acknowledged is terminal, money and stock agree with the
//! orders, replay from offset 0 gives the live state).

use std::collections::BTreeMap;

use crate::domain::{Status, StatusEvent};
use crate::stages::PartitionState;

use super::Breach;

/// What the tracking read model would hold: each order's status events
/// after dedupe, in seq order.
#[derive(Debug, Default)]
pub struct StatusView {
    pub orders: BTreeMap<String, Vec<StatusEvent>>,
}

impl StatusView {
    /// Applies one status record as a consumer deduping by
    /// `(order_id, seq)` does, checking invariant 3 on the way.
    pub fn apply(&mut self, event: StatusEvent) -> Result<(), Breach> {
        let history = self.orders.entry(event.order_id.clone()).or_default();
        let seq = event.seq as usize;
        if seq >= 1
            && let Some(seen) = history.get(seq - 1)
        {
            // A replay re-emits the same (order_id, seq): it must be identical.
            if *seen != event {
                return Err(Breach::new(
                    "status-replay-identical",
                    format!("{} seq {seq}: {seen:?} then {event:?}", event.order_id),
                ));
            }
            return Ok(());
        }
        if seq != history.len() + 1 {
            return Err(Breach::new(
                "status-seq-increasing",
                format!(
                    "{}: seq {seq} after {} statuses",
                    event.order_id,
                    history.len()
                ),
            ));
        }
        let last = history.last().map(|e| e.status);
        if last.is_some_and(Status::is_terminal) {
            return Err(Breach::new(
                "one-terminal-status",
                format!("{}: {} after {last:?}", event.order_id, event.status),
            ));
        }
        if !Status::may_follow(last, event.status) {
            return Err(Breach::new(
                "valid-status-path",
                format!("{}: {last:?} -> {}", event.order_id, event.status),
            ));
        }
        history.push(event);
        Ok(())
    }

    pub fn last(&self, order_id: &str) -> Option<Status> {
        self.orders
            .get(order_id)
            .and_then(|h| h.last())
            .map(|e| e.status)
    }

    pub fn by_status(&self) -> BTreeMap<Status, usize> {
        let mut counts = BTreeMap::new();
        for status in self
            .orders
            .values()
            .filter_map(|h| h.last())
            .map(|e| e.status)
        {
            *counts.entry(status).or_default() += 1;
        }
        counts
    }

    pub fn terminal_count(&self) -> usize {
        self.orders
            .values()
            .filter(|h| h.last().is_some_and(|e| e.status.is_terminal()))
            .count()
    }
}

/// Invariants 1 and 2 on one partition's live state: counters conserved
/// (available + reserved + sold = supplied, so available never went below
/// zero) and reserved stock is exactly the sum of the holds.
pub fn check_stock(partition: u32, state: &PartitionState) -> Result<(), Breach> {
    let mut held: BTreeMap<&str, u64> = BTreeMap::new();
    for hold in state.holds.values() {
        *held.entry(hold.sku.as_str()).or_default() += u64::from(hold.quantity);
    }
    for (sku, s) in state.stock.iter() {
        let total = s
            .available
            .checked_add(s.reserved)
            .and_then(|t| t.checked_add(s.sold));
        if total != Some(s.supplied) {
            return Err(Breach::new(
                "stock-conserved",
                format!("partition {partition}, {sku}: {s:?}"),
            ));
        }
        let holds = held.remove(sku.as_str()).unwrap_or(0);
        if s.reserved != holds {
            return Err(Breach::new(
                "reserved-equals-holds",
                format!(
                    "partition {partition}, {sku}: reserved {} but holds of {holds}",
                    s.reserved
                ),
            ));
        }
    }
    if let Some((sku, q)) = held.into_iter().next() {
        return Err(Breach::new(
            "reserved-equals-holds",
            format!("partition {partition}: holds of {q} {sku} without a stock row"),
        ));
    }
    Ok(())
}

/// At quiescence a partition has nothing in flight.
pub fn check_settled(partition: u32, state: &PartitionState) -> Result<(), Breach> {
    let in_flight = [
        ("outbox", state.outbox.len()),
        ("holds", state.holds.len()),
        ("parked", state.parked.len()),
        (
            "sagas",
            state.orders.values().filter(|o| o.saga.is_some()).count(),
        ),
    ];
    for (what, n) in in_flight {
        if n > 0 {
            return Err(Breach::new(
                "settled-at-quiescence",
                format!("partition {partition}: {n} {what} left after draining"),
            ));
        }
    }
    Ok(())
}
