//! Overload benchmark of HTTP intake: open-loop `POST /v1/orders` against
//! an in-process instance, in three phases, to show that intake sheds what
//! it cannot take (429/503 with `Retry-After`), that the orders it admits
//! still finish in bounded time, that memory stays under its bound, and
//! how fast throughput comes back once the load drops:
//!
//! 1. warm-up at `--base-rate` (a rate the machine sustains) for `--warmup-seconds`;
//! 2. overload at `--rate` for `--seconds`;
//! 3. recovery at `--base-rate` again for `--recovery-seconds`.
//!
//! Open loop: request `k` of a phase has the intended send time
//! `phase start + k / rate`, whatever happened to earlier requests. Due
//! requests wait in one client-side queue for the first free connection
//! of `--connections` keep-alive HTTP/1.1 connections; every latency is
//! measured from the intended time, so a client that cannot send on time
//! (all connections busy, or no CPU) shows up as latency instead of
//! lowering the offered load (coordinated omission).
//!
//! The latency of an admitted order runs from its intended send time to
//! the moment the bench reads its terminal status from `order-status` (as
//! `orderflow bench` does). The instance runs in this process on its own
//! tokio runtime, so the resident set size the bench samples (and the
//! memory guard reads) is the instance's plus the bench's own.
//!
//! Run: `cargo bench --bench overload -- --base-rate 1800 --rate 7200 --seconds 60`

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use dashmap::DashMap;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use orderflow::app::{self, App};
use orderflow::bench::{Machine, MachineCpu, rusage};
use orderflow::config::{Config, IntakeConfig};
use orderflow::domain::{Envelope, Message, Status, StatusEvent};
use orderflow::pipeline::intake::resident_bytes;
use orderflow::pipeline::log::{Log, Record, RecordKind, Topic, partition_for_key};
use orderflow::telemetry::metrics::Metrics;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};

const MIB: u64 = 1024 * 1024;

#[derive(Parser, Debug, Clone)]
#[command(about = "orderflow HTTP intake overload benchmark")]
struct Args {
    /// Offered load of the overload phase, in requests/s.
    #[arg(long, default_value_t = 7_200)]
    rate: u64,
    /// Length of the overload phase, in seconds.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Offered load of the warm-up and recovery phases (a sustainable rate).
    #[arg(long, default_value_t = 1_800)]
    base_rate: u64,
    #[arg(long, default_value_t = 10.0)]
    warmup_seconds: f64,
    #[arg(long, default_value_t = 30.0)]
    recovery_seconds: f64,
    /// Keep-alive HTTP/1.1 connections of the load generator.
    #[arg(long, default_value_t = 512)]
    connections: usize,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Worker threads of the instance's runtime (default: one per core).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Distinct SKUs, chosen uniformly at random per order.
    #[arg(long, default_value_t = 1000)]
    skus: u32,
    /// Partitions of `orders` and of `order-status`.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// `intake.max_inflight` (default: the configuration's default).
    #[arg(long)]
    max_inflight: Option<usize>,
    /// `intake.max_backlog_records` (default: the configuration's default).
    #[arg(long)]
    max_backlog_records: Option<u64>,
    /// `intake.max_rss_bytes`, in MiB; 0 = no bound.
    #[arg(long, default_value_t = 1024)]
    max_rss_mib: u64,
    /// `processor.max_remembered_orders` (default: the configuration's default).
    #[arg(long)]
    max_remembered_orders: Option<usize>,
    /// Latency of each call of the in-process payment simulator, in ms.
    #[arg(long, default_value_t = 0)]
    gateway_latency_ms: u64,
    /// Longest wait after the last phase for admitted orders to finish.
    #[arg(long, default_value_t = 60)]
    drain_seconds: u64,
    /// A second counts as recovered when at least this share of its
    /// requests was admitted ...
    #[arg(long, default_value_t = 0.99)]
    recovered_admitted: f64,
    /// ... and its admitted orders' p99 is at most this many times the warm-up's p99.
    #[arg(long, default_value_t = 2.0)]
    recovered_p99_factor: f64,
    /// Parent directory for the temporary data directory (default: the system temp dir).
    #[arg(long)]
    data_parent: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Stock per SKU: far more than any run can sell, so no order is out of stock.
const STOCK_PER_SKU: u64 = 1_000_000_000;
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
const STATUS_READ_BATCH: usize = 4096;
const STATUS_READ_WAIT: Duration = Duration::from_millis(50);
/// Order ids are `ov-{n}`; the number keys the pending map. Short enough
/// that no id holds a 13-digit run the card-number check could refuse.
const ORDER_ID_PREFIX: &str = "ov-";
/// How often RSS, in-flight orders and the client queue are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Shed reasons of `orderflow_intake_shed_total`, in report order.
const SHED_REASONS: [&str; 4] = ["inflight", "backlog", "memory", "log_full"];

const PHASES: [&str; 3] = ["warm-up", "overload", "recovery"];
/// Name of the load generator's threads (its runtime's workers and
/// blocking threads), to tell its CPU time from the instance's.
const CLIENT_THREADS: &str = "client";

/// The same allocator as the `orderflow` binary, so the figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One request to send.
#[derive(Clone, Copy)]
struct Job {
    n: u64,
    intended_ns: u64,
    sku: u32,
}

/// Counters of one phase (by intended send time) or one second of the timeline.
#[derive(Default)]
struct Counts {
    offered: AtomicU64,
    accepted: AtomicU64,
    /// 429 and 503, whatever their code.
    status_429: AtomicU64,
    status_503: AtomicU64,
    /// A 429/503 without `Retry-After` or without a problem+json `code`.
    malformed_shed: AtomicU64,
    other_status: AtomicU64,
    transport_errors: AtomicU64,
}

/// Per second since the load started.
#[derive(Default)]
struct Second {
    by_intended: Counts,
    /// Terminal statuses read in this second (throughput).
    terminal: AtomicU64,
    /// Latency (µs) of the admitted orders intended in this second.
    latency: Mutex<Option<Histogram<u32>>>,
    max_rss: AtomicU64,
    max_inflight: AtomicU64,
    max_client_queue: AtomicU64,
    /// Process CPU time used in this second, µs.
    cpu_us: AtomicU64,
    /// CPU time used on the machine outside this process in this second, µs
    /// (other processes and kernel threads: a busy machine shows here).
    elsewhere_us: AtomicU64,
    /// Of `cpu_us`, the load generator's threads (and its status readers).
    client_us: AtomicU64,
    shed: [AtomicU64; SHED_REASONS.len()],
}

struct Phase {
    counts: Counts,
    /// Intended send → terminal status, admitted orders, µs.
    latency: Mutex<Histogram<u64>>,
    /// Intended send → answer, by answer kind, µs.
    answer_accepted: Mutex<Histogram<u64>>,
    answer_shed: Mutex<Histogram<u64>>,
    shed_codes: DashMap<(u16, String), u64>,
}

impl Phase {
    fn new() -> Phase {
        Phase {
            counts: Counts::default(),
            latency: Mutex::new(new_histogram()),
            answer_accepted: Mutex::new(new_histogram()),
            answer_shed: Mutex::new(new_histogram()),
            shed_codes: DashMap::new(),
        }
    }
}

/// State shared by the scheduler, the connections, the status consumers
/// and the sampler. Times are nanoseconds since `t0`.
struct Shared {
    t0: Instant,
    /// When the load starts (ns since `t0`), and where each phase ends.
    load_start_ns: AtomicU64,
    phase_ends_ns: [AtomicU64; 3],
    /// Order number → intended send time (ns), until its terminal status is read.
    pending: DashMap<u64, u64>,
    /// Orders answered 202 and not yet terminal.
    admitted_open: DashMap<u64, ()>,
    phases: [Phase; 3],
    seconds: Vec<Second>,
    /// Jobs waiting for a free connection.
    client_queue: AtomicU64,
    /// Jobs queued or being sent, not yet answered.
    unanswered: AtomicU64,
    terminal_by_status: [AtomicU64; Status::ALL.len()],
    connects: AtomicU64,
    next_order: AtomicU64,
}

impl Shared {
    fn new(total_seconds: usize) -> Shared {
        Shared {
            t0: Instant::now(),
            load_start_ns: AtomicU64::new(u64::MAX),
            phase_ends_ns: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            pending: DashMap::new(),
            admitted_open: DashMap::new(),
            phases: std::array::from_fn(|_| Phase::new()),
            seconds: (0..total_seconds).map(|_| Second::default()).collect(),
            client_queue: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
            terminal_by_status: std::array::from_fn(|_| AtomicU64::new(0)),
            connects: AtomicU64::new(0),
            next_order: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// The phase of an intended send time; `None` for probes.
    fn phase(&self, intended_ns: u64) -> Option<usize> {
        if intended_ns < self.load_start_ns.load(Ordering::Relaxed) {
            return None;
        }
        self.phase_ends_ns
            .iter()
            .position(|end| intended_ns < end.load(Ordering::Relaxed))
    }

    /// The timeline second of a time, if within the timeline.
    fn second(&self, ns: u64) -> Option<&Second> {
        let start = self.load_start_ns.load(Ordering::Relaxed);
        let s = ns.checked_sub(start)? / 1_000_000_000;
        self.seconds.get(s as usize)
    }

    fn counts(&self, intended_ns: u64) -> impl Iterator<Item = &Counts> {
        let phase = self.phase(intended_ns).map(|p| &self.phases[p].counts);
        let second = self.second(intended_ns).map(|s| &s.by_intended);
        phase.into_iter().chain(second)
    }
}

/// Latencies in microseconds, up to an hour, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Per-second histograms: 2 significant digits and 32-bit counts keep the
/// bench's own memory small (it counts against the bound).
fn second_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rate > 0 && args.base_rate > 0,
        "--rate and --base-rate must be positive"
    );
    let mut server = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.server_threads {
        server.worker_threads(n);
    }
    let server = server.thread_name("server").enable_all().build()?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .thread_name(CLIENT_THREADS)
        .enable_all()
        .build()?;
    let machine = Machine::detect();
    let parent = args.data_parent.clone().unwrap_or_else(std::env::temp_dir);
    let data = tempfile::Builder::new()
        .prefix("orderflow-overload-")
        .tempdir_in(&parent)?;
    let config = bench_config(&args, data.path());
    let app = server.block_on(app::start(config.clone(), None))?;
    let result = client.block_on(run(&args, &config, &app, machine));
    server.block_on(app.shutdown())?;
    result
}

/// The configuration of record with the bench's limits, on a throw-away directory.
fn bench_config(args: &Args, dir: &Path) -> Config {
    let defaults = IntakeConfig::default();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        data_dir: dir.to_path_buf(),
        partitions: args.partitions,
        status_partitions: args.partitions,
        intake: IntakeConfig {
            max_inflight: args.max_inflight.unwrap_or(defaults.max_inflight),
            max_backlog_records: args
                .max_backlog_records
                .unwrap_or(defaults.max_backlog_records),
            max_rss_bytes: args.max_rss_mib * MIB,
        },
        ..Config::default()
    };
    if let Some(n) = args.max_remembered_orders {
        config.processor.max_remembered_orders = n;
    }
    config.gateway.latency_ms = args.gateway_latency_ms;
    config
}

async fn run(args: &Args, config: &Config, app: &App, machine: Machine) -> anyhow::Result<()> {
    let log = app.log();
    let load_s = args.warmup_seconds + args.seconds + args.recovery_seconds;
    let total_seconds = (load_s + args.drain_seconds as f64).ceil() as usize + 2;
    let shared = Arc::new(Shared::new(total_seconds));
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

    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel::<Job>();
    let jobs_rx = Arc::new(tokio::sync::Mutex::new(jobs_rx));
    let skus = Arc::new(skus);
    let connections: Vec<_> = (0..args.connections)
        .map(|_| {
            tokio::spawn(connection(
                app.addr(),
                jobs_rx.clone(),
                shared.clone(),
                skus.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while shared.connects.load(Ordering::Relaxed) < args.connections as u64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {} connections opened within {PROBE_TIMEOUT:?}",
            shared.connects.load(Ordering::Relaxed),
            args.connections
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    probe(&shared, &jobs_tx, &skus, log.partition_count(Topic::Orders)).await?;
    let rss_before = resident_bytes().unwrap_or(0);

    let start = shared.now_ns() + 100_000_000;
    shared.load_start_ns.store(start, Ordering::Relaxed);
    let phases = [
        (args.warmup_seconds, args.base_rate),
        (args.seconds, args.rate),
        (args.recovery_seconds, args.base_rate),
    ];
    let mut end = start;
    for (i, (secs, _)) in phases.iter().enumerate() {
        end += (secs * 1e9) as u64;
        shared.phase_ends_ns[i].store(end, Ordering::Relaxed);
    }
    let sampler = tokio::spawn(sample(shared.clone(), app.metrics.clone(), stop_rx.clone()));
    schedule(&shared, &jobs_tx, &phases, start, args.skus).await;
    drop(jobs_tx);

    let drain_started = Instant::now();
    let deadline = drain_started + Duration::from_secs(args.drain_seconds);
    let open = || shared.unanswered.load(Ordering::Relaxed) > 0 || !shared.admitted_open.is_empty();
    while open() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained_s = drain_started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for c in connections {
        c.await?;
    }
    for c in consumers {
        c.await?;
    }
    sampler.await?;
    let incomplete = record_incomplete(&shared);
    let report = Report {
        args,
        config,
        machine,
        shared: &shared,
        metrics: &app.metrics,
        rss_before,
        drained_s,
        incomplete,
    };
    report.print();
    Ok(())
}

fn sku_names(n: u32) -> Vec<String> {
    (0..n).map(|i| format!("SKU-{i:05}")).collect()
}

/// Sets every SKU's stock through the log, one append per partition (the
/// orders of a SKU come after it on the same partition).
async fn load_stock(log: &dyn Log, skus: &[String]) -> anyhow::Result<()> {
    let partitions = log.partition_count(Topic::Orders);
    let mut batches: Vec<Vec<Record>> = vec![Vec::new(); partitions as usize];
    for sku in skus {
        let body = Message::SetStock {
            sku: sku.clone(),
            available: STOCK_PER_SKU,
        };
        batches[partition_for_key(sku.as_bytes(), partitions) as usize].push(Record {
            kind: RecordKind::Internal,
            key: sku.as_bytes().to_vec(),
            value: Envelope::new(None, body).encode(),
        });
    }
    for (p, records) in batches.into_iter().enumerate() {
        if !records.is_empty() {
            log.append(Topic::Orders, p as u32, records).await?;
        }
    }
    Ok(())
}

/// One order per partition over HTTP, then waits until all are terminal:
/// proves intake, every runner and the status path work before any load.
async fn probe(
    shared: &Shared,
    jobs: &mpsc::UnboundedSender<Job>,
    skus: &[String],
    partitions: u32,
) -> anyhow::Result<()> {
    let mut first_sku: Vec<Option<u32>> = vec![None; partitions as usize];
    for (i, sku) in skus.iter().enumerate() {
        first_sku[partition_for_key(sku.as_bytes(), partitions) as usize].get_or_insert(i as u32);
    }
    let probes: Vec<u32> = first_sku.into_iter().flatten().collect();
    for &sku in &probes {
        send_job(shared, jobs, shared.now_ns(), sku);
    }
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while (shared.terminal_by_status.iter())
        .map(|c| c.load(Ordering::Relaxed))
        .sum::<u64>()
        < probes.len() as u64
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} probe orders did not all finish within {PROBE_TIMEOUT:?}; {} still pending",
            probes.len(),
            shared.pending.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn send_job(shared: &Shared, jobs: &mpsc::UnboundedSender<Job>, intended_ns: u64, sku: u32) {
    let n = shared.next_order.fetch_add(1, Ordering::Relaxed);
    shared.client_queue.fetch_add(1, Ordering::Relaxed);
    shared.unanswered.fetch_add(1, Ordering::Relaxed);
    let _ = jobs.send(Job {
        n,
        intended_ns,
        sku,
    });
}

/// Open loop: queues every request at its intended time, phase by phase,
/// whatever became of the earlier ones.
async fn schedule(
    shared: &Shared,
    jobs: &mpsc::UnboundedSender<Job>,
    phases: &[(f64, u64)],
    start_ns: u64,
    skus: u32,
) {
    let mut rng = StdRng::seed_from_u64(42);
    let mut phase_start = start_ns;
    for &(secs, rate) in phases {
        let phase_end = phase_start + (secs * 1e9) as u64;
        let mut k: u64 = 0;
        loop {
            let intended = phase_start + (u128::from(k) * 1_000_000_000 / u128::from(rate)) as u64;
            if intended >= phase_end {
                break;
            }
            let now = shared.now_ns();
            if intended > now {
                let wait = Duration::from_nanos(intended - now).max(Duration::from_millis(1));
                tokio::time::sleep(wait).await;
            }
            // Everything due by now goes out at once: a late wake-up is
            // latency, never a lower offered rate.
            let now = shared.now_ns();
            loop {
                let intended =
                    phase_start + (u128::from(k) * 1_000_000_000 / u128::from(rate)) as u64;
                if intended > now || intended >= phase_end {
                    break;
                }
                for c in shared.counts(intended) {
                    c.offered.fetch_add(1, Ordering::Relaxed);
                }
                send_job(shared, jobs, intended, rng.random_range(0..skus));
                k += 1;
            }
        }
        phase_start = phase_end;
    }
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr, shared: &Shared) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    shared.connects.fetch_add(1, Ordering::Relaxed);
    Ok(sender)
}

/// One keep-alive connection: takes the next due request from the shared
/// queue, sends it, records the answer; reconnects after an error.
async fn connection(
    addr: SocketAddr,
    jobs: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Job>>>,
    shared: Arc<Shared>,
    skus: Arc<Vec<String>>,
) {
    // Connected before the load starts, so the warm-up does not measure
    // hundreds of handshakes at once.
    let mut sender = connect(addr, &shared).await.ok();
    loop {
        let job = { jobs.lock().await.recv().await };
        let Some(job) = job else { return };
        shared.client_queue.fetch_sub(1, Ordering::Relaxed);
        shared.pending.insert(job.n, job.intended_ns);
        match send(addr, &mut sender, &shared, &skus, job).await {
            Ok(answer) => on_answer(&shared, job, answer),
            Err(_) => {
                sender = None;
                // The order may or may not have been taken: it stays
                // pending, and counts only if its terminal status comes.
                for c in shared.counts(job.intended_ns) {
                    c.transport_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        shared.unanswered.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Answer {
    status: StatusCode,
    retry_after: bool,
    problem_json: bool,
    body: Bytes,
    at_ns: u64,
}

async fn send(
    addr: SocketAddr,
    sender: &mut Option<Sender>,
    shared: &Shared,
    skus: &[String],
    job: Job,
) -> anyhow::Result<Answer> {
    // A kept-alive connection the server has closed fails `ready` before
    // anything is sent: reconnect once, so that is not a failed request.
    for attempt in 0..2 {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            *sender = Some(connect(addr, shared).await?);
        }
        match sender.as_mut().expect("connected above").ready().await {
            Ok(()) => break,
            Err(e) if attempt == 1 => return Err(e.into()),
            Err(_) => *sender = None,
        }
    }
    let s = sender.as_mut().expect("ready above");
    let body = format!(
        r#"{{"order_id":"{ORDER_ID_PREFIX}{}","customer_id":"c-{}","currency":"USD","lines":[{{"sku":"{}","quantity":1,"unit_price":1999}}],"payment":{{"token":"tok_visa"}}}}"#,
        job.n,
        job.n % 10_000,
        skus[job.sku as usize]
    );
    let req = Request::post("/v1/orders")
        .header(header::HOST, addr.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let res = s.send_request(req).await?;
    let status = res.status();
    let retry_after = res.headers().contains_key(header::RETRY_AFTER);
    let problem_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    let body = res.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        retry_after,
        problem_json,
        body,
        at_ns: shared.now_ns(),
    })
}

fn record(h: &Mutex<Histogram<u64>>, us: u64) {
    h.lock().expect("histogram lock").saturating_record(us);
}

fn on_answer(shared: &Shared, job: Job, a: Answer) {
    let phase = shared.phase(job.intended_ns).map(|p| &shared.phases[p]);
    let waited_us = a.at_ns.saturating_sub(job.intended_ns) / 1_000;
    match a.status {
        StatusCode::ACCEPTED => {
            // The terminal status may have been read already.
            if shared.pending.contains_key(&job.n) {
                shared.admitted_open.insert(job.n, ());
                if !shared.pending.contains_key(&job.n) {
                    shared.admitted_open.remove(&job.n);
                }
            }
            for c in shared.counts(job.intended_ns) {
                c.accepted.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(p) = phase {
                record(&p.answer_accepted, waited_us);
            }
        }
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            shared.pending.remove(&job.n);
            let code = serde_json::from_slice::<serde_json::Value>(&a.body)
                .ok()
                .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_owned));
            let well_formed = a.retry_after && a.problem_json && code.is_some();
            for c in shared.counts(job.intended_ns) {
                let n = if a.status == StatusCode::TOO_MANY_REQUESTS {
                    &c.status_429
                } else {
                    &c.status_503
                };
                n.fetch_add(1, Ordering::Relaxed);
                if !well_formed {
                    c.malformed_shed.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(p) = phase {
                record(&p.answer_shed, waited_us);
                *p.shed_codes
                    .entry((a.status.as_u16(), code.unwrap_or_else(|| "?".into())))
                    .or_insert(0) += 1;
            }
        }
        other => {
            shared.pending.remove(&job.n);
            for c in shared.counts(job.intended_ns) {
                c.other_status.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(p) = phase {
                *p.shed_codes
                    .entry((other.as_u16(), String::from_utf8_lossy(&a.body).into()))
                    .or_insert(0) += 1;
            }
        }
    }
}

/// Reads one `order-status` partition from the start until `stop`, and
/// records each order's latency when its terminal status is read.
async fn consume_statuses(
    log: Arc<dyn Log>,
    partition: u32,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
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
                return;
            }
        };
        let now = shared.now_ns();
        for r in records {
            next = r.offset + 1;
            match StatusEvent::decode(&r.value) {
                Ok(event) if event.status.is_terminal() => on_terminal(&shared, &event, now),
                Ok(_) => {}
                Err(e) => eprintln!("undecodable status at order-status/{partition}: {e}"),
            }
        }
    }
}

fn on_terminal(shared: &Shared, event: &StatusEvent, now_ns: u64) {
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
    shared.admitted_open.remove(&n);
    let i = Status::ALL
        .iter()
        .position(|s| *s == event.status)
        .expect("listed status");
    shared.terminal_by_status[i].fetch_add(1, Ordering::Relaxed);
    if let Some(s) = shared.second(now_ns) {
        s.terminal.fetch_add(1, Ordering::Relaxed);
    }
    let us = now_ns.saturating_sub(intended) / 1_000;
    if let Some(p) = shared.phase(intended) {
        record(&shared.phases[p].latency, us);
    }
    if let Some(s) = shared.second(intended) {
        s.latency
            .lock()
            .expect("histogram lock")
            .get_or_insert_with(second_histogram)
            .saturating_record(us);
    }
}

/// Admitted orders still open after the drain: recorded at their age, a
/// lower bound, so they raise the tail instead of vanishing from it.
fn record_incomplete(shared: &Shared) -> u64 {
    let now = shared.now_ns();
    let mut n = 0;
    for e in shared.admitted_open.iter() {
        if let Some(intended) = shared.pending.get(e.key()).map(|v| *v)
            && let Some(p) = shared.phase(intended)
        {
            record(
                &shared.phases[p].latency,
                now.saturating_sub(intended) / 1_000,
            );
            n += 1;
        }
    }
    n
}

/// Samples RSS, intake's in-flight orders and the client queue every
/// [`SAMPLE_EVERY`], and per second the process CPU time and shed counters.
async fn sample(shared: Arc<Shared>, metrics: Arc<Metrics>, stop: watch::Receiver<bool>) {
    let shed_total = |metrics: &Metrics| -> [u64; SHED_REASONS.len()] {
        SHED_REASONS.map(|r| metrics.intake_shed.with_label_values(&[r]).get())
    };
    let mut last_second: Option<usize> = None;
    let mut last_cpu = rusage().0;
    let mut last_machine = MachineCpu::read().busy;
    let mut last_client = threads_cpu(CLIENT_THREADS);
    let mut last_shed = shed_total(&metrics);
    let start = shared.load_start_ns.load(Ordering::Relaxed);
    while !*stop.borrow() {
        let now = shared.now_ns();
        if now >= start {
            let idx = ((now - start) / 1_000_000_000) as usize;
            if let Some(s) = shared.seconds.get(idx) {
                let rss = resident_bytes().unwrap_or(0);
                s.max_rss.fetch_max(rss, Ordering::Relaxed);
                let inflight = metrics.intake_inflight.get().max(0) as u64;
                s.max_inflight.fetch_max(inflight, Ordering::Relaxed);
                s.max_client_queue.fetch_max(
                    shared.client_queue.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                if last_second != Some(idx) {
                    // Charged to the second that just ended.
                    let cpu = rusage().0;
                    let machine = MachineCpu::read().busy;
                    let client = threads_cpu(CLIENT_THREADS);
                    let shed = shed_total(&metrics);
                    if let Some(prev) = last_second.and_then(|p| shared.seconds.get(p)) {
                        let own = cpu.saturating_sub(last_cpu);
                        prev.cpu_us.store(own.as_micros() as u64, Ordering::Relaxed);
                        prev.client_us.store(
                            client.saturating_sub(last_client).as_micros() as u64,
                            Ordering::Relaxed,
                        );
                        prev.elsewhere_us.store(
                            machine
                                .saturating_sub(last_machine)
                                .saturating_sub(own)
                                .as_micros() as u64,
                            Ordering::Relaxed,
                        );
                        for (i, v) in shed.iter().enumerate() {
                            prev.shed[i].store(v - last_shed[i], Ordering::Relaxed);
                        }
                    }
                    last_cpu = cpu;
                    last_machine = machine;
                    last_client = client;
                    last_shed = shed;
                    last_second = Some(idx);
                }
            }
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// CPU time of this process's threads whose name starts with `prefix`
/// (from /proc/self/task/*/stat: utime and stime, fields 14 and 15).
fn threads_cpu(prefix: &str) -> Duration {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ...`: the name may hold spaces, not `)`.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After `)`, field 3 (state) is index 0, so 14 and 15 are 11 and 12.
        let at = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks += at(11) + at(12);
    }
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / hz)
}

struct Report<'a> {
    args: &'a Args,
    config: &'a Config,
    machine: Machine,
    shared: &'a Shared,
    metrics: &'a Metrics,
    rss_before: u64,
    drained_s: f64,
    incomplete: u64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

impl Report<'_> {
    fn print(&self) {
        let (a, m, c) = (self.args, &self.machine, &self.config.intake);
        println!();
        println!(
            "orderflow overload benchmark (HTTP intake, open loop), {}",
            m.date
        );
        println!(
            "  machine   {} | {} cores | {:.1} GiB RAM",
            m.cpu, m.cores, m.memory_gib
        );
        println!(
            "  config    {} partitions, fsync on, {} SKUs, {} connections, intake.max_inflight {}, intake.max_backlog_records {}, intake.max_rss_bytes {} MiB, processor.max_remembered_orders {}",
            a.partitions,
            a.skus,
            a.connections,
            c.max_inflight,
            c.max_backlog_records,
            c.max_rss_bytes / MIB,
            self.config.processor.max_remembered_orders
        );
        println!(
            "  phases    warm-up {} s at {}/s, overload {} s at {}/s, recovery {} s at {}/s",
            a.warmup_seconds, a.base_rate, a.seconds, a.rate, a.recovery_seconds, a.base_rate
        );
        let mut json_phases = Vec::new();
        for (i, name) in PHASES.iter().enumerate() {
            json_phases.push(self.print_phase(i, name));
        }
        let max_rss = self
            .shared
            .seconds
            .iter()
            .map(|s| s.max_rss.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        println!(
            "  memory    RSS before load {} MiB, max {} MiB, bound {}",
            self.rss_before / MIB,
            max_rss / MIB,
            if c.max_rss_bytes == 0 {
                "none".to_owned()
            } else {
                format!("{} MiB", c.max_rss_bytes / MIB)
            }
        );
        let shed: Vec<String> = SHED_REASONS
            .iter()
            .map(|r| {
                format!(
                    "{r}={}",
                    self.metrics.intake_shed.with_label_values(&[r]).get()
                )
            })
            .collect();
        println!(
            "  shed      orderflow_intake_shed_total: {}",
            shed.join(" ")
        );
        println!(
            "  drain     {} admitted orders never finished; drained in {:.2} s; {} connections opened",
            self.incomplete,
            self.drained_s,
            self.shared.connects.load(Ordering::Relaxed)
        );
        let terminal: Vec<String> = Status::ALL
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_terminal())
            .map(|(i, s)| {
                format!(
                    "{s}={}",
                    self.shared.terminal_by_status[i].load(Ordering::Relaxed)
                )
            })
            .collect();
        println!("  terminal  {}", terminal.join(" "));
        let (first, stable) = self.recovery();
        let after = |s: Option<u64>| s.map_or("never".to_owned(), |s| format!("{s} s"));
        println!(
            "  recovery  a second admitted >= {:.0} % with p99 <= {}x the warm-up's p99: first {} after the overload, every one from {} on",
            a.recovered_admitted * 100.0,
            a.recovered_p99_factor,
            after(first),
            after(stable)
        );
        self.print_timeline();
        println!(
            "{}",
            serde_json::json!({
                "bench": "overload",
                "date": m.date,
                "cpu": m.cpu,
                "cores": m.cores,
                "base_rate": a.base_rate,
                "rate": a.rate,
                "seconds": a.seconds,
                "connections": a.connections,
                "max_inflight": c.max_inflight,
                "max_backlog_records": c.max_backlog_records,
                "max_rss_mib": c.max_rss_bytes / MIB,
                "max_rss_seen_mib": max_rss / MIB,
                "phases": json_phases,
                "recovery_first_s": first,
                "recovery_stable_s": stable,
                "incomplete": self.incomplete,
            })
        );
    }

    fn print_phase(&self, i: usize, name: &str) -> serde_json::Value {
        let p = &self.shared.phases[i];
        let secs = [
            self.args.warmup_seconds,
            self.args.seconds,
            self.args.recovery_seconds,
        ][i];
        let n = |x: &AtomicU64| x.load(Ordering::Relaxed);
        let c = &p.counts;
        let offered = n(&c.offered);
        let accepted = n(&c.accepted);
        let shed = n(&c.status_429) + n(&c.status_503);
        let lat = p.latency.lock().expect("histogram lock");
        let acc = p.answer_accepted.lock().expect("histogram lock");
        let shd = p.answer_shed.lock().expect("histogram lock");
        let pct = |x: u64| 100.0 * x as f64 / offered.max(1) as f64;
        println!(
            "  {name:<9} offered {offered} ({:.0}/s) | 202 {accepted} ({:.0}/s, {:.1} %) | shed {shed} ({:.1} %: 429 {}, 503 {}; {} without Retry-After or problem code) | other {} | transport errors {}",
            offered as f64 / secs,
            accepted as f64 / secs,
            pct(accepted),
            pct(shed),
            n(&c.status_429),
            n(&c.status_503),
            n(&c.malformed_shed),
            n(&c.other_status),
            n(&c.transport_errors),
        );
        println!(
            "            admitted -> terminal p50 {:.1} ms | p99 {:.1} ms | p99.9 {:.1} ms | max {:.1} ms ({} orders); 202 answered p50 {:.1} / p99 {:.1} ms; shed answered p50 {:.1} / p99 {:.1} ms",
            ms(lat.value_at_quantile(0.5)),
            ms(lat.value_at_quantile(0.99)),
            ms(lat.value_at_quantile(0.999)),
            ms(lat.max()),
            lat.len(),
            ms(acc.value_at_quantile(0.5)),
            ms(acc.value_at_quantile(0.99)),
            ms(shd.value_at_quantile(0.5)),
            ms(shd.value_at_quantile(0.99)),
        );
        let (from, to) = self.phase_seconds(i);
        let busy = |f: fn(&Second) -> &AtomicU64| {
            let secs = self.shared.seconds.get(from..to).unwrap_or_default();
            secs.iter().map(|s| n(f(s))).sum::<u64>() as f64 / 1e6 / secs.len().max(1) as f64
        };
        let (own, client, other) = (
            busy(|s| &s.cpu_us),
            busy(|s| &s.client_us),
            busy(|s| &s.elsewhere_us),
        );
        let peak_rss = (from..to)
            .filter_map(|i| self.shared.seconds.get(i))
            .map(|s| n(&s.max_rss))
            .max()
            .unwrap_or(0);
        println!(
            "            cores     this process {own:.2} (of which the load generator {client:.2}), rest of the machine {other:.2}; max RSS {} MiB",
            peak_rss / MIB
        );
        let mut codes: Vec<String> = p
            .shed_codes
            .iter()
            .map(|e| format!("{} {}: {}", e.key().0, e.key().1, e.value()))
            .collect();
        codes.sort();
        if !codes.is_empty() {
            println!("            answers   {}", codes.join(", "));
        }
        serde_json::json!({
            "phase": name,
            "offered": offered,
            "accepted": accepted,
            "status_429": n(&c.status_429),
            "status_503": n(&c.status_503),
            "other": n(&c.other_status),
            "transport_errors": n(&c.transport_errors),
            "p50_ms": ms(lat.value_at_quantile(0.5)),
            "p99_ms": ms(lat.value_at_quantile(0.99)),
            "p999_ms": ms(lat.value_at_quantile(0.999)),
            "max_ms": ms(lat.max()),
            "cores": own,
            "client_cores": client,
            "other_cores": other,
            "max_rss_mib": peak_rss / MIB,
        })
    }

    /// Timeline seconds `[from, to)` of phase `i`.
    fn phase_seconds(&self, i: usize) -> (usize, usize) {
        let a = self.args;
        let ends = [
            a.warmup_seconds,
            a.warmup_seconds + a.seconds,
            a.warmup_seconds + a.seconds + a.recovery_seconds,
        ];
        let from = if i == 0 { 0.0 } else { ends[i - 1] };
        (from.ceil() as usize, ends[i].floor() as usize)
    }

    /// Whole seconds from the overload's end to the first recovered second,
    /// and to the first second from which every second of the recovery
    /// phase is recovered.
    fn recovery(&self) -> (Option<u64>, Option<u64>) {
        let a = self.args;
        let warmup_p99 = self.shared.phases[0]
            .latency
            .lock()
            .expect("histogram lock")
            .value_at_quantile(0.99);
        let limit = (warmup_p99 as f64 * a.recovered_p99_factor) as u64;
        let (from, to) = self.phase_seconds(2);
        let ok = |s: &Second| {
            let offered = s.by_intended.offered.load(Ordering::Relaxed);
            let accepted = s.by_intended.accepted.load(Ordering::Relaxed);
            let p99 = s
                .latency
                .lock()
                .expect("histogram lock")
                .as_ref()
                .map_or(u64::MAX, |h| h.value_at_quantile(0.99));
            offered > 0 && accepted as f64 >= a.recovered_admitted * offered as f64 && p99 <= limit
        };
        let Some(seconds) = self.shared.seconds.get(from..to) else {
            return (None, None);
        };
        let first = seconds.iter().position(ok).map(|i| i as u64);
        let stable = match seconds.iter().rposition(|s| !ok(s)) {
            None => Some(0),
            Some(i) if i + 1 < seconds.len() => Some(i as u64 + 1),
            Some(_) => None,
        };
        (first, stable)
    }

    fn print_timeline(&self) {
        println!(
            "  timeline  (s = second of intended send time; term/s by completion; RSS, intake in-flight and client queue are maxima; cores = this process, other = the rest of the machine)"
        );
        println!(
            "    {:>4} {:>6} {:>6} {:>6} {:>6} {:>5} {:>8} {:>9} {:>9} {:>7} {:>8} {:>8} {:>6} {:>6}  shed by reason (inflight/backlog/memory/log_full)",
            "s",
            "offer",
            "202",
            "429",
            "503",
            "err",
            "term/s",
            "p50 ms",
            "p99 ms",
            "RSS MiB",
            "inflight",
            "queue",
            "cores",
            "other"
        );
        let end = (self.args.warmup_seconds
            + self.args.seconds
            + self.args.recovery_seconds
            + self.drained_s)
            .ceil() as usize;
        for (i, s) in self.shared.seconds.iter().enumerate().take(end) {
            let n = |x: &AtomicU64| x.load(Ordering::Relaxed);
            let c = &s.by_intended;
            let (p50, p99) = s
                .latency
                .lock()
                .expect("histogram lock")
                .as_ref()
                .map_or((0.0, 0.0), |h| {
                    (ms(h.value_at_quantile(0.5)), ms(h.value_at_quantile(0.99)))
                });
            let shed: Vec<String> = s.shed.iter().map(|x| n(x).to_string()).collect();
            println!(
                "    {:>4} {:>6} {:>6} {:>6} {:>6} {:>5} {:>8} {:>9.1} {:>9.1} {:>7} {:>8} {:>8} {:>6.2} {:>6.2}  {}",
                i,
                n(&c.offered),
                n(&c.accepted),
                n(&c.status_429),
                n(&c.status_503),
                n(&c.transport_errors) + n(&c.other_status),
                n(&s.terminal),
                p50,
                p99,
                n(&s.max_rss) / MIB,
                n(&s.max_inflight),
                n(&s.max_client_queue),
                n(&s.cpu_us) as f64 / 1e6,
                n(&s.elsewhere_us) as f64 / 1e6,
                shed.join("/")
            );
        }
    }
}
