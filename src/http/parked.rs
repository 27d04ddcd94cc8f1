//! Admin routes of the park lane (`orderflow parked`):
//! `GET /v1/admin/parked`, `GET /v1/admin/parked/{partition}/{offset}`,
//! `POST /v1/admin/parked/{partition}/retry`,
//! `POST /v1/admin/parked/{partition}/{offset}/drop`,
//! `POST /v1/admin/parked/{partition}/effects/{order_id}/{kind}/drop`.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use super::Ctx;
use super::auth::{Scope, require};
use super::problem::{Code, Problem};
use super::views::{CommandView, FailedEffectView, ParkedDetailView, ParkedListView, ParkedView};
use crate::domain::EffectKind;
use crate::pipeline::log::LogError;
use crate::pipeline::parked::ParkedError;

/// The numbers of the path; a path that holds none answers like an
/// unknown route, as problem+json.
fn position<T>(path: Result<Path<T>, PathRejection>) -> Result<T, Problem> {
    path.map(|p| p.0).map_err(|_| Problem::not_found())
}

fn problem(ctx: &Ctx, e: ParkedError) -> Problem {
    let retry = ctx.app.config.retry_after_s;
    match e {
        ParkedError::NoSuchPartition { .. } => Problem::new(
            StatusCode::NOT_FOUND,
            Code::NoSuchPartition,
            "No such partition",
            e.to_string(),
        ),
        ParkedError::Log(LogError::Full { .. }) => Problem::log_full(retry),
        ParkedError::Log(e) => {
            tracing::warn!(error = %e, "park lane unavailable");
            Problem::unavailable(retry)
        }
        ParkedError::Store(e) => {
            tracing::warn!(error = %e, "park lane unavailable");
            Problem::unavailable(retry)
        }
    }
}

/// The park lane and the failed captures and voids.
///
/// `GET /v1/admin/parked`: what is parked now, oldest position first, and
/// the captures and voids that failed for good (as of the checkpoints).
#[utoipa::path(
    get,
    path = "/v1/admin/parked",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The park lane and the failed captures and voids, as of each partition's last checkpoint. Role: admin.", body = ParkedListView),
        (status = 503, description = "`unavailable`."),
    ),
)]
pub(crate) async fn list(State(ctx): State<Ctx>, headers: HeaderMap) -> Result<Response, Problem> {
    require(&ctx.app, &headers, Scope::ParkLane)?;
    let lane = &ctx.app.parked;
    let parked = lane.list().await.map_err(|e| problem(&ctx, e))?;
    let failed = lane.failed_effects().await.map_err(|e| problem(&ctx, e))?;
    let view = ParkedListView {
        count: parked.len(),
        parked: parked.iter().map(ParkedView::new).collect(),
        failed_effects: failed.iter().map(FailedEffectView::new).collect(),
    };
    Ok(Json(view).into_response())
}

/// One parked record.
///
/// `GET /v1/admin/parked/{partition}/{offset}`: one record, with its bytes.
#[utoipa::path(
    get,
    path = "/v1/admin/parked/{partition}/{offset}",
    tag = "admin",
    params(("partition" = u32, Path), ("offset" = u64, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The parked record with its bytes. Role: admin.", body = ParkedDetailView),
        (status = 404, description = "`not_parked`: nothing is parked there. `not_found`: not a partition and offset."),
        (status = 503, description = "`unavailable`."),
    ),
)]
pub(crate) async fn show(
    State(ctx): State<Ctx>,
    path: Result<Path<(u32, u64)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    require(&ctx.app, &headers, Scope::ParkLane)?;
    let (partition, offset) = position(path)?;
    let parked = ctx.app.parked.list().await.map_err(|e| problem(&ctx, e))?;
    let Some(r) = parked
        .iter()
        .find(|r| r.partition == partition && r.offset == offset)
    else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            Code::NotParked,
            "Not parked",
            format!("nothing is parked at partition {partition}, offset {offset}"),
        ));
    };
    let view = ParkedDetailView {
        record: ParkedView::new(r),
        value_base64: base64::engine::general_purpose::STANDARD.encode(&r.value),
        value_text: String::from_utf8_lossy(&r.value).into_owned(),
    };
    Ok(Json(view).into_response())
}

fn accepted(partition: u32, command_offset: u64) -> (StatusCode, Json<CommandView>) {
    let view = CommandView {
        partition,
        command_offset,
    };
    (StatusCode::ACCEPTED, Json(view))
}

/// Retry a partition's parked records and failed effects.
///
/// `POST /v1/admin/parked/{partition}/retry`: run the partition's failed
/// captures and voids again, and process its parked records again, in
/// order (202: the command is in the log).
#[utoipa::path(
    post,
    path = "/v1/admin/parked/{partition}/retry",
    tag = "admin",
    params(("partition" = u32, Path)),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The command is in the log. Role: admin.", body = CommandView),
        (status = 404, description = "`no_such_partition`. `not_found`: not a partition number."),
        (status = 429, description = "`log_full`."),
        (status = 503, description = "`unavailable`."),
    ),
)]
pub(crate) async fn retry(
    State(ctx): State<Ctx>,
    path: Result<Path<u32>, PathRejection>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<CommandView>), Problem> {
    require(&ctx.app, &headers, Scope::ParkLane)?;
    let partition = position(path)?;
    let offset = ctx
        .app
        .parked
        .retry(partition)
        .await
        .map_err(|e| problem(&ctx, e))?;
    Ok(accepted(partition, offset))
}

/// Drop a parked record.
///
/// `POST /v1/admin/parked/{partition}/{offset}/drop`: take one record out
/// of the lane for good (202: the command is in the log).
#[utoipa::path(
    post,
    path = "/v1/admin/parked/{partition}/{offset}/drop",
    tag = "admin",
    params(("partition" = u32, Path), ("offset" = u64, Path)),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The command is in the log. Role: admin.", body = CommandView),
        (status = 404, description = "`no_such_partition`. `not_found`: not a partition and offset."),
        (status = 429, description = "`log_full`."),
        (status = 503, description = "`unavailable`."),
    ),
)]
pub(crate) async fn drop_record(
    State(ctx): State<Ctx>,
    path: Result<Path<(u32, u64)>, PathRejection>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<CommandView>), Problem> {
    require(&ctx.app, &headers, Scope::ParkLane)?;
    let (partition, offset) = position(path)?;
    let command = ctx
        .app
        .parked
        .drop_record(partition, offset)
        .await
        .map_err(|e| problem(&ctx, e))?;
    Ok(accepted(partition, command))
}

/// Forget a failed capture or void.
///
/// `POST /v1/admin/parked/{partition}/effects/{order_id}/{kind}/drop`:
/// forget a failed capture or void an operator settled by hand (202: the
/// command is in the log).
#[utoipa::path(
    post,
    path = "/v1/admin/parked/{partition}/effects/{order_id}/{kind}/drop",
    tag = "admin",
    params(("partition" = u32, Path), ("order_id" = String, Path), ("kind" = String, Path, description = "`capture` or `void`.")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The command is in the log. Role: admin.", body = CommandView),
        (status = 400, description = "`invalid_effect_kind`."),
        (status = 404, description = "`no_such_partition`. `not_found`: not a partition number."),
        (status = 429, description = "`log_full`."),
        (status = 503, description = "`unavailable`."),
    ),
)]
pub(crate) async fn drop_effect(
    State(ctx): State<Ctx>,
    path: Result<Path<(u32, String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<CommandView>), Problem> {
    require(&ctx.app, &headers, Scope::ParkLane)?;
    let (partition, order_id, kind) = position(path)?;
    let kind = match kind.as_str() {
        "capture" => EffectKind::Capture,
        "void" => EffectKind::Void,
        _ => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                Code::InvalidEffectKind,
                "Invalid effect kind",
                format!("{kind:?} is neither `capture` nor `void`"),
            ));
        }
    };
    let command = ctx
        .app
        .parked
        .drop_effect(partition, order_id, kind)
        .await
        .map_err(|e| problem(&ctx, e))?;
    Ok(accepted(partition, command))
}
