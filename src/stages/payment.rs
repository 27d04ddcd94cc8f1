//! Payment stage: applies authorization results that the effect executor
//! appended to the log. Authorize first; capture only on confirm; void
//! every authorization of an order that did not confirm.

use crate::domain::{Effect, EffectKind, PaymentOutcome, Status};

use super::processor::Ctx;
use super::saga::settle_lines;

pub(crate) fn result(ctx: &mut Ctx<'_>, order_id: &str, outcome: PaymentOutcome) {
    let rec = ctx.state.orders.get(order_id);
    let Some(saga) = rec.and_then(|r| r.saga.as_ref()).filter(|s| s.authorizing) else {
        // Not awaiting payment: a repeated result after a crash, a late one,
        // or one for an order already forgotten. An authorization that did
        // not confirm this order is voided. A confirmed order's is the one
        // it captured: authorizations share the order's idempotency key, so
        // the gateway answers every repeat with the same payment.
        let confirmed = rec.is_none() && ctx.finished(order_id).is_some_and(|f| f.confirmed());
        if let PaymentOutcome::Authorized { payment_id } = outcome
            && !confirmed
        {
            let effect = effect(
                ctx,
                order_id,
                EffectKind::Void,
                0,
                String::new(),
                payment_id,
            );
            ctx.start_effect(effect);
        }
        return;
    };
    let (amount, currency) = (saga.amount, saga.currency.clone());
    ctx.finish_effect(order_id, EffectKind::Authorize);
    match outcome {
        PaymentOutcome::Authorized { payment_id } => {
            settle_lines(ctx, order_id, true);
            ctx.set_status(order_id, Status::Paid, None);
            ctx.set_status(order_id, Status::Confirmed, None);
            let capture = effect(
                ctx,
                order_id,
                EffectKind::Capture,
                amount,
                currency,
                payment_id,
            );
            ctx.start_effect(capture);
        }
        PaymentOutcome::Declined { code } => {
            let released = settle_lines(ctx, order_id, false);
            ctx.set_status_with(
                order_id,
                Status::PaymentDeclined,
                Some(code),
                Vec::new(),
                released,
            );
        }
        PaymentOutcome::Failed { reason } => {
            let released = settle_lines(ctx, order_id, false);
            ctx.set_status_with(
                order_id,
                Status::PaymentFailed,
                Some(reason),
                Vec::new(),
                released,
            );
            // The gateway may have authorized before failing to answer:
            // void by the order's authorization key to be sure.
            let void = effect(
                ctx,
                order_id,
                EffectKind::Void,
                amount,
                currency,
                String::new(),
            );
            ctx.start_effect(void);
        }
    }
}

/// Replies must reach this partition: the input record (a payment result)
/// is keyed by the order's home SKU, so its key is the reply key.
fn effect(
    ctx: &Ctx<'_>,
    order_id: &str,
    kind: EffectKind,
    amount: u64,
    currency: String,
    payment_id: String,
) -> Effect {
    let reply_key = String::from_utf8_lossy(ctx.key).into_owned();
    Effect {
        order_id: order_id.to_owned(),
        kind,
        reply_key,
        amount,
        currency,
        token: String::new(),
        payment_id,
    }
}
