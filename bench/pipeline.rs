//! End-to-end pipeline benchmark: single-line orders pushed straight into
//! the embedded log (as an upstream producer would, not through HTTP), with
//! fsync group commit on, measured until their terminal status appears on
//! `order-status`.
//!
//! Load is open-loop at `--rate` orders/s: order `k` has the intended send
//! time `start + k / rate`, and latency is measured from that time, so a
//! stalled producer or a full log queue shows up as latency instead of
//! silently lowering the offered load (coordinated omission). `--rate 0`
//! is saturation: keep `--max-inflight` orders outstanding and report the
//! sustained rate; its latency is then closed-loop queueing time.
//!
//! Run: `cargo bench --bench pipeline -- --rate 50000 --seconds 20`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use dashmap::DashMap;
use hdrhistogram::Histogram;
use orderflow::app;
use orderflow::config::Config;
use orderflow::domain::{Envelope, Message, Status, StatusEvent};
use orderflow::pipeline::log::{Log, LogError, Record, RecordKind, Topic, partition_for_key};
use orderflow::sinks::metrics::Metrics;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

#[derive(Parser, Debug, Clone)]
#[command(about = "orderflow end-to-end pipeline benchmark")]
struct Args {
    /// Offered load in orders/s; 0 = saturation (as fast as the log accepts).
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Seconds of load before measuring (excluded from every figure).
    #[arg(long, default_value_t = 3.0)]
    warmup_seconds: f64,
    /// Distinct SKUs, chosen uniformly at random per order.
    #[arg(long, default_value_t = 1000)]
    skus: u32,
    /// Partitions of `orders` and of `order-status`.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// Saturation mode only: orders sent but not yet terminal.
    #[arg(long, default_value_t = 20_000)]
    max_inflight: u64,
    /// Producer batching interval: orders due within it go in one append per partition.
    #[arg(long, default_value_t = 1)]
    linger_ms: u64,
    /// Longest wait after the load for outstanding orders to finish.
    #[arg(long, default_value_t = 30)]
    drain_seconds: u64,
    /// Parent directory for the temporary data directory (default: the system temp dir).
    #[arg(long)]
    data_parent: Option<PathBuf>,
    /// Turn fsync off (CPU-path comparison only; not the configuration of record).
    #[arg(long)]
    no_fsync: bool,
    /// Payment gateway: `simulator` (in process) or `gateway-sim` (spawns
    /// `orderflow gateway-sim` on loopback and calls it over HTTP, as
    /// `gateway.kind = "stripe"`).
    #[arg(long, default_value = "simulator", value_parser = ["simulator", "gateway-sim"])]
    gateway: String,
    /// Latency of each gateway call, in ms (either gateway).
    #[arg(long, default_value_t = 0)]
    gateway_latency_ms: u64,
    /// Probability that a gateway call fails as unavailable (either gateway).
    #[arg(long, default_value_t = 0.0)]
    gateway_failure_rate: f64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Stock per SKU: far more than any run can sell, so no order is out of stock.
const STOCK_PER_SKU: u64 = 1_000_000_000;
/// How long the start-up probe orders may take to reach a terminal status.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Records per status read, and how long a read waits for new ones.
const STATUS_READ_BATCH: usize = 4096;
const STATUS_READ_WAIT: Duration = Duration::from_millis(50);
/// Back-off when the log's append queue is full.
const FULL_BACKOFF: Duration = Duration::from_millis(1);
/// Cores busy outside this process above which the run is flagged: kernel
/// I/O threads alone stay below it in every configuration measured so far.
const SHARED_MACHINE_CORES: f64 = 0.25;
/// Order ids are `b-{n}`; the number keys the pending map.
const ORDER_ID_PREFIX: &str = "b-";

/// State shared by the producer, the status consumers and the main task.
/// Times are nanoseconds since `t0`, so they fit in atomics and map values.
struct Shared {
    t0: Instant,
    /// Order number → intended send time, until its terminal status is read.
    pending: DashMap<u64, u64>,
    /// Measurement window `[start, end)` of intended send times; orders
    /// outside it are processed but not recorded.
    window_start: AtomicU64,
    window_end: AtomicU64,
    sent: AtomicU64,
    terminal: AtomicU64,
    /// Terminal statuses by kind, indexed like `Status::ALL`.
    by_status: [AtomicU64; Status::ALL.len()],
    /// Times an append was refused with `Full` and retried.
    full_retries: AtomicU64,
    /// Orders whose append failed for good (never counted as done).
    lost: AtomicU64,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            t0: Instant::now(),
            pending: DashMap::new(),
            window_start: AtomicU64::new(u64::MAX),
            window_end: AtomicU64::new(u64::MAX),
            sent: AtomicU64::new(0),
            terminal: AtomicU64::new(0),
            by_status: std::array::from_fn(|_| AtomicU64::new(0)),
            full_retries: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn in_window(&self, intended_ns: u64) -> bool {
        (self.window_start.load(Ordering::Relaxed)..self.window_end.load(Ordering::Relaxed))
            .contains(&intended_ns)
    }

    fn status_count(&self, status: Status) -> u64 {
        let i = Status::ALL
            .iter()
            .position(|s| *s == status)
            .expect("listed status");
        self.by_status[i].load(Ordering::Relaxed)
    }
}

/// Latencies in microseconds, up to an hour, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// The same allocator as the `orderflow` binary, so the figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let machine = Machine::detect();
    let parent = args.data_parent.clone().unwrap_or_else(std::env::temp_dir);
    let data = tempfile::Builder::new()
        .prefix("orderflow-bench-")
        .tempdir_in(&parent)?;
    let mut config = bench_config(&args, data.path());
    let _gateway_sim = gateway_sim(&args, &mut config, data.path())?;
    let app = app::start(config.clone(), None).await?;
    let log = app.log();
    let shared = Arc::new(Shared::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let consumers: Vec<_> = (0..log.partition_count(Topic::OrderStatus))
        .map(|p| {
            tokio::spawn(consume_statuses(
                log.clone(),
                p,
                shared.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();

    let skus = sku_names(args.skus);
    load_stock(log.as_ref(), &skus).await?;
    if let Err(e) = probe(log.as_ref(), &shared, &skus).await {
        let _ = stop_tx.send(true);
        let _ = app.shutdown().await;
        return Err(e);
    }

    let run = measure(&args, log.clone(), &shared, &app.metrics, skus).await;
    let _ = stop_tx.send(true);
    let mut latency = new_histogram();
    for c in consumers {
        latency.add(c.await?)?;
    }
    let incomplete = record_incomplete(&shared, &mut latency);
    app.shutdown().await?;
    let report = Report::new(&args, &config, machine, run, &shared, &latency, incomplete);
    report.print();
    Ok(())
}

/// Defaults of record (8 partitions, fsync on), on a throw-away directory.
fn bench_config(args: &Args, dir: &Path) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        data_dir: dir.to_path_buf(),
        partitions: args.partitions,
        status_partitions: args.partitions,
        ..Config::default()
    };
    config.log.fsync = !args.no_fsync;
    config.gateway.latency_ms = args.gateway_latency_ms;
    config.gateway.failure_rate = args.gateway_failure_rate;
    config
}

/// Kills the spawned `orderflow gateway-sim` when the run ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// With `--gateway gateway-sim`: starts `orderflow gateway-sim` with the
/// gateway latency and failure rate and points `config` at it.
fn gateway_sim(args: &Args, config: &mut Config, dir: &Path) -> anyhow::Result<Option<ChildGuard>> {
    use std::io::BufRead;
    if args.gateway != "gateway-sim" {
        return Ok(None);
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(["gateway-sim", "--listen", "127.0.0.1:0", "--latency-ms"])
        .arg(args.gateway_latency_ms.to_string())
        .arg("--failure-rate")
        .arg(args.gateway_failure_rate.to_string())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line)?;
    let guard = ChildGuard(child);
    let addr = line
        .trim()
        .strip_prefix("gateway-sim listening addr=")
        .ok_or_else(|| anyhow::anyhow!("gateway-sim printed {line:?}"))?;
    let key_file = dir.join("stripe-key");
    std::fs::write(&key_file, "sk_test_bench")?;
    config.gateway.kind = orderflow::config::GatewayKind::Stripe;
    config.gateway.url = format!("http://{addr}");
    config.gateway.secret_key_file = Some(key_file);
    Ok(Some(guard))
}

fn sku_names(n: u32) -> Vec<String> {
    (0..n).map(|i| format!("SKU-{i:05}")).collect()
}

/// Sets every SKU's stock through the log, one append per partition. The
/// orders for a SKU go to the same partition after it, so the processor
/// applies the stock before the first order without any waiting here.
async fn load_stock(log: &dyn Log, skus: &[String]) -> anyhow::Result<()> {
    let partitions = log.partition_count(Topic::Orders);
    let mut batches: Vec<Vec<Record>> = vec![Vec::new(); partitions as usize];
    for sku in skus {
        let body = Message::SetStock {
            sku: sku.clone(),
            available: STOCK_PER_SKU,
        };
        let record = Record {
            kind: RecordKind::Internal,
            key: sku.as_bytes().to_vec(),
            value: Envelope::new(None, body).encode(),
        };
        batches[partition_for_key(sku.as_bytes(), partitions) as usize].push(record);
    }
    for (p, records) in batches
        .into_iter()
        .enumerate()
        .filter(|(_, r)| !r.is_empty())
    {
        log.append(Topic::Orders, p as u32, records).await?;
    }
    Ok(())
}

/// One order per `orders` partition that has a SKU, then waits until all
/// are `confirmed`: proves every runner, the effect executor and the status
/// path work before any load is offered, and warms them up.
async fn probe(log: &dyn Log, shared: &Shared, skus: &[String]) -> anyhow::Result<()> {
    let partitions = log.partition_count(Topic::Orders);
    let mut per_partition: Vec<Option<usize>> = vec![None; partitions as usize];
    for (i, sku) in skus.iter().enumerate() {
        per_partition[partition_for_key(sku.as_bytes(), partitions) as usize].get_or_insert(i);
    }
    let probes: Vec<usize> = per_partition.into_iter().flatten().collect();
    let specs: Vec<OrderSpec> = probes
        .iter()
        .map(|&sku| OrderSpec {
            n: next_order(shared),
            sku,
        })
        .collect();
    for spec in &specs {
        shared.pending.insert(spec.n, shared.now_ns());
    }
    let batches = group_by_partition(specs, skus, partitions);
    futures::future::try_join_all(
        batches
            .into_iter()
            .map(|(p, b)| append_orders(log, p, b, skus)),
    )
    .await?;

    let deadline = Instant::now() + PROBE_TIMEOUT;
    while !shared.pending.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let confirmed = shared.status_count(Status::Confirmed);
    if confirmed != probes.len() as u64 {
        let stuck: Vec<u64> = shared.pending.iter().map(|e| *e.key()).collect();
        anyhow::bail!(
            "pipeline check failed: {confirmed} of {} probe orders confirmed within {PROBE_TIMEOUT:?}; \
             terminal by status: {}; still without a terminal status: {stuck:?}",
            probes.len(),
            status_counts(shared)
        );
    }
    Ok(())
}

fn next_order(shared: &Shared) -> u64 {
    shared.sent.fetch_add(1, Ordering::Relaxed)
}

/// What a run measured between the end of the warm-up and the end of the load.
struct Measured {
    window_s: f64,
    terminal: u64,
    cpu: Duration,
    offered: u64,
    backlog_at_end: u64,
    drained_s: f64,
    internals: Internals,
}

/// Drives the load and samples counters at the window's edges.
async fn measure(
    args: &Args,
    log: Arc<dyn Log>,
    shared: &Arc<Shared>,
    metrics: &Metrics,
    skus: Vec<String>,
) -> Measured {
    let start_ns = shared.now_ns();
    let warmup_ns = (args.warmup_seconds * 1e9) as u64;
    let window_ns = (args.seconds * 1e9) as u64;
    shared
        .window_start
        .store(start_ns + warmup_ns, Ordering::Relaxed);
    shared
        .window_end
        .store(start_ns + warmup_ns + window_ns, Ordering::Relaxed);
    let producer = tokio::spawn(
        Producer::new(args.clone(), log.clone(), shared.clone(), skus, start_ns).run(),
    );

    sleep_until_ns(shared, start_ns + warmup_ns).await;
    let before = Sample::take(shared, metrics, &*log);
    sleep_until_ns(shared, start_ns + warmup_ns + window_ns).await;
    let after = Sample::take(shared, metrics, &*log);
    let offered = producer.await.expect("producer task");
    let backlog_at_end = shared.pending.len() as u64;

    let drain_started = Instant::now();
    let deadline = drain_started + Duration::from_secs(args.drain_seconds);
    while !shared.pending.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let window_s = (after.at_ns - before.at_ns) as f64 / 1e9;
    Measured {
        window_s,
        terminal: after.terminal - before.terminal,
        cpu: after.cpu.saturating_sub(before.cpu),
        offered,
        backlog_at_end,
        drained_s: drain_started.elapsed().as_secs_f64(),
        internals: Internals::between(&before, &after, window_s),
    }
}

async fn sleep_until_ns(shared: &Shared, at_ns: u64) {
    tokio::time::sleep_until((shared.t0 + Duration::from_nanos(at_ns)).into()).await;
}

/// One order to send: its number and the index of its SKU.
#[derive(Clone, Copy)]
struct OrderSpec {
    n: u64,
    sku: usize,
}

/// The load generator: its schedule position and what it offered.
struct Producer {
    args: Args,
    log: Arc<dyn Log>,
    shared: Arc<Shared>,
    skus: Arc<Vec<String>>,
    rng: StdRng,
    start_ns: u64,
    /// Orders generated so far (open loop: the next slot of the schedule).
    scheduled: u64,
    offered_in_window: u64,
}

impl Producer {
    fn new(
        args: Args,
        log: Arc<dyn Log>,
        shared: Arc<Shared>,
        skus: Vec<String>,
        start_ns: u64,
    ) -> Producer {
        Producer {
            args,
            log,
            shared,
            skus: Arc::new(skus),
            rng: StdRng::seed_from_u64(42),
            start_ns,
            scheduled: 0,
            offered_in_window: 0,
        }
    }

    /// Sends load until the end of the window; returns the orders offered
    /// in the measurement window.
    async fn run(mut self) -> u64 {
        let end_ns = self.shared.window_end.load(Ordering::Relaxed);
        loop {
            let now = self.shared.now_ns();
            if now >= end_ns {
                // Open loop: every slot up to the window's end is sent even
                // if this task runs late; lateness is latency, never a
                // lower offered rate.
                if self.args.rate > 0 {
                    self.tick(end_ns, now);
                }
                return self.offered_in_window;
            }
            self.tick(now, now);
            tokio::time::sleep(Duration::from_millis(self.args.linger_ms)).await;
        }
    }

    /// Sends the orders due by `horizon` as one append per partition, each
    /// in its own task, so a slow append never delays the schedule.
    fn tick(&mut self, horizon: u64, now: u64) {
        let due = due_orders(
            &self.args,
            &self.shared,
            horizon - self.start_ns,
            self.scheduled,
        );
        let slots = self.scheduled..self.scheduled + due;
        let specs: Vec<OrderSpec> = slots.map(|k| self.order(k, now)).collect();
        self.scheduled += due;
        let partitions = self.log.partition_count(Topic::Orders);
        for (p, batch) in group_by_partition(specs, &self.skus, partitions) {
            let (log, shared, skus) = (self.log.clone(), self.shared.clone(), self.skus.clone());
            tokio::spawn(async move { send_batch(log.as_ref(), &shared, p, batch, &skus).await });
        }
    }

    /// The order of slot `k`, registered as pending with its intended send
    /// time before it is sent.
    fn order(&mut self, k: u64, now: u64) -> OrderSpec {
        // Open loop: the slot's time in the schedule. Saturation has no
        // schedule; an order is intended when it is sent.
        let intended = (u128::from(k) * 1_000_000_000)
            .checked_div(u128::from(self.args.rate))
            .map_or(now, |offset| self.start_ns + offset as u64);
        let spec = OrderSpec {
            n: next_order(&self.shared),
            sku: self.rng.random_range(0..self.skus.len()),
        };
        self.shared.pending.insert(spec.n, intended);
        self.offered_in_window += u64::from(self.shared.in_window(intended));
        spec
    }
}

/// Orders to send now: those whose intended time has come (open loop), or
/// enough to refill the in-flight limit (saturation).
fn due_orders(args: &Args, shared: &Shared, elapsed_ns: u64, scheduled: u64) -> u64 {
    if args.rate == 0 {
        let inflight =
            shared.sent.load(Ordering::Relaxed) - shared.terminal.load(Ordering::Relaxed);
        return args.max_inflight.saturating_sub(inflight);
    }
    let due_total = (u128::from(elapsed_ns) * u128::from(args.rate) / 1_000_000_000) as u64 + 1;
    due_total.saturating_sub(scheduled)
}

fn group_by_partition(
    specs: Vec<OrderSpec>,
    skus: &[String],
    partitions: u32,
) -> Vec<(u32, Vec<OrderSpec>)> {
    let mut batches: Vec<Vec<OrderSpec>> = vec![Vec::new(); partitions as usize];
    for spec in specs {
        batches[partition_for_key(skus[spec.sku].as_bytes(), partitions) as usize].push(spec);
    }
    batches
        .into_iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .map(|(p, b)| (p as u32, b))
        .collect()
}

/// Appends a batch; an order whose append fails for good will never finish,
/// so it leaves the pending map and counts as lost.
async fn send_batch(
    log: &dyn Log,
    shared: &Shared,
    partition: u32,
    batch: Vec<OrderSpec>,
    skus: &[String],
) {
    loop {
        match append_orders(log, partition, batch.clone(), skus).await {
            Ok(_) => return,
            Err(LogError::Full { .. }) => {
                shared.full_retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(FULL_BACKOFF).await;
            }
            Err(e) => {
                eprintln!("append to orders/{partition} failed: {e}");
                for spec in &batch {
                    shared.pending.remove(&spec.n);
                }
                shared.lost.fetch_add(batch.len() as u64, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// Encodes the contract's order JSON (one line, quantity 1) and appends it.
/// Records are built per attempt so a retry needs no copy of the bytes.
async fn append_orders(
    log: &dyn Log,
    partition: u32,
    batch: Vec<OrderSpec>,
    skus: &[String],
) -> Result<u64, LogError> {
    let records = batch
        .iter()
        .map(|spec| {
            let sku = &skus[spec.sku];
            let json = format!(
                r#"{{"order_id":"{ORDER_ID_PREFIX}{}","customer_id":"c-{}","currency":"USD","lines":[{{"sku":"{sku}","quantity":1,"unit_price":1999}}],"payment":{{"token":"tok_visa"}}}}"#,
                spec.n,
                spec.n % 10_000
            );
            Record { kind: RecordKind::OrderJson, key: sku.as_bytes().to_vec(), value: json.into_bytes() }
        })
        .collect();
    log.append(Topic::Orders, partition, records).await
}

/// Reads one `order-status` partition from the start until `stop`, and
/// records each order's latency when its terminal status is read.
async fn consume_statuses(
    log: Arc<dyn Log>,
    partition: u32,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> Histogram<u64> {
    let mut latency = new_histogram();
    let mut next = 0;
    while !*stop.borrow() {
        let records = match log
            .read(
                Topic::OrderStatus,
                partition,
                next,
                STATUS_READ_BATCH,
                STATUS_READ_WAIT,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("reading order-status/{partition} failed: {e}");
                break;
            }
        };
        let now = shared.now_ns();
        for r in records {
            next = r.offset + 1;
            match StatusEvent::decode(&r.value) {
                Ok(event) if event.status.is_terminal() => {
                    on_terminal(&shared, &event, now, &mut latency)
                }
                Ok(_) => {}
                Err(e) => eprintln!(
                    "undecodable status at order-status/{partition}@{}: {e}",
                    r.offset
                ),
            }
        }
    }
    latency
}

fn on_terminal(shared: &Shared, event: &StatusEvent, now_ns: u64, latency: &mut Histogram<u64>) {
    let Some(n) = event
        .order_id
        .strip_prefix(ORDER_ID_PREFIX)
        .and_then(|n| n.parse::<u64>().ok())
    else {
        return;
    };
    // Removing dedupes: a replayed terminal status finds nothing.
    let Some((_, intended)) = shared.pending.remove(&n) else {
        return;
    };
    shared.terminal.fetch_add(1, Ordering::Relaxed);
    let i = Status::ALL
        .iter()
        .position(|s| *s == event.status)
        .expect("listed status");
    shared.by_status[i].fetch_add(1, Ordering::Relaxed);
    if shared.in_window(intended) {
        latency.saturating_record(now_ns.saturating_sub(intended) / 1_000);
    }
}

/// Measured orders still without a terminal status after the drain: each
/// is recorded with its age at that moment, a lower bound on its latency,
/// so they raise the tail instead of vanishing from it.
fn record_incomplete(shared: &Shared, latency: &mut Histogram<u64>) -> u64 {
    let now = shared.now_ns();
    let mut incomplete = 0;
    for entry in shared
        .pending
        .iter()
        .filter(|e| shared.in_window(*e.value()))
    {
        latency.saturating_record(now.saturating_sub(*entry.value()) / 1_000);
        incomplete += 1;
    }
    incomplete
}

fn status_counts(shared: &Shared) -> String {
    let counts: Vec<String> = Status::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| format!("{s}={}", shared.status_count(*s)))
        .collect();
    counts.join(" ")
}

/// Process CPU time (user + system) and peak resident set size in KiB.
fn rusage() -> (Duration, u64) {
    // SAFETY: getrusage only writes into the zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss as u64)
}

/// Counters read at one edge of the measurement window.
struct Sample {
    at_ns: u64,
    terminal: u64,
    cpu: Duration,
    topics: [TopicCounters; 2],
    checkpoints: (u64, f64),
    orders_lag: i64,
    machine: MachineCpu,
}

/// Cumulative log counters of one topic (from the app's Prometheus metrics).
#[derive(Clone, Copy, Default)]
struct TopicCounters {
    fsyncs: u64,
    fsync_s: f64,
    commits: u64,
    committed_records: f64,
    appends: u64,
    append_s: f64,
}

impl Sample {
    fn take(shared: &Shared, metrics: &Metrics, log: &dyn Log) -> Sample {
        let topic = |t: Topic| {
            let fsync = metrics.log_fsync_latency.with_label_values(&[t.name()]);
            let batch = metrics.log_batch_records.with_label_values(&[t.name()]);
            let append = metrics.log_append_latency.with_label_values(&[t.name()]);
            TopicCounters {
                fsyncs: fsync.get_sample_count(),
                fsync_s: fsync.get_sample_sum(),
                commits: batch.get_sample_count(),
                committed_records: batch.get_sample_sum(),
                appends: append.get_sample_count(),
                append_s: append.get_sample_sum(),
            }
        };
        let mut checkpoints = (0, 0.0);
        for p in 0..log.partition_count(Topic::Orders) {
            let h = metrics
                .checkpoint_latency
                .with_label_values(&[&p.to_string()]);
            checkpoints.0 += h.get_sample_count();
            checkpoints.1 += h.get_sample_sum();
        }
        let orders_lag = (0..log.partition_count(Topic::Orders))
            .map(|p| {
                metrics
                    .partition_lag
                    .with_label_values(&["orders", &p.to_string()])
                    .get()
            })
            .sum();
        Sample {
            at_ns: shared.now_ns(),
            terminal: shared.terminal.load(Ordering::Relaxed),
            cpu: rusage().0,
            machine: MachineCpu::read(),
            topics: [topic(Topic::Orders), topic(Topic::OrderStatus)],
            checkpoints,
            orders_lag,
        }
    }
}

/// Where the time went inside the pipeline over the window, per topic.
struct Internals {
    topics: [TopicRates; 2],
    checkpoints_per_s: f64,
    checkpoint_mean_ms: f64,
    /// Records the `orders` runners had not yet read at the window's end.
    orders_lag_at_end: i64,
    /// Average cores busy in this process, elsewhere (other processes, and
    /// kernel threads such as the file system's, which this run's fsyncs
    /// also keep busy; a benchmark sharing its machine is not a clean run)
    /// and stolen by the hypervisor.
    own_cores: f64,
    other_cores: f64,
    steal_cores: f64,
}

#[derive(Default)]
struct TopicRates {
    fsyncs_per_s: f64,
    fsync_mean_ms: f64,
    /// Sum of fsync time over the window, divided by the window: how many
    /// partitions' worth of writer threads were busy in fsync on average.
    fsync_busy: f64,
    records_per_commit: f64,
    records_per_s: f64,
    appends_per_s: f64,
    append_mean_ms: f64,
}

impl Internals {
    fn between(a: &Sample, b: &Sample, window_s: f64) -> Internals {
        let rates = |x: &TopicCounters, y: &TopicCounters| {
            let fsyncs = (y.fsyncs - x.fsyncs) as f64;
            let commits = (y.commits - x.commits) as f64;
            let records = y.committed_records - x.committed_records;
            let appends = (y.appends - x.appends) as f64;
            TopicRates {
                fsyncs_per_s: fsyncs / window_s,
                fsync_mean_ms: ratio(y.fsync_s - x.fsync_s, fsyncs) * 1e3,
                fsync_busy: (y.fsync_s - x.fsync_s) / window_s,
                records_per_commit: ratio(records, commits),
                records_per_s: records / window_s,
                appends_per_s: appends / window_s,
                append_mean_ms: ratio(y.append_s - x.append_s, appends) * 1e3,
            }
        };
        let checkpoints = (b.checkpoints.0 - a.checkpoints.0) as f64;
        Internals {
            topics: [
                rates(&a.topics[0], &b.topics[0]),
                rates(&a.topics[1], &b.topics[1]),
            ],
            checkpoints_per_s: checkpoints / window_s,
            checkpoint_mean_ms: ratio(b.checkpoints.1 - a.checkpoints.1, checkpoints) * 1e3,
            orders_lag_at_end: b.orders_lag,
            own_cores: b.cpu.saturating_sub(a.cpu).as_secs_f64() / window_s,
            other_cores: (b
                .machine
                .busy
                .saturating_sub(a.machine.busy)
                .saturating_sub(b.cpu.saturating_sub(a.cpu)))
            .as_secs_f64()
                / window_s,
            steal_cores: b
                .machine
                .steal
                .saturating_sub(a.machine.steal)
                .as_secs_f64()
                / window_s,
        }
    }
}

/// Whole-machine CPU time so far, all cores, from the `cpu` line of /proc/stat.
#[derive(Clone, Copy, Default)]
struct MachineCpu {
    /// user + nice + system + irq + softirq.
    busy: Duration,
    steal: Duration,
}

impl MachineCpu {
    fn read() -> MachineCpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let time = |t: u64| Duration::from_nanos(t.saturating_mul(1_000_000_000) / hz);
        MachineCpu {
            busy: time(at(0) + at(1) + at(2) + at(5) + at(6)),
            steal: time(at(7)),
        }
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { 0.0 } else { a / b }
}

/// The machine the run is on, as far as Linux shows it.
struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    date: String,
}

impl Machine {
    fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = proc_field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = proc_field(&meminfo, "MemTotal")
            .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: mem_kib / (1024.0 * 1024.0),
            date: utc_date(),
        }
    }
}

/// The value of the first `key: value` line of a /proc file.
fn proc_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
}

/// Today's UTC date as YYYY-MM-DD (civil-from-days, H. Hinnant), to avoid a
/// date crate for one line of output.
fn utc_date() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Everything a run prints.
struct Report {
    mode: String,
    args: Args,
    fsync: bool,
    machine: Machine,
    run: Measured,
    throughput: f64,
    offered_rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    samples: u64,
    incomplete: u64,
    cpu_us_per_order: f64,
    peak_rss_mib: f64,
    statuses: String,
    full_retries: u64,
    lost: u64,
}

impl Report {
    /// Peak RSS is read here: `ru_maxrss` is a high-water mark, so reading
    /// it after shutdown still gives the run's peak.
    fn new(
        args: &Args,
        config: &Config,
        machine: Machine,
        run: Measured,
        shared: &Shared,
        latency: &Histogram<u64>,
        incomplete: u64,
    ) -> Report {
        let (_, peak_rss_kb) = rusage();
        let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1e3;
        Report {
            mode: if args.rate == 0 {
                "saturation".into()
            } else {
                "open-loop".into()
            },
            args: args.clone(),
            fsync: config.log.fsync,
            throughput: run.terminal as f64 / run.window_s,
            offered_rate: run.offered as f64 / run.window_s,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: latency.max() as f64 / 1e3,
            samples: latency.len(),
            incomplete,
            cpu_us_per_order: ratio(run.cpu.as_secs_f64() * 1e6, run.terminal as f64),
            peak_rss_mib: peak_rss_kb as f64 / 1024.0,
            statuses: status_counts(shared),
            full_retries: shared.full_retries.load(Ordering::Relaxed),
            lost: shared.lost.load(Ordering::Relaxed),
            machine,
            run,
        }
    }

    fn print(&self) {
        let a = &self.args;
        let m = &self.machine;
        println!();
        println!("orderflow pipeline benchmark ({}), {}", self.mode, m.date);
        println!(
            "  machine   {} | {} cores | {:.1} GiB RAM",
            m.cpu, m.cores, m.memory_gib
        );
        println!(
            "  config    {} orders + {} status partitions, fsync {}, {} SKUs, linger {} ms, warm-up {} s, measured {} s{}",
            a.partitions,
            a.partitions,
            if self.fsync { "on" } else { "OFF" },
            a.skus,
            a.linger_ms,
            a.warmup_seconds,
            a.seconds,
            if a.rate == 0 {
                format!(", max in-flight {}", a.max_inflight)
            } else {
                String::new()
            }
        );
        let target = if a.rate == 0 {
            "max".to_owned()
        } else {
            a.rate.to_string()
        };
        println!(
            "  offered   {target} orders/s target, {:.0} orders/s sent in the window",
            self.offered_rate
        );
        println!(
            "  achieved  {:.0} orders/s terminal ({} in {:.2} s)",
            self.throughput, self.run.terminal, self.run.window_s
        );
        println!(
            "  latency   p50 {:.2} ms | p99 {:.2} ms | p99.9 {:.2} ms | max {:.2} ms ({} orders{})",
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.samples,
            if self.incomplete > 0 {
                format!(
                    ", {} never finished: counted at drain deadline",
                    self.incomplete
                )
            } else {
                String::new()
            }
        );
        println!(
            "  cpu       {:.1} µs per order (process user+sys, includes the bench's producer and consumer)",
            self.cpu_us_per_order
        );
        println!("  memory    peak RSS {:.0} MiB", self.peak_rss_mib);
        println!(
            "  gateway   {} ({} ms latency, {} failure rate)",
            a.gateway, a.gateway_latency_ms, a.gateway_failure_rate
        );
        println!(
            "  backlog   {} orders outstanding at end of load, drained in {:.2} s; {} Full retries, {} lost",
            self.run.backlog_at_end, self.run.drained_s, self.full_retries, self.lost
        );
        println!("  terminal  {}", self.statuses);
        self.print_internals();
        println!("{}", self.json());
    }

    fn print_internals(&self) {
        let i = &self.run.internals;
        for (name, t) in ["orders", "order-status"].iter().zip(&i.topics) {
            println!(
                "  log {name:<12} {:.0} rec/s, {:.0} appends/s ({:.2} ms mean ack), {:.0} fsyncs/s ({:.2} ms mean, {:.2} writer-threads busy), {:.1} rec/commit",
                t.records_per_s,
                t.appends_per_s,
                t.append_mean_ms,
                t.fsyncs_per_s,
                t.fsync_mean_ms,
                t.fsync_busy,
                t.records_per_commit
            );
        }
        println!(
            "  checkpoint {:.1}/s ({:.2} ms mean); orders lag at window end {} records",
            i.checkpoints_per_s, i.checkpoint_mean_ms, i.orders_lag_at_end
        );
        println!(
            "  cores     this process {:.2}, elsewhere {:.2} (other processes + kernel threads), hypervisor steal {:.2} (of {}){}",
            i.own_cores,
            i.other_cores,
            i.steal_cores,
            self.machine.cores,
            if i.other_cores > SHARED_MACHINE_CORES {
                "  <- machine probably shared: figures may be pessimistic"
            } else {
                ""
            }
        );
    }

    fn json(&self) -> String {
        let a = &self.args;
        serde_json::json!({
            "bench": "pipeline",
            "date": self.machine.date,
            "mode": self.mode,
            "offered_target": a.rate,
            "offered_rate": self.offered_rate.round(),
            "achieved_rate": self.throughput.round(),
            "terminal": self.run.terminal,
            "window_s": self.run.window_s,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms,
            "max_ms": self.max_ms,
            "incomplete": self.incomplete,
            "cpu_us_per_order": self.cpu_us_per_order,
            "peak_rss_mib": self.peak_rss_mib.round(),
            "partitions": a.partitions,
            "fsync": self.fsync,
            "skus": a.skus,
            "linger_ms": a.linger_ms,
            "max_inflight": a.max_inflight,
            "own_cores": self.run.internals.own_cores,
            "other_cores": self.run.internals.other_cores,
            "cpu": self.machine.cpu,
            "cores": self.machine.cores,
            "gateway": a.gateway,
            "gateway_latency_ms": a.gateway_latency_ms,
            "gateway_failure_rate": a.gateway_failure_rate,
        })
        .to_string()
    }
}
