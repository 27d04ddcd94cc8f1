//! The pipeline: the log and state-store traits with their backends, the
//! partition runner that drives the pure processor, checkpoints, the effect
//! executor and intake.

pub mod effects;
pub mod intake;
pub mod inventory;
pub mod log;
pub mod runner;
pub mod store;
