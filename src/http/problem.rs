//! Errors as `application/problem+json` (RFC 9457): `type`, `title`,
//! `status`, `detail`, plus a stable `code` that clients switch on. The
//! `type` is `urn:orderflow:problem:<code>` (an identifier, not a page).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::auth::{Role, Scope};
use crate::pipeline::intake::{IntakeError, Shed};

pub const PROBLEM_JSON: &str = "application/problem+json";

/// One problem answer. Build it with the constructors below so the code
/// and status of each kind stay the same everywhere.
#[derive(Clone, Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u32>,
    /// Adds `WWW-Authenticate: Bearer` (401).
    pub bearer_challenge: bool,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        code: &'static str,
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
            "not_found",
            "Not found",
            "no such resource",
        )
    }

    /// The one answer for an unknown order, a missing token and a wrong
    /// token alike, so a caller learns nothing about which it was.
    pub fn order_not_found() -> Problem {
        Problem::new(
            StatusCode::NOT_FOUND,
            "order_not_found",
            "Order not found",
            "no order with this id is visible with the given token",
        )
    }

    pub fn method_not_allowed() -> Problem {
        Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Method not allowed",
            "this route does not take this method",
        )
    }

    /// A missing or unknown bearer token on a route that `roles` may use.
    pub fn unauthorized(roles: &[Role]) -> Problem {
        let mut p = Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
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
            "admin_disabled",
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
            "forbidden",
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
            "invalid_order_id",
            "Invalid order id",
            "an order id must match [A-Za-z0-9._:-]{1,64} and hold no card number",
        )
    }

    pub fn payload_too_large(limit: usize) -> Problem {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "Payload too large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    }

    pub fn unreadable_body() -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "unreadable_body",
            "Bad request",
            "the request body could not be read",
        )
    }

    pub fn invalid_body(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "Invalid request body",
            detail,
        )
    }

    pub fn invalid_sku() -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_sku",
            "Invalid SKU",
            "a SKU must match [A-Za-z0-9._-]{1,64}",
        )
    }

    pub fn invalid_idempotency_key() -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "Invalid Idempotency-Key",
            "the Idempotency-Key header must be 1 to 255 printable ASCII characters",
        )
    }

    pub fn shutting_down(retry_after_s: u32) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "Shutting down",
            "this instance is shutting down; retry (on another instance)",
        )
        .retry_after(retry_after_s)
    }

    pub fn not_ready() -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "Not ready",
            "the instance is starting (recovering partitions)",
        )
    }

    /// `not_ready` because partition tasks kept dying and were given up on.
    pub fn tasks_down(reasons: &[String]) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "Not ready",
            format!("partition tasks are down: {}", reasons.join("; ")),
        )
    }

    /// `/readyz` while the payment gateway refuses orderflow's credentials.
    pub fn gateway_auth_failed() -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "gateway_auth_failed",
            "Payment gateway refuses the credentials",
            "the payment gateway answers 401/403 to orderflow's secret key: authorizations end payment_failed (gateway_auth_failed) until it accepts the key again",
        )
    }

    pub fn too_many_streams(retry_after_s: u32) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            "Too many streams",
            "too many event streams are open; retry later",
        )
        .retry_after(retry_after_s)
    }

    pub fn unavailable(retry_after_s: u32) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            "the log or state store is unavailable; retry later",
        )
        .retry_after(retry_after_s)
    }

    pub fn log_full(retry_after_s: u32) -> Problem {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "log_full",
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
            "overloaded",
            "Overloaded",
            format!("{limit}; retry later"),
        )
        .retry_after(retry_after_s)
    }

    /// Past the per-client rate limit (`http.rate_limit_per_s`).
    pub fn rate_limited(retry_after_s: u32) -> Problem {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
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
            "body_timeout",
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
                r.reason.code(),
                "Invalid order",
                r.detail.clone(),
            ),
            IntakeError::LogFull => Problem::log_full(retry_after_s),
            IntakeError::Overloaded(reason) => Problem::overloaded(*reason, retry_after_s),
            IntakeError::Unavailable(_) => Problem::unavailable(retry_after_s),
            IntakeError::RecordTooLarge { max_bytes, .. } => Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "record_too_large",
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
        let body = Body {
            kind: format!("urn:orderflow:problem:{}", self.code),
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code,
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
