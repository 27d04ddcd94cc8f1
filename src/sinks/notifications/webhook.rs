//! Webhooks: one signed JSON POST per status event to each configured
//! endpoint, and the verification procedure receivers follow.
//!
//! Body (`Content-Type: application/json`), the same bytes on every attempt:
//!
//! ```json
//! {"id":"ord-1:4","type":"order.status","order_id":"ord-1","seq":4,
//!  "status":"confirmed","reason":null,"at":"2024-05-01T12:30:00.250Z"}
//! ```
//!
//! Headers:
//! - `Orderflow-Event-Id: <order_id>:<seq>`: the same on every attempt and
//!   after a restart; receivers dedupe by it.
//! - `Orderflow-Signature: t=<unix seconds>,v1=<hex>`, where
//!   `v1 = hex(HMAC-SHA256(secret, t + "." + body))`, computed at each attempt
//!   (a retry carries a fresh `t`). The secret is the configured string's
//!   UTF-8 bytes.
//!
//! Verification (what [`verify_signature`] does): split the header on `,`
//! into `key=value` pairs; take the one `t` and every `v1` (ignore other
//! keys, so new schemes can be added); compute the HMAC of `t` (exactly as
//! sent) + `.` + the raw body; compare it with each `v1` in constant time;
//! then refuse a `t` more than the tolerance away from now (replay
//! protection: a captured request cannot be sent again later).

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::AttemptError;
use crate::config::ConfigError;
use crate::config::Secret;
use crate::config::notifications::{EventFilter, WebhookConfig};
use crate::domain::{Status, StatusEvent};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "Orderflow-Signature";
/// The idempotency header: `<order_id>:<seq>`.
pub const EVENT_ID_HEADER: &str = "Orderflow-Event-Id";
/// The `type` of every status event.
pub const EVENT_TYPE: &str = "order.status";
/// A sensible tolerance for receivers: 5 minutes, like Stripe's.
pub const DEFAULT_TOLERANCE_S: u64 = 300;

/// The id of an event: `<order_id>:<seq>`, unique per order status change.
pub fn event_id(event: &StatusEvent) -> String {
    format!("{}:{}", event.order_id, event.seq)
}

#[derive(Serialize)]
struct Payload<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    order_id: &'a str,
    seq: u32,
    status: Status,
    reason: Option<&'a str>,
    at: String,
}

/// The JSON body sent for `event` (deterministic: same event, same bytes).
pub fn payload(event: &StatusEvent) -> Vec<u8> {
    serde_json::to_vec(&Payload {
        id: event_id(event),
        kind: EVENT_TYPE,
        order_id: &event.order_id,
        seq: event.seq,
        status: event.status,
        reason: event.reason.as_deref(),
        at: crate::domain::time::rfc3339_ms(event.at_ms),
    })
    .expect("a payload always serializes")
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `Orderflow-Signature` value for `body` sent at `timestamp_s`.
pub fn sign(secret: &[u8], timestamp_s: u64, body: &[u8]) -> String {
    let t = timestamp_s.to_string();
    let v1 = hex::encode(mac(secret, &t, body).finalize().into_bytes());
    format!("t={t},v1={v1}")
}

/// Why a webhook request does not verify.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    #[error("malformed signature header: {0}")]
    Malformed(&'static str),
    #[error("the signature header has no v1 signature")]
    NoSignature,
    #[error("no signature matches the body")]
    Mismatch,
    #[error("timestamp {timestamp} is more than the tolerance away from now ({now})")]
    OutsideTolerance { timestamp: u64, now: u64 },
}

/// Verifies a webhook request: `header` is the `Orderflow-Signature` value,
/// `body` the raw request body, `now_s` the receiver's clock (Unix
/// seconds) and `tolerance_s` the largest accepted age (and clock skew).
/// Checks every `v1` in constant time, then the timestamp (replay protection).
pub fn verify_signature(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_s: u64,
    tolerance_s: u64,
) -> Result<(), VerifyError> {
    let mut timestamp: Option<&str> = None;
    let mut signatures: Vec<[u8; 32]> = Vec::new();
    for item in header.split(',') {
        let (key, value) = item
            .trim()
            .split_once('=')
            .ok_or(VerifyError::Malformed("an item is not key=value"))?;
        match key {
            "t" => {
                if timestamp.is_some() {
                    return Err(VerifyError::Malformed("more than one t"));
                }
                timestamp = Some(value);
            }
            // A v1 that is not 64 hex digits can match nothing: skip it.
            "v1" => {
                let mut sig = [0u8; 32];
                if hex::decode_to_slice(value, &mut sig).is_ok() {
                    signatures.push(sig);
                }
            }
            _ => {}
        }
    }
    let t = timestamp.ok_or(VerifyError::Malformed("no t"))?;
    if t.is_empty() || t.len() > 19 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::Malformed("t is not a Unix time in seconds"));
    }
    let t_s: u64 = t
        .parse()
        .map_err(|_| VerifyError::Malformed("t is not a Unix time in seconds"))?;
    if signatures.is_empty() {
        return Err(VerifyError::NoSignature);
    }
    let expected: [u8; 32] = mac(secret, t, body).finalize().into_bytes().into();
    let mut matched = subtle::Choice::from(0);
    for sig in &signatures {
        matched |= expected.ct_eq(sig);
    }
    if !bool::from(matched) {
        return Err(VerifyError::Mismatch);
    }
    if now_s.abs_diff(t_s) > tolerance_s {
        return Err(VerifyError::OutsideTolerance {
            timestamp: t_s,
            now: now_s,
        });
    }
    Ok(())
}

/// A configured endpoint with its secret and HTTP client.
pub(crate) struct Webhook {
    url: reqwest::Url,
    secret: Secret,
    events: EventFilter,
    client: reqwest::Client,
}

impl Webhook {
    pub fn new(config: &WebhookConfig, timeout: Duration) -> Result<Webhook, ConfigError> {
        let secret = config.secret()?;
        let url = reqwest::Url::parse(&config.url).map_err(|e| {
            ConfigError::Invalid(format!("webhook {:?}: bad url: {e}", config.name))
        })?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A webhook is POSTed where it is configured, never elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("orderflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                ConfigError::Invalid(format!("webhook {:?}: HTTP client: {e}", config.name))
            })?;
        Ok(Webhook {
            url,
            secret,
            events: config.events,
            client,
        })
    }

    pub fn wants(&self, event: &StatusEvent) -> bool {
        match self.events {
            EventFilter::All => true,
            EventFilter::Terminal => event.status.is_terminal(),
        }
    }

    /// One POST. 2xx is delivered; 408, 425, 429, 5xx and network errors
    /// are worth retrying (honouring `Retry-After` seconds); any other
    /// status (3xx, 4xx) is a refusal that a retry cannot change.
    pub async fn attempt(&self, event: &StatusEvent) -> Result<(), AttemptError> {
        let body = payload(event);
        let now = crate::wall_clock::now_s();
        let signature = sign(self.secret.expose().as_bytes(), now, &body);
        let response = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header(EVENT_ID_HEADER, event_id(event))
            .body(body)
            .send()
            .await
            .map_err(|e| AttemptError::Transient {
                // Without the URL: it may carry credentials.
                detail: format!("request failed: {}", e.without_url()),
                retry_after: None,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let detail = format!("answered {status}");
        if status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429) {
            Err(AttemptError::Transient {
                detail,
                retry_after,
            })
        } else {
            Err(AttemptError::Permanent(detail))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test";
    const NOW: u64 = 1_700_000_000;

    fn event() -> StatusEvent {
        StatusEvent {
            order_id: "ord-1".into(),
            seq: 4,
            status: Status::PaymentDeclined,
            reason: Some("card_declined".into()),
            at_ms: 1_714_566_600_250,
            refused_skus: Vec::new(),
            released_lines: 0,
            src: None,
            email: None,
        }
    }

    /// The body has the documented fields and values, and is deterministic.
    #[test]
    fn payload_shape() {
        let body = payload(&event());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "ord-1:4", "type": "order.status", "order_id": "ord-1",
                "seq": 4, "status": "payment_declined", "reason": "card_declined",
                "at": "2024-05-01T12:30:00.250Z"})
        );
        assert_eq!(payload(&event()), body);
    }

    /// A signature made by `sign` verifies, at any time within the tolerance.
    #[test]
    fn signed_body_verifies() {
        let body = payload(&event());
        let header = sign(SECRET, NOW, &body);
        assert!(header.starts_with(&format!("t={NOW},v1=")));
        for now in [NOW, NOW + 300, NOW - 300] {
            assert_eq!(verify_signature(SECRET, &header, &body, now, 300), Ok(()));
        }
    }

    /// A wrong secret, a changed body or a changed timestamp is a mismatch.
    #[test]
    fn bad_signature_is_rejected() {
        let body = payload(&event());
        let header = sign(SECRET, NOW, &body);
        assert_eq!(
            verify_signature(b"other", &header, &body, NOW, 300),
            Err(VerifyError::Mismatch)
        );
        let mut tampered = body.clone();
        tampered[10] ^= 1;
        assert_eq!(
            verify_signature(SECRET, &header, &tampered, NOW, 300),
            Err(VerifyError::Mismatch)
        );
        // Moving t to make an old request look fresh breaks the signature.
        let moved = header.replace(&format!("t={NOW}"), &format!("t={}", NOW + 1000));
        assert_eq!(
            verify_signature(SECRET, &moved, &body, NOW + 1000, 300),
            Err(VerifyError::Mismatch)
        );
    }

    /// A correctly signed request replayed after the tolerance (or dated
    /// too far ahead) is refused: replay protection.
    #[test]
    fn replayed_old_timestamp_is_rejected() {
        let body = payload(&event());
        let header = sign(SECRET, NOW, &body);
        assert_eq!(
            verify_signature(SECRET, &header, &body, NOW + 301, 300),
            Err(VerifyError::OutsideTolerance {
                timestamp: NOW,
                now: NOW + 301
            })
        );
        assert!(matches!(
            verify_signature(SECRET, &header, &body, NOW - 301, 300),
            Err(VerifyError::OutsideTolerance { .. })
        ));
    }

    /// Any matching v1 passes (secret rotation); unknown schemes are
    /// ignored; malformed headers are named errors, never panics.
    #[test]
    fn header_parsing() {
        let body = b"{}";
        let good = sign(SECRET, NOW, body);
        let v1 = good.split_once(",v1=").unwrap().1;
        let rotated = format!("t={NOW}, v1={}, v1={v1}, v0=zz", "00".repeat(32));
        assert_eq!(verify_signature(SECRET, &rotated, body, NOW, 300), Ok(()));
        for (header, err) in [
            ("", VerifyError::Malformed("an item is not key=value")),
            (&format!("v1={v1}") as &str, VerifyError::Malformed("no t")),
            (
                &format!("t={NOW},t={NOW},v1={v1}"),
                VerifyError::Malformed("more than one t"),
            ),
            (
                &format!("t=-1,v1={v1}"),
                VerifyError::Malformed("t is not a Unix time in seconds"),
            ),
            (
                "t=99999999999999999999,v1=00",
                VerifyError::Malformed("t is not a Unix time in seconds"),
            ),
            (&format!("t={NOW}"), VerifyError::NoSignature),
            (&format!("t={NOW},v1=xyz"), VerifyError::NoSignature),
        ] {
            assert_eq!(verify_signature(SECRET, header, body, NOW, 300), Err(err));
        }
    }
}
