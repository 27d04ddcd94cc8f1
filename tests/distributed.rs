//! The distributed deployment end to end: real Apache Kafka and Cassandra
//! (started by `scripts/kafka` and `scripts/cassandra`), three `orderflow
//! run` processes in one consumer group, an out-of-process gateway-sim.
//! Failover after SIGKILL, fencing of a paused former owner, and any
//! instance answering for any order.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use orderflow::config::KafkaConfig;
use orderflow::domain::StatusEvent;
use orderflow::domain::partition::partition_for_key;
use orderflow::pipeline::log::kafka::KafkaLog;
use orderflow::pipeline::log::{Log, Topic};
use orderflow::telemetry::metrics::Metrics;
use serde_json::{Value, json};
use support::*;

const PARTITIONS: u32 = 6;
const STATUS_PARTITIONS: u32 = 3;
const STRIPE_KEY: &str = "sk_test_orderflow_distributed";

/// One test's deployment (config, Kafka topic prefix) and its nodes.
struct Cluster {
    dir: tempfile::TempDir,
    config: PathBuf,
    prefix: String,
    nodes: Vec<Server>,
    sim: GatewaySim,
}

impl Cluster {
    /// Migrates a fresh keyspace and starts `n` nodes, one after another,
    /// each ready (its first assignment recovered) before the next.
    fn start(n: usize) -> Cluster {
        let sim = start_gateway_sim(&["--latency-ms", "2"], &[]);
        let dir = tempfile::tempdir().unwrap();
        let config = distributed_config(
            dir.path(),
            &format!("partitions = {PARTITIONS}\nstatus_partitions = {STATUS_PARTITIONS}"),
            &format!(
                "[checkpoint]\nevery_ms = 500\n[gateway]\nkind = \"stripe\"\nurl = \"{}\"",
                sim.url
            ),
        );
        let text = std::fs::read_to_string(&config).unwrap();
        let prefix = text
            .lines()
            .find_map(|l| l.strip_prefix("topic_prefix = "))
            .unwrap()
            .trim_matches('"')
            .to_owned();
        let mut cluster = Cluster {
            dir,
            config,
            prefix,
            nodes: Vec::new(),
            sim,
        };
        for i in 0..n {
            let node = cluster.start_node(i);
            cluster.nodes.push(node);
        }
        cluster
    }

    fn start_node(&self, i: usize) -> Server {
        let data = self.dir.path().join(format!("node-{i}"));
        start_server(
            &data,
            &[
                ("ORDERFLOW_CONFIG", self.config.to_str().unwrap()),
                ("ORDERFLOW_STRIPE_SECRET_KEY", STRIPE_KEY),
            ],
        )
    }

    fn base(&self, i: usize) -> String {
        self.nodes[i].base.clone()
    }

    /// Every record of `order-status`, read back from Kafka.
    fn status_records(&self) -> Vec<StatusEvent> {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let config = KafkaConfig {
                bootstrap_servers: kafka_bootstrap(),
                topic_prefix: self.prefix.clone(),
                ..KafkaConfig::default()
            };
            let topics = [
                (Topic::Orders, PARTITIONS),
                (Topic::OrderStatus, STATUS_PARTITIONS),
            ];
            let log = KafkaLog::connect(&config, &topics, 1 << 20, Arc::new(Metrics::new()))
                .await
                .unwrap();
            let mut events = Vec::new();
            for p in 0..STATUS_PARTITIONS {
                let (_, high) = log.offsets(Topic::OrderStatus, p).await.unwrap();
                let mut next = 0;
                while next < high {
                    let batch = log
                        .read(Topic::OrderStatus, p, next, 4096, Duration::from_secs(5))
                        .await
                        .unwrap();
                    let last = batch.last().expect("records up to the high watermark");
                    next = last.offset + 1;
                    events.extend(batch.iter().map(|r| StatusEvent::decode(&r.value).unwrap()));
                }
            }
            log.close().await;
            events
        })
    }
}

/// One metric of a node's `/metrics`, summed over its label sets with `labels`.
fn metric(base: &str, name: &str, labels: &str) -> f64 {
    metric_sum(base, name, &[labels])
}

fn owned_orders_partitions(base: &str) -> f64 {
    metric(base, "orderflow_partitions_owned", "topic=\"orders\"")
}

/// The `orders` partitions `base` runs (its runners' lag series).
fn runner_partitions(base: &str) -> Vec<u32> {
    metrics_text(base)
        .lines()
        .filter(|l| {
            l.starts_with("orderflow_partition_lag_records{")
                && l.contains("consumer=\"runner\"")
                && l.contains("topic=\"orders\"")
        })
        .filter_map(|l| {
            l.split("partition=\"")
                .nth(1)?
                .split('"')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Polls `cond` until it holds (true) or `limit` passes (false).
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// How many lines of `text` contain `needle`.
fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

const SKUS: [&str; 6] = ["D-1", "D-2", "D-3", "D-4", "D-5", "D-6"];
const SUPPLY: u64 = 400;

/// Posts orders round-robin to `bases` until `stop` or `total`; every
/// seventh is declined. Returns the ids answered 202 (others may or may
/// not exist, and are looked up at the end).
fn load(
    bases: Vec<String>,
    total: usize,
    tag: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, Vec<String>)> {
    std::thread::spawn(move || {
        let c = client();
        let (mut acked, mut unsure) = (Vec::new(), Vec::new());
        for n in 0..total {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let id = format!("{tag}-{n}");
            let token = if n % 7 == 0 {
                "tok_chargeDeclined"
            } else {
                "tok_visa"
            };
            let body = order_with_token(&id, SKUS[n % SKUS.len()], 1 + (n % 3) as u32, token);
            match c
                .post(format!("{}/v1/orders", bases[n % bases.len()]))
                .json(&body)
                .send()
            {
                Ok(r) if r.status() == 202 => acked.push(id),
                _ => unsure.push(id),
            }
        }
        (acked, unsure)
    })
}

fn order_with_token(id: &str, sku: &str, quantity: u32, token: &str) -> Value {
    let mut body = order_body(id, sku, quantity);
    body["payment"] = json!({ "token": token });
    body
}

/// Writes `n` orders as NDJSON and runs `orderflow produce` against `base`.
fn produce_with_cli(dir: &Path, base: &str, tag: &str, n: usize) -> Vec<String> {
    let path = dir.join(format!("{tag}.ndjson"));
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    let lines: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| order_with_token(id, SKUS[i % SKUS.len()], 1, "tok_visa").to_string())
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(["produce", path.to_str().unwrap(), "--server", base])
        .env("ORDERFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "orderflow produce: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ids
}

/// Waits until every order in `ids` is terminal on the given nodes (read
/// round-robin, so any instance answers for any order) and the gateway
/// ledger is settled; then checks the invariants and returns the statuses.
fn settle_and_check(cluster: &Cluster, readers: &[usize], ids: &[String]) {
    let mut statuses: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        for (n, id) in ids.iter().enumerate() {
            if statuses.contains_key(id) {
                continue;
            }
            let base = cluster.base(readers[n % readers.len()]);
            if let Some(v) = order_view(&base, id)
                && let status = v["status"].as_str().unwrap().to_owned()
                && is_terminal(&status)
            {
                statuses.insert(id.clone(), status);
            }
        }
        let why = if statuses.len() < ids.len() {
            format!("{} of {} orders terminal", statuses.len(), ids.len())
        } else {
            match ledger_settled(&cluster.sim.ledger(), &statuses) {
                Ok(()) => break,
                Err(why) => why,
            }
        };
        assert!(Instant::now() < deadline, "never settled: {why}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for (id, s) in &statuses {
        assert!(
            matches!(
                s.as_str(),
                "confirmed" | "payment_declined" | "out_of_stock"
            ),
            "{id}: {s}"
        );
    }
    // Stock conserved and never oversold, read through any instance.
    let base = cluster.base(readers[0]);
    wait_until(Duration::from_secs(30), "stock settled", || {
        SKUS.iter().all(|sku| {
            let s = stock(&base, sku);
            s["reserved"] == 0
        })
    });
    for sku in SKUS {
        let s = stock(&base, sku);
        let (a, r, sold) = (
            s["available"].as_u64().unwrap(),
            s["reserved"].as_u64().unwrap(),
            s["sold"].as_u64().unwrap(),
        );
        assert_eq!(a + r + sold, SUPPLY, "{sku}: stock not conserved: {s}");
        assert!(sold <= SUPPLY, "{sku} oversold: {s}");
    }
    // Captures: one per confirmed order, none for the rest.
    let confirmed = statuses.values().filter(|s| *s == "confirmed").count() as u64;
    let ledger = cluster.sim.ledger();
    assert_eq!(ledger["summary"]["captures"].as_u64().unwrap(), confirmed);
    // Status records: duplicates (replays) allowed, but one status per
    // (order, seq), seqs without gaps, and exactly one terminal status.
    let mut by_order: BTreeMap<String, BTreeMap<u32, String>> = BTreeMap::new();
    for e in cluster.status_records() {
        let seqs = by_order.entry(e.order_id.clone()).or_default();
        let status = e.status.as_str().to_owned();
        if let Some(prev) = seqs.insert(e.seq, status.clone()) {
            assert_eq!(
                prev, status,
                "{}: seq {} has two statuses",
                e.order_id, e.seq
            );
        }
    }
    for id in ids {
        let seqs = &by_order[id];
        let want: Vec<u32> = (1..=seqs.len() as u32).collect();
        assert_eq!(
            seqs.keys().copied().collect::<Vec<_>>(),
            want,
            "{id}: seq gap"
        );
        let terminal = seqs.values().filter(|s| is_terminal(s)).count();
        assert_eq!(terminal, 1, "{id}: {seqs:?}");
        assert_eq!(seqs.values().last().unwrap(), &statuses[id], "{id}");
    }
    eprintln!(
        "orders {} confirmed {confirmed} captures {}",
        statuses.len(),
        ledger["summary"]["captures"]
    );
}

/// Adds the orders the loader was not sure about that do exist.
fn with_existing(cluster: &Cluster, mut ids: Vec<String>, unsure: Vec<String>) -> Vec<String> {
    let base = cluster.base(0);
    ids.extend(
        unsure
            .into_iter()
            .filter(|id| order_view(&base, id).is_some()),
    );
    ids
}

/// SIGKILL of one of three instances mid-load: its partitions move to the
/// others, which load the checkpoints and replay the tails; every order
/// ends once, stock is conserved, the ledger is settled.
#[test]
fn failover_after_sigkill_keeps_every_invariant() {
    let mut cluster = Cluster::start(3);
    for sku in SKUS {
        set_stock(&cluster.base(0), sku, SUPPLY);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(
        vec![cluster.base(0), cluster.base(1)],
        1_500,
        "fo",
        stop.clone(),
    );
    let produced = produce_with_cli(cluster.dir.path(), &cluster.base(1), "cli", 200);
    wait_until(Duration::from_secs(120), "captures before the kill", || {
        cluster.sim.ledger()["summary"]["captures"]
            .as_u64()
            .unwrap()
            >= 100
    });
    let moved = owned_orders_partitions(&cluster.base(2));
    // A SKU of a partition that moves, stocked, so an order for it placed
    // right after the kill shows when the new owner processes again.
    let probe_partition = runner_partitions(&cluster.base(2))[0];
    let probe_sku = (0..)
        .map(|i| format!("FO-PROBE-{i}"))
        .find(|sku| partition_for_key(sku.as_bytes(), PARTITIONS) == probe_partition)
        .unwrap();
    set_stock(&cluster.base(0), &probe_sku, 10);
    let recovered_before: usize = (0..2)
        .map(|i| count(&cluster.nodes[i].output_text(), "partition recovered"))
        .sum();
    let killed_at = Instant::now();
    cluster.nodes[2].kill();
    let probe = format!("fo-probe-{}", std::process::id());
    let r = client()
        .post(format!("{}/v1/orders", cluster.base(0)))
        .json(&order_body(&probe, &probe_sku, 1))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().unwrap_or_default());
    wait_until(
        Duration::from_secs(60),
        "a status on a moved partition",
        || order_view(&cluster.base(0), &probe).is_some(),
    );
    let first_status = killed_at.elapsed();
    wait_until(Duration::from_secs(60), "partitions moved", || {
        let now: usize = (0..2)
            .map(|i| count(&cluster.nodes[i].output_text(), "partition recovered"))
            .sum();
        now >= recovered_before + moved as usize
    });
    eprintln!(
        "failover: first new status on a moved partition {:.2} s after SIGKILL ({moved} partitions moved, all replayed after {:.2} s)",
        first_status.as_secs_f64(),
        killed_at.elapsed().as_secs_f64()
    );
    let (acked, unsure) = loader.join().unwrap();
    assert!(!acked.is_empty());
    let mut ids = with_existing(&cluster, acked, unsure);
    ids.extend(produced);
    ids.push(probe);
    settle_and_check(&cluster, &[0, 1], &ids);
    stop.store(true, Ordering::SeqCst);
}

/// How many partitions of `topic` each node in `nodes` owns.
fn owned(cluster: &Cluster, nodes: &[usize], topic: &str) -> Vec<u32> {
    let labels = format!("topic=\"{topic}\"");
    nodes
        .iter()
        .map(|&i| metric(&cluster.base(i), "orderflow_partitions_owned", &labels) as u32)
        .collect()
}

/// Waits until `nodes` own every partition of each topic, spread evenly
/// (max − min ≤ 1 per topic); panics with the last counts otherwise.
fn wait_balanced(cluster: &Cluster, nodes: &[usize]) {
    let topics = [("orders", PARTITIONS), ("order-status", STATUS_PARTITIONS)];
    let mut last = Vec::new();
    let balanced = wait_for(Duration::from_secs(90), || {
        last = topics.map(|(t, _)| owned(cluster, nodes, t)).to_vec();
        topics.iter().zip(&last).all(|((_, total), counts)| {
            let (max, min) = (counts.iter().max(), counts.iter().min());
            counts.iter().sum::<u32>() == *total && max.zip(min).is_some_and(|(a, b)| a - b <= 1)
        })
    });
    assert!(
        balanced,
        "nodes {nodes:?} own (orders, order-status) {last:?}"
    );
}

/// Each topic's partitions spread evenly over the instances: 3 of them,
/// then 4 after one joins, then 3 after one is killed.
#[test]
fn partitions_of_each_topic_are_balanced() {
    let mut cluster = Cluster::start(3);
    wait_balanced(&cluster, &[0, 1, 2]);
    let joined = cluster.start_node(3);
    cluster.nodes.push(joined);
    wait_balanced(&cluster, &[0, 1, 2, 3]);
    cluster.nodes[0].kill();
    wait_balanced(&cluster, &[1, 2, 3]);
}

/// Runs `orderflow ARGS` with the cluster's configuration; its exit code and stdout.
fn orderflow(cluster: &Cluster, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(args)
        .env("ORDERFLOW_CONFIG", &cluster.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "orderflow {args:?}: {stderr}");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `orderflow replay` reads Kafka and Cassandra while the instances run:
/// every partition's replay matches its checkpoint, and `--order` tells an
/// order's story from the topics.
#[test]
fn replay_reads_kafka_and_cassandra() {
    let cluster = Cluster::start(2);
    for sku in SKUS {
        set_stock(&cluster.base(0), sku, SUPPLY);
    }
    let ids = produce_with_cli(cluster.dir.path(), &cluster.base(1), "rp", 60);
    settle_and_check(&cluster, &[0, 1], &ids);
    let mut last = String::new();
    let covered = wait_for(Duration::from_secs(90), || {
        let (code, out) = orderflow(&cluster, &["replay"]);
        assert_eq!(
            code,
            Some(0),
            "a replay differs from its checkpoint:\n{out}"
        );
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), PARTITIONS as usize, "{out}");
        assert!(lines.iter().all(|l| l["matches"] == true), "{out}");
        last = out;
        // Checkpoints that hold the orders, not only the empty start.
        let covered: u64 = lines
            .iter()
            .map(|l| l["next_offset"].as_u64().unwrap())
            .sum();
        covered >= ids.len() as u64
    });
    assert!(covered, "the checkpoints never covered the orders:\n{last}");
    let (code, story) = orderflow(&cluster, &["replay", "--order", &ids[0]]);
    assert_eq!(code, Some(0), "{story}");
    for step in [
        format!("order {}:", ids[0]),
        "order placed".into(),
        "status confirmed".into(),
    ] {
        assert!(story.contains(&step), "no `{step}` in the story:\n{story}");
    }
    let (code, _) = orderflow(&cluster, &["replay", "--order", "rp-nobody"]);
    assert_eq!(code, Some(1), "an order no record concerns");
}

/// A paused owner (SIGSTOP past the session timeout) loses its partitions;
/// after SIGCONT its checkpoints are refused (fenced), it rejoins the group
/// cleanly and the invariants hold.
#[test]
fn paused_owner_is_fenced_and_rejoins() {
    let cluster = Cluster::start(3);
    for sku in SKUS {
        set_stock(&cluster.base(0), sku, SUPPLY);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(
        vec![cluster.base(0), cluster.base(1)],
        1_500,
        "zo",
        stop.clone(),
    );
    wait_until(
        Duration::from_secs(120),
        "captures before the pause",
        || {
            cluster.sim.ledger()["summary"]["captures"]
                .as_u64()
                .unwrap()
                >= 50
        },
    );
    let zombie = &cluster.nodes[2];
    assert!(
        owned_orders_partitions(&zombie.base) > 0.0,
        "node 2 owns partitions"
    );
    let pid = zombie.child.id().to_string();
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    wait_until(
        Duration::from_secs(60),
        "the others own every partition",
        || {
            owned_orders_partitions(&cluster.base(0)) + owned_orders_partitions(&cluster.base(1))
                == f64::from(PARTITIONS)
        },
    );
    let captures = cluster.sim.ledger()["summary"]["captures"]
        .as_u64()
        .unwrap();
    wait_until(Duration::from_secs(60), "progress without node 2", || {
        cluster.sim.ledger()["summary"]["captures"]
            .as_u64()
            .unwrap()
            > captures + 20
    });
    signal("-CONT");
    let fenced = wait_for(Duration::from_secs(60), || {
        metric(&zombie.base, "orderflow_checkpoint_fenced_total", "") > 0.0
    });
    assert!(
        fenced,
        "node 2's stale checkpoint was not fenced; its output:\n{}",
        zombie.output_text()
    );
    // Rejoined = assigned `orders` partitions again: each topic is
    // balanced on its own, so the returning member gets its share of both.
    let rejoined = wait_for(Duration::from_secs(90), || {
        owned_orders_partitions(&zombie.base) > 0.0
    });
    assert!(
        rejoined,
        "node 2 did not rejoin with partitions; its output:\n{}",
        zombie.output_text()
    );
    let (acked, unsure) = loader.join().unwrap();
    let ids = with_existing(&cluster, acked, unsure);
    settle_and_check(&cluster, &[0, 1, 2], &ids);
    let out = zombie.output_text();
    assert!(out.contains("taken over by a newer owner"), "{out}");
    stop.store(true, Ordering::SeqCst);
}

/// Any instance answers for any order: the same order posted to two
/// instances at once is one order with one answer; its status and its live
/// stream work on a third.
#[test]
fn any_instance_answers_any_order() {
    let cluster = Cluster::start(3);
    set_stock(&cluster.base(0), "D-ANY", 10);
    let body = order_with_token("any-1", "D-ANY", 1, "tok_visa");
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let posts: Vec<_> = [0, 1]
            .map(|i| {
                let (base, body) = (cluster.base(i), body.clone());
                s.spawn(move || {
                    let r = client()
                        .post(format!("{base}/v1/orders"))
                        .json(&body)
                        .send()
                        .unwrap();
                    (r.status().as_u16(), r.json::<Value>().unwrap())
                })
            })
            .into_iter()
            .collect();
        posts.into_iter().map(|p| p.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|(code, _)| *code == 202), "{answers:?}");
    assert_eq!(answers[0].1, answers[1].1, "one order, one answer");
    let token = answers[0].1["tracking_token"].as_str().unwrap().to_owned();
    // The live stream on the third instance follows the order to its end.
    let sse = client()
        .get(format!("{}/v1/orders/any-1/events", cluster.base(2)))
        .bearer_auth(&token)
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    assert_eq!(sse.status(), 200);
    let text = sse.text().unwrap();
    assert!(text.contains("\"status\":\"confirmed\""), "{text}");
    // The read model is written by the status partition's owner, so a
    // live stream elsewhere may run ahead of it by that sink's lag.
    let read = || -> Value {
        client()
            .get(format!("{}/v1/orders/any-1", cluster.base(2)))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    wait_until(
        Duration::from_secs(10),
        "the read model to reach the stream's status",
        || read()["status"] == "confirmed",
    );
    let view = read();
    let seqs: BTreeSet<u64> = view["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.len(), view["history"].as_array().unwrap().len());
    // Stock is read from the owner's last checkpoint (at most
    // `checkpoint.every_ms` old) on an instance that does not own the SKU.
    wait_until(
        Duration::from_secs(10),
        "the sale on every instance",
        || (0..3).all(|i| stock(&cluster.base(i), "D-ANY")["sold"] == 1),
    );
}

/// Records on Kafka that no orderflow writes (an unknown `orderflow-kind`
/// header) and that hold a card number are refused, not parked: the
/// number (in the value or the header) reaches no checkpoint blob, no
/// `orders-parked` record, no listing and no output.
#[test]
fn card_numbers_on_kafka_never_reach_the_park_lane() {
    use orderflow::domain::parked::ParkEvent;
    use orderflow::pipeline::log::kafka::topic_name;
    use orderflow::pipeline::log::partition_for_key;
    use orderflow::pipeline::store::scylla::ScyllaStore;
    use orderflow::pipeline::store::{Scope, StateStore};
    use rdkafka::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    const PAN: &str = "4242424242424242";
    let mut cluster = Cluster::start(1);
    let text = std::fs::read_to_string(&cluster.config).unwrap();
    let scylla = orderflow::config::Config::from_toml(&text)
        .unwrap()
        .scylla
        .unwrap();
    let kafka = KafkaConfig {
        bootstrap_servers: kafka_bootstrap(),
        topic_prefix: cluster.prefix.clone(),
        ..KafkaConfig::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.bootstrap_servers)
            .create()
            .unwrap();
        let topic = topic_name(&kafka.topic_prefix, Topic::Orders);
        let spaced = "4242 4242 4242 4242 ";
        for (header, value) in [(PAN, "x".to_owned()), ("v9", format!("card {spaced}"))] {
            let headers = OwnedHeaders::new().insert(Header {
                key: "orderflow-kind",
                value: Some(header),
            });
            producer
                .send(
                    FutureRecord::to(&topic)
                        .partition(0)
                        .key("k")
                        .payload(&value)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    });
    // A restock and an order behind them on partition 0 (offsets 2, 3).
    let sku = (0..)
        .map(|i| format!("D-RAW-{i}"))
        .find(|s| partition_for_key(s.as_bytes(), PARTITIONS) == 0)
        .unwrap();
    let base = cluster.base(0);
    set_stock(&base, &sku, 1);
    let r = client()
        .post(format!("{base}/v1/orders"))
        .json(&order_with_token("raw-ok", &sku, 1, "tok_visa"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_until(
        Duration::from_secs(60),
        "the order behind them to confirm",
        || order_view(&base, "raw-ok").is_some_and(|v| v["status"] == "confirmed"),
    );

    let blobs = rt.block_on(async {
        let store = ScyllaStore::connect(&scylla, None).await.unwrap();
        // A checkpoint past all four records.
        let deadline = Instant::now() + Duration::from_secs(30);
        let loaded = loop {
            let loaded = store.load(Scope::Orders, 0).await.unwrap();
            if let Some(l) = loaded.filter(|l| l.next_offset >= 4) {
                break l;
            }
            assert!(Instant::now() < deadline, "no checkpoint past the records");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let manifest = orderflow::stages::snapshot::Manifest::decode(0, &loaded.manifest).unwrap();
        let mut blobs = vec![loaded.manifest.clone()];
        let refs = manifest.blobs();
        let read = store.read_blobs(Scope::Orders, 0, &refs).await.unwrap();
        blobs.extend(read.into_iter().flatten());
        blobs
    });
    let lane: Value = client()
        .get(format!("{base}/v1/admin/parked"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    // The first record is parked (its bytes hold no card number; the
    // header is not kept), the second refused.
    let offsets: Vec<&Value> = lane["parked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["offset"])
        .collect();
    assert_eq!(offsets, [&json!(0)], "{lane}");

    let parked = rt.block_on(async {
        let topics = [(Topic::Orders, PARTITIONS), (Topic::Parked, PARTITIONS)];
        let log = KafkaLog::connect(&kafka, &topics, 1 << 20, Arc::new(Metrics::new()))
            .await
            .unwrap();
        let (_, high) = log.offsets(Topic::Parked, 0).await.unwrap();
        let records = log
            .read(Topic::Parked, 0, 0, 100, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(records.len() as u64, high);
        log.close().await;
        records
    });
    let events: Vec<ParkEvent> = parked
        .iter()
        .map(|r| ParkEvent::decode(&r.value).unwrap())
        .collect();
    let refused = events
        .iter()
        .filter(|e| matches!(e, ParkEvent::Refused(_)))
        .count();
    let parked_events = events
        .iter()
        .filter(|e| matches!(e, ParkEvent::Parked(_)))
        .count();
    assert_eq!((refused, parked_events), (1, 1), "{events:?}");

    assert!(cluster.nodes[0].terminate().success());
    let output = cluster.nodes[0].output_text();
    let digits = PAN.as_bytes();
    let holds = |bytes: &[u8]| bytes.windows(digits.len()).any(|w| w == digits);
    assert!(!holds(output.as_bytes()), "the output holds a card number");
    assert!(
        !output.contains("4242 4242"),
        "the output holds a card number"
    );
    for bytes in parked.iter().map(|r| &r.value).chain(&blobs) {
        assert!(!holds(bytes), "a record or blob holds a card number");
        let spaced = b"4242 4242";
        assert!(!bytes.windows(spaced.len()).any(|w| w == spaced));
    }
}
