//! Order statuses and the status events written to the `order-status` topic.

use serde::{Deserialize, Serialize};

/// Every status an order can have. The last four are terminal failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

    pub fn as_str(self) -> &'static str {
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
/// Consumers dedupe by `(order_id, seq)`; `seq` starts at 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub order_id: String,
    pub seq: u32,
    pub status: Status,
    pub reason: Option<String>,
    /// Milliseconds since the Unix epoch, taken from the log record that
    /// caused the transition (never from a clock inside the processor).
    pub at_ms: u64,
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
}
