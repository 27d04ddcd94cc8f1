//! The Stripe-compatible payment gateway: PaymentIntents created with
//! manual capture and confirmed at once, then captured or cancelled.
//!
//! The protocol (which parameters, which idempotency key, how an answer
//! maps to an outcome) lives in [`Stripe`], generic over a [`StripeApi`]
//! transport, so the in-process simulator (`super::simulator`) runs the
//! very same protocol code as the HTTP client ([`HttpApi`], reqwest with
//! rustls) that talks to Stripe, `stripe-mock` or `orderflow gateway-sim`.
//!
//! | step | request | idempotency key |
//! |---|---|---|
//! | authorize | `POST /v1/payment_intents` `amount, currency, payment_method, capture_method=manual, confirm=true, error_on_requires_action=true, metadata[order_id]` | `order:authorize` |
//! | capture | `POST /v1/payment_intents/{id}/capture` `amount_to_capture` | `order:capture` |
//! | void | `POST /v1/payment_intents/{id}/cancel` `cancellation_reason=abandoned` (without an id: the intents that `GET /v1/payment_intents/search?query=metadata['order_id']:'…'` finds) | `order:void` |
//!
//! Answers: 2xx → ok; 402 `card_error` → declined with its `decline_code`
//! (else `code`); network errors, timeouts, 409 (key in use), 429 and 5xx →
//! [`GatewayError::Unavailable`] (retryable); other 4xx →
//! [`GatewayError::Refused`]. A `Stripe-Should-Retry` header overrides the
//! status-based choice.
//!
//! Payment tokens: a PaymentMethod id (`pm_…`) is sent as is. Stripe's
//! test tokens `tok_<name>` (letters and `_` only, e.g. `tok_visa`,
//! `tok_chargeDeclined`) are sent as their documented test PaymentMethods
//! `pm_card_<name>`; any other token is sent unchanged as `payment_method`.
//!
//! The secret key is a [`Secret`]: sent only in the `Authorization` header
//! (marked sensitive), never logged, and scrubbed from any error text.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{AuthorizeOutcome, AuthorizeRequest, GatewayError, PaymentGateway};
use crate::config::{GatewayConfig, Secret};

/// A PaymentIntent as the API answers it: the fields orderflow reads
/// (others are ignored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentIntent {
    pub id: String,
    #[serde(default = "payment_intent_object")]
    pub object: String,
    pub amount: u64,
    #[serde(default)]
    pub amount_capturable: u64,
    #[serde(default)]
    pub amount_received: u64,
    pub currency: String,
    pub status: String,
    #[serde(default)]
    pub capture_method: Option<String>,
    #[serde(default)]
    pub cancellation_reason: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub livemode: bool,
}

fn payment_intent_object() -> String {
    "payment_intent".into()
}

/// The `error` object of a Stripe error answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// `card_error`, `invalid_request_error`, `idempotency_error`, `api_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decline_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_intent: Option<PaymentIntent>,
}

/// `{"error": {...}}`, the body of every Stripe error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

/// `GET /v1/payment_intents/search` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SearchResult {
    #[serde(default)]
    pub data: Vec<PaymentIntent>,
}

/// Why a call produced no PaymentIntent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No HTTP answer: connect error, reset, timeout, unreadable body.
    Transport(String),
    /// An HTTP error answer.
    Api {
        status: u16,
        error: Box<ApiError>,
        /// The `Stripe-Should-Retry` header, when sent.
        should_retry: Option<bool>,
    },
}

/// The four PaymentIntent calls orderflow makes. `params` are the form
/// fields, in order; `key` the `Idempotency-Key`.
#[async_trait]
pub trait StripeApi: Send + Sync + 'static {
    async fn create_intent(
        &self,
        params: &[(String, String)],
        key: &str,
    ) -> Result<PaymentIntent, Failure>;
    async fn capture_intent(
        &self,
        id: &str,
        params: &[(String, String)],
        key: &str,
    ) -> Result<PaymentIntent, Failure>;
    async fn cancel_intent(
        &self,
        id: &str,
        params: &[(String, String)],
        key: &str,
    ) -> Result<PaymentIntent, Failure>;
    /// PaymentIntents whose `metadata[order_id]` is `order_id`.
    async fn search_by_order(&self, order_id: &str) -> Result<Vec<PaymentIntent>, Failure>;
}

/// The `payment_method` sent for an order's payment token (see the module doc).
pub fn payment_method_for(token: &str) -> String {
    match token.strip_prefix("tok_") {
        Some(name)
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphabetic() || c == '_') =>
        {
            format!("pm_card_{name}")
        }
        _ => token.to_owned(),
    }
}

/// Form fields of the authorization (`POST /v1/payment_intents`).
pub fn authorize_params(req: &AuthorizeRequest) -> Vec<(String, String)> {
    vec![
        ("amount".into(), req.amount.to_string()),
        ("currency".into(), req.currency.to_ascii_lowercase()),
        ("payment_method".into(), payment_method_for(&req.token)),
        ("capture_method".into(), "manual".into()),
        ("confirm".into(), "true".into()),
        ("error_on_requires_action".into(), "true".into()),
        ("metadata[order_id]".into(), req.order_id.clone()),
    ]
}

/// Form fields of a capture.
pub fn capture_params(amount: u64) -> Vec<(String, String)> {
    vec![("amount_to_capture".into(), amount.to_string())]
}

/// Form fields of a void.
pub fn cancel_params() -> Vec<(String, String)> {
    vec![("cancellation_reason".into(), "abandoned".into())]
}

/// The search query that finds an order's intents.
pub fn order_query(order_id: &str) -> String {
    let escaped = order_id.replace('\\', "\\\\").replace('\'', "\\'");
    format!("metadata['order_id']:'{escaped}'")
}

/// Intent statuses from which a cancel is allowed.
pub fn is_cancelable(status: &str) -> bool {
    matches!(
        status,
        "requires_payment_method"
            | "requires_confirmation"
            | "requires_action"
            | "requires_capture"
    )
}

/// The status-based part of the answer mapping, shared by every transport.
pub fn gateway_error(op: &str, failure: &Failure) -> GatewayError {
    match failure {
        Failure::Transport(m) => GatewayError::Unavailable(format!("{op}: {m}")),
        Failure::Api {
            status,
            error,
            should_retry,
        } => {
            let what = describe(op, *status, error);
            let retry = should_retry.unwrap_or(matches!(status, 409 | 429 | 500..=599));
            if retry {
                GatewayError::Unavailable(what)
            } else {
                GatewayError::Refused(what)
            }
        }
    }
}

fn describe(op: &str, status: u16, e: &ApiError) -> String {
    let mut s = format!("{op}: HTTP {status}");
    if !e.kind.is_empty() {
        s.push(' ');
        s.push_str(&e.kind);
    }
    if let Some(code) = &e.code {
        s.push('/');
        s.push_str(code);
    }
    // A 401 message may quote (part of) the key: never copy it.
    if status != 401
        && let Some(m) = &e.message
    {
        s.push_str(": ");
        s.push_str(m);
    }
    s
}

/// Maps an authorization answer: a card error is a decline, not an error.
pub fn authorize_outcome(
    result: Result<PaymentIntent, Failure>,
) -> Result<AuthorizeOutcome, GatewayError> {
    match result {
        Ok(pi) => Ok(AuthorizeOutcome::Authorized { payment_id: pi.id }),
        Err(Failure::Api {
            status: 402, error, ..
        }) if error.kind == "card_error" => {
            let error = *error;
            Ok(AuthorizeOutcome::Declined {
                code: error
                    .decline_code
                    .or(error.code)
                    .unwrap_or_else(|| "card_declined".into()),
            })
        }
        Err(f) => Err(gateway_error("authorize", &f)),
    }
}

/// The payment gateway protocol over a [`StripeApi`] transport.
pub struct Stripe<A> {
    api: A,
}

impl<A: StripeApi> Stripe<A> {
    pub fn new(api: A) -> Self {
        Stripe { api }
    }

    /// The transport (tests make raw calls through it).
    pub fn api(&self) -> &A {
        &self.api
    }
}

#[async_trait]
impl<A: StripeApi> PaymentGateway for Stripe<A> {
    async fn authorize(&self, req: &AuthorizeRequest) -> Result<AuthorizeOutcome, GatewayError> {
        let params = authorize_params(req);
        let result = self.api.create_intent(&params, &req.idempotency_key).await;
        let outcome = authorize_outcome(result);
        tracing::debug!(order_id = %req.order_id, key = %req.idempotency_key, outcome = ?outcome, "payment authorize");
        outcome
    }

    async fn capture(
        &self,
        payment_id: &str,
        amount: u64,
        idempotency_key: &str,
    ) -> Result<(), GatewayError> {
        let result = self
            .api
            .capture_intent(payment_id, &capture_params(amount), idempotency_key)
            .await;
        tracing::debug!(payment_intent = %payment_id, key = %idempotency_key, ok = result.is_ok(), "payment capture");
        result.map(|_| ()).map_err(|f| gateway_error("capture", &f))
    }

    async fn void(
        &self,
        order_id: &str,
        payment_id: &str,
        idempotency_key: &str,
    ) -> Result<(), GatewayError> {
        let ids: Vec<String> = if payment_id.is_empty() {
            // The authorization's outcome is unknown: cancel whatever it created.
            let found = self
                .api
                .search_by_order(order_id)
                .await
                .map_err(|f| gateway_error("void (search)", &f))?;
            let mut ids = Vec::new();
            for pi in found {
                if is_cancelable(&pi.status) {
                    ids.push(pi.id);
                } else if pi.status == "succeeded" {
                    return Err(GatewayError::Refused(format!(
                        "void: payment {} is captured; refunds are out of scope",
                        pi.id
                    )));
                }
            }
            ids
        } else {
            vec![payment_id.to_owned()]
        };
        for id in ids {
            let result = self
                .api
                .cancel_intent(&id, &cancel_params(), idempotency_key)
                .await;
            tracing::debug!(order_id = %order_id, payment_intent = %id, key = %idempotency_key, ok = result.is_ok(), "payment void");
            result.map_err(|f| gateway_error("void", &f))?;
        }
        Ok(())
    }
}

/// What one HTTP call answered, before mapping.
#[derive(Clone, Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Vec<u8>,
    /// The `Idempotency-Key` header of the answer (Stripe echoes the key).
    pub idempotency_key: Option<String>,
    /// `Idempotent-Replayed: true`: the stored first answer.
    pub replayed: bool,
    pub should_retry: Option<bool>,
}

/// The HTTP transport: reqwest with rustls, explicit connect and request
/// timeouts, form-encoded bodies, `Authorization: Bearer <secret key>`.
pub struct HttpApi {
    http: reqwest::Client,
    base: String,
    key: Secret,
}

impl std::fmt::Debug for HttpApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpApi")
            .field("base", &self.base)
            .field("key", &self.key)
            .finish()
    }
}

/// The Stripe-compatible HTTP client.
pub type StripeClient = Stripe<HttpApi>;

impl StripeClient {
    /// A client for `config.url` with `config`'s timeouts.
    pub fn from_config(config: &GatewayConfig, key: Secret) -> anyhow::Result<StripeClient> {
        Ok(Stripe::new(HttpApi::new(
            &config.url,
            key,
            Duration::from_millis(config.timeout_ms),
            Duration::from_millis(config.connect_timeout_ms),
        )?))
    }
}

impl HttpApi {
    pub fn new(
        base_url: &str,
        key: Secret,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> anyhow::Result<HttpApi> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .user_agent(concat!("orderflow/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpApi {
            http,
            base: base_url.trim().trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// The base URL (never holds the key).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// One raw call. A POST with a key sends `Idempotency-Key`.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        params: &[(String, String)],
        idempotency_key: Option<&str>,
    ) -> Result<ApiResponse, Failure> {
        let url = format!("{}{}", self.base, path_and_query);
        let mut auth =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", self.key.expose()))
                .map_err(|_| {
                    Failure::Transport("the secret key is not a valid header value".into())
                })?;
        auth.set_sensitive(true);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header(reqwest::header::AUTHORIZATION, auth);
        if let Some(key) = idempotency_key {
            req = req.header("Idempotency-Key", key);
        }
        if method == reqwest::Method::POST {
            req = req.form(params);
        }
        let res = req.send().await.map_err(|e| self.transport(e))?;
        let header = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = res.status().as_u16();
        let idempotency_key = header("idempotency-key");
        let replayed = header("idempotent-replayed").is_some_and(|v| v == "true");
        let should_retry = header("stripe-should-retry").map(|v| v == "true");
        let body = res.bytes().await.map_err(|e| self.transport(e))?.to_vec();
        Ok(ApiResponse {
            status,
            body,
            idempotency_key,
            replayed,
            should_retry,
        })
    }

    fn transport(&self, e: reqwest::Error) -> Failure {
        let kind = if e.is_timeout() {
            "timeout"
        } else if e.is_connect() {
            "connect error"
        } else {
            "network error"
        };
        // The URL holds no secret, but keep messages short and scrubbed.
        let text = e.without_url().to_string();
        Failure::Transport(self.scrub(format!("{kind}: {text}")))
    }

    /// Removes the key from a text, in case an answer quoted it.
    fn scrub(&self, text: String) -> String {
        let key = self.key.expose();
        if key.is_empty() || !text.contains(key) {
            text
        } else {
            text.replace(key, "<redacted>")
        }
    }

    async fn intent_call(
        &self,
        path: &str,
        params: &[(String, String)],
        key: &str,
    ) -> Result<PaymentIntent, Failure> {
        let res = self
            .request(reqwest::Method::POST, path, params, Some(key))
            .await?;
        self.parse(res)
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, res: ApiResponse) -> Result<T, Failure> {
        if (200..300).contains(&res.status) {
            return serde_json::from_slice(&res.body).map_err(|e| {
                Failure::Transport(format!("unreadable answer (HTTP {}): {e}", res.status))
            });
        }
        let mut error = serde_json::from_slice::<ErrorBody>(&res.body)
            .map(|b| b.error)
            .unwrap_or_default();
        error.message = error.message.map(|m| self.scrub(m));
        Err(Failure::Api {
            status: res.status,
            error: Box::new(error),
            should_retry: res.should_retry,
        })
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters kept).
fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[async_trait]
impl StripeApi for HttpApi {
    async fn create_intent(
        &self,
        params: &[(String, String)],
        key: &str,
    ) -> Result<PaymentIntent, Failure> {
        self.intent_call("/v1/payment_intents", params, key).await
    }

    async fn capture_intent(
        &self,
        id: &str,
        params: &[(String, String)],
        key: &str,
    ) -> Result<PaymentIntent, Failure> {
        let path = format!("/v1/payment_intents/{}/capture", encode_query(id));
        self.intent_call(&path, params, key).await
    }

    async fn cancel_intent(
        &self,
        id: &str,
        params: &[(String, String)],
        key: &str,
    ) -> Result<PaymentIntent, Failure> {
        let path = format!("/v1/payment_intents/{}/cancel", encode_query(id));
        self.intent_call(&path, params, key).await
    }

    async fn search_by_order(&self, order_id: &str) -> Result<Vec<PaymentIntent>, Failure> {
        let path = format!(
            "/v1/payment_intents/search?query={}",
            encode_query(&order_query(order_id))
        );
        let res = self.request(reqwest::Method::GET, &path, &[], None).await?;
        self.parse::<SearchResult>(res).map(|r| r.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_failure(status: u16, kind: &str, code: Option<&str>, decline: Option<&str>) -> Failure {
        Failure::Api {
            status,
            error: Box::new(ApiError {
                kind: kind.into(),
                code: code.map(Into::into),
                decline_code: decline.map(Into::into),
                message: Some("m".into()),
                ..ApiError::default()
            }),
            should_retry: None,
        }
    }

    /// Answers map as documented: 402 card errors decline with the decline
    /// code (else the code), 409/429/5xx and network errors are retryable,
    /// other 4xx are refusals, and `Stripe-Should-Retry` wins.
    #[test]
    fn answer_mapping() {
        let declined = |f| authorize_outcome(Err(f)).unwrap();
        assert_eq!(
            declined(api_failure(
                402,
                "card_error",
                Some("card_declined"),
                Some("insufficient_funds")
            )),
            AuthorizeOutcome::Declined {
                code: "insufficient_funds".into()
            }
        );
        assert_eq!(
            declined(api_failure(402, "card_error", Some("expired_card"), None)),
            AuthorizeOutcome::Declined {
                code: "expired_card".into()
            }
        );
        for status in [409, 429, 500, 503] {
            assert!(
                gateway_error("x", &api_failure(status, "api_error", None, None)).is_retryable()
            );
        }
        for status in [400, 401, 404] {
            assert!(
                !gateway_error(
                    "x",
                    &api_failure(status, "invalid_request_error", None, None)
                )
                .is_retryable()
            );
        }
        assert!(gateway_error("x", &Failure::Transport("reset".into())).is_retryable());
        let overridden = Failure::Api {
            status: 400,
            error: Box::default(),
            should_retry: Some(true),
        };
        assert!(gateway_error("x", &overridden).is_retryable());
        // A 401's message is never copied (it may quote the key).
        let e = gateway_error(
            "x",
            &Failure::Api {
                status: 401,
                error: Box::new(ApiError {
                    kind: "invalid_request_error".into(),
                    message: Some("Invalid API Key provided: sk_test_****abcd".into()),
                    ..ApiError::default()
                }),
                should_retry: None,
            },
        );
        assert!(!e.to_string().contains("sk_test"), "{e}");
    }

    /// Test tokens become their documented test PaymentMethods; others pass.
    #[test]
    fn payment_methods() {
        assert_eq!(payment_method_for("tok_visa"), "pm_card_visa");
        assert_eq!(
            payment_method_for("tok_chargeDeclinedInsufficientFunds"),
            "pm_card_chargeDeclinedInsufficientFunds"
        );
        assert_eq!(payment_method_for("pm_card_visa"), "pm_card_visa");
        assert_eq!(
            payment_method_for("tok_1N3T00LkdIwHu7ix"),
            "tok_1N3T00LkdIwHu7ix"
        );
        assert_eq!(order_query("o'1"), "metadata['order_id']:'o\\'1'");
    }

    /// The client's Debug output never shows the key.
    #[test]
    fn debug_redacts_key() {
        let api = HttpApi::new(
            "http://127.0.0.1:9/",
            Secret::new("sk_test_debugsecret"),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .unwrap();
        let text = format!("{api:?}");
        assert!(!text.contains("debugsecret"), "{text}");
        assert_eq!(api.base_url(), "http://127.0.0.1:9");
    }
}
