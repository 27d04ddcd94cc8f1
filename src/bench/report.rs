//! What a benchmark run reports, and where: the machine it ran on, the
//! configuration, throughput, latency percentiles, CPU per order, peak
//! RSS, where the time went inside the pipeline; as text, JSON and Markdown.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::baseline::BaselineResult;
use super::search::Search;
use crate::pipeline::log::{Log, Topic};
use crate::telemetry::metrics::Metrics;

/// Cores busy outside this process above which the run is flagged: kernel
/// I/O threads alone stay below it in every configuration measured so far.
const SHARED_MACHINE_CORES: f64 = 0.25;

/// The machine the run is on, as far as Linux shows it.
#[derive(Serialize, Clone, Debug)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub date: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = proc_field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = proc_field(&meminfo, "MemTotal")
            .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: round2(mem_kib / (1024.0 * 1024.0)),
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

/// Today's UTC date as YYYY-MM-DD.
fn utc_date() -> String {
    let mut day = crate::domain::time::rfc3339_ms(crate::wall_clock::now_ms());
    day.truncate("YYYY-MM-DD".len());
    day
}

/// Process CPU time (user + system) and peak resident set size in KiB.
pub fn rusage() -> (Duration, u64) {
    // SAFETY: getrusage only writes into the zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss as u64)
}

/// Whole-machine CPU time so far, all cores, from the `cpu` line of /proc/stat.
#[derive(Clone, Copy, Default)]
pub struct MachineCpu {
    /// user + nice + system + irq + softirq.
    pub busy: Duration,
    pub steal: Duration,
}

impl MachineCpu {
    pub fn read() -> MachineCpu {
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

/// Counters read at one edge of the measurement window.
pub struct Sample {
    at_s: f64,
    terminal: u64,
    cpu: Duration,
    topics: [TopicCounters; 2],
    checkpoints: (u64, f64),
    orders_lag: i64,
    machine: MachineCpu,
}

impl Sample {
    pub fn take(at_s: f64, terminal: u64, metrics: &Metrics, log: &dyn Log) -> Sample {
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
        let partitions = log.partition_count(Topic::Orders);
        let mut checkpoints = (0, 0.0);
        let mut orders_lag = 0;
        for p in (0..partitions).map(|p| p.to_string()) {
            let h = metrics.checkpoint_latency.with_label_values(&[&p]);
            checkpoints.0 += h.get_sample_count();
            checkpoints.1 += h.get_sample_sum();
            orders_lag += metrics
                .partition_lag
                .with_label_values(&["orders", &p, "runner"])
                .get();
        }
        Sample {
            at_s,
            terminal,
            cpu: rusage().0,
            machine: MachineCpu::read(),
            topics: [topic(Topic::Orders), topic(Topic::OrderStatus)],
            checkpoints,
            orders_lag,
        }
    }
}

/// Where the time went inside the pipeline over the window, per topic.
#[derive(Serialize, Default)]
pub struct Internals {
    pub topics: [TopicRates; 2],
    pub checkpoints_per_s: f64,
    pub checkpoint_mean_ms: f64,
    /// Records the `orders` runners had not yet read at the window's end.
    pub orders_lag_at_end: i64,
    /// Average cores busy in this process, elsewhere (other processes, and
    /// kernel threads such as the file system's, which this run's fsyncs
    /// also keep busy; a benchmark sharing its machine is not a clean run)
    /// and stolen by the hypervisor.
    pub own_cores: f64,
    pub other_cores: f64,
    pub steal_cores: f64,
}

#[derive(Serialize, Default)]
pub struct TopicRates {
    pub topic: &'static str,
    pub fsyncs_per_s: f64,
    pub fsync_mean_ms: f64,
    /// Sum of fsync time over the window, divided by the window: how many
    /// partitions' worth of writer threads were busy in fsync on average.
    pub fsync_busy: f64,
    pub records_per_commit: f64,
    pub records_per_s: f64,
    pub appends_per_s: f64,
    pub append_mean_ms: f64,
}

impl Internals {
    fn between(a: &Sample, b: &Sample, window_s: f64) -> Internals {
        let rates = |topic, x: &TopicCounters, y: &TopicCounters| {
            let fsyncs = (y.fsyncs - x.fsyncs) as f64;
            let commits = (y.commits - x.commits) as f64;
            let records = y.committed_records - x.committed_records;
            let appends = (y.appends - x.appends) as f64;
            TopicRates {
                topic,
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
        let own = b.cpu.saturating_sub(a.cpu);
        let busy = b.machine.busy.saturating_sub(a.machine.busy);
        Internals {
            topics: [
                rates("orders", &a.topics[0], &b.topics[0]),
                rates("order-status", &a.topics[1], &b.topics[1]),
            ],
            checkpoints_per_s: checkpoints / window_s,
            checkpoint_mean_ms: ratio(b.checkpoints.1 - a.checkpoints.1, checkpoints) * 1e3,
            orders_lag_at_end: b.orders_lag,
            own_cores: own.as_secs_f64() / window_s,
            other_cores: busy.saturating_sub(own).as_secs_f64() / window_s,
            steal_cores: b
                .machine
                .steal
                .saturating_sub(a.machine.steal)
                .as_secs_f64()
                / window_s,
        }
    }
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { 0.0 } else { a / b }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Latency percentiles in milliseconds.
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub samples: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Percentiles {
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1e3,
            samples: h.len(),
        }
    }
}

/// One second of the run: orders that finished in it, and their latency.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct Second {
    pub t_s: u64,
    pub completed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Everything a run reports; serialized as is for `--json`.
#[derive(Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub machine: Machine,
    /// The run's settings: workload, rate, backends, gateway, durations.
    pub config: serde_json::Value,
    pub mode: &'static str,
    pub offered_rate: f64,
    pub achieved_rate: f64,
    pub window_s: f64,
    pub terminal_in_window: u64,
    pub latency: Percentiles,
    /// Measured orders with no terminal status by the drain deadline
    /// (recorded at their age then, a lower bound).
    pub incomplete: u64,
    pub statuses: std::collections::BTreeMap<String, u64>,
    pub cpu_us_per_order: f64,
    pub peak_rss_mib: f64,
    pub backlog_at_end: u64,
    pub drained_s: f64,
    pub full_retries: u64,
    pub lost: u64,
    pub internals: Internals,
    /// Percentile curve: (percentile, ms) pairs for the plot.
    pub curve: Vec<(f64, f64)>,
    pub timeline: Vec<Second>,
    /// The same workload against PostgreSQL (`--postgres`), and orderflow's
    /// achieved rate divided by its.
    pub baseline: Option<BaselineResult>,
    pub ratio_vs_baseline: Option<f64>,
    /// Log records per topic and store requests per operation, per order.
    pub io_per_order: String,
    /// `--search`: how the measured rate was found.
    pub search: Option<Search>,
}

/// The raw figures a report is made from.
pub struct Measured<'a> {
    pub before: &'a Sample,
    pub after: &'a Sample,
    pub offered: u64,
    pub latency: &'a Histogram<u64>,
    pub incomplete: u64,
    pub timeline: Vec<Histogram<u64>>,
}

impl Report {
    /// Peak RSS is read here: `ru_maxrss` is a high-water mark, so reading
    /// it after shutdown still gives the run's peak.
    pub fn new(machine: Machine, config: serde_json::Value, rate: u64, m: Measured<'_>) -> Report {
        let window_s = m.after.at_s - m.before.at_s;
        let terminal = m.after.terminal - m.before.terminal;
        let cpu = m.after.cpu.saturating_sub(m.before.cpu);
        Report {
            bench: "pipeline",
            machine,
            config,
            mode: if rate == 0 { "saturation" } else { "open-loop" },
            offered_rate: (m.offered as f64 / window_s).round(),
            achieved_rate: (terminal as f64 / window_s).round(),
            window_s: round2(window_s),
            terminal_in_window: terminal,
            latency: Percentiles::of(m.latency),
            incomplete: m.incomplete,
            statuses: Default::default(),
            cpu_us_per_order: round2(ratio(cpu.as_secs_f64() * 1e6, terminal as f64)),
            peak_rss_mib: (rusage().1 as f64 / 1024.0).round(),
            backlog_at_end: 0,
            drained_s: 0.0,
            full_retries: 0,
            lost: 0,
            internals: Internals::between(m.before, m.after, window_s),
            curve: percentile_curve(m.latency),
            timeline: m
                .timeline
                .iter()
                .enumerate()
                .map(|(t, h)| Second {
                    t_s: t as u64,
                    completed: h.len(),
                    p50_ms: h.value_at_quantile(0.5) as f64 / 1e3,
                    p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
                })
                .collect(),
            baseline: None,
            ratio_vs_baseline: None,
            io_per_order: String::new(),
            search: None,
        }
    }

    /// The human summary, for stdout.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let m = &self.machine;
        let l = &self.latency;
        let mut s = String::new();
        let _ = writeln!(s, "orderflow bench ({}), {}", self.mode, m.date);
        let _ = writeln!(
            s,
            "  machine   {} | {} cores | {:.1} GiB RAM",
            m.cpu, m.cores, m.memory_gib
        );
        let _ = writeln!(s, "  config    {}", self.config);
        let _ = writeln!(
            s,
            "  offered   {:.0} orders/s in the window; achieved {:.0} orders/s terminal ({} in {:.2} s)",
            self.offered_rate, self.achieved_rate, self.terminal_in_window, self.window_s
        );
        let _ = writeln!(
            s,
            "  latency   p50 {:.2} ms | p90 {:.2} ms | p99 {:.2} ms | p99.9 {:.2} ms | max {:.2} ms ({} orders{})",
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            l.samples,
            if self.incomplete > 0 {
                format!(
                    ", {} never finished: counted at drain deadline",
                    self.incomplete
                )
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "  cpu       {:.1} µs per order (process user+sys, includes the load generator)",
            self.cpu_us_per_order
        );
        let _ = writeln!(s, "  memory    peak RSS {:.0} MiB", self.peak_rss_mib);
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(s, "  terminal  {}", statuses.join(" "));
        let _ = writeln!(
            s,
            "  backlog   {} orders outstanding at end of load, drained in {:.2} s; {} Full retries, {} lost",
            self.backlog_at_end, self.drained_s, self.full_retries, self.lost
        );
        let i = &self.internals;
        for t in &i.topics {
            let _ = writeln!(
                s,
                "  log {:<12} {:.0} rec/s, {:.0} appends/s ({:.2} ms mean ack), {:.0} fsyncs/s ({:.2} ms mean, {:.2} writer-threads busy), {:.1} rec/commit",
                t.topic,
                t.records_per_s,
                t.appends_per_s,
                t.append_mean_ms,
                t.fsyncs_per_s,
                t.fsync_mean_ms,
                t.fsync_busy,
                t.records_per_commit
            );
        }
        let _ = writeln!(
            s,
            "  checkpoint {:.1}/s ({:.2} ms mean); orders lag at window end {} records",
            i.checkpoints_per_s, i.checkpoint_mean_ms, i.orders_lag_at_end
        );
        let _ = writeln!(s, "  per order {}", self.io_per_order);
        let _ = writeln!(
            s,
            "  cores     this process {:.2}, elsewhere {:.2}, hypervisor steal {:.2} (of {}){}",
            i.own_cores,
            i.other_cores,
            i.steal_cores,
            m.cores,
            if i.other_cores > SHARED_MACHINE_CORES {
                "  <- machine probably shared: figures may be pessimistic"
            } else {
                ""
            }
        );
        if let Some(search) = &self.search {
            let _ = writeln!(s, "  search    {}", search.summary());
        }
        if let (Some(b), Some(ratio)) = (&self.baseline, self.ratio_vs_baseline) {
            let bl = &b.latency;
            let _ = writeln!(
                s,
                "  baseline  {} ({} connections): offered {:.0}/s, achieved {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; {:?}; {} never finished; stock conserved: {}",
                b.system,
                b.connections,
                b.offered_rate,
                b.achieved_rate,
                bl.p50_ms,
                bl.p99_ms,
                bl.p999_ms,
                b.outcomes,
                b.incomplete,
                b.stock_conserved
            );
            let _ = writeln!(
                s,
                "  ratio     orderflow achieved {ratio:.1}x the baseline's rate"
            );
        }
        s
    }

    /// A Markdown section for BENCHMARKS.md.
    pub fn markdown(&self, plots: Option<(&str, &str)>) -> String {
        use std::fmt::Write;
        let m = &self.machine;
        let l = &self.latency;
        let mut s = String::new();
        let _ = writeln!(s, "### orderflow bench, {} ({})\n", self.mode, m.date);
        let _ = writeln!(
            s,
            "Machine: {}, {} cores, {:.1} GiB RAM.  \nConfiguration: `{}`\n",
            m.cpu, m.cores, m.memory_gib, self.config
        );
        let _ = writeln!(s, "| figure | value |\n|---|---|");
        let rows = [
            ("offered (orders/s)", format!("{:.0}", self.offered_rate)),
            ("achieved (orders/s)", format!("{:.0}", self.achieved_rate)),
            (
                "p50 / p90 (ms)",
                format!("{:.2} / {:.2}", l.p50_ms, l.p90_ms),
            ),
            (
                "p99 / p99.9 (ms)",
                format!("{:.2} / {:.2}", l.p99_ms, l.p999_ms),
            ),
            ("max (ms)", format!("{:.2}", l.max_ms)),
            ("measured orders", l.samples.to_string()),
            ("never finished", self.incomplete.to_string()),
            (
                "CPU per order (µs)",
                format!("{:.1}", self.cpu_us_per_order),
            ),
            ("peak RSS (MiB)", format!("{:.0}", self.peak_rss_mib)),
            ("lost", self.lost.to_string()),
        ];
        for (k, v) in rows {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(s, "| terminal statuses | {} |", statuses.join(", "));
        if let Some(search) = &self.search {
            let _ = writeln!(s, "\nRate search: {}.", search.summary());
        }
        if let (Some(b), Some(ratio)) = (&self.baseline, self.ratio_vs_baseline) {
            let _ = writeln!(
                s,
                "\nSame workload and schedule against {} ({} connections): offered {:.0}/s, \
                 achieved {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms. \
                 **orderflow / PostgreSQL: {ratio:.1}×**.",
                b.system,
                b.connections,
                b.offered_rate,
                b.achieved_rate,
                b.latency.p50_ms,
                b.latency.p99_ms,
                b.latency.p999_ms
            );
        }
        if let Some((curve, timeline)) = plots {
            let _ = writeln!(
                s,
                "\n![latency percentiles]({curve})\n![over time]({timeline})"
            );
        }
        s
    }
}

/// Latency at the percentiles a curve needs: dense towards the tail.
fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut points = Vec::new();
    // 1 - 10^(-k/4): 0, 43.8, 68.4, 82.2, 90, 94.4, … up to 99.999.
    for k in 0..=20 {
        let q = 1.0 - 10f64.powf(-f64::from(k) / 4.0);
        points.push((q * 100.0, h.value_at_quantile(q) as f64 / 1e3));
    }
    points.push((100.0, h.max() as f64 / 1e3));
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The curve rises with the percentile and ends at the maximum.
    #[test]
    fn curve_is_monotonic() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in 1..=100_000u64 {
            h.record(v).unwrap();
        }
        let c = percentile_curve(&h);
        assert!(
            c.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{c:?}"
        );
        assert_eq!(c.last().unwrap().1, h.max() as f64 / 1e3);
        assert!(percentile_curve(&Histogram::<u64>::new(3).unwrap()).is_empty());
    }
}
