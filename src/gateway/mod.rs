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
}

impl GatewayError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, GatewayError::Unavailable(_))
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
