//! The librdkafka settings every orderflow Kafka client shares (the log's
//! producer, admin client and readers, the group-membership consumers):
//! brokers, `[kafka.client]` properties, TLS and SASL. Built anew for each
//! client, so a rotated password file is read by the next client created.

use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext};

use crate::config::{ConfigError, KafkaConfig, path_text};

/// `config`'s shared client settings. `[kafka.client]` goes in first, so
/// nothing it holds can replace what orderflow sets (validation refuses
/// those keys anyway).
pub fn client_config(config: &KafkaConfig) -> Result<ClientConfig, ConfigError> {
    let mut c = ClientConfig::new();
    for (key, value) in &config.client {
        c.set(key, value.to_string());
    }
    c.set("bootstrap.servers", &config.bootstrap_servers)
        .set("client.id", "orderflow")
        .set("security.protocol", security_protocol(config))
        // A metadata request must never create a topic with the broker's
        // default partition count: that would fix the wrong count forever.
        .set("allow.auto.create.topics", "false")
        .set("socket.keepalive.enable", "true");
    if let Some(tls) = &config.tls {
        let files = [
            ("ssl.ca.location", "kafka.tls.ca_path", &tls.ca_path),
            (
                "ssl.certificate.location",
                "kafka.tls.cert_path",
                &tls.cert_path,
            ),
            ("ssl.key.location", "kafka.tls.key_path", &tls.key_path),
        ];
        for (property, key, path) in files {
            if let Some(path) = path {
                readable(key, path)?;
                c.set(property, path_text(key, path)?);
            }
        }
    }
    if let (Some(sasl), Some(password)) = (&config.sasl, config.sasl_password()?) {
        c.set("sasl.mechanism", sasl.mechanism.name())
            .set("sasl.username", &sasl.username)
            .set("sasl.password", password.expose());
    }
    Ok(c)
}

/// A client context that logs librdkafka's errors as the default one does
/// and keeps the last reason a broker refused the connection, so that a
/// request failing with "transport failure" can say why: credentials
/// refused (for good: start-up stops at once) or a TLS handshake failed
/// (a certificate not trusted, perhaps only for now).
#[derive(Clone, Default)]
pub struct RefusalContext {
    last: Arc<Mutex<Option<Refusal>>>,
}

/// Why a broker connection was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Authentication(String),
    Tls(String),
}

impl RefusalContext {
    pub fn last(&self) -> Option<Refusal> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ClientContext for RefusalContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let refusal = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication) => Some(Refusal::Authentication(reason.into())),
            Some(RDKafkaErrorCode::SSL) => Some(Refusal::Tls(reason.into())),
            _ => None,
        };
        if refusal.is_some() {
            *self.last.lock().unwrap_or_else(PoisonError::into_inner) = refusal;
        }
        tracing::error!("librdkafka: {error}: {reason}");
    }
}

/// librdkafka's `security.protocol` for the configured TLS and SASL.
fn security_protocol(config: &KafkaConfig) -> &'static str {
    match (config.tls.is_some(), config.sasl.is_some()) {
        (false, false) => "plaintext",
        (true, false) => "ssl",
        (false, true) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    }
}

/// A missing or unreadable file is named here, not as librdkafka's
/// generic SSL set-up failure.
fn readable(key: &str, path: &std::path::Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| ConfigError::Read {
            path: format!("`{key}` {}", path.display()),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendTlsConfig, KafkaSaslConfig, PropertyValue, SaslMechanism};

    /// TLS and SASL choose the protocol, `[kafka.client]` passes through,
    /// and the password comes from its file.
    #[test]
    fn security_settings_reach_librdkafka() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not checked here").unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret\n").unwrap();
        let config = KafkaConfig {
            tls: Some(BackendTlsConfig {
                ca_path: Some(ca.clone()),
                ..BackendTlsConfig::default()
            }),
            sasl: Some(KafkaSaslConfig {
                mechanism: SaslMechanism::ScramSha512,
                username: "orderflow".into(),
                password_file: Some(password),
            }),
            client: [("fetch.wait.max.ms".into(), PropertyValue::Integer(50))].into(),
            ..KafkaConfig::default()
        };
        let c = client_config(&config).unwrap();
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("ssl.ca.location"), ca.to_str());
        assert_eq!(c.get("fetch.wait.max.ms"), Some("50"));
        if std::env::var(crate::config::KAFKA_PASSWORD_ENV).is_err() {
            assert_eq!(c.get("sasl.password"), Some("s3cret"));
        }
        // librdkafka itself accepts every property.
        c.create_native_config().unwrap();
    }

    /// A CA file that is not there is named with its key.
    #[test]
    fn missing_ca_file_is_named() {
        let config = KafkaConfig {
            tls: Some(BackendTlsConfig {
                ca_path: Some("/nonexistent/ca.pem".into()),
                ..BackendTlsConfig::default()
            }),
            ..KafkaConfig::default()
        };
        let e = client_config(&config).unwrap_err().to_string();
        assert!(e.contains("kafka.tls.ca_path"), "{e}");
    }
}
