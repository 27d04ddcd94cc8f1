//! The payment gateway simulator: a small model of Stripe's PaymentIntents
//! API ([`SimEngine`]) and the in-process gateway built on it
//! ([`Simulator`], the default). `orderflow gateway-sim`
//! (`super::sim_server`) serves the same engine over HTTP, and the
//! in-process gateway drives it through the same protocol code as the HTTP
//! client (`super::stripe::Stripe`), so in-process and out-of-process
//! behave the same.
//!
//! It follows Stripe's test tokens and test PaymentMethods: `tok_visa` /
//! `pm_card_visa` (and any other payment method) succeed;
//! `tok_chargeDeclined` / `pm_card_chargeDeclined` decline with
//! `card_declined` / `generic_decline`, and
//! `tok_chargeDeclinedInsufficientFunds` with `card_declined` /
//! `insufficient_funds` (a 402 `card_error`). Test tokens of its own
//! make it answer the way a gateway must not be trusted blindly, so the
//! client's checks of 2xx answers can be tested (each also as
//! `pm_card_<name>`):
//!
//! | token | answer |
//! |---|---|
//! | `tok_simProcessing` | the create answers 200 with `status = processing` |
//! | `tok_simPartialAuthorization` | `requires_capture` with `amount_capturable` half the amount (rounded down) |
//! | `tok_simCurrencyMismatch` | `requires_capture` in another currency (`eur`, or `usd` when `eur` was asked) |
//! | `tok_simCaptureShort` | authorized; the capture answers `succeeded` with `amount_received` one less than captured |
//! | `tok_simCaptureProcessing` | authorized; the capture answers 200 with `status = processing` and nothing received |
//!
//! `Idempotency-Key` works as
//! Stripe documents: the same key with the same parameters answers the
//! stored first answer (`Idempotent-Replayed: true`); the same key with
//! other parameters is a 400 `idempotency_error`. Results are stored only
//! for requests that executed (not for invalid parameters, injected
//! failures, outages or 429 refusals). Latency, failure rate (answered as
//! 500 or 503) and an outage switch are configurable; a ledger records the
//! intents (state, captures, cancels) and, when enabled, the calls.
//!
//! # Bounds
//!
//! The engine lives as long as its process, months for a stream processor,
//! so everything it keeps is bounded in count and in time by
//! [`SimOptions`] (in-process defaults in brackets; `orderflow gateway-sim`
//! keeps more intents and keys, and takes each bound as a flag):
//!
//! - Payment intents: at most `max_intents` (100 000). An intent that holds
//!   no authorization, called settled here (`succeeded`, `canceled`,
//!   `processing`, `requires_payment_method` after a decline, or never
//!   confirmed), is
//!   forgotten `intent_retention_ms` (24 h) after it settled, and, when a
//!   create finds `max_intents` kept, the settled intent created first is
//!   forgotten to make room. An intent in `requires_capture` is never
//!   forgotten for room: when every kept intent is one, the create answers
//!   429 `rate_limit_error` / `rate_limit`, naming the limit, and creates
//!   nothing (Stripe's retryable answer, so a client backs off).
//! - Authorizations: like Stripe's (7 days), one not captured
//!   `authorization_ttl_ms` (7 days) after it was made becomes `canceled`
//!   with `cancellation_reason = "automatic"`, and is then settled like any
//!   other.
//! - Idempotency keys: Stripe keeps them 24 hours. A key is forgotten
//!   `key_ttl_ms` (24 h) after its first answer was stored, and the oldest
//!   is forgotten when a new one would exceed `max_keys` (200 000). A
//!   forgotten key is new again: reusing it executes the request anew.
//! - The call ledger (`record_calls`): the last `max_calls` (100 000)
//!   calls; the summary's counters stay totals over the engine's life.
//!
//! A forgotten intent is unknown from then on: capture and cancel answer
//! 404 `resource_missing`, search does not find it, the ledger does not list
//! it. A key's stored answer does not depend on its intent being kept, so a
//! key that outlives its intent still replays the first answer.
//!
//! Time is the wall clock ([`Clock::System`]; this is a test tool outside
//! the deterministic processor), never taken backwards so a stepped clock
//! cannot reorder what expires. Forgetting is done by the calls themselves
//! (an idle engine does no work): each pops what is due from the front of
//! queues kept in insertion order, so it costs O(1) amortised per call,
//! never a scan of what is kept. [`SimEngine::sizes`] and the `/ledger`
//! summary (`intents_kept`, `keys_kept`, `calls_kept`, and counters of what
//! was evicted, expired and refused) show where each bound stands.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use super::stripe::{Failure, PaymentIntent, Stripe, StripeApi};
use super::{AuthorizeOutcome, AuthorizeRequest, GatewayError, PaymentGateway};
use crate::config::GatewayConfig;

pub use crate::config::sim_bounds::{
    DEFAULT_AUTHORIZATION_TTL_MS, DEFAULT_INTENT_RETENTION_MS, DEFAULT_KEY_TTL_MS,
    DEFAULT_MAX_CALLS, DEFAULT_MAX_INTENTS, DEFAULT_MAX_KEYS, MAX_COUNT_BOUND, MAX_TTL_BOUND_MS,
};
mod engine;
mod state;

pub use engine::*;

/// Where the engine reads the time.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The system's wall clock, in milliseconds since the Unix epoch.
    #[default]
    System,
    /// Milliseconds set by hand, so tests move time without sleeping.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => crate::wall_clock::now_ms(),
            Clock::Manual(ms) => ms.load(Ordering::SeqCst),
        }
    }
}

/// What a simulator does besides answering, and the bounds of what it
/// keeps (see the module doc).
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Added to every call.
    pub latency: Duration,
    /// Probability (0 to 1) that a call fails with 500 or 503.
    pub failure_rate: f64,
    /// Keep a record of the last `max_calls` calls (gateway-sim's
    /// `GET /ledger`); off in process, where a benchmark makes millions of
    /// calls.
    pub record_calls: bool,
    /// Payment intents kept at most (at least 1).
    pub max_intents: usize,
    /// How long a settled intent is kept after it settled.
    pub intent_retention_ms: u64,
    /// How long an authorization may wait for its capture before it is
    /// canceled (`automatic`).
    pub authorization_ttl_ms: u64,
    /// Idempotency keys kept at most (at least 1).
    pub max_keys: usize,
    /// How long an idempotency key is kept after its first answer.
    pub key_ttl_ms: u64,
    /// Calls kept in the ledger at most (at least 1), with `record_calls`.
    pub max_calls: usize,
    /// The time the bounds are measured in.
    pub clock: Clock,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            latency: Duration::ZERO,
            failure_rate: 0.0,
            record_calls: false,
            max_intents: DEFAULT_MAX_INTENTS,
            intent_retention_ms: DEFAULT_INTENT_RETENTION_MS,
            authorization_ttl_ms: DEFAULT_AUTHORIZATION_TTL_MS,
            max_keys: DEFAULT_MAX_KEYS,
            key_ttl_ms: DEFAULT_KEY_TTL_MS,
            max_calls: DEFAULT_MAX_CALLS,
            clock: Clock::System,
        }
    }
}

impl SimOptions {
    /// The in-process simulator's options: latency, failure rate and
    /// bounds from `config`; calls are not recorded.
    pub fn from_config(config: &GatewayConfig) -> SimOptions {
        SimOptions {
            latency: Duration::from_millis(config.latency_ms),
            failure_rate: config.failure_rate,
            record_calls: false,
            max_intents: config.sim_max_intents,
            intent_retention_ms: config.sim_intent_retention_ms,
            authorization_ttl_ms: config.sim_authorization_ttl_ms,
            max_keys: config.sim_max_keys,
            key_ttl_ms: config.sim_key_ttl_ms,
            max_calls: config.sim_max_calls,
            clock: Clock::System,
        }
    }

    /// Each bound as `(name, value, lowest, highest)`, for the checks of
    /// the configuration (`gateway.sim_<name>`) and of gateway-sim's flags
    /// (`--<name>` with `-` for `_`), so both accept the same ranges.
    pub fn bound_ranges(&self) -> [(&'static str, u64, u64, u64); 6] {
        crate::config::sim_bounds::ranges(
            self.max_intents,
            self.intent_retention_ms,
            self.authorization_ttl_ms,
            self.max_keys,
            self.key_ttl_ms,
            self.max_calls,
        )
    }
}

/// How much the engine keeps now: each is at most its bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SimSizes {
    /// Payment intents (at most `max_intents`).
    pub intents: usize,
    /// Idempotency keys (at most `max_keys`).
    pub keys: usize,
    /// Call records (at most `max_calls`; 0 unless calls are recorded).
    pub calls: usize,
}

/// One payment intent, as the ledger shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IntentView {
    pub order_id: Option<String>,
    pub amount: u64,
    pub currency: String,
    /// Stripe's status: `requires_capture` (authorized), `succeeded`
    /// (captured), `canceled`, `requires_payment_method` (declined), ...
    pub status: String,
    /// Whether it ever reached `requires_capture` (money was authorized).
    pub authorized: bool,
    /// Captures that moved money (an idempotent replay is not one).
    pub captures: u32,
    /// Cancels that executed.
    pub cancels: u32,
    pub amount_received: u64,
}

/// One call the simulator received.
#[derive(Clone, Debug, Serialize)]
pub struct CallRecord {
    pub seq: u64,
    /// `create`, `capture`, `cancel`, `search` or `retrieve`.
    pub op: &'static str,
    pub idempotency_key: Option<String>,
    /// `metadata[order_id]` of the intent concerned (or searched for).
    pub order_id: Option<String>,
    pub payment_intent: Option<String>,
    /// HTTP status of the answer.
    pub status: u16,
    /// `ok`, `replayed`, `declined:<decline_code>`, `unavailable`,
    /// `idempotency_error`, `auth_refused` (401/403, gateway-sim only) or
    /// `error:<code>`.
    pub result: String,
    /// The call arrived while the outage switch was on.
    pub down: bool,
}

/// The ledger's summary. The counters are totals over the engine's life,
/// forgotten intents and calls included; `*_kept` are what is kept now.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LedgerSummary {
    pub calls: u64,
    pub calls_while_down: u64,
    /// Intents created.
    pub intents: u64,
    /// Intents that reached `requires_capture` or `succeeded` at creation.
    pub authorized: u64,
    /// Captures that moved money, over all intents.
    pub captures: u64,
    pub max_captures_per_intent: u32,
    pub down: bool,
    pub intents_kept: u64,
    pub keys_kept: u64,
    pub calls_kept: u64,
    /// Settled intents forgotten to make room (`max_intents`).
    pub intents_evicted: u64,
    /// Settled intents forgotten after `intent_retention_ms`.
    pub intents_expired: u64,
    /// Authorizations canceled (`automatic`) after `authorization_ttl_ms`.
    pub authorizations_expired: u64,
    /// Idempotency keys forgotten to make room (`max_keys`).
    pub keys_evicted: u64,
    /// Idempotency keys forgotten after `key_ttl_ms`.
    pub keys_expired: u64,
    /// Creates refused with 429 because every kept intent was uncaptured.
    pub rate_limited: u64,
}

/// Everything the simulator keeps: `GET /ledger`.
#[derive(Clone, Debug, Serialize)]
pub struct Ledger {
    pub summary: LedgerSummary,
    /// The intents kept.
    pub intents: BTreeMap<String, IntentView>,
    /// The last `max_calls` calls, oldest first (empty unless calls are
    /// recorded).
    pub calls: Vec<CallRecord>,
}

/// The engine as a [`StripeApi`] transport, without HTTP.
pub struct InProcess(Arc<SimEngine>);

#[async_trait]
impl StripeApi for InProcess {
    async fn create_intent(&self, params: &[(String, String)], key: &str) -> Answer {
        self.0.create(params, Some(key)).await.answer
    }

    async fn capture_intent(&self, id: &str, params: &[(String, String)], key: &str) -> Answer {
        self.0.capture(id, params, Some(key)).await.answer
    }

    async fn cancel_intent(&self, id: &str, params: &[(String, String)], key: &str) -> Answer {
        self.0.cancel(id, params, Some(key)).await.answer
    }

    async fn search_by_order(&self, order_id: &str) -> Result<Vec<PaymentIntent>, Failure> {
        self.0.search(&super::stripe::order_query(order_id)).await
    }
}

/// The in-process payment gateway (the default): the Stripe protocol of
/// `super::stripe` over the engine, without the network.
pub struct Simulator {
    engine: Arc<SimEngine>,
    gateway: Stripe<InProcess>,
}

impl Simulator {
    /// Latency, failure rate and bounds from `config`; calls are not
    /// recorded.
    pub fn new(config: &GatewayConfig) -> Simulator {
        Simulator::with_options(SimOptions::from_config(config))
    }

    pub fn with_options(options: SimOptions) -> Simulator {
        let engine = Arc::new(SimEngine::new(options));
        Simulator {
            gateway: Stripe::new(InProcess(engine.clone())),
            engine,
        }
    }

    pub fn engine(&self) -> &Arc<SimEngine> {
        &self.engine
    }

    /// A copy of the payment intents kept, by payment id.
    pub fn intents(&self) -> BTreeMap<String, IntentView> {
        self.engine.intents()
    }

    /// Calls received so far.
    pub fn calls(&self) -> u64 {
        self.engine.calls()
    }

    /// See [`SimEngine::set_down`].
    pub fn set_down(&self, down: bool) {
        self.engine.set_down(down);
    }
}

#[async_trait]
impl PaymentGateway for Simulator {
    async fn authorize(&self, req: &AuthorizeRequest) -> Result<AuthorizeOutcome, GatewayError> {
        self.gateway.authorize(req).await
    }

    async fn capture(
        &self,
        payment_id: &str,
        amount: u64,
        idempotency_key: &str,
    ) -> Result<(), GatewayError> {
        self.gateway
            .capture(payment_id, amount, idempotency_key)
            .await
    }

    async fn void(
        &self,
        order_id: &str,
        payment_id: &str,
        idempotency_key: &str,
    ) -> Result<(), GatewayError> {
        self.gateway
            .void(order_id, payment_id, idempotency_key)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::state::*;
    use super::*;
    use crate::gateway::stripe::authorize_params;

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
                code: "generic_decline".into()
            }
        );
        let d = sim
            .authorize(&req("o3", "tok_chargeDeclinedInsufficientFunds"))
            .await
            .unwrap();
        assert_eq!(
            d,
            AuthorizeOutcome::Declined {
                code: "insufficient_funds".into()
            }
        );
        let AuthorizeOutcome::Authorized { payment_id } = a else {
            unreachable!()
        };
        sim.capture(&payment_id, 100, "o1:capture").await.unwrap();
        sim.capture(&payment_id, 100, "o1:capture").await.unwrap();
        assert_eq!(sim.intents()[&payment_id].captures, 1);
        assert_eq!(sim.intents()[&payment_id].status, "succeeded");
        // A captured intent cannot be voided (refunds are out of scope).
        assert!(matches!(
            sim.void("o1", "", "o1:void").await,
            Err(GatewayError::Refused(_))
        ));
        // Voiding by order id cancels the authorization the key created.
        let AuthorizeOutcome::Authorized { payment_id: p4 } =
            sim.authorize(&req("o4", "tok_visa")).await.unwrap()
        else {
            unreachable!()
        };
        sim.void("o4", "", "o4:void").await.unwrap();
        assert_eq!(sim.intents()[&p4].status, "canceled");
        // And voiding an order that never authorized is a no-op.
        sim.void("o5", "", "o5:void").await.unwrap();
    }

    /// The simulator's own test tokens answer 2xx with what was not asked
    /// for, as the module doc says, and the in-process gateway (the Stripe
    /// protocol) turns each into its typed error; the authorizations it
    /// refused can be voided by order.
    #[tokio::test]
    async fn untrustworthy_answers() {
        let sim = Simulator::new(&GatewayConfig::default());
        let created = |order: &str| {
            let intents = sim.intents();
            let (id, view) = intents
                .into_iter()
                .find(|(_, v)| v.order_id.as_deref() == Some(order))
                .unwrap();
            (id, view)
        };
        let req = |order: &str, token: &str| {
            let mut r = req(order, token);
            r.amount = 1001;
            r
        };
        let e = sim
            .authorize(&req("p", "tok_simProcessing"))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "gateway_unexpected_status");
        assert_eq!(created("p").1.status, "processing");
        let e = sim
            .authorize(&req("h", "pm_card_simPartialAuthorization"))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "gateway_amount_mismatch");
        let (h, view) = created("h");
        assert_eq!(
            (view.status.as_str(), view.amount),
            ("requires_capture", 1001)
        );
        assert_eq!(sim.engine().retrieve(&h).unwrap().amount_capturable, 500);
        let e = sim
            .authorize(&req("c", "tok_simCurrencyMismatch"))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "gateway_currency_mismatch");
        assert_eq!(created("c").1.currency, "eur");
        for order in ["h", "c", "p"] {
            sim.void(order, "", &format!("{order}:void")).await.unwrap();
        }
        assert_eq!(created("h").1.status, "canceled");
        assert_eq!(created("c").1.status, "canceled");
        assert_eq!(created("p").1.status, "processing", "not cancelable");

        for (order, token, status, received, captures) in [
            ("s", "tok_simCaptureShort", "succeeded", 1000, 1),
            ("q", "tok_simCaptureProcessing", "processing", 0, 0),
        ] {
            let AuthorizeOutcome::Authorized { payment_id } =
                sim.authorize(&req(order, token)).await.unwrap()
            else {
                panic!("{token} authorizes");
            };
            let key = format!("{order}:capture");
            assert!(sim.capture(&payment_id, 1001, &key).await.is_err());
            let view = &sim.intents()[&payment_id];
            assert_eq!(
                (view.status.as_str(), view.amount_received, view.captures),
                (status, received, captures),
                "{token}"
            );
        }
    }

    /// Same key with other parameters is an idempotency error; injected
    /// outages answer 503 and are not stored.
    #[tokio::test]
    async fn idempotency_conflict_and_outage() {
        let engine = SimEngine::new(SimOptions {
            record_calls: true,
            ..SimOptions::default()
        });
        let mut params = authorize_params(&req("o1", "tok_visa"));
        engine.set_down(true);
        let e = engine.create(&params, Some("k")).await.answer.unwrap_err();
        assert!(matches!(e, Failure::Api { status: 503, .. }));
        engine.set_down(false);
        let first = engine.create(&params, Some("k")).await;
        assert!(!first.replayed);
        let first = first.answer.unwrap();
        assert_eq!(first.status, "requires_capture");
        let again = engine.create(&params, Some("k")).await;
        assert!(again.replayed);
        assert_eq!(again.answer.unwrap(), first);
        params[0].1 = "101".into();
        let e = engine.create(&params, Some("k")).await.answer.unwrap_err();
        let Failure::Api { status, error, .. } = e else {
            panic!()
        };
        assert_eq!((status, error.kind.as_str()), (400, "idempotency_error"));
        let ledger = engine.ledger();
        assert_eq!(ledger.summary.calls, 4);
        assert_eq!(ledger.summary.calls_while_down, 1);
        assert_eq!(ledger.summary.intents, 1);
        let results: Vec<&str> = ledger.calls.iter().map(|c| c.result.as_str()).collect();
        assert_eq!(
            results,
            ["unavailable", "ok", "replayed", "idempotency_error"]
        );
        assert_eq!(ledger.calls[1].order_id.as_deref(), Some("o1"));
    }

    /// An engine recording calls on a hand-driven clock (returned), with
    /// `edit` applied to its options.
    fn engine_at(edit: impl FnOnce(&mut SimOptions)) -> (SimEngine, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(1_000_000));
        let mut options = SimOptions {
            record_calls: true,
            clock: Clock::Manual(now.clone()),
            ..SimOptions::default()
        };
        edit(&mut options);
        (SimEngine::new(options), now)
    }

    fn advance(now: &AtomicU64, ms: u64) {
        now.fetch_add(ms, Ordering::SeqCst);
    }

    fn params(order: &str, payment_method: &str, capture_method: &str) -> Vec<(String, String)> {
        [
            ("amount", "100"),
            ("currency", "usd"),
            ("payment_method", payment_method),
            ("capture_method", capture_method),
            ("confirm", "true"),
            ("metadata[order_id]", order),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Creates an intent for `order`: `held` waits for its capture, else it
    /// is captured at once. Returns its id.
    async fn create(e: &SimEngine, order: &str, held: bool) -> String {
        let method = if held { "manual" } else { "automatic" };
        let pi = e
            .create(&params(order, "pm_card_visa", method), None)
            .await
            .answer
            .unwrap();
        pi.id
    }

    /// Creates a declined intent for `order` (`requires_payment_method`).
    async fn create_declined(e: &SimEngine, order: &str) -> String {
        let p = params(order, "pm_card_chargeDeclined", "manual");
        let Err(Failure::Api { status, error, .. }) = e.create(&p, None).await.answer else {
            panic!("a declined card is declined");
        };
        assert_eq!(status, 402);
        error.payment_intent.unwrap().id
    }

    async fn capture(e: &SimEngine, id: &str) -> Answer {
        e.capture(id, &[], None).await.answer
    }

    fn api_status(answer: &Answer) -> Option<(u16, String)> {
        match answer {
            Err(Failure::Api { status, error, .. }) => {
                Some((*status, error.code.clone().unwrap_or_default()))
            }
            _ => None,
        }
    }

    fn kept(e: &SimEngine, ids: &[&String]) -> Vec<bool> {
        ids.iter().map(|id| e.retrieve(id).is_some()).collect()
    }

    /// The count bound forgets settled intents in creation order (even one
    /// settled after younger ones) and never one awaiting capture.
    #[tokio::test]
    async fn count_bound_evicts_settled_oldest_first() {
        let (e, _) = engine_at(|o| o.max_intents = 4);
        let held = create(&e, "a", true).await;
        let succeeded = create(&e, "b", false).await;
        let declined = create_declined(&e, "c").await;
        let captured_late = create(&e, "d", true).await;
        let fifth = create(&e, "e", false).await;
        assert_eq!(
            kept(&e, &[&held, &succeeded, &declined, &captured_late, &fifth]),
            [true, false, true, true, true],
            "the oldest settled intent made room, not the older uncaptured one"
        );
        capture(&e, &captured_late).await.unwrap();
        let sixth = create(&e, "f", false).await;
        assert!(e.retrieve(&declined).is_none(), "declined ones are settled");
        let seventh = create(&e, "g", false).await;
        assert_eq!(
            kept(&e, &[&held, &captured_late, &fifth, &sixth, &seventh]),
            [true, false, true, true, true],
            "captured last, but created before the fifth: forgotten first"
        );
        let held_view = e.retrieve(&held).unwrap();
        assert_eq!(held_view.status, "requires_capture");
        assert_eq!(e.sizes().intents, 4);
        let s = e.ledger().summary;
        assert_eq!((s.intents, s.intents_kept, s.intents_evicted), (7, 4, 3));
        assert_eq!(s.captures, 5, "captures stay totals after eviction");
    }

    /// A create finding `max_intents` uncaptured authorizations answers a
    /// retryable 429 `rate_limit` naming the limit, creates nothing and
    /// stores nothing under its key; a capture makes room again.
    #[tokio::test]
    async fn full_of_uncaptured_answers_429() {
        let (e, _) = engine_at(|o| o.max_intents = 2);
        let first = create(&e, "a", true).await;
        create(&e, "b", true).await;
        let p = params("c", "pm_card_visa", "manual");
        let refused = e.create(&p, Some("c:authorize")).await;
        let Err(Failure::Api {
            status,
            error,
            should_retry,
        }) = &refused.answer
        else {
            panic!("a full simulator refuses");
        };
        assert_eq!(*status, 429);
        assert_eq!(error.kind, "rate_limit_error");
        assert_eq!(error.code.as_deref(), Some("rate_limit"));
        let message = error.message.as_deref().unwrap();
        assert!(
            message.contains("at most 2 payment intents (max_intents)"),
            "{message}"
        );
        assert_eq!(*should_retry, Some(true));
        let ledger = e.ledger();
        assert_eq!(ledger.calls.last().unwrap().result, "error:rate_limit");
        let s = ledger.summary;
        assert_eq!((s.intents, s.intents_kept, s.rate_limited), (2, 2, 1));
        assert!(
            e.search(&crate::gateway::stripe::order_query("c"))
                .await
                .unwrap()
                .is_empty()
        );
        capture(&e, &first).await.unwrap();
        let retried = e.create(&p, Some("c:authorize")).await;
        assert!(!retried.replayed, "the 429 was not stored under the key");
        assert_eq!(retried.answer.unwrap().status, "requires_capture");
        assert!(e.retrieve(&first).is_none(), "the captured one made room");
    }

    /// An authorization not captured within `authorization_ttl_ms` becomes
    /// `canceled` (`automatic`), cannot be captured, frees room, and is then
    /// forgotten after the retention.
    #[tokio::test]
    async fn authorization_expires_as_automatic_cancel() {
        let (e, now) = engine_at(|o| {
            o.max_intents = 1;
            o.authorization_ttl_ms = 7_000;
            o.intent_retention_ms = 60_000;
        });
        let id = create(&e, "a", true).await;
        advance(&now, 6_999);
        assert_eq!(e.retrieve(&id).unwrap().status, "requires_capture");
        let p = params("b", "pm_card_visa", "manual");
        assert_eq!(
            api_status(&e.create(&p, None).await.answer),
            Some((429, "rate_limit".into()))
        );
        advance(&now, 1);
        let expired = e.retrieve(&id).unwrap();
        assert_eq!(expired.status, "canceled");
        assert_eq!(expired.cancellation_reason.as_deref(), Some("automatic"));
        assert_eq!(expired.amount_capturable, 0);
        assert_eq!(
            api_status(&capture(&e, &id).await),
            Some((400, "payment_intent_unexpected_state".into()))
        );
        assert_eq!(e.ledger().summary.authorizations_expired, 1);
        let next = e.create(&p, None).await.answer.unwrap();
        assert_eq!(next.status, "requires_capture", "the expired one made room");
        assert!(e.retrieve(&id).is_none());
        advance(&now, 7_000);
        assert_eq!(e.retrieve(&next.id).unwrap().status, "canceled");
        advance(&now, 59_999);
        assert_eq!(e.sizes().intents, 1, "retained from its expiry on");
        advance(&now, 1);
        assert_eq!(e.sizes().intents, 0);
    }

    /// A settled intent is forgotten `intent_retention_ms` after it settled;
    /// an uncaptured one is not; a key that outlives its intent still
    /// replays the first answer, while the id itself answers 404.
    #[tokio::test]
    async fn retention_forgets_settled_intents() {
        let (e, now) = engine_at(|o| o.intent_retention_ms = 1_000);
        let held = create(&e, "a", true).await;
        let p = params("b", "pm_card_visa", "automatic");
        let first = e.create(&p, Some("b:authorize")).await.answer.unwrap();
        advance(&now, 999);
        assert_eq!(kept(&e, &[&held, &first.id]), [true, true]);
        advance(&now, 1);
        assert_eq!(kept(&e, &[&held, &first.id]), [true, false]);
        assert_eq!(e.ledger().summary.intents_expired, 1);
        let again = e.create(&p, Some("b:authorize")).await;
        assert!(again.replayed);
        assert_eq!(again.answer.unwrap(), first);
        assert_eq!(
            api_status(&capture(&e, &first.id).await),
            Some((404, "resource_missing".into()))
        );
        capture(&e, &held).await.unwrap();
        advance(&now, 999);
        assert!(
            e.retrieve(&held).is_some(),
            "retention counts from settling"
        );
        advance(&now, 1);
        assert!(e.retrieve(&held).is_none());
    }

    /// Keys are forgotten oldest first past `max_keys` and after
    /// `key_ttl_ms`; a forgotten key is new again, even with other
    /// parameters.
    #[tokio::test]
    async fn keys_are_bounded_in_count_and_time() {
        let (e, now) = engine_at(|o| {
            o.max_keys = 2;
            o.key_ttl_ms = 1_000;
        });
        let p = |order: &str| params(order, "pm_card_visa", "automatic");
        let k1 = e.create(&p("a"), Some("k1")).await.answer.unwrap();
        advance(&now, 500);
        e.create(&p("b"), Some("k2")).await.answer.unwrap();
        assert!(e.create(&p("a"), Some("k1")).await.replayed);
        e.create(&p("c"), Some("k3")).await.answer.unwrap();
        assert_eq!(e.sizes().keys, 2);
        let reused = e.create(&p("a"), Some("k1")).await;
        assert!(!reused.replayed, "k1 was the oldest key: forgotten");
        assert_ne!(reused.answer.unwrap().id, k1.id);
        let s = e.ledger().summary;
        assert_eq!((s.keys_kept, s.keys_evicted), (2, 2), "k1, then k2");
        let conflict = e.create(&p("z"), Some("k3")).await.answer;
        assert!(matches!(conflict, Err(Failure::Api { status: 400, .. })));
        advance(&now, 999);
        assert!(e.create(&p("c"), Some("k3")).await.replayed);
        advance(&now, 1);
        let after = e.create(&p("z"), Some("k3")).await;
        assert!(!after.replayed, "k3 expired: other parameters execute");
        assert_eq!(after.answer.unwrap().metadata["order_id"], "z");
        assert_eq!(
            e.ledger().summary.keys_expired,
            2,
            "k3 and k1 (stored at once)"
        );
    }

    /// The call ledger keeps the last `max_calls` calls; the counters stay
    /// totals.
    #[tokio::test]
    async fn call_ledger_is_a_ring() {
        let (e, _) = engine_at(|o| o.max_calls = 3);
        for order in ["a", "b", "c", "d", "e"] {
            e.search(&crate::gateway::stripe::order_query(order))
                .await
                .unwrap();
        }
        let ledger = e.ledger();
        let seqs: Vec<u64> = ledger.calls.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(ledger.calls[0].order_id.as_deref(), Some("c"));
        assert_eq!((ledger.summary.calls, ledger.summary.calls_kept), (5, 3));
        assert_eq!(e.sizes().calls, 3);
    }

    /// `by_order` follows the intents: search finds no forgotten intent,
    /// and an order whose intents are all forgotten leaves no entry.
    #[tokio::test]
    async fn by_order_stays_consistent() {
        let (e, now) = engine_at(|o| {
            o.max_intents = 2;
            o.intent_retention_ms = 1_000;
        });
        let search = |order: &'static str| {
            let e = &e;
            async move {
                let found = e.search(&crate::gateway::stripe::order_query(order)).await;
                found
                    .unwrap()
                    .into_iter()
                    .map(|pi| pi.id)
                    .collect::<Vec<_>>()
            }
        };
        let a1 = create(&e, "a", false).await;
        let a2 = create(&e, "a", false).await;
        assert_eq!(search("a").await, [a1, a2.clone()]);
        let b1 = create(&e, "b", false).await;
        assert_eq!(search("a").await, [a2], "a1 was evicted");
        assert_eq!(search("b").await, [b1]);
        {
            let st = e.lock();
            for ids in st.by_order.values() {
                assert!(!ids.is_empty());
                assert!(ids.iter().all(|id| st.intents.contains_key(id)));
            }
        }
        advance(&now, 1_000);
        assert!(search("a").await.is_empty());
        assert!(search("b").await.is_empty());
        assert!(e.lock().by_order.is_empty(), "no empty entries left");
    }

    /// The expiry queues' stale entries (intents captured early, or evicted
    /// by count) are compacted, so the queues stay bounded by what is kept.
    #[tokio::test]
    async fn expiry_queues_stay_bounded() {
        let (e, _) = engine_at(|o| o.max_intents = 10);
        for i in 0..3 * COMPACT_SLACK {
            let id = create(&e, &format!("o{i}"), true).await;
            capture(&e, &id).await.unwrap();
        }
        let st = e.lock();
        assert_eq!((st.intents.len(), st.held), (10, 0));
        // At most: twice the one held at a time, plus the slack.
        assert!(
            st.authorizations.len() <= 2 + COMPACT_SLACK,
            "{}",
            st.authorizations.len()
        );
        assert!(
            st.settled_at.len() <= 2 * st.settled.len() + COMPACT_SLACK + 1,
            "{}",
            st.settled_at.len()
        );
        assert_eq!(st.totals.intents_evicted, 3 * COMPACT_SLACK as u64 - 10);
    }

    /// The `gateway.sim_*` keys reach the in-process engine, and 0 is refused
    /// with a message naming the key and its range.
    #[test]
    fn config_bounds() {
        let c = crate::config::Config::from_toml(
            "[gateway]\nsim_max_intents = 5\nsim_max_keys = 6\nsim_max_calls = 7\nsim_intent_retention_ms = 8\nsim_authorization_ttl_ms = 9\nsim_key_ttl_ms = 10\n",
        )
        .unwrap();
        c.validate().unwrap();
        let sim = Simulator::new(&c.gateway);
        let o = sim.engine().options();
        assert_eq!((o.max_intents, o.max_keys, o.max_calls), (5, 6, 7));
        assert_eq!(
            (o.intent_retention_ms, o.authorization_ttl_ms, o.key_ttl_ms),
            (8, 9, 10)
        );
        let d = GatewayConfig::default();
        assert_eq!(
            (d.sim_max_intents, d.sim_max_keys, d.sim_max_calls),
            (100_000, 200_000, 100_000)
        );
        assert_eq!(
            (
                d.sim_intent_retention_ms,
                d.sim_authorization_ttl_ms,
                d.sim_key_ttl_ms
            ),
            (86_400_000, 604_800_000, 86_400_000)
        );
        let mut c = crate::config::Config::default();
        c.gateway.sim_max_intents = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("`gateway.sim_max_intents` = 0 is out of range [1, 100000000]"),
            "{e}"
        );
        let mut c = crate::config::Config::default();
        c.gateway.sim_authorization_ttl_ms = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`gateway.sim_authorization_ttl_ms` = 0"), "{e}");
        let e = crate::config::Config::from_toml("[gateway]\nsim_max_intent = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sim_max_intent"),
            "unknown keys stay refused: {e}"
        );
    }

    /// Search queries parse with either quote and escapes.
    #[test]
    fn order_queries() {
        assert_eq!(
            parse_order_query("metadata['order_id']:'ord-1'").as_deref(),
            Some("ord-1")
        );
        assert_eq!(
            parse_order_query("metadata[\"order_id\"]:\"a\\'b\"").as_deref(),
            Some("a'b")
        );
        assert_eq!(parse_order_query("status:'x'"), None);
        assert_eq!(parse_order_query("metadata['order_id']:'a' AND x"), None);
    }
}
