//! Handlers of the non-streaming routes.

use axum::Json;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::{Scope, TokenQuery, presented_token, require};
use super::body::{BodyError, read_limited};
use super::openapi::order_record::OrderRecord;
use super::problem::{Code, Problem};
use super::views::{
    AcceptedView, GatewayView, OrderView, ProduceLine, ReadyView, TrackingTokenView,
};
use super::{AppState, Ctx};
use crate::domain::order::{valid_id, valid_sku};
use crate::domain::pan::contains_pan;
use crate::pipeline::intake::{IntakeError, valid_idempotency_key};
use crate::pipeline::inventory::{InventoryError, StockCounts};
use crate::pipeline::log::LogError;
use crate::stages::state::MAX_AVAILABLE;

/// The admin produce route takes this many times the normal body limit.
pub const PRODUCE_BODY_FACTOR: usize = 64;
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Counts `orderflow_http_requests_total{route, code}` by route template.
pub(crate) async fn count_requests(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let res = next.run(req).await;
    let route = route.as_deref().unwrap_or("unmatched");
    ctx.app
        .metrics
        .http_requests
        .with_label_values(&[route, res.status().as_str()])
        .inc();
    res
}

pub(crate) async fn not_found(State(ctx): State<Ctx>) -> Response {
    ctx.app
        .metrics
        .http_requests
        .with_label_values(&["unmatched", "404"])
        .inc();
    Problem::not_found().into_response()
}

pub(crate) async fn method_not_allowed() -> Problem {
    Problem::method_not_allowed()
}

async fn body_or_problem(
    state: &AppState,
    body: Body,
    limit: usize,
) -> Result<axum::body::Bytes, Problem> {
    read_limited(body, limit).await.map_err(|e| match e {
        BodyError::TooLarge => Problem::payload_too_large(limit),
        BodyError::Unreadable => Problem::unreadable_body(),
        BodyError::TimedOut => Problem::body_timeout(state.config.body_timeout_ms),
    })
}

fn intake_problem(state: &AppState, e: &IntakeError) -> Problem {
    if matches!(e, IntakeError::Unavailable(_)) {
        tracing::warn!(error = %e, "intake unavailable");
    }
    Problem::from_intake(e, state.config.retry_after_s)
}

/// Place an order.
///
/// `POST /v1/orders`: the order goes to the log; 202 once it is durable.
#[utoipa::path(
    post,
    path = "/v1/orders",
    tag = "orders",
    request_body(content = OrderRecord, description = "The order; `order_id` may be left out."),
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries of an order without `order_id` one order: 1 to 255 printable ASCII characters.")),
    responses(
        (status = 202, description = "In the log; follow it at `tracking_url` with `tracking_token`.", body = AcceptedView, headers(("Location" = String, description = "The order's URL."))),
        (status = 400, description = "The order broke the rule its code names: {order_reasons}. `invalid_idempotency_key`: a bad `Idempotency-Key`. `unreadable_body`."),
        (status = 413, description = "`payload_too_large`: over `http.body_limit_bytes`. `record_too_large`: over the log's record limit."),
        (status = 429, description = "`log_full`: the log is at its bound."),
        (status = 503, description = "`overloaded`: shed by admission control (the detail says which limit). `unavailable`: the log is unavailable. `shutting_down`."),
    ),
)]
pub(crate) async fn post_order(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let state = &ctx.app;
    if !state.health.is_accepting() {
        return Err(Problem::shutting_down(state.config.retry_after_s));
    }
    let key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if valid_idempotency_key(k) => Some(k),
            _ => return Err(Problem::invalid_idempotency_key()),
        },
    };
    let body = body_or_problem(state, body, state.config.body_limit_bytes).await?;
    let accepted = state
        .intake
        .submit(&body, key)
        .await
        .map_err(|e| intake_problem(state, &e))?;
    let url = format!("/v1/orders/{}", accepted.order_id);
    let view = AcceptedView {
        order_id: &accepted.order_id,
        status: "accepted",
        tracking_url: url.clone(),
        tracking_token: &accepted.tracking_token,
    };
    let mut res = (StatusCode::ACCEPTED, Json(view)).into_response();
    if let Ok(loc) = HeaderValue::from_str(&url) {
        res.headers_mut().insert(header::LOCATION, loc);
    }
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// How a tracking request was let in.
pub(crate) enum Access {
    /// With the order's tracking token: intake accepted the order.
    Token,
    /// With an API token whose role reads any order (admin, reader): the
    /// order may not exist.
    Credential,
}

/// The order id of a `/v1/orders/{id}…` request and the caller's access to
/// it; a bad path answers like an unknown order.
pub(crate) async fn authorize_request(
    state: &AppState,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
) -> Result<(String, Access), Problem> {
    let Ok(Path(id)) = path else {
        return Err(Problem::order_not_found());
    };
    let query = query.map(|q| q.0).unwrap_or_default();
    let access = authorize_order(state, &id, headers, &query).await?;
    Ok((id, access))
}

/// Checks the token of a tracking request. A missing or wrong token is
/// refused with the same 404 as an unknown id, so that the answer tells
/// nothing about which orders exist. An API token of a role that may not
/// read orders (producer) is refused with 403 `forbidden`: that answer
/// depends on the token alone, never on the id, so it reveals nothing
/// either, and tells an upstream system what it did wrong.
pub(crate) async fn authorize_order(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    query: &TokenQuery,
) -> Result<Access, Problem> {
    if !valid_id(id) {
        return Err(Problem::order_not_found());
    }
    let Some(token) = presented_token(headers, query) else {
        return Err(Problem::order_not_found());
    };
    if let Some(role) = state.credentials.role_of(token) {
        return match Scope::ReadOrders.allows(role) {
            true => Ok(Access::Credential),
            false => Err(Problem::forbidden(role, Scope::ReadOrders)),
        };
    }
    match state.intake.verify_token(id, token) {
        true => Ok(Access::Token),
        false => Err(Problem::order_not_found()),
    }
}

/// An order's status and history.
///
/// `GET /v1/orders/{id}`, with the order's tracking token or an API token.
#[utoipa::path(
    get,
    path = "/v1/orders/{id}",
    tag = "orders",
    params(("id" = String, Path, description = "The order id.")),
    security(("bearer" = []), ("tracking_token" = [])),
    responses(
        (status = 200, description = "The order's status and history (`accepted` with no history until the read model has it).", body = OrderView),
    ),
)]
pub(crate) async fn get_order(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let state = &ctx.app;
    let (id, access) = authorize_request(state, path, query, &headers).await?;
    // A valid tracking token proves intake accepted the order; an order the
    // read model does not hold (not processed yet, or past its retention)
    // is then shown as accepted. An API token proves nothing about it.
    let view = match (state.tracking.get(&id), access) {
        (Some(v), _) => OrderView::from_tracking(&v),
        (None, Access::Token) => OrderView::just_accepted(&id),
        (None, Access::Credential) => return Err(Problem::order_not_found()),
    };
    let mut res = Json(view).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

fn stock_problem(state: &AppState, e: InventoryError) -> Problem {
    let retry = state.config.retry_after_s;
    match e {
        InventoryError::InvalidSku => Problem::invalid_sku(),
        InventoryError::TooMuchStock => Problem::invalid_body(format!(
            "expected {{\"available\": N}} with N at most {MAX_AVAILABLE}"
        )),
        InventoryError::Refused(reason) => Problem::new(
            StatusCode::CONFLICT,
            Code::StockRefused,
            "Stock change refused",
            format!("the partition refused the stock change: {reason}"),
        ),
        InventoryError::Log(LogError::Full { .. }) => Problem::log_full(retry),
        InventoryError::Log(e) => {
            tracing::warn!(error = %e, "stock change not logged");
            Problem::unavailable(retry)
        }
        InventoryError::Store(e) => {
            tracing::warn!(error = %e, "stock counters unreadable");
            Problem::unavailable(retry)
        }
        InventoryError::Timeout(ms) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::ApplyTimeout,
            "Stock change pending",
            format!("the stock change was logged but not applied within {ms} ms; it will apply, and repeating it is safe"),
        )
        .retry_after(retry),
    }
}

/// A SKU's stock counters.
///
/// `GET /v1/inventory/{sku}` (admin, reader).
#[utoipa::path(
    get,
    path = "/v1/inventory/{sku}",
    tag = "inventory",
    params(("sku" = String, Path, description = "The SKU.")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The counters (zeros for an unknown SKU). Roles: admin, reader.", body = StockCounts),
        (status = 400, description = "`invalid_sku`."),
        (status = 503, description = "`unavailable`: the counters could not be read."),
    ),
)]
pub(crate) async fn get_stock(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
) -> Result<Json<StockCounts>, Problem> {
    let state = &ctx.app;
    require(state, &headers, Scope::ReadStock)?;
    let sku = path.map(|p| p.0).unwrap_or_default();
    if !valid_sku(&sku) {
        return Err(Problem::invalid_sku());
    }
    let counts = state
        .inventory
        .get(&sku)
        .await
        .map_err(|e| stock_problem(state, e))?;
    Ok(Json(counts.unwrap_or(StockCounts {
        sku,
        ..StockCounts::default()
    })))
}

/// The body of `PUT /v1/inventory/{sku}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StockBody {
    /// The units on hand to sell, at most 10^12.
    #[schema(maximum = 1_000_000_000_000_u64)]
    available: u64,
}

/// Set a SKU's available stock.
///
/// `PUT /v1/inventory/{sku}` (admin) with `{"available": N}`.
#[utoipa::path(
    put,
    path = "/v1/inventory/{sku}",
    tag = "inventory",
    params(("sku" = String, Path, description = "The SKU.")),
    request_body(content = StockBody),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The counters once the change is applied (it goes through the log). Role: admin.", body = StockCounts),
        (status = 400, description = "`invalid_sku`, `invalid_body`."),
        (status = 409, description = "`stock_refused`: the partition refused the change (the detail says why)."),
        (status = 413, description = "`payload_too_large`."),
        (status = 429, description = "`log_full`."),
        (status = 503, description = "`apply_timeout`: logged, not applied yet (it will apply; repeating is safe). `unavailable`, `shutting_down`."),
    ),
)]
pub(crate) async fn put_stock(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<StockCounts>, Problem> {
    let state = &ctx.app;
    require(state, &headers, Scope::WriteStock)?;
    if !state.health.is_accepting() {
        return Err(Problem::shutting_down(state.config.retry_after_s));
    }
    let sku = path.map(|p| p.0).unwrap_or_default();
    if !valid_sku(&sku) {
        return Err(Problem::invalid_sku());
    }
    let body = body_or_problem(state, body, state.config.body_limit_bytes).await?;
    let bad = || Problem::invalid_body("expected {\"available\": N} with N a non-negative integer");
    // An object only (serde would also take `[N]` for the struct).
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|_| bad())?;
    if !value.is_object() {
        return Err(bad());
    }
    let StockBody { available } = serde_json::from_value(value).map_err(|_| bad())?;
    let counts = state
        .inventory
        .set(&sku, available)
        .await
        .map_err(|e| stock_problem(state, e))?;
    Ok(Json(counts))
}

/// Produce orders in bulk.
///
/// `POST /v1/admin/produce` (admin, producer): NDJSON in, one NDJSON result per
/// non-blank input line out, in input order. Lines are numbered from 1;
/// blank lines are skipped. A bad line does not stop the others.
#[utoipa::path(
    post,
    path = "/v1/admin/produce",
    tag = "admin",
    request_body(content = String, content_type = "application/x-ndjson", description = "One order record per line, written to the log as an upstream producer would (the processor validates each)."),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One result per non-blank input line, in order (NDJSON). Roles: admin, producer.", content_type = "application/x-ndjson", body = ProduceLine),
        (status = 413, description = "`payload_too_large`: over 64 × `http.body_limit_bytes`."),
        (status = 503, description = "`shutting_down`."),
    ),
)]
pub(crate) async fn admin_produce(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let state = &ctx.app;
    require(state, &headers, Scope::Produce)?;
    if !state.health.is_accepting() {
        return Err(Problem::shutting_down(state.config.retry_after_s));
    }
    let body = body_or_problem(
        state,
        body,
        state
            .config
            .body_limit_bytes
            .saturating_mul(PRODUCE_BODY_FACTOR),
    )
    .await?;
    let mut numbers = Vec::new();
    let mut lines: Vec<&[u8]> = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        numbers.push(i + 1);
        lines.push(line);
    }
    let results = state.intake.produce_raw_batch(&lines).await;
    let mut out = Vec::with_capacity(results.len() * 64);
    for (line, r) in numbers.into_iter().zip(&results) {
        let row = match r {
            Ok(p) => ProduceLine::Ok {
                line,
                partition: p.partition,
                offset: p.offset,
                order_id: p.order_id.as_deref(),
            },
            Err(e) => {
                if matches!(e, IntakeError::Unavailable(_)) {
                    tracing::warn!(line, error = %e, "produce failed");
                }
                let error = match e {
                    IntakeError::Invalid(r) => r.detail.clone(),
                    other => other.to_string(),
                };
                ProduceLine::Err {
                    line,
                    error,
                    code: e.code(),
                }
            }
        };
        serde_json::to_writer(&mut out, &row).expect("a result always serializes");
        out.push(b'\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
}

/// The tracking token of an order.
///
/// `GET /v1/orders/{id}/tracking-token` (admin, producer): the tracking
/// token of an order an upstream system wrote to the log, so its customer
/// can follow it like an order placed over HTTP. The token is a MAC of the
/// id, so any valid id has one, whether or not such an order exists.
#[utoipa::path(
    get,
    path = "/v1/orders/{id}/tracking-token",
    tag = "orders",
    params(("id" = String, Path, description = "Any valid order id.")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The token `POST /v1/orders` would answer for this id. Roles: admin, producer.", body = TrackingTokenView),
        (status = 400, description = "`invalid_order_id`."),
    ),
)]
pub(crate) async fn tracking_token(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let state = &ctx.app;
    require(state, &headers, Scope::TrackingTokens)?;
    let id = path.map(|p| p.0).unwrap_or_default();
    // No order holding a card number is ever taken: its id is not echoed.
    if !valid_id(&id) || contains_pan(id.as_bytes()) {
        return Err(Problem::invalid_order_id());
    }
    let view = TrackingTokenView {
        tracking_token: state.intake.tracking_token(&id),
        tracking_url: format!("/v1/orders/{id}"),
        order_id: &id,
    };
    let mut res = Json(view).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// Prometheus metrics.
///
/// `GET /metrics`: Prometheus text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format.", content_type = "text/plain", body = String)),
)]
pub(crate) async fn metrics(State(ctx): State<Ctx>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctx.app.metrics.render(),
    )
        .into_response()
}

/// Liveness.
///
/// `GET /healthz`: the process is alive.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "`ok`: the process is alive.", content_type = "text/plain", body = String)),
)]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// Readiness.
///
/// `GET /readyz`: 200 `{"status": "ready", "gateway": {"gateway": NAME,
/// "breaker": "closed" | "half_open" | "open"}, "failed_effects": N}` (N:
/// captures and voids that failed for good on the partitions owned here,
/// shown, not judged: they wait for an operator) once every partition is
/// recovered, else 503; the 503 names the partition tasks given up on, if
/// any. The breaker is shown, not judged: an open breaker still takes
/// orders (they end `payment_failed`). Refused gateway credentials are
/// judged (503 `gateway_auth_failed`): every payment fails until someone
/// fixes the key, which is what readiness is for.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Every partition is recovered.", body = ReadyView),
        (status = 503, description = "`not_ready`: starting, or partition tasks were given up on (the detail names them). `gateway_auth_failed`: the payment gateway refuses orderflow's key."),
    ),
)]
pub(crate) async fn readyz(State(ctx): State<Ctx>) -> Result<Response, Problem> {
    let health = &ctx.app.health;
    let down = health.down_reasons();
    if !down.is_empty() {
        return Err(Problem::tasks_down(&down));
    }
    if !health.is_ready() {
        return Err(Problem::not_ready());
    }
    let gateway = health.gateway.as_ref();
    if gateway.is_some_and(|b| b.auth_failed()) {
        return Err(Problem::gateway_auth_failed());
    }
    let view = ReadyView {
        status: "ready",
        gateway: gateway.map(|g| GatewayView {
            kind: g.name(),
            breaker: g.breaker(),
        }),
        failed_effects: ctx.app.metrics.effects_failed_now(),
    };
    Ok(Json(view).into_response())
}
