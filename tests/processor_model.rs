//! Property tests of the partition processor in a model world: N
//! partitions with in-memory logs, random orders (single- and multi-SKU),
//! restocks, declines, gateway failures, and random crash points (a
//! processor is dropped and rebuilt from its last checkpoint, then replays
//! the tail, re-emitting what it emitted before). After every step the
//! invariants of DESIGN.md hold; at the end every order is terminal, money
//! and stock agree, and replaying each partition from offset 0 gives the
//! live state hash.

use std::collections::BTreeMap;

use orderflow::domain::partition::partition_for_key;
use orderflow::domain::{
    Effect, EffectKind, Envelope, Message, PaymentOutcome, RecordKind, Status, StatusEvent,
};
use orderflow::stages::processor::Input;
use orderflow::stages::{Output, PartitionState, Processor};
use proptest::prelude::*;

const SKUS: [&str; 6] = ["SKU-A", "SKU-B", "SKU-C", "SKU-D", "SKU-E", "SKU-F"];

type Checkpoint = (Vec<(Vec<u8>, Vec<u8>)>, u64);

struct Rec {
    ts: u64,
    kind: RecordKind,
    key: String,
    value: Vec<u8>,
}

#[derive(Default)]
struct Gateway {
    /// order → (authorized amount, captures, voided)
    intents: BTreeMap<String, (u64, u32, bool)>,
}

struct World {
    n: u32,
    logs: Vec<Vec<Rec>>,
    procs: Vec<Processor>,
    next: Vec<u64>,
    /// Per partition: checkpoint rows and the offset they were taken at.
    checkpoints: Vec<Checkpoint>,
    effects: Vec<Effect>,
    statuses: BTreeMap<(String, u32), StatusEvent>,
    /// Order bodies by id: a repeated id re-sends the first body, as a
    /// producer retrying would (ids are unique per order).
    placed: BTreeMap<String, (String, Vec<u8>)>,
    gateway: Gateway,
    clock_ms: u64,
    fail_gateway: bool,
}

#[derive(Clone, Debug)]
enum Step {
    Place {
        id: u16,
        lines: Vec<(usize, u32)>,
        decline: bool,
    },
    Restock {
        sku: usize,
        available: u64,
    },
    Process {
        p: u32,
        count: usize,
    },
    RunEffect {
        pick: usize,
    },
    Checkpoint {
        p: u32,
    },
    Crash {
        p: u32,
    },
    GatewayDown(bool),
}

impl World {
    fn new(n: u32) -> World {
        World {
            n,
            logs: (0..n).map(|_| Vec::new()).collect(),
            procs: (0..n)
                .map(|p| Processor::new(p, n, PartitionState::default()))
                .collect(),
            next: vec![0; n as usize],
            checkpoints: (0..n).map(|_| (Vec::new(), 0)).collect(),
            effects: Vec::new(),
            statuses: BTreeMap::new(),
            placed: BTreeMap::new(),
            gateway: Gateway::default(),
            clock_ms: 1_700_000_000_000,
            fail_gateway: false,
        }
    }

    fn append(&mut self, kind: RecordKind, key: &str, value: Vec<u8>) {
        self.clock_ms += 1;
        let p = partition_for_key(key.as_bytes(), self.n) as usize;
        self.logs[p].push(Rec {
            ts: self.clock_ms,
            kind,
            key: key.to_owned(),
            value,
        });
    }

    fn internal(&mut self, key: &str, body: Message) {
        self.append(
            RecordKind::Internal,
            key,
            Envelope::new(None, body).encode(),
        );
    }

    fn step(&mut self, step: &Step) {
        match step {
            Step::Place { id, lines, decline } => {
                let order_id = format!("o{id}");
                let lines: Vec<_> = lines
                    .iter()
                    .map(|(s, q)| serde_json::json!({"sku": SKUS[*s], "quantity": q, "unit_price": 100}))
                    .collect();
                let token = if *decline {
                    "tok_chargeDeclined"
                } else {
                    "tok_visa"
                };
                let body = serde_json::json!({"order_id": order_id, "customer_id": "c1", "currency": "USD",
                    "lines": lines, "payment": {"token": token}});
                let home = body["lines"][0]["sku"].as_str().unwrap().to_owned();
                let (home, body) = self
                    .placed
                    .entry(order_id)
                    .or_insert((home, serde_json::to_vec(&body).unwrap()))
                    .clone();
                self.append(RecordKind::OrderJson, &home, body);
            }
            Step::Restock { sku, available } => self.internal(
                SKUS[*sku],
                Message::SetStock {
                    sku: SKUS[*sku].into(),
                    available: *available,
                },
            ),
            Step::Process { p, count } => self.process(*p, *count),
            Step::RunEffect { pick } => self.run_effect(*pick),
            Step::Checkpoint { p } => self.checkpoint(*p),
            Step::Crash { p } => self.crash(*p),
            Step::GatewayDown(down) => self.fail_gateway = *down,
        }
    }

    fn process(&mut self, p: u32, count: usize) {
        let pi = p as usize;
        let mut out = Output::default();
        for _ in 0..count {
            let offset = self.next[pi];
            let Some(rec) = self.logs[pi].get(offset as usize) else {
                break;
            };
            let input = Input {
                offset,
                timestamp_ms: rec.ts,
                kind: rec.kind,
                key: rec.key.as_bytes(),
                value: &rec.value,
            };
            self.procs[pi].apply(input, &mut out);
            self.next[pi] += 1;
        }
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        for m in out.messages.drain(..) {
            self.append(m.kind, &m.key, m.value);
        }
        for s in out.statuses.drain(..) {
            // A replay re-emits the same (order_id, seq): it must be identical.
            let key = (s.order_id.clone(), s.seq);
            if let Some(prev) = self.statuses.get(&key) {
                assert_eq!(
                    prev.status, s.status,
                    "seq {} of {} changed on replay",
                    s.seq, s.order_id
                );
            }
            self.statuses.insert(key, s);
        }
        self.effects.append(&mut out.effects);
    }

    fn run_effect(&mut self, pick: usize) {
        if self.effects.is_empty() {
            return;
        }
        let e = self.effects.remove(pick % self.effects.len());
        let body = match e.kind {
            EffectKind::Authorize if self.fail_gateway => Message::PaymentResult {
                order_id: e.order_id.clone(),
                outcome: PaymentOutcome::Failed {
                    reason: "gateway_unavailable".into(),
                },
            },
            EffectKind::Authorize if e.token == "tok_chargeDeclined" => Message::PaymentResult {
                order_id: e.order_id.clone(),
                outcome: PaymentOutcome::Declined {
                    code: "card_declined".into(),
                },
            },
            EffectKind::Authorize => {
                let intent = self
                    .gateway
                    .intents
                    .entry(e.order_id.clone())
                    .or_insert((e.amount, 0, false));
                assert_eq!(intent.0, e.amount);
                Message::PaymentResult {
                    order_id: e.order_id.clone(),
                    outcome: PaymentOutcome::Authorized {
                        payment_id: format!("pi_{}", e.order_id),
                    },
                }
            }
            EffectKind::Capture => {
                let intent = self
                    .gateway
                    .intents
                    .get_mut(&e.order_id)
                    .expect("capture of an authorization");
                assert!(!intent.2, "capture after void of {}", e.order_id);
                if intent.1 == 0 {
                    intent.1 = 1; // idempotent: a repeated key does not capture again
                }
                Message::EffectDone {
                    order_id: e.order_id.clone(),
                    kind: e.kind,
                }
            }
            EffectKind::Void => {
                if let Some(intent) = self.gateway.intents.get_mut(&e.order_id) {
                    assert_eq!(intent.1, 0, "void of a captured payment {}", e.order_id);
                    intent.2 = true;
                }
                Message::EffectDone {
                    order_id: e.order_id.clone(),
                    kind: e.kind,
                }
            }
        };
        self.internal(&e.reply_key, body);
    }

    fn checkpoint(&mut self, p: u32) {
        let pi = p as usize;
        let (puts, deletes) = self.procs[pi].state.take_changes();
        let mut rows: BTreeMap<Vec<u8>, Vec<u8>> = self.checkpoints[pi].0.drain(..).collect();
        for k in deletes {
            rows.remove(&k);
        }
        rows.extend(puts);
        self.checkpoints[pi] = (rows.into_iter().collect(), self.next[pi]);
    }

    fn crash(&mut self, p: u32) {
        let pi = p as usize;
        let (rows, offset) = &self.checkpoints[pi];
        let state =
            PartitionState::from_rows(rows.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
                .unwrap();
        self.procs[pi] = Processor::new(p, self.n, state);
        self.next[pi] = *offset;
        // Recovery restarts the effects left in the outbox.
        let pending = self.procs[pi].pending_effects();
        self.effects.extend(pending);
    }

    fn check_invariants(&self) {
        for proc in &self.procs {
            let mut held: BTreeMap<&str, u64> = BTreeMap::new();
            for h in proc.state.holds.values() {
                *held.entry(h.sku.as_str()).or_default() += u64::from(h.quantity);
            }
            for (sku, s) in &proc.state.stock {
                s.assert_conserved();
                assert_eq!(
                    s.reserved,
                    held.get(sku.as_str()).copied().unwrap_or(0),
                    "holds of {sku}"
                );
            }
        }
        // Every status path is valid: seqs 1..k with valid transitions.
        let mut by_order: BTreeMap<&str, Vec<Status>> = BTreeMap::new();
        for ((id, seq), s) in &self.statuses {
            let v = by_order.entry(id.as_str()).or_default();
            assert_eq!(*seq as usize, v.len() + 1, "gap in seqs of {id}");
            assert!(
                Status::may_follow(v.last().copied(), s.status),
                "{id}: {:?} -> {}",
                v.last(),
                s.status
            );
            v.push(s.status);
        }
    }

    /// Runs everything to quiescence: every log read, every effect done.
    fn drain(&mut self) {
        self.fail_gateway = false;
        loop {
            let mut progressed = false;
            for p in 0..self.n {
                if (self.next[p as usize] as usize) < self.logs[p as usize].len() {
                    self.process(p, usize::MAX);
                    progressed = true;
                }
            }
            if !self.effects.is_empty() {
                self.run_effect(0);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
    }

    fn check_final(&self) {
        let mut last: BTreeMap<&str, Status> = BTreeMap::new();
        for ((id, _), s) in &self.statuses {
            last.insert(id.as_str(), s.status);
        }
        for id in self.placed.keys() {
            let s = last
                .get(id.as_str())
                .unwrap_or_else(|| panic!("{id} has no status"));
            assert!(s.is_terminal(), "{id} ended {s}");
        }
        let mut sold: BTreeMap<&str, u64> = BTreeMap::new();
        for proc in &self.procs {
            assert!(proc.state.outbox.is_empty(), "outbox not drained");
            assert!(proc.state.holds.is_empty(), "holds left at quiescence");
            for (sku, s) in &proc.state.stock {
                assert_eq!(s.reserved, 0);
                sold.insert(sku, s.sold);
            }
            for (id, rec) in &proc.state.orders {
                let intent = self.gateway.intents.get(id);
                match rec.status {
                    Status::Confirmed => assert_eq!(
                        intent.map(|i| (i.1, i.2)),
                        Some((1, false)),
                        "{id} captured once"
                    ),
                    _ => assert!(
                        intent.is_none_or(|i| i.1 == 0 && i.2),
                        "{id} not confirmed: its authorization is voided"
                    ),
                }
            }
        }
        // Replaying every partition from 0 gives the live state.
        for p in 0..self.n {
            let mut replay = Processor::new(p, self.n, PartitionState::default());
            let mut out = Output::default();
            for (offset, rec) in self.logs[p as usize].iter().enumerate() {
                let input = Input {
                    offset: offset as u64,
                    timestamp_ms: rec.ts,
                    kind: rec.kind,
                    key: rec.key.as_bytes(),
                    value: &rec.value,
                };
                replay.apply(input, &mut out);
            }
            assert_eq!(
                replay.state.hash(),
                self.procs[p as usize].state.hash(),
                "partition {p} replay differs"
            );
        }
        let _ = sold;
    }
}

fn step_strategy(n: u32) -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u16..40, prop::collection::vec((0..SKUS.len(), 1u32..4), 1..4), prop::bool::weighted(0.2))
            .prop_map(|(id, lines, decline)| Step::Place { id, lines, decline }),
        1 => (0..SKUS.len(), 0u64..20).prop_map(|(sku, available)| Step::Restock { sku, available }),
        6 => (0..n, 1usize..8).prop_map(|(p, count)| Step::Process { p, count }),
        3 => (0usize..64).prop_map(|pick| Step::RunEffect { pick }),
        1 => (0..n).prop_map(|p| Step::Checkpoint { p }),
        1 => (0..n).prop_map(|p| Step::Crash { p }),
        1 => prop::bool::ANY.prop_map(Step::GatewayDown),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Random orders, restocks, declines, gateway outages and crash points
    /// keep every invariant, and replay from 0 matches the live state.
    #[test]
    fn invariants_hold_across_crashes(steps in prop::collection::vec(step_strategy(4), 1..200)) {
        let mut world = World::new(4);
        for sku in 0..SKUS.len() {
            world.step(&Step::Restock { sku, available: 10 });
        }
        for step in &steps {
            world.step(step);
            world.check_invariants();
        }
        world.drain();
        world.check_invariants();
        world.check_final();
    }
}

/// A multi-SKU order whose second line is short is compensated: the first
/// line's stock comes back and the order ends out_of_stock.
#[test]
fn saga_compensates() {
    let mut w = World::new(4);
    w.step(&Step::Restock {
        sku: 0,
        available: 5,
    });
    w.step(&Step::Restock {
        sku: 1,
        available: 1,
    });
    w.step(&Step::Place {
        id: 1,
        lines: vec![(0, 2), (1, 3)],
        decline: false,
    });
    w.drain();
    w.check_final();
    let last = w.statuses.range(("o1".to_string(), 0)..).last().unwrap().1;
    assert_eq!(last.status, Status::OutOfStock);
    let p0 = partition_for_key(SKUS[0].as_bytes(), 4) as usize;
    assert_eq!(w.procs[p0].state.stock[SKUS[0]].available, 5);
}
