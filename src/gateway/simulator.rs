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
//! `insufficient_funds` (a 402 `card_error`). `Idempotency-Key` works as
//! Stripe documents: the same key with the same parameters answers the
//! stored first answer (`Idempotent-Replayed: true`); the same key with
//! other parameters is a 400 `idempotency_error`. Results are stored only
//! for requests that executed (not for invalid parameters, injected
//! failures or outages). Latency, failure rate (answered as 500 or 503)
//! and an outage switch are configurable; a ledger records every intent
//! (state, captures, cancels) and, when enabled, every call.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use serde::Serialize;

use super::stripe::{ApiError, Failure, PaymentIntent, Stripe, StripeApi};
use super::{AuthorizeOutcome, AuthorizeRequest, GatewayError, PaymentGateway};
use crate::config::GatewayConfig;

/// What a simulator does besides answering.
#[derive(Clone, Debug, Default)]
pub struct SimOptions {
    /// Added to every call.
    pub latency: Duration,
    /// Probability (0 to 1) that a call fails with 500 or 503.
    pub failure_rate: f64,
    /// Keep a record of every call (gateway-sim's `GET /ledger`); off in
    /// process, where a benchmark makes millions of calls.
    pub record_calls: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    RequiresPaymentMethod,
    RequiresConfirmation,
    RequiresCapture,
    Succeeded,
    Canceled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::RequiresPaymentMethod => "requires_payment_method",
            Status::RequiresConfirmation => "requires_confirmation",
            Status::RequiresCapture => "requires_capture",
            Status::Succeeded => "succeeded",
            Status::Canceled => "canceled",
        }
    }
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
    /// `create`, `capture`, `cancel` or `search`.
    pub op: &'static str,
    pub idempotency_key: Option<String>,
    /// `metadata[order_id]` of the intent concerned (or searched for).
    pub order_id: Option<String>,
    pub payment_intent: Option<String>,
    /// HTTP status of the answer.
    pub status: u16,
    /// `ok`, `replayed`, `declined:<decline_code>`, `unavailable`,
    /// `idempotency_error` or `error:<code>`.
    pub result: String,
    /// The call arrived while the outage switch was on.
    pub down: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LedgerSummary {
    pub calls: u64,
    pub calls_while_down: u64,
    pub intents: u64,
    pub authorized: u64,
    /// Captures that moved money, over all intents.
    pub captures: u64,
    pub max_captures_per_intent: u32,
    pub down: bool,
}

/// Everything the simulator knows: `GET /ledger`.
#[derive(Clone, Debug, Serialize)]
pub struct Ledger {
    pub summary: LedgerSummary,
    pub intents: BTreeMap<String, IntentView>,
    /// Every call, oldest first (empty unless calls are recorded).
    pub calls: Vec<CallRecord>,
}

struct Intent {
    metadata: BTreeMap<String, String>,
    amount: u64,
    currency: String,
    capture_method: &'static str,
    status: Status,
    amount_capturable: u64,
    amount_received: u64,
    cancellation_reason: Option<String>,
    authorized: bool,
    captures: u32,
    cancels: u32,
}

/// A stored first answer. Only the parts that change over an intent's life
/// are kept; the rest comes from the intent itself.
#[derive(Clone)]
enum Stored {
    Intent {
        id: Arc<str>,
        status: Status,
        amount_capturable: u64,
        amount_received: u64,
    },
    Error {
        status: u16,
        error: Box<ApiError>,
    },
}

#[derive(Default)]
struct State {
    intents: BTreeMap<Arc<str>, Intent>,
    by_order: HashMap<String, Vec<Arc<str>>>,
    /// Idempotency key → (fingerprint of the request, first answer).
    keys: HashMap<String, (u64, Stored)>,
    calls: Vec<CallRecord>,
    seq: u64,
    calls_while_down: u64,
    next_id: u64,
}

#[derive(Clone, Copy)]
enum Op<'a> {
    Create,
    Capture(&'a str),
    Cancel(&'a str),
}

impl Op<'_> {
    fn name(&self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Capture(_) => "capture",
            Op::Cancel(_) => "cancel",
        }
    }
}

/// The Stripe PaymentIntents model shared by the in-process simulator and
/// `orderflow gateway-sim`.
pub struct SimEngine {
    options: SimOptions,
    down: AtomicBool,
    /// Tag of this engine in its intent ids, so two engines never mint
    /// the same id.
    tag: u32,
    state: Mutex<State>,
}

type Answer = Result<PaymentIntent, Failure>;

/// An answer, and whether it is the stored first answer of its
/// idempotency key (`Idempotent-Replayed: true`).
pub struct Reply {
    pub answer: Answer,
    pub replayed: bool,
}

impl Reply {
    fn failed(f: Failure) -> Reply {
        Reply {
            answer: Err(f),
            replayed: false,
        }
    }
}

fn api_failure(status: u16, kind: &str, code: Option<&str>, message: String) -> Failure {
    Failure::Api {
        status,
        error: Box::new(ApiError {
            kind: kind.into(),
            code: code.map(Into::into),
            message: Some(message),
            ..ApiError::default()
        }),
        should_retry: Some(matches!(status, 409 | 429 | 500..=599)),
    }
}

fn invalid(code: &str, param: &str, message: String) -> Failure {
    let mut f = api_failure(400, "invalid_request_error", Some(code), message);
    if let Failure::Api { error, .. } = &mut f {
        error.param = Some(param.into());
    }
    f
}

/// `(code, decline_code)` of a declining test payment method.
fn decline_for(payment_method: &str) -> Option<(&'static str, &'static str)> {
    let name = payment_method
        .strip_prefix("pm_card_")
        .or_else(|| payment_method.strip_prefix("tok_"))?;
    match name {
        "chargeDeclined" => Some(("card_declined", "generic_decline")),
        "chargeDeclinedInsufficientFunds" => Some(("card_declined", "insufficient_funds")),
        _ => None,
    }
}

fn fingerprint(op: Op<'_>, params: &[(String, String)]) -> u64 {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    op.name().hash(&mut h);
    if let Op::Capture(id) | Op::Cancel(id) = op {
        id.hash(&mut h);
    }
    sorted.hash(&mut h);
    h.finish()
}

impl SimEngine {
    pub fn new(options: SimOptions) -> SimEngine {
        SimEngine {
            options,
            down: AtomicBool::new(false),
            tag: rand::rng().random(),
            state: Mutex::new(State::default()),
        }
    }

    pub fn options(&self) -> &SimOptions {
        &self.options
    }

    /// Turns the simulated outage on or off: while on, every call answers
    /// 503 at once (and is recorded as received while down).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Outage, latency and injected failures, in that order. `Err` is the
    /// answer to give (already recorded).
    async fn faults(
        &self,
        op: &'static str,
        key: Option<&str>,
        order_id: Option<&str>,
        intent: Option<&str>,
    ) -> Result<(), Failure> {
        if self.is_down() {
            let f = api_failure(
                503,
                "api_error",
                None,
                "the gateway simulator is in a simulated outage".into(),
            );
            self.record(op, key, order_id, intent, 503, "unavailable".into(), true);
            return Err(f);
        }
        if !self.options.latency.is_zero() {
            tokio::time::sleep(self.options.latency).await;
        }
        let rate = self.options.failure_rate;
        if rate > 0.0 && rand::rng().random_bool(rate.min(1.0)) {
            let status = if rand::rng().random_bool(0.5) {
                500
            } else {
                503
            };
            let f = api_failure(
                status,
                "api_error",
                None,
                "simulated gateway failure".into(),
            );
            self.record(
                op,
                key,
                order_id,
                intent,
                status,
                "unavailable".into(),
                false,
            );
            return Err(f);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        op: &'static str,
        key: Option<&str>,
        order_id: Option<&str>,
        intent: Option<&str>,
        status: u16,
        result: String,
        down: bool,
    ) {
        let mut st = self.lock();
        Self::record_locked(
            &mut st,
            self.options.record_calls,
            op,
            key,
            order_id,
            intent,
            status,
            result,
            down,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn record_locked(
        st: &mut State,
        keep: bool,
        op: &'static str,
        key: Option<&str>,
        order_id: Option<&str>,
        intent: Option<&str>,
        status: u16,
        result: String,
        down: bool,
    ) {
        st.seq += 1;
        if down {
            st.calls_while_down += 1;
        }
        if keep {
            let seq = st.seq;
            st.calls.push(CallRecord {
                seq,
                op,
                idempotency_key: key.map(str::to_owned),
                order_id: order_id.map(str::to_owned),
                payment_intent: intent.map(str::to_owned),
                status,
                result,
                down,
            });
        }
    }

    /// `POST /v1/payment_intents`.
    pub async fn create(&self, params: &[(String, String)], key: Option<&str>) -> Reply {
        let order_id = params
            .iter()
            .find(|(k, _)| k == "metadata[order_id]")
            .map(|(_, v)| v.as_str());
        if let Err(f) = self.faults("create", key, order_id, None).await {
            return Reply::failed(f);
        }
        self.execute(Op::Create, params, key, order_id)
    }

    /// `POST /v1/payment_intents/{id}/capture`.
    pub async fn capture(&self, id: &str, params: &[(String, String)], key: Option<&str>) -> Reply {
        let order_id = self.order_of(id);
        if let Err(f) = self
            .faults("capture", key, order_id.as_deref(), Some(id))
            .await
        {
            return Reply::failed(f);
        }
        self.execute(Op::Capture(id), params, key, order_id.as_deref())
    }

    /// `POST /v1/payment_intents/{id}/cancel`.
    pub async fn cancel(&self, id: &str, params: &[(String, String)], key: Option<&str>) -> Reply {
        let order_id = self.order_of(id);
        if let Err(f) = self
            .faults("cancel", key, order_id.as_deref(), Some(id))
            .await
        {
            return Reply::failed(f);
        }
        self.execute(Op::Cancel(id), params, key, order_id.as_deref())
    }

    /// `GET /v1/payment_intents/search`, for `metadata['order_id']:'…'` only.
    pub async fn search(&self, query: &str) -> Result<Vec<PaymentIntent>, Failure> {
        let order_id = parse_order_query(query);
        self.faults("search", None, order_id.as_deref(), None)
            .await?;
        let Some(order_id) = order_id else {
            self.record(
                "search",
                None,
                None,
                None,
                400,
                "error:parameter_invalid".into(),
                false,
            );
            return Err(invalid(
                "parameter_invalid",
                "query",
                "this simulator searches only by `metadata['order_id']:'…'`".into(),
            ));
        };
        let mut st = self.lock();
        let found: Vec<PaymentIntent> = st
            .by_order
            .get(&order_id)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| st.intents.get(id).map(|i| view_intent(id, i)))
                    .collect()
            })
            .unwrap_or_default();
        Self::record_locked(
            &mut st,
            self.options.record_calls,
            "search",
            None,
            Some(&order_id),
            None,
            200,
            "ok".into(),
            false,
        );
        Ok(found)
    }

    /// `GET /v1/payment_intents/{id}`.
    pub fn retrieve(&self, id: &str) -> Option<PaymentIntent> {
        let st = self.lock();
        st.intents.get(id).map(|i| view_intent(id, i))
    }

    fn order_of(&self, id: &str) -> Option<String> {
        self.lock()
            .intents
            .get(id)
            .and_then(|i| i.metadata.get("order_id").cloned())
    }

    fn execute(
        &self,
        op: Op<'_>,
        params: &[(String, String)],
        key: Option<&str>,
        order_id: Option<&str>,
    ) -> Reply {
        let intent_id = match op {
            Op::Capture(id) | Op::Cancel(id) => Some(id),
            Op::Create => None,
        };
        let fp = key.map(|_| fingerprint(op, params));
        let mut st = self.lock();
        let keep = self.options.record_calls;
        if let (Some(key), Some(fp)) = (key, fp)
            && let Some((first_fp, stored)) = st.keys.get(key)
        {
            if *first_fp != fp {
                let f = Failure::Api {
                    status: 400,
                    error: Box::new(ApiError {
                        kind: "idempotency_error".into(),
                        message: Some(format!(
                            "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."
                        )),
                        ..ApiError::default()
                    }),
                    should_retry: Some(false),
                };
                Self::record_locked(
                    &mut st,
                    keep,
                    op.name(),
                    Some(key),
                    order_id,
                    intent_id,
                    400,
                    "idempotency_error".into(),
                    false,
                );
                return Reply {
                    answer: Err(f),
                    replayed: false,
                };
            }
            let answer = replay(&st, stored);
            let (status, pi) = match &answer {
                Ok(pi) => (200, Some(pi.id.clone())),
                Err(Failure::Api { status, .. }) => (*status, intent_id.map(str::to_owned)),
                Err(Failure::Transport(_)) => (500, None),
            };
            let order = order_id.map(str::to_owned).or_else(|| {
                answer
                    .as_ref()
                    .ok()
                    .and_then(|p| p.metadata.get("order_id").cloned())
            });
            Self::record_locked(
                &mut st,
                keep,
                op.name(),
                Some(key),
                order.as_deref(),
                pi.as_deref(),
                status,
                "replayed".into(),
                false,
            );
            return Reply {
                answer,
                replayed: true,
            };
        }
        let (answer, stored) = match op {
            Op::Create => self.do_create(&mut st, params),
            Op::Capture(id) => do_capture(&mut st, id, params),
            Op::Cancel(id) => do_cancel(&mut st, id, params),
        };
        let (status, result, pi) = match &answer {
            Ok(pi) => (200, "ok".to_owned(), Some(pi.id.clone())),
            Err(Failure::Api { status, error, .. }) => {
                let result = match &error.decline_code {
                    Some(d) if error.kind == "card_error" => format!("declined:{d}"),
                    _ => format!("error:{}", error.code.as_deref().unwrap_or(&error.kind)),
                };
                let pi = error
                    .payment_intent
                    .as_ref()
                    .map(|p| p.id.clone())
                    .or(intent_id.map(str::to_owned));
                (*status, result, pi)
            }
            Err(Failure::Transport(_)) => (500, "error".to_owned(), None),
        };
        Self::record_locked(
            &mut st,
            keep,
            op.name(),
            key,
            order_id,
            pi.as_deref(),
            status,
            result,
            false,
        );
        if let (Some(key), Some(fp), Some(stored)) = (key, fp, stored) {
            st.keys.insert(key.to_owned(), (fp, stored));
        }
        Reply {
            answer,
            replayed: false,
        }
    }

    fn do_create(&self, st: &mut State, params: &[(String, String)]) -> (Answer, Option<Stored>) {
        let mut amount = None;
        let mut currency = None;
        let mut payment_method = None;
        let mut capture_method = "automatic";
        let mut confirm = false;
        let mut metadata = BTreeMap::new();
        for (k, v) in params {
            let bad = |what: &str| {
                (
                    Err(invalid(
                        "parameter_invalid",
                        k,
                        format!("Invalid {what}: {k}"),
                    )),
                    None,
                )
            };
            match k.as_str() {
                "amount" => match v.parse::<u64>() {
                    Ok(a) => amount = Some(a),
                    Err(_) => return bad("integer"),
                },
                "currency" => {
                    if v.len() != 3 || !v.chars().all(|c| c.is_ascii_alphabetic()) {
                        return bad("currency");
                    }
                    currency = Some(v.to_ascii_lowercase());
                }
                "payment_method" => payment_method = Some(v.clone()),
                "capture_method" => match v.as_str() {
                    "manual" => capture_method = "manual",
                    "automatic" | "automatic_async" => capture_method = "automatic",
                    _ => return bad("capture_method"),
                },
                "confirm" | "error_on_requires_action" | "off_session" => {
                    let b = match v.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return bad("boolean"),
                    };
                    if k == "confirm" {
                        confirm = b;
                    }
                }
                "description" => {}
                _ => match k
                    .strip_prefix("metadata[")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    Some(name) if !name.is_empty() => {
                        metadata.insert(name.to_owned(), v.clone());
                    }
                    _ => {
                        return (
                            Err(invalid(
                                "parameter_unknown",
                                k,
                                format!("Received unknown parameter: {k}"),
                            )),
                            None,
                        );
                    }
                },
            }
        }
        let Some(amount) = amount else {
            return (
                Err(invalid(
                    "parameter_missing",
                    "amount",
                    "Missing required param: amount.".into(),
                )),
                None,
            );
        };
        let Some(currency) = currency else {
            return (
                Err(invalid(
                    "parameter_missing",
                    "currency",
                    "Missing required param: currency.".into(),
                )),
                None,
            );
        };
        if confirm && payment_method.is_none() {
            return (
                Err(invalid(
                    "parameter_missing",
                    "payment_method",
                    "You must provide a payment_method to confirm this PaymentIntent.".into(),
                )),
                None,
            );
        }
        st.next_id += 1;
        let id: Arc<str> = Arc::from(format!("pi_{:08x}{:016x}", self.tag, st.next_id));
        let order_id = metadata.get("order_id").cloned();
        let mut intent = Intent {
            metadata,
            amount,
            currency,
            capture_method,
            status: Status::RequiresConfirmation,
            amount_capturable: 0,
            amount_received: 0,
            cancellation_reason: None,
            authorized: false,
            captures: 0,
            cancels: 0,
        };
        let mut decline = None;
        match (&payment_method, confirm) {
            (None, _) => intent.status = Status::RequiresPaymentMethod,
            (Some(_), false) => intent.status = Status::RequiresConfirmation,
            (Some(pm), true) => match decline_for(pm) {
                Some(codes) => {
                    intent.status = Status::RequiresPaymentMethod;
                    decline = Some(codes);
                }
                None if capture_method == "manual" => {
                    intent.status = Status::RequiresCapture;
                    intent.amount_capturable = amount;
                    intent.authorized = true;
                }
                None => {
                    intent.status = Status::Succeeded;
                    intent.amount_received = amount;
                    intent.authorized = true;
                    intent.captures = 1;
                }
            },
        }
        let view = view_intent(&id, &intent);
        if let Some(order_id) = order_id {
            st.by_order.entry(order_id).or_default().push(id.clone());
        }
        st.intents.insert(id.clone(), intent);
        match decline {
            Some((code, decline_code)) => {
                let error = Box::new(ApiError {
                    kind: "card_error".into(),
                    code: Some(code.into()),
                    decline_code: Some(decline_code.into()),
                    message: Some(if decline_code == "insufficient_funds" {
                        "Your card has insufficient funds.".into()
                    } else {
                        "Your card was declined.".into()
                    }),
                    param: None,
                    payment_intent: Some(view),
                });
                let stored = Stored::Error {
                    status: 402,
                    error: error.clone(),
                };
                (
                    Err(Failure::Api {
                        status: 402,
                        error,
                        should_retry: Some(false),
                    }),
                    Some(stored),
                )
            }
            None => {
                let stored = snapshot(&id, &view);
                (Ok(view), Some(stored))
            }
        }
    }

    /// A copy of every payment intent, by id.
    pub fn intents(&self) -> BTreeMap<String, IntentView> {
        let st = self.lock();
        st.intents
            .iter()
            .map(|(id, i)| (id.to_string(), ledger_view(i)))
            .collect()
    }

    /// Calls received so far (every kind, failed ones included).
    pub fn calls(&self) -> u64 {
        self.lock().seq
    }

    /// The ledger: summary, every intent, and every call when recorded.
    pub fn ledger(&self) -> Ledger {
        let st = self.lock();
        let intents: BTreeMap<String, IntentView> = st
            .intents
            .iter()
            .map(|(id, i)| (id.to_string(), ledger_view(i)))
            .collect();
        let summary = LedgerSummary {
            calls: st.seq,
            calls_while_down: st.calls_while_down,
            intents: intents.len() as u64,
            authorized: intents.values().filter(|i| i.authorized).count() as u64,
            captures: intents.values().map(|i| u64::from(i.captures)).sum(),
            max_captures_per_intent: intents.values().map(|i| i.captures).max().unwrap_or(0),
            down: self.is_down(),
        };
        Ledger {
            summary,
            intents,
            calls: st.calls.clone(),
        }
    }
}

fn do_capture(st: &mut State, id: &str, params: &[(String, String)]) -> (Answer, Option<Stored>) {
    let mut amount = None;
    for (k, v) in params {
        match k.as_str() {
            "amount_to_capture" => match v.parse::<u64>() {
                Ok(a) => amount = Some(a),
                Err(_) => {
                    return (
                        Err(invalid(
                            "parameter_invalid",
                            k,
                            format!("Invalid integer: {v}"),
                        )),
                        None,
                    );
                }
            },
            _ => {
                return (
                    Err(invalid(
                        "parameter_unknown",
                        k,
                        format!("Received unknown parameter: {k}"),
                    )),
                    None,
                );
            }
        }
    }
    let Some(intent) = st.intents.get_mut(id) else {
        return missing(id);
    };
    if intent.status != Status::RequiresCapture {
        return unexpected_state(id, intent, "captured", "requires_capture");
    }
    let amount = amount.unwrap_or(intent.amount_capturable);
    if amount > intent.amount_capturable {
        let f = invalid(
            "amount_too_large",
            "amount_to_capture",
            format!(
                "The amount to capture ({amount}) is greater than the amount capturable ({}).",
                intent.amount_capturable
            ),
        );
        let stored = stored_error(&f);
        return (Err(f), stored);
    }
    intent.status = Status::Succeeded;
    intent.amount_received = amount;
    intent.amount_capturable = 0;
    intent.captures += 1;
    let key: Arc<str> = st
        .intents
        .get_key_value(id)
        .map(|(k, _)| k.clone())
        .expect("intent exists");
    let view = view_intent(&key, &st.intents[id]);
    let stored = snapshot(&key, &view);
    (Ok(view), Some(stored))
}

fn do_cancel(st: &mut State, id: &str, params: &[(String, String)]) -> (Answer, Option<Stored>) {
    let mut reason = None;
    for (k, v) in params {
        match k.as_str() {
            "cancellation_reason"
                if matches!(
                    v.as_str(),
                    "duplicate" | "fraudulent" | "requested_by_customer" | "abandoned"
                ) =>
            {
                reason = Some(v.clone());
            }
            "cancellation_reason" => {
                return (
                    Err(invalid(
                        "parameter_invalid",
                        k,
                        format!("Invalid cancellation_reason: {v}"),
                    )),
                    None,
                );
            }
            _ => {
                return (
                    Err(invalid(
                        "parameter_unknown",
                        k,
                        format!("Received unknown parameter: {k}"),
                    )),
                    None,
                );
            }
        }
    }
    let Some(intent) = st.intents.get_mut(id) else {
        return missing(id);
    };
    if !matches!(
        intent.status,
        Status::RequiresPaymentMethod | Status::RequiresConfirmation | Status::RequiresCapture
    ) {
        return unexpected_state(
            id,
            intent,
            "canceled",
            "requires_payment_method, requires_capture, requires_confirmation, requires_action, processing",
        );
    }
    intent.status = Status::Canceled;
    intent.amount_capturable = 0;
    intent.cancellation_reason = reason;
    intent.cancels += 1;
    let key: Arc<str> = st
        .intents
        .get_key_value(id)
        .map(|(k, _)| k.clone())
        .expect("intent exists");
    let view = view_intent(&key, &st.intents[id]);
    let stored = snapshot(&key, &view);
    (Ok(view), Some(stored))
}

fn missing(id: &str) -> (Answer, Option<Stored>) {
    let mut f = api_failure(
        404,
        "invalid_request_error",
        Some("resource_missing"),
        format!("No such payment_intent: '{id}'"),
    );
    if let Failure::Api { error, .. } = &mut f {
        error.param = Some("intent".into());
    }
    let stored = stored_error(&f);
    (Err(f), stored)
}

fn unexpected_state(
    id: &str,
    intent: &Intent,
    verb: &str,
    allowed: &str,
) -> (Answer, Option<Stored>) {
    let mut f = api_failure(
        400,
        "invalid_request_error",
        Some("payment_intent_unexpected_state"),
        format!(
            "This PaymentIntent could not be {verb} because it has a status of {}. Only a PaymentIntent with one of the following statuses may be {verb}: {allowed}.",
            intent.status.as_str()
        ),
    );
    if let Failure::Api { error, .. } = &mut f {
        let key: Arc<str> = Arc::from(id);
        error.payment_intent = Some(view_intent(&key, intent));
    }
    let stored = stored_error(&f);
    (Err(f), stored)
}

fn stored_error(f: &Failure) -> Option<Stored> {
    match f {
        Failure::Api { status, error, .. } => Some(Stored::Error {
            status: *status,
            error: error.clone(),
        }),
        Failure::Transport(_) => None,
    }
}

fn snapshot(id: &Arc<str>, view: &PaymentIntent) -> Stored {
    Stored::Intent {
        id: id.clone(),
        status: match view.status.as_str() {
            "requires_payment_method" => Status::RequiresPaymentMethod,
            "requires_confirmation" => Status::RequiresConfirmation,
            "requires_capture" => Status::RequiresCapture,
            "succeeded" => Status::Succeeded,
            _ => Status::Canceled,
        },
        amount_capturable: view.amount_capturable,
        amount_received: view.amount_received,
    }
}

fn replay(st: &State, stored: &Stored) -> Answer {
    match stored {
        Stored::Intent {
            id,
            status,
            amount_capturable,
            amount_received,
        } => {
            let intent = st.intents.get(id).expect("stored intents are kept");
            let mut view = view_intent(id, intent);
            view.status = status.as_str().into();
            view.amount_capturable = *amount_capturable;
            view.amount_received = *amount_received;
            if *status != Status::Canceled {
                view.cancellation_reason = None;
            }
            Ok(view)
        }
        Stored::Error { status, error } => Err(Failure::Api {
            status: *status,
            error: error.clone(),
            should_retry: Some(false),
        }),
    }
}

fn view_intent(id: &str, i: &Intent) -> PaymentIntent {
    PaymentIntent {
        id: id.to_owned(),
        object: "payment_intent".into(),
        amount: i.amount,
        amount_capturable: i.amount_capturable,
        amount_received: i.amount_received,
        currency: i.currency.clone(),
        status: i.status.as_str().into(),
        capture_method: Some(i.capture_method.into()),
        cancellation_reason: i.cancellation_reason.clone(),
        metadata: i.metadata.clone(),
        livemode: false,
    }
}

fn ledger_view(i: &Intent) -> IntentView {
    IntentView {
        order_id: i.metadata.get("order_id").cloned(),
        amount: i.amount,
        currency: i.currency.clone(),
        status: i.status.as_str().into(),
        authorized: i.authorized,
        captures: i.captures,
        cancels: i.cancels,
        amount_received: i.amount_received,
    }
}

/// The order id of a `metadata['order_id']:'…'` query (single or double
/// quotes, `\` escapes).
pub fn parse_order_query(query: &str) -> Option<String> {
    let rest = query
        .trim()
        .strip_prefix("metadata[")?
        .trim_start_matches(['\'', '"'])
        .strip_prefix("order_id")?
        .trim_start_matches(['\'', '"'])
        .strip_prefix("]:")?;
    let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let mut out = String::new();
    let mut chars = rest[1..].chars();
    loop {
        match chars.next()? {
            '\\' => out.push(chars.next()?),
            c if c == quote => break,
            c => out.push(c),
        }
    }
    chars.as_str().trim().is_empty().then_some(out)
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
    /// Latency and failure rate from `config`; calls are not recorded.
    pub fn new(config: &GatewayConfig) -> Simulator {
        Simulator::with_options(SimOptions {
            latency: Duration::from_millis(config.latency_ms),
            failure_rate: config.failure_rate,
            record_calls: false,
        })
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

    /// A copy of every payment intent, by payment id.
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
