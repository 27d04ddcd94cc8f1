//! PEM certificate and key files, read for rustls (the HTTPS listener's
//! certificate, the client certificate and trusted CAs of the ScyllaDB
//! session). Errors name the configuration key and the file.

use std::path::Path;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Every certificate in `path` (the config key `key` names it); at least one.
pub fn certificates(key: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read `{key}` {} as PEM certificates", path.display()))?;
    if certs.is_empty() {
        bail!("`{key}` {} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The private key in `path` (PKCS#8, PKCS#1 or SEC1, unencrypted).
pub fn private_key(key: &str, path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| {
        format!(
            "cannot read `{key}` {} as a PEM private key",
            path.display()
        )
    })
}
