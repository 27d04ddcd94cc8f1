//! The same workload, the same schedule, against the PostgreSQL baseline
//! (`postgres.rs`): what teams build instead. Open loop at the same rate
//! (latency from each order's intended time, so a saturated database shows
//! up as latency, not as a lower offered load), or closed loop with every
//! connection busy at rate 0.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Mutex, mpsc};

use super::driver::{DriveOptions, ORDER_ID_PREFIX, new_histogram};
use super::postgres::{PgOrder, PgOutcome, PostgresTarget};
use super::report::Percentiles;
use super::workload::{OrderSpec, Workload, WorkloadSpec};

/// What the baseline achieved, in the report's terms.
#[derive(Serialize, Debug)]
pub struct BaselineResult {
    pub system: &'static str,
    pub connections: usize,
    pub offered_rate: f64,
    pub achieved_rate: f64,
    pub latency: Percentiles,
    pub outcomes: BTreeMap<String, u64>,
    /// Measured orders not finished by the drain deadline.
    pub incomplete: u64,
    /// Stock conserved: available + sold equals the stock set.
    pub stock_conserved: bool,
}

/// The run's clock and counters, shared by the producer and the workers.
struct Clock {
    t0: Instant,
    window: std::ops::Range<u64>,
    end_ns: u64,
    completed_in_window: AtomicU64,
    offered_in_window: AtomicU64,
}

impl Clock {
    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
}

/// One worker's share of the results.
struct WorkerResult {
    latency: Histogram<u64>,
    outcomes: [u64; 3],
}

/// Runs `spec` against PostgreSQL at `url` with `connections` connections.
pub async fn run(
    url: &str,
    connections: usize,
    options: &DriveOptions,
    spec: &WorkloadSpec,
) -> anyhow::Result<BaselineResult> {
    let target = Arc::new(PostgresTarget::connect(url, connections).await?);
    let skus = Arc::new(spec.sku_names());
    target.setup(&skus, spec.stock_per_sku()).await?;
    let t0 = Instant::now();
    let warmup_ns = options.warmup.as_nanos() as u64;
    let end_ns = warmup_ns + options.window.as_nanos() as u64;
    let clock = Arc::new(Clock {
        t0,
        window: warmup_ns..end_ns,
        end_ns,
        completed_in_window: AtomicU64::new(0),
        offered_in_window: AtomicU64::new(0),
    });
    let workload = Arc::new(Mutex::new(Workload::new(spec)));
    let deadline_ns = end_ns + options.drain.as_nanos() as u64;
    let (queue, producer) = if options.rate > 0 {
        let (tx, rx) = mpsc::channel(options.max_inflight as usize);
        let producer = tokio::spawn(produce(
            tx,
            workload.clone(),
            clock.clone(),
            options.rate,
            deadline_ns,
        ));
        (Some(Arc::new(Mutex::new(rx))), Some(producer))
    } else {
        (None, None)
    };
    let numbers = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..connections)
        .map(|conn| {
            let source = match &queue {
                Some(rx) => Source::Queue(rx.clone()),
                None => Source::ClosedLoop(workload.clone(), numbers.clone()),
            };
            tokio::spawn(work(
                conn,
                target.clone(),
                skus.clone(),
                clock.clone(),
                source,
                deadline_ns,
            ))
        })
        .collect();
    let mut latency = new_histogram();
    let mut outcomes = [0u64; 3];
    for w in workers {
        let r = w.await??;
        latency.add(&r.latency)?;
        for (total, n) in outcomes.iter_mut().zip(r.outcomes) {
            *total += n;
        }
    }
    // Orders still queued, or never sent, at the drain deadline count at
    // their age then, a lower bound, so they raise the tail instead of
    // vanishing from it.
    let mut incomplete = 0;
    if let (Some(rx), Some(producer)) = (&queue, producer) {
        let unsent_from = producer.await?;
        let now = clock.now_ns();
        let mut rx = rx.lock().await;
        while let Ok((_, intended)) = rx.try_recv() {
            if clock.window.contains(&intended) {
                latency.saturating_record(now.saturating_sub(intended) / 1_000);
                incomplete += 1;
            }
        }
        incomplete += record_unsent(&mut latency, &clock, options.rate, unsent_from, now);
    }
    let (available, sold, _) = target.totals().await?;
    let window_s = options.window.as_secs_f64();
    Ok(BaselineResult {
        system: "PostgreSQL, SELECT … FOR UPDATE, synchronous_commit on",
        connections,
        offered_rate: (clock.offered_in_window.load(Ordering::Relaxed) as f64 / window_s).round(),
        achieved_rate: (clock.completed_in_window.load(Ordering::Relaxed) as f64 / window_s)
            .round(),
        latency: Percentiles::of(&latency),
        outcomes: [
            ("confirmed", outcomes[0]),
            ("out_of_stock", outcomes[1]),
            ("payment_declined", outcomes[2]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        incomplete,
        stock_conserved: available + sold == skus.len() as u64 * spec.stock_per_sku(),
    })
}

/// Where a worker gets its next order.
enum Source {
    /// Open loop: the producer's schedule, with each order's intended time.
    Queue(Arc<Mutex<mpsc::Receiver<(OrderSpec, u64)>>>),
    /// Closed loop: the next order of the workload (numbered by the
    /// shared counter), intended now.
    ClosedLoop(Arc<Mutex<Workload>>, Arc<AtomicU64>),
}

/// Intended time of slot `k` of the schedule, ns since the start.
fn slot_ns(k: u64, rate: u64) -> u64 {
    (u128::from(k) * 1_000_000_000 / u128::from(rate)) as u64
}

/// Sends the schedule's orders as they fall due until the window ends.
/// A full queue blocks the producer, and the orders it then sends late
/// keep their intended times: the wait counts as latency. Gives up at
/// the drain deadline; returns the first slot it did not send.
async fn produce(
    tx: mpsc::Sender<(OrderSpec, u64)>,
    workload: Arc<Mutex<Workload>>,
    clock: Arc<Clock>,
    rate: u64,
    deadline_ns: u64,
) -> u64 {
    let deadline = tokio::time::Instant::from_std(clock.t0 + Duration::from_nanos(deadline_ns));
    let mut k = 0u64;
    loop {
        let intended = slot_ns(k, rate);
        if intended >= clock.end_ns {
            return k;
        }
        let wait = intended.saturating_sub(clock.now_ns());
        if wait > 0 {
            tokio::time::sleep(Duration::from_nanos(wait)).await;
        }
        let spec = workload.lock().await.order(k);
        tokio::select! {
            sent = tx.send((spec, intended)) => {
                if sent.is_err() {
                    return k;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return k,
        }
        if clock.window.contains(&intended) {
            clock.offered_in_window.fetch_add(1, Ordering::Relaxed);
        }
        k += 1;
    }
}

/// Records the measured slots from `first` on that were never sent, each
/// at its age `now`: grouped per millisecond of intended time, so a far
/// overloaded baseline costs at most one record per millisecond.
fn record_unsent(
    latency: &mut Histogram<u64>,
    clock: &Clock,
    rate: u64,
    first: u64,
    now: u64,
) -> u64 {
    const BUCKET_NS: u64 = 1_000_000;
    let slots_before = |t: u64| (u128::from(t) * u128::from(rate)).div_ceil(1_000_000_000) as u64;
    let mut total = 0;
    let mut from = slot_ns(first, rate).max(clock.window.start);
    while from < clock.window.end {
        let to = (from + BUCKET_NS).min(clock.window.end);
        let count = slots_before(to).saturating_sub(slots_before(from).max(first));
        if count > 0 {
            let age_us = now.saturating_sub(from) / 1_000;
            let _ = latency.record_n(age_us.clamp(1, latency.high()), count);
            total += count;
        }
        from = to;
    }
    total
}

async fn next_order(source: &Source, clock: &Clock, deadline_ns: u64) -> Option<(OrderSpec, u64)> {
    match source {
        Source::Queue(rx) => {
            let wait = Duration::from_nanos(deadline_ns.checked_sub(clock.now_ns())?);
            let mut rx = rx.lock().await;
            tokio::time::timeout(wait, rx.recv()).await.ok().flatten()
        }
        Source::ClosedLoop(workload, numbers) => {
            let now = clock.now_ns();
            if now >= clock.end_ns {
                return None;
            }
            if clock.window.contains(&now) {
                clock.offered_in_window.fetch_add(1, Ordering::Relaxed);
            }
            let n = numbers.fetch_add(1, Ordering::Relaxed);
            Some((workload.lock().await.order(n), now))
        }
    }
}

/// Places orders on connection `conn` until the source runs dry.
async fn work(
    conn: usize,
    target: Arc<PostgresTarget>,
    skus: Arc<Vec<String>>,
    clock: Arc<Clock>,
    source: Source,
    deadline_ns: u64,
) -> anyhow::Result<WorkerResult> {
    let mut result = WorkerResult {
        latency: new_histogram(),
        outcomes: [0; 3],
    };
    while let Some((spec, intended)) = next_order(&source, &clock, deadline_ns).await {
        let id = format!("{ORDER_ID_PREFIX}{}", spec.n);
        let lines: Vec<(&str, u32)> = spec
            .lines
            .iter()
            .map(|(sku, q)| (skus[*sku as usize].as_str(), *q))
            .collect();
        let order = PgOrder {
            id: &id,
            lines: &lines,
            decline: spec.decline,
        };
        let outcome = target.place(conn, &order).await?;
        let done = clock.now_ns();
        result.outcomes[match outcome {
            PgOutcome::Confirmed => 0,
            PgOutcome::OutOfStock => 1,
            PgOutcome::Declined => 2,
        }] += 1;
        if clock.window.contains(&done) {
            clock.completed_in_window.fetch_add(1, Ordering::Relaxed);
        }
        if clock.window.contains(&intended) {
            result
                .latency
                .saturating_record(done.saturating_sub(intended) / 1_000);
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every measured slot never sent is counted once, at its age.
    #[test]
    fn unsent_slots_count_once() {
        let clock = Clock {
            t0: Instant::now(),
            window: 200_000_000..1_200_000_000,
            end_ns: 1_200_000_000,
            completed_in_window: AtomicU64::new(0),
            offered_in_window: AtomicU64::new(0),
        };
        let mut h = new_histogram();
        // 1000/s: slots 200..1200 are measured; from slot 700 on none was sent.
        let n = record_unsent(&mut h, &clock, 1_000, 700, 2_000_000_000);
        assert_eq!((n, h.len()), (500, 500));
        assert_eq!(
            h.max() / 1_000,
            1_300,
            "the oldest unsent slot is 1.3 s old"
        );
        let mut h = new_histogram();
        assert_eq!(
            record_unsent(&mut h, &clock, 1_000, 0, 2_000_000_000),
            1_000
        );
        assert_eq!(
            record_unsent(&mut h, &clock, 1_000, 5_000, 2_000_000_000),
            0
        );
    }
}
