//! The order saga, run by the order's home partition: hold every line
//! (local lines directly, others by `Reserve` messages), authorize payment
//! once all are held, then commit; on any failure release every held line.
//! A single-SKU order never leaves its partition.

use crate::domain::{Effect, EffectKind, Message, Order, Status};

use super::inventory;
use super::processor::Ctx;
use super::state::{LineState, Saga, SagaLine};

/// Reason of `out_of_stock`: some line could not be held.
pub const REASON_OUT_OF_STOCK: &str = "insufficient_stock";

pub(crate) fn start(ctx: &mut Ctx<'_>, order: Order) {
    let order_id = order.order_id.clone();
    let home_key = order.home_sku().to_owned();
    let mut lines: Vec<SagaLine> = Vec::with_capacity(order.lines.len());
    // Local lines first: if one fails, no message leaves the partition.
    let mut local_failed = false;
    // The local SKU that refused: the lines after it are marked failed
    // without being tried, so their state alone would blame them too.
    let mut refused_here = None;
    for (i, l) in order.lines.iter().enumerate() {
        let state = if ctx.partition_of(&l.sku) != ctx.partition {
            LineState::Pending
        } else if local_failed {
            LineState::Failed
        } else if inventory::reserve(ctx, &order_id, i as u16, &l.sku, l.quantity) {
            LineState::Held
        } else {
            local_failed = true;
            refused_here = Some(l.sku.clone());
            LineState::Failed
        };
        lines.push(SagaLine {
            sku: l.sku.clone(),
            quantity: l.quantity,
            state,
        });
    }
    for (i, line) in lines.iter_mut().enumerate() {
        if line.state != LineState::Pending {
            continue;
        }
        if local_failed {
            line.state = LineState::Failed;
            continue;
        }
        let msg = Message::Reserve {
            order_id: order_id.clone(),
            home_sku: home_key.clone(),
            line: i as u16,
            sku: line.sku.clone(),
            quantity: line.quantity,
        };
        ctx.emit(&line.sku.clone(), msg);
    }
    let saga = Saga {
        lines,
        home_key,
        amount: order.amount(),
        currency: order.currency,
        token: order.payment.token,
        authorizing: false,
        email: order.contact.and_then(|c| c.email),
    };
    let rec = ctx
        .state
        .orders
        .get_mut(&order_id)
        .expect("accepted order has a record");
    rec.saga = Some(saga);
    advance(ctx, &order_id, refused_here);
}

/// A line's partition answered a `Reserve`.
pub(crate) fn reservation_result(ctx: &mut Ctx<'_>, order_id: &str, line: u16, held: bool) {
    let Some(saga) = ctx
        .state
        .orders
        .get_mut(order_id)
        .and_then(|r| r.saga.as_mut())
    else {
        return;
    };
    let Some(l) = saga.lines.get_mut(usize::from(line)) else {
        return;
    };
    if l.state != LineState::Pending {
        return;
    }
    l.state = if held {
        LineState::Held
    } else {
        LineState::Failed
    };
    advance(ctx, order_id, None);
}

/// Moves the saga on once no line is pending any more. `refused_here` is
/// the local SKU that refused a line when `start` stopped trying; without
/// it every failed line was tried, and refused by its own partition.
fn advance(ctx: &mut Ctx<'_>, order_id: &str, refused_here: Option<String>) {
    let saga = ctx.state.orders[order_id]
        .saga
        .as_ref()
        .expect("advance on a live saga");
    if saga.authorizing || saga.lines.iter().any(|l| l.state == LineState::Pending) {
        return;
    }
    if saga.lines.iter().any(|l| l.state == LineState::Failed) {
        let refused = match refused_here {
            Some(sku) => vec![sku],
            None => {
                let mut skus: Vec<String> = Vec::new();
                for l in saga.lines.iter().filter(|l| l.state == LineState::Failed) {
                    if !skus.contains(&l.sku) {
                        skus.push(l.sku.clone());
                    }
                }
                skus
            }
        };
        let released = settle_lines(ctx, order_id, false);
        ctx.set_status_with(
            order_id,
            Status::OutOfStock,
            Some(REASON_OUT_OF_STOCK.to_owned()),
            refused,
            released,
        );
        return;
    }
    let saga = ctx
        .state
        .orders
        .get_mut(order_id)
        .and_then(|r| r.saga.as_mut())
        .expect("live saga");
    saga.authorizing = true;
    let effect = Effect {
        order_id: order_id.to_owned(),
        kind: EffectKind::Authorize,
        reply_key: saga.home_key.clone(),
        amount: saga.amount,
        currency: saga.currency.clone(),
        token: std::mem::take(&mut saga.token),
        payment_id: String::new(),
    };
    ctx.set_status(order_id, Status::Reserved, None);
    ctx.start_effect(effect);
}

/// Commits (`commit`) or releases every held line of the order's saga;
/// returns how many lines it settled.
pub(crate) fn settle_lines(ctx: &mut Ctx<'_>, order_id: &str, commit: bool) -> u16 {
    let saga = ctx.state.orders[order_id]
        .saga
        .clone()
        .expect("settle a live saga");
    let mut settled = 0;
    for (i, line) in saga.lines.iter().enumerate() {
        if line.state != LineState::Held {
            continue;
        }
        settled += 1;
        let i = i as u16;
        if ctx.partition_of(&line.sku) == ctx.partition {
            if commit {
                inventory::commit(ctx, order_id, i);
            } else {
                inventory::release(ctx, order_id, i);
            }
        } else {
            let order_id = order_id.to_owned();
            let msg = if commit {
                Message::Commit { order_id, line: i }
            } else {
                Message::Release { order_id, line: i }
            };
            ctx.emit(&line.sku, msg);
        }
    }
    settled
}
