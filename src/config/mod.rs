//! Configuration: defaults, overridden by an optional TOML file, then by
//! environment variables and flags (see `crate::cli`). Unknown keys are an
//! error, and `validate` checks every limit at start with a precise message.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod backends;
mod gateway;
mod http;
pub mod notifications;
mod pipeline;
mod secret;
pub mod sim_bounds;
mod tokens;
pub use backends::*;
pub use gateway::*;
pub use http::*;
pub use pipeline::*;
pub use secret::*;
pub use tokens::*;

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
        range("partitions", self.partitions, 1, 1024)?;
        range("status_partitions", self.status_partitions, 1, 1024)?;
        self.log.validate()?;
        self.checkpoint.validate()?;
        self.processor.validate(&self.log, self.partitions)?;
        self.tracking.validate()?;
        self.gateway.validate()?;
        self.http.validate()?;
        self.supervisor.validate()?;
        self.intake.validate()?;
        self.metrics.validate()?;
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

/// `key` = `v` must lie in `[lo, hi]`.
pub(crate) fn range<T: PartialOrd + Copy + std::fmt::Display>(
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

/// `(key, value, lo, hi)`: each value must lie in `[lo, hi]`.
pub(crate) fn check_ranges(ranges: &[(&str, u64, u64, u64)]) -> Result<(), ConfigError> {
    for &(key, v, lo, hi) in ranges {
        range(key, v, lo, hi)?;
    }
    Ok(())
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
        let c = Config::from_toml(include_str!("../../docker/orderflow.toml")).unwrap();
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
