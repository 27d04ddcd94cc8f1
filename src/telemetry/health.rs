//! What `/readyz` reports: the flags the app flips and the payment
//! gateway's health, seen through [`GatewayHealth`] so that this layer
//! knows nothing of gateways.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The payment gateway as readiness sees it (its circuit breaker).
pub trait GatewayHealth: Send + Sync {
    /// `simulator` or `stripe`.
    fn name(&self) -> &str;
    /// `closed`, `half_open` or `open`.
    fn breaker(&self) -> &'static str;
    /// The gateway refuses orderflow's credentials (401/403).
    fn auth_failed(&self) -> bool;
}

/// Liveness flags the app flips: `ready` once partitions are recovered
/// (`/readyz`), `accepting` false once shutdown begins (writes answer 503
/// `shutting_down`, open SSE streams end). `gateway` is the payment
/// gateway's circuit breaker, shown (not judged) by `/readyz`, which judges
/// only whether the gateway refuses orderflow's credentials. `down`
/// names the partition tasks the supervisor gave up on (they kept dying):
/// while any is, the instance is not ready whatever `ready` says.
pub struct Health {
    pub ready: AtomicBool,
    pub accepting: AtomicBool,
    pub gateway: Option<Arc<dyn GatewayHealth>>,
    pub down: std::sync::Mutex<Vec<String>>,
}

impl Health {
    /// Not ready yet, accepting writes.
    pub fn new() -> Health {
        Health {
            ready: AtomicBool::new(false),
            accepting: AtomicBool::new(true),
            gateway: None,
            down: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.down_reasons().is_empty()
    }

    /// A task is dead for good: `/readyz` fails with `reason` from now on.
    pub fn mark_down(&self, reason: String) {
        self.down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(reason);
    }

    /// Why the instance is not ready beyond starting up, if it is not.
    pub fn down_reasons(&self) -> Vec<String> {
        self.down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}
