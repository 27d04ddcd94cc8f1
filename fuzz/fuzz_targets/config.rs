//! The configuration loader: TOML into `Config`, then `validate`. A config
//! that validates must hold every limit the running code relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orderflow::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml(text) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    let g = &config.gateway;
    assert!((0.0..=1.0).contains(&g.failure_rate), "failure_rate {}", g.failure_rate);
    assert!(g.breaker_failure_ratio > 0.0 && g.breaker_failure_ratio <= 1.0);
    assert!(g.breaker_min_calls >= 1 && g.breaker_min_calls <= g.breaker_window);
    assert!(config.log.max_record_bytes as u64 <= config.log.segment_size_bytes);
    assert!(config.log.segment_size_bytes <= config.log.retention_bytes);
});
