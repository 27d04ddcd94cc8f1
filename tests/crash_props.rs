//! Property test with real crash points: random single- and multi-SKU
//! orders, declines and SIGKILLs of the real binary at arbitrary points
//! (between requests or with requests in flight), each followed by a
//! restart on the same data directory. After every step: stock is
//! conserved, no acknowledged order is lost, every status path is valid.
//! At the end every order is terminal, sold stock equals the confirmed
//! orders' quantities, and replaying each partition from offset 0 gives
//! the state hash of the live run's final checkpoint.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orderflow::config::LogConfig;
use orderflow::pipeline::log::Topic;
use orderflow::pipeline::log::embedded::EmbeddedLog;
use orderflow::pipeline::runner::{load_state, replay};
use orderflow::pipeline::store::embedded::EmbeddedStore;
use orderflow::stages::processor::Limits;
use orderflow::telemetry::metrics::Metrics;
use proptest::prelude::*;
use support::*;

const SKUS: [&str; 4] = ["SKU-A", "SKU-B", "SKU-C", "SKU-D"];
const INITIAL: u64 = 15;
const PARTITIONS: u32 = 8;

/// An order's lines: (SKU index, quantity).
type Lines = Vec<(usize, u32)>;

#[derive(Clone, Debug)]
enum Step {
    /// Place orders one after another.
    Place {
        orders: Vec<(Vec<(usize, u32)>, bool)>,
    },
    /// SIGKILL after `after` acknowledgements while orders are in flight.
    KillMidLoad {
        after: usize,
        orders: Vec<(Vec<(usize, u32)>, bool)>,
    },
    /// SIGKILL between requests.
    Kill,
}

#[derive(Default)]
struct Model {
    /// Acknowledged orders: id → lines.
    acked: BTreeMap<String, Vec<(usize, u32)>>,
    /// Every order sent, acknowledged or not (a kill can fall between the
    /// durable append and the answer): id → lines.
    attempted: BTreeMap<String, Vec<(usize, u32)>>,
    next_id: usize,
}

fn body(id: &str, lines: &[(usize, u32)], decline: bool) -> serde_json::Value {
    let lines: Vec<_> = lines
        .iter()
        .map(|(s, q)| serde_json::json!({"sku": SKUS[*s], "quantity": q, "unit_price": 250}))
        .collect();
    let token = if decline {
        "tok_chargeDeclined"
    } else {
        "tok_visa"
    };
    serde_json::json!({"order_id": id, "customer_id": "cus-7", "currency": "EUR", "lines": lines, "payment": {"token": token}})
}

/// Posts orders from a thread; returns the acknowledged ids.
fn place(
    base: &str,
    model: &mut Model,
    orders: &[(Vec<(usize, u32)>, bool)],
    kill_after: Option<(usize, &mut Server)>,
) {
    let acked: Arc<Mutex<Vec<(String, Lines)>>> = Arc::default();
    let jobs: Vec<_> = orders
        .iter()
        .map(|(lines, decline)| {
            model.next_id += 1;
            let id = format!("p-{}", model.next_id);
            model.attempted.insert(id.clone(), lines.clone());
            (id, lines.clone(), *decline)
        })
        .collect();
    let (b, a) = (base.to_owned(), acked.clone());
    let poster = std::thread::spawn(move || {
        let c = client();
        for (id, lines, decline) in jobs {
            match c
                .post(format!("{b}/v1/orders"))
                .json(&body(&id, &lines, decline))
                .send()
            {
                Ok(r) if r.status() == 202 => a.lock().unwrap().push((id, lines)),
                Ok(r) => panic!("unexpected status {}", r.status()),
                Err(_) => return,
            }
        }
    });
    if let Some((after, server)) = kill_after {
        let target = after.min(orders.len());
        wait_until(
            Duration::from_secs(60),
            "acknowledgements before the kill",
            || acked.lock().unwrap().len() >= target || poster.is_finished(),
        );
        server.kill();
    }
    poster.join().unwrap();
    model.acked.extend(acked.lock().unwrap().drain(..));
}

fn check_step(base: &str, model: &Model) {
    for sku in SKUS {
        let s = stock(base, sku);
        let total = s["available"].as_u64().unwrap()
            + s["reserved"].as_u64().unwrap()
            + s["sold"].as_u64().unwrap();
        assert_eq!(total, INITIAL, "conservation of {sku}: {s}");
    }
    // A 202 promises durability, not that the order is processed yet: an
    // acknowledged order must show up, and soon.
    let mut missing: Vec<&String> = model.acked.keys().collect();
    wait_until(Duration::from_secs(30), "acknowledged orders shown", || {
        missing.retain(|id| order_view(base, id).is_none());
        missing.is_empty()
    });
    for id in model.acked.keys() {
        let v = order_view(base, id).unwrap_or_else(|| panic!("acknowledged order {id} is lost"));
        let history = v["history"].as_array().unwrap();
        let mut prev: Option<&str> = None;
        for (i, h) in history.iter().enumerate() {
            assert_eq!(h["seq"].as_u64().unwrap(), i as u64 + 1, "{id}: {v}");
            let s = h["status"].as_str().unwrap();
            let ok = matches!(
                (prev, s),
                (None, "accepted" | "rejected")
                    | (Some("accepted"), "reserved" | "out_of_stock")
                    | (
                        Some("reserved"),
                        "paid" | "payment_declined" | "payment_failed"
                    )
                    | (Some("paid"), "confirmed")
            );
            assert!(ok, "{id}: invalid transition {prev:?} -> {s}: {v}");
            prev = Some(s);
        }
    }
}

fn check_final(base: &str, model: &Model) {
    let mut views = BTreeMap::new();
    wait_until(Duration::from_secs(60), "every order to end", || {
        model.acked.keys().all(|id| {
            let v = order_view(base, id).unwrap();
            let done = is_terminal(v["status"].as_str().unwrap());
            views.insert(id.clone(), v);
            done
        })
    });
    wait_until(Duration::from_secs(60), "no stock reserved", || {
        SKUS.iter().all(|s| stock(base, s)["reserved"] == 0)
    });
    let mut sold = [0u64; SKUS.len()];
    for (id, lines) in &model.attempted {
        let confirmed = match views.get(id) {
            Some(v) => v["status"] == "confirmed",
            None => order_view(base, id).is_some_and(|v| v["status"] == "confirmed"),
        };
        if confirmed {
            for (s, q) in lines {
                sold[*s] += u64::from(*q);
            }
        }
    }
    for (i, sku) in SKUS.iter().enumerate() {
        assert_eq!(
            stock(base, sku)["sold"].as_u64().unwrap(),
            sold[i],
            "sold {sku}"
        );
    }
}

fn lines_strategy() -> impl Strategy<Value = (Vec<(usize, u32)>, bool)> {
    (
        prop::collection::vec((0..SKUS.len(), 1u32..4), 1..4),
        prop::bool::weighted(0.2),
    )
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => prop::collection::vec(lines_strategy(), 1..12).prop_map(|orders| Step::Place { orders }),
        2 => (0usize..10, prop::collection::vec(lines_strategy(), 5..20)).prop_map(|(after, orders)| Step::KillMidLoad { after, orders }),
        1 => Just(Step::Kill),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 16, ..ProptestConfig::default() })]

    /// Invariants 1–6 hold across random SIGKILLs of the real binary.
    #[test]
    fn invariants_across_sigkill(steps in prop::collection::vec(step_strategy(), 1..8)) {
        let dir = tempfile::tempdir().unwrap();
        // Frequent checkpoints, so crashes fall on both sides of them.
        let config_path = dir.path().join("test.toml");
        std::fs::write(&config_path, "[checkpoint]\nevery_messages = 7\nevery_ms = 20\n").unwrap();
        let config_path = config_path.to_str().unwrap().to_owned();
        let env = [("ORDERFLOW_CONFIG", config_path.as_str())];
        let mut server = start_server(dir.path(), &env);
        for sku in SKUS {
            set_stock(&server.base, sku, INITIAL);
        }
        let mut model = Model::default();
        for step in &steps {
            match step {
                Step::Place { orders } => place(&server.base.clone(), &mut model, orders, None),
                Step::KillMidLoad { after, orders } => {
                    let base = server.base.clone();
                    place(&base, &mut model, orders, Some((*after, &mut server)));
                    server = start_server(dir.path(), &env);
                }
                Step::Kill => {
                    server.kill();
                    server = start_server(dir.path(), &env);
                }
            }
            check_step(&server.base, &model);
        }
        check_final(&server.base, &model);
        assert!(server.terminate().success());
        drop(server);
        check_replay(dir.path());
    }
}

/// Replays each partition from offset 0 and compares with the checkpoint.
fn check_replay(dir: &std::path::Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let topics = [
            (Topic::Orders, PARTITIONS),
            (Topic::OrderStatus, PARTITIONS),
        ];
        let log = EmbeddedLog::open(
            &dir.join("log"),
            &topics,
            &LogConfig::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let store = EmbeddedStore::open(&dir.join("state.redb")).unwrap();
        for p in 0..PARTITIONS {
            let (live, next, _) = load_state(&store, p, &Limits::default()).await.unwrap();
            let replayed = replay(&log, p, next, Limits::default()).await.unwrap();
            assert_eq!(
                replayed.hash(),
                live.hash(),
                "partition {p}: replay from 0 differs from the live state"
            );
        }
    });
}
