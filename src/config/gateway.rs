//! `[gateway]`: which payment gateway, its timeouts, circuit breaker and
//! the in-process simulator's bounds.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Secret, check_ranges, range, sim_bounds};

/// Which payment gateway the effect executor calls (`gateway.kind`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GatewayKind {
    /// The in-process simulator (Stripe test tokens, no network).
    #[default]
    Simulator,
    /// A Stripe-compatible HTTP API at `gateway.url`: Stripe itself,
    /// `stripe-mock`, or `orderflow gateway-sim`.
    Stripe,
}
impl GatewayKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GatewayKind::Simulator => "simulator",
            GatewayKind::Stripe => "stripe",
        }
    }
}
/// Environment variable holding the Stripe secret key (wins over
/// `gateway.secret_key_file`).
pub const STRIPE_SECRET_KEY_ENV: &str = "ORDERFLOW_STRIPE_SECRET_KEY";
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// `simulator` (default) or `stripe`.
    pub kind: GatewayKind,
    /// `stripe` only: base URL of the Stripe-compatible API.
    pub url: String,
    /// `stripe` only: file holding the secret key, read at start when
    /// `ORDERFLOW_STRIPE_SECRET_KEY` is not set. Never logged.
    pub secret_key_file: Option<PathBuf>,
    /// `stripe` only: whole-request timeout of one call.
    pub timeout_ms: u64,
    /// `stripe` only: TCP/TLS connect timeout of one call.
    pub connect_timeout_ms: u64,
    /// An authorization not answered within this time (all attempts and
    /// back-offs included) ends `payment_failed` (`gateway_unavailable`).
    pub payment_deadline_ms: u64,
    /// Circuit breaker: outcomes of the last N calls considered.
    pub breaker_window: u32,
    /// Circuit breaker: opens when this share of the window failed ...
    pub breaker_failure_ratio: f64,
    /// ... and the window holds at least this many calls.
    pub breaker_min_calls: u32,
    /// Circuit breaker: time open before probe calls are let through.
    pub breaker_cooldown_ms: u64,
    /// Circuit breaker: probe calls in flight at once while half-open.
    pub breaker_half_open_probes: u32,
    /// Simulator only: latency of each gateway call.
    pub latency_ms: u64,
    /// Simulator only: probability (0 to 1) that a call fails as unavailable.
    pub failure_rate: f64,
    /// Simulator only: payment intents kept at most. A create finding them
    /// all kept forgets the oldest settled one, or answers 429 when all
    /// are uncaptured authorizations (`gateway::simulator` has the bounds).
    pub sim_max_intents: usize,
    /// Simulator only: a settled intent is forgotten this long after it
    /// settled.
    pub sim_intent_retention_ms: u64,
    /// Simulator only: an authorization not captured this long after it
    /// was made is canceled (`automatic`), as Stripe's expire in 7 days.
    pub sim_authorization_ttl_ms: u64,
    /// Simulator only: idempotency keys kept at most (oldest forgotten).
    pub sim_max_keys: usize,
    /// Simulator only: an idempotency key is forgotten this long after its
    /// first answer (Stripe: 24 h).
    pub sim_key_ttl_ms: u64,
    /// Simulator only: calls kept in its ledger, when it records them.
    pub sim_max_calls: usize,
    /// Effects (gateway calls) in flight at once, over all partitions.
    pub max_inflight: usize,
    /// Captures and voids the effect executor holds at once, in flight or
    /// parked during an outage; at the bound it takes no new effect until
    /// one ends (back-pressure; nothing is dropped).
    pub max_parked_effects: usize,
    /// Attempts per effect before an authorization ends `payment_failed`.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, with jitter.
    pub retry_base_ms: u64,
}
impl Default for GatewayConfig {
    fn default() -> Self {
        use sim_bounds as sim;
        GatewayConfig {
            kind: GatewayKind::Simulator,
            url: "https://api.stripe.com".into(),
            secret_key_file: None,
            timeout_ms: 10_000,
            connect_timeout_ms: 2_000,
            payment_deadline_ms: 30_000,
            breaker_window: 50,
            breaker_failure_ratio: 0.5,
            breaker_min_calls: 20,
            breaker_cooldown_ms: 5_000,
            breaker_half_open_probes: 3,
            latency_ms: 0,
            failure_rate: 0.0,
            sim_max_intents: sim::DEFAULT_MAX_INTENTS,
            sim_intent_retention_ms: sim::DEFAULT_INTENT_RETENTION_MS,
            sim_authorization_ttl_ms: sim::DEFAULT_AUTHORIZATION_TTL_MS,
            sim_max_keys: sim::DEFAULT_MAX_KEYS,
            sim_key_ttl_ms: sim::DEFAULT_KEY_TTL_MS,
            sim_max_calls: sim::DEFAULT_MAX_CALLS,
            max_inflight: 10_000,
            max_parked_effects: 10_000,
            max_attempts: 4,
            retry_base_ms: 20,
        }
    }
}
impl GatewayConfig {
    /// Checks the gateway keys beyond their plain ranges (called by
    /// [`Config::validate`]).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        range("gateway.latency_ms", self.latency_ms, 0, 60_000)?;
        range("gateway.failure_rate", self.failure_rate, 0.0, 1.0)?;
        range("gateway.max_inflight", self.max_inflight, 1, 1 << 20)?;
        range(
            "gateway.max_parked_effects",
            self.max_parked_effects,
            1,
            1 << 20,
        )?;
        range("gateway.max_attempts", self.max_attempts, 1, 100)?;
        range("gateway.retry_base_ms", self.retry_base_ms, 1, 60_000)?;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let ranges: [(&str, u64, u64, u64); 6] = [
            ("gateway.timeout_ms", self.timeout_ms, 1, 600_000),
            (
                "gateway.connect_timeout_ms",
                self.connect_timeout_ms,
                1,
                600_000,
            ),
            (
                "gateway.payment_deadline_ms",
                self.payment_deadline_ms,
                1,
                3_600_000,
            ),
            (
                "gateway.breaker_window",
                self.breaker_window.into(),
                1,
                100_000,
            ),
            (
                "gateway.breaker_cooldown_ms",
                self.breaker_cooldown_ms,
                1,
                3_600_000,
            ),
            (
                "gateway.breaker_half_open_probes",
                self.breaker_half_open_probes.into(),
                1,
                10_000,
            ),
        ];
        check_ranges(&ranges)?;
        if self.breaker_min_calls < 1 || self.breaker_min_calls > self.breaker_window {
            return invalid(format!(
                "`gateway.breaker_min_calls` = {} is out of range [1, {}] (at most `gateway.breaker_window`)",
                self.breaker_min_calls, self.breaker_window
            ));
        }
        let ratio = self.breaker_failure_ratio;
        if !(ratio > 0.0 && ratio <= 1.0) {
            return invalid(format!(
                "`gateway.breaker_failure_ratio` = {ratio} is out of range (0, 1]"
            ));
        }
        // The simulator's bounds share their ranges with gateway-sim's flags.
        let ranges = sim_bounds::ranges(
            self.sim_max_intents,
            self.sim_intent_retention_ms,
            self.sim_authorization_ttl_ms,
            self.sim_max_keys,
            self.sim_key_ttl_ms,
            self.sim_max_calls,
        );
        for (name, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return invalid(format!(
                    "`gateway.sim_{name}` = {v} is out of range [{lo}, {hi}]"
                ));
            }
        }
        if self.kind == GatewayKind::Stripe {
            let url = self.url.trim();
            let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
            let rest = url.split_once("://").map_or("", |(_, r)| r);
            let host = rest.split('/').next().unwrap_or("");
            if !scheme_ok || host.is_empty() {
                return invalid(format!(
                    "`gateway.url` = {url:?} must be an http:// or https:// URL with a host"
                ));
            }
            if host.contains('@') || url.contains('?') || url.contains('#') {
                return invalid(
                    "`gateway.url` must not carry credentials, a query or a fragment (the secret key comes from ORDERFLOW_STRIPE_SECRET_KEY or `gateway.secret_key_file`)".into(),
                );
            }
        }
        Ok(())
    }

    /// The Stripe secret key: `ORDERFLOW_STRIPE_SECRET_KEY`, else the
    /// trimmed content of `secret_key_file`. Errors name where it was
    /// looked for, never its value.
    pub fn stripe_secret_key(&self) -> Result<Secret, ConfigError> {
        Secret::from_env_or_file(
            STRIPE_SECRET_KEY_ENV,
            self.secret_key_file.as_deref(),
            "gateway.secret_key_file",
        )
        .map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Invalid(format!(
                "`gateway.kind` = \"stripe\" needs a secret key: {m}"
            )),
            other => other,
        })
    }
}
