//! What a driver call failed with, by kind (the `kind` label of
//! `orderflow_store_errors_total`), and how it becomes a `StoreError`.

use scylla::errors::{
    DbError, DeserializationError, ExecutionError, IntoRowsResultError, MaybeFirstRowError,
    NextPageError, NextRowError, PagerExecutionError, RequestAttemptError, RequestError, RowsError,
    TypeCheckError,
};

use crate::pipeline::store::StoreError;

pub(super) enum Failure {
    /// The driver or the database failed; `kind` labels `store_errors`.
    Unavailable { kind: &'static str, detail: String },
    /// Stored bytes (or values) that cannot be decoded.
    Corrupt(String),
    /// A request refused before it was sent.
    Refused {
        kind: &'static str,
        error: StoreError,
    },
}

impl Failure {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Failure::Unavailable { kind, .. } | Failure::Refused { kind, .. } => kind,
            Failure::Corrupt(_) => "corrupt",
        }
    }

    pub(super) fn into_store_error(self, op: &str) -> StoreError {
        match self {
            Failure::Unavailable { detail, .. } => {
                StoreError::Unavailable(format!("{op}: {detail}"))
            }
            Failure::Corrupt(detail) => StoreError::Corrupt(format!("{op}: {detail}")),
            Failure::Refused { error, .. } => error,
        }
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Corrupt(detail) => Failure::Corrupt(detail),
            error => Failure::Refused {
                kind: "refused",
                error,
            },
        }
    }
}

pub(super) fn attempt_kind(e: &RequestAttemptError) -> &'static str {
    match e {
        RequestAttemptError::DbError(db, _) => match db {
            DbError::ReadTimeout { .. } | DbError::WriteTimeout { .. } => "timeout",
            DbError::Unavailable { .. } => "unavailable",
            DbError::Overloaded => "overloaded",
            DbError::Invalid | DbError::SyntaxError => "invalid",
            _ => "db_error",
        },
        RequestAttemptError::BrokenConnectionError(_)
        | RequestAttemptError::UnableToAllocStreamId => "connection",
        _ => "driver",
    }
}

pub(super) fn execution_kind(e: &ExecutionError) -> &'static str {
    match e {
        ExecutionError::RequestTimeout(_) => "timeout",
        ExecutionError::EmptyPlan | ExecutionError::ConnectionPoolError(_) => "connection",
        ExecutionError::LastAttemptError(e) => attempt_kind(e),
        _ => "driver",
    }
}

/// The kind of a failed page fetch (the same kinds as a single request).
pub(super) fn page_kind(e: &NextPageError) -> &'static str {
    match e {
        NextPageError::RequestFailure(RequestError::RequestTimeout(_)) => "timeout",
        NextPageError::RequestFailure(
            RequestError::EmptyPlan | RequestError::ConnectionPoolError(_),
        ) => "connection",
        NextPageError::RequestFailure(RequestError::LastAttemptError(e)) => attempt_kind(e),
        _ => "driver",
    }
}

pub(super) fn driver(kind: &'static str, e: impl std::fmt::Display) -> Failure {
    Failure::Unavailable {
        kind,
        detail: e.to_string(),
    }
}

impl From<ExecutionError> for Failure {
    fn from(e: ExecutionError) -> Self {
        driver(execution_kind(&e), e)
    }
}

impl From<PagerExecutionError> for Failure {
    fn from(e: PagerExecutionError) -> Self {
        let kind = match &e {
            PagerExecutionError::NextPageError(e) => page_kind(e),
            _ => "driver",
        };
        driver(kind, e)
    }
}

impl From<NextRowError> for Failure {
    fn from(e: NextRowError) -> Self {
        let kind = match &e {
            NextRowError::NextPageError(e) => page_kind(e),
            NextRowError::RowDeserializationError(_) => "decode",
            _ => "driver",
        };
        driver(kind, e)
    }
}

/// Result shapes the server sent that do not match the prepared statements
/// (a schema changed behind the store's back).
macro_rules! decode_failure {
    ($($t:ty),*) => {$(
        impl From<$t> for Failure {
            fn from(e: $t) -> Self {
                driver("decode", e)
            }
        }
    )*};
}
decode_failure!(
    IntoRowsResultError,
    RowsError,
    MaybeFirstRowError,
    TypeCheckError,
    DeserializationError
);
