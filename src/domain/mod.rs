//! The domain model: orders, statuses, log messages and the card-number
//! detector. It imports nothing else of orderflow, so every other layer can
//! depend on it and it on nothing.

pub mod fault;
pub mod key;
pub mod message;
pub mod order;
pub mod pan;
pub mod parked;
pub mod partition;
pub mod status;
pub mod time;

pub use key::OrderKey;
pub use message::{Effect, EffectKind, Envelope, Message, MsgId, PaymentOutcome, RecordKind};
pub use order::{Order, OrderLine, RejectReason, Rejection};
pub use status::{Status, StatusEvent};

/// Why bytes read from a log are not a record this build reads. The
/// writer's fault (or another version's): the same bytes never decode on
/// a retry, so the reader skips or parks them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable {what}: {detail}")]
    Undecodable { what: &'static str, detail: String },
    #[error("unsupported {what} version {found} (this build reads {reads})")]
    Version {
        what: &'static str,
        found: u8,
        reads: u8,
    },
    /// Decoded, but a field is beyond its limits.
    #[error("invalid message: {0}")]
    Invalid(String),
}

impl DecodeError {
    /// Checks the wire version of a decoded `what`.
    pub fn check_version(what: &'static str, found: u8, reads: u8) -> Result<(), DecodeError> {
        if found == reads {
            return Ok(());
        }
        Err(DecodeError::Version { what, found, reads })
    }

    fn undecodable(what: &'static str) -> impl Fn(rmp_serde::decode::Error) -> DecodeError {
        move |e| DecodeError::Undecodable {
            what,
            detail: e.to_string(),
        }
    }
}
