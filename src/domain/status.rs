//! Order statuses and the status events written to the `order-status` topic.

use serde::{Deserialize, Serialize};

use super::DecodeError;
use super::message::MsgId;

/// Every status an order can have. The last four are terminal failures.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Accepted,
    Reserved,
    Paid,
    Confirmed,
    Rejected,
    OutOfStock,
    PaymentDeclined,
    PaymentFailed,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Accepted,
        Status::Reserved,
        Status::Paid,
        Status::Confirmed,
        Status::Rejected,
        Status::OutOfStock,
        Status::PaymentDeclined,
        Status::PaymentFailed,
    ];

    /// A stored code: the position in `ALL` (new statuses go at its end,
    /// so stored codes keep their meaning).
    pub fn code(self) -> u8 {
        Status::ALL
            .iter()
            .position(|s| *s == self)
            .expect("every status is listed") as u8
    }

    pub fn from_code(code: u8) -> Option<Status> {
        Status::ALL.get(usize::from(code)).copied()
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Reserved => "reserved",
            Status::Paid => "paid",
            Status::Confirmed => "confirmed",
            Status::Rejected => "rejected",
            Status::OutOfStock => "out_of_stock",
            Status::PaymentDeclined => "payment_declined",
            Status::PaymentFailed => "payment_failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Confirmed
                | Status::Rejected
                | Status::OutOfStock
                | Status::PaymentDeclined
                | Status::PaymentFailed
        )
    }

    /// The transitions the processor may make (invariant 3: a valid path).
    /// `None` is the state before the first status.
    pub fn may_follow(prev: Option<Status>, next: Status) -> bool {
        use Status::*;
        matches!(
            (prev, next),
            (None, Accepted)
                | (None, Rejected)
                | (Some(Accepted), Reserved)
                | (Some(Accepted), OutOfStock)
                | (Some(Reserved), Paid)
                | (Some(Reserved), PaymentDeclined)
                | (Some(Reserved), PaymentFailed)
                | (Some(Paid), Confirmed)
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One status transition of one order, as written to `order-status`.
/// Consumers dedupe by `(order_id, seq)`; `seq` starts at 1. Its `Debug`
/// leaves the contact email out (personal data has no place in logs).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub order_id: String,
    pub seq: u32,
    pub status: Status,
    pub reason: Option<String>,
    /// Milliseconds since the Unix epoch, taken from the log record that
    /// caused the transition (never from a clock inside the processor).
    pub at_ms: u64,
    /// `out_of_stock` only: the SKUs whose stock refused a line (each once,
    /// in line order), so metrics can name the SKUs that run out. Added
    /// compatibly: absent on the wire when empty, and readers that predate
    /// it ignore it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_skus: Vec<String>,
    /// Lines whose held stock this transition released (compensation: a
    /// failed saga undoing its reservations); absent on the wire when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub released_lines: u16,
    /// The deterministic id of the transition: (home partition, offset of
    /// the record that caused it, index among that record's statuses). A
    /// replay re-emits the same ids, so a consumer that keeps the highest
    /// id per source partition recognises its duplicates in O(partitions)
    /// memory. Absent on records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<MsgId>,
    /// The order's contact email, on terminal statuses only, for the
    /// notifications sink (nothing else stores it). Never shown by the
    /// read model, SSE, webhooks or logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

impl std::fmt::Debug for StatusEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusEvent")
            .field("order_id", &self.order_id)
            .field("seq", &self.seq)
            .field("status", &self.status)
            .field("reason", &self.reason)
            .field("at_ms", &self.at_ms)
            .field("refused_skus", &self.refused_skus)
            .field("released_lines", &self.released_lines)
            .field("src", &self.src)
            .field("email", &self.email.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

/// Wire version of a status record on `order-status`. A reader refuses any other.
pub const STATUS_WIRE_VERSION: u8 = 1;

#[derive(Serialize)]
struct WireOut<'a> {
    v: u8,
    #[serde(flatten)]
    event: &'a StatusEvent,
}

/// The record as read: the event's fields beside `v`, spelled out rather
/// than `#[serde(flatten)]`, which buffers every field before decoding it
/// (every instance decodes every status record for its read model).
#[derive(Deserialize)]
struct WireIn {
    v: u8,
    order_id: String,
    seq: u32,
    status: Status,
    reason: Option<String>,
    at_ms: u64,
    #[serde(default)]
    refused_skus: Vec<String>,
    #[serde(default)]
    released_lines: u16,
    #[serde(default)]
    src: Option<MsgId>,
    #[serde(default)]
    email: Option<String>,
}

impl StatusEvent {
    /// MessagePack with field names and the wire version `v`.
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(&WireOut {
            v: STATUS_WIRE_VERSION,
            event: self,
        })
        .expect("a status event always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<StatusEvent, DecodeError> {
        let wire: WireIn =
            rmp_serde::from_slice(bytes).map_err(DecodeError::undecodable("status record"))?;
        DecodeError::check_version("status record", wire.v, STATUS_WIRE_VERSION)?;
        Ok(StatusEvent {
            order_id: wire.order_id,
            seq: wire.seq,
            status: wire.status,
            reason: wire.reason,
            at_ms: wire.at_ms,
            refused_skus: wire.refused_skus,
            released_lines: wire.released_lines,
            src: wire.src,
            email: wire.email,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The happy path and each failure are valid; skipping a step is not.
    #[test]
    fn transitions() {
        assert!(Status::may_follow(None, Status::Accepted));
        assert!(Status::may_follow(Some(Status::Paid), Status::Confirmed));
        assert!(!Status::may_follow(
            Some(Status::Accepted),
            Status::Confirmed
        ));
        assert!(!Status::may_follow(
            Some(Status::Confirmed),
            Status::Rejected
        ));
    }

    /// Status records round-trip with their version; another version is refused.
    #[test]
    fn wire_roundtrip_and_version() {
        let e = StatusEvent {
            order_id: "o1".into(),
            seq: 2,
            status: Status::Reserved,
            reason: None,
            at_ms: 7,
            refused_skus: Vec::new(),
            released_lines: 0,
            src: None,
            email: None,
        };
        assert_eq!(StatusEvent::decode(&e.encode()).unwrap(), e);
        let full = StatusEvent {
            src: Some(MsgId {
                src_partition: 3,
                src_offset: 99,
                index: 1,
            }),
            email: Some("ada@example.com".into()),
            ..e.clone()
        };
        assert_eq!(StatusEvent::decode(&full.encode()).unwrap(), full);
        assert!(!format!("{full:?}").contains("ada@"), "no email in Debug");
        let oos = StatusEvent {
            status: Status::OutOfStock,
            refused_skus: vec!["SKU-1".into()],
            released_lines: 2,
            ..e.clone()
        };
        assert_eq!(StatusEvent::decode(&oos.encode()).unwrap(), oos);
        let other = rmp_serde::to_vec_named(&WireOut { v: 9, event: &e }).unwrap();
        assert!(
            StatusEvent::decode(&other)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        assert!(StatusEvent::decode(b"\xc1").is_err());
    }

    /// A record without the optional fields (as written before they
    /// existed) still decodes, and an event without them writes none.
    #[test]
    fn optional_fields_are_compatible() {
        #[derive(Serialize)]
        struct Before<'a> {
            v: u8,
            order_id: &'a str,
            seq: u32,
            status: Status,
            reason: Option<&'a str>,
            at_ms: u64,
        }
        let old = rmp_serde::to_vec_named(&Before {
            v: 1,
            order_id: "o1",
            seq: 1,
            status: Status::Accepted,
            reason: None,
            at_ms: 5,
        })
        .unwrap();
        let e = StatusEvent::decode(&old).unwrap();
        assert!(e.refused_skus.is_empty() && e.released_lines == 0);
        assert!(e.src.is_none() && e.email.is_none());
        assert_eq!(e.encode(), old, "nothing new on the wire when empty");
    }
}
