//! Inventory stage: stock counters of the SKUs this partition owns. One
//! writer per SKU (its partition's processor), so no locks and no oversell.
//! Every counter change is checked arithmetic: a change that would wrap is
//! refused, never applied.

use super::processor::{Ctx, StockRefused};
use super::state::{Hold, MAX_AVAILABLE, Stock};

/// Holds `quantity` of `sku` for `(order_id, line)` if that much is
/// available and the partition may hold one more line. Returns whether it
/// is held.
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
    if ctx.state.holds.len() >= ctx.limits.max_holds {
        return false;
    }
    let q = u64::from(quantity);
    let held = match ctx.state.stock.get_mut(sku) {
        Some(stock) if stock.available >= q => match stock.reserved.checked_add(q) {
            Some(reserved) => {
                stock.available -= q;
                stock.reserved = reserved;
                stock.assert_conserved();
                true
            }
            None => false,
        },
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
        ctx.out.stock_touched.push(sku.to_owned());
    }
    held
}

/// A held line becomes a sale.
pub(crate) fn commit(ctx: &mut Ctx<'_>, order_id: &str, line: u16) {
    settle(ctx, order_id, line, |stock| &mut stock.sold, "sold");
}

/// A held line goes back to available stock (compensation).
pub(crate) fn release(ctx: &mut Ctx<'_>, order_id: &str, line: u16) {
    settle(
        ctx,
        order_id,
        line,
        |stock| &mut stock.available,
        "available",
    );
}

/// Moves a hold's quantity from `reserved` to the counter `to` picks.
/// Cannot overflow while conservation holds (the sum is `supplied`).
fn settle(
    ctx: &mut Ctx<'_>,
    order_id: &str,
    line: u16,
    to: impl FnOnce(&mut Stock) -> &mut u64,
    counter: &str,
) {
    let Some(hold) = ctx.state.holds.remove(&(order_id.to_owned(), line)) else {
        return; // settled before (a replayed message)
    };
    let stock = ctx
        .state
        .stock
        .get_mut(&hold.sku)
        .expect("a held SKU has stock");
    let q = u64::from(hold.quantity);
    assert!(stock.reserved >= q, "reserved stock below a hold");
    stock.reserved -= q;
    let target = to(stock);
    *target = target
        .checked_add(q)
        .unwrap_or_else(|| panic!("{counter} stock overflows although conserved"));
    stock.assert_conserved();
    ctx.out.stock_touched.push(hold.sku);
}

/// Admin: sets available stock; `supplied` follows, so conservation holds.
/// Refused (and reported) above [`MAX_AVAILABLE`], for a new SKU past
/// `max_skus`, or if `supplied` would overflow.
pub(crate) fn set_stock(ctx: &mut Ctx<'_>, sku: &str, available: u64) {
    let current = ctx.state.stock.get(sku);
    let refusal = if available > MAX_AVAILABLE {
        Some(format!("available {available} exceeds {MAX_AVAILABLE}"))
    } else if current.is_none() && ctx.state.stock.len() >= ctx.limits.max_skus {
        Some(format!(
            "the partition holds the most SKUs allowed ({})",
            ctx.limits.max_skus
        ))
    } else {
        None
    };
    let next = match refusal {
        Some(reason) => Err(reason),
        None => current
            .cloned()
            .unwrap_or_default()
            .with_available(available)
            .ok_or_else(|| format!("supplied stock of {sku} would overflow")),
    };
    match next {
        Ok(stock) => {
            stock.assert_conserved();
            ctx.state.stock.insert(sku.to_owned(), stock);
            ctx.out.stock_touched.push(sku.to_owned());
        }
        Err(reason) => {
            ctx.out.problems.push(format!(
                "offset {}: stock change of {sku} refused: {reason}",
                ctx.offset
            ));
            ctx.out.stock_refused.push(StockRefused {
                offset: ctx.offset,
                sku: sku.to_owned(),
                reason,
            });
        }
    }
}
