//! HTTPS (`[http.tls]`): rustls with the *ring* provider, the one the
//! crate's clients (reqwest, lettre) already link, so no second crypto
//! library enters the build. TLS 1.2 and 1.3, rustls' safe defaults; ALPN
//! offers `http/1.1` only (the server speaks nothing else).

use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The acceptor for `config`'s certificate chain and key; errors name the
/// key and file at fault.
pub fn acceptor(config: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    let cert_path = &config.cert_path;
    let key_path = &config.key_path;
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read `http.tls.cert_path` {} as PEM certificates",
                cert_path.display()
            )
        })?;
    if certs.is_empty() {
        bail!(
            "`http.tls.cert_path` {} holds no PEM certificate",
            cert_path.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key_path).with_context(|| {
        format!(
            "cannot read `http.tls.key_path` {} as a PEM private key",
            key_path.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls has no safe protocol version")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "`http.tls.key_path` {} does not fit the certificate of `http.tls.cert_path` {}",
                key_path.display(),
                cert_path.display()
            )
        })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}
