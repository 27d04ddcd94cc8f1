//! `[http]` and `[http.tls]`: the server's deadlines, limits and TLS files.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, check_ranges, range};

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
impl HttpConfig {
    /// Checks the server's deadlines, limits and TLS keys (called by
    /// [`Config::validate`]); the TLS files themselves are read at start.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        range(
            "http.body_limit_bytes",
            self.body_limit_bytes,
            256,
            16 * 1024 * 1024,
        )?;
        range("http.retry_after_s", self.retry_after_s, 1, 3600)?;
        range("http.max_sse_streams", self.max_sse_streams, 1, 1 << 20)?;
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
