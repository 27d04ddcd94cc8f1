//! The engine: Stripe's PaymentIntents API (create, capture, cancel,
//! search) over the bounded state, with its idempotency keys, injected
//! latency, failures and outages, and the ledger views.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;

use super::super::stripe::{ApiError, Failure, PaymentIntent};
use super::state::*;
use super::*;

#[derive(Clone, Copy)]
pub(super) enum Op<'a> {
    Create,
    Capture(&'a str),
    Cancel(&'a str),
}

impl Op<'_> {
    pub(super) fn name(&self) -> &'static str {
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
    pub(super) options: SimOptions,
    pub(super) down: AtomicBool,
    /// Tag of this engine in its intent ids, so two engines never mint
    /// the same id.
    pub(super) tag: u32,
    pub(super) state: Mutex<State>,
}

pub(super) type Answer = Result<PaymentIntent, Failure>;

/// An answer, and whether it is the stored first answer of its
/// idempotency key (`Idempotent-Replayed: true`).
pub struct Reply {
    pub answer: Answer,
    pub replayed: bool,
}

impl Reply {
    pub(super) fn failed(f: Failure) -> Reply {
        Reply {
            answer: Err(f),
            replayed: false,
        }
    }
}

pub(super) fn api_failure(status: u16, kind: &str, code: Option<&str>, message: String) -> Failure {
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

pub(super) fn invalid(code: &str, param: &str, message: String) -> Failure {
    let mut f = api_failure(400, "invalid_request_error", Some(code), message);
    if let Failure::Api { error, .. } = &mut f {
        error.param = Some(param.into());
    }
    f
}

/// Stripe's answer to a parameter the call does not take.
pub(super) fn unknown_parameter(param: &str) -> Failure {
    let message = format!("Received unknown parameter: {param}");
    invalid("parameter_unknown", param, message)
}

/// `(code, decline_code)` of a declining test payment method.
pub(super) fn decline_for(payment_method: &str) -> Option<(&'static str, &'static str)> {
    let name = payment_method
        .strip_prefix("pm_card_")
        .or_else(|| payment_method.strip_prefix("tok_"))?;
    match name {
        "chargeDeclined" => Some(("card_declined", "generic_decline")),
        "chargeDeclinedInsufficientFunds" => Some(("card_declined", "insufficient_funds")),
        _ => None,
    }
}

pub(super) fn fingerprint(op: Op<'_>, params: &[(String, String)]) -> u64 {
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
    /// An engine with `options`; a count bound of 0 (refused by the
    /// configuration and the flags) is taken as 1, the least that can work.
    pub fn new(mut options: SimOptions) -> SimEngine {
        options.max_intents = options.max_intents.max(1);
        options.max_keys = options.max_keys.max(1);
        options.max_calls = options.max_calls.max(1);
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

    /// The state, with time moved to now and what is then due forgotten,
    /// so every call (and every look at the ledger) sees the bounds applied.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.advance(self.options.clock.now_ms(), &self.options);
        st
    }

    /// Where the calls are kept, if they are: the ledger ring's size.
    pub(super) fn kept_calls(&self) -> Option<usize> {
        self.options.record_calls.then_some(self.options.max_calls)
    }

    /// How much the engine keeps now.
    pub fn sizes(&self) -> SimSizes {
        self.lock().sizes()
    }

    /// Outage, latency and injected failures, in that order. `Err` is the
    /// answer to give (already recorded).
    pub(super) async fn faults(
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
    pub(super) fn record(
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
            self.kept_calls(),
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
    pub(super) fn record_locked(
        st: &mut State,
        kept_calls: Option<usize>,
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
        if let Some(max_calls) = kept_calls {
            let record = CallRecord {
                seq: st.seq,
                op,
                idempotency_key: key.map(str::to_owned),
                order_id: order_id.map(str::to_owned),
                payment_intent: intent.map(str::to_owned),
                status,
                result,
                down,
            };
            st.push_call(record, max_calls);
        }
    }

    /// Records a call that gateway-sim refused for its credentials (401 or
    /// 403) before it reached the engine; `op` as in [`CallRecord`].
    pub fn record_auth_refusal(&self, op: &'static str, key: Option<&str>, status: u16) {
        self.record(op, key, None, None, status, "auth_refused".into(), false);
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
            self.kept_calls(),
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

    pub(super) fn order_of(&self, id: &str) -> Option<String> {
        self.lock()
            .intents
            .get(id)
            .and_then(|i| i.fixed.metadata.get("order_id").cloned())
    }

    pub(super) fn execute(
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
        let keep = self.kept_calls();
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
            let answer = replay(stored);
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
            st.store_key(key, fp, stored, self.options.max_keys);
        }
        Reply {
            answer,
            replayed: false,
        }
    }

    pub(super) fn do_create(
        &self,
        st: &mut State,
        params: &[(String, String)],
    ) -> (Answer, Option<Stored>) {
        let mut create = match CreateParams::parse(params) {
            Ok(create) => create,
            Err(e) => return (Err(e), None),
        };
        if !st.make_room(self.options.max_intents) {
            st.totals.rate_limited += 1;
            return (Err(self.full()), None);
        }
        st.next_id += 1;
        let id: Arc<str> = Arc::from(format!("pi_{:08x}{:016x}", self.tag, st.next_id));
        let quirk = create.payment_method.as_deref().and_then(Quirk::of);
        let currency = match quirk {
            Some(Quirk::CurrencyMismatch) if create.currency == "eur" => "usd".to_owned(),
            Some(Quirk::CurrencyMismatch) => "eur".to_owned(),
            _ => std::mem::take(&mut create.currency),
        };
        let fixed = Arc::new(Fixed {
            metadata: std::mem::take(&mut create.metadata),
            amount: create.amount,
            currency,
            capture_method: create.capture_method,
            quirk,
        });
        let mut intent = Intent {
            fixed,
            created: st.next_id,
            status: Status::RequiresConfirmation,
            amount_capturable: 0,
            amount_received: 0,
            cancellation_reason: None,
            authorized: false,
            captures: 0,
            cancels: 0,
        };
        let decline = create.confirm_into(&mut intent, quirk);
        let view = view_intent(&id, &intent);
        let stored = snapshot(&id, &intent);
        st.insert(id, intent);
        match decline {
            Some((code, decline_code)) => declined(view, code, decline_code),
            None => (Ok(view), Some(stored)),
        }
    }

    /// The 429 of a create that finds `max_intents` kept, all uncaptured.
    pub(super) fn full(&self) -> Failure {
        api_failure(
            429,
            "rate_limit_error",
            Some("rate_limit"),
            format!(
                "The gateway simulator keeps at most {} payment intents (max_intents) and all of them are uncaptured authorizations (requires_capture): capture or cancel some, or wait for them to expire.",
                self.options.max_intents
            ),
        )
    }

    /// A copy of the payment intents kept, by id.
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

    /// The ledger: summary, the intents kept, and the calls kept when
    /// recorded.
    pub fn ledger(&self) -> Ledger {
        let st = self.lock();
        let intents: BTreeMap<String, IntentView> = st
            .intents
            .iter()
            .map(|(id, i)| (id.to_string(), ledger_view(i)))
            .collect();
        Ledger {
            summary: self.summary(&st),
            intents,
            calls: st.calls.iter().cloned().collect(),
        }
    }

    pub(super) fn summary(&self, st: &State) -> LedgerSummary {
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let sizes = st.sizes();
        let t = &st.totals;
        LedgerSummary {
            calls: st.seq,
            calls_while_down: st.calls_while_down,
            intents: t.intents,
            authorized: t.authorized,
            captures: t.captures,
            max_captures_per_intent: t.max_captures_per_intent,
            down: self.is_down(),
            intents_kept: count(sizes.intents),
            keys_kept: count(sizes.keys),
            calls_kept: count(sizes.calls),
            intents_evicted: t.intents_evicted,
            intents_expired: t.intents_expired,
            authorizations_expired: t.authorizations_expired,
            keys_evicted: t.keys_evicted,
            keys_expired: t.keys_expired,
            rate_limited: t.rate_limited,
        }
    }
}

/// The parameters of a PaymentIntent create, checked as Stripe does.
pub(super) struct CreateParams {
    amount: u64,
    currency: String,
    payment_method: Option<String>,
    capture_method: &'static str,
    confirm: bool,
    metadata: BTreeMap<String, String>,
}

impl CreateParams {
    fn parse(params: &[(String, String)]) -> Result<CreateParams, Failure> {
        let mut amount = None;
        let mut currency = None;
        let mut payment_method = None;
        let mut capture_method = "automatic";
        let mut confirm = false;
        let mut metadata = BTreeMap::new();
        for (k, v) in params {
            let bad = |what: &str| invalid("parameter_invalid", k, format!("Invalid {what}: {k}"));
            match k.as_str() {
                "amount" => amount = Some(v.parse::<u64>().map_err(|_| bad("integer"))?),
                "currency" => {
                    if v.len() != 3 || !v.chars().all(|c| c.is_ascii_alphabetic()) {
                        return Err(bad("currency"));
                    }
                    currency = Some(v.to_ascii_lowercase());
                }
                "payment_method" => payment_method = Some(v.clone()),
                "capture_method" => {
                    capture_method = match v.as_str() {
                        "manual" => "manual",
                        "automatic" | "automatic_async" => "automatic",
                        _ => return Err(bad("capture_method")),
                    }
                }
                "confirm" | "error_on_requires_action" | "off_session" => {
                    let b = match v.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad("boolean")),
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
                    _ => return Err(unknown_parameter(k)),
                },
            }
        }
        let missing = |param: &str| {
            invalid(
                "parameter_missing",
                param,
                format!("Missing required param: {param}."),
            )
        };
        let amount = amount.ok_or_else(|| missing("amount"))?;
        let currency = currency.ok_or_else(|| missing("currency"))?;
        if confirm && payment_method.is_none() {
            return Err(invalid(
                "parameter_missing",
                "payment_method",
                "You must provide a payment_method to confirm this PaymentIntent.".into(),
            ));
        }
        Ok(CreateParams {
            amount,
            currency,
            payment_method,
            capture_method,
            confirm,
            metadata,
        })
    }

    /// Sets the new intent's status as the confirm (or its absence) leaves
    /// it; the decline codes when the payment method declines.
    fn confirm_into(
        &self,
        intent: &mut Intent,
        quirk: Option<Quirk>,
    ) -> Option<(&'static str, &'static str)> {
        let pm = match (&self.payment_method, self.confirm) {
            (None, _) => {
                intent.status = Status::RequiresPaymentMethod;
                return None;
            }
            (Some(_), false) => {
                intent.status = Status::RequiresConfirmation;
                return None;
            }
            (Some(pm), true) => pm,
        };
        if let Some(codes) = decline_for(pm) {
            intent.status = Status::RequiresPaymentMethod;
            return Some(codes);
        }
        if quirk == Some(Quirk::Processing) {
            intent.status = Status::Processing;
        } else if self.capture_method == "manual" {
            intent.status = Status::RequiresCapture;
            intent.amount_capturable = match quirk {
                Some(Quirk::PartialAuthorization) => self.amount / 2,
                _ => self.amount,
            };
            intent.authorized = true;
        } else {
            intent.status = Status::Succeeded;
            intent.amount_received = self.amount;
            intent.authorized = true;
            intent.captures = 1;
        }
        None
    }
}

/// The 402 `card_error` of a declined confirm, stored for its key.
fn declined(view: PaymentIntent, code: &str, decline_code: &str) -> (Answer, Option<Stored>) {
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
    let failure = Failure::Api {
        status: 402,
        error,
        should_retry: Some(false),
    };
    (Err(failure), Some(stored))
}

pub(super) fn do_capture(
    st: &mut State,
    id: &str,
    params: &[(String, String)],
) -> (Answer, Option<Stored>) {
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
            _ => return (Err(unknown_parameter(k)), None),
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
    intent.amount_capturable = 0;
    if intent.fixed.quirk == Some(Quirk::CaptureProcessing) {
        // Nothing received yet: not a capture that moved money.
        intent.status = Status::Processing;
        return executed(st, id, true);
    }
    intent.status = Status::Succeeded;
    intent.amount_received = match intent.fixed.quirk {
        Some(Quirk::CaptureShort) => amount.saturating_sub(1),
        _ => amount,
    };
    intent.captures += 1;
    let captures = intent.captures;
    st.count_capture(captures);
    executed(st, id, true)
}

pub(super) fn do_cancel(
    st: &mut State,
    id: &str,
    params: &[(String, String)],
) -> (Answer, Option<Stored>) {
    let mut reason = None;
    for (k, v) in params {
        match k.as_str() {
            "cancellation_reason" if cancellation_reason(v).is_some() => {
                reason = cancellation_reason(v);
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
            _ => return (Err(unknown_parameter(k)), None),
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
    let released = intent.status == Status::RequiresCapture;
    intent.status = Status::Canceled;
    intent.amount_capturable = 0;
    intent.cancellation_reason = reason;
    intent.cancels += 1;
    executed(st, id, released)
}

/// The reasons a client may give (`automatic` is Stripe's own).
pub(super) fn cancellation_reason(reason: &str) -> Option<&'static str> {
    match reason {
        "duplicate" => Some("duplicate"),
        "fraudulent" => Some("fraudulent"),
        "requested_by_customer" => Some("requested_by_customer"),
        "abandoned" => Some("abandoned"),
        _ => None,
    }
}

/// The answer of a capture or cancel that executed on `id`; `released`
/// when it left `requires_capture`, and so is now settled.
pub(super) fn executed(st: &mut State, id: &str, released: bool) -> (Answer, Option<Stored>) {
    let (key, intent) = st.intents.get_key_value(id).expect("intent exists");
    let (key, created) = (key.clone(), intent.created);
    let view = view_intent(&key, intent);
    let stored = snapshot(&key, intent);
    if released {
        st.release(created, key);
    }
    (Ok(view), Some(stored))
}

pub(super) fn missing(id: &str) -> (Answer, Option<Stored>) {
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

pub(super) fn unexpected_state(
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
        error.payment_intent = Some(view_intent(id, intent));
    }
    let stored = stored_error(&f);
    (Err(f), stored)
}

pub(super) fn stored_error(f: &Failure) -> Option<Stored> {
    match f {
        Failure::Api { status, error, .. } => Some(Stored::Error {
            status: *status,
            error: error.clone(),
        }),
        Failure::Transport(_) => None,
    }
}

pub(super) fn snapshot(id: &Arc<str>, intent: &Intent) -> Stored {
    Stored::Intent {
        id: id.clone(),
        fixed: intent.fixed.clone(),
        status: intent.status,
        amount_capturable: intent.amount_capturable,
        amount_received: intent.amount_received,
        cancellation_reason: intent.cancellation_reason,
    }
}

/// A stored first answer again, whether or not its intent is still kept.
pub(super) fn replay(stored: &Stored) -> Answer {
    match stored {
        Stored::Intent {
            id,
            fixed,
            status,
            amount_capturable,
            amount_received,
            cancellation_reason,
        } => Ok(view(
            id,
            fixed,
            *status,
            *amount_capturable,
            *amount_received,
            *cancellation_reason,
        )),
        Stored::Error { status, error } => Err(Failure::Api {
            status: *status,
            error: error.clone(),
            should_retry: Some(false),
        }),
    }
}

pub(super) fn view_intent(id: &str, i: &Intent) -> PaymentIntent {
    view(
        id,
        &i.fixed,
        i.status,
        i.amount_capturable,
        i.amount_received,
        i.cancellation_reason,
    )
}

pub(super) fn view(
    id: &str,
    f: &Fixed,
    status: Status,
    amount_capturable: u64,
    amount_received: u64,
    cancellation_reason: Option<&str>,
) -> PaymentIntent {
    PaymentIntent {
        id: id.to_owned(),
        object: "payment_intent".into(),
        amount: f.amount,
        amount_capturable,
        amount_received,
        currency: f.currency.clone(),
        status: status.as_str().into(),
        capture_method: Some(f.capture_method.into()),
        cancellation_reason: cancellation_reason.map(Into::into),
        metadata: f.metadata.clone(),
        livemode: false,
    }
}

pub(super) fn ledger_view(i: &Intent) -> IntentView {
    IntentView {
        order_id: i.fixed.metadata.get("order_id").cloned(),
        amount: i.fixed.amount,
        currency: i.fixed.currency.clone(),
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
