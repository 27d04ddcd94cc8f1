//! The load driver: offers a workload's orders to a running `App` straight
//! through its `orders` log (as an upstream producer would) and times each
//! order until its terminal status appears on `order-status`.
//!
//! Open loop at `rate` orders/s: order `k` has the intended send time
//! `start + k / rate`, and latency is measured from that time, so a stalled
//! producer or a full log queue shows up as latency instead of silently
//! lowering the offered load (coordinated omission). Rate 0 is saturation:
//! keep `max_inflight` orders outstanding, which finds the highest rate the
//! pipeline sustains; its latency is then closed-loop queueing time.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use hdrhistogram::Histogram;
use tokio::sync::watch;

use super::workload::{OrderSpec, Workload, order_json};
use crate::domain::{Envelope, Message, Status, StatusEvent};
use crate::pipeline::log::{Log, LogError, Record, RecordKind, Topic, partition_for_key};

/// How long the start-up probe orders may take to reach a terminal status.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Records per status read, and how long a read waits for new ones.
const STATUS_READ_BATCH: usize = 4096;
const STATUS_READ_WAIT: Duration = Duration::from_millis(50);
/// Back-off when the log's append queue is full.
const FULL_BACKOFF: Duration = Duration::from_millis(1);
/// Order ids are `b-{n}`; the number keys the pending map.
pub const ORDER_ID_PREFIX: &str = "b-";
/// Longest run the per-second timeline covers (warm-up + measured + drain).
const TIMELINE_LIMIT_S: usize = 3_600;

/// How the driver offers load.
#[derive(Clone, Debug)]
pub struct DriveOptions {
    /// Orders/s; 0 = saturation.
    pub rate: u64,
    pub warmup: Duration,
    pub window: Duration,
    pub max_inflight: u64,
    pub linger: Duration,
    pub drain: Duration,
}

/// Latencies in microseconds, up to an hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Latencies of one second of the timeline: 2 significant digits keep an
/// hour of them small.
fn new_second_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
}

/// State shared by the producer, the status consumers and the main task.
/// Times are nanoseconds since `t0`, so they fit in atomics and map values.
pub struct Shared {
    t0: Instant,
    /// Order number → intended send time, until its terminal status is read.
    pending: DashMap<u64, u64>,
    /// Measurement window `[start, end)` of intended send times; orders
    /// outside it are processed but not recorded.
    window_start: AtomicU64,
    window_end: AtomicU64,
    pub sent: AtomicU64,
    pub terminal: AtomicU64,
    /// Terminal statuses by kind, indexed like `Status::ALL`.
    by_status: [AtomicU64; Status::ALL.len()],
    /// Times an append was refused with `Full` and retried.
    pub full_retries: AtomicU64,
    /// Orders whose append failed for good (never counted as done).
    pub lost: AtomicU64,
    /// Per second of completion time since `t0`: terminal orders' latency.
    timeline: Mutex<Vec<Histogram<u64>>>,
}

impl Shared {
    pub fn new() -> Shared {
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
            timeline: Mutex::new(Vec::new()),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn in_window(&self, intended_ns: u64) -> bool {
        (self.window_start.load(Ordering::Relaxed)..self.window_end.load(Ordering::Relaxed))
            .contains(&intended_ns)
    }

    pub fn status_count(&self, status: Status) -> u64 {
        self.by_status[status_index(status)].load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u64 {
        self.pending.len() as u64
    }

    /// Terminal counts by status, as `status=count` pairs.
    pub fn status_counts(&self) -> Vec<(Status, u64)> {
        Status::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| (*s, self.status_count(*s)))
            .collect()
    }

    /// Latencies of the orders that finished in each second since `t0`.
    pub fn take_timeline(&self) -> Vec<Histogram<u64>> {
        std::mem::take(&mut *self.timeline.lock().expect("timeline lock"))
    }

    fn record_seconds(&self, samples: &[(usize, u64)]) {
        let mut timeline = self.timeline.lock().expect("timeline lock");
        for &(second, latency_us) in samples {
            if second >= TIMELINE_LIMIT_S {
                continue;
            }
            if timeline.len() <= second {
                timeline.resize_with(second + 1, new_second_histogram);
            }
            timeline[second].saturating_record(latency_us);
        }
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

fn status_index(status: Status) -> usize {
    Status::ALL
        .iter()
        .position(|s| *s == status)
        .expect("listed status")
}

/// Sets every SKU's stock through the log, one append per partition. The
/// orders for a SKU go to the same partition after it, so the processor
/// applies the stock before the first order without any waiting here.
pub async fn load_stock(log: &dyn Log, skus: &[String], available: u64) -> anyhow::Result<()> {
    let partitions = log.partition_count(Topic::Orders);
    let mut batches: Vec<Vec<Record>> = vec![Vec::new(); partitions as usize];
    for sku in skus {
        let body = Message::SetStock {
            sku: sku.clone(),
            available,
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

/// One approved single-line order per `orders` partition that has a SKU,
/// then waits until all are terminal: proves every runner, the effect
/// executor and the status path work before any load is offered. Returns
/// how many were sent (each bought one unit, a flash sale's included).
pub async fn probe(log: &dyn Log, shared: &Shared, skus: &[String]) -> anyhow::Result<u64> {
    let partitions = log.partition_count(Topic::Orders);
    let mut per_partition: Vec<Option<u32>> = vec![None; partitions as usize];
    for (i, sku) in skus.iter().enumerate() {
        per_partition[partition_for_key(sku.as_bytes(), partitions) as usize]
            .get_or_insert(i as u32);
    }
    let specs: Vec<OrderSpec> = per_partition
        .into_iter()
        .flatten()
        .map(|sku| OrderSpec {
            n: shared.sent.fetch_add(1, Ordering::Relaxed),
            lines: vec![(sku, 1)],
            decline: false,
        })
        .collect();
    let probes = specs.len() as u64;
    for spec in &specs {
        shared.pending.insert(spec.n, shared.now_ns());
    }
    let batches = group_by_partition(specs, skus, partitions);
    futures::future::try_join_all(batches.iter().map(|(p, b)| append_orders(log, *p, b, skus)))
        .await?;

    let deadline = Instant::now() + PROBE_TIMEOUT;
    while !shared.pending.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let terminal = shared.terminal.load(Ordering::Relaxed);
    if terminal != probes {
        let stuck: Vec<u64> = shared.pending.iter().map(|e| *e.key()).collect();
        anyhow::bail!(
            "pipeline check failed: {terminal} of {probes} probe orders terminal within {PROBE_TIMEOUT:?}; \
             terminal by status: {:?}; still without a terminal status: {stuck:?}",
            shared.status_counts()
        );
    }
    Ok(probes)
}

/// What a run measured between the end of the warm-up and the end of the load.
pub struct Window<S> {
    pub before: S,
    pub after: S,
    pub offered: u64,
    pub backlog_at_end: u64,
    pub drained_s: f64,
}

/// Drives the load; `sample` is taken at both edges of the window.
pub async fn drive<S>(
    options: &DriveOptions,
    log: Arc<dyn Log>,
    shared: &Arc<Shared>,
    workload: Workload,
    skus: Arc<Vec<String>>,
    sample: impl Fn() -> S,
) -> Window<S> {
    let start_ns = shared.now_ns();
    let warmup_ns = options.warmup.as_nanos() as u64;
    let window_ns = options.window.as_nanos() as u64;
    let end_ns = start_ns + warmup_ns + window_ns;
    shared
        .window_start
        .store(start_ns + warmup_ns, Ordering::Relaxed);
    shared.window_end.store(end_ns, Ordering::Relaxed);
    let producer = Producer {
        options: options.clone(),
        log,
        shared: shared.clone(),
        skus,
        workload,
        start_ns,
        scheduled: 0,
        offered_in_window: 0,
    };
    let producer = tokio::spawn(producer.run());

    sleep_until_ns(shared, start_ns + warmup_ns).await;
    let before = sample();
    sleep_until_ns(shared, end_ns).await;
    let after = sample();
    let offered = producer.await.expect("producer task");
    let backlog_at_end = shared.pending.len() as u64;

    let drain_started = Instant::now();
    let deadline = drain_started + options.drain;
    while !shared.pending.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Window {
        before,
        after,
        offered,
        backlog_at_end,
        drained_s: drain_started.elapsed().as_secs_f64(),
    }
}

async fn sleep_until_ns(shared: &Shared, at_ns: u64) {
    tokio::time::sleep_until((shared.t0 + Duration::from_nanos(at_ns)).into()).await;
}

/// The load generator: its schedule position and what it offered.
struct Producer {
    options: DriveOptions,
    log: Arc<dyn Log>,
    shared: Arc<Shared>,
    skus: Arc<Vec<String>>,
    workload: Workload,
    start_ns: u64,
    /// Orders generated so far (open loop: the next slot of the schedule).
    scheduled: u64,
    offered_in_window: u64,
}

impl Producer {
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
                if self.options.rate > 0 {
                    self.tick(end_ns, now);
                }
                return self.offered_in_window;
            }
            self.tick(now, now);
            tokio::time::sleep(self.options.linger).await;
        }
    }

    /// Sends the orders due by `horizon` as one append per partition, each
    /// in its own task, so a slow append never delays the schedule.
    fn tick(&mut self, horizon: u64, now: u64) {
        let due = self.due_orders(horizon - self.start_ns);
        let slots = self.scheduled..self.scheduled + due;
        let specs: Vec<OrderSpec> = slots.map(|k| self.order(k, now)).collect();
        self.scheduled += due;
        let partitions = self.log.partition_count(Topic::Orders);
        for (p, batch) in group_by_partition(specs, &self.skus, partitions) {
            let (log, shared, skus) = (self.log.clone(), self.shared.clone(), self.skus.clone());
            tokio::spawn(async move { send_batch(log.as_ref(), &shared, p, batch, &skus).await });
        }
    }

    /// Orders to send now: those whose intended time has come (open loop),
    /// or enough to refill the in-flight limit (saturation).
    fn due_orders(&self, elapsed_ns: u64) -> u64 {
        let rate = self.options.rate;
        if rate == 0 {
            return self
                .options
                .max_inflight
                .saturating_sub(self.shared.in_flight());
        }
        let due_total = (u128::from(elapsed_ns) * u128::from(rate) / 1_000_000_000) as u64 + 1;
        due_total.saturating_sub(self.scheduled)
    }

    /// The order of slot `k`, registered as pending with its intended send
    /// time before it is sent.
    fn order(&mut self, k: u64, now: u64) -> OrderSpec {
        // Open loop: the slot's time in the schedule. Saturation has no
        // schedule; an order is intended when it is sent.
        let intended = (u128::from(k) * 1_000_000_000)
            .checked_div(u128::from(self.options.rate))
            .map_or(now, |offset| self.start_ns + offset as u64);
        let spec = self
            .workload
            .order(self.shared.sent.fetch_add(1, Ordering::Relaxed));
        self.shared.pending.insert(spec.n, intended);
        self.offered_in_window += u64::from(self.shared.in_window(intended));
        spec
    }
}

fn group_by_partition(
    specs: Vec<OrderSpec>,
    skus: &[String],
    partitions: u32,
) -> Vec<(u32, Vec<OrderSpec>)> {
    let mut batches: Vec<Vec<OrderSpec>> = vec![Vec::new(); partitions as usize];
    for spec in specs {
        let key = skus[spec.key_sku() as usize].as_bytes();
        batches[partition_for_key(key, partitions) as usize].push(spec);
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
        match append_orders(log, partition, &batch, skus).await {
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

/// Encodes the contract's order JSON and appends it. Records are built per
/// attempt so a retry needs no copy of the bytes.
async fn append_orders(
    log: &dyn Log,
    partition: u32,
    batch: &[OrderSpec],
    skus: &[String],
) -> Result<u64, LogError> {
    let records = batch
        .iter()
        .map(|spec| Record {
            kind: RecordKind::OrderJson,
            key: skus[spec.key_sku() as usize].as_bytes().to_vec(),
            value: order_json(ORDER_ID_PREFIX, spec, skus).into_bytes(),
        })
        .collect();
    log.append(Topic::Orders, partition, records).await
}

/// Starts one status consumer per `order-status` partition; each returns
/// the latency histogram of the measured orders it saw finish.
pub fn spawn_consumers(
    log: &Arc<dyn Log>,
    shared: &Arc<Shared>,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<Histogram<u64>>> {
    (0..log.partition_count(Topic::OrderStatus))
        .map(|p| {
            tokio::spawn(consume_statuses(
                log.clone(),
                p,
                shared.clone(),
                stop.clone(),
            ))
        })
        .collect()
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
    let mut seconds = Vec::new();
    let mut next = 0;
    while !*stop.borrow() {
        let read = log.read(
            Topic::OrderStatus,
            partition,
            next,
            STATUS_READ_BATCH,
            STATUS_READ_WAIT,
        );
        let records = match read.await {
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
                    if let Some(us) = on_terminal(&shared, &event, now, &mut latency) {
                        seconds.push(((now / 1_000_000_000) as usize, us));
                    }
                }
                Ok(_) => {}
                Err(e) => eprintln!(
                    "undecodable status at order-status/{partition}@{}: {e}",
                    r.offset
                ),
            }
        }
        shared.record_seconds(&seconds);
        seconds.clear();
    }
    latency
}

/// Counts a terminal status once per order; returns its latency in µs.
fn on_terminal(
    shared: &Shared,
    event: &StatusEvent,
    now_ns: u64,
    latency: &mut Histogram<u64>,
) -> Option<u64> {
    let n = event
        .order_id
        .strip_prefix(ORDER_ID_PREFIX)
        .and_then(|n| n.parse::<u64>().ok())?;
    // Removing dedupes: a replayed terminal status finds nothing.
    let (_, intended) = shared.pending.remove(&n)?;
    shared.terminal.fetch_add(1, Ordering::Relaxed);
    shared.by_status[status_index(event.status)].fetch_add(1, Ordering::Relaxed);
    let us = now_ns.saturating_sub(intended) / 1_000;
    if shared.in_window(intended) {
        latency.saturating_record(us);
    }
    Some(us)
}

/// Measured orders still without a terminal status after the drain: each
/// is recorded with its age at that moment, a lower bound on its latency,
/// so they raise the tail instead of vanishing from it.
pub fn record_incomplete(shared: &Shared, latency: &mut Histogram<u64>) -> u64 {
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
