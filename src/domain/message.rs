//! Messages on the `orders` topic that orderflow itself writes, and the
//! effects the processor asks the outside world to run.
//!
//! Upstream orders are JSON (the contract's order); everything here is
//! MessagePack in a versioned [`Envelope`]. The log marks which is which
//! (a Kafka header, or a flag on an embedded-log record).

use serde::{Deserialize, Serialize};

use super::DecodeError;

/// How a record's value is encoded. On Kafka this is a header; in the
/// embedded log a flag byte of the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecordKind {
    /// The contract's order JSON, written by intake or an upstream producer.
    OrderJson = 0,
    /// An orderflow MessagePack envelope.
    Internal = 1,
}

impl RecordKind {
    pub fn from_flag(flag: u8) -> Option<Self> {
        match flag {
            0 => Some(RecordKind::OrderJson),
            1 => Some(RecordKind::Internal),
            _ => None,
        }
    }
}

/// Wire version of [`Envelope`]. A reader refuses any other.
pub const WIRE_VERSION: u8 = 1;

/// Deterministic id of a message a processor emits: where it came from.
/// A receiver keeps, per source partition, the highest id it applied and
/// drops anything not above it (a replaying sender emits the same ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MsgId {
    pub src_partition: u32,
    pub src_offset: u64,
    pub index: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u8,
    /// Set on messages emitted by a processor; `None` on messages from
    /// intake or the effect executor, which are deduplicated by state.
    pub id: Option<MsgId>,
    pub body: Message,
}

impl Envelope {
    pub fn new(id: Option<MsgId>, body: Message) -> Self {
        Envelope {
            v: WIRE_VERSION,
            id,
            body,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("an envelope always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let env: Envelope =
            rmp_serde::from_slice(bytes).map_err(DecodeError::undecodable("message"))?;
        DecodeError::check_version("message", env.v, WIRE_VERSION)?;
        env.body.check()?;
        Ok(env)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Hold `quantity` of `sku` for line `line` of a saga whose home
    /// partition is keyed by `home_sku`. Keyed by `sku`.
    Reserve {
        order_id: String,
        home_sku: String,
        line: u16,
        sku: String,
        quantity: u32,
    },
    /// Answer to `Reserve`. Keyed by the order's home SKU.
    ReservationResult {
        order_id: String,
        line: u16,
        held: bool,
    },
    /// Turn a held line into a sale. Keyed by the line's SKU.
    Commit { order_id: String, line: u16 },
    /// Give a held line back. Keyed by the line's SKU.
    Release { order_id: String, line: u16 },
    /// Outcome of the authorize effect. Keyed by the order's home SKU.
    PaymentResult {
        order_id: String,
        outcome: PaymentOutcome,
    },
    /// A capture or void effect completed. Keyed by the order's home SKU.
    EffectDone { order_id: String, kind: EffectKind },
    /// Admin: set a SKU's available stock. Keyed by the SKU.
    SetStock { sku: String, available: u64 },
    /// Operator: process this partition's parked records again, in their
    /// original order (those that still fail are parked again).
    RetryParked,
    /// Operator: take the parked record at `offset` out of the lane for
    /// good, unprocessed.
    DropParked { offset: u64 },
    /// A capture or void the gateway refused for good (or answered
    /// unexpectedly): it stays in the outbox, marked failed with `reason`,
    /// until an operator retries (`RetryParked`) or drops it. Keyed by the
    /// order's home SKU.
    EffectFailed {
        order_id: String,
        kind: EffectKind,
        reason: String,
    },
    /// Operator: forget a failed capture or void (settled by hand).
    DropEffect { order_id: String, kind: EffectKind },
    /// Several effect results of one partition in one record (the executor
    /// writes what it has ready together, so an order costs its partition
    /// about one record instead of three). Each is applied as if it had
    /// been a record of its own with its own key; those the park lane holds
    /// back are parked together (`Processor::apply_results`).
    Results { results: Vec<KeyedResult> },
}

/// Most results one [`Message::Results`] record carries. Small, because
/// readers bound their batches by records, not bytes: a record stays
/// within a few KiB (at most about 7 KiB), as a plain record of the order
/// does, so a batch of 4,096 records stays within tens of MiB.
pub const MAX_RESULTS_PER_RECORD: usize = 16;

/// One result of a [`Message::Results`] record, with the key its record
/// would have had alone (the order's home SKU).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedResult {
    pub key: String,
    pub body: Message,
}

impl KeyedResult {
    /// The record `results` make together: `(key, value)`. A lone result
    /// is a plain message under its own key; several are one
    /// [`Message::Results`] under the first one's key.
    pub fn record(results: &[KeyedResult]) -> (&str, Vec<u8>) {
        assert!(
            (1..=MAX_RESULTS_PER_RECORD).contains(&results.len()),
            "a results record holds 1 to {MAX_RESULTS_PER_RECORD} results"
        );
        let body = match results {
            [one] => one.body.clone(),
            many => Message::Results {
                results: many.to_vec(),
            },
        };
        (&results[0].key, Envelope::new(None, body).encode())
    }
}

impl Message {
    /// Field limits, checked on every message read from the log:
    /// orderflow writes none beyond them, but anyone with access to the
    /// log can write, and what a message leaves in the state (so in a
    /// checkpoint) must stay within the sizes `stages::snapshot` proves.
    pub fn check(&self) -> Result<(), DecodeError> {
        use crate::domain::order::{MAX_TOKEN_LEN, valid_id, valid_sku};
        let id = |id: &str| {
            valid_id(id).then_some(()).ok_or_else(|| {
                DecodeError::Invalid("order_id must match [A-Za-z0-9._:-]{1,64}".to_owned())
            })
        };
        let sku = |field: &str, sku: &str| {
            valid_sku(sku).then_some(()).ok_or_else(|| {
                DecodeError::Invalid(format!("{field} must match [A-Za-z0-9._-]{{1,64}}"))
            })
        };
        let text = |field: &str, text: &str| {
            (text.len() <= MAX_TOKEN_LEN).then_some(()).ok_or_else(|| {
                DecodeError::Invalid(format!("{field} is longer than {MAX_TOKEN_LEN} bytes"))
            })
        };
        match self {
            Message::Reserve {
                order_id,
                home_sku,
                sku: line_sku,
                ..
            } => {
                id(order_id)?;
                sku("home_sku", home_sku)?;
                sku("sku", line_sku)
            }
            Message::PaymentResult { order_id, outcome } => {
                id(order_id)?;
                match outcome {
                    PaymentOutcome::Authorized { payment_id } => text("payment_id", payment_id),
                    PaymentOutcome::Declined { code } => text("code", code),
                    PaymentOutcome::Failed { reason } => text("reason", reason),
                }
            }
            Message::ReservationResult { order_id, .. }
            | Message::Commit { order_id, .. }
            | Message::Release { order_id, .. }
            | Message::EffectDone { order_id, .. }
            | Message::DropEffect { order_id, .. } => id(order_id),
            Message::EffectFailed {
                order_id, reason, ..
            } => {
                id(order_id)?;
                text("reason", reason)
            }
            Message::SetStock { sku: s, .. } => sku("sku", s),
            Message::RetryParked | Message::DropParked { .. } => Ok(()),
            Message::Results { results } => {
                if results.is_empty() || results.len() > MAX_RESULTS_PER_RECORD {
                    return Err(DecodeError::Invalid(format!(
                        "a results record holds 1 to {MAX_RESULTS_PER_RECORD} results, not {}",
                        results.len()
                    )));
                }
                results.iter().try_for_each(|r| {
                    if !r.body.is_result() {
                        return Err(DecodeError::Invalid(
                            "a results record holds only payment and effect results".to_owned(),
                        ));
                    }
                    sku("key", &r.key)?;
                    r.body.check()
                })
            }
        }
    }

    /// An effect's outcome, which the executor may write in a
    /// [`Message::Results`] record.
    pub fn is_result(&self) -> bool {
        matches!(
            self,
            Message::PaymentResult { .. }
                | Message::EffectDone { .. }
                | Message::EffectFailed { .. }
        )
    }

    /// Whether the message is about `order_id` (for a results record: one
    /// of its results is).
    pub fn concerns(&self, order_id: &str) -> bool {
        match self {
            Message::Results { results } => results.iter().any(|r| r.body.concerns(order_id)),
            other => other.order_id() == Some(order_id),
        }
    }

    /// The order this message is about, if any.
    pub fn order_id(&self) -> Option<&str> {
        match self {
            Message::Reserve { order_id, .. }
            | Message::ReservationResult { order_id, .. }
            | Message::Commit { order_id, .. }
            | Message::Release { order_id, .. }
            | Message::PaymentResult { order_id, .. }
            | Message::EffectDone { order_id, .. }
            | Message::EffectFailed { order_id, .. } => Some(order_id),
            // Operator commands run before the park lane's check.
            Message::SetStock { .. }
            | Message::RetryParked
            | Message::DropParked { .. }
            | Message::DropEffect { .. } => None,
            // Each result names its own (see `Message::concerns`).
            Message::Results { .. } => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentOutcome {
    Authorized {
        payment_id: String,
    },
    Declined {
        code: String,
    },
    /// The gateway stayed unavailable through every retry.
    Failed {
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EffectKind {
    Authorize,
    Capture,
    Void,
}

impl EffectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EffectKind::Authorize => "authorize",
            EffectKind::Capture => "capture",
            EffectKind::Void => "void",
        }
    }
}

/// An idempotent call to the outside world, kept in the processor's outbox
/// until its completion comes back through the log. Running it again after a
/// crash is safe: the idempotency key is derived from the order and the step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    pub order_id: String,
    pub kind: EffectKind,
    /// Key under which the completion is appended (the home SKU).
    pub reply_key: String,
    pub amount: u64,
    pub currency: String,
    /// Payment token for `Authorize`; empty otherwise. A token, never a PAN.
    pub token: String,
    /// The authorization to capture or void; empty for `Authorize` and for
    /// a void whose authorization outcome is unknown.
    pub payment_id: String,
}

impl Effect {
    /// `order_id:step`, stable across crashes and replays.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.order_id, self.kind.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Envelopes round-trip and a foreign version is refused.
    #[test]
    fn roundtrip_and_version() {
        let env = Envelope::new(
            Some(MsgId {
                src_partition: 1,
                src_offset: 7,
                index: 0,
            }),
            Message::SetStock {
                sku: "A".into(),
                available: 3,
            },
        );
        assert_eq!(Envelope::decode(&env.encode()).unwrap(), env);
        let mut other = env.clone();
        other.v = 99;
        assert_eq!(
            Envelope::decode(&other.encode()).unwrap_err(),
            DecodeError::Version {
                what: "message",
                found: 99,
                reads: WIRE_VERSION
            }
        );
        assert!(Envelope::decode(b"\xff\x00garbage").is_err());
    }

    /// A message whose fields break their limits is refused at decode,
    /// whoever wrote it to the log.
    #[test]
    fn oversized_fields_are_refused() {
        let bad = [
            Message::SetStock {
                sku: "S".repeat(65),
                available: 1,
            },
            Message::SetStock {
                sku: "no spaces".into(),
                available: 1,
            },
            Message::Commit {
                order_id: "o".repeat(65),
                line: 0,
            },
            Message::PaymentResult {
                order_id: "o-1".into(),
                outcome: PaymentOutcome::Declined {
                    code: "c".repeat(256),
                },
            },
        ];
        for body in bad {
            let e = Envelope::decode(&Envelope::new(None, body).encode()).unwrap_err();
            assert!(matches!(e, DecodeError::Invalid(_)), "{e}");
            assert!(e.to_string().starts_with("invalid message:"), "{e}");
        }
    }
    /// A results record holds 1 to `MAX_RESULTS_PER_RECORD` results, each
    /// a payment or effect result under a valid key; nothing else decodes.
    #[test]
    fn results_records_are_checked() {
        let done = |n: usize| KeyedResult {
            key: "SKU-1".into(),
            body: Message::EffectDone {
                order_id: format!("o-{n}"),
                kind: EffectKind::Capture,
            },
        };
        let decode = |results: Vec<KeyedResult>| {
            Envelope::decode(&Envelope::new(None, Message::Results { results }).encode())
        };
        let full: Vec<KeyedResult> = (0..MAX_RESULTS_PER_RECORD).map(done).collect();
        assert!(decode(full.clone()).is_ok());
        let mut over = full;
        over.push(done(0));
        let mut bad_key = done(1);
        bad_key.key = "no spaces".into();
        let nested = KeyedResult {
            key: "SKU-1".into(),
            body: Message::Results {
                results: vec![done(2)],
            },
        };
        let command = KeyedResult {
            key: "SKU-1".into(),
            body: Message::RetryParked,
        };
        for results in [
            vec![],
            over,
            vec![bad_key],
            vec![nested],
            vec![done(3), command],
        ] {
            let e = decode(results).unwrap_err();
            assert!(matches!(e, DecodeError::Invalid(_)), "{e}");
        }
        let lone = [done(4)];
        let (key, value) = KeyedResult::record(&lone);
        assert_eq!(key, "SKU-1");
        assert_eq!(Envelope::decode(&value).unwrap().body, done(4).body);
    }
}
