//! Consumers of the `order-status` topic: the tracking read model (with its
//! live SSE fan-out), notifications (webhooks, email) and metrics.

pub mod metrics;
pub mod notifications;
pub mod saga_health;
pub mod tracking;
