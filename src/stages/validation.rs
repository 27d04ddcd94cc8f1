//! Validation stage for orders read from the log.
//!
//! Intake validates too, but upstream systems write to the log directly, so
//! the processor applies every contract rule again. An order without an id
//! gets one derived from its position (`ord-P-O`), which is deterministic.

use serde_json::Value;

use crate::domain::order::{parse_order, valid_id};
use crate::domain::{RecordKind, RejectReason, Status};

use super::processor::{Ctx, Outgoing};
use super::saga;

pub(crate) fn order_placed(ctx: &mut Ctx<'_>, body: &[u8]) {
    match parse_order(body) {
        Ok(parsed) => {
            let mut order = parsed.order;
            if order.order_id.is_empty() {
                order.order_id = position_id(ctx);
            }
            if ctx.knows(&order.order_id) {
                return; // the same order id again: one order (idempotency)
            }
            if ctx.partition_of(order.home_sku()) != ctx.partition {
                // A producer that did not key by the home SKU: forward the
                // order (with its settled id) to its home partition.
                let key = order.home_sku().to_owned();
                ctx.out.messages.push(Outgoing {
                    key,
                    kind: RecordKind::OrderJson,
                    value: order.to_json(),
                });
                return;
            }
            if ctx.limits.is_busy(ctx.state) {
                let email = order.contact.as_ref().and_then(|c| c.email.clone());
                return ctx.reject(&order.order_id, RejectReason::PartitionBusy, email);
            }
            ctx.set_status(&order.order_id, Status::Accepted, None);
            saga::start(ctx, order);
        }
        Err(rejection) => {
            // Never read anything out of a body that holds a card number.
            let order_id = match rejection.reason {
                RejectReason::PanDetected => position_id(ctx),
                _ => declared_id(body).unwrap_or_else(|| position_id(ctx)),
            };
            if ctx.knows(&order_id) {
                return;
            }
            ctx.reject(&order_id, rejection.reason, None);
        }
    }
}

fn position_id(ctx: &Ctx<'_>) -> String {
    format!("ord-{}-{}", ctx.partition, ctx.offset)
}

/// The `order_id` of an invalid order, if it has a valid one.
fn declared_id(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let id = v.get("order_id")?.as_str()?;
    valid_id(id).then(|| id.to_owned())
}
