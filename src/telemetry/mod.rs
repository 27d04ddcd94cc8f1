//! What the instance tells about itself: the Prometheus metrics and the
//! health `/readyz` reports. Every layer above records into them; this one
//! uses only `domain`.

pub mod health;
pub mod metrics;
pub mod saga_health;

pub use health::{GatewayHealth, Health};
