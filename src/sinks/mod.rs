//! Consumers of the `order-status` topic: the tracking read model (with its
//! live SSE fan-out) and metrics.

pub mod metrics;
pub mod tracking;
