//! Errors as `application/problem+json` (RFC 9457): `type`, `title`,
//! `status`, `detail`, plus a stable `code` that clients switch on. The
//! `type` is `urn:orderflow:problem:<code>` (an identifier, not a page).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::auth::{Role, Scope};
use crate::domain::order::RejectReason;
use crate::pipeline::intake::{IntakeError, Shed};

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Declares [`Code`] and its list from one table, so no code can be
/// answered without being listed (the OpenAPI document lists them all).
macro_rules! problem_codes {
    ($($variant:ident = $code:literal,)*) => {
        /// The stable `code` of a problem: a refused order's reason, or one
        /// of the API's own.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Code {
            /// An order broke a rule (also `invalid_order_id`, `invalid_sku`).
            Order(RejectReason),
            $($variant,)*
        }

        impl Code {
            /// Every code but the refused orders' ([`RejectReason::ALL`]).
            pub const API: &[Code] = &[$(Code::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    Code::Order(r) => r.code(),
                    $(Code::$variant => $code,)*
                }
            }
        }
    };
}

problem_codes! {
    AdminDisabled = "admin_disabled",
    ApplyTimeout = "apply_timeout",
    BodyTimeout = "body_timeout",
    Forbidden = "forbidden",
    GatewayAuthFailed = "gateway_auth_failed",
    InvalidBody = "invalid_body",
    InvalidEffectKind = "invalid_effect_kind",
    InvalidIdempotencyKey = "invalid_idempotency_key",
    LogFull = "log_full",
    MethodNotAllowed = "method_not_allowed",
    NoSuchPartition = "no_such_partition",
    NotFound = "not_found",
    NotParked = "not_parked",
    NotReady = "not_ready",
    OrderNotFound = "order_not_found",
    Overloaded = "overloaded",
    PayloadTooLarge = "payload_too_large",
    RateLimited = "rate_limited",
    RecordTooLarge = "record_too_large",
    ShuttingDown = "shutting_down",
    StockRefused = "stock_refused",
    TooManyStreams = "too_many_streams",
    Unauthorized = "unauthorized",
    Unavailable = "unavailable",
    UnreadableBody = "unreadable_body",
}

impl Code {
    /// Every code a problem may carry, each once.
    pub fn all() -> impl Iterator<Item = Code> {
        RejectReason::ALL
            .into_iter()
            .map(Code::Order)
            .chain(Code::API.iter().copied())
    }
}

/// One problem answer. Build it with the constructors below so the code
/// and status of each kind stay the same everywhere.
#[derive(Clone, Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub code: Code,
    pub title: &'static str,
    pub detail: String,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u32>,
    /// Adds `WWW-Authenticate: Bearer` (401).
    pub bearer_challenge: bool,
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
pub(crate) struct ProblemBody<'a> {
    /// `urn:orderflow:problem:<code>`.
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    /// The HTTP status code.
    status: u16,
    /// What happened, for a person; never a body, a token or card data.
    detail: &'a str,
    /// What happened, for a program: switch on this.
    #[schema(schema_with = code_schema)]
    code: &'a str,
}

fn code_schema() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(Code::all().map(Code::as_str)))
        .build()
}

impl Problem {
    pub fn new(
        status: StatusCode,
        code: Code,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Problem {
        Problem {
            status,
            code,
            title,
            detail: detail.into(),
            retry_after: None,
            bearer_challenge: false,
        }
    }

    pub fn retry_after(mut self, seconds: u32) -> Problem {
        self.retry_after = Some(seconds);
        self
    }

    pub fn not_found() -> Problem {
        Problem::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            "Not found",
            "no such resource",
        )
    }

    /// The one answer for an unknown order, a missing token and a wrong
    /// token alike, so a caller learns nothing about which it was.
    pub fn order_not_found() -> Problem {
        Problem::new(
            StatusCode::NOT_FOUND,
            Code::OrderNotFound,
            "Order not found",
            "no order with this id is visible with the given token",
        )
    }

    pub fn method_not_allowed() -> Problem {
        Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::MethodNotAllowed,
            "Method not allowed",
            "this route does not take this method",
        )
    }

    /// A missing or unknown bearer token on a route that `roles` may use.
    pub fn unauthorized(roles: &[Role]) -> Problem {
        let mut p = Problem::new(
            StatusCode::UNAUTHORIZED,
            Code::Unauthorized,
            "Unauthorized",
            format!(
                "this route needs a token of role {} as `Authorization: Bearer <token>`",
                either(roles, |r| r.as_str())
            ),
        );
        p.bearer_challenge = true;
        p
    }

    /// No role that may use the route has a token configured. The code
    /// predates roles, when only the admin token existed.
    pub fn admin_disabled(roles: &[Role]) -> Problem {
        Problem::new(
            StatusCode::FORBIDDEN,
            Code::AdminDisabled,
            "Admin API disabled",
            format!(
                "no token of role {} is configured (set {} to enable this route)",
                either(roles, |r| r.as_str()),
                either(roles, |r| r.env_var())
            ),
        )
    }

    /// A valid token whose role does not hold the route's scope.
    pub fn forbidden(role: Role, scope: Scope) -> Problem {
        Problem::new(
            StatusCode::FORBIDDEN,
            Code::Forbidden,
            "Forbidden",
            format!(
                "a {role} token may not {}; this route needs a token of role {}",
                scope.action(),
                either(scope.roles(), |r| r.as_str())
            ),
        )
    }

    pub fn invalid_order_id() -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            Code::Order(RejectReason::InvalidOrderId),
            "Invalid order id",
            "an order id must match [A-Za-z0-9._:-]{1,64} and hold no card number",
        )
    }

    pub fn payload_too_large(limit: usize) -> Problem {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::PayloadTooLarge,
            "Payload too large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    }

    pub fn unreadable_body() -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            Code::UnreadableBody,
            "Bad request",
            "the request body could not be read",
        )
    }

    pub fn invalid_body(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidBody,
            "Invalid request body",
            detail,
        )
    }

    pub fn invalid_sku() -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            Code::Order(RejectReason::InvalidSku),
            "Invalid SKU",
            "a SKU must match [A-Za-z0-9._-]{1,64}",
        )
    }

    pub fn invalid_idempotency_key() -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidIdempotencyKey,
            "Invalid Idempotency-Key",
            "the Idempotency-Key header must be 1 to 255 printable ASCII characters",
        )
    }

    pub fn shutting_down(retry_after_s: u32) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::ShuttingDown,
            "Shutting down",
            "this instance is shutting down; retry (on another instance)",
        )
        .retry_after(retry_after_s)
    }

    pub fn not_ready() -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::NotReady,
            "Not ready",
            "the instance is starting (recovering partitions)",
        )
    }

    /// `not_ready` because partition tasks kept dying and were given up on.
    pub fn tasks_down(reasons: &[String]) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::NotReady,
            "Not ready",
            format!("partition tasks are down: {}", reasons.join("; ")),
        )
    }

    /// `/readyz` while the payment gateway refuses orderflow's credentials.
    pub fn gateway_auth_failed() -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::GatewayAuthFailed,
            "Payment gateway refuses the credentials",
            "the payment gateway answers 401/403 to orderflow's secret key: authorizations end payment_failed (gateway_auth_failed) until it accepts the key again",
        )
    }

    pub fn too_many_streams(retry_after_s: u32) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::TooManyStreams,
            "Too many streams",
            "too many event streams are open; retry later",
        )
        .retry_after(retry_after_s)
    }

    pub fn unavailable(retry_after_s: u32) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "Service unavailable",
            "the log or state store is unavailable; retry later",
        )
        .retry_after(retry_after_s)
    }

    pub fn log_full(retry_after_s: u32) -> Problem {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            Code::LogFull,
            "Too many requests",
            "the log is full; retry later",
        )
        .retry_after(retry_after_s)
    }

    /// Intake shed a new order before the log (admission control).
    pub fn overloaded(reason: Shed, retry_after_s: u32) -> Problem {
        let limit = match reason {
            Shed::Inflight => "too many orders are being taken at once",
            Shed::Backlog => "the order's partition is too far behind",
            Shed::Memory => "the server is above its memory bound",
            Shed::Down => {
                "the order's partition is not being processed (its runner died and is restarting, or was given up on)"
            }
        };
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Overloaded,
            "Overloaded",
            format!("{limit}; retry later"),
        )
        .retry_after(retry_after_s)
    }

    /// Past the per-client rate limit (`http.rate_limit_per_s`).
    pub fn rate_limited(retry_after_s: u32) -> Problem {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            Code::RateLimited,
            "Too many requests",
            "this client sent more requests than its rate limit allows; retry after `Retry-After` seconds",
        )
        .retry_after(retry_after_s)
    }

    /// The request body did not arrive within `http.body_timeout_ms`. The
    /// connection is closed after this answer (its unread rest of the body
    /// would otherwise be taken for the next request).
    pub fn body_timeout(timeout_ms: u64) -> Problem {
        Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            Code::BodyTimeout,
            "Request timeout",
            format!("the request body was not received within {timeout_ms} ms"),
        )
    }

    /// The answer for an intake error. 5xx details stay generic (the
    /// cause is logged by the caller, never a body or a token).
    pub fn from_intake(e: &IntakeError, retry_after_s: u32) -> Problem {
        match e {
            IntakeError::Invalid(r) => Problem::new(
                StatusCode::BAD_REQUEST,
                Code::Order(r.reason),
                "Invalid order",
                r.detail.clone(),
            ),
            IntakeError::LogFull => Problem::log_full(retry_after_s),
            IntakeError::Overloaded(reason) => Problem::overloaded(*reason, retry_after_s),
            IntakeError::Unavailable(_) => Problem::unavailable(retry_after_s),
            IntakeError::RecordTooLarge { max_bytes, .. } => Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::RecordTooLarge,
                "Payload too large",
                format!("the order exceeds the log's record limit of {max_bytes} bytes"),
            ),
        }
    }
}

/// `a`, `a or b`, `a, b or c`.
fn either(roles: &[Role], name: impl Fn(&Role) -> &'static str) -> String {
    let names: Vec<&str> = roles.iter().map(name).collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = ProblemBody {
            kind: format!("urn:orderflow:problem:{}", self.code.as_str()),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code.as_str(),
        };
        let json = serde_json::to_vec(&body).expect("a problem always serializes");
        let mut res = (self.status, json).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.status == StatusCode::REQUEST_TIMEOUT {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.bearer_challenge {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"orderflow\""),
            );
        }
        res
    }
}
