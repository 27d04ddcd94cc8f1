//! The partition processor: a pure, deterministic state machine.
//!
//! `Processor::apply` takes one log record and changes the partition's
//! state, collecting what to emit (saga messages for other partitions, status
//! events) and which effects to start. It reads no clock (time is the
//! record's log timestamp), draws no random numbers and iterates only ordered
//! maps, so replaying a partition's log gives the same state byte for byte.
//!
//! - `state`      the partition state and its hash
//! - `finished`   the compact, bounded set of recently finished orders
//! - `snapshot`   how the state is written to the store: manifest + blobs
//! - `validation` orders from the log: parse, validate, settle the id
//! - `inventory`  reserve / commit / release on stock counters
//! - `payment`    payment results, capture and void effects
//! - `saga`       multi-SKU orders held across partitions, with compensation
//! - `processor`  dispatch of one record to the stages

pub mod finished;
pub mod inventory;
pub mod payment;
pub mod processor;
pub mod saga;
pub mod snapshot;
pub mod state;
pub mod validation;

#[cfg(test)]
mod tests;

pub use processor::{Outgoing, Output, Processor};
pub use state::PartitionState;
