//! Dispatch of one log record to the stages, and the context they share.

use serde::Deserialize;

use crate::domain::message::KeyedResult;
use crate::domain::order::valid_id;
use crate::domain::parked::{ParkEvent, ParkedRecord};
use crate::domain::partition::partition_for_key;
use crate::domain::{Effect, Envelope, Message, MsgId, RecordKind, Status, StatusEvent};

use super::finished::FinishedLimits;
use super::state::{OrderRec, PartitionState, parked_size};
use super::{inventory, payment, saga, validation};
use crate::domain::{OrderKey, RejectReason};

/// A record for the `orders` topic, emitted by the processor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub key: String,
    pub kind: RecordKind,
    pub value: Vec<u8>,
}

/// What processing records produced, for the runner to carry out: append
/// `messages` and `statuses` durably, start `effects`, publish the stock of
/// `stock_touched`, append `parked` to the park lane, tell whoever waits
/// for a stock change about `stock_refused`. `problems` are records that
/// could not be applied.
#[derive(Debug, Default)]
pub struct Output {
    pub messages: Vec<Outgoing>,
    pub statuses: Vec<StatusEvent>,
    pub effects: Vec<Effect>,
    pub stock_touched: Vec<String>,
    pub stock_refused: Vec<StockRefused>,
    pub problems: Vec<String>,
    pub parked: Vec<ParkEvent>,
}

/// A stock change (`SetStock`) the processor refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StockRefused {
    /// Offset of the `SetStock` record.
    pub offset: u64,
    pub sku: String,
    pub reason: String,
}

impl Output {
    pub fn clear(&mut self) {
        self.messages.clear();
        self.statuses.clear();
        self.effects.clear();
        self.stock_touched.clear();
        self.stock_refused.clear();
        self.problems.clear();
        self.parked.clear();
    }
}

/// The deterministic state machine of one `orders` partition.
pub struct Processor {
    pub partition: u32,
    pub partitions: u32,
    pub state: PartitionState,
    pub limits: Limits,
    /// Test seam: orders of this customer fail processing as if they hit a
    /// bug, to exercise the park lane (see `crate::app`, debug builds only).
    pub poison_customer: Option<String>,
    /// Status events emitted so far for the record being applied (their
    /// ids are `(partition, offset, index)`).
    status_index: u32,
    /// Messages sent so far for the record being applied (their ids are
    /// `(partition, offset, index)` too).
    send_index: u32,
}

/// The bounds of a partition's state (docs/design.md, "Bounds"). Each is a
/// decision of the state machine at the bound, made from the log alone
/// (counts and log time), so replays decide the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Finished orders remembered (idempotency): age in log time and count.
    pub finished: FinishedLimits,
    /// Orders in flight; a new order beyond ends `rejected`
    /// (`partition_busy`), and so does one while the outbox holds twice
    /// as many effects (captures and voids of finished orders pile up
    /// there while the gateway is down).
    pub max_inflight_orders: usize,
    /// Lines held here; a `Reserve` beyond is answered "not held".
    pub max_holds: usize,
    /// SKUs with stock; a stock change for a new SKU beyond is refused.
    pub max_skus: usize,
    /// The park lane: a record beyond either bound is refused.
    pub max_parked_records: usize,
    pub max_parked_bytes: usize,
}

impl Limits {
    /// Whether a new order must be turned away (see `max_inflight_orders`).
    pub fn is_busy(&self, state: &PartitionState) -> bool {
        state.orders.len() >= self.max_inflight_orders
            || state.outbox.len() >= 2 * self.max_inflight_orders
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            finished: FinishedLimits::default(),
            max_inflight_orders: 100_000,
            max_holds: 1_000_000,
            max_skus: 1_000_000,
            max_parked_records: 10_000,
            max_parked_bytes: 64 << 20,
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
    /// Messages sent for this record so far (shared with the processor,
    /// as `status_index`).
    send_index: &'a mut u32,
    /// Status events of this record so far (shared with the processor:
    /// a retry applies several parked records within one control record).
    status_index: &'a mut u32,
    /// Offset of the record being applied from the log (for a parked
    /// record being retried, the retry command's), the base of the ids of
    /// its status events and of the messages it sends: a receiver whose
    /// watermark moved past the parked record's own offset (later records
    /// of this partition sent it messages) must still take them.
    status_offset: u64,
    pub limits: &'a Limits,
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
            src_offset: self.status_offset,
            index: *self.send_index,
        };
        *self.send_index += 1;
        let value = Envelope::new(Some(id), body).encode();
        self.out.messages.push(Outgoing {
            key: key.to_owned(),
            kind: RecordKind::Internal,
            value,
        });
    }

    /// Whether `order_id` is in flight here or finished within the retention.
    pub fn knows(&self, order_id: &str) -> bool {
        self.state.orders.contains_key(order_id) || self.finished(order_id).is_some()
    }

    /// The finished entry of `order_id`, if it is remembered.
    pub fn finished(&self, order_id: &str) -> Option<crate::stages::finished::FinishedEntry> {
        self.state.finished.get(&OrderKey::of(order_id), self.at_ms)
    }

    /// Moves an order to `status`, emitting the status event.
    pub fn set_status(&mut self, order_id: &str, status: Status, reason: Option<String>) {
        self.set_status_with(order_id, status, reason, Vec::new(), 0);
    }

    /// Rejects an order that never went in flight (its only status).
    pub fn reject(&mut self, order_id: &str, reason: RejectReason, email: Option<String>) {
        self.transition(
            order_id,
            Status::Rejected,
            Some(reason.code().to_owned()),
            email,
            Vec::new(),
            0,
        );
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
        // The contact goes on terminal events only: the email target wants
        // no other, and it is not copied more often than needed.
        let email = match status.is_terminal() {
            true => self
                .state
                .orders
                .get(order_id)
                .and_then(|r| r.saga.as_ref())
                .and_then(|s| s.email.clone()),
            false => None,
        };
        self.transition(
            order_id,
            status,
            reason,
            email,
            refused_skus,
            released_lines,
        );
    }

    fn transition(
        &mut self,
        order_id: &str,
        status: Status,
        reason: Option<String>,
        email: Option<String>,
        refused_skus: Vec<String>,
        released_lines: u16,
    ) {
        let (prev, seq) = match self.state.orders.get(order_id) {
            Some(rec) => (Some(rec.status), rec.seq + 1),
            None => (None, 1),
        };
        assert!(
            Status::may_follow(prev, status),
            "invalid transition {prev:?} -> {status} for {order_id}"
        );
        if status.is_terminal() {
            self.state.orders.remove(order_id);
            let confirmed = status == Status::Confirmed;
            self.state
                .finished
                .insert(OrderKey::of(order_id), self.at_ms, confirmed);
        } else {
            let rec = self
                .state
                .orders
                .entry(order_id.to_owned())
                .or_insert(OrderRec {
                    seq: 0,
                    status,
                    saga: None,
                });
            rec.seq = seq;
            rec.status = status;
        }
        let src = MsgId {
            src_partition: self.partition,
            src_offset: self.status_offset,
            index: *self.status_index,
        };
        *self.status_index += 1;
        self.out.statuses.push(StatusEvent {
            order_id: order_id.to_owned(),
            seq,
            status,
            reason,
            at_ms: self.at_ms,
            refused_skus,
            released_lines,
            src: Some(src),
            email,
        });
    }

    pub fn start_effect(&mut self, effect: Effect) {
        let key = (effect.order_id.clone(), effect.kind);
        self.state.outbox.insert(key, effect.clone());
        self.out.effects.push(effect);
    }

    pub fn finish_effect(&mut self, order_id: &str, kind: crate::domain::EffectKind) {
        let key = (order_id.to_owned(), kind);
        self.state.outbox.remove(&key);
        self.state.failed_effects.remove(&key);
    }

    /// The gateway refused an outbox effect for good: it waits, marked,
    /// for an operator (a late report of one already done is ignored).
    pub fn fail_effect(&mut self, order_id: &str, kind: crate::domain::EffectKind, reason: String) {
        let key = (order_id.to_owned(), kind);
        if self.state.outbox.contains_key(&key) {
            self.state.failed_effects.insert(key, reason);
        }
    }
}

impl Processor {
    pub fn new(partition: u32, partitions: u32, state: PartitionState) -> Processor {
        assert!(partition < partitions);
        let mut p = Processor {
            partition,
            partitions,
            state,
            limits: Limits::default(),
            poison_customer: None,
            status_index: 0,
            send_index: 0,
        };
        p.state.finished.set_limits(p.limits.finished);
        p
    }

    pub fn with_poison_customer(mut self, customer: Option<String>) -> Processor {
        self.poison_customer = customer;
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> Processor {
        assert!(limits.finished.max_entries > 0);
        self.limits = limits;
        self.state.finished.set_limits(limits.finished);
        self
    }

    /// Applies one record. Never panics on bad input: a record that cannot
    /// be decoded or processed goes to the park lane, and so do later
    /// records with its key or about its order, until an operator retries
    /// or drops it.
    pub fn apply(&mut self, input: Input<'_>, out: &mut Output) {
        // Expire first: a resent, forgotten id is a new order.
        self.state.finished.expire(input.timestamp_ms);
        self.status_index = 0;
        self.send_index = 0;
        self.apply_record(input, input.offset, false, out);
    }

    /// `retried`: the record comes out of the park lane, so the per-source
    /// dedupe must not drop it for ids applied while it waited.
    /// `status_offset`: the offset its status events are numbered from.
    fn apply_record(
        &mut self,
        input: Input<'_>,
        status_offset: u64,
        retried: bool,
        out: &mut Output,
    ) {
        let envelope = match input.kind {
            RecordKind::OrderJson => None,
            RecordKind::Internal => Some(Envelope::decode(input.value)),
        };
        let envelope = match envelope {
            Some(Ok(Envelope {
                body: Message::Results { results },
                ..
            })) => return self.apply_results(&input, status_offset, retried, results, out),
            other => other,
        };
        if let Some(Ok(env)) = &envelope {
            match env.body {
                Message::RetryParked => {
                    return self.retry_parked(input.offset, input.timestamp_ms, out);
                }
                Message::DropParked { offset } => return self.drop_parked(offset, out),
                Message::DropEffect { ref order_id, kind } => {
                    let key = (order_id.clone(), kind);
                    if self.state.failed_effects.remove(&key).is_some() {
                        self.state.outbox.remove(&key);
                    }
                    return;
                }
                _ => {}
            }
        }
        let order_id = match &envelope {
            Some(Ok(env)) => env.body.order_id().map(str::to_owned),
            Some(Err(_)) => None,
            None if self.state.has_blocked() => peek::<IdOnly>(input.value).order_id,
            None => None,
        };
        if let Some(at) = self.state.blocked_by(input.key, order_id.as_deref()) {
            let reason = waits_behind(at);
            return self.park(&input, status_offset, order_id, reason, out);
        }
        match envelope {
            None => {
                if let Some(poison) = &self.poison_customer
                    && peek::<CustomerOnly>(input.value).customer_id.as_ref() == Some(poison)
                {
                    let order_id = peek::<IdOnly>(input.value).order_id;
                    return self.park(
                        &input,
                        status_offset,
                        order_id,
                        "injected processing fault".into(),
                        out,
                    );
                }
                validation::order_placed(&mut self.ctx(&input, status_offset, out), input.value)
            }
            Some(Ok(env)) => apply_message(&mut self.ctx(&input, status_offset, out), env, retried),
            Some(Err(e)) => self.park(&input, status_offset, None, e.to_string(), out),
        }
    }

    /// Applies each result of a results record as if it were a record of
    /// its own under its own key, in order. Those the park lane holds back
    /// (or that share a key or an order with one of this record's held
    /// back) are parked together, as one record at this offset holding
    /// only them, which holds back all their keys and orders.
    fn apply_results(
        &mut self,
        input: &Input<'_>,
        status_offset: u64,
        retried: bool,
        results: Vec<KeyedResult>,
        out: &mut Output,
    ) {
        let mut held: Vec<KeyedResult> = Vec::new();
        let mut reason = None;
        for result in results {
            let order_id = result.body.order_id();
            let behind = match self.state.blocked_by(result.key.as_bytes(), order_id) {
                Some(at) => Some(waits_behind(at)),
                None => held
                    .iter()
                    .any(|h| h.key == result.key || h.body.order_id() == order_id)
                    .then(|| "waits behind a parked result of its record".to_owned()),
            };
            if let Some(why) = behind {
                reason.get_or_insert(why);
                held.push(result);
                continue;
            }
            let alone = Input {
                key: result.key.as_bytes(),
                ..*input
            };
            let mut ctx = self.ctx(&alone, status_offset, out);
            apply_message(&mut ctx, Envelope::new(None, result.body), retried);
        }
        let Some(reason) = reason else {
            return;
        };
        let order_id = held[0].body.order_id().map(str::to_owned);
        let (key, value) = KeyedResult::record(&held);
        let parked = Input {
            key: key.as_bytes(),
            value: &value,
            ..*input
        };
        self.park(&parked, status_offset, order_id, reason, out);
    }

    fn ctx<'a>(
        &'a mut self,
        input: &Input<'a>,
        status_offset: u64,
        out: &'a mut Output,
    ) -> Ctx<'a> {
        Ctx {
            partition: self.partition,
            partitions: self.partitions,
            offset: input.offset,
            at_ms: input.timestamp_ms,
            key: input.key,
            send_index: &mut self.send_index,
            status_index: &mut self.status_index,
            status_offset,
            limits: &self.limits,
            state: &mut self.state,
            out,
        }
    }

    /// `status_offset`: as in [`Processor::apply_record`], for the status
    /// of an order refused instead of parked.
    fn park(
        &mut self,
        input: &Input<'_>,
        status_offset: u64,
        order_id: Option<String>,
        reason: String,
        out: &mut Output,
    ) {
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
        // Card data is never set aside: the lane is checkpointed, written
        // to `orders-parked` and shown to operators.
        if record.holds_pan() {
            return self.refuse_card_data(input, status_offset, record, out);
        }
        // The same bytes parked twice are one record (a source's replay
        // re-sent it while the first copy waits).
        if self.state.parked_copy_of(&record).is_some() {
            return;
        }
        let full = self.state.parked.len() >= self.limits.max_parked_records
            || self.state.parked_bytes() + parked_size(&record) > self.limits.max_parked_bytes;
        if full {
            return self.refuse_parking(input, status_offset, record, out);
        }
        out.parked.push(ParkEvent::Parked(record.clone()));
        self.state.park(input.offset, record);
    }

    /// The lane is at its bound: the record is not set aside. An order
    /// ends `rejected` (`park_lane_full`), so its customer hears of it and
    /// nothing is held for it; any other record goes to `orders-parked` as
    /// refused, bytes included, for an operator to act on. Either way it
    /// stays in `orders` too: nothing is lost.
    fn refuse_parking(
        &mut self,
        input: &Input<'_>,
        status_offset: u64,
        record: ParkedRecord,
        out: &mut Output,
    ) {
        out.problems.push(format!(
            "offset {}: the park lane is full ({} records, {} bytes); the record is refused",
            input.offset,
            self.state.parked.len(),
            self.state.parked_bytes()
        ));
        let order_id = match (input.kind, &record.order_id) {
            (RecordKind::OrderJson, Some(id)) if valid_id(id) => Some(id.clone()),
            (RecordKind::OrderJson, _) => Some(format!("ord-{}-{}", self.partition, input.offset)),
            (RecordKind::Internal, _) => None,
        };
        let reason = RejectReason::ParkLaneFull;
        self.refuse(input, status_offset, order_id, reason, record, out);
    }

    /// A record holding a card number is refused, never parked. An order
    /// ends `rejected` (`pan_detected`) under its position id, as the
    /// validation stage names it (nothing is read out of such a body);
    /// any other record goes to `orders-parked` as refused with the card
    /// number's digits masked, so an operator sees that and where.
    fn refuse_card_data(
        &mut self,
        input: &Input<'_>,
        status_offset: u64,
        record: ParkedRecord,
        out: &mut Output,
    ) {
        out.problems.push(format!(
            "offset {}: a record holding a card number was refused, not parked",
            input.offset
        ));
        let order_id = (input.kind == RecordKind::OrderJson)
            .then(|| format!("ord-{}-{}", self.partition, input.offset));
        let reason = RejectReason::PanDetected;
        self.refuse(
            input,
            status_offset,
            order_id,
            reason,
            record.redacted(),
            out,
        );
    }

    /// A record not set aside: an order (`order_id`) ends `rejected` with
    /// `reason` unless it already has a status; any other record goes to
    /// `orders-parked` as refused.
    fn refuse(
        &mut self,
        input: &Input<'_>,
        status_offset: u64,
        order_id: Option<String>,
        reason: RejectReason,
        record: ParkedRecord,
        out: &mut Output,
    ) {
        match order_id {
            Some(id) => {
                let mut ctx = self.ctx(input, status_offset, out);
                if !ctx.knows(&id) {
                    ctx.reject(&id, reason, None);
                }
            }
            None => out.parked.push(ParkEvent::Refused(record)),
        }
    }

    /// Runs the failed captures and voids again, then takes every parked
    /// record out of the lane and applies it again at its own position (an
    /// order id made up from it stays the same), in the original order;
    /// the ids of the statuses and messages they give derive from the
    /// command's offset. One that still fails is parked again and holds
    /// back those behind it again.
    fn retry_parked(&mut self, command_offset: u64, now_ms: u64, out: &mut Output) {
        for key in std::mem::take(&mut self.state.failed_effects).into_keys() {
            let effect = self
                .state
                .outbox
                .get(&key)
                .expect("a failed effect is in the outbox");
            out.effects.push(effect.clone());
        }
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
            self.apply_record(input, command_offset, true, out);
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

    /// Effects asked for and not yet done: restarted after recovery
    /// (those that failed for good wait for an operator's retry).
    pub fn pending_effects(&self) -> Vec<Effect> {
        let failed = &self.state.failed_effects;
        self.state
            .outbox
            .iter()
            .filter(|(key, _)| !failed.contains_key(*key))
            .map(|(_, e)| e.clone())
            .collect()
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

/// Why a record waits in the park lane behind the one at `at`.
fn waits_behind(at: u64) -> String {
    format!("waits behind the parked record at offset {at}")
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
        Message::EffectFailed {
            order_id,
            kind,
            reason,
        } => ctx.fail_effect(&order_id, kind, reason),
        Message::SetStock { sku, available } => inventory::set_stock(ctx, &sku, available),
        // Handled before the lane check (`Processor::apply_record`).
        Message::RetryParked
        | Message::DropParked { .. }
        | Message::DropEffect { .. }
        | Message::Results { .. } => {}
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
    true
}
