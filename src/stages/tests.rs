//! Unit tests of the stages, driving one processor record by record.

use crate::domain::partition::partition_for_key;
use crate::domain::{EffectKind, Envelope, Message, MsgId, PaymentOutcome, RecordKind, Status};

use super::processor::Input;
use super::{Output, PartitionState, Processor};

const N: u32 = 4;

/// A SKU that lives on partition `p` of `N`.
fn sku_on(p: u32, nth: usize) -> String {
    (0..)
        .map(|i| format!("SKU-{i}"))
        .filter(|s| partition_for_key(s.as_bytes(), N) == p)
        .nth(nth)
        .unwrap()
}

struct Harness {
    proc: Processor,
    offset: u64,
}

impl Harness {
    fn new(p: u32) -> Harness {
        Harness {
            proc: Processor::new(p, N, PartitionState::default()),
            offset: 0,
        }
    }

    fn feed(&mut self, kind: RecordKind, key: &str, value: &[u8]) -> Output {
        let mut out = Output::default();
        let input = Input {
            offset: self.offset,
            timestamp_ms: 1_000 + self.offset,
            kind,
            key: key.as_bytes(),
            value,
        };
        self.proc.apply(input, &mut out);
        self.offset += 1;
        out
    }

    fn msg(&mut self, key: &str, id: Option<MsgId>, body: Message) -> Output {
        self.feed(RecordKind::Internal, key, &Envelope::new(id, body).encode())
    }

    fn stock(&mut self, sku: &str, available: u64) {
        self.msg(
            sku,
            None,
            Message::SetStock {
                sku: sku.into(),
                available,
            },
        );
    }

    fn order(&mut self, id: &str, lines: &[(&str, u32)], token: &str) -> Output {
        let lines: Vec<_> = lines
            .iter()
            .map(|(s, q)| serde_json::json!({"sku": s, "quantity": q, "unit_price": 500}))
            .collect();
        let body = serde_json::json!({"order_id": id, "customer_id": "c", "currency": "USD", "lines": lines, "payment": {"token": token}});
        let key = body["lines"][0]["sku"].as_str().unwrap().to_owned();
        self.feed(
            RecordKind::OrderJson,
            &key,
            &serde_json::to_vec(&body).unwrap(),
        )
    }

    fn counts(&self, sku: &str) -> (u64, u64, u64) {
        let s = &self.proc.state.stock[sku];
        (s.available, s.reserved, s.sold)
    }
}

fn statuses(out: &Output) -> Vec<Status> {
    out.statuses.iter().map(|s| s.status).collect()
}

/// A single-SKU order is accepted, reserved and asks for authorization.
#[test]
fn single_sku_reserves_and_authorizes() {
    let sku = sku_on(0, 0);
    let mut h = Harness::new(0);
    h.stock(&sku, 5);
    let out = h.order("o1", &[(&sku, 2)], "tok_visa");
    assert_eq!(statuses(&out), [Status::Accepted, Status::Reserved]);
    assert_eq!(out.effects.len(), 1);
    assert_eq!(out.effects[0].kind, EffectKind::Authorize);
    assert_eq!(out.effects[0].amount, 1000);
    assert!(
        out.messages.is_empty(),
        "a single-SKU order never leaves its partition"
    );
    assert_eq!(h.counts(&sku), (3, 2, 0));
}

/// Demand above stock never oversells: the order ends out_of_stock.
#[test]
fn no_oversell() {
    let sku = sku_on(1, 0);
    let mut h = Harness::new(1);
    h.stock(&sku, 3);
    assert_eq!(
        statuses(&h.order("a", &[(&sku, 2)], "tok_visa")),
        [Status::Accepted, Status::Reserved]
    );
    assert_eq!(
        statuses(&h.order("b", &[(&sku, 2)], "tok_visa")),
        [Status::Accepted, Status::OutOfStock]
    );
    assert_eq!(h.counts(&sku), (1, 2, 0));
}

/// Authorization confirms, commits stock and asks for capture; a second
/// identical result changes nothing.
#[test]
fn authorized_confirms_and_captures_once() {
    let sku = sku_on(0, 0);
    let mut h = Harness::new(0);
    h.stock(&sku, 5);
    h.order("o1", &[(&sku, 2)], "tok_visa");
    let result = Message::PaymentResult {
        order_id: "o1".into(),
        outcome: PaymentOutcome::Authorized {
            payment_id: "pi_1".into(),
        },
    };
    let out = h.msg(&sku, None, result.clone());
    assert_eq!(statuses(&out), [Status::Paid, Status::Confirmed]);
    assert_eq!(
        out.effects.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EffectKind::Capture]
    );
    assert_eq!(h.counts(&sku), (3, 0, 2));
    let again = h.msg(&sku, None, result);
    assert!(again.statuses.is_empty() && again.effects.is_empty());
}

/// A decline releases the stock; an authorization arriving after the
/// order failed is voided.
#[test]
fn decline_releases_and_late_authorization_is_voided() {
    let sku = sku_on(2, 0);
    let mut h = Harness::new(2);
    h.stock(&sku, 5);
    h.order("o1", &[(&sku, 4)], "tok_chargeDeclined");
    let out = h.msg(
        &sku,
        None,
        Message::PaymentResult {
            order_id: "o1".into(),
            outcome: PaymentOutcome::Declined {
                code: "card_declined".into(),
            },
        },
    );
    assert_eq!(statuses(&out), [Status::PaymentDeclined]);
    assert_eq!(out.statuses[0].reason.as_deref(), Some("card_declined"));
    assert_eq!(h.counts(&sku), (5, 0, 0));
    let late = h.msg(
        &sku,
        None,
        Message::PaymentResult {
            order_id: "o1".into(),
            outcome: PaymentOutcome::Authorized {
                payment_id: "pi_x".into(),
            },
        },
    );
    assert_eq!(
        late.effects
            .iter()
            .map(|e| (e.kind, e.payment_id.as_str()))
            .collect::<Vec<_>>(),
        [(EffectKind::Void, "pi_x")]
    );
}

/// A gateway failure ends payment_failed, releases stock and voids.
#[test]
fn gateway_failure_voids() {
    let sku = sku_on(3, 0);
    let mut h = Harness::new(3);
    h.stock(&sku, 1);
    h.order("o1", &[(&sku, 1)], "tok_visa");
    let out = h.msg(
        &sku,
        None,
        Message::PaymentResult {
            order_id: "o1".into(),
            outcome: PaymentOutcome::Failed {
                reason: "gateway_unavailable".into(),
            },
        },
    );
    assert_eq!(statuses(&out), [Status::PaymentFailed]);
    assert_eq!(out.effects[0].kind, EffectKind::Void);
    assert_eq!(h.counts(&sku), (1, 0, 0));
    let done = h.msg(
        &sku,
        None,
        Message::EffectDone {
            order_id: "o1".into(),
            kind: EffectKind::Void,
        },
    );
    assert!(done.effects.is_empty());
    assert!(h.proc.state.outbox.is_empty());
}

/// Invalid orders from the log are rejected with the contract's code; a
/// card number is rejected under a position id, never its own fields.
#[test]
fn validation_rejects() {
    let mut h = Harness::new(0);
    let out = h.feed(RecordKind::OrderJson, "k", br#"{"order_id":"bad-1","customer_id":"c","currency":"usd","lines":[],"payment":{"token":"t"}}"#);
    assert_eq!(statuses(&out), [Status::Rejected]);
    assert_eq!(out.statuses[0].order_id, "bad-1");
    assert_eq!(out.statuses[0].reason.as_deref(), Some("invalid_currency"));
    let out = h.feed(
        RecordKind::OrderJson,
        "k",
        br#"{"order_id":"4242424242424242"}"#,
    );
    assert_eq!(out.statuses[0].order_id, "ord-0-1");
    assert_eq!(out.statuses[0].reason.as_deref(), Some("pan_detected"));
    let out = h.feed(RecordKind::OrderJson, "k", b"not json");
    assert_eq!(out.statuses[0].reason.as_deref(), Some("malformed_json"));
}

/// The same order id twice is one order.
#[test]
fn duplicate_order_id_is_one_order() {
    let sku = sku_on(0, 0);
    let mut h = Harness::new(0);
    h.stock(&sku, 5);
    h.order("o1", &[(&sku, 1)], "tok_visa");
    let again = h.order("o1", &[(&sku, 1)], "tok_visa");
    assert!(again.statuses.is_empty() && again.effects.is_empty());
    assert_eq!(h.counts(&sku), (4, 1, 0));
}

/// A multi-SKU order sends a reserve to the other partition with a
/// deterministic id, and that partition drops a replayed copy.
#[test]
fn saga_messages_and_dedupe() {
    let (home, remote) = (sku_on(0, 0), sku_on(1, 0));
    let mut h = Harness::new(0);
    h.stock(&home, 5);
    let out = h.order("o1", &[(&home, 1), (&remote, 2)], "tok_visa");
    assert_eq!(statuses(&out), [Status::Accepted]);
    assert_eq!(out.messages.len(), 1);
    let env = Envelope::decode(&out.messages[0].value).unwrap();
    assert_eq!(
        env.id,
        Some(MsgId {
            src_partition: 0,
            src_offset: 1,
            index: 0
        })
    );

    let mut r = Harness::new(1);
    r.stock(&remote, 2);
    let first = r.msg(&remote, env.id, env.body.clone());
    assert_eq!(first.messages.len(), 1, "the reservation result goes home");
    let replayed = r.msg(&remote, env.id, env.body);
    assert!(
        replayed.messages.is_empty(),
        "a replayed message is dropped"
    );
    assert_eq!(r.counts(&remote), (0, 2, 0));

    let reply = Envelope::decode(&first.messages[0].value).unwrap();
    let out = h.msg(&home, reply.id, reply.body);
    assert_eq!(statuses(&out), [Status::Reserved]);
    assert_eq!(out.effects[0].amount, 1500);
}

/// An order keyed to the wrong partition is forwarded to its home.
#[test]
fn misrouted_order_is_forwarded() {
    let sku = sku_on(2, 0);
    let mut h = Harness::new(0);
    let out = h.order("o1", &[(&sku, 1)], "tok_visa");
    assert!(out.statuses.is_empty());
    assert_eq!(out.messages.len(), 1);
    assert_eq!(out.messages[0].kind, RecordKind::OrderJson);
    assert_eq!(out.messages[0].key, sku);
}

/// Finished orders are forgotten after the retention (log time) or past
/// the cap, oldest first, with their rows deleted at the next checkpoint.
#[test]
fn finished_orders_expire_deterministically() {
    use super::processor::Retention;
    let sku = sku_on(0, 0);
    let mut h = Harness::new(0);
    h.proc = Processor::new(0, N, PartitionState::default()).with_retention(Retention {
        max_age_ms: 100,
        max_orders: 2,
    });
    h.stock(&sku, 0);
    for id in ["a", "b", "c"] {
        assert_eq!(
            statuses(&h.order(id, &[(&sku, 1)], "tok_visa")),
            [Status::Accepted, Status::OutOfStock]
        );
    }
    assert!(
        !h.proc.state.orders.contains_key("a"),
        "over the cap: the oldest goes"
    );
    assert_eq!(h.proc.state.orders.len(), 2);
    h.offset += 200; // log time moves past the retention of b and c
    h.stock(&sku, 0);
    assert!(h.proc.state.orders.is_empty());
    let (_, deletes) = h.proc.state.take_changes();
    assert!(
        deletes.iter().any(|k| k == b"Oc"),
        "the forgotten order's row is deleted"
    );
    // A reload from rows rebuilds the expiry index.
    let again = h.order("b", &[(&sku, 1)], "tok_visa");
    assert_eq!(again.statuses[0].seq, 1, "a forgotten id is a new order");
}
