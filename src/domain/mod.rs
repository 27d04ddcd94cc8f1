//! The domain model: orders, statuses, log messages and the card-number
//! detector. It imports nothing else of orderflow, so every other layer can
//! depend on it and it on nothing.

pub mod key;
pub mod message;
pub mod order;
pub mod pan;
pub mod parked;
pub mod partition;
pub mod status;

pub use key::OrderKey;
pub use message::{Effect, EffectKind, Envelope, Message, MsgId, PaymentOutcome, RecordKind};
pub use order::{Order, OrderLine, RejectReason, Rejection};
pub use status::{Status, StatusEvent};
