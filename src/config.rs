//! Configuration: defaults, overridden by an optional TOML file, then by
//! environment variables and flags (see `crate::cli`). Unknown keys are an
//! error, and `validate` checks every limit at start with a precise message.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod backends;
pub mod notifications;
pub mod sim_bounds;
pub use backends::*;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP listen address (`--listen`, `ORDERFLOW_LISTEN`).
    pub listen: SocketAddr,
    /// Where the embedded log and state live (`--data-dir`, `ORDERFLOW_DATA_DIR`).
    pub data_dir: PathBuf,
    /// Partitions of the `orders` topic.
    pub partitions: u32,
    /// Partitions of the `order-status` topic.
    pub status_partitions: u32,
    pub log: LogConfig,
    pub checkpoint: CheckpointConfig,
    pub processor: ProcessorConfig,
    pub tracking: TrackingConfig,
    pub tokens: TokensConfig,
    /// `[auth]`: files of API tokens by role (`crate::http::auth`).
    pub auth: AuthConfig,
    pub gateway: GatewayConfig,
    pub http: HttpConfig,
    pub intake: IntakeConfig,
    pub metrics: MetricsConfig,
    /// `[supervisor]`: how dead partition tasks are restarted.
    pub supervisor: SupervisorConfig,
    /// `[notifications]`: webhooks and email; absent = no notifications.
    pub notifications: Option<NotificationsConfig>,
    /// `[kafka]`: Apache Kafka is the log (distributed deployment);
    /// absent = the embedded log in `data_dir`.
    pub kafka: Option<KafkaConfig>,
    /// `[scylla]`: ScyllaDB (or Cassandra) is the state store (distributed
    /// deployment); absent = the embedded store in `data_dir`.
    pub scylla: Option<ScyllaConfig>,
}

pub use notifications::NotificationsConfig;

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

/// Environment variable with the key tracking tokens are derived with.
pub const TOKEN_SECRET_ENV: &str = "ORDERFLOW_TOKEN_SECRET";
/// Environment variable with the previous key, accepted during a rotation.
pub const TOKEN_SECRET_PREVIOUS_ENV: &str = "ORDERFLOW_TOKEN_SECRET_PREVIOUS";

/// `[tokens]`: where the tracking token key comes from. The environment
/// wins over the files; with neither, a random key kept in the state store
/// (shared by every instance) is used.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TokensConfig {
    pub secret_file: Option<PathBuf>,
    pub previous_secret_file: Option<PathBuf>,
}

/// A configured key and where it came from (a variable's name or a path).
pub type SourcedKey = (Vec<u8>, String);

impl TokensConfig {
    /// `(current, previous)` keys from the environment or the files, with
    /// where they came from; `None` for the current key when neither is set.
    pub fn keys(&self) -> Result<(Option<SourcedKey>, Option<Vec<u8>>), ConfigError> {
        let read = |env: &str, file: &Option<PathBuf>| -> Result<Option<SourcedKey>, ConfigError> {
            if let Some(secret) = Secret::from_env(env) {
                return Ok(Some((secret.expose().as_bytes().to_vec(), env.to_owned())));
            }
            let Some(path) = file else { return Ok(None) };
            let text = std::fs::read(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let key = text.trim_ascii_end().to_vec();
            Ok(Some((key, path.display().to_string())))
        };
        let current = read(TOKEN_SECRET_ENV, &self.secret_file)?;
        let previous = read(TOKEN_SECRET_PREVIOUS_ENV, &self.previous_secret_file)?;
        if current.is_none() && previous.is_some() {
            return Err(ConfigError::Invalid(format!(
                "a previous tracking token key is set without a current one: set {TOKEN_SECRET_ENV} or `tokens.secret_file`"
            )));
        }
        Ok((current, previous.map(|(key, _)| key)))
    }
}

/// `[auth]`: files of API tokens, one a line, per role; read at start by
/// `crate::http::auth::Credentials::load`. A role's tokens may instead come
/// from `ORDERFLOW_<ROLE>_TOKEN` (comma-separated) or the file
/// `ORDERFLOW_<ROLE>_TOKEN_FILE` names; one source per role.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub admin_token_file: Option<PathBuf>,
    pub reader_token_file: Option<PathBuf>,
    pub producer_token_file: Option<PathBuf>,
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

/// Which payment gateway the effect executor calls (`gateway.kind`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GatewayKind {
    /// The in-process simulator (Stripe test tokens, no network).
    #[default]
    Simulator,
    /// A Stripe-compatible HTTP API at `gateway.url`: Stripe itself,
    /// `stripe-mock`, or `orderflow gateway-sim`.
    Stripe,
}

impl GatewayKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GatewayKind::Simulator => "simulator",
            GatewayKind::Stripe => "stripe",
        }
    }
}

/// Environment variable holding the Stripe secret key (wins over
/// `gateway.secret_key_file`).
pub const STRIPE_SECRET_KEY_ENV: &str = "ORDERFLOW_STRIPE_SECRET_KEY";

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// `simulator` (default) or `stripe`.
    pub kind: GatewayKind,
    /// `stripe` only: base URL of the Stripe-compatible API.
    pub url: String,
    /// `stripe` only: file holding the secret key, read at start when
    /// `ORDERFLOW_STRIPE_SECRET_KEY` is not set. Never logged.
    pub secret_key_file: Option<PathBuf>,
    /// `stripe` only: whole-request timeout of one call.
    pub timeout_ms: u64,
    /// `stripe` only: TCP/TLS connect timeout of one call.
    pub connect_timeout_ms: u64,
    /// An authorization not answered within this time (all attempts and
    /// back-offs included) ends `payment_failed` (`gateway_unavailable`).
    pub payment_deadline_ms: u64,
    /// Circuit breaker: outcomes of the last N calls considered.
    pub breaker_window: u32,
    /// Circuit breaker: opens when this share of the window failed ...
    pub breaker_failure_ratio: f64,
    /// ... and the window holds at least this many calls.
    pub breaker_min_calls: u32,
    /// Circuit breaker: time open before probe calls are let through.
    pub breaker_cooldown_ms: u64,
    /// Circuit breaker: probe calls in flight at once while half-open.
    pub breaker_half_open_probes: u32,
    /// Simulator only: latency of each gateway call.
    pub latency_ms: u64,
    /// Simulator only: probability (0 to 1) that a call fails as unavailable.
    pub failure_rate: f64,
    /// Simulator only: payment intents kept at most. A create finding them
    /// all kept forgets the oldest settled one, or answers 429 when all
    /// are uncaptured authorizations (`gateway::simulator` has the bounds).
    pub sim_max_intents: usize,
    /// Simulator only: a settled intent is forgotten this long after it
    /// settled.
    pub sim_intent_retention_ms: u64,
    /// Simulator only: an authorization not captured this long after it
    /// was made is canceled (`automatic`), as Stripe's expire in 7 days.
    pub sim_authorization_ttl_ms: u64,
    /// Simulator only: idempotency keys kept at most (oldest forgotten).
    pub sim_max_keys: usize,
    /// Simulator only: an idempotency key is forgotten this long after its
    /// first answer (Stripe: 24 h).
    pub sim_key_ttl_ms: u64,
    /// Simulator only: calls kept in its ledger, when it records them.
    pub sim_max_calls: usize,
    /// Effects (gateway calls) in flight at once, over all partitions.
    pub max_inflight: usize,
    /// Captures and voids the effect executor holds at once, in flight or
    /// parked during an outage; at the bound it takes no new effect until
    /// one ends (back-pressure; nothing is dropped).
    pub max_parked_effects: usize,
    /// Attempts per effect before an authorization ends `payment_failed`.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, with jitter.
    pub retry_base_ms: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Larger request bodies answer 413.
    pub body_limit_bytes: usize,
    /// Seconds a client is told to wait (`Retry-After`) when intake is full.
    pub retry_after_s: u32,
    /// Most SSE streams open at once.
    pub max_sse_streams: usize,
    /// A request head (request line and headers) must be complete this long
    /// after the connection opened (TLS handshake included) or after the
    /// first byte of a later request, else the connection is closed. A
    /// deadline, not an inactivity timer: a client dripping bytes
    /// (slowloris) does not extend it.
    pub header_timeout_ms: u64,
    /// A request body must be complete this long after its head, else the
    /// request answers 408 `body_timeout` and the connection closes.
    pub body_timeout_ms: u64,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout_ms: u64,
    /// Connections open at once (SSE streams included); more are closed at
    /// accept and counted in `orderflow_http_connections_refused_total`.
    pub max_connections: usize,
    /// Requests per second allowed per client IP (IPv6: per /64), as a
    /// token bucket refilled at this rate; 0 = no rate limit (the default:
    /// behind a proxy every client shares the proxy's address).
    pub rate_limit_per_s: u32,
    /// Bucket size of the rate limit: requests a client may send at once.
    pub rate_limit_burst: u32,
    /// `[http.tls]`: serve HTTPS only, with this certificate; absent =
    /// plain HTTP.
    pub tls: Option<TlsConfig>,
}

/// `[http.tls]`: PEM files of the server's certificate chain (leaf first)
/// and its private key (PKCS#8, PKCS#1 or SEC1). Read once at start.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
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
    fn validate(&self) -> Result<(), ConfigError> {
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

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("valid default address"),
            data_dir: PathBuf::from("data"),
            partitions: 8,
            status_partitions: 8,
            log: LogConfig::default(),
            checkpoint: CheckpointConfig::default(),
            processor: ProcessorConfig::default(),
            tracking: TrackingConfig::default(),
            tokens: TokensConfig::default(),
            auth: AuthConfig::default(),
            gateway: GatewayConfig::default(),
            http: HttpConfig::default(),
            intake: IntakeConfig::default(),
            metrics: MetricsConfig::default(),
            supervisor: SupervisorConfig::default(),
            notifications: None,
            kafka: None,
            scylla: None,
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

impl Default for GatewayConfig {
    fn default() -> Self {
        use sim_bounds as sim;
        GatewayConfig {
            kind: GatewayKind::Simulator,
            url: "https://api.stripe.com".into(),
            secret_key_file: None,
            timeout_ms: 10_000,
            connect_timeout_ms: 2_000,
            payment_deadline_ms: 30_000,
            breaker_window: 50,
            breaker_failure_ratio: 0.5,
            breaker_min_calls: 20,
            breaker_cooldown_ms: 5_000,
            breaker_half_open_probes: 3,
            latency_ms: 0,
            failure_rate: 0.0,
            sim_max_intents: sim::DEFAULT_MAX_INTENTS,
            sim_intent_retention_ms: sim::DEFAULT_INTENT_RETENTION_MS,
            sim_authorization_ttl_ms: sim::DEFAULT_AUTHORIZATION_TTL_MS,
            sim_max_keys: sim::DEFAULT_MAX_KEYS,
            sim_key_ttl_ms: sim::DEFAULT_KEY_TTL_MS,
            sim_max_calls: sim::DEFAULT_MAX_CALLS,
            max_inflight: 10_000,
            max_parked_effects: 10_000,
            max_attempts: 4,
            retry_base_ms: 20,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            body_limit_bytes: 64 * 1024,
            retry_after_s: 1,
            max_sse_streams: 10_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 10_000,
            rate_limit_per_s: 0,
            rate_limit_burst: 100,
            tls: None,
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

#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A command's options (`orderflow bench`, `sim`, `gateway-sim`).
    #[error("{0}")]
    Usage(String),
}

impl ConfigError {
    /// An operator's settings (or a user's options) are wrong: never retried.
    pub fn fault(&self) -> crate::domain::fault::Fault {
        match self {
            ConfigError::Usage(_) => crate::domain::fault::Fault::Input,
            _ => crate::domain::fault::Fault::Operator,
        }
    }
}

impl Config {
    /// Defaults overridden by the TOML file at `path`.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<inline>".into(),
            message: e.to_string(),
        })
    }

    /// Checks every limit; the message names the key and the allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn range<T: PartialOrd + Copy + std::fmt::Display>(
            key: &str,
            v: T,
            lo: T,
            hi: T,
        ) -> Result<(), ConfigError> {
            // Not `v < lo || v > hi`, which a TOML `nan` passes.
            if !(lo..=hi).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "`{key}` = {v} is out of range [{lo}, {hi}]"
                )));
            }
            Ok(())
        }
        range("partitions", self.partitions, 1, 1024)?;
        range("status_partitions", self.status_partitions, 1, 1024)?;
        range(
            "log.segment_size_bytes",
            self.log.segment_size_bytes,
            4096,
            1 << 40,
        )?;
        range(
            "log.retention_bytes",
            self.log.retention_bytes,
            self.log.segment_size_bytes,
            u64::MAX,
        )?;
        range(
            "log.max_record_bytes",
            self.log.max_record_bytes,
            1024,
            64 * 1024 * 1024,
        )?;
        if self.log.max_record_bytes as u64 > self.log.segment_size_bytes {
            return Err(ConfigError::Invalid(
                "`log.max_record_bytes` must not exceed `log.segment_size_bytes`".into(),
            ));
        }
        range(
            "log.append_queue_depth",
            self.log.append_queue_depth,
            1,
            1 << 20,
        )?;
        range(
            "log.max_batch_records",
            self.log.max_batch_records,
            1,
            1 << 20,
        )?;
        range(
            "checkpoint.every_messages",
            self.checkpoint.every_messages,
            1,
            1 << 32,
        )?;
        range(
            "checkpoint.every_ms",
            self.checkpoint.every_ms,
            1,
            3_600_000,
        )?;
        range(
            "processor.order_retention_ms",
            self.processor.order_retention_ms,
            60_000,
            365 * 86_400_000,
        )?;
        range(
            "processor.max_remembered_orders",
            self.processor.max_remembered_orders,
            1_000,
            1 << 30,
        )?;
        let p = &self.processor;
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
            self.log.max_record_bytes,
            1 << 34,
        )?;
        // The checkpoint must fit the store whatever the traffic: its
        // manifest (one row) grows with the pages these limits allow.
        let bounds = crate::stages::snapshot::worst_case(&p.limits(), self.partitions);
        let max = crate::stages::snapshot::MAX_MANIFEST_BYTES;
        if bounds.manifest_bytes > max {
            return Err(ConfigError::Invalid(format!(
                "the processor limits (`processor.max_inflight_orders`, `max_holds`, `max_skus`, `max_parked_records`, `max_parked_bytes`, `max_remembered_orders`) allow a checkpoint of {} blobs whose manifest would take {} bytes, over the {max} a checkpoint may write in one row: lower them",
                bounds.blobs, bounds.manifest_bytes
            )));
        }
        range(
            "tracking.retention_ms",
            self.tracking.retention_ms,
            60_000,
            365 * 86_400_000,
        )?;
        range(
            "tracking.max_orders",
            self.tracking.max_orders,
            1_000,
            1 << 28,
        )?;
        range("gateway.latency_ms", self.gateway.latency_ms, 0, 60_000)?;
        range("gateway.failure_rate", self.gateway.failure_rate, 0.0, 1.0)?;
        range(
            "gateway.max_inflight",
            self.gateway.max_inflight,
            1,
            1 << 20,
        )?;
        range(
            "gateway.max_parked_effects",
            self.gateway.max_parked_effects,
            1,
            1 << 20,
        )?;
        range("gateway.max_attempts", self.gateway.max_attempts, 1, 100)?;
        range(
            "gateway.retry_base_ms",
            self.gateway.retry_base_ms,
            1,
            60_000,
        )?;
        self.gateway.validate()?;
        range(
            "http.body_limit_bytes",
            self.http.body_limit_bytes,
            256,
            16 * 1024 * 1024,
        )?;
        range("http.retry_after_s", self.http.retry_after_s, 1, 3600)?;
        range(
            "http.max_sse_streams",
            self.http.max_sse_streams,
            1,
            1 << 20,
        )?;
        self.http.validate()?;
        self.supervisor.validate()?;
        range("intake.max_inflight", self.intake.max_inflight, 1, 1 << 20)?;
        range(
            "intake.max_backlog_records",
            self.intake.max_backlog_records,
            1,
            1 << 40,
        )?;
        range(
            "metrics.top_out_of_stock_skus",
            self.metrics.top_out_of_stock_skus,
            0,
            crate::telemetry::saga_health::MAX_TOP_SKUS,
        )?;
        let rss = self.intake.max_rss_bytes;
        if rss != 0 && !(MIN_RSS_BOUND_BYTES..=MAX_RSS_BOUND_BYTES).contains(&rss) {
            return Err(ConfigError::Invalid(format!(
                "`intake.max_rss_bytes` = {rss} is out of range [{MIN_RSS_BOUND_BYTES}, {MAX_RSS_BOUND_BYTES}] (or 0: no bound)"
            )));
        }
        if let Some(n) = &self.notifications {
            n.validate()?;
        }
        if let Some(k) = &self.kafka {
            k.validate()?;
        }
        if let Some(s) = &self.scylla {
            s.validate()?;
        }
        if self.kafka.is_some() && self.scylla.is_none() {
            return Err(ConfigError::Invalid(KAFKA_WITHOUT_SCYLLA.into()));
        }
        if self.kafka.is_some() && self.gateway.kind == GatewayKind::Simulator {
            return Err(ConfigError::Invalid(KAFKA_WITH_SIMULATOR.into()));
        }
        Ok(())
    }
}

/// Why `[kafka]` needs `[scylla]`: instances on Kafka share the partitions
/// through the consumer group, so the state store must be shared too. The
/// embedded store in each `data_dir` cannot fence a partition's previous
/// owner, and keeps checkpoints and read-model positions no other instance
/// sees.
pub const KAFKA_WITHOUT_SCYLLA: &str = "`[kafka]` (or ORDERFLOW_KAFKA_BOOTSTRAP) needs `[scylla]` (or ORDERFLOW_SCYLLA_NODES): \
     instances on Kafka share partitions through the consumer group, and without the shared ScyllaDB store \
     there is no cross-instance fencing (two instances could run one partition at once and sell the same \
     stock twice) and no shared read model (each instance would keep its own checkpoints and tracking \
     positions); add `[scylla]`, or remove `[kafka]` for the embedded deployment";

/// Why `[kafka]` refuses the in-process gateway simulator: its ledger
/// lives in one process, and a partition's payments move with it. After a
/// failover the new owner captures authorizations its own simulator never
/// saw, and those orders stay confirmed and unpaid.
pub const KAFKA_WITH_SIMULATOR: &str = "`[kafka]` needs a payment gateway every instance shares, not the \
     in-process simulator (`gateway.kind` = \"simulator\", the default): its ledger lives in one process, so \
     after a failover the new owner would capture authorizations its own simulator never saw and leave those \
     orders confirmed and unpaid; set `[gateway]` `kind = \"stripe\"` with `url` pointing at \
     `orderflow gateway-sim` (one for the whole deployment) or at a real Stripe-compatible API";

impl HttpConfig {
    /// Checks the server's deadlines, limits and TLS keys (called by
    /// [`Config::validate`]); the TLS files themselves are read at start.
    fn validate(&self) -> Result<(), ConfigError> {
        let ranges: [(&str, u64, u64, u64); 6] = [
            (
                "http.header_timeout_ms",
                self.header_timeout_ms,
                100,
                300_000,
            ),
            ("http.body_timeout_ms", self.body_timeout_ms, 100, 3_600_000),
            ("http.idle_timeout_ms", self.idle_timeout_ms, 100, 3_600_000),
            (
                "http.max_connections",
                self.max_connections as u64,
                1,
                1_000_000,
            ),
            (
                "http.rate_limit_per_s",
                self.rate_limit_per_s.into(),
                0,
                1_000_000,
            ),
            (
                "http.rate_limit_burst",
                self.rate_limit_burst.into(),
                1,
                1_000_000,
            ),
        ];
        check_ranges(&ranges)?;
        if let Some(tls) = &self.tls {
            for (key, path) in [
                ("http.tls.cert_path", &tls.cert_path),
                ("http.tls.key_path", &tls.key_path),
            ] {
                if path.as_os_str().is_empty() {
                    return Err(ConfigError::Invalid(format!(
                        "`{key}` must name a PEM file"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// `(key, value, lo, hi)`: each value must lie in `[lo, hi]`.
pub(crate) fn check_ranges(ranges: &[(&str, u64, u64, u64)]) -> Result<(), ConfigError> {
    for &(key, v, lo, hi) in ranges {
        if v < lo || v > hi {
            return Err(ConfigError::Invalid(format!(
                "`{key}` = {v} is out of range [{lo}, {hi}]"
            )));
        }
    }
    Ok(())
}

impl GatewayConfig {
    /// Checks the gateway keys beyond their plain ranges (called by
    /// [`Config::validate`]).
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let ranges: [(&str, u64, u64, u64); 6] = [
            ("gateway.timeout_ms", self.timeout_ms, 1, 600_000),
            (
                "gateway.connect_timeout_ms",
                self.connect_timeout_ms,
                1,
                600_000,
            ),
            (
                "gateway.payment_deadline_ms",
                self.payment_deadline_ms,
                1,
                3_600_000,
            ),
            (
                "gateway.breaker_window",
                self.breaker_window.into(),
                1,
                100_000,
            ),
            (
                "gateway.breaker_cooldown_ms",
                self.breaker_cooldown_ms,
                1,
                3_600_000,
            ),
            (
                "gateway.breaker_half_open_probes",
                self.breaker_half_open_probes.into(),
                1,
                10_000,
            ),
        ];
        check_ranges(&ranges)?;
        if self.breaker_min_calls < 1 || self.breaker_min_calls > self.breaker_window {
            return invalid(format!(
                "`gateway.breaker_min_calls` = {} is out of range [1, {}] (at most `gateway.breaker_window`)",
                self.breaker_min_calls, self.breaker_window
            ));
        }
        let ratio = self.breaker_failure_ratio;
        if !(ratio > 0.0 && ratio <= 1.0) {
            return invalid(format!(
                "`gateway.breaker_failure_ratio` = {ratio} is out of range (0, 1]"
            ));
        }
        // The simulator's bounds share their ranges with gateway-sim's flags.
        let ranges = sim_bounds::ranges(
            self.sim_max_intents,
            self.sim_intent_retention_ms,
            self.sim_authorization_ttl_ms,
            self.sim_max_keys,
            self.sim_key_ttl_ms,
            self.sim_max_calls,
        );
        for (name, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return invalid(format!(
                    "`gateway.sim_{name}` = {v} is out of range [{lo}, {hi}]"
                ));
            }
        }
        if self.kind == GatewayKind::Stripe {
            let url = self.url.trim();
            let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
            let rest = url.split_once("://").map_or("", |(_, r)| r);
            let host = rest.split('/').next().unwrap_or("");
            if !scheme_ok || host.is_empty() {
                return invalid(format!(
                    "`gateway.url` = {url:?} must be an http:// or https:// URL with a host"
                ));
            }
            if host.contains('@') || url.contains('?') || url.contains('#') {
                return invalid(
                    "`gateway.url` must not carry credentials, a query or a fragment (the secret key comes from ORDERFLOW_STRIPE_SECRET_KEY or `gateway.secret_key_file`)".into(),
                );
            }
        }
        Ok(())
    }

    /// The Stripe secret key: `ORDERFLOW_STRIPE_SECRET_KEY`, else the
    /// trimmed content of `secret_key_file`. Errors name where it was
    /// looked for, never its value.
    pub fn stripe_secret_key(&self) -> Result<Secret, ConfigError> {
        Secret::from_env_or_file(
            STRIPE_SECRET_KEY_ENV,
            self.secret_key_file.as_deref(),
            "gateway.secret_key_file",
        )
        .map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Invalid(format!(
                "`gateway.kind` = \"stripe\" needs a secret key: {m}"
            )),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defaults are valid; a partial file overrides only what it names.
    #[test]
    fn defaults_and_partial_file() {
        Config::default().validate().unwrap();
        let c = Config::from_toml("partitions = 4\n[log]\nfsync = false\n").unwrap();
        assert_eq!(c.partitions, 4);
        assert!(!c.log.fsync);
        assert_eq!(
            c.log.segment_size_bytes,
            LogConfig::default().segment_size_bytes
        );
    }

    /// The compose deployment's file is valid and turns on both distributed backends.
    #[test]
    fn docker_config_is_valid() {
        let c = Config::from_toml(include_str!("../docker/orderflow.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.kafka.unwrap().bootstrap_servers, "kafka:9092");
        assert_eq!(c.scylla.unwrap().nodes, vec!["scylla:9042".to_owned()]);
    }

    /// Distributed sections validate their names and ranges precisely.
    #[test]
    fn distributed_sections_are_checked() {
        let bad_prefix = Config::from_toml("[kafka]\ntopic_prefix = \"a b\"\n").unwrap();
        let e = bad_prefix.validate().unwrap_err().to_string();
        assert!(e.contains("kafka.topic_prefix"), "{e}");
        let bad_keyspace = Config::from_toml("[scylla]\nkeyspace = \"1x\"\n").unwrap();
        let e = bad_keyspace.validate().unwrap_err().to_string();
        assert!(e.contains("scylla.keyspace"), "{e}");
        let bad_timeout = Config::from_toml("[kafka]\nsession_timeout_ms = 10\n").unwrap();
        let e = bad_timeout.validate().unwrap_err().to_string();
        assert!(e.contains("kafka.session_timeout_ms"), "{e}");
        let e = Config::from_toml("[kafka]\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs `[scylla]`") && e.contains("fencing") && e.contains("read model"),
            "{e}"
        );
        let e = Config::from_toml("[kafka]\n[scylla]\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("in-process simulator") && e.contains("gateway-sim"),
            "{e}"
        );
        Config::from_toml("[kafka]\n[scylla]\n[gateway]\nkind = \"stripe\"\n")
            .unwrap()
            .validate()
            .unwrap();
        let e = Config::from_toml("[scylla]\nconsistency = \"all\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("consistency"), "{e}");
    }

    /// Limits whose worst-case checkpoint would not fit one manifest row are refused by name.
    #[test]
    fn limits_must_fit_a_checkpoint() {
        let c = Config::from_toml(
            "[processor]\nmax_inflight_orders = 16777216\nmax_holds = 67108864\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("processor.max_inflight_orders") && e.contains("manifest"),
            "{e}"
        );
    }

    /// `gateway.failure_rate = nan` (broke the `config` fuzz target's invariant) is out of range.
    #[test]
    fn nan_is_out_of_range() {
        let c = Config::from_toml("[gateway]\nfailure_rate = nan\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`gateway.failure_rate` = NaN"), "{e}");
    }

    /// Unknown keys and out-of-range values are precise errors.
    #[test]
    fn errors() {
        let e = Config::from_toml("partitons = 4").unwrap_err().to_string();
        assert!(e.contains("partitons"), "{e}");
        let c = Config {
            partitions: 0,
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`partitions` = 0")
        );
    }

    /// `metrics.top_out_of_stock_skus` is read and held to its hard limit.
    #[test]
    fn top_out_of_stock_skus_limit() {
        assert_eq!(Config::default().metrics.top_out_of_stock_skus, 10);
        let c = Config::from_toml("[metrics]\ntop_out_of_stock_skus = 0\n").unwrap();
        c.validate().unwrap();
        let c = Config::from_toml("[metrics]\ntop_out_of_stock_skus = 101\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("`metrics.top_out_of_stock_skus` = 101 is out of range [0, 100]"),
            "{e}"
        );
    }

    /// `gateway.max_parked_effects` is read from the file and held to
    /// [1, 2^20], the key and range in the message.
    #[test]
    fn max_parked_effects_range() {
        assert_eq!(Config::default().gateway.max_parked_effects, 10_000);
        let c = Config::from_toml("[gateway]\nmax_parked_effects = 3\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.gateway.max_parked_effects, 3);
        for bad in [0, (1 << 20) + 1] {
            let c = Config::from_toml(&format!("[gateway]\nmax_parked_effects = {bad}\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "`gateway.max_parked_effects` = {bad} is out of range [1, 1048576]"
                )),
                "{e}"
            );
        }
    }

    /// The `[intake]` limits are read from the file and checked with the key
    /// and range in the message; 0 turns the memory bound off.
    #[test]
    fn intake_section() {
        let c = Config::from_toml(
            "[intake]\nmax_inflight = 8\nmax_backlog_records = 100\nmax_rss_bytes = 536870912\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.intake,
            IntakeConfig {
                max_inflight: 8,
                max_backlog_records: 100,
                max_rss_bytes: 512 * 1024 * 1024,
            }
        );
        assert_eq!(Config::default().intake.max_rss_bytes, 0);
        let bad = |edit: fn(&mut IntakeConfig), want: &str| {
            let mut c = Config::default();
            edit(&mut c.intake);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e} should name {want}");
        };
        bad(|i| i.max_inflight = 0, "`intake.max_inflight` = 0");
        bad(
            |i| i.max_backlog_records = 0,
            "`intake.max_backlog_records` = 0",
        );
        bad(|i| i.max_rss_bytes = 1000, "`intake.max_rss_bytes` = 1000");
        let e = Config::from_toml("[intake]\nmax_rss = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_rss"), "{e}");
    }

    /// The `[gateway]` section: kinds, unknown keys, and precise errors for
    /// the breaker, timeout and URL settings.
    #[test]
    fn gateway_section() {
        let c = Config::from_toml(
            "[gateway]\nkind = \"stripe\"\nurl = \"http://127.0.0.1:9\"\ntimeout_ms = 500\nbreaker_window = 10\nbreaker_min_calls = 5\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.gateway.kind, GatewayKind::Stripe);
        let e = Config::from_toml("[gateway]\nkind = \"paypal\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("paypal") && e.contains("stripe"), "{e}");
        let e = Config::from_toml("[gateway]\nbreaker_windw = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("breaker_windw"), "{e}");
        let bad = |edit: fn(&mut GatewayConfig), want: &str| {
            let mut c = Config::default();
            edit(&mut c.gateway);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e} should name {want}");
        };
        bad(
            |g| g.breaker_min_calls = 60,
            "`gateway.breaker_min_calls` = 60",
        );
        bad(
            |g| g.breaker_failure_ratio = 0.0,
            "`gateway.breaker_failure_ratio`",
        );
        bad(|g| g.timeout_ms = 0, "`gateway.timeout_ms` = 0");
        bad(
            |g| g.payment_deadline_ms = 0,
            "`gateway.payment_deadline_ms`",
        );
        bad(
            |g| g.breaker_half_open_probes = 0,
            "`gateway.breaker_half_open_probes`",
        );
        bad(
            |g| {
                g.kind = GatewayKind::Stripe;
                g.url = "ftp://x".into();
            },
            "`gateway.url`",
        );
        bad(
            |g| {
                g.kind = GatewayKind::Stripe;
                g.url = "https://sk_live_x@api.stripe.com".into();
            },
            "credentials",
        );
    }

    /// The `[http]` deadlines, limits and `[http.tls]` are checked with
    /// precise errors; TLS needs both files and takes no other key.
    #[test]
    fn http_section() {
        let c = Config::from_toml(
            "[http]\nheader_timeout_ms = 500\nmax_connections = 16\nrate_limit_per_s = 5\n[http.tls]\ncert_path = \"c.pem\"\nkey_path = \"k.pem\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.http.header_timeout_ms, 500);
        assert_eq!(
            c.http.rate_limit_burst,
            HttpConfig::default().rate_limit_burst
        );
        assert_eq!(c.http.tls.unwrap().cert_path, PathBuf::from("c.pem"));
        let e = Config::from_toml("[http.tls]\ncert_path = \"c.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_path"), "{e}");
        let e = Config::from_toml("[http]\nheader_timeout = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("header_timeout"), "{e}");
        let bad = |edit: fn(&mut HttpConfig), want: &str| {
            let mut c = Config::default();
            edit(&mut c.http);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e} should name {want}");
        };
        bad(
            |h| h.header_timeout_ms = 10,
            "`http.header_timeout_ms` = 10 is out of range [100, 300000]",
        );
        bad(|h| h.body_timeout_ms = 0, "`http.body_timeout_ms` = 0");
        bad(|h| h.idle_timeout_ms = 0, "`http.idle_timeout_ms` = 0");
        bad(|h| h.max_connections = 0, "`http.max_connections` = 0");
        bad(|h| h.rate_limit_burst = 0, "`http.rate_limit_burst` = 0");
        bad(
            |h| h.rate_limit_per_s = 2_000_000,
            "`http.rate_limit_per_s` = 2000000",
        );
        bad(
            |h| {
                h.tls = Some(TlsConfig {
                    cert_path: PathBuf::new(),
                    key_path: "k.pem".into(),
                })
            },
            "`http.tls.cert_path`",
        );
    }

    /// The secret key file is read and trimmed; a missing key is a precise
    /// error that never contains a key.
    #[test]
    fn stripe_secret_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "sk_test_fromfile\n").unwrap();
        let g = GatewayConfig {
            secret_key_file: Some(path),
            ..GatewayConfig::default()
        };
        if std::env::var(STRIPE_SECRET_KEY_ENV).is_err() {
            assert_eq!(g.stripe_secret_key().unwrap().expose(), "sk_test_fromfile");
            let e = GatewayConfig::default()
                .stripe_secret_key()
                .unwrap_err()
                .to_string();
            assert!(e.contains(STRIPE_SECRET_KEY_ENV), "{e}");
        }
    }
}

/// A secret from the environment (admin token, API keys). Its `Debug` and
/// `Display` never show it, and comparison takes constant time.
#[derive(Clone)]
pub struct Secret(String);

/// Equality is [`Secret::matches`]: a derived `==` would stop at the first
/// differing byte and leak, through timing, how much of a guess is right.
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.matches(&other.0)
    }
}

impl Eq for Secret {}

impl Secret {
    /// `None` for an absent or empty value.
    pub fn from_env(var: &str) -> Option<Secret> {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret)
    }

    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The variable `env`, else the trimmed content of `file` (the config
    /// key `key` names it). Errors say where it was looked for, never what
    /// was found.
    pub fn from_env_or_file(
        env: &str,
        file: Option<&Path>,
        key: &str,
    ) -> Result<Secret, ConfigError> {
        if let Some(secret) = Secret::from_env(env) {
            return Ok(secret);
        }
        let Some(path) = file else {
            return Err(ConfigError::Invalid(format!("set {env} or `{key}`")));
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let value = text.trim();
        if value.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "`{key}` {} is empty",
                path.display()
            )));
        }
        Ok(Secret::new(value))
    }

    /// Constant-time comparison with a presented value.
    pub fn matches(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        // Hash both sides so neither length nor content leaks through timing.
        use sha2::{Digest, Sha256};
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(presented.as_bytes());
        a.ct_eq(&b).into()
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Environment variable holding the admin tokens (comma-separated; see
/// `crate::http::auth::Role`).
pub const ADMIN_TOKEN_ENV: &str = "ORDERFLOW_ADMIN_TOKEN";

#[cfg(test)]
mod secret_tests {
    use super::*;

    /// A secret never prints and compares only equal to itself.
    #[test]
    fn redacted_and_constant_time() {
        let s = Secret::new("hunter2-admin");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(s.matches("hunter2-admin"));
        assert!(!s.matches("hunter2-admiN"));
        assert!(!s.matches(""));
    }

    /// `==` between secrets takes the constant-time path too: equal only
    /// to the same value, never to a prefix, an extension or a near miss.
    #[test]
    fn equality_is_the_constant_time_match() {
        let s = Secret::new("hunter2-admin");
        assert_eq!(s, Secret::new("hunter2-admin"));
        for other in ["hunter2-admi", "hunter2-admin2", "Hunter2-admin", ""] {
            assert_ne!(s, Secret::new(other), "{other:?}");
        }
    }
}
