//! The payment gateway simulator's bounds: defaults and accepted ranges,
//! shared by `[gateway]` (`gateway.sim_*`) and `orderflow gateway-sim`'s
//! flags, so both accept the same values.

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// In-process default of `SimOptions::max_intents`.
pub const DEFAULT_MAX_INTENTS: usize = 100_000;
/// Default of `SimOptions::intent_retention_ms`.
pub const DEFAULT_INTENT_RETENTION_MS: u64 = DAY_MS;
/// Default of `SimOptions::authorization_ttl_ms`: Stripe's 7 days.
pub const DEFAULT_AUTHORIZATION_TTL_MS: u64 = 7 * DAY_MS;
/// In-process default of `SimOptions::max_keys`.
pub const DEFAULT_MAX_KEYS: usize = 200_000;
/// Default of `SimOptions::key_ttl_ms`: Stripe keeps keys 24 hours.
pub const DEFAULT_KEY_TTL_MS: u64 = DAY_MS;
/// Default of `SimOptions::max_calls`.
pub const DEFAULT_MAX_CALLS: usize = 100_000;
/// Largest count bound accepted: far beyond any test, small enough that a
/// typo cannot ask for the memory of a billion intents.
pub const MAX_COUNT_BOUND: u64 = 100_000_000;
/// Largest time bound accepted, in milliseconds (a year).
pub const MAX_TTL_BOUND_MS: u64 = 365 * DAY_MS;

/// Each bound as `(name, value, lowest, highest)`.
pub fn ranges(
    max_intents: usize,
    intent_retention_ms: u64,
    authorization_ttl_ms: u64,
    max_keys: usize,
    key_ttl_ms: u64,
    max_calls: usize,
) -> [(&'static str, u64, u64, u64); 6] {
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    [
        ("max_intents", count(max_intents), 1, MAX_COUNT_BOUND),
        (
            "intent_retention_ms",
            intent_retention_ms,
            1,
            MAX_TTL_BOUND_MS,
        ),
        (
            "authorization_ttl_ms",
            authorization_ttl_ms,
            1,
            MAX_TTL_BOUND_MS,
        ),
        ("max_keys", count(max_keys), 1, MAX_COUNT_BOUND),
        ("key_ttl_ms", key_ttl_ms, 1, MAX_TTL_BOUND_MS),
        ("max_calls", count(max_calls), 1, MAX_COUNT_BOUND),
    ]
}
