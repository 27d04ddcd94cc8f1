//! The CQL driver session: contact points, request timeout and
//! consistency, and when configured TLS (`[scylla.tls]`, OpenSSL, which
//! librdkafka links already) and a username and password (`[scylla.auth]`).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use openssl::ssl::{SslConnector, SslConnectorBuilder, SslFiletype, SslMethod};
use openssl::x509::X509;
use openssl::x509::store::X509StoreBuilder;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::{OpenSsl010Config, Session};
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::{Consistency, SerialConsistency};

use crate::config::{BackendTlsConfig, CqlConsistency, ScyllaConfig};
use crate::pipeline::store::StoreError;

/// The driver session with the configured contact points, request timeout,
/// consistency, TLS and credentials; token-aware routing and retries are
/// the driver's defaults.
pub(super) async fn open_session(
    config: &ScyllaConfig,
    keyspace: &str,
) -> Result<Session, StoreError> {
    let (consistency, serial) = match config.consistency {
        CqlConsistency::LocalQuorum => (Consistency::LocalQuorum, SerialConsistency::LocalSerial),
        CqlConsistency::Quorum => (Consistency::Quorum, SerialConsistency::Serial),
        CqlConsistency::One => (Consistency::One, SerialConsistency::LocalSerial),
    };
    let profile = ExecutionProfile::builder()
        .consistency(consistency)
        .serial_consistency(Some(serial))
        .request_timeout(Some(Duration::from_millis(config.request_timeout_ms)))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.nodes)
        .default_execution_profile_handle(profile.into_handle())
        // Token-aware routing needs only this keyspace's replication.
        .keyspaces_to_fetch([keyspace]);
    if let Some(tls) = &config.tls {
        let connector =
            connector(tls).map_err(|e| StoreError::Unavailable(format!("ScyllaDB TLS: {e:#}")))?;
        builder = builder.tls_context(Some(OpenSsl010Config::new(connector)));
    }
    let password = config
        .password()
        .map_err(|e| StoreError::Unavailable(format!("ScyllaDB password: {e}")))?;
    if let (Some(auth), Some(password)) = (&config.auth, password) {
        builder = builder.user(&auth.username, password.expose());
    }
    builder.build().await.map_err(|e| {
        StoreError::Unavailable(format!(
            "cannot connect to ScyllaDB nodes {:?}: {e}",
            config.nodes
        ))
    })
}

/// The OpenSSL connector of `[scylla.tls]`: it verifies the node's
/// certificate (the driver checks it names the node's IP address) against
/// `ca_path` only, or the system's trust store without it.
fn connector(tls: &BackendTlsConfig) -> anyhow::Result<SslConnectorBuilder> {
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    if let Some(path) = &tls.ca_path {
        let mut store = X509StoreBuilder::new()?;
        for cert in ca_certificates(path)? {
            store.add_cert(cert)?;
        }
        builder.set_cert_store(store.build());
    }
    if let (Some(cert), Some(key)) = (&tls.cert_path, &tls.key_path) {
        builder.set_certificate_chain_file(cert).with_context(|| {
            format!(
                "`scylla.tls.cert_path` {}: not a PEM certificate chain",
                cert.display()
            )
        })?;
        builder
            .set_private_key_file(key, SslFiletype::PEM)
            .with_context(|| {
                format!(
                    "`scylla.tls.key_path` {}: not an unencrypted PEM private key",
                    key.display()
                )
            })?;
        builder.check_private_key().with_context(|| {
            format!(
                "`scylla.tls.key_path` {} does not fit the certificate of `scylla.tls.cert_path` {}",
                key.display(),
                cert.display()
            )
        })?;
    }
    Ok(builder)
}

/// The certificates of `scylla.tls.ca_path`; at least one.
fn ca_certificates(path: &Path) -> anyhow::Result<Vec<X509>> {
    let key = "scylla.tls.ca_path";
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read `{key}` {}", path.display()))?;
    let certs = X509::stack_from_pem(&bytes)
        .with_context(|| format!("`{key}` {}: not PEM certificates", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "`{key}` {} holds no PEM certificate",
        path.display()
    );
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA file that is missing or not PEM is named with its key.
    #[test]
    fn bad_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("ca.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        for path in [dir.path().join("absent.pem"), garbage] {
            let tls = BackendTlsConfig {
                ca_path: Some(path),
                ..BackendTlsConfig::default()
            };
            let e = format!("{:#}", connector(&tls).err().unwrap());
            assert!(e.contains("scylla.tls.ca_path"), "{e}");
        }
    }
}
