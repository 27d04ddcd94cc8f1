//! `[kafka]` and `[scylla]`: the distributed deployment's backends, and
//! how orderflow connects to them (TLS, SASL, passwords, librdkafka
//! properties). Secrets come only from the environment or files, are read
//! when a client is created, and are never logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, Secret, check_ranges};

/// Environment variable naming Kafka's bootstrap servers (adds `[kafka]`
/// with its defaults when the file has none).
pub const KAFKA_BOOTSTRAP_ENV: &str = "ORDERFLOW_KAFKA_BOOTSTRAP";
/// Environment variable naming ScyllaDB contact points, comma-separated
/// (adds `[scylla]` with its defaults when the file has none).
pub const SCYLLA_NODES_ENV: &str = "ORDERFLOW_SCYLLA_NODES";

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]` of the brokers.
    pub bootstrap_servers: String,
    /// Consumer group of the instances: they share the partitions of
    /// `orders` (runners) and `order-status` (sinks).
    pub group_id: String,
    /// Prefix of the topic names (`{prefix}orders`, `{prefix}order-status`),
    /// so several deployments (or tests) can share one cluster.
    pub topic_prefix: String,
    /// A member not heard from in this time loses its partitions (it
    /// heartbeats every fifth of it); failover after a crash takes about
    /// this long (docs/operations.md, "Failover time").
    pub session_timeout_ms: u64,
    /// Timeout of one produce (retries included) and of admin calls.
    pub request_timeout_ms: u64,
    /// Replication factor of topics orderflow creates (1 on one broker).
    pub replication_factor: u16,
    /// How long the producer waits to fill a batch (librdkafka `linger.ms`).
    pub linger_ms: u64,
    /// `retention.ms` of `orders-parked` when orderflow creates it: the
    /// topic is an audit trail of what was parked, retried and dropped;
    /// the lane itself lives in the checkpoints.
    pub parked_retention_ms: u64,
    /// `[kafka.tls]`: TLS to the brokers; absent = plaintext.
    pub tls: Option<BackendTlsConfig>,
    /// `[kafka.sasl]`: SASL authentication; absent = none.
    pub sasl: Option<KafkaSaslConfig>,
    /// `[kafka.client]`: any other librdkafka property, for every client
    /// orderflow creates (see [`RESERVED_KAFKA_PROPERTIES`]).
    pub client: BTreeMap<String, PropertyValue>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            group_id: "orderflow".into(),
            topic_prefix: String::new(),
            session_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            replication_factor: 1,
            linger_ms: 1,
            parked_retention_ms: 7 * 24 * 3_600_000,
            tls: None,
            sasl: None,
            client: BTreeMap::new(),
        }
    }
}

/// Consistency level of CQL statements (`scylla.consistency`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CqlConsistency {
    One,
    #[default]
    LocalQuorum,
    Quorum,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Replication factor `orderflow migrate` creates the keyspace with.
    pub replication_factor: u16,
    /// Timeout of one CQL request.
    pub request_timeout_ms: u64,
    /// Consistency of reads and writes; lightweight transactions use the
    /// matching serial consistency (`LOCAL_SERIAL` or `SERIAL`).
    pub consistency: CqlConsistency,
    /// `[scylla.tls]`: TLS to the nodes; absent = plaintext.
    pub tls: Option<BackendTlsConfig>,
    /// `[scylla.auth]`: username and password (PasswordAuthenticator);
    /// absent = no authentication.
    pub auth: Option<ScyllaAuthConfig>,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        ScyllaConfig {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "orderflow".into(),
            replication_factor: 1,
            request_timeout_ms: 5_000,
            consistency: CqlConsistency::LocalQuorum,
            tls: None,
            auth: None,
        }
    }
}

impl KafkaConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.bootstrap_servers.trim().is_empty() || self.group_id.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "`kafka.bootstrap_servers` and `kafka.group_id` must not be empty".into(),
            ));
        }
        // Kafka's legal topic characters; the longest name must fit 249.
        let prefix_ok = self.topic_prefix.len() <= 200
            && self
                .topic_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !prefix_ok {
            return Err(ConfigError::Invalid(format!(
                "`kafka.topic_prefix` = {:?}: at most 200 of letters, digits, `.`, `_`, `-`",
                self.topic_prefix
            )));
        }
        let ranges: [(&str, u64, u64, u64); 5] = [
            (
                "kafka.session_timeout_ms",
                self.session_timeout_ms,
                1_000,
                300_000,
            ),
            (
                "kafka.request_timeout_ms",
                self.request_timeout_ms,
                100,
                600_000,
            ),
            (
                "kafka.replication_factor",
                self.replication_factor.into(),
                1,
                16,
            ),
            ("kafka.linger_ms", self.linger_ms, 0, 1_000),
            (
                "kafka.parked_retention_ms",
                self.parked_retention_ms,
                60_000,
                365 * 24 * 3_600_000,
            ),
        ];
        check_ranges(&ranges)?;
        if let Some(tls) = &self.tls {
            tls.validate("kafka.tls")?;
        }
        if let Some(sasl) = &self.sasl {
            check_username("kafka.sasl.username", &sasl.username)?;
            if sasl.mechanism == SaslMechanism::Plain && self.tls.is_none() {
                return Err(ConfigError::Invalid(
                    "`kafka.sasl.mechanism` = \"PLAIN\" sends the password in clear text: add `[kafka.tls]` (or use SCRAM)".into(),
                ));
            }
        }
        self.validate_client_properties()
    }

    /// `[kafka.client]`: bounded, no property orderflow sets itself, no
    /// secret (secrets come only from the environment or files).
    fn validate_client_properties(&self) -> Result<(), ConfigError> {
        if self.client.len() > MAX_CLIENT_PROPERTIES {
            return Err(ConfigError::Invalid(format!(
                "`[kafka.client]` has {} properties; at most {MAX_CLIENT_PROPERTIES}",
                self.client.len()
            )));
        }
        for (key, value) in &self.client {
            if key.contains("password") || key.contains("secret") {
                return Err(ConfigError::Invalid(format!(
                    "`kafka.client.\"{key}\"` would put a credential in the configuration file: use `[kafka.sasl]` with {KAFKA_PASSWORD_ENV} or `password_file`"
                )));
            }
            if RESERVED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "`kafka.client.\"{key}\"` is set by orderflow itself (see docs/configuration.md, [kafka]); remove it"
                )));
            }
            let text = value.to_string();
            if key.len() > MAX_PROPERTY_BYTES || text.len() > MAX_PROPERTY_BYTES {
                return Err(ConfigError::Invalid(format!(
                    "`kafka.client.\"{key}\"`: names and values up to {MAX_PROPERTY_BYTES} bytes"
                )));
            }
        }
        Ok(())
    }

    /// The SASL password: `ORDERFLOW_KAFKA_PASSWORD`, else the trimmed
    /// content of `kafka.sasl.password_file`.
    pub fn sasl_password(&self) -> Result<Option<Secret>, ConfigError> {
        let Some(sasl) = &self.sasl else {
            return Ok(None);
        };
        Secret::from_env_or_file(
            KAFKA_PASSWORD_ENV,
            sasl.password_file.as_deref(),
            "kafka.sasl.password_file",
        )
        .map(Some)
    }
}

impl ScyllaConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.nodes.is_empty() || self.nodes.iter().any(|n| n.trim().is_empty()) {
            return Err(ConfigError::Invalid(
                "`scylla.nodes` needs at least one `host:port`".into(),
            ));
        }
        let valid_name = |k: &str| {
            !k.is_empty()
                && k.len() <= 48
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && k.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        };
        if !valid_name(&self.keyspace) {
            return Err(ConfigError::Invalid(format!(
                "`scylla.keyspace` = {:?}: a letter, then letters, digits or `_`, at most 48",
                self.keyspace
            )));
        }
        let ranges: [(&str, u64, u64, u64); 2] = [
            (
                "scylla.replication_factor",
                self.replication_factor.into(),
                1,
                16,
            ),
            (
                "scylla.request_timeout_ms",
                self.request_timeout_ms,
                10,
                600_000,
            ),
        ];
        check_ranges(&ranges)?;
        if let Some(tls) = &self.tls {
            tls.validate("scylla.tls")?;
        }
        if let Some(auth) = &self.auth {
            check_username("scylla.auth.username", &auth.username)?;
            if self.tls.is_none() {
                return Err(ConfigError::Invalid(
                    "`[scylla.auth]` sends the password in clear text without `[scylla.tls]`: add it".into(),
                ));
            }
        }
        Ok(())
    }

    /// The password: `ORDERFLOW_SCYLLA_PASSWORD`, else the trimmed content
    /// of `scylla.auth.password_file`.
    pub fn password(&self) -> Result<Option<Secret>, ConfigError> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        Secret::from_env_or_file(
            SCYLLA_PASSWORD_ENV,
            auth.password_file.as_deref(),
            "scylla.auth.password_file",
        )
        .map(Some)
    }
}

/// Environment variable holding the Kafka SASL password (wins over
/// `kafka.sasl.password_file`).
pub const KAFKA_PASSWORD_ENV: &str = "ORDERFLOW_KAFKA_PASSWORD";
/// Environment variable holding the ScyllaDB/Cassandra password (wins over
/// `scylla.auth.password_file`).
pub const SCYLLA_PASSWORD_ENV: &str = "ORDERFLOW_SCYLLA_PASSWORD";

/// librdkafka properties orderflow sets itself, from `[kafka]` keys or
/// because its guarantees rest on them (idempotent producer, manual
/// offsets, assignment strategy); `[kafka.client]` may not override them.
pub const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "client.id",
    "group.id",
    // The classic protocol with cooperative-sticky assignment, and one
    // member identity per process (a shared config file would give every
    // instance the same static id).
    "group.protocol",
    "group.instance.id",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "allow.auto.create.topics",
    "enable.idempotence",
    "acks",
    "max.in.flight.requests.per.connection",
    "linger.ms",
    "message.max.bytes",
    "partitioner",
    "message.timeout.ms",
    "request.timeout.ms",
    "queue.buffering.max.messages",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "isolation.level",
    "queued.max.messages.kbytes",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
];

/// Most `[kafka.client]` entries, and the longest name or value.
const MAX_CLIENT_PROPERTIES: usize = 64;
const MAX_PROPERTY_BYTES: usize = 1024;
/// Longest username orderflow sends.
const MAX_USERNAME_BYTES: usize = 256;

/// A `[kafka.client]` value: TOML strings, integers and booleans are all
/// passed to librdkafka as text.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PropertyValue {
    Text(String),
    Integer(i64),
    Flag(bool),
}

impl std::fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropertyValue::Text(s) => f.write_str(s),
            PropertyValue::Integer(n) => write!(f, "{n}"),
            PropertyValue::Flag(b) => write!(f, "{b}"),
        }
    }
}

/// `[kafka.tls]` / `[scylla.tls]`: TLS to a backend. The server's
/// certificate is always verified (for ScyllaDB against the node's IP
/// address, which its certificate must name).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackendTlsConfig {
    /// PEM file of the CA certificates to trust; absent = the system's
    /// trust store.
    pub ca_path: Option<PathBuf>,
    /// PEM certificate chain presented to servers that require client
    /// certificates; together with `key_path`.
    pub cert_path: Option<PathBuf>,
    /// PEM private key (unencrypted PKCS#8, PKCS#1 or SEC1) of `cert_path`.
    pub key_path: Option<PathBuf>,
}

impl BackendTlsConfig {
    fn validate(&self, section: &str) -> Result<(), ConfigError> {
        if self.cert_path.is_some() != self.key_path.is_some() {
            return Err(ConfigError::Invalid(format!(
                "`{section}.cert_path` and `{section}.key_path` go together (a client certificate needs its key)"
            )));
        }
        Ok(())
    }
}

/// SASL mechanisms orderflow offers (GSSAPI and OAUTHBEARER are not).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The name librdkafka and the broker use.
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// `[kafka.sasl]`: who orderflow is to the brokers.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSaslConfig {
    pub mechanism: SaslMechanism,
    pub username: String,
    /// File holding the password (trimmed); `ORDERFLOW_KAFKA_PASSWORD`
    /// wins over it.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// `[scylla.auth]`: who orderflow is to the nodes (PasswordAuthenticator).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScyllaAuthConfig {
    pub username: String,
    /// File holding the password (trimmed); `ORDERFLOW_SCYLLA_PASSWORD`
    /// wins over it.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

fn check_username(key: &str, username: &str) -> Result<(), ConfigError> {
    if username.is_empty() || username.len() > MAX_USERNAME_BYTES {
        return Err(ConfigError::Invalid(format!(
            "`{key}`: 1 to {MAX_USERNAME_BYTES} bytes"
        )));
    }
    Ok(())
}

/// A path as librdkafka takes it (UTF-8 text).
pub fn path_text<'a>(key: &str, path: &'a Path) -> Result<&'a str, ConfigError> {
    path.to_str()
        .ok_or_else(|| ConfigError::Invalid(format!("`{key}` {} is not UTF-8", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(text: &str) -> Result<(), String> {
        let config: KafkaConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())
    }

    fn scylla(text: &str) -> Result<(), String> {
        let config: ScyllaConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())
    }

    /// TLS, SASL and `[kafka.client]` load and validate together.
    #[test]
    fn secure_kafka_config_loads() {
        kafka(
            "[tls]\nca_path = \"ca.pem\"\n[sasl]\nmechanism = \"SCRAM-SHA-256\"\nusername = \"of\"\n\
             [client]\n\"fetch.wait.max.ms\" = 50\n\"socket.nagle.disable\" = true\n\"compression.codec\" = \"lz4\"\n",
        )
        .unwrap();
    }

    /// Each misuse is refused with the key at fault named.
    #[test]
    fn misuses_are_refused_precisely() {
        let cases = [
            (
                "[sasl]\nmechanism = \"PLAIN\"\nusername = \"of\"\n",
                "clear text",
            ),
            (
                "[sasl]\nmechanism = \"GSSAPI\"\nusername = \"of\"\n",
                "unknown variant",
            ),
            (
                "[sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"\"\n",
                "kafka.sasl.username",
            ),
            (
                "[sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"of\"\npassword = \"x\"\n",
                "unknown field",
            ),
            ("[tls]\ncert_path = \"c.pem\"\n", "go together"),
            ("[client]\n\"sasl.password\" = \"x\"\n", "credential"),
            ("[client]\n\"ssl.key.password\" = \"x\"\n", "credential"),
            ("[client]\n\"acks\" = \"1\"\n", "set by orderflow"),
            ("[client]\n\"group.id\" = \"g\"\n", "set by orderflow"),
        ];
        for (text, expected) in cases {
            let e = kafka(text).unwrap_err();
            assert!(e.contains(expected), "{text}: {e}");
        }
        let e = scylla("[auth]\nusername = \"of\"\n").unwrap_err();
        assert!(e.contains("clear text"), "{e}");
        scylla("[tls]\n[auth]\nusername = \"of\"\n").unwrap();
    }

    /// The password comes from its file, trimmed; a missing one names
    /// both places it is looked for.
    #[test]
    fn passwords_come_from_files() {
        if std::env::var(SCYLLA_PASSWORD_ENV).is_ok() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "hunter2\n").unwrap();
        let mut config = ScyllaConfig {
            auth: Some(ScyllaAuthConfig {
                username: "of".into(),
                password_file: Some(path),
            }),
            ..ScyllaConfig::default()
        };
        assert_eq!(config.password().unwrap().unwrap().expose(), "hunter2");
        config.auth.as_mut().unwrap().password_file = None;
        let e = config.password().unwrap_err().to_string();
        assert!(
            e.contains(SCYLLA_PASSWORD_ENV) && e.contains("scylla.auth.password_file"),
            "{e}"
        );
    }
}
