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
        let s = self.proc.state.stock.get(sku).unwrap();
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
    assert_eq!(out.statuses[0].released_lines, 1, "a compensation");
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
    assert_eq!(out.statuses[0].released_lines, 1);
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

/// A capture refused for good stays in the outbox, marked, and is not
/// run again at recovery; a retry runs it again, a drop forgets it, and
/// both survive a checkpoint.
#[test]
fn failed_effects_wait_for_an_operator() {
    let sku = sku_on(3, 0);
    let mut h = Harness::new(3);
    h.stock(&sku, 5);
    h.order("o1", &[(&sku, 1)], "tok_visa");
    h.order("o2", &[(&sku, 1)], "tok_visa");
    for id in ["o1", "o2"] {
        let paid = Message::PaymentResult {
            order_id: id.into(),
            outcome: PaymentOutcome::Authorized {
                payment_id: format!("pi_{id}"),
            },
        };
        assert_eq!(h.msg(&sku, None, paid).effects[0].kind, EffectKind::Capture);
    }
    for id in ["o1", "o2"] {
        let failed = Message::EffectFailed {
            order_id: id.into(),
            kind: EffectKind::Capture,
            reason: "gateway_refused".into(),
        };
        assert!(h.msg(&sku, None, failed).effects.is_empty());
    }
    // A late failure of an effect already done marks nothing.
    let stray = Message::EffectFailed {
        order_id: "o9".into(),
        kind: EffectKind::Void,
        reason: "gateway_refused".into(),
    };
    h.msg(&sku, None, stray);
    assert_eq!(h.proc.state.failed_effects.len(), 2);
    assert!(
        h.proc.pending_effects().is_empty(),
        "not run again at recovery"
    );

    let (manifest, blobs) = crate::stages::snapshot::full(&h.proc.state, 3);
    let listed = crate::stages::snapshot::failed_effects(&manifest, &blobs).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].0.payment_id, "pi_o1");
    assert_eq!(listed[0].1, "gateway_refused");
    let restored = crate::stages::snapshot::restore(&manifest, &blobs, Default::default()).unwrap();
    assert_eq!(restored.hash(), h.proc.state.hash());

    let drop = Message::DropEffect {
        order_id: "o2".into(),
        kind: EffectKind::Capture,
    };
    h.msg("ops", None, drop);
    assert_eq!(h.proc.state.outbox.len(), 1);
    let retried = h.msg("ops", None, Message::RetryParked);
    let again: Vec<(&str, EffectKind)> = retried
        .effects
        .iter()
        .map(|e| (e.order_id.as_str(), e.kind))
        .collect();
    assert_eq!(again, [("o1", EffectKind::Capture)]);
    assert!(h.proc.state.failed_effects.is_empty());
    assert_eq!(h.proc.pending_effects().len(), 1, "in flight again");
    let done = Message::EffectDone {
        order_id: "o1".into(),
        kind: EffectKind::Capture,
    };
    h.msg(&sku, None, done);
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

/// An out-of-stock event names only the SKUs that refused (not the lines
/// never tried after a local refusal) and counts the held lines released.
#[test]
fn out_of_stock_names_refusing_skus_and_released_lines() {
    let (a, b, c) = (sku_on(0, 0), sku_on(0, 1), sku_on(0, 2));
    let mut h = Harness::new(0);
    h.stock(&a, 5);
    h.stock(&b, 1);
    h.stock(&c, 5);
    let out = h.order("o1", &[(&a, 1), (&b, 2), (&c, 1), (&b, 1)], "tok_visa");
    assert_eq!(statuses(&out), [Status::Accepted, Status::OutOfStock]);
    assert_eq!(out.statuses[1].refused_skus, std::slice::from_ref(&b));
    assert_eq!(out.statuses[1].released_lines, 1);
    assert!(out.statuses[0].refused_skus.is_empty());
    assert_eq!(h.counts(&a), (5, 0, 0));

    // A line refused by another partition: named once the saga settles.
    let remote = sku_on(1, 0);
    let out = h.order("o2", &[(&a, 1), (&remote, 2)], "tok_visa");
    let env = Envelope::decode(&out.messages[0].value).unwrap();
    let mut r = Harness::new(1);
    r.stock(&remote, 1);
    let reply = r.msg(&remote, env.id, env.body);
    let reply = Envelope::decode(&reply.messages[0].value).unwrap();
    let out = h.msg(&a, reply.id, reply.body);
    assert_eq!(statuses(&out), [Status::OutOfStock]);
    assert_eq!(out.statuses[0].refused_skus, [remote]);
    assert_eq!(out.statuses[0].released_lines, 1);

    // A single line that cannot be held: nothing to release.
    let out = h.order("o3", &[(&b, 9)], "tok_visa");
    assert_eq!(out.statuses[1].refused_skus, [b]);
    assert_eq!(out.statuses[1].released_lines, 0);
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
/// the cap, oldest first; a forgotten id is a new order.
#[test]
fn finished_orders_expire_deterministically() {
    use super::finished::FinishedLimits;
    use super::processor::Limits;
    let sku = sku_on(0, 0);
    let mut h = Harness::new(0);
    h.proc = Processor::new(0, N, PartitionState::default()).with_limits(Limits {
        finished: FinishedLimits {
            max_age_ms: 100,
            max_entries: 2,
        },
        ..Limits::default()
    });
    h.stock(&sku, 0);
    for id in ["a", "b", "c"] {
        assert_eq!(
            statuses(&h.order(id, &[(&sku, 1)], "tok_visa")),
            [Status::Accepted, Status::OutOfStock]
        );
    }
    assert!(
        h.proc.state.orders.is_empty(),
        "finished orders leave the in-flight map"
    );
    assert_eq!(
        h.proc.state.finished.len(),
        2,
        "over the cap: the oldest goes"
    );
    assert!(
        h.order("b", &[(&sku, 1)], "tok_visa").statuses.is_empty(),
        "a remembered id is the same order"
    );
    let again = h.order("a", &[(&sku, 1)], "tok_visa");
    assert_eq!(again.statuses[0].seq, 1, "a forgotten id is a new order");
    h.offset += 200; // log time moves past the retention of all of them
    h.stock(&sku, 0);
    assert!(h.proc.state.finished.is_empty());
    let again = h.order("c", &[(&sku, 1)], "tok_visa");
    assert_eq!(again.statuses[0].seq, 1, "forgotten by age: a new order");
}

/// An undecodable record is parked with its position; later records with its
/// key wait behind it while other keys go on; a retry applies them in order.
#[test]
fn poison_record_parks_its_key_and_retry_keeps_order() {
    let mut h = Harness::new(0);
    let (a, b) = (sku_on(0, 0), sku_on(0, 1));
    h.stock(&a, 1);
    h.stock(&b, 5);
    let poison_at = h.offset;
    let out = h.feed(RecordKind::Internal, &a, b"\xc1 not msgpack");
    assert!(
        matches!(&out.parked[..], [crate::domain::parked::ParkEvent::Parked(r)] if r.offset == poison_at)
    );
    // Behind it, on the same key: two orders for the one unit of `a`.
    let first = h.order("o-a1", &[(&a, 1)], "tok_visa");
    assert!(first.statuses.is_empty() && first.parked.len() == 1);
    h.order("o-a2", &[(&a, 1)], "tok_visa");
    // Another key flows.
    let other = h.order("o-b", &[(&b, 1)], "tok_visa");
    assert_eq!(statuses(&other), vec![Status::Accepted, Status::Reserved]);
    // A message about a held-back order waits too, whatever its key.
    h.msg(
        &a,
        None,
        Message::PaymentResult {
            order_id: "o-a1".into(),
            outcome: PaymentOutcome::Declined { code: "x".into() },
        },
    );
    assert_eq!(h.proc.state.parked.len(), 4);
    // Dropping the poison record, then retrying: the rest in their order.
    h.msg("ops", None, Message::DropParked { offset: poison_at });
    let out = h.msg("ops", None, Message::RetryParked);
    assert!(h.proc.state.parked.is_empty(), "{:?}", h.proc.state.parked);
    let s = statuses(&out);
    assert_eq!(
        s,
        vec![
            Status::Accepted,
            Status::Reserved,
            Status::Accepted,
            Status::OutOfStock,
            Status::PaymentDeclined
        ],
        "o-a1 first gets the unit, o-a2 none, then o-a1's decline"
    );
    assert_eq!(h.counts(&a), (1, 0, 0));
}

/// A record that still fails on retry is parked again, with those behind it,
/// and the same record re-sent while parked is parked once.
#[test]
fn retry_of_a_still_failing_record_parks_it_again() {
    let mut h = Harness::new(0);
    let a = sku_on(0, 0);
    h.stock(&a, 3);
    h.proc.poison_customer = Some("c".into());
    h.order("o-1", &[(&a, 1)], "tok_visa");
    h.order("o-1", &[(&a, 1)], "tok_visa");
    assert_eq!(h.proc.state.parked.len(), 1, "the same bytes park once");
    h.msg("ops", None, Message::RetryParked);
    assert_eq!(h.proc.state.parked.len(), 1, "still failing");
    h.proc.poison_customer = None;
    let out = h.msg("ops", None, Message::RetryParked);
    assert!(h.proc.state.parked.is_empty());
    assert_eq!(statuses(&out), vec![Status::Accepted, Status::Reserved]);
    // The lane survives a snapshot round trip.
    let (manifest, blobs) = super::snapshot::full(&h.proc.state, 0);
    let back = super::snapshot::restore(&manifest, &blobs, h.proc.limits.finished).unwrap();
    assert_eq!(back, h.proc.state);
    assert_eq!(back.hash(), h.proc.state.hash());
}

/// Stock changes above the limit, that would overflow a counter, or for a
/// new SKU past `max_skus` are refused and reported; nothing changes, and
/// the state still snapshots and loads.
#[test]
fn stock_limits_refuse_and_change_nothing() {
    use super::processor::Limits;
    use super::state::MAX_AVAILABLE;
    let (a, b) = (sku_on(0, 0), sku_on(0, 1));
    let mut h = Harness::new(0);
    h.proc = Processor::new(0, N, PartitionState::default()).with_limits(Limits {
        max_skus: 1,
        ..Limits::default()
    });
    h.stock(&a, 5);
    h.order("o1", &[(&a, 2)], "tok_visa");
    let before = h.proc.state.hash();
    for (sku, available) in [(&a, u64::MAX), (&a, MAX_AVAILABLE + 1), (&b, 1)] {
        let out = h.msg(
            sku,
            None,
            Message::SetStock {
                sku: sku.clone(),
                available,
            },
        );
        assert_eq!(out.stock_refused.len(), 1, "{sku} {available}");
        assert_eq!(out.problems.len(), 1);
        assert!(out.stock_touched.is_empty());
    }
    assert_eq!(h.proc.state.hash(), before, "nothing changed");
    h.stock(&a, MAX_AVAILABLE);
    assert_eq!(h.counts(&a), (MAX_AVAILABLE, 2, 0));
    let (manifest, blobs) = super::snapshot::full(&h.proc.state, 0);
    let back = super::snapshot::restore(&manifest, &blobs, h.proc.limits.finished).unwrap();
    assert_eq!(back, h.proc.state);
}

/// Past `max_inflight_orders` a new order ends `rejected` (`partition_busy`)
/// with no stock held; past `max_holds` a reservation is refused.
#[test]
fn in_flight_and_hold_limits() {
    use super::processor::Limits;
    let sku = sku_on(0, 0);
    let mut h = Harness::new(0);
    h.proc = Processor::new(0, N, PartitionState::default()).with_limits(Limits {
        max_inflight_orders: 2,
        ..Limits::default()
    });
    h.stock(&sku, 10);
    for id in ["o1", "o2"] {
        assert_eq!(
            statuses(&h.order(id, &[(&sku, 1)], "tok_visa")),
            [Status::Accepted, Status::Reserved]
        );
    }
    let busy = h.order("o3", &[(&sku, 1)], "tok_visa");
    assert_eq!(statuses(&busy), [Status::Rejected]);
    assert_eq!(busy.statuses[0].reason.as_deref(), Some("partition_busy"));
    assert_eq!(h.counts(&sku), (8, 2, 0));

    let mut h = Harness::new(0);
    h.proc = Processor::new(0, N, PartitionState::default()).with_limits(Limits {
        max_holds: 1,
        ..Limits::default()
    });
    h.stock(&sku, 10);
    h.order("o1", &[(&sku, 1)], "tok_visa");
    assert_eq!(
        statuses(&h.order("o2", &[(&sku, 1)], "tok_visa")),
        [Status::Accepted, Status::OutOfStock]
    );
}

/// Status events carry their deterministic id (home partition, record
/// offset, index) and a terminal one the contact email.
#[test]
fn status_events_carry_ids_and_contact() {
    let sku = sku_on(0, 0);
    let mut h = Harness::new(0);
    h.stock(&sku, 0);
    let body = serde_json::json!({"order_id": "o-mail", "customer_id": "c", "currency": "USD",
        "lines": [{"sku": sku, "quantity": 1, "unit_price": 5}], "payment": {"token": "tok_visa"},
        "contact": {"email": "ada@example.com"}});
    let offset = h.offset;
    let out = h.feed(
        RecordKind::OrderJson,
        &sku,
        &serde_json::to_vec(&body).unwrap(),
    );
    let ids: Vec<_> = out.statuses.iter().map(|s| s.src.unwrap()).collect();
    assert_eq!(
        ids,
        [0, 1].map(|index| MsgId {
            src_partition: 0,
            src_offset: offset,
            index
        })
    );
    assert_eq!(out.statuses[0].email, None, "accepted is not terminal");
    assert_eq!(out.statuses[1].email.as_deref(), Some("ada@example.com"));
}

/// At the park lane's bound a record is refused instead of parked: an
/// order ends `rejected` (`park_lane_full`) holding nothing, any other
/// record is reported as refused with its bytes; the lane stays bounded.
#[test]
fn park_lane_bound_refuses() {
    use super::processor::Limits;
    use crate::domain::parked::ParkEvent;
    let sku = sku_on(0, 0);
    let mut h = Harness::new(0);
    h.proc = Processor::new(0, N, PartitionState::default()).with_limits(Limits {
        max_parked_records: 1,
        ..Limits::default()
    });
    h.stock(&sku, 5);
    h.feed(RecordKind::Internal, &sku, b"\xc1 first poison");
    assert_eq!(h.proc.state.parked.len(), 1);
    // Behind it on its key: the lane is full, so the order is refused.
    let out = h.order("o-behind", &[(&sku, 1)], "tok_visa");
    assert_eq!(statuses(&out), [Status::Rejected]);
    assert_eq!(out.statuses[0].reason.as_deref(), Some("park_lane_full"));
    assert_eq!(h.counts(&sku), (5, 0, 0), "nothing held for it");
    // Another undecodable record: refused, its bytes reported.
    let other = sku_on(0, 1);
    let out = h.feed(RecordKind::Internal, &other, b"\xc1 second poison");
    assert!(
        matches!(&out.parked[..], [ParkEvent::Refused(r)] if r.value == b"\xc1 second poison"),
        "{:?}",
        out.parked
    );
    assert_eq!(out.problems.len(), 1);
    assert_eq!(h.proc.state.parked.len(), 1, "the lane stays at its bound");
    assert!(
        h.order("o-behind", &[(&sku, 1)], "tok_visa")
            .statuses
            .is_empty(),
        "known"
    );
}

/// No path into the park lane takes a card number: an undecodable record
/// is reported refused with the digits masked, an order (poisoned, or
/// behind a parked record) ends `rejected` (`pan_detected`) under its
/// position id; the lane and the snapshot never hold the digits.
#[test]
fn card_numbers_never_reach_the_park_lane() {
    use crate::domain::parked::ParkEvent;
    let sku = sku_on(0, 0);
    let mut h = Harness::new(0);
    h.proc =
        Processor::new(0, N, PartitionState::default()).with_poison_customer(Some("bad".into()));
    h.stock(&sku, 5);
    let refused = |out: &Output| match &out.parked[..] {
        [ParkEvent::Refused(r)] => r.clone(),
        other => panic!("{other:?}"),
    };
    let out = h.feed(RecordKind::Internal, &sku, b"\xc1 card 4242 4242 4242 4242");
    assert_eq!(refused(&out).value, b"\xc1 card #### #### #### ####");
    assert_eq!(out.problems.len(), 1);
    let out = h.feed(RecordKind::Internal, "4000056655665556", b"\xc1");
    assert_eq!(refused(&out).key, b"################");
    assert!(h.proc.state.parked.is_empty(), "nothing was set aside");

    // An injected fault parks an order; with a card number it is refused.
    let mut body = serde_json::json!({"order_id": "o-card", "customer_id": "bad", "currency": "USD",
        "lines": [{"sku": sku, "quantity": 1, "unit_price": 500}], "payment": {"token": "4242424242424242"}});
    let offset = h.offset;
    let out = h.feed(
        RecordKind::OrderJson,
        &sku,
        &serde_json::to_vec(&body).unwrap(),
    );
    assert_eq!(statuses(&out), [Status::Rejected]);
    assert_eq!(out.statuses[0].order_id, format!("ord-0-{offset}"));
    assert_eq!(out.statuses[0].reason.as_deref(), Some("pan_detected"));
    assert!(h.proc.state.parked.is_empty());

    // Behind a parked record on its key: refused the same way.
    h.feed(RecordKind::Internal, &sku, b"\xc1 poison");
    assert_eq!(h.proc.state.parked.len(), 1);
    body["customer_id"] = "c".into();
    body["order_id"] = "o-card-2".into();
    let offset = h.offset;
    let out = h.feed(
        RecordKind::OrderJson,
        &sku,
        &serde_json::to_vec(&body).unwrap(),
    );
    assert_eq!(out.statuses[0].order_id, format!("ord-0-{offset}"));
    assert_eq!(out.statuses[0].reason.as_deref(), Some("pan_detected"));
    assert_eq!(h.proc.state.parked.len(), 1, "only the poison record waits");

    let (_, blobs) = super::snapshot::full(&h.proc.state, 0);
    for bytes in blobs.values() {
        assert!(
            !crate::domain::pan::contains_pan(bytes),
            "a snapshot blob holds a card number"
        );
    }
}

fn authorized(order_id: &str) -> Message {
    Message::PaymentResult {
        order_id: order_id.into(),
        outcome: PaymentOutcome::Authorized {
            payment_id: format!("pi_{order_id}"),
        },
    }
}

fn results(items: &[(&str, Message)]) -> Message {
    Message::Results {
        results: items
            .iter()
            .map(|(key, body)| crate::domain::message::KeyedResult {
                key: (*key).to_owned(),
                body: body.clone(),
            })
            .collect(),
    }
}

/// A results record leaves the same state, statuses and effects as its
/// results would one record each.
#[test]
fn a_results_record_applies_like_its_results_alone() {
    let (a, b) = (sku_on(1, 0), sku_on(1, 1));
    let mut alone = Harness::new(1);
    let mut together = Harness::new(1);
    for h in [&mut alone, &mut together] {
        h.stock(&a, 5);
        h.stock(&b, 5);
        h.order("o1", &[(&a, 1)], "tok_visa");
        h.order("o2", &[(&b, 2)], "tok_visa");
    }
    let mut outs = Output::default();
    for (key, body) in [(&a, authorized("o1")), (&b, authorized("o2"))] {
        let out = alone.msg(key, None, body);
        outs.statuses.extend(out.statuses);
        outs.effects.extend(out.effects);
    }
    let out = together.msg(
        &a,
        None,
        results(&[(&a, authorized("o1")), (&b, authorized("o2"))]),
    );
    assert_eq!(statuses(&out), statuses(&outs));
    assert_eq!(
        statuses(&out),
        [
            Status::Paid,
            Status::Confirmed,
            Status::Paid,
            Status::Confirmed
        ]
    );
    assert_eq!(out.effects, outs.effects);
    assert_eq!(out.effects[1].reply_key, b, "each result keeps its own key");
    for h in [&mut alone, &mut together] {
        let done = results(&[
            (
                &a,
                Message::EffectDone {
                    order_id: "o1".into(),
                    kind: EffectKind::Capture,
                },
            ),
            (
                &b,
                Message::EffectDone {
                    order_id: "o2".into(),
                    kind: EffectKind::Capture,
                },
            ),
        ]);
        h.msg(&a, None, done);
    }
    // The hashes differ only in the log times of the finished orders.
    for h in [&alone, &together] {
        assert!(h.proc.state.outbox.is_empty() && h.proc.state.orders.is_empty());
        assert_eq!((h.counts(&a), h.counts(&b)), ((4, 0, 1), (3, 0, 2)));
        for id in ["o1", "o2"] {
            let done = h
                .proc
                .state
                .finished
                .get(&crate::domain::OrderKey::of(id), 0);
            assert!(done.unwrap().confirmed(), "{id}");
        }
    }
}

/// Of a results record, only the results the park lane holds back are
/// parked, as one record at its offset that holds back all their keys and
/// orders; a retry applies them in order.
#[test]
fn a_results_record_parks_only_what_waits() {
    let mut h = Harness::new(0);
    let (a, b) = (sku_on(0, 0), sku_on(0, 1));
    h.stock(&a, 5);
    h.stock(&b, 5);
    h.order("o-a", &[(&a, 1)], "tok_visa");
    h.order("o-b", &[(&b, 1)], "tok_visa");
    let poison_at = h.offset;
    h.feed(RecordKind::Internal, &a, b"\xc1 not msgpack");
    let batch_at = h.offset;
    let out = h.msg(
        &b,
        None,
        results(&[(&a, authorized("o-a")), (&b, authorized("o-b"))]),
    );
    assert_eq!(
        statuses(&out),
        [Status::Paid, Status::Confirmed],
        "o-b goes on"
    );
    let parked = &h.proc.state.parked[&batch_at];
    assert_eq!(parked.key, a.as_bytes());
    assert_eq!(parked.order_id.as_deref(), Some("o-a"));
    assert_eq!(
        Envelope::decode(&parked.value).unwrap().body,
        authorized("o-a"),
        "a lone held result is parked as a plain record"
    );
    // Two held results of one record park together and hold back both
    // their keys: `b` waits now too.
    h.order("o-a2", &[(&a, 1)], "tok_visa");
    let pair_at = h.offset;
    let capture_done = |order_id: &str| Message::EffectDone {
        order_id: order_id.into(),
        kind: EffectKind::Capture,
    };
    h.msg(
        &a,
        None,
        results(&[(&a, authorized("o-a2")), (&b, capture_done("o-a"))]),
    );
    assert_eq!(
        h.proc.state.parked.len(),
        4,
        "poison, o-a's result, o-a2's order, the pair"
    );
    let waits = h.msg(&b, None, capture_done("o-y"));
    assert_eq!(waits.parked.len(), 1, "held back by the pair's key `b`");
    assert!(h.proc.state.parked.contains_key(&pair_at));
    h.msg("ops", None, Message::DropParked { offset: poison_at });
    let out = h.msg("ops", None, Message::RetryParked);
    assert!(h.proc.state.parked.is_empty(), "{:?}", h.proc.state.parked);
    assert_eq!(
        statuses(&out),
        [
            Status::Paid,
            Status::Confirmed,
            Status::Accepted,
            Status::Reserved,
            Status::Paid,
            Status::Confirmed
        ]
    );
}

/// A parked multi-line order retried after later records of its partition
/// sent messages on to the same remote partition: what it sends is still
/// taken there, not dropped as a replay.
#[test]
fn retried_records_send_what_receivers_take() {
    let (home, other_home, remote) = (sku_on(0, 0), sku_on(0, 1), sku_on(1, 0));
    let mut h = Harness::new(0);
    let mut r = Harness::new(1);
    h.stock(&home, 5);
    h.stock(&other_home, 5);
    r.stock(&remote, 5);
    let deliver = |r: &mut Harness, out: &Output| -> Output {
        let [m] = &out.messages[..] else {
            panic!("one message: {:?}", out.messages.len())
        };
        let env = Envelope::decode(&m.value).unwrap();
        r.msg(&m.key, env.id, env.body)
    };
    let poison_at = h.offset;
    h.feed(RecordKind::Internal, &home, b"\xc1 not msgpack");
    let held = h.order("o-held", &[(&home, 1), (&remote, 1)], "tok_visa");
    assert_eq!(held.parked.len(), 1);
    let later = h.order("o-later", &[(&other_home, 1), (&remote, 1)], "tok_visa");
    assert_eq!(
        deliver(&mut r, &later).messages.len(),
        1,
        "o-later reserved"
    );
    h.msg("ops", None, Message::DropParked { offset: poison_at });
    let retry = h.msg("ops", None, Message::RetryParked);
    assert_eq!(statuses(&retry), [Status::Accepted]);
    let answer = deliver(&mut r, &retry);
    assert_eq!(answer.messages.len(), 1, "o-held reserved too");
    assert_eq!(r.counts(&remote), (3, 2, 0));
}
