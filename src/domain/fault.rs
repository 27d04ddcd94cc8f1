//! Whose fault an error is, which says who acts on it and whether trying
//! again can help. Errors that reach an operator or a caller say it
//! (`fault()`), so a supervisor, a CLI or an HTTP answer can decide
//! without matching on messages.

/// Who must act on an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The request, record or command-line input: fix it; sending the same
    /// again fails the same way.
    Input,
    /// The configuration or the deployment: an operator fixes it and
    /// restarts.
    Operator,
    /// A service orderflow depends on (the log, the state store, the
    /// payment gateway, a notification endpoint) failed: try again later.
    Dependency,
    /// orderflow's own stored data or code (corruption, a bug): retrying
    /// does not help; report it.
    Internal,
}

impl Fault {
    /// Whether the same call may succeed later without anyone acting.
    pub fn is_retryable(self) -> bool {
        self == Fault::Dependency
    }
}
