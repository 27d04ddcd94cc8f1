//! Reading a request body under a size limit.

use std::time::Duration;

use axum::body::{Body, Bytes};
use futures::StreamExt;

/// Past the limit, up to this much more is read and dropped (for at most
/// [`DRAIN_TIMEOUT`]) so the client, still sending, receives the 413
/// instead of a connection reset.
const DRAIN_EXTRA_BYTES: usize = 8 * 1024 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

pub enum BodyError {
    TooLarge,
    Unreadable,
    /// Not complete within `http.body_timeout_ms` (see `super::server`).
    TimedOut,
}

/// The whole body, or `TooLarge` once it passes `limit` bytes.
pub async fn read_limited(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            if super::server::is_body_timeout(&e) {
                BodyError::TimedOut
            } else {
                BodyError::Unreadable
            }
        })?;
        if buf.len() + chunk.len() > limit {
            let mut drained = buf.len() + chunk.len();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
                while drained <= limit + DRAIN_EXTRA_BYTES {
                    match stream.next().await {
                        Some(Ok(c)) => drained += c.len(),
                        _ => break,
                    }
                }
            })
            .await;
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}
