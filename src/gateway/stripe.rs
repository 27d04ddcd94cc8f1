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
//! Answers: a 2xx counts only when the PaymentIntent shows what was asked:
//! an authorization `status = requires_capture` in the order's currency
//! with `amount_capturable` ≥ the amount, a capture `status = succeeded`
//! with `amount_received` = the amount; any other 2xx is
//! [`GatewayError::Unexpected`] with its own reason
//! (`gateway_unexpected_status`, `gateway_amount_mismatch`,
//! `gateway_currency_mismatch`), never retried (the key would replay the
//! same answer). 402 `card_error` → declined with its `decline_code` (else
//! `code`); 401 and 403 → [`GatewayError::AuthFailed`]
//! (`gateway_auth_failed`: the key is refused, retrying cannot help);
//! network errors, timeouts, 409 (key in use), 429 and 5xx →
//! [`GatewayError::Unavailable`] (retryable); other 4xx →
//! [`GatewayError::Refused`]. A `Stripe-Should-Retry` header overrides the
//! status-based choice (not for 401 and 403).
//!
//! Every request pins the API version ([`STRIPE_VERSION`], the
//! `Stripe-Version` header) so the answers keep the shape this code reads
//! whatever the account's default version is or becomes.
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

use super::{AuthorizeOutcome, AuthorizeRequest, GatewayError, PaymentGateway, UnexpectedAnswer};
use crate::config::{GatewayConfig, Secret};

/// The Stripe API version every request is made with (`Stripe-Version`):
/// the version of the OpenAPI specification stripe-mock v0.203.0 serves,
/// which the tests check the requests against. Change it only together
/// with that specification, after checking the fields this module reads.
pub const STRIPE_VERSION: &str = "2026-08-26.dahlia";

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
        Failure::Api { status, error, .. } if is_auth_status(*status) => {
            GatewayError::AuthFailed(describe(op, *status, error))
        }
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
    // A 401 or 403 message may quote (part of) the key: never copy it.
    if !is_auth_status(status)
        && let Some(m) = &e.message
    {
        s.push_str(": ");
        s.push_str(m);
    }
    s
}

/// 401 (no valid key) and 403 (a key without the permission).
fn is_auth_status(status: u16) -> bool {
    matches!(status, 401 | 403)
}

/// Maps an authorization answer: a card error is a decline, not an error,
/// and a 2xx is an authorization only when it holds the order's amount in
/// its currency, ready to capture.
pub fn authorize_outcome(
    req: &AuthorizeRequest,
    result: Result<PaymentIntent, Failure>,
) -> Result<AuthorizeOutcome, GatewayError> {
    match result {
        Ok(pi) => {
            check_authorization(req, &pi).map_err(|problem| GatewayError::Unexpected {
                op: "authorize",
                problem,
            })?;
            Ok(AuthorizeOutcome::Authorized { payment_id: pi.id })
        }
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

/// What an authorization's PaymentIntent must show, checked in this order:
/// the status, the currency, then the amount that can be captured.
fn check_authorization(req: &AuthorizeRequest, pi: &PaymentIntent) -> Result<(), UnexpectedAnswer> {
    let payment_id = || pi.id.clone();
    if pi.status != "requires_capture" {
        return Err(UnexpectedAnswer::Status {
            payment_id: payment_id(),
            got: pi.status.clone(),
            want: "requires_capture",
        });
    }
    if !pi.currency.eq_ignore_ascii_case(&req.currency) {
        return Err(UnexpectedAnswer::Currency {
            payment_id: payment_id(),
            got: pi.currency.clone(),
            want: req.currency.to_ascii_lowercase(),
        });
    }
    if pi.amount_capturable < req.amount {
        return Err(UnexpectedAnswer::Amount {
            payment_id: payment_id(),
            field: "amount_capturable",
            got: pi.amount_capturable,
            want: req.amount,
        });
    }
    Ok(())
}

/// Maps a capture answer: a 2xx counts only when the payment succeeded
/// with exactly the amount asked for.
pub fn capture_outcome(
    amount: u64,
    result: Result<PaymentIntent, Failure>,
) -> Result<(), GatewayError> {
    let pi = result.map_err(|f| gateway_error("capture", &f))?;
    let problem = if pi.status != "succeeded" {
        UnexpectedAnswer::Status {
            payment_id: pi.id,
            got: pi.status,
            want: "succeeded",
        }
    } else if pi.amount_received != amount {
        UnexpectedAnswer::Amount {
            payment_id: pi.id,
            field: "amount_received",
            got: pi.amount_received,
            want: amount,
        }
    } else {
        return Ok(());
    };
    Err(GatewayError::Unexpected {
        op: "capture",
        problem,
    })
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
        let outcome = authorize_outcome(req, result);
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
        let outcome = capture_outcome(amount, result);
        tracing::debug!(payment_intent = %payment_id, key = %idempotency_key, outcome = ?outcome, "payment capture");
        outcome
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
    /// The `Stripe-Version` the answer was made with, when the API says.
    pub stripe_version: Option<String>,
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
            .header(reqwest::header::AUTHORIZATION, auth)
            .header("Stripe-Version", STRIPE_VERSION);
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
        let stripe_version = header("stripe-version");
        let body = res.bytes().await.map_err(|e| self.transport(e))?.to_vec();
        Ok(ApiResponse {
            status,
            body,
            idempotency_key,
            replayed,
            should_retry,
            stripe_version,
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
    use std::sync::Arc;

    use super::*;
    use crate::gateway::UnexpectedAnswer as U;

    fn auth_req(amount: u64) -> AuthorizeRequest {
        AuthorizeRequest {
            order_id: "o1".into(),
            amount,
            currency: "USD".into(),
            token: "tok_visa".into(),
            idempotency_key: "o1:authorize".into(),
        }
    }

    fn intent(status: &str, currency: &str, capturable: u64, received: u64) -> PaymentIntent {
        PaymentIntent {
            id: "pi_1".into(),
            object: "payment_intent".into(),
            amount: 100,
            amount_capturable: capturable,
            amount_received: received,
            currency: currency.into(),
            status: status.into(),
            capture_method: Some("manual".into()),
            cancellation_reason: None,
            metadata: BTreeMap::new(),
            livemode: false,
        }
    }

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
        let r = auth_req(100);
        let declined = |f| authorize_outcome(&r, Err(f)).unwrap();
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

    /// A 2xx authorization counts only as `requires_capture` in the order's
    /// currency with enough to capture; a 2xx capture only as `succeeded`
    /// with exactly the amount; anything else is a typed error with its own
    /// reason.
    #[test]
    fn two_xx_answers_are_checked() {
        let r = auth_req(100);
        let authorize = |pi| authorize_outcome(&r, Ok(pi));
        assert_eq!(
            authorize(intent("requires_capture", "usd", 100, 0)),
            Ok(AuthorizeOutcome::Authorized {
                payment_id: "pi_1".into()
            })
        );
        assert!(authorize(intent("requires_capture", "USD", 150, 0)).is_ok());
        let failed = |pi| {
            let e = authorize(pi).unwrap_err();
            assert!(!e.is_retryable(), "{e}");
            e
        };
        let e = failed(intent("requires_payment_method", "usd", 100, 0));
        assert_eq!(e.reason(), "gateway_unexpected_status");
        assert_eq!(
            e,
            GatewayError::Unexpected {
                op: "authorize",
                problem: U::Status {
                    payment_id: "pi_1".into(),
                    got: "requires_payment_method".into(),
                    want: "requires_capture",
                }
            }
        );
        assert_eq!(
            failed(intent("processing", "usd", 0, 0)).reason(),
            "gateway_unexpected_status"
        );
        assert_eq!(
            failed(intent("succeeded", "usd", 0, 100)).reason(),
            "gateway_unexpected_status",
            "captured at once: not what manual capture asked for"
        );
        let e = failed(intent("requires_capture", "eur", 100, 0));
        assert_eq!(e.reason(), "gateway_currency_mismatch");
        assert!(e.to_string().contains("currency `eur` where `usd`"), "{e}");
        let e = failed(intent("requires_capture", "usd", 99, 0));
        assert_eq!(e.reason(), "gateway_amount_mismatch");
        assert!(
            e.to_string().contains("amount_capturable = 99 where 100"),
            "{e}"
        );

        assert_eq!(
            capture_outcome(100, Ok(intent("succeeded", "usd", 0, 100))),
            Ok(())
        );
        let e = capture_outcome(100, Ok(intent("processing", "usd", 0, 0))).unwrap_err();
        assert_eq!(e.reason(), "gateway_unexpected_status");
        let e = capture_outcome(100, Ok(intent("succeeded", "usd", 0, 99))).unwrap_err();
        assert_eq!(e.reason(), "gateway_amount_mismatch");
        assert!(e.to_string().contains("amount_received = 99"), "{e}");
        let e = capture_outcome(100, Ok(intent("succeeded", "usd", 0, 101))).unwrap_err();
        assert_eq!(e.reason(), "gateway_amount_mismatch");
    }

    /// 401 and 403 are `AuthFailed` (`gateway_auth_failed`), never
    /// retryable whatever `Stripe-Should-Retry` says, and their message is
    /// never copied.
    #[test]
    fn auth_refusals_are_typed() {
        for status in [401, 403] {
            let f = Failure::Api {
                status,
                error: Box::new(ApiError {
                    kind: "invalid_request_error".into(),
                    message: Some("The provided key 'rk_test_****wxyz' is refused".into()),
                    ..ApiError::default()
                }),
                should_retry: Some(true),
            };
            let e = gateway_error("authorize", &f);
            assert!(matches!(e, GatewayError::AuthFailed(_)), "{e:?}");
            assert!(!e.is_retryable());
            assert_eq!(e.reason(), "gateway_auth_failed");
            assert!(!e.to_string().contains("wxyz"), "{e}");
            assert!(e.to_string().contains(&format!("HTTP {status}")), "{e}");
            let r = auth_req(1);
            assert_eq!(authorize_outcome(&r, Err(f)), Err(e));
        }
    }

    /// Against gateway-sim (served in process on a loopback port): each of
    /// its untrustworthy answers is the typed error it must be, refused
    /// credentials are `AuthFailed` until the switch is off, and every
    /// request carries the pinned `Stripe-Version`.
    #[tokio::test]
    async fn against_gateway_sim() {
        let engine = Arc::new(crate::gateway::simulator::SimEngine::new(
            crate::gateway::simulator::SimOptions {
                record_calls: true,
                ..Default::default()
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::gateway::sim_server::serve(
            listener,
            engine.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let config = GatewayConfig {
            url: url.clone(),
            ..GatewayConfig::default()
        };
        let client = StripeClient::from_config(&config, Secret::new("sk_test_unit")).unwrap();
        let req = |order: &str, token: &str| AuthorizeRequest {
            order_id: order.into(),
            amount: 1000,
            currency: "USD".into(),
            token: token.into(),
            idempotency_key: format!("{order}:authorize"),
        };
        let reason = |r: Result<AuthorizeOutcome, GatewayError>| r.unwrap_err().reason();
        let a = client.authorize(&req("a", "tok_simProcessing")).await;
        assert_eq!(reason(a), "gateway_unexpected_status");
        let b = client
            .authorize(&req("b", "tok_simPartialAuthorization"))
            .await;
        assert_eq!(reason(b), "gateway_amount_mismatch");
        let c = client.authorize(&req("c", "tok_simCurrencyMismatch")).await;
        assert_eq!(reason(c), "gateway_currency_mismatch");
        for (order, token, want) in [
            ("d", "tok_simCaptureShort", "gateway_amount_mismatch"),
            ("e", "tok_simCaptureProcessing", "gateway_unexpected_status"),
        ] {
            let Ok(AuthorizeOutcome::Authorized { payment_id }) =
                client.authorize(&req(order, token)).await
            else {
                panic!("{token} authorizes");
            };
            let e = client
                .capture(&payment_id, 1000, &format!("{order}:capture"))
                .await
                .unwrap_err();
            assert_eq!(e.reason(), want, "{token}: {e}");
        }

        let res = client
            .api()
            .request(
                reqwest::Method::GET,
                "/v1/payment_intents/pi_none",
                &[],
                None,
            )
            .await
            .unwrap();
        assert_eq!(res.status, 404);
        assert_eq!(res.stripe_version.as_deref(), Some(STRIPE_VERSION));

        let switch = |refuse: Option<u16>| {
            let url = format!("{url}/admin/auth");
            async move {
                let res = reqwest::Client::new()
                    .post(url)
                    .json(&serde_json::json!({ "refuse": refuse }))
                    .send()
                    .await
                    .unwrap();
                assert!(res.status().is_success());
            }
        };
        for status in [401, 403] {
            switch(Some(status)).await;
            let e = client.authorize(&req("f", "tok_visa")).await.unwrap_err();
            assert!(
                matches!(&e, GatewayError::AuthFailed(m) if m.contains(&status.to_string())),
                "{e:?}"
            );
            let e = client.capture("pi_x", 1, "x:capture").await.unwrap_err();
            assert_eq!(e.reason(), "gateway_auth_failed");
            let e = client.void("f", "", "f:void").await.unwrap_err();
            assert_eq!(
                e.reason(),
                "gateway_auth_failed",
                "the search is refused too"
            );
        }
        switch(None).await;
        assert!(client.authorize(&req("f", "tok_visa")).await.is_ok());
        let refused: Vec<_> = engine
            .ledger()
            .calls
            .into_iter()
            .filter(|c| c.result == "auth_refused")
            .map(|c| (c.op, c.status))
            .collect();
        assert_eq!(
            refused,
            [
                ("create", 401),
                ("capture", 401),
                ("search", 401),
                ("create", 403),
                ("capture", 403),
                ("search", 403),
            ]
        );
        let _ = stop.send(());
        server.await.unwrap().unwrap();
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
