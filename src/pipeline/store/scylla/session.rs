//! The CQL driver session: contact points, request timeout and
//! consistency, and when configured TLS (`[scylla.tls]`, rustls with the
//! *ring* provider the crate already links) and a username and password
//! (`[scylla.auth]`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::RootCertStore;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::{Consistency, SerialConsistency};

use crate::config::{BackendTlsConfig, CqlConsistency, ScyllaConfig};
use crate::pem;
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
        let context = tls_context(tls)
            .map_err(|e| StoreError::Unavailable(format!("ScyllaDB TLS: {e:#}")))?;
        builder = builder.tls_context(Some(context));
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

/// The rustls client configuration of `[scylla.tls]`. The driver checks
/// the node's certificate against the node's IP address.
fn tls_context(tls: &BackendTlsConfig) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match &tls.ca_path {
        Some(path) => {
            for cert in pem::certificates("scylla.tls.ca_path", path)? {
                roots
                    .add(cert)
                    .with_context(|| format!("`scylla.tls.ca_path` {}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls has no safe protocol version")?
        .with_root_certificates(roots);
    let config = match (&tls.cert_path, &tls.key_path) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                pem::certificates("scylla.tls.cert_path", cert)?,
                pem::private_key("scylla.tls.key_path", key)?,
            )
            .with_context(|| {
                format!(
                    "`scylla.tls.key_path` {} does not fit the certificate of `scylla.tls.cert_path` {}",
                    key.display(),
                    cert.display()
                )
            })?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
