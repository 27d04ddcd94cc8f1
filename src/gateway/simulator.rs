//! The built-in payment gateway simulator. It follows Stripe's test tokens:
//! `tok_visa` (and any other token) succeeds, `tok_chargeDeclined` and
//! `tok_chargeDeclinedInsufficientFunds` decline. Latency and failure rate
//! are configurable. It keeps a ledger of every call so tests can check
//! that no order was captured twice and every stray authorization voided.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use sha2::{Digest, Sha256};

use super::{AuthorizeOutcome, AuthorizeRequest, GatewayError, PaymentGateway};
use crate::config::GatewayConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntentState {
    Authorized,
    Captured,
    Canceled,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    pub order_id: String,
    pub amount: u64,
    pub state: IntentState,
    /// Capture calls that moved money (must never exceed 1).
    pub captures: u32,
}

#[derive(Default)]
struct Ledger {
    /// First answer per authorization idempotency key.
    authorizations: BTreeMap<String, AuthorizeOutcome>,
    intents: BTreeMap<String, Intent>,
    calls: u64,
}

pub struct Simulator {
    latency: Duration,
    failure_rate: f64,
    ledger: Mutex<Ledger>,
}

impl Simulator {
    pub fn new(config: &GatewayConfig) -> Simulator {
        Simulator {
            latency: Duration::from_millis(config.latency_ms),
            failure_rate: config.failure_rate,
            ledger: Mutex::new(Ledger::default()),
        }
    }

    /// A copy of every payment intent, by payment id.
    pub fn intents(&self) -> BTreeMap<String, Intent> {
        self.ledger.lock().expect("ledger lock").intents.clone()
    }

    pub fn calls(&self) -> u64 {
        self.ledger.lock().expect("ledger lock").calls
    }

    async fn call(&self) -> Result<(), GatewayError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        self.ledger.lock().expect("ledger lock").calls += 1;
        if self.failure_rate > 0.0 && rand::rng().random_bool(self.failure_rate) {
            return Err(GatewayError::Unavailable("simulated failure".into()));
        }
        Ok(())
    }
}

/// Payment ids are derived from the order id, like an idempotent
/// PaymentIntent create would return the same intent.
fn payment_id(order_id: &str) -> String {
    let digest = Sha256::digest(order_id.as_bytes());
    format!("pi_{}", &hex::encode(digest)[..24])
}

fn decline_code(token: &str) -> Option<&'static str> {
    match token {
        "tok_chargeDeclined" => Some("card_declined"),
        "tok_chargeDeclinedInsufficientFunds" => Some("insufficient_funds"),
        _ => None,
    }
}

#[async_trait]
impl PaymentGateway for Simulator {
    async fn authorize(&self, req: &AuthorizeRequest) -> Result<AuthorizeOutcome, GatewayError> {
        self.call().await?;
        let mut ledger = self.ledger.lock().expect("ledger lock");
        if let Some(first) = ledger.authorizations.get(&req.idempotency_key) {
            return Ok(first.clone());
        }
        let outcome = match decline_code(&req.token) {
            Some(code) => AuthorizeOutcome::Declined {
                code: code.to_owned(),
            },
            None => {
                let id = payment_id(&req.order_id);
                ledger.intents.insert(
                    id.clone(),
                    Intent {
                        order_id: req.order_id.clone(),
                        amount: req.amount,
                        state: IntentState::Authorized,
                        captures: 0,
                    },
                );
                AuthorizeOutcome::Authorized { payment_id: id }
            }
        };
        ledger
            .authorizations
            .insert(req.idempotency_key.clone(), outcome.clone());
        Ok(outcome)
    }

    async fn capture(
        &self,
        payment_id: &str,
        amount: u64,
        _idempotency_key: &str,
    ) -> Result<(), GatewayError> {
        self.call().await?;
        let mut ledger = self.ledger.lock().expect("ledger lock");
        let intent = ledger
            .intents
            .get_mut(payment_id)
            .ok_or_else(|| GatewayError::Refused(format!("no such payment {payment_id}")))?;
        match intent.state {
            IntentState::Authorized if amount <= intent.amount => {
                intent.state = IntentState::Captured;
                intent.captures += 1;
                Ok(())
            }
            IntentState::Captured => Ok(()), // idempotent repeat
            _ => Err(GatewayError::Refused(format!(
                "payment {payment_id} cannot be captured"
            ))),
        }
    }

    async fn void(
        &self,
        order_id: &str,
        payment_id: &str,
        _idempotency_key: &str,
    ) -> Result<(), GatewayError> {
        self.call().await?;
        let id = if payment_id.is_empty() {
            self::payment_id(order_id)
        } else {
            payment_id.to_owned()
        };
        let mut ledger = self.ledger.lock().expect("ledger lock");
        match ledger.intents.get_mut(&id) {
            None => Ok(()), // nothing was authorized
            Some(intent) if intent.state == IntentState::Captured => Err(GatewayError::Refused(
                format!("payment {id} is captured; refunds are out of scope"),
            )),
            Some(intent) => {
                intent.state = IntentState::Canceled;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(order: &str, token: &str) -> AuthorizeRequest {
        AuthorizeRequest {
            order_id: order.into(),
            amount: 100,
            currency: "USD".into(),
            token: token.into(),
            idempotency_key: format!("{order}:authorize"),
        }
    }

    /// Test tokens behave as Stripe's, and a repeated key gives the first answer.
    #[tokio::test]
    async fn tokens_and_idempotency() {
        let sim = Simulator::new(&GatewayConfig::default());
        let a = sim.authorize(&req("o1", "tok_visa")).await.unwrap();
        assert!(matches!(a, AuthorizeOutcome::Authorized { .. }));
        assert_eq!(sim.authorize(&req("o1", "tok_visa")).await.unwrap(), a);
        let d = sim
            .authorize(&req("o2", "tok_chargeDeclined"))
            .await
            .unwrap();
        assert_eq!(
            d,
            AuthorizeOutcome::Declined {
                code: "card_declined".into()
            }
        );
        let AuthorizeOutcome::Authorized { payment_id } = a else {
            unreachable!()
        };
        sim.capture(&payment_id, 100, "o1:capture").await.unwrap();
        sim.capture(&payment_id, 100, "o1:capture").await.unwrap();
        assert_eq!(sim.intents()[&payment_id].captures, 1);
        assert!(sim.void("o1", "", "o1:void").await.is_err());
    }
}
