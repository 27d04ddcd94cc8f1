//! Dispatch of one log record to the stages, and the context they share.

use serde::Deserialize;

use crate::domain::parked::{ParkEvent, ParkedRecord};
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
/// `stock_touched`, append `parked` to the park lane. `problems` are
/// records that could not be applied.
#[derive(Debug, Default)]
pub struct Output {
    pub messages: Vec<Outgoing>,
    pub statuses: Vec<StatusEvent>,
    pub effects: Vec<Effect>,
    pub stock_touched: Vec<String>,
    pub problems: Vec<String>,
    pub parked: Vec<ParkEvent>,
}

impl Output {
    pub fn clear(&mut self) {
        self.messages.clear();
        self.statuses.clear();
        self.effects.clear();
        self.stock_touched.clear();
        self.problems.clear();
        self.parked.clear();
    }
}

/// The deterministic state machine of one `orders` partition.
pub struct Processor {
    pub partition: u32,
    pub partitions: u32,
    pub state: PartitionState,
    pub retention: Retention,
    /// Test seam: orders of this customer fail processing as if they hit a
    /// bug, to exercise the park lane (see `crate::app`, debug builds only).
    pub poison_customer: Option<String>,
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
        self.set_status_with(order_id, status, reason, Vec::new(), 0);
    }

    /// [`Ctx::set_status`] with the event's saga details: the SKUs that
    /// refused a line and the lines whose stock this transition released.
    pub fn set_status_with(
        &mut self,
        order_id: &str,
        status: Status,
        reason: Option<String>,
        refused_skus: Vec<String>,
        released_lines: u16,
    ) {
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
            refused_skus,
            released_lines,
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
            poison_customer: None,
        }
    }

    pub fn with_poison_customer(mut self, customer: Option<String>) -> Processor {
        self.poison_customer = customer;
        self
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

    /// Applies one record. Never panics on bad input: a record that cannot
    /// be decoded or processed goes to the park lane, and so do later
    /// records with its key or about its order, until an operator retries
    /// or drops it.
    pub fn apply(&mut self, input: Input<'_>, out: &mut Output) {
        // Expire before (a resent, forgotten id is a new order) and after
        // (an order that just finished may push the count over the cap).
        self.expire(input.timestamp_ms);
        self.apply_record(input, false, out);
        self.expire(input.timestamp_ms);
    }

    /// `retried`: the record comes out of the park lane, so the per-source
    /// dedupe must not drop it for ids applied while it waited.
    fn apply_record(&mut self, input: Input<'_>, retried: bool, out: &mut Output) {
        let envelope = match input.kind {
            RecordKind::OrderJson => None,
            RecordKind::Internal => Some(Envelope::decode(input.value)),
        };
        if let Some(Ok(env)) = &envelope {
            match env.body {
                Message::RetryParked => return self.retry_parked(input.timestamp_ms, out),
                Message::DropParked { offset } => return self.drop_parked(offset, out),
                _ => {}
            }
        }
        let order_id = match &envelope {
            Some(Ok(env)) => env.body.order_id().map(str::to_owned),
            Some(Err(_)) => None,
            None if !self.state.blocked.is_empty() => peek::<IdOnly>(input.value).order_id,
            None => None,
        };
        // A record holding a card number is never set aside (the lane keeps
        // records as they are): it is refused at once instead.
        let blocked = self.state.blocked_by(input.key, order_id.as_deref());
        if blocked.is_some() && crate::domain::pan::contains_pan(input.value) {
            match input.kind {
                RecordKind::OrderJson => {
                    validation::order_placed(&mut self.ctx(&input, out), input.value)
                }
                RecordKind::Internal => out.problems.push(format!(
                    "offset {}: a record holding a card number was dropped",
                    input.offset
                )),
            }
            return;
        }
        if let Some(at) = blocked {
            let reason = format!("waits behind the parked record at offset {at}");
            return self.park(&input, order_id, reason, out);
        }
        match envelope {
            None => {
                if let Some(poison) = &self.poison_customer
                    && peek::<CustomerOnly>(input.value).customer_id.as_ref() == Some(poison)
                {
                    let order_id = peek::<IdOnly>(input.value).order_id;
                    return self.park(&input, order_id, "injected processing fault".into(), out);
                }
                validation::order_placed(&mut self.ctx(&input, out), input.value)
            }
            Some(Ok(env)) => apply_message(&mut self.ctx(&input, out), env, retried),
            Some(Err(e)) => self.park(&input, None, e, out),
        }
    }

    fn ctx<'a>(&'a mut self, input: &Input<'a>, out: &'a mut Output) -> Ctx<'a> {
        Ctx {
            partition: self.partition,
            partitions: self.partitions,
            offset: input.offset,
            at_ms: input.timestamp_ms,
            key: input.key,
            next_index: 0,
            state: &mut self.state,
            out,
        }
    }

    fn park(
        &mut self,
        input: &Input<'_>,
        order_id: Option<String>,
        reason: String,
        out: &mut Output,
    ) {
        // The same bytes parked twice are one record (a source's replay
        // re-sent it while the first copy waits).
        if self
            .state
            .parked
            .values()
            .any(|r| r.kind == input.kind && r.key == input.key && r.value == input.value)
        {
            return;
        }
        let record = ParkedRecord {
            partition: self.partition,
            offset: input.offset,
            timestamp_ms: input.timestamp_ms,
            kind: input.kind,
            key: input.key.to_vec(),
            value: input.value.to_vec(),
            reason,
            order_id,
        };
        out.parked.push(ParkEvent::Parked(record.clone()));
        self.state.park(input.offset, record);
    }

    /// Takes every parked record out of the lane and applies it again at
    /// its own position (its emitted ids derive from its own offset), in
    /// the original order; one that still fails is parked again and holds
    /// back those behind it again.
    fn retry_parked(&mut self, now_ms: u64, out: &mut Output) {
        let offsets: Vec<u64> = self.state.parked.keys().copied().collect();
        let records: Vec<ParkedRecord> = offsets
            .into_iter()
            .filter_map(|o| self.state.unpark(o))
            .collect();
        for r in &records {
            out.parked.push(ParkEvent::Retried {
                partition: r.partition,
                offset: r.offset,
            });
        }
        for r in &records {
            let input = Input {
                offset: r.offset,
                timestamp_ms: now_ms,
                kind: r.kind,
                key: &r.key,
                value: &r.value,
            };
            self.apply_record(input, true, out);
        }
    }

    fn drop_parked(&mut self, offset: u64, out: &mut Output) {
        if self.state.unpark(offset).is_some() {
            out.parked.push(ParkEvent::Dropped {
                partition: self.partition,
                offset,
            });
        }
    }

    /// Effects asked for and not yet done: restarted after recovery.
    pub fn pending_effects(&self) -> Vec<Effect> {
        self.state.outbox.values().cloned().collect()
    }
}

/// Only the field a parked-record check needs, read leniently: a body that
/// is not valid JSON simply has none.
#[derive(Deserialize, Default)]
struct IdOnly {
    order_id: Option<String>,
}

#[derive(Deserialize, Default)]
struct CustomerOnly {
    customer_id: Option<String>,
}

/// The `order_id` of an order's JSON, if it has one (whether or not the
/// order is valid).
pub fn order_id_of(json: &[u8]) -> Option<String> {
    peek::<IdOnly>(json).order_id
}

fn peek<T: for<'de> Deserialize<'de> + Default>(json: &[u8]) -> T {
    serde_json::from_slice(json).unwrap_or_default()
}

fn apply_message(ctx: &mut Ctx<'_>, env: Envelope, retried: bool) {
    if let Some(id) = env.id
        && !accept_id(ctx, id, retried)
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
        // Handled before the lane check (`Processor::apply_record`).
        Message::RetryParked | Message::DropParked { .. } => {}
    }
}

/// Per-source dedupe: true if `id` is above the source's watermark. A
/// `retried` message (out of the park lane) is applied even below it: it
/// was held back, never applied, while later ids of its source went on.
fn accept_id(ctx: &mut Ctx<'_>, id: MsgId, retried: bool) -> bool {
    let pos = (id.src_offset, id.index);
    let watermark = ctx.state.watermarks.get(&id.src_partition).copied();
    if watermark.is_some_and(|w| pos <= w) {
        return retried;
    }
    ctx.state.watermarks.insert(id.src_partition, pos);
    ctx.state.touch(StateKey::Watermark(id.src_partition));
    true
}
