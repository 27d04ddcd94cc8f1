//! Payment gateways. The pipeline's effect executor sees only the
//! [`PaymentGateway`] trait. One file per implementation, chosen by
//! `gateway.kind` in `crate::app`:
//!
//! - `simulator.rs`: the in-process simulator (the default), a model of
//!   Stripe's PaymentIntents API driven through the Stripe protocol code;
//! - `stripe.rs`: the Stripe-compatible HTTP client (Stripe, `stripe-mock`,
//!   or `orderflow gateway-sim`);
//! - `sim_server.rs`: `orderflow gateway-sim`, the simulator's engine
//!   served over HTTP as a Stripe API subset;
//! - `breaker.rs`: the circuit breaker every gateway is wrapped in.

pub mod breaker;
pub mod sim_server;
pub mod simulator;
pub mod stripe;

use async_trait::async_trait;

/// An authorization request; money in integer minor units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizeRequest {
    pub order_id: String,
    pub amount: u64,
    pub currency: String,
    /// A payment token (never a card number).
    pub token: String,
    pub idempotency_key: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthorizeOutcome {
    Authorized { payment_id: String },
    Declined { code: String },
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    /// Network error, timeout, 429 or 5xx: retrying may help.
    #[error("payment gateway unavailable: {0}")]
    Unavailable(String),
    /// The gateway refused the request itself: retrying will not help.
    #[error("payment gateway refused the request: {0}")]
    Refused(String),
    /// 401 or 403: the gateway refuses orderflow's secret key (wrong,
    /// revoked, or without the permission). Retrying with the same key
    /// cannot help, and every other call fails the same way.
    #[error("payment gateway refused orderflow's credentials: {0}")]
    AuthFailed(String),
    /// A 2xx answer that does not show what was asked for: no money moved
    /// as orderflow asked, whatever the HTTP status says.
    #[error("payment gateway answered {op} with {problem}")]
    Unexpected {
        op: &'static str,
        problem: UnexpectedAnswer,
    },
}

/// What is wrong with a 2xx answer (see [`GatewayError::Unexpected`]).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum UnexpectedAnswer {
    #[error("status `{got}` where `{want}` was expected (payment {payment_id})")]
    Status {
        payment_id: String,
        got: String,
        want: &'static str,
    },
    #[error("{field} = {got} where {want} was expected (payment {payment_id})")]
    Amount {
        payment_id: String,
        field: &'static str,
        got: u64,
        want: u64,
    },
    #[error("currency `{got}` where `{want}` was asked for (payment {payment_id})")]
    Currency {
        payment_id: String,
        got: String,
        want: String,
    },
}

/// `payment_failed` reasons of an authorization that ended in an error.
pub const REASON_GATEWAY_UNAVAILABLE: &str = "gateway_unavailable";
pub const REASON_GATEWAY_AUTH_FAILED: &str = "gateway_auth_failed";
pub const REASON_GATEWAY_UNEXPECTED_STATUS: &str = "gateway_unexpected_status";
pub const REASON_GATEWAY_AMOUNT_MISMATCH: &str = "gateway_amount_mismatch";
pub const REASON_GATEWAY_CURRENCY_MISMATCH: &str = "gateway_currency_mismatch";

impl GatewayError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, GatewayError::Unavailable(_))
    }

    /// The reason an order whose authorization ended in this error is
    /// `payment_failed` with (a metric label and part of the contract).
    /// A refusal keeps `gateway_unavailable`, its reason since the first
    /// release.
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::Unavailable(_) | GatewayError::Refused(_) => REASON_GATEWAY_UNAVAILABLE,
            GatewayError::AuthFailed(_) => REASON_GATEWAY_AUTH_FAILED,
            GatewayError::Unexpected { problem, .. } => match problem {
                UnexpectedAnswer::Status { .. } => REASON_GATEWAY_UNEXPECTED_STATUS,
                UnexpectedAnswer::Amount { .. } => REASON_GATEWAY_AMOUNT_MISMATCH,
                UnexpectedAnswer::Currency { .. } => REASON_GATEWAY_CURRENCY_MISMATCH,
            },
        }
    }
}

/// Every call is idempotent under its key: the same key gives the first
/// answer again and never moves money twice.
#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    async fn authorize(&self, req: &AuthorizeRequest) -> Result<AuthorizeOutcome, GatewayError>;

    /// Captures an authorization (only ever for a confirmed order).
    async fn capture(
        &self,
        payment_id: &str,
        amount: u64,
        idempotency_key: &str,
    ) -> Result<(), GatewayError>;

    /// Cancels an authorization. With an empty `payment_id` it cancels
    /// whatever the order's authorization key created, if anything.
    async fn void(
        &self,
        order_id: &str,
        payment_id: &str,
        idempotency_key: &str,
    ) -> Result<(), GatewayError>;
}
