//! Credentials: the admin token (operators, `orderflow` client commands)
//! and per-order tracking tokens. Neither is ever logged.

use axum::http::{HeaderMap, header};
use serde::Deserialize;

use super::AppState;
use super::problem::Problem;

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// `?token=...` on tracking routes.
#[derive(Deserialize, Default)]
pub struct TokenQuery {
    pub token: Option<String>,
}

/// The tracking token presented: the `Authorization` header first, else
/// the `token` query parameter.
pub fn presented_token<'a>(headers: &'a HeaderMap, query: &'a TokenQuery) -> Option<&'a str> {
    bearer(headers).or(query.token.as_deref().filter(|t| !t.is_empty()))
}

/// True if `presented` is the configured admin token (constant time).
pub fn is_admin(state: &AppState, presented: Option<&str>) -> bool {
    match (&state.admin_token, presented) {
        (Some(secret), Some(p)) => secret.matches(p),
        _ => false,
    }
}

/// Admin routes: 403 `admin_disabled` when no admin token is configured,
/// 401 `unauthorized` when it is missing or wrong.
pub fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), Problem> {
    let Some(secret) = &state.admin_token else {
        return Err(Problem::admin_disabled());
    };
    match bearer(headers) {
        Some(t) if secret.matches(t) => Ok(()),
        _ => Err(Problem::unauthorized()),
    }
}
