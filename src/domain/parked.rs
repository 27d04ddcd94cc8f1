//! The park lane's records (`orders-parked`): what a partition processor
//! set aside, and what became of it. A record is parked when it cannot be
//! decoded or processed, or when it depends on one that was (same record
//! key, i.e. SKU, or same order): per-key order is kept while other keys go
//! on. Operators retry or drop parked records (`orderflow parked`), through
//! control messages on `orders`, so the decision is part of the log and
//! replays make it again.

use serde::{Deserialize, Serialize};

use crate::domain::DecodeError;
use crate::domain::message::RecordKind;

/// Wire version of [`ParkEvent`].
pub const PARK_WIRE_VERSION: u8 = 1;

/// A record set aside, exactly as it was read, with why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedRecord {
    /// Its position: `orders` partition and offset.
    pub partition: u32,
    pub offset: u64,
    /// Log time of the record (ms since the epoch).
    pub timestamp_ms: u64,
    pub kind: RecordKind,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub reason: String,
    /// The order it belongs to, when that could be read.
    pub order_id: Option<String>,
}

impl ParkedRecord {
    /// Whether a card number is anywhere in it (a decoder's error message
    /// may quote the bytes it failed on, so the reason counts too).
    pub fn holds_pan(&self) -> bool {
        use crate::domain::pan::contains_pan;
        contains_pan(&self.key)
            || contains_pan(&self.value)
            || contains_pan(self.reason.as_bytes())
            || self
                .order_id
                .as_ref()
                .is_some_and(|id| contains_pan(id.as_bytes()))
    }

    /// The record with the digits of every card number masked, fit to be
    /// written to `orders-parked` and shown to an operator.
    pub fn redacted(mut self) -> ParkedRecord {
        use crate::domain::pan::redact_pans;
        let text = |s: String| match redact_pans(s.as_bytes()) {
            Some(r) => String::from_utf8(r).expect("masking digits keeps UTF-8"),
            None => s,
        };
        if let Some(key) = redact_pans(&self.key) {
            self.key = key;
        }
        if let Some(value) = redact_pans(&self.value) {
            self.value = value;
        }
        self.reason = text(self.reason);
        self.order_id = self.order_id.map(text);
        debug_assert!(!self.holds_pan());
        self
    }
}

/// What happened to a parked record, as the lane records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParkEvent {
    Parked(ParkedRecord),
    /// Taken out of the lane by a retry and processed again (it may have
    /// been parked again, as a new `Parked` event with the same position).
    Retried {
        partition: u32,
        offset: u64,
    },
    /// Taken out of the lane by an operator, never processed.
    Dropped {
        partition: u32,
        offset: u64,
    },
    /// Not set aside: the lane was at its bound (`processor.max_parked_*`),
    /// or the record holds a card number. The record is kept here for an
    /// operator to act on (bytes included, card digits masked); it never
    /// entered the lane.
    Refused(ParkedRecord),
}

#[derive(Serialize, Deserialize)]
struct Wire {
    v: u8,
    event: ParkEvent,
}

impl ParkEvent {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(&Wire {
            v: PARK_WIRE_VERSION,
            event: self.clone(),
        })
        .expect("a park event always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<ParkEvent, DecodeError> {
        let w: Wire =
            rmp_serde::from_slice(bytes).map_err(DecodeError::undecodable("park event"))?;
        DecodeError::check_version("park event", w.v, PARK_WIRE_VERSION)?;
        Ok(w.event)
    }

    /// `(partition, offset)` of the record the event is about.
    pub fn position(&self) -> (u32, u64) {
        match self {
            ParkEvent::Parked(r) | ParkEvent::Refused(r) => (r.partition, r.offset),
            ParkEvent::Retried { partition, offset } | ParkEvent::Dropped { partition, offset } => {
                (*partition, *offset)
            }
        }
    }
}
