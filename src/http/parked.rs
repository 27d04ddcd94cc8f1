//! Admin routes of the park lane (`orderflow parked`):
//! `GET /v1/admin/parked`, `GET /v1/admin/parked/{partition}/{offset}`,
//! `POST /v1/admin/parked/{partition}/retry`,
//! `POST /v1/admin/parked/{partition}/{offset}/drop`,
//! `POST /v1/admin/parked/{partition}/effects/{order_id}/{kind}/drop`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine as _;
use serde_json::{Value, json};

use super::Ctx;
use super::auth::{Scope, require};
use super::problem::Problem;
use crate::domain::EffectKind;
use crate::domain::parked::ParkedRecord;
use crate::pipeline::log::LogError;
use crate::pipeline::parked::{FailedEffect, ParkedError};

fn summary(r: &ParkedRecord) -> Value {
    json!({
        "partition": r.partition,
        "offset": r.offset,
        "timestamp_ms": r.timestamp_ms,
        "kind": match r.kind {
            crate::domain::RecordKind::OrderJson => "order_json",
            crate::domain::RecordKind::Internal => "internal",
        },
        "key": String::from_utf8_lossy(&r.key),
        "order_id": r.order_id,
        "reason": r.reason,
        "value_bytes": r.value.len(),
    })
}

fn problem(ctx: &Ctx, e: ParkedError) -> Problem {
    let retry = ctx.app.config.retry_after_s;
    match e {
        ParkedError::NoSuchPartition { .. } => Problem::new(
            StatusCode::NOT_FOUND,
            "no_such_partition",
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

fn failed_summary(f: &FailedEffect) -> Value {
    json!({
        "partition": f.partition,
        "order_id": f.effect.order_id,
        "kind": f.effect.kind.as_str(),
        "reason": f.reason,
        "amount": f.effect.amount,
        "currency": f.effect.currency,
        "payment_id": f.effect.payment_id,
    })
}

/// `GET /v1/admin/parked`: what is parked now, oldest position first, and
/// the captures and voids that failed for good (as of the checkpoints).
pub(crate) async fn list(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    require(&ctx.app, &headers, Scope::ParkLane)?;
    let lane = &ctx.app.parked;
    let parked = lane.list().await.map_err(|e| problem(&ctx, e))?;
    let failed = lane.failed_effects().await.map_err(|e| problem(&ctx, e))?;
    Ok(Json(json!({
        "count": parked.len(),
        "parked": parked.iter().map(summary).collect::<Vec<_>>(),
        "failed_effects": failed.iter().map(failed_summary).collect::<Vec<_>>(),
    })))
}

/// `GET /v1/admin/parked/{partition}/{offset}`: one record, with its bytes.
pub(crate) async fn show(
    State(ctx): State<Ctx>,
    Path((partition, offset)): Path<(u32, u64)>,
    headers: HeaderMap,
) -> Result<Json<Value>, Problem> {
    require(&ctx.app, &headers, Scope::ParkLane)?;
    let parked = ctx.app.parked.list().await.map_err(|e| problem(&ctx, e))?;
    let Some(r) = parked
        .iter()
        .find(|r| r.partition == partition && r.offset == offset)
    else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not_parked",
            "Not parked",
            format!("nothing is parked at partition {partition}, offset {offset}"),
        ));
    };
    let mut v = summary(r);
    v["value_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&r.value));
    v["value_text"] = json!(String::from_utf8_lossy(&r.value));
    Ok(Json(v))
}

fn accepted(partition: u32, offset: u64) -> (StatusCode, Json<Value>) {
    (
        StatusCode::ACCEPTED,
        Json(json!({ "partition": partition, "command_offset": offset })),
    )
}

/// `POST /v1/admin/parked/{partition}/retry`: run the partition's failed
/// captures and voids again, and process its parked records again, in
/// order (202: the command is in the log).
pub(crate) async fn retry(
    State(ctx): State<Ctx>,
    Path(partition): Path<u32>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), Problem> {
    require(&ctx.app, &headers, Scope::ParkLane)?;
    let offset = ctx
        .app
        .parked
        .retry(partition)
        .await
        .map_err(|e| problem(&ctx, e))?;
    Ok(accepted(partition, offset))
}

/// `POST /v1/admin/parked/{partition}/{offset}/drop`: take one record out
/// of the lane for good (202: the command is in the log).
pub(crate) async fn drop_record(
    State(ctx): State<Ctx>,
    Path((partition, offset)): Path<(u32, u64)>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), Problem> {
    require(&ctx.app, &headers, Scope::ParkLane)?;
    let command = ctx
        .app
        .parked
        .drop_record(partition, offset)
        .await
        .map_err(|e| problem(&ctx, e))?;
    Ok(accepted(partition, command))
}

/// `POST /v1/admin/parked/{partition}/effects/{order_id}/{kind}/drop`:
/// forget a failed capture or void an operator settled by hand (202: the
/// command is in the log).
pub(crate) async fn drop_effect(
    State(ctx): State<Ctx>,
    Path((partition, order_id, kind)): Path<(u32, String, String)>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), Problem> {
    require(&ctx.app, &headers, Scope::ParkLane)?;
    let kind = match kind.as_str() {
        "capture" => EffectKind::Capture,
        "void" => EffectKind::Void,
        _ => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_effect_kind",
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
