//! The sections that bound the pipeline: `[processor]`, `[tracking]`,
//! `[log]`, `[checkpoint]`, `[intake]`, `[supervisor]`, `[metrics]`.

use serde::Deserialize;

use super::{ConfigError, check_ranges, range};

/// `[processor]`: the bounds of each `orders` partition's state
/// (docs/design.md, "Bounds"). All are per partition and deterministic.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// How long (log time) a finished order is remembered, so the same
    /// order id again is recognised as the same order.
    pub order_retention_ms: u64,
    /// Finished orders remembered at most (oldest forgotten first).
    pub max_remembered_orders: usize,
    /// Orders in flight; a new order beyond (or while twice as many
    /// effects are pending) ends `rejected` (`partition_busy`).
    pub max_inflight_orders: usize,
    /// Lines held at once; a `Reserve` beyond is answered "not held".
    pub max_holds: usize,
    /// SKUs with stock; a stock change for a new SKU beyond is refused.
    pub max_skus: usize,
    /// The park lane: records and bytes; a record beyond is refused.
    pub max_parked_records: usize,
    pub max_parked_bytes: usize,
}
impl Default for ProcessorConfig {
    fn default() -> Self {
        let l = crate::stages::processor::Limits::default();
        ProcessorConfig {
            order_retention_ms: l.finished.max_age_ms,
            max_remembered_orders: l.finished.max_entries,
            max_inflight_orders: l.max_inflight_orders,
            max_holds: l.max_holds,
            max_skus: l.max_skus,
            max_parked_records: l.max_parked_records,
            max_parked_bytes: l.max_parked_bytes,
        }
    }
}
impl ProcessorConfig {
    pub fn limits(&self) -> crate::stages::processor::Limits {
        crate::stages::processor::Limits {
            finished: crate::stages::finished::FinishedLimits {
                max_age_ms: self.order_retention_ms,
                max_entries: self.max_remembered_orders,
            },
            max_inflight_orders: self.max_inflight_orders,
            max_holds: self.max_holds,
            max_skus: self.max_skus,
            max_parked_records: self.max_parked_records,
            max_parked_bytes: self.max_parked_bytes,
        }
    }
}
/// `[tracking]`: the bounds of the tracking read model every instance
/// keeps in memory (docs/design.md, "The tracking read model").
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingConfig {
    /// How long after its first status (log time) an order stays visible.
    pub retention_ms: u64,
    /// Orders held at most, over all partitions (oldest forgotten first).
    pub max_orders: usize,
}
impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            retention_ms: 7 * 86_400_000,
            max_orders: 1_000_000,
        }
    }
}
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A segment file is closed and a new one started past this size.
    pub segment_size_bytes: u64,
    /// Per partition: whole segments beyond this size are deleted once
    /// every reader has checkpointed past them.
    pub retention_bytes: u64,
    /// Largest record (key + value) accepted.
    pub max_record_bytes: usize,
    /// Append batches waiting per partition before appends are refused
    /// with `LogError::Full` (HTTP 429).
    pub append_queue_depth: usize,
    /// Most records written between two fsyncs (group commit).
    pub max_batch_records: usize,
    /// fsync before acknowledging. Only benchmarks of the CPU path turn it off.
    pub fsync: bool,
}
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Checkpoint a partition after this many messages ...
    pub every_messages: u64,
    /// ... or this long after the last checkpoint, whichever comes first.
    pub every_ms: u64,
}
/// Admission control of new orders (`[intake]`): what intake sheds, with
/// 503 `overloaded` and `Retry-After`, before an order costs a log append.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeConfig {
    /// Orders (HTTP requests or produce batches) being taken at once, from
    /// parsing to the durable answer.
    pub max_inflight: usize,
    /// Per `orders` partition: records appended but not yet read by the
    /// partition's runner above which new orders for it are shed.
    pub max_backlog_records: u64,
    /// Process resident set size above which new orders are shed; 0 = no bound.
    pub max_rss_bytes: u64,
}
/// `[supervisor]`: a partition task (runner or sink) that panics is
/// restarted from its checkpoint after a back-off doubling from
/// `restart_initial_backoff_ms` to `restart_max_backoff_ms`; one that dies
/// more than `max_deaths` times within `death_window_ms` is given up on
/// (see `crate::pipeline::restart`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    pub restart_initial_backoff_ms: u64,
    pub restart_max_backoff_ms: u64,
    pub max_deaths: u32,
    pub death_window_ms: u64,
}
impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            restart_initial_backoff_ms: 100,
            restart_max_backoff_ms: 10_000,
            max_deaths: 5,
            death_window_ms: 60_000,
        }
    }
}
impl SupervisorConfig {
    /// Checks the bounds `Deaths` asserts, with the key that breaks them.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let initial = self.restart_initial_backoff_ms;
        check_ranges(&[
            ("supervisor.restart_initial_backoff_ms", initial, 1, 60_000),
            (
                "supervisor.restart_max_backoff_ms",
                self.restart_max_backoff_ms,
                initial,
                600_000,
            ),
            ("supervisor.max_deaths", self.max_deaths.into(), 1, 1_000),
            (
                "supervisor.death_window_ms",
                self.death_window_ms,
                1_000,
                86_400_000,
            ),
        ])
    }
}
/// `[metrics]`: what the Prometheus metrics keep.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// k of `orderflow_out_of_stock_top_skus`: one series per SKU, so at
    /// most [`crate::telemetry::saga_health::MAX_TOP_SKUS`]; 0 turns it off.
    pub top_out_of_stock_skus: usize,
}
impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            top_out_of_stock_skus: crate::telemetry::metrics::DEFAULT_TOP_SKUS,
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_size_bytes: 64 * 1024 * 1024,
            retention_bytes: 1024 * 1024 * 1024,
            max_record_bytes: 1024 * 1024,
            append_queue_depth: 4096,
            max_batch_records: 8192,
            fsync: true,
        }
    }
}
impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every_messages: 20_000,
            every_ms: 1_000,
        }
    }
}
impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            max_inflight: 256,
            max_backlog_records: 20_000,
            max_rss_bytes: 0,
        }
    }
}
/// Smallest non-zero `intake.max_rss_bytes`: below it no process runs at all.
pub const MIN_RSS_BOUND_BYTES: u64 = 1024 * 1024;
/// Largest `intake.max_rss_bytes` (1 PiB).
pub const MAX_RSS_BOUND_BYTES: u64 = 1 << 50;

impl LogConfig {
    /// Checks every key of the section; the message names it.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        range(
            "log.segment_size_bytes",
            self.segment_size_bytes,
            4096,
            1 << 40,
        )?;
        range(
            "log.retention_bytes",
            self.retention_bytes,
            self.segment_size_bytes,
            u64::MAX,
        )?;
        range(
            "log.max_record_bytes",
            self.max_record_bytes,
            1024,
            64 * 1024 * 1024,
        )?;
        if self.max_record_bytes as u64 > self.segment_size_bytes {
            return Err(ConfigError::Invalid(
                "`log.max_record_bytes` must not exceed `log.segment_size_bytes`".into(),
            ));
        }
        range(
            "log.append_queue_depth",
            self.append_queue_depth,
            1,
            1 << 20,
        )?;
        range("log.max_batch_records", self.max_batch_records, 1, 1 << 20)?;
        Ok(())
    }
}

impl CheckpointConfig {
    /// Checks every key of the section; the message names it.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        range("checkpoint.every_messages", self.every_messages, 1, 1 << 32)?;
        range("checkpoint.every_ms", self.every_ms, 1, 3_600_000)?;
        Ok(())
    }
}

impl ProcessorConfig {
    /// Checks every key; the parked bytes must hold a record of `log`, and the checkpoint of `partitions` partitions must fit the store.
    pub(super) fn validate(&self, log: &LogConfig, partitions: u32) -> Result<(), ConfigError> {
        range(
            "processor.order_retention_ms",
            self.order_retention_ms,
            60_000,
            365 * 86_400_000,
        )?;
        range(
            "processor.max_remembered_orders",
            self.max_remembered_orders,
            1_000,
            1 << 30,
        )?;
        let p = self;
        range(
            "processor.max_inflight_orders",
            p.max_inflight_orders,
            100,
            1 << 24,
        )?;
        range("processor.max_holds", p.max_holds, 100, 1 << 26)?;
        range("processor.max_skus", p.max_skus, 1, 1 << 26)?;
        range(
            "processor.max_parked_records",
            p.max_parked_records,
            1,
            1 << 20,
        )?;
        range(
            "processor.max_parked_bytes",
            p.max_parked_bytes,
            log.max_record_bytes,
            1 << 34,
        )?;
        // The checkpoint must fit the store whatever the traffic: its
        // manifest (one row) grows with the pages these limits allow.
        let bounds = crate::stages::snapshot::worst_case(&p.limits(), partitions);
        let max = crate::stages::snapshot::MAX_MANIFEST_BYTES;
        if bounds.manifest_bytes > max {
            return Err(ConfigError::Invalid(format!(
                "the processor limits (`processor.max_inflight_orders`, `max_holds`, `max_skus`, `max_parked_records`, `max_parked_bytes`, `max_remembered_orders`) allow a checkpoint of {} blobs whose manifest would take {} bytes, over the {max} a checkpoint may write in one row: lower them",
                bounds.blobs, bounds.manifest_bytes
            )));
        }
        Ok(())
    }
}

impl TrackingConfig {
    /// Checks every key of the section; the message names it.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        range(
            "tracking.retention_ms",
            self.retention_ms,
            60_000,
            365 * 86_400_000,
        )?;
        range("tracking.max_orders", self.max_orders, 1_000, 1 << 28)?;
        Ok(())
    }
}

impl IntakeConfig {
    /// Checks every key of the section; the message names it.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        range("intake.max_inflight", self.max_inflight, 1, 1 << 20)?;
        range(
            "intake.max_backlog_records",
            self.max_backlog_records,
            1,
            1 << 40,
        )?;
        let rss = self.max_rss_bytes;
        if rss != 0 && !(MIN_RSS_BOUND_BYTES..=MAX_RSS_BOUND_BYTES).contains(&rss) {
            return Err(ConfigError::Invalid(format!(
                "`intake.max_rss_bytes` = {rss} is out of range [{MIN_RSS_BOUND_BYTES}, {MAX_RSS_BOUND_BYTES}] (or 0: no bound)"
            )));
        }
        Ok(())
    }
}

impl MetricsConfig {
    /// Checks every key of the section; the message names it.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        range(
            "metrics.top_out_of_stock_skus",
            self.top_out_of_stock_skus,
            0,
            crate::telemetry::saga_health::MAX_TOP_SKUS,
        )?;
        Ok(())
    }
}
