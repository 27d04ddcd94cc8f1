//! The one trait of a consumer of `order-status` that the supervisor runs
//! per status partition (the tracking read model's owner, notifications).
//! The sinks live above this layer; `crate::app` hands them in.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::log::LogError;
use super::restart::{Outage, SignalOnce};
use super::supervisor::Stop;

/// Why a sink's run ended, outage or not (see [`Outage`]).
pub type SinkFailure = Box<dyn Outage + Send + Sync>;

impl Outage for SinkFailure {
    fn is_outage(&self) -> bool {
        self.as_ref().is_outage()
    }
}

/// A consumer of one `order-status` partition at a time, restarted through
/// outages and panics like a runner.
pub trait StatusSink: Send + Sync {
    /// The `task` label of its logs and metrics.
    fn task(&self) -> &'static str;

    /// Whether readiness waits until it knows where it starts, so that
    /// nothing placed after `/readyz` turned 200 falls before its position.
    fn gates_readiness(&self) -> bool {
        false
    }

    /// Runs `partition` until `stop` says so; `started` (present when it
    /// gates readiness) is sent once it knows where it starts.
    fn run(
        &self,
        partition: u32,
        stop: watch::Receiver<Stop>,
        started: Option<Arc<SignalOnce>>,
    ) -> BoxFuture<'static, Result<(), SinkFailure>>;

    /// Resolves once it has applied the status log as far as the log
    /// reached when called; readiness waits for it after recovery.
    fn caught_up(&self) -> BoxFuture<'static, Result<(), LogError>> {
        Box::pin(async { Ok(()) })
    }
}
