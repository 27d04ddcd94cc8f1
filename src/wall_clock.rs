//! The wall clock, in one place, for what is not a state transition: the
//! embedded log's append times (the processors' only time, carried in the
//! records), ages shown by the metrics, webhook signatures, and the
//! gateway simulator's default clock. The partition processors never read
//! it: their time comes in the log.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_s() -> u64 {
    now_ms() / 1000
}
