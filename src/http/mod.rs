//! The HTTP API (axum): routes of the contract, `application/problem+json`
//! errors with stable codes, Server-Sent Events for live tracking.
//!
//! | Route | Auth | Answers |
//! |---|---|---|
//! | `POST /v1/orders` | none | 202, 400 `<reason>`, 400 `invalid_idempotency_key`, 413 `payload_too_large`/`record_too_large`, 429 `log_full`, 503 `overloaded`/`unavailable`/`shutting_down` |
//! | `GET /v1/orders/{id}` | tracking token, or admin or reader token | 200, 404 `order_not_found` (unknown id, missing or wrong token alike), 403 `forbidden` (a producer token, whatever the id), 503 `unavailable` |
//! | `GET /v1/orders/{id}/events` | same | 200 SSE, 404 `order_not_found`, 403 `forbidden`, 503 `too_many_streams`/`unavailable` |
//! | `GET /track/{id}?token=T` | same | 200 HTML tracking page; 404 HTML page (unknown id, missing, wrong or producer token alike), 503 HTML page |
//! | `GET /v1/orders/{id}/tracking-token` | admin or producer | 200 `{order_id, tracking_token, tracking_url}` (for any valid id: the token is a MAC of the id), 400 `invalid_order_id` |
//! | `PUT /v1/inventory/{sku}` | admin | 200, 400 `invalid_sku`/`invalid_body`, 413, 429, 503 `apply_timeout`/`unavailable`/`shutting_down` |
//! | `GET /v1/inventory/{sku}` | admin or reader | 200 (zeros for an unknown SKU), 400 `invalid_sku` |
//! | `GET /v1/admin/parked`, `GET /v1/admin/parked/{p}/{offset}` | admin | 200 JSON (the park lane), 404 `not_parked`/`no_such_partition` |
//! | `POST /v1/admin/parked/{p}/retry`, `POST /v1/admin/parked/{p}/{offset}/drop`, `POST /v1/admin/parked/{p}/effects/{order_id}/{kind}/drop` | admin | 202 (the command is in the log), 404 `no_such_partition`, 400 `invalid_effect_kind` |
//! | `POST /v1/admin/produce` | admin or producer | 200 NDJSON (per-line results), 401, 403, 413, 503 `shutting_down` |
//! | `GET /metrics`, `/healthz`, `/readyz` | none | 200; `/readyz` 503 `not_ready`/`gateway_auth_failed` |
//! | `GET /openapi.json` | none | 200: this API in OpenAPI 3.1 ([`openapi`]) |
//! | anything else | | 404 `not_found`, 405 `method_not_allowed` |
//!
//! A route that needs an API token ([`auth`]: roles and scopes) answers 401
//! `unauthorized` for a missing or unknown one, 403 `forbidden` for a token
//! whose role may not use it, and 403 `admin_disabled` when no role that
//! may use it has a token configured.
//!
//! Every route but the last three may also answer 429 `rate_limited` (per
//! client, when `http.rate_limit_per_s` is set), and a route with a body
//! 408 `body_timeout`. Connections, deadlines and TLS: [`server`].
//!
//! Bodies, tokens and the `Authorization` header are never logged.

pub mod auth;
pub mod body;
pub mod openapi;
pub mod parked;
pub mod problem;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod sse;
pub mod tls;
pub mod track;
pub mod views;

use std::sync::Arc;

use axum::Router;
use tokio::sync::Semaphore;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::HttpConfig;
use crate::pipeline::intake::Intake;
use crate::pipeline::inventory::Inventory;
use crate::sinks::tracking::Tracking;
use crate::telemetry::Health;
use crate::telemetry::metrics::Metrics;

/// Everything the handlers need. Built by `crate::app`.
#[derive(Clone)]
pub struct AppState {
    pub intake: Arc<Intake>,
    pub tracking: Arc<Tracking>,
    pub inventory: Arc<Inventory>,
    pub parked: Arc<crate::pipeline::parked::ParkLane>,
    pub metrics: Arc<Metrics>,
    /// The API tokens by role (`auth`).
    pub credentials: Arc<auth::Credentials>,
    pub config: HttpConfig,
    pub health: Arc<Health>,
}

/// What the handlers see: the app's state plus the router's own limits.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub app: AppState,
    /// Permits for open SSE streams (`config.max_sse_streams`).
    pub sse_permits: Arc<Semaphore>,
    /// The per-client rate limit; `None` when off.
    pub rate_limit: Option<Arc<ratelimit::RateLimit>>,
}

/// Every route with its handler; the OpenAPI document is built from the
/// same list ([`openapi::document`]).
fn api_routes() -> OpenApiRouter<Ctx> {
    OpenApiRouter::new()
        .routes(routes!(routes::post_order))
        .routes(routes!(routes::get_order))
        .routes(routes!(sse::order_events))
        .routes(routes!(routes::tracking_token))
        .routes(routes!(track::track_page))
        .routes(routes!(routes::get_stock, routes::put_stock))
        .routes(routes!(routes::admin_produce))
        .routes(routes!(parked::list))
        .routes(routes!(parked::show))
        .routes(routes!(parked::retry))
        .routes(routes!(parked::drop_record))
        .routes(routes!(parked::drop_effect))
        .routes(routes!(routes::metrics))
        .routes(routes!(routes::healthz))
        .routes(routes!(routes::readyz))
        .routes(routes!(openapi::openapi_json))
}

/// The API router of the contract.
pub fn router(state: AppState) -> Router {
    let ctx = Ctx {
        sse_permits: Arc::new(Semaphore::new(state.config.max_sse_streams)),
        rate_limit: ratelimit::RateLimit::new(
            state.config.rate_limit_per_s,
            state.config.rate_limit_burst,
            &state.metrics.registry,
        )
        .map(Arc::new),
        app: state,
    };
    let (router, _) = api_routes().split_for_parts();
    router
        .method_not_allowed_fallback(routes::method_not_allowed)
        // Inside the request count, so refusals show in it by route.
        .route_layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            ratelimit::limit,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            routes::count_requests,
        ))
        .fallback(routes::not_found)
        .with_state(ctx)
}
