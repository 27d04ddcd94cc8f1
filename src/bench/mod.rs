//! `orderflow bench`: a whole instance in this process (embedded, or on
//! Kafka + ScyllaDB), a seeded workload offered open-loop at a fixed rate
//! (or saturation), latency from intake to terminal status with
//! coordinated-omission correction, and a report as text, JSON, Markdown
//! and PNG plots.
//!
//! ```text
//! workload   which orders: uniform, Zipf(s), flash sale, multi-line, declines
//! driver     offers them through the `orders` log, times terminal statuses
//! report     machine, configuration, figures; text, JSON, Markdown
//! plot       latency percentile curve, throughput and latency over time
//! ```

mod baseline;
mod driver;
mod plot;
pub mod postgres;
mod report;
mod search;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Args;
use tokio::sync::watch;

use crate::config::Config;
use crate::pipeline::log::{Log, Topic};
use crate::telemetry::metrics::Metrics;
use driver::{DriveOptions, Shared};
pub use report::{Machine, MachineCpu, rusage};
use report::{Measured, Report, Sample};
use workload::{Workload, WorkloadKind, WorkloadSpec};

/// Longest load a run may offer (warm-up plus measured), in seconds.
const MAX_RUN_S: f64 = 3_000.0;
/// Highest offered rate accepted, orders/s.
const MAX_RATE: u64 = 10_000_000;
const MAX_INFLIGHT_LIMIT: u64 = 10_000_000;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Offered load in orders/s; 0 = saturation (keep `--max-inflight`
    /// orders outstanding: the highest rate the pipeline sustains).
    #[arg(long, default_value_t = 50_000)]
    pub rate: u64,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Seconds of load before measuring (excluded from every figure).
    #[arg(long, default_value_t = 3.0)]
    pub warmup_seconds: f64,
    /// Which orders to offer.
    #[arg(long, value_enum, default_value_t = WorkloadKind::Uniform)]
    pub workload: WorkloadKind,
    /// Distinct SKUs (uniform, Zipf, multi-line).
    #[arg(long, default_value_t = 1000)]
    pub skus: u32,
    /// Zipf exponent: 1.1 puts about half the demand on the top 1 % of SKUs.
    #[arg(long, default_value_t = 1.1)]
    pub zipf_s: f64,
    /// Multi-line orders have 1 to this many lines (distinct SKUs).
    #[arg(long, default_value_t = 5)]
    pub max_lines: u32,
    /// Flash sale: the one SKU's stock (demand is far above it).
    #[arg(long, default_value_t = 1000)]
    pub flash_stock: u64,
    /// Fraction of orders whose card is declined (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub decline_ratio: f64,
    /// Seed of the workload: the same seed offers the same orders.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Partitions of `orders` and of `order-status`.
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Saturation mode only: orders sent but not yet terminal.
    #[arg(long, default_value_t = 20_000)]
    pub max_inflight: u64,
    /// Producer batching interval: orders due within it go in one append
    /// per partition.
    #[arg(long, default_value_t = 1)]
    pub linger_ms: u64,
    /// Longest wait after the load for outstanding orders to finish.
    #[arg(long, default_value_t = 30)]
    pub drain_seconds: u64,
    /// Parent directory of the run's temporary data directory (default:
    /// the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub data_parent: Option<PathBuf>,
    /// Turn fsync off (CPU-path comparison only; not the configuration of
    /// record).
    #[arg(long)]
    pub no_fsync: bool,
    /// Payment gateway: `simulator` (in process; the default embedded) or
    /// `gateway-sim` (spawns `orderflow gateway-sim` on loopback and calls
    /// it over HTTP; the default, and the only choice, with `--kafka`).
    #[arg(long, value_parser = ["simulator", "gateway-sim"])]
    pub gateway: Option<String>,
    /// Latency of each gateway call, in ms (either gateway).
    #[arg(long, default_value_t = 0)]
    pub gateway_latency_ms: u64,
    /// Probability that a gateway call fails as unavailable (either gateway).
    #[arg(long, default_value_t = 0.0)]
    pub gateway_failure_rate: f64,
    /// Distributed target: Kafka bootstrap servers (the log), on topics of
    /// this run's own. Needs `--scylla`: instances on Kafka need the shared
    /// store (fencing, checkpoints).
    #[arg(long, value_name = "HOST:PORT", requires = "scylla")]
    pub kafka: Option<String>,
    /// Distributed target: ScyllaDB/Cassandra contact point (the store); a
    /// fresh keyspace is migrated for the run.
    #[arg(long, value_name = "HOST:PORT")]
    pub scylla: Option<String>,
    /// First find the highest sustainable open-loop rate (a closed-loop
    /// ceiling, then bisecting trials on fresh instances), then measure
    /// there; `--rate` is ignored.
    #[arg(long)]
    pub search: bool,
    /// `--search`: a trial is sustainable only with p99 at most this.
    #[arg(long, default_value_t = 100.0)]
    pub slo_p99_ms: f64,
    /// `--search`: open-loop trials after the ceiling (each halves the
    /// interval).
    #[arg(long, default_value_t = 6)]
    pub search_trials: u32,
    /// `--search`: measured seconds of each trial.
    #[arg(long, default_value_t = 5.0)]
    pub trial_seconds: f64,
    /// Then run the same workload and schedule against PostgreSQL at URL
    /// (orders and inventory tables, `SELECT … FOR UPDATE`; see
    /// `scripts/postgres`) and report the ratio.
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// Connections of the PostgreSQL baseline (its concurrency).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also write the report as a Markdown section to FILE.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Write PNG plots into DIR: latency-percentiles.png, timeline.png.
    #[arg(long, value_name = "DIR")]
    pub plots: Option<PathBuf>,
}

impl BenchArgs {
    /// The gateway of the run: distributed instances must share one, so
    /// `--kafka` defaults to `gateway-sim` (config validation refuses the
    /// in-process simulator there).
    pub fn gateway(&self) -> &str {
        match (&self.gateway, &self.kafka) {
            (Some(g), _) => g,
            (None, Some(_)) => "gateway-sim",
            (None, None) => "simulator",
        }
    }

    fn workload(&self) -> WorkloadSpec {
        WorkloadSpec {
            kind: self.workload,
            skus: self.skus,
            zipf_s: self.zipf_s,
            max_lines: self.max_lines,
            flash_stock: self.flash_stock,
            decline_ratio: self.decline_ratio,
            seed: self.seed,
        }
    }

    /// Every limit, with the flag's name in the message.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        self.workload().validate()?;
        let run_s = self.seconds + self.warmup_seconds;
        if !(self.seconds > 0.0 && self.warmup_seconds >= 0.0 && run_s <= MAX_RUN_S) {
            return Err(crate::config::ConfigError::Usage(format!(
                "--seconds {} and --warmup-seconds {} must be > 0 and >= 0, together at most {MAX_RUN_S}",
                self.seconds, self.warmup_seconds
            )));
        }
        if self.rate > MAX_RATE {
            return Err(crate::config::ConfigError::Usage(format!(
                "--rate {} is out of range [0, {MAX_RATE}]",
                self.rate
            )));
        }
        if self.max_inflight == 0 || self.max_inflight > MAX_INFLIGHT_LIMIT {
            return Err(crate::config::ConfigError::Usage(format!(
                "--max-inflight {} is out of range [1, {MAX_INFLIGHT_LIMIT}]",
                self.max_inflight
            )));
        }
        if self.linger_ms == 0 || self.linger_ms > 1_000 {
            return Err(crate::config::ConfigError::Usage(format!(
                "--linger-ms {} is out of range [1, 1000]",
                self.linger_ms
            )));
        }
        if !(0.0..=1.0).contains(&self.gateway_failure_rate) {
            return Err(crate::config::ConfigError::Usage(format!(
                "--gateway-failure-rate {} is out of range [0, 1]",
                self.gateway_failure_rate
            )));
        }
        if !postgres::CONNECTIONS.contains(&self.connections) {
            return Err(crate::config::ConfigError::Usage(format!(
                "--connections {} is out of range [{}, {}]",
                self.connections,
                postgres::CONNECTIONS.start(),
                postgres::CONNECTIONS.end()
            )));
        }
        if self.search {
            if !(self.slo_p99_ms > 0.0 && self.slo_p99_ms <= 3_600_000.0) {
                return Err(crate::config::ConfigError::Usage(format!(
                    "--slo-p99-ms {} is out of range (0, 3600000]",
                    self.slo_p99_ms
                )));
            }
            if !(1..=search::MAX_TRIALS).contains(&self.search_trials) {
                return Err(crate::config::ConfigError::Usage(format!(
                    "--search-trials {} is out of range [1, {}]",
                    self.search_trials,
                    search::MAX_TRIALS
                )));
            }
            if !(self.trial_seconds >= 1.0 && self.trial_seconds <= 600.0) {
                return Err(crate::config::ConfigError::Usage(format!(
                    "--trial-seconds {} is out of range [1, 600]",
                    self.trial_seconds
                )));
            }
        }
        if self.drain_seconds > 3_600 {
            return Err(crate::config::ConfigError::Usage(format!(
                "--drain-seconds {} is out of range [0, 3600]",
                self.drain_seconds
            )));
        }
        Ok(())
    }

    fn drive_options(&self) -> DriveOptions {
        DriveOptions {
            rate: self.rate,
            warmup: Duration::from_secs_f64(self.warmup_seconds),
            window: Duration::from_secs_f64(self.seconds),
            max_inflight: self.max_inflight,
            linger: Duration::from_millis(self.linger_ms),
            drain: Duration::from_secs(self.drain_seconds),
        }
    }

    /// The settings a report records.
    fn describe(&self, config: &Config) -> serde_json::Value {
        serde_json::json!({
            "workload": self.workload(),
            "rate": self.rate,
            "seconds": self.seconds,
            "warmup_seconds": self.warmup_seconds,
            "max_inflight": self.max_inflight,
            "linger_ms": self.linger_ms,
            "partitions": self.partitions,
            "fsync": config.log.fsync,
            "log": if config.kafka.is_some() { "kafka" } else { "embedded" },
            "store": if config.scylla.is_some() { "scylla" } else { "embedded" },
            "gateway": self.gateway(),
            "gateway_latency_ms": self.gateway_latency_ms,
            "gateway_failure_rate": self.gateway_failure_rate,
        })
    }
}

/// Runs one benchmark (after a rate search with `--search`) and writes its
/// reports; `Ok(false)` if an order was lost or never finished.
pub async fn run(mut args: BenchArgs, base: Config) -> anyhow::Result<bool> {
    args.validate()?;
    let machine = Machine::detect();
    let search = match args.search {
        true => {
            let found =
                search::run(&args, |trial| measure(trial, base.clone(), machine.clone())).await?;
            if found.rate == 0 {
                anyhow::bail!(
                    "no open-loop rate was sustained with p99 <= {} ms (trials: {:?})",
                    found.slo_p99_ms,
                    found.trials
                );
            }
            args.rate = found.rate;
            Some(found)
        }
        false => None,
    };
    let mut report = measure(args.clone(), base, machine).await?;
    report.search = search.map(|mut s| {
        s.confirmed = Some(search::Trial::of(s.rate, &report, s.slo_p99_ms).sustainable);
        s
    });
    if let Some(url) = &args.postgres {
        let spec = args.workload();
        let base = baseline::run(url, args.connections, &args.drive_options(), &spec).await?;
        report.ratio_vs_baseline = Some(report::ratio(report.achieved_rate, base.achieved_rate));
        report.baseline = Some(base);
    }
    write_reports(&args, &report)?;
    Ok(report.lost == 0 && report.incomplete == 0)
}

/// One measured run on a fresh instance and data directory, and on topics
/// and a keyspace of its own, deleted when it ends (however it ends), so
/// that runs on the same backends do not pile up.
async fn measure(args: BenchArgs, base: Config, machine: Machine) -> anyhow::Result<Report> {
    let parent = args.data_parent.clone().unwrap_or_else(std::env::temp_dir);
    let data = tempfile::Builder::new()
        .prefix("orderflow-bench-")
        .tempdir_in(&parent)?;
    let mut config = bench_config(&args, base, data.path());
    let report = match distributed_config(&args, &mut config).await {
        Ok(()) => measure_on(&args, config.clone(), machine, data.path()).await,
        Err(e) => Err(e),
    };
    forget_distributed(&config).await;
    report
}

/// Deletes a run's topics and keyspace; a failure is only reported, the
/// run's figures stand.
async fn forget_distributed(config: &Config) {
    const TIMEOUT: Duration = Duration::from_secs(30);
    if let Some(kafka) = &config.kafka
        && let Err(e) = crate::pipeline::log::kafka::delete_topics(kafka, TIMEOUT).await
    {
        tracing::warn!(prefix = %kafka.topic_prefix, error = %e, "bench topics left behind");
    }
    if let Some(scylla) = &config.scylla
        && let Err(e) = crate::pipeline::store::scylla::drop_keyspace(scylla).await
    {
        tracing::warn!(keyspace = %scylla.keyspace, error = %e, "bench keyspace left behind");
    }
}

/// The run itself, on backends `config` names.
async fn measure_on(
    args: &BenchArgs,
    mut config: Config,
    machine: Machine,
    data: &std::path::Path,
) -> anyhow::Result<Report> {
    let _gateway_sim = gateway_sim(args, &mut config, data)?;
    config.validate()?;
    let app = crate::app::start(config.clone(), None).await?;
    let log = app.log();
    let shared = Arc::new(Shared::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let consumers = driver::spawn_consumers(&log, &shared, &stop_rx);

    let spec = args.workload();
    let skus = Arc::new(spec.sku_names());
    driver::load_stock(log.as_ref(), &skus, spec.stock_per_sku()).await?;
    if let Err(e) = driver::probe(log.as_ref(), &shared, &skus).await {
        let _ = stop_tx.send(true);
        let _ = app.shutdown().await;
        return Err(e);
    }

    let options = args.drive_options();
    let progress = progress_bar(&options, &shared);
    let sample = || {
        let at_s = shared.now_ns() as f64 / 1e9;
        Sample::take(
            at_s,
            shared.terminal.load(Ordering::Relaxed),
            &app.metrics,
            log.as_ref(),
        )
    };
    let window = driver::drive(
        &options,
        log.clone(),
        &shared,
        Workload::new(&spec),
        skus.clone(),
        sample,
    )
    .await;
    progress.abort();
    let _ = stop_tx.send(true);
    let mut latency = driver::new_histogram();
    for c in consumers {
        latency.add(c.await?)?;
    }
    let incomplete = driver::record_incomplete(&shared, &mut latency);
    let io = io_per_order(
        log.as_ref(),
        &app.metrics,
        shared.sent.load(Ordering::Relaxed),
    )
    .await?;
    app.shutdown().await?;

    let mut report = Report::new(
        machine,
        args.describe(&config),
        args.rate,
        Measured {
            before: &window.before,
            after: &window.after,
            offered: window.offered,
            latency: &latency,
            incomplete,
            timeline: shared.take_timeline(),
        },
    );
    report.statuses = shared
        .status_counts()
        .into_iter()
        .map(|(s, n)| (s.to_string(), n))
        .collect();
    report.backlog_at_end = window.backlog_at_end;
    report.drained_s = (window.drained_s * 100.0).round() / 100.0;
    report.full_retries = shared.full_retries.load(Ordering::Relaxed);
    report.lost = shared.lost.load(Ordering::Relaxed);
    report.io_per_order = io;
    Ok(report)
}

/// Text to stdout; JSON, Markdown and plots where asked.
fn write_reports(args: &BenchArgs, report: &Report) -> anyhow::Result<()> {
    println!("{}", report.text());
    let plots = match &args.plots {
        Some(dir) => Some(plot::write(report, dir)?),
        None => None,
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)?;
    }
    if let Some(path) = &args.markdown {
        let names = plots.as_ref().map(|(a, b)| (file_name(a), file_name(b)));
        let md = report.markdown(names.as_ref().map(|(a, b)| (a.as_str(), b.as_str())));
        std::fs::write(path, md)?;
    }
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// A progress bar on stderr (hidden when stderr is not a terminal) that
/// shows the schedule and what is in flight, until aborted.
fn progress_bar(options: &DriveOptions, shared: &Arc<Shared>) -> tokio::task::JoinHandle<()> {
    let total_ms = (options.warmup + options.window).as_millis() as u64;
    let bar = indicatif::ProgressBar::new(total_ms);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
            .expect("valid template"),
    );
    let shared = shared.clone();
    let warmup_ms = options.warmup.as_millis() as u64;
    let start = shared.now_ns();
    tokio::spawn(async move {
        loop {
            let elapsed_ms = (shared.now_ns() - start) / 1_000_000;
            bar.set_position(elapsed_ms.min(total_ms));
            let phase = if elapsed_ms < warmup_ms {
                "warm-up"
            } else if elapsed_ms < total_ms {
                "measuring"
            } else {
                "draining"
            };
            bar.set_message(format!(
                "{phase}: sent {} terminal {} in flight {}",
                shared.sent.load(Ordering::Relaxed),
                shared.terminal.load(Ordering::Relaxed),
                shared.in_flight()
            ));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// The file's (or the defaults') settings with the run's own: a throw-away
/// data directory, an ephemeral port, the partitions, fsync, the gateway.
fn bench_config(args: &BenchArgs, base: Config, dir: &Path) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        data_dir: dir.to_path_buf(),
        partitions: args.partitions,
        status_partitions: args.partitions,
        ..base
    };
    config.log.fsync = !args.no_fsync;
    config.gateway.latency_ms = args.gateway_latency_ms;
    config.gateway.failure_rate = args.gateway_failure_rate;
    config
}

/// `--kafka` / `--scylla`: the distributed backends, on topics and a
/// keyspace of this run's own (the keyspace is migrated first).
async fn distributed_config(args: &BenchArgs, config: &mut Config) -> anyhow::Result<()> {
    let name = format!("bench_{}", crate::wall_clock::now_ms());
    if let Some(servers) = &args.kafka {
        config.kafka = Some(crate::config::KafkaConfig {
            bootstrap_servers: servers.clone(),
            group_id: name.clone(),
            topic_prefix: format!("{name}."),
            ..Default::default()
        });
    }
    if let Some(node) = &args.scylla {
        let scylla = crate::config::ScyllaConfig {
            nodes: vec![node.clone()],
            keyspace: name,
            ..Default::default()
        };
        crate::pipeline::store::scylla::migrate(&scylla).await?;
        config.scylla = Some(scylla);
    }
    Ok(())
}

/// Log records written (both topics, all partitions) and state-store
/// requests by operation, per order sent (probe and stock records
/// included, a rounding error over a run).
async fn io_per_order(log: &dyn Log, metrics: &Metrics, orders: u64) -> anyhow::Result<String> {
    use std::fmt::Write;
    let orders = orders.max(1) as f64;
    let mut parts = Vec::new();
    for topic in Topic::ALL {
        let mut records = 0;
        for p in 0..log.partition_count(topic) {
            records += log.offsets(topic, p).await?.1;
        }
        parts.push(format!(
            "{:.2} {} records",
            records as f64 / orders,
            topic.name()
        ));
    }
    let mut out = parts.join(", ");
    for family in metrics.registry.gather() {
        if family.name() != "orderflow_store_request_seconds" {
            continue;
        }
        for m in family.get_metric() {
            let op = m
                .get_label()
                .iter()
                .find(|l| l.name() == "op")
                .map_or("?", |l| l.value());
            let count = m.get_histogram().get_sample_count();
            let _ = write!(out, ", {:.3} store {op}", count as f64 / orders);
        }
    }
    Ok(out)
}

/// Kills the spawned `orderflow gateway-sim` when the run ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// With `--gateway gateway-sim`: starts `orderflow gateway-sim` (this very
/// binary) with the gateway latency and failure rate and points `config`
/// at it.
fn gateway_sim(
    args: &BenchArgs,
    config: &mut Config,
    dir: &Path,
) -> anyhow::Result<Option<ChildGuard>> {
    use std::io::BufRead;
    if args.gateway() != "gateway-sim" {
        return Ok(None);
    }
    let mut child = std::process::Command::new(std::env::current_exe()?)
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
    config.gateway.kind = crate::config::GatewayKind::Stripe;
    config.gateway.url = format!("http://{addr}");
    config.gateway.secret_key_file = Some(key_file);
    Ok(Some(guard))
}
