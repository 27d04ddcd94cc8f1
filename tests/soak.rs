//! Soak tests at volumes that expose growth (docs/design.md, "Bounds"):
//! hundreds of thousands of orders on one partition, on engines with their
//! default settings. Slow (minutes each): `scripts/test` runs them in
//! release mode (`cargo test --release --test soak`); a plain `cargo test`
//! leaves this target out (`test = false` in Cargo.toml).
//!
//! - [`distributed_soak_on_stock_cassandra`]: Kafka + Cassandra 5.0 with
//!   Cassandra's stock configuration (`scripts/cassandra`), three instances
//!   and `gateway-sim`, 300,000 orders, 225,000 of them homed on one
//!   partition, the owner of that partition SIGKILLed mid-load; then every
//!   invariant, then a restart of every instance.
//! - [`embedded_soak_two_million_orders`]: the embedded deployment with
//!   2,000,000 orders on one partition; resident memory and the data
//!   directory are sampled and must stay under their bounds, flat once the
//!   bounded structures are full. The samples go to
//!   `target/soak/embedded.csv` and `target/soak/embedded.png`.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use orderflow::config::KafkaConfig;
use orderflow::domain::StatusEvent;
use orderflow::domain::partition::partition_for_key;
use orderflow::pipeline::log::kafka::KafkaLog;
use orderflow::pipeline::log::{Log, Record, RecordKind, Topic};
use orderflow::telemetry::metrics::Metrics;
use serde_json::json;
use support::*;

const STRIPE_KEY: &str = "sk_test_orderflow_soak";
/// Every line of an order costs this much.
const UNIT_PRICE: u64 = 250;

/// `n` SKUs whose partition (of `partitions`) is `p`.
fn skus_on(p: u32, partitions: u32, n: usize, tag: &str) -> Vec<String> {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .filter(|s| partition_for_key(s.as_bytes(), partitions) == p)
        .take(n)
        .collect()
}

/// One generated order: its id, its lines and whether its card declines.
#[derive(Clone)]
struct Planned {
    id: String,
    lines: Vec<(String, u32)>,
    declined: bool,
}

impl Planned {
    fn json(&self) -> String {
        let lines: Vec<_> = self
            .lines
            .iter()
            .map(|(sku, q)| json!({"sku": sku, "quantity": q, "unit_price": UNIT_PRICE}))
            .collect();
        let token = if self.declined {
            "tok_chargeDeclined"
        } else {
            "tok_visa"
        };
        json!({"order_id": self.id, "customer_id": "cus-soak", "currency": "USD",
               "lines": lines, "payment": {"token": token}})
        .to_string()
    }
}

/// `total` orders, `hot_share` of them homed on the hot SKUs; every 20th
/// order has a second line on a cold SKU (a saga across partitions);
/// every 50th declines.
fn plan(total: usize, hot_share: f64, hot: &[String], cold: &[String], tag: &str) -> Vec<Planned> {
    let hot_every = (1.0 / (1.0 - hot_share)).round() as usize;
    (0..total)
        .map(|n| {
            let home = if n % hot_every == 0 {
                cold[n % cold.len()].clone()
            } else {
                hot[n % hot.len()].clone()
            };
            let mut lines = vec![(home, 1)];
            if n % 20 == 7 {
                lines.push((cold[(n / 20) % cold.len()].clone(), 1));
            }
            Planned {
                id: format!("{tag}-{n}"),
                lines,
                declined: n % 50 == 3,
            }
        })
        .collect()
}

/// The statuses of every order, read from `order-status` as a consumer
/// would: duplicates (replays) dropped by `(order_id, seq)`.
#[derive(Default)]
struct StatusStream {
    next: Vec<u64>,
    by_order: HashMap<String, BTreeMap<u32, String>>,
    terminal: usize,
}

impl StatusStream {
    /// Reads what is new on every partition (until a read finds nothing:
    /// the log's cached high watermark may lag behind).
    async fn poll(&mut self, log: &dyn Log, partitions: u32) {
        self.next.resize(partitions as usize, 0);
        for p in 0..partitions {
            loop {
                let from = self.next[p as usize];
                let batch = log
                    .read(
                        Topic::OrderStatus,
                        p,
                        from,
                        4096,
                        Duration::from_millis(100),
                    )
                    .await
                    .unwrap();
                let Some(last) = batch.last() else { break };
                self.next[p as usize] = last.offset + 1;
                for r in &batch {
                    self.add(StatusEvent::decode(&r.value).unwrap());
                }
            }
        }
    }

    fn add(&mut self, e: StatusEvent) {
        let status = e.status.as_str().to_owned();
        let seqs = self.by_order.entry(e.order_id.clone()).or_default();
        match seqs.insert(e.seq, status.clone()) {
            Some(prev) => assert_eq!(
                prev, status,
                "{}: seq {} has two statuses",
                e.order_id, e.seq
            ),
            None if e.status.is_terminal() => self.terminal += 1,
            None => {}
        }
    }

    /// Checks every planned order: seqs without gaps, exactly one terminal
    /// status, the last; returns the final status of each.
    fn finals(&self, orders: &[Planned]) -> HashMap<String, String> {
        let mut finals = HashMap::with_capacity(orders.len());
        for o in orders {
            let seqs = &self.by_order[&o.id];
            let want: Vec<u32> = (1..=seqs.len() as u32).collect();
            assert_eq!(
                seqs.keys().copied().collect::<Vec<_>>(),
                want,
                "{}: seq gap",
                o.id
            );
            let terminal = seqs.values().filter(|s| is_terminal(s)).count();
            assert_eq!(terminal, 1, "{}: {seqs:?}", o.id);
            let last = seqs.values().last().unwrap().clone();
            assert!(is_terminal(&last), "{}: {seqs:?}", o.id);
            finals.insert(o.id.clone(), last);
        }
        finals
    }
}

/// Stock conserved for every SKU and sold exactly what confirmed orders bought.
fn check_stock(
    base: &str,
    supply: &BTreeMap<String, u64>,
    orders: &[Planned],
    finals: &HashMap<String, String>,
) {
    let mut bought: BTreeMap<&str, u64> = BTreeMap::new();
    for o in orders.iter().filter(|o| finals[&o.id] == "confirmed") {
        for (sku, q) in &o.lines {
            *bought.entry(sku).or_default() += u64::from(*q);
        }
    }
    wait_until(Duration::from_secs(120), "no stock reserved", || {
        supply.keys().all(|sku| stock(base, sku)["reserved"] == 0)
    });
    for (sku, supplied) in supply {
        let s = stock(base, sku);
        let (a, r, sold) = (
            s["available"].as_u64().unwrap(),
            s["reserved"].as_u64().unwrap(),
            s["sold"].as_u64().unwrap(),
        );
        assert_eq!(a + r + sold, *supplied, "{sku}: stock not conserved: {s}");
        let want = bought.get(sku.as_str()).copied().unwrap_or(0);
        assert_eq!(
            sold, want,
            "{sku}: sold {sold}, confirmed orders bought {want}"
        );
    }
}

fn kafka_config(prefix: &str) -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: kafka_bootstrap(),
        topic_prefix: prefix.to_owned(),
        ..KafkaConfig::default()
    }
}

/// The Kafka topic prefix a distributed config file names.
fn topic_prefix(config: &Path) -> String {
    std::fs::read_to_string(config)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("topic_prefix = "))
        .unwrap()
        .trim_matches('"')
        .to_owned()
}

/// The node whose log says it claimed `orders` partition `p` last.
fn owner_of(nodes: &[Server], p: u32) -> usize {
    let needle = format!("partition={p} ");
    let claims = |n: &Server| {
        strip_ansi(&n.output_text())
            .lines()
            .filter(|l| l.contains("partition claimed") && l.contains(&needle))
            .count()
    };
    (0..nodes.len()).max_by_key(|&i| claims(&nodes[i])).unwrap()
}

/// Kafka + Cassandra with its stock configuration: 300,000 orders (225,000
/// on one partition), SIGKILL of that partition's owner mid-load; then
/// every order has exactly one terminal status, stock is conserved, every
/// confirmed order has exactly one capture and no other order has one, and
/// all instances restart and become ready.
#[test]
fn distributed_soak_on_stock_cassandra() {
    const PARTITIONS: u32 = 4;
    const ORDERS: usize = 300_000;
    let started = Instant::now();
    let mut sim = start_gateway_sim(&[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let config = distributed_config(
        dir.path(),
        &format!("partitions = {PARTITIONS}\nstatus_partitions = {PARTITIONS}"),
        &format!("[gateway]\nkind = \"stripe\"\nurl = \"{}\"", sim.url),
    );
    let env = [
        ("ORDERFLOW_CONFIG", config.to_str().unwrap()),
        ("ORDERFLOW_STRIPE_SECRET_KEY", STRIPE_KEY),
    ];
    let start = |i: usize| start_server(&dir.path().join(format!("node-{i}")), &env);
    let mut nodes: Vec<Server> = (0..3).map(start).collect();

    let hot = skus_on(0, PARTITIONS, 10, "HOT");
    let cold: Vec<String> = (1..PARTITIONS)
        .flat_map(|p| skus_on(p, PARTITIONS, 3, "COLD"))
        .collect();
    let mut supply = BTreeMap::new();
    for sku in &hot {
        supply.insert(sku.clone(), 20_000);
    }
    for sku in &cold {
        supply.insert(sku.clone(), 10_000);
    }
    for (sku, n) in &supply {
        set_stock(&nodes[0].base, sku, *n);
    }
    let orders = plan(ORDERS, 0.75, &hot, &cold, "soak");
    let on_hot = orders
        .iter()
        .filter(|o| partition_for_key(o.lines[0].0.as_bytes(), PARTITIONS) == 0)
        .count();
    assert!(on_hot >= 200_000, "{on_hot} orders on the hot partition");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let prefix = topic_prefix(&config);
    let log = rt.block_on(async {
        let topics = [
            (Topic::Orders, PARTITIONS),
            (Topic::OrderStatus, PARTITIONS),
        ];
        KafkaLog::connect(
            &kafka_config(&prefix),
            &topics,
            1 << 20,
            Arc::new(Metrics::new()),
        )
        .await
        .unwrap()
    });
    // Produced as an upstream producer would, in rounds; the owner of the
    // hot partition dies after the fourth of ten.
    // Each round waits until at most one round is still in flight, so the
    // load follows what the payment gateway takes (a burst of all of them
    // would mostly meet `processor.max_inflight_orders`).
    let victim = owner_of(&nodes, 0);
    let round_size = ORDERS / 10;
    let mut stream = StatusStream::default();
    let deadline = Instant::now() + Duration::from_secs(1_800);
    let wait_terminal = |stream: &mut StatusStream, at_least: usize| loop {
        rt.block_on(stream.poll(&log, PARTITIONS));
        if stream.terminal >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {at_least} orders terminal",
            stream.terminal
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for (round, chunk) in orders.chunks(round_size).enumerate() {
        wait_terminal(&mut stream, round.saturating_sub(1) * round_size);
        rt.block_on(produce(&log, chunk, PARTITIONS));
        if round == 3 {
            eprintln!("soak: SIGKILL node {victim} (owner of the hot partition)");
            nodes[victim].kill();
        }
    }
    wait_terminal(&mut stream, ORDERS);
    let settled_s = started.elapsed().as_secs_f64();
    let finals = stream.finals(&orders);
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for status in finals.values() {
        *outcomes.entry(status.clone()).or_default() += 1;
    }
    let alive = (0..nodes.len()).find(|i| *i != victim).unwrap();
    check_stock(&nodes[alive].base, &supply, &orders, &finals);
    let finals: BTreeMap<String, String> = finals.into_iter().collect();
    wait_until(Duration::from_secs(300), "gateway ledger settled", || {
        ledger_settled(&sim.ledger(), &finals).is_ok()
    });
    let confirmed = finals.values().filter(|s| *s == "confirmed").count() as u64;
    assert_eq!(
        sim.ledger()["summary"]["captures"].as_u64().unwrap(),
        confirmed
    );

    // Every instance stops and starts again, and becomes ready.
    for node in &mut nodes {
        if node.child.try_wait().unwrap().is_none() {
            assert!(node.terminate().success(), "{}", node.output_text());
        }
    }
    let restart = Instant::now();
    let nodes: Vec<Server> = (0..3).map(start).collect();
    let restart_s = restart.elapsed().as_secs_f64();
    let sample = &orders[ORDERS / 2].id;
    let view = order_view(&nodes[2].base, sample).expect("a finished order is still tracked");
    assert_eq!(
        view["status"].as_str(),
        finals.get(sample).map(String::as_str)
    );
    rt.block_on(log.close());
    eprintln!(
        "soak (distributed): {ORDERS} orders ({on_hot} on the hot partition), outcomes {outcomes:?}; \
         all settled {settled_s:.0} s after the start, three instances restarted and ready in \
         {restart_s:.0} s, {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
    sim.terminate();
}

/// Appends `orders` to `orders`, keyed by their home SKU, as a producer would.
async fn produce(log: &KafkaLog, orders: &[Planned], partitions: u32) {
    let mut by_partition: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
    for o in orders {
        let key = o.lines[0].0.clone().into_bytes();
        by_partition
            .entry(partition_for_key(&key, partitions))
            .or_default()
            .push(Record {
                kind: RecordKind::OrderJson,
                key,
                value: o.json().into_bytes(),
            });
    }
    let appends = by_partition.into_iter().map(|(p, records)| async move {
        for chunk in records.chunks(2_000) {
            log.append(Topic::Orders, p, chunk.to_vec()).await.unwrap();
        }
    });
    futures::future::join_all(appends).await;
}

/// What the embedded soak's sampler saw at one moment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at_s: f64,
    produced: u64,
    terminal: u64,
    rss_bytes: u64,
    data_bytes: u64,
}

/// Resident memory of process `pid`, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// [`metric_sum`] as a count.
fn metric(base: &str, name: &str, labels: &[&str]) -> u64 {
    metric_sum(base, name, labels) as u64
}

/// Orders with a terminal status, as the instance counted them.
fn terminal_orders(base: &str) -> u64 {
    [
        "confirmed",
        "rejected",
        "out_of_stock",
        "payment_declined",
        "payment_failed",
    ]
    .iter()
    .map(|s| {
        metric(
            base,
            "orderflow_orders_total",
            &[&format!("status=\"{s}\"")],
        )
    })
    .sum()
}

/// Sends `lines` through `POST /v1/admin/produce`, again for those shed by
/// admission control (back-pressure) until every one is in the log.
fn produce_http(base: &str, lines: &[String]) {
    let c = client();
    let mut pending: Vec<&String> = lines.iter().collect();
    while !pending.is_empty() {
        let body: String = pending.iter().map(|l| format!("{l}\n")).collect();
        let r = c
            .post(format!("{base}/v1/admin/produce"))
            .bearer_auth(ADMIN_TOKEN)
            .body(body)
            .send()
            .unwrap();
        if r.status() == 503 || r.status() == 429 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        assert!(r.status().is_success(), "produce: {}", r.status());
        let text = r.text().unwrap();
        let results: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(results.len(), pending.len());
        let mut again = Vec::new();
        for (line, result) in pending.iter().zip(&results) {
            match result["code"].as_str() {
                None => {}
                Some("overloaded" | "log_full") => again.push(*line),
                Some(code) => panic!("line refused: {code}: {result}"),
            }
        }
        if !again.is_empty() {
            // Shed: the partition is behind. Its backlog drains on its own.
            std::thread::sleep(Duration::from_millis(20));
        }
        pending = again;
    }
}

/// Bounds of the embedded soak's configuration (see `embedded_config`).
const SOAK_SEGMENT_BYTES: u64 = 8 << 20;
const SOAK_RETENTION_BYTES: u64 = 16 << 20;
const SOAK_REMEMBERED: u64 = 500_000;

fn embedded_config(dir: &Path) -> PathBuf {
    let path = dir.join("orderflow.toml");
    std::fs::write(
        &path,
        format!(
            "partitions = 4\nstatus_partitions = 4\n\
             [log]\nsegment_size_bytes = {SOAK_SEGMENT_BYTES}\nretention_bytes = {SOAK_RETENTION_BYTES}\n\
             [processor]\nmax_remembered_orders = {SOAK_REMEMBERED}\n\
             [tracking]\nmax_orders = {SOAK_REMEMBERED}\n"
        ),
    )
    .unwrap();
    path
}

/// The embedded deployment with 2,000,000 orders on one partition: every
/// order ends, stock is conserved, and resident memory and the data
/// directory stay under their bounds, flat once the bounded structures
/// are full (samples in `target/soak/embedded.{csv,png}`).
#[test]
fn embedded_soak_two_million_orders() {
    const ORDERS: usize = 2_000_000;
    const BATCH: usize = 4_000;
    /// Resident memory bound: the finished set and the read model at their
    /// bounds (≈ 36 + 195 bytes per order), the in-process gateway
    /// simulator's intents, log and HTTP buffers, and the orders in flight,
    /// whose number depends on scheduling: peaks of 684–777 MiB were seen
    /// on the CI machine (BENCHMARKS.md). Growth is caught by the check
    /// that the second million's peak is within an eighth of the first's.
    const RSS_BOUND_BYTES: u64 = 896 << 20;
    /// Data directory bound: the `orders` log of each partition at its
    /// retention plus two segments (released behind the checkpoints); the
    /// `order-status` log at the read model's window (the records of its
    /// orders, about 4 of ≤ 160 bytes each) plus two segments a partition;
    /// the park lane and the state file (snapshots).
    const DATA_BOUND_BYTES: u64 = 4 * (SOAK_RETENTION_BYTES + 2 * SOAK_SEGMENT_BYTES)
        + SOAK_REMEMBERED * 4 * 160
        + 4 * 2 * SOAK_SEGMENT_BYTES
        + (64 << 20);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(dir.path());
    let data = dir.path().join("data");
    let env = [("ORDERFLOW_CONFIG", config.to_str().unwrap())];
    let mut server = start_server(&data, &env);
    let base = server.base.clone();
    let hot = skus_on(0, 4, 10, "HOT");
    let supply: BTreeMap<String, u64> = hot.iter().map(|s| (s.clone(), 250_000)).collect();
    for (sku, n) in &supply {
        set_stock(&base, sku, *n);
    }

    let produced = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (produced, done, base, data) =
            (produced.clone(), done.clone(), base.clone(), data.clone());
        let pid = server.child.id();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let t0 = Instant::now();
            while !done.load(Ordering::SeqCst) {
                samples.push(Sample {
                    at_s: t0.elapsed().as_secs_f64(),
                    produced: produced.load(Ordering::SeqCst),
                    terminal: terminal_orders(&base),
                    rss_bytes: rss_bytes(pid),
                    data_bytes: dir_bytes(&data),
                });
                std::thread::sleep(Duration::from_millis(500));
            }
            samples
        })
    };
    let mut n = 0;
    while n < ORDERS {
        let batch: Vec<String> = (n..(n + BATCH).min(ORDERS))
            .map(|i| {
                Planned {
                    id: format!("e-{i}"),
                    lines: vec![(hot[i % hot.len()].clone(), 1)],
                    declined: i % 100 == 3,
                }
                .json()
            })
            .collect();
        produce_http(&base, &batch);
        n += batch.len();
        produced.store(n as u64, Ordering::SeqCst);
    }
    wait_until(Duration::from_secs(1_800), "every order terminal", || {
        terminal_orders(&base) >= ORDERS as u64
    });
    let settled_s = started.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    let samples = sampler.join().unwrap();

    // Stock: conserved, nothing reserved, sold = confirmed orders.
    let confirmed = metric(&base, "orderflow_orders_total", &["status=\"confirmed\""]);
    wait_until(Duration::from_secs(60), "no stock reserved", || {
        hot.iter().all(|sku| stock(&base, sku)["reserved"] == 0)
    });
    let mut sold = 0;
    for (sku, supplied) in &supply {
        let s = stock(&base, sku);
        let (a, r, k) = (
            s["available"].as_u64().unwrap(),
            s["reserved"].as_u64().unwrap(),
            s["sold"].as_u64().unwrap(),
        );
        assert_eq!(a + r + k, *supplied, "{sku}: stock not conserved: {s}");
        sold += k;
    }
    assert_eq!(sold, confirmed, "units sold = confirmed orders of one unit");
    // Every bounded structure is at or under its bound.
    let finished = metric(
        &base,
        "orderflow_state_entries",
        &["structure=\"finished_orders\"", "partition=\"0\""],
    );
    assert!(
        finished <= SOAK_REMEMBERED,
        "{finished} finished orders remembered"
    );
    assert!(
        finished >= SOAK_REMEMBERED / 2,
        "the bound was reached: {finished}"
    );
    let tracked = metric(
        &base,
        "orderflow_state_entries",
        &["structure=\"tracking_orders\""],
    );
    assert!(
        tracked <= SOAK_REMEMBERED,
        "{tracked} orders in the read model"
    );

    write_samples(&samples);
    let max_rss = samples.iter().map(|s| s.rss_bytes).max().unwrap();
    let max_data = samples.iter().map(|s| s.data_bytes).max().unwrap();
    assert!(
        max_rss <= RSS_BOUND_BYTES,
        "resident memory peaked at {max_rss} bytes"
    );
    assert!(
        max_data <= DATA_BOUND_BYTES,
        "data directory peaked at {max_data} bytes"
    );
    // Flat once full: the second million costs no more than the first.
    let peak = |from: u64, to: u64, f: fn(&Sample) -> u64| {
        samples
            .iter()
            .filter(|s| s.produced >= from && s.produced < to)
            .map(f)
            .max()
            .unwrap_or(0)
    };
    let half = ORDERS as u64 / 2;
    let (rss_1, rss_2) = (
        peak(0, half, |s| s.rss_bytes),
        peak(half, u64::MAX, |s| s.rss_bytes),
    );
    let (data_1, data_2) = (
        peak(0, half, |s| s.data_bytes),
        peak(half, u64::MAX, |s| s.data_bytes),
    );
    assert!(
        rss_2 <= rss_1 + rss_1 / 8,
        "memory grew: {rss_1} then {rss_2} bytes"
    );
    assert!(
        data_2 <= data_1 + data_1 / 8,
        "data grew: {data_1} then {data_2} bytes"
    );

    // A restart loads the snapshots, replays the tails and is ready.
    assert!(server.terminate().success(), "{}", server.output_text());
    let restart = Instant::now();
    let server = start_server(&data, &env);
    let restart_s = restart.elapsed().as_secs_f64();
    let recent = format!("e-{}", ORDERS - 10);
    let view = order_view(&server.base, &recent).expect("a recent order is tracked");
    assert!(is_terminal(view["status"].as_str().unwrap()), "{view}");
    eprintln!(
        "soak (embedded): {ORDERS} orders, {confirmed} confirmed, settled in {settled_s:.0} s; \
         RSS {:.0} MiB then {:.0} MiB (peak per half), data {:.0} MiB then {:.0} MiB; \
         restart ready in {restart_s:.1} s",
        rss_1 as f64 / 1048576.0,
        rss_2 as f64 / 1048576.0,
        data_1 as f64 / 1048576.0,
        data_2 as f64 / 1048576.0,
    );
}

/// `target/soak/embedded.csv` and a plot of it, `target/soak/embedded.png`.
fn write_samples(samples: &[Sample]) {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../soak");
    std::fs::create_dir_all(&out).unwrap();
    let mut csv = String::from("elapsed_s,produced,terminal,rss_bytes,data_dir_bytes\n");
    for s in samples {
        csv.push_str(&format!(
            "{:.1},{},{},{},{}\n",
            s.at_s, s.produced, s.terminal, s.rss_bytes, s.data_bytes
        ));
    }
    std::fs::write(out.join("embedded.csv"), csv).unwrap();
    plot(samples, &out.join("embedded.png")).unwrap();
}

fn plot(samples: &[Sample], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let _ =
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    let mib = |b: u64| b as f64 / 1048576.0;
    let x_max = samples.iter().map(|s| s.terminal).max().unwrap_or(1) as f64 / 1e6;
    let y_max = samples
        .iter()
        .map(|s| mib(s.rss_bytes.max(s.data_bytes)))
        .fold(1.0, f64::max)
        * 1.1;
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Embedded soak: memory and disk over 2,000,000 orders",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max.max(0.1), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("orders finished (millions)")
        .y_desc("MiB")
        .draw()?;
    let series = |f: fn(&Sample) -> u64| -> Vec<(f64, f64)> {
        samples
            .iter()
            .map(|s| (s.terminal as f64 / 1e6, mib(f(s))))
            .collect()
    };
    chart
        .draw_series(LineSeries::new(series(|s| s.rss_bytes), &BLUE))?
        .label("resident memory")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart
        .draw_series(LineSeries::new(series(|s| s.data_bytes), &RED))?
        .label("data directory")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
