//! Inventory stage: stock counters of the SKUs this partition owns. One
//! writer per SKU (its partition's processor), so no locks and no oversell.

use super::processor::Ctx;
use super::state::{Hold, StateKey, Stock};

/// Holds `quantity` of `sku` for `(order_id, line)` if that much is
/// available. Returns whether it is held.
pub(crate) fn reserve(
    ctx: &mut Ctx<'_>,
    order_id: &str,
    line: u16,
    sku: &str,
    quantity: u32,
) -> bool {
    let hold_key = (order_id.to_owned(), line);
    if ctx.state.holds.contains_key(&hold_key) {
        return true; // already held for this line
    }
    let q = u64::from(quantity);
    let held = match ctx.state.stock.get_mut(sku) {
        Some(stock) if stock.available >= q => {
            stock.available -= q;
            stock.reserved += q;
            stock.assert_conserved();
            true
        }
        _ => false,
    };
    if held {
        ctx.state.holds.insert(
            hold_key,
            Hold {
                sku: sku.to_owned(),
                quantity,
            },
        );
        touch(ctx, sku, order_id, line);
    }
    held
}

/// A held line becomes a sale.
pub(crate) fn commit(ctx: &mut Ctx<'_>, order_id: &str, line: u16) {
    settle(ctx, order_id, line, |stock, q| stock.sold += q);
}

/// A held line goes back to available stock (compensation).
pub(crate) fn release(ctx: &mut Ctx<'_>, order_id: &str, line: u16) {
    settle(ctx, order_id, line, |stock, q| stock.available += q);
}

fn settle(ctx: &mut Ctx<'_>, order_id: &str, line: u16, to: impl FnOnce(&mut Stock, u64)) {
    let Some(hold) = ctx.state.holds.remove(&(order_id.to_owned(), line)) else {
        return; // settled before (a replayed message)
    };
    let stock = ctx
        .state
        .stock
        .get_mut(&hold.sku)
        .expect("a held SKU has a stock row");
    let q = u64::from(hold.quantity);
    assert!(stock.reserved >= q, "reserved stock below a hold");
    stock.reserved -= q;
    to(stock, q);
    stock.assert_conserved();
    touch(ctx, &hold.sku, order_id, line);
}

/// Admin: sets available stock; `supplied` follows, so conservation holds.
pub(crate) fn set_stock(ctx: &mut Ctx<'_>, sku: &str, available: u64) {
    let stock = ctx.state.stock.entry(sku.to_owned()).or_default();
    stock.supplied = stock.supplied - stock.available + available;
    stock.available = available;
    stock.assert_conserved();
    ctx.state.touch(StateKey::Stock(sku.to_owned()));
    ctx.out.stock_touched.push(sku.to_owned());
}

fn touch(ctx: &mut Ctx<'_>, sku: &str, order_id: &str, line: u16) {
    ctx.state.touch(StateKey::Stock(sku.to_owned()));
    ctx.state.touch(StateKey::Hold(order_id.to_owned(), line));
    ctx.out.stock_touched.push(sku.to_owned());
}
