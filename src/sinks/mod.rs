//! Consumers of the `order-status` topic: the tracking read model (with its
//! live SSE fan-out, which also records the status metrics) and
//! notifications (webhooks, email).

pub mod notifications;
pub mod tracking;
