//! Dispatch of one log record to the stages, and the context they share.

use crate::domain::partition::partition_for_key;
use crate::domain::{Effect, Envelope, Message, MsgId, RecordKind, Status, StatusEvent};

use super::state::{OrderRec, PartitionState, StateKey};
use super::{inventory, payment, saga, validation};

/// A record for the `orders` topic, emitted by the processor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub key: String,
    pub kind: RecordKind,
    pub value: Vec<u8>,
}

/// What processing records produced, for the runner to carry out: append
/// `messages` and `statuses` durably, start `effects`, publish the stock of
/// `stock_touched`. `problems` are records that could not be applied.
#[derive(Debug, Default)]
pub struct Output {
    pub messages: Vec<Outgoing>,
    pub statuses: Vec<StatusEvent>,
    pub effects: Vec<Effect>,
    pub stock_touched: Vec<String>,
    pub problems: Vec<String>,
}

impl Output {
    pub fn clear(&mut self) {
        self.messages.clear();
        self.statuses.clear();
        self.effects.clear();
        self.stock_touched.clear();
        self.problems.clear();
    }
}

/// The deterministic state machine of one `orders` partition.
pub struct Processor {
    pub partition: u32,
    pub partitions: u32,
    pub state: PartitionState,
    pub retention: Retention,
}

/// How long a terminal order is remembered (so a repeated order id is one
/// order). Expiry follows log time, so it is deterministic: the same log
/// and the same retention give the same state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Terminal orders older than this (in log time) are forgotten.
    pub max_age_ms: u64,
    /// At most this many terminal orders per partition; the oldest go first.
    pub max_orders: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age_ms: 24 * 3_600_000,
            max_orders: 5_000_000,
        }
    }
}

/// One input record, as the log gives it.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub kind: RecordKind,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// The stages' view while one record is applied.
pub(crate) struct Ctx<'a> {
    pub partition: u32,
    pub partitions: u32,
    pub offset: u64,
    pub at_ms: u64,
    /// Key of the input record.
    pub key: &'a [u8],
    next_index: u32,
    pub state: &'a mut PartitionState,
    pub out: &'a mut Output,
}

impl Ctx<'_> {
    pub fn partition_of(&self, key: &str) -> u32 {
        partition_for_key(key.as_bytes(), self.partitions)
    }

    /// Emits a message with the next deterministic id of this record.
    pub fn emit(&mut self, key: &str, body: Message) {
        let id = MsgId {
            src_partition: self.partition,
            src_offset: self.offset,
            index: self.next_index,
        };
        self.next_index += 1;
        let value = Envelope::new(Some(id), body).encode();
        self.out.messages.push(Outgoing {
            key: key.to_owned(),
            kind: RecordKind::Internal,
            value,
        });
    }

    /// Moves an order to `status`, emitting the status event.
    pub fn set_status(&mut self, order_id: &str, status: Status, reason: Option<String>) {
        let rec = self
            .state
            .orders
            .entry(order_id.to_owned())
            .or_insert(OrderRec {
                seq: 0,
                status,
                saga: None,
                payment_id: None,
                terminal_at_ms: None,
            });
        let prev = (rec.seq > 0).then_some(rec.status);
        assert!(
            Status::may_follow(prev, status),
            "invalid transition {prev:?} -> {status} for {order_id}"
        );
        rec.seq += 1;
        rec.status = status;
        if status.is_terminal() {
            rec.saga = None;
            rec.terminal_at_ms = Some(self.at_ms);
            self.state.expiry.insert((self.at_ms, order_id.to_owned()));
        }
        let event = StatusEvent {
            order_id: order_id.to_owned(),
            seq: rec.seq,
            status,
            reason,
            at_ms: self.at_ms,
        };
        self.state.touch(StateKey::Order(order_id.to_owned()));
        self.out.statuses.push(event);
    }

    pub fn start_effect(&mut self, effect: Effect) {
        let key = (effect.order_id.clone(), effect.kind);
        self.state.touch(StateKey::Outbox(key.0.clone(), key.1));
        self.state.outbox.insert(key, effect.clone());
        self.out.effects.push(effect);
    }

    pub fn finish_effect(&mut self, order_id: &str, kind: crate::domain::EffectKind) {
        if self
            .state
            .outbox
            .remove(&(order_id.to_owned(), kind))
            .is_some()
        {
            self.state
                .touch(StateKey::Outbox(order_id.to_owned(), kind));
        }
    }
}

impl Processor {
    pub fn new(partition: u32, partitions: u32, state: PartitionState) -> Processor {
        assert!(partition < partitions);
        Processor {
            partition,
            partitions,
            state,
            retention: Retention::default(),
        }
    }

    pub fn with_retention(mut self, retention: Retention) -> Processor {
        assert!(retention.max_orders > 0);
        self.retention = retention;
        self
    }

    /// Forgets terminal orders past the retention, oldest first.
    fn expire(&mut self, now_ms: u64) {
        let state = &mut self.state;
        while let Some((at_ms, _)) = state.expiry.first() {
            let too_old = at_ms.saturating_add(self.retention.max_age_ms) < now_ms;
            if !too_old && state.expiry.len() <= self.retention.max_orders {
                break;
            }
            let (_, id) = state.expiry.pop_first().expect("checked non-empty");
            state.orders.remove(&id);
            state.touch(StateKey::Order(id));
        }
    }

    /// Applies one record. Never panics on bad input: an undecodable record
    /// is reported in `out.problems` and skipped.
    pub fn apply(&mut self, input: Input<'_>, out: &mut Output) {
        // Expire before (a resent, forgotten id is a new order) and after
        // (an order that just finished may push the count over the cap).
        self.expire(input.timestamp_ms);
        let mut ctx = Ctx {
            partition: self.partition,
            partitions: self.partitions,
            offset: input.offset,
            at_ms: input.timestamp_ms,
            key: input.key,
            next_index: 0,
            state: &mut self.state,
            out,
        };
        match input.kind {
            RecordKind::OrderJson => validation::order_placed(&mut ctx, input.value),
            RecordKind::Internal => match Envelope::decode(input.value) {
                Ok(env) => apply_message(&mut ctx, env),
                Err(e) => ctx
                    .out
                    .problems
                    .push(format!("offset {}: {e}", input.offset)),
            },
        }
        self.expire(input.timestamp_ms);
    }

    /// Effects asked for and not yet done: restarted after recovery.
    pub fn pending_effects(&self) -> Vec<Effect> {
        self.state.outbox.values().cloned().collect()
    }
}

fn apply_message(ctx: &mut Ctx<'_>, env: Envelope) {
    if let Some(id) = env.id
        && !accept_id(ctx, id)
    {
        return;
    }
    match env.body {
        Message::Reserve {
            order_id,
            home_sku,
            line,
            sku,
            quantity,
        } => {
            let held = inventory::reserve(ctx, &order_id, line, &sku, quantity);
            ctx.emit(
                &home_sku,
                Message::ReservationResult {
                    order_id,
                    line,
                    held,
                },
            );
        }
        Message::ReservationResult {
            order_id,
            line,
            held,
        } => saga::reservation_result(ctx, &order_id, line, held),
        Message::Commit { order_id, line } => inventory::commit(ctx, &order_id, line),
        Message::Release { order_id, line } => inventory::release(ctx, &order_id, line),
        Message::PaymentResult { order_id, outcome } => payment::result(ctx, &order_id, outcome),
        Message::EffectDone { order_id, kind } => ctx.finish_effect(&order_id, kind),
        Message::SetStock { sku, available } => inventory::set_stock(ctx, &sku, available),
    }
}

/// Per-source dedupe: true if `id` is above the source's watermark.
fn accept_id(ctx: &mut Ctx<'_>, id: MsgId) -> bool {
    let pos = (id.src_offset, id.index);
    if ctx
        .state
        .watermarks
        .get(&id.src_partition)
        .is_some_and(|w| pos <= *w)
    {
        return false;
    }
    ctx.state.watermarks.insert(id.src_partition, pos);
    ctx.state.touch(StateKey::Watermark(id.src_partition));
    true
}
