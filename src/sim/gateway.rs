//! The simulated payment gateway: idempotent authorize / capture / void
//! under the effects' keys, Stripe's test tokens, and a ledger that checks
//! invariant 4 (a payment is captured at most once, and only an
//! authorization that was not voided; a captured payment is never voided).

use std::collections::BTreeMap;

use crate::domain::{Effect, EffectKind, Message, PaymentOutcome};

use super::Breach;

/// The decline token of the simulated customers (Stripe's test token).
pub const DECLINED_TOKEN: &str = "tok_chargeDeclined";

/// One authorization the gateway made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intent {
    pub order_id: String,
    pub amount: u64,
    /// Captures that moved money.
    pub captures: u32,
    pub voided: bool,
}

#[derive(Debug, Default)]
pub struct SimGateway {
    /// By payment id.
    pub intents: BTreeMap<String, Intent>,
    /// The payment id each order's authorization key created.
    by_order: BTreeMap<String, String>,
    /// First answer of every key that executed (idempotent replays).
    answers: BTreeMap<String, Message>,
    next_intent: u64,
    pub calls: u64,
}

impl SimGateway {
    /// Executes `effect` (the gateway received and processed the call) and
    /// returns the message the executor appends for it. A ledger violation
    /// is the processor asking for something invariant 4 forbids.
    pub fn execute(&mut self, effect: &Effect) -> Result<Message, Breach> {
        self.calls += 1;
        let key = effect.idempotency_key();
        if let Some(answer) = self.answers.get(&key) {
            return Ok(answer.clone());
        }
        let answer = match effect.kind {
            EffectKind::Authorize => self.authorize(effect),
            EffectKind::Capture => self.capture(effect)?,
            EffectKind::Void => self.void(effect)?,
        };
        // A void by order that found no authorization made no call the
        // gateway could remember (the client only searched).
        let searched_only = effect.kind == EffectKind::Void
            && effect.payment_id.is_empty()
            && !self.by_order.contains_key(&effect.order_id);
        if !searched_only {
            self.answers.insert(key, answer.clone());
        }
        Ok(answer)
    }

    fn authorize(&mut self, effect: &Effect) -> Message {
        let outcome = if effect.token == DECLINED_TOKEN {
            PaymentOutcome::Declined {
                code: "card_declined".into(),
            }
        } else {
            self.next_intent += 1;
            let payment_id = format!("pi_{:06}", self.next_intent);
            self.intents.insert(
                payment_id.clone(),
                Intent {
                    order_id: effect.order_id.clone(),
                    amount: effect.amount,
                    ..Intent::default()
                },
            );
            self.by_order
                .insert(effect.order_id.clone(), payment_id.clone());
            PaymentOutcome::Authorized { payment_id }
        };
        Message::PaymentResult {
            order_id: effect.order_id.clone(),
            outcome,
        }
    }

    fn capture(&mut self, effect: &Effect) -> Result<Message, Breach> {
        let Some(intent) = self.intents.get_mut(&effect.payment_id) else {
            return Err(Breach::new(
                "capture-of-an-authorization",
                format!(
                    "{}: capture of unknown payment {:?}",
                    effect.order_id, effect.payment_id
                ),
            ));
        };
        if intent.voided || intent.captures > 0 || intent.amount != effect.amount {
            return Err(Breach::new(
                "capture-at-most-once",
                format!(
                    "{}: capture of {} for {} on {intent:?}",
                    effect.order_id, effect.payment_id, effect.amount
                ),
            ));
        }
        intent.captures += 1;
        Ok(done(effect))
    }

    /// By payment id, or (empty id: the authorization's outcome is unknown)
    /// whatever the order's authorization key created, if anything.
    fn void(&mut self, effect: &Effect) -> Result<Message, Breach> {
        let id = match effect.payment_id.as_str() {
            "" => self.by_order.get(&effect.order_id).cloned(),
            id => Some(id.to_owned()),
        };
        if let Some(intent) = id.and_then(|id| self.intents.get_mut(&id)) {
            if intent.captures > 0 {
                return Err(Breach::new(
                    "no-void-of-a-capture",
                    format!("{}: void of a captured payment", effect.order_id),
                ));
            }
            intent.voided = true;
        }
        Ok(done(effect))
    }

    /// Money captured in total, and per order.
    pub fn captured(&self) -> (u64, BTreeMap<&str, u32>) {
        let mut total = 0;
        let mut by_order: BTreeMap<&str, u32> = BTreeMap::new();
        for intent in self.intents.values() {
            total += intent.amount * u64::from(intent.captures);
            *by_order.entry(intent.order_id.as_str()).or_default() += intent.captures;
        }
        (total, by_order)
    }
}

fn done(effect: &Effect) -> Message {
    Message::EffectDone {
        order_id: effect.order_id.clone(),
        kind: effect.kind,
    }
}
