//! A circuit breaker around a payment gateway (a [`PaymentGateway`]
//! decorator), so a gateway that is down is not hammered by every order's
//! retries.
//!
//! - **Closed**: every call goes through; the outcomes of the last
//!   `breaker_window` calls are kept. Once the window holds at least
//!   `breaker_min_calls` calls and at least `breaker_failure_ratio` of them
//!   failed, it opens.
//! - **Open**: calls are rejected at once with
//!   `GatewayError::Unavailable("circuit open")`, without calling the gateway.
//! - **Half-open**, `breaker_cooldown_ms` after opening: at most
//!   `breaker_half_open_probes` calls at a time go through as probes. The
//!   first probe that succeeds closes the breaker (with an empty window);
//!   a probe that fails opens it again for another cool-down.
//!
//! A failure is a retryable error (`Unavailable`: network, timeout, 429,
//! 5xx) or a call abandoned before it answered; a decline or a refusal
//! is a gateway that answered, so a success here. The state is exported as
//! `orderflow_gateway_breaker_state{gateway}` (0 closed, 1 half-open,
//! 2 open) and `orderflow_gateway_breaker_transitions_total{gateway,to}`,
//! and shown in `/readyz`.
//!
//! The breaker also sees whether the gateway accepts orderflow's
//! credentials, since every call passes through it: a 401 or 403
//! ([`GatewayError::AuthFailed`]) raises [`Breaker::auth_failed`], which
//! makes `/readyz` answer 503 `gateway_auth_failed`, and the next answer
//! that proves the key accepted (a success, a decline, any other refusal)
//! lowers it. An auth failure is an answer, not an outage: it does not
//! count towards opening the circuit, so authorizations end at once with
//! their own reason instead of waiting out an open circuit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{AuthorizeOutcome, AuthorizeRequest, GatewayError, PaymentGateway};
use crate::config::GatewayConfig;
use crate::telemetry::metrics::Metrics;

/// The message of a call rejected while the breaker is open.
pub const CIRCUIT_OPEN: &str = "circuit open";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// The gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    pub window: usize,
    pub failure_ratio: f64,
    pub min_calls: usize,
    pub cooldown: Duration,
    pub half_open_probes: u32,
}

impl From<&GatewayConfig> for BreakerConfig {
    fn from(c: &GatewayConfig) -> Self {
        BreakerConfig {
            window: c.breaker_window as usize,
            failure_ratio: c.breaker_failure_ratio,
            min_calls: c.breaker_min_calls as usize,
            cooldown: Duration::from_millis(c.breaker_cooldown_ms),
            half_open_probes: c.breaker_half_open_probes,
        }
    }
}

struct Inner {
    state: BreakerState,
    /// Last outcomes while closed; `true` = failure.
    window: VecDeque<bool>,
    failures: usize,
    opened_at: Instant,
    probes_in_flight: u32,
    /// Bumped on every transition: outcomes of calls admitted under an
    /// earlier state are ignored.
    generation: u64,
}

pub struct Breaker {
    name: String,
    inner: Arc<dyn PaymentGateway>,
    config: BreakerConfig,
    st: Mutex<Inner>,
    metrics: Option<Arc<Metrics>>,
    /// Whether the last answer that said anything about orderflow's
    /// credentials refused them.
    auth_failed: AtomicBool,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("gateway", &self.name)
            .field("state", &self.state())
            .finish()
    }
}

/// An admitted call; recording its outcome is the caller's job, and a call
/// dropped before that counts as a failure.
struct Admission<'a> {
    breaker: &'a Breaker,
    generation: u64,
    probe: bool,
    done: bool,
}

impl Admission<'_> {
    fn finish(mut self, failed: bool) {
        self.done = true;
        self.breaker.record(self.generation, self.probe, failed);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self.generation, self.probe, true);
        }
    }
}

impl Breaker {
    /// Wraps `inner`; `name` labels the metrics (`simulator`, `stripe`).
    pub fn new(
        name: &str,
        inner: Arc<dyn PaymentGateway>,
        config: BreakerConfig,
        metrics: Option<Arc<Metrics>>,
    ) -> Breaker {
        let b = Breaker {
            name: name.to_owned(),
            inner,
            config,
            st: Mutex::new(Inner {
                state: BreakerState::Closed,
                window: VecDeque::new(),
                failures: 0,
                opened_at: Instant::now(),
                probes_in_flight: 0,
                generation: 0,
            }),
            metrics,
            auth_failed: AtomicBool::new(false),
        };
        if let Some(m) = &b.metrics {
            m.gateway_breaker_state
                .with_label_values(&[&b.name])
                .set(BreakerState::Closed.gauge());
        }
        b
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current state; an open breaker whose cool-down is over reports
    /// (and becomes) half-open.
    pub fn state(&self) -> BreakerState {
        let mut st = self.lock();
        self.cooled_down(&mut st);
        st.state
    }

    /// Whether the last answer that said anything about orderflow's
    /// credentials refused them (401/403); `/readyz` then answers 503.
    pub fn auth_failed(&self) -> bool {
        self.auth_failed.load(Ordering::SeqCst)
    }

    /// Follows what an answer says about the credentials; logs a change.
    fn note_credentials<T>(&self, result: &Result<T, GatewayError>) {
        let refused = match result {
            Err(GatewayError::AuthFailed(_)) => true,
            // No answer, or the breaker's own: says nothing about the key.
            Err(GatewayError::Unavailable(_)) => return,
            Ok(_) | Err(GatewayError::Refused(_) | GatewayError::Unexpected { .. }) => false,
        };
        if self.auth_failed.swap(refused, Ordering::SeqCst) == refused {
            return;
        }
        if refused {
            tracing::error!(gateway = %self.name, reason = crate::gateway::REASON_GATEWAY_AUTH_FAILED, "the payment gateway refuses orderflow's credentials (HTTP 401/403): authorizations fail and /readyz answers 503 until it accepts them again; check the secret key");
        } else {
            tracing::info!(gateway = %self.name, "the payment gateway accepts orderflow's credentials again");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cooled_down(&self, st: &mut Inner) {
        if st.state == BreakerState::Open && st.opened_at.elapsed() >= self.config.cooldown {
            self.transition(st, BreakerState::HalfOpen);
        }
    }

    fn transition(&self, st: &mut Inner, to: BreakerState) {
        st.state = to;
        st.generation += 1;
        st.probes_in_flight = 0;
        match to {
            BreakerState::Open => {
                st.opened_at = Instant::now();
                tracing::warn!(gateway = %self.name, cooldown_ms = self.config.cooldown.as_millis() as u64, "payment gateway circuit breaker opened");
            }
            BreakerState::HalfOpen => {
                tracing::info!(gateway = %self.name, "payment gateway circuit breaker half-open: probing");
            }
            BreakerState::Closed => {
                st.window.clear();
                st.failures = 0;
                tracing::info!(gateway = %self.name, "payment gateway circuit breaker closed");
            }
        }
        if let Some(m) = &self.metrics {
            m.gateway_breaker_state
                .with_label_values(&[&self.name])
                .set(to.gauge());
            m.gateway_breaker_transitions
                .with_label_values(&[&self.name, to.as_str()])
                .inc();
        }
    }

    fn admit(&self) -> Result<Admission<'_>, GatewayError> {
        let mut st = self.lock();
        self.cooled_down(&mut st);
        let probe = match st.state {
            BreakerState::Closed => false,
            BreakerState::Open => return Err(GatewayError::Unavailable(CIRCUIT_OPEN.into())),
            BreakerState::HalfOpen => {
                if st.probes_in_flight >= self.config.half_open_probes {
                    return Err(GatewayError::Unavailable(CIRCUIT_OPEN.into()));
                }
                st.probes_in_flight += 1;
                true
            }
        };
        Ok(Admission {
            breaker: self,
            generation: st.generation,
            probe,
            done: false,
        })
    }

    fn record(&self, generation: u64, probe: bool, failed: bool) {
        let mut st = self.lock();
        if st.generation != generation {
            return; // admitted under an earlier state
        }
        match st.state {
            BreakerState::Closed => {
                st.window.push_back(failed);
                if failed {
                    st.failures += 1;
                }
                while st.window.len() > self.config.window {
                    if st.window.pop_front() == Some(true) {
                        st.failures -= 1;
                    }
                }
                let n = st.window.len();
                if n >= self.config.min_calls
                    && st.failures as f64 >= self.config.failure_ratio * n as f64
                {
                    self.transition(&mut st, BreakerState::Open);
                }
            }
            BreakerState::HalfOpen if probe => {
                st.probes_in_flight = st.probes_in_flight.saturating_sub(1);
                let to = if failed {
                    BreakerState::Open
                } else {
                    BreakerState::Closed
                };
                self.transition(&mut st, to);
            }
            _ => {}
        }
    }

    async fn guarded<T, F>(&self, call: F) -> Result<T, GatewayError>
    where
        F: std::future::Future<Output = Result<T, GatewayError>>,
    {
        let admission = self.admit()?;
        let result = call.await;
        admission.finish(matches!(result, Err(GatewayError::Unavailable(_))));
        self.note_credentials(&result);
        result
    }
}

#[async_trait]
impl PaymentGateway for Breaker {
    async fn authorize(&self, req: &AuthorizeRequest) -> Result<AuthorizeOutcome, GatewayError> {
        self.guarded(self.inner.authorize(req)).await
    }

    async fn capture(
        &self,
        payment_id: &str,
        amount: u64,
        idempotency_key: &str,
    ) -> Result<(), GatewayError> {
        self.guarded(self.inner.capture(payment_id, amount, idempotency_key))
            .await
    }

    async fn void(
        &self,
        order_id: &str,
        payment_id: &str,
        idempotency_key: &str,
    ) -> Result<(), GatewayError> {
        self.guarded(self.inner.void(order_id, payment_id, idempotency_key))
            .await
    }
}

impl crate::telemetry::GatewayHealth for Breaker {
    fn name(&self) -> &str {
        &self.name
    }

    fn breaker(&self) -> &'static str {
        self.state().as_str()
    }

    fn auth_failed(&self) -> bool {
        Breaker::auth_failed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// A gateway that fails while `down` and counts the calls it receives.
    #[derive(Default)]
    struct Fake {
        down: AtomicBool,
        /// Answers 401 while set.
        refuse_key: AtomicBool,
        calls: AtomicU64,
        /// Each call takes this long (tokio time).
        delay_ms: AtomicU64,
    }

    #[async_trait]
    impl PaymentGateway for Fake {
        async fn authorize(&self, _: &AuthorizeRequest) -> Result<AuthorizeOutcome, GatewayError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let delay = self.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if self.down.load(Ordering::SeqCst) {
                Err(GatewayError::Unavailable("503".into()))
            } else if self.refuse_key.load(Ordering::SeqCst) {
                Err(GatewayError::AuthFailed("authorize: HTTP 401".into()))
            } else {
                Ok(AuthorizeOutcome::Declined {
                    code: "generic_decline".into(),
                })
            }
        }
        async fn capture(&self, _: &str, _: u64, _: &str) -> Result<(), GatewayError> {
            unreachable!()
        }
        async fn void(&self, _: &str, _: &str, _: &str) -> Result<(), GatewayError> {
            unreachable!()
        }
    }

    fn req() -> AuthorizeRequest {
        AuthorizeRequest {
            order_id: "o".into(),
            amount: 1,
            currency: "USD".into(),
            token: "tok_visa".into(),
            idempotency_key: "o:authorize".into(),
        }
    }

    fn setup() -> (Arc<Fake>, Arc<Breaker>, Arc<Metrics>) {
        let fake = Arc::new(Fake::default());
        let metrics = Arc::new(Metrics::new());
        let config = BreakerConfig {
            window: 10,
            failure_ratio: 0.5,
            min_calls: 4,
            cooldown: Duration::from_secs(5),
            half_open_probes: 2,
        };
        let b = Arc::new(Breaker::new(
            "fake",
            fake.clone(),
            config,
            Some(metrics.clone()),
        ));
        (fake, b, metrics)
    }

    fn gauge(m: &Metrics) -> i64 {
        m.gateway_breaker_state.with_label_values(&["fake"]).get()
    }

    /// It stays closed below the minimum number of calls, opens once the
    /// failure ratio is reached, and then rejects without calling.
    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_ratio_and_rejects_without_calling() {
        let (fake, b, m) = setup();
        // Successes (declines count as answers) keep it closed.
        for _ in 0..4 {
            b.authorize(&req()).await.unwrap();
        }
        fake.down.store(true, Ordering::SeqCst);
        // 3 failures of 7 calls: below one half.
        for _ in 0..3 {
            assert!(b.authorize(&req()).await.is_err());
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // The 4th failure makes 4 of 8.
        assert!(b.authorize(&req()).await.is_err());
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(gauge(&m), 2);
        let before = fake.calls.load(Ordering::SeqCst);
        for _ in 0..100 {
            let e = b.authorize(&req()).await.unwrap_err();
            assert_eq!(e, GatewayError::Unavailable(CIRCUIT_OPEN.into()));
        }
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            before,
            "no calls while open"
        );
        assert_eq!(
            m.gateway_breaker_transitions
                .with_label_values(&["fake", "open"])
                .get(),
            1
        );
    }

    /// A breaker with too few calls never opens, however many fail.
    #[tokio::test(start_paused = true)]
    async fn minimum_calls() {
        let (fake, b, _) = setup();
        fake.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(b.authorize(&req()).await.is_err());
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    /// After the cool-down only `half_open_probes` calls go through at
    /// once; a failed probe reopens it, a successful one closes it.
    #[tokio::test(start_paused = true)]
    async fn half_open_probes_then_close() {
        let (fake, b, m) = setup();
        fake.down.store(true, Ordering::SeqCst);
        for _ in 0..4 {
            let _ = b.authorize(&req()).await;
        }
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(gauge(&m), 1);

        // A failing probe reopens it for another cool-down.
        let calls = fake.calls.load(Ordering::SeqCst);
        assert!(b.authorize(&req()).await.is_err());
        assert_eq!(fake.calls.load(Ordering::SeqCst), calls + 1);
        assert_eq!(b.state(), BreakerState::Open);

        // Half-open again, with slow calls: two probes in flight, the third is rejected.
        tokio::time::advance(Duration::from_secs(5)).await;
        fake.down.store(false, Ordering::SeqCst);
        fake.delay_ms.store(100, Ordering::SeqCst);
        let (b1, b2, b3) = (b.clone(), b.clone(), b.clone());
        let p1 = tokio::spawn(async move { b1.authorize(&req()).await });
        let p2 = tokio::spawn(async move { b2.authorize(&req()).await });
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        let calls = fake.calls.load(Ordering::SeqCst);
        let third = tokio::spawn(async move { b3.authorize(&req()).await })
            .await
            .unwrap();
        assert_eq!(
            third.unwrap_err(),
            GatewayError::Unavailable(CIRCUIT_OPEN.into())
        );
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            calls,
            "the third was not called"
        );
        assert!(p1.await.unwrap().is_ok());
        assert!(p2.await.unwrap().is_ok());
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(gauge(&m), 0);
        assert_eq!(
            m.gateway_breaker_transitions
                .with_label_values(&["fake", "closed"])
                .get(),
            1
        );
        // Closed with an empty window: one failure does not reopen it.
        fake.delay_ms.store(0, Ordering::SeqCst);
        fake.down.store(true, Ordering::SeqCst);
        assert!(b.authorize(&req()).await.is_err());
        assert_eq!(b.state(), BreakerState::Closed);
    }

    /// A probe abandoned before it answered (its future dropped, e.g. by a
    /// deadline) counts as failed and frees its slot.
    #[tokio::test(start_paused = true)]
    async fn abandoned_probe_counts_as_failure() {
        let (fake, b, _) = setup();
        fake.down.store(true, Ordering::SeqCst);
        for _ in 0..4 {
            let _ = b.authorize(&req()).await;
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        fake.delay_ms.store(1_000, Ordering::SeqCst);
        let r = tokio::time::timeout(Duration::from_millis(10), b.authorize(&req())).await;
        assert!(r.is_err(), "timed out");
        assert_eq!(b.state(), BreakerState::Open);
    }

    /// A 401 raises `auth_failed` without counting towards opening the
    /// circuit; an outage leaves it as it is; the next accepted answer
    /// lowers it.
    #[tokio::test(start_paused = true)]
    async fn credentials_refused_is_an_answer_not_an_outage() {
        let (fake, b, _) = setup();
        assert!(!b.auth_failed());
        fake.refuse_key.store(true, Ordering::SeqCst);
        for _ in 0..20 {
            assert!(matches!(
                b.authorize(&req()).await,
                Err(GatewayError::AuthFailed(_))
            ));
        }
        assert!(b.auth_failed());
        assert_eq!(b.state(), BreakerState::Closed, "20 refusals, no failure");
        fake.down.store(true, Ordering::SeqCst);
        assert!(b.authorize(&req()).await.unwrap_err().is_retryable());
        assert!(b.auth_failed(), "an outage says nothing about the key");
        fake.down.store(false, Ordering::SeqCst);
        fake.refuse_key.store(false, Ordering::SeqCst);
        b.authorize(&req()).await.unwrap();
        assert!(!b.auth_failed());
    }
}
