//! JSON shapes of the HTTP API and the RFC 3339 timestamps in them. Each
//! derives its OpenAPI schema (`super::openapi`) from the same fields it
//! serializes, so the document cannot drift from the answers.

use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::parked::ParkedRecord;
use crate::domain::time::rfc3339_ms;
use crate::domain::{RecordKind, Status, StatusEvent};
use crate::pipeline::parked::FailedEffect;
use crate::sinks::tracking::TrackingView;

/// `GET /v1/orders/{id}`: an order's status and its history.
#[derive(Serialize, ToSchema)]
pub struct OrderView {
    pub order_id: String,
    pub status: Status,
    /// Why it failed (a reason code), on failure statuses only.
    pub reason: Option<String>,
    pub history: Vec<HistoryView>,
}

/// One status change, in `seq` order.
#[derive(Serialize, ToSchema)]
pub struct HistoryView {
    pub seq: u32,
    pub status: Status,
    /// RFC 3339 UTC with milliseconds, the log time of the change.
    #[schema(format = DateTime)]
    pub at: String,
}

/// `202` of `POST /v1/orders`.
#[derive(Serialize, ToSchema)]
pub struct AcceptedView<'a> {
    pub order_id: &'a str,
    /// Always `accepted`.
    pub status: &'static str,
    pub tracking_url: String,
    /// Lets the customer read this order (`Authorization: Bearer` or `?token=`).
    pub tracking_token: &'a str,
}

/// `GET /v1/orders/{id}/tracking-token`.
#[derive(Serialize, ToSchema)]
pub struct TrackingTokenView<'a> {
    pub order_id: &'a str,
    pub tracking_token: String,
    pub tracking_url: String,
}

/// One NDJSON result line of `POST /v1/admin/produce`.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum ProduceLine<'a> {
    /// The line is in the log (the processor still validates it).
    Ok {
        line: usize,
        partition: u32,
        offset: u64,
        order_id: Option<&'a str>,
    },
    /// The line was refused; `code` is a problem code.
    Err {
        line: usize,
        error: String,
        code: &'static str,
    },
}

/// `GET /readyz` when ready.
#[derive(Serialize, ToSchema)]
pub struct ReadyView<'a> {
    /// Always `ready`.
    pub status: &'static str,
    /// The payment gateway's circuit breaker, shown, not judged.
    pub gateway: Option<GatewayView<'a>>,
    /// Captures and voids that failed for good on the partitions owned here.
    pub failed_effects: i64,
}

#[derive(Serialize, ToSchema)]
pub struct GatewayView<'a> {
    /// `simulator` or `stripe`.
    pub kind: &'a str,
    /// `closed`, `half_open` or `open`.
    pub breaker: &'static str,
}

/// `GET /v1/admin/parked`.
#[derive(Serialize, ToSchema)]
pub struct ParkedListView<'a> {
    pub count: usize,
    pub parked: Vec<ParkedView<'a>>,
    pub failed_effects: Vec<FailedEffectView<'a>>,
}

/// A parked record, without its bytes.
#[derive(Serialize, ToSchema)]
pub struct ParkedView<'a> {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: u64,
    /// `order_json` (from intake or an upstream producer) or `internal`.
    pub kind: &'static str,
    /// The record key, UTF-8 with invalid bytes replaced.
    pub key: String,
    pub order_id: Option<&'a str>,
    pub reason: &'a str,
    pub value_bytes: usize,
}

impl<'a> ParkedView<'a> {
    pub fn new(r: &'a ParkedRecord) -> ParkedView<'a> {
        ParkedView {
            partition: r.partition,
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            kind: match r.kind {
                RecordKind::OrderJson => "order_json",
                RecordKind::Internal => "internal",
            },
            key: String::from_utf8_lossy(&r.key).into_owned(),
            order_id: r.order_id.as_deref(),
            reason: &r.reason,
            value_bytes: r.value.len(),
        }
    }
}

/// `GET /v1/admin/parked/{partition}/{offset}`: a parked record with its bytes.
#[derive(Serialize, ToSchema)]
pub struct ParkedDetailView<'a> {
    #[serde(flatten)]
    pub record: ParkedView<'a>,
    pub value_base64: String,
    /// The bytes as UTF-8, invalid bytes replaced.
    pub value_text: String,
}

/// A capture or void that failed for good and waits for an operator.
#[derive(Serialize, ToSchema)]
pub struct FailedEffectView<'a> {
    pub partition: u32,
    pub order_id: &'a str,
    /// `capture` or `void`.
    pub kind: &'static str,
    pub reason: &'a str,
    /// Minor units.
    pub amount: u64,
    pub currency: &'a str,
    pub payment_id: &'a str,
}

impl<'a> FailedEffectView<'a> {
    pub fn new(f: &'a FailedEffect) -> FailedEffectView<'a> {
        FailedEffectView {
            partition: f.partition,
            order_id: &f.effect.order_id,
            kind: f.effect.kind.as_str(),
            reason: &f.reason,
            amount: f.effect.amount,
            currency: &f.effect.currency,
            payment_id: &f.effect.payment_id,
        }
    }
}

/// `202` of a park-lane command: it is in the log at `command_offset`.
#[derive(Serialize, ToSchema)]
pub struct CommandView {
    pub partition: u32,
    pub command_offset: u64,
}

impl OrderView {
    pub fn from_tracking(v: &TrackingView) -> OrderView {
        OrderView {
            order_id: v.order_id.clone(),
            status: v.status,
            reason: v.reason.clone(),
            history: v
                .history
                .iter()
                .map(|h| HistoryView {
                    seq: h.seq,
                    status: h.status,
                    at: rfc3339_ms(h.at_ms),
                })
                .collect(),
        }
    }

    /// Accepted by intake, not yet seen by the read model.
    pub fn just_accepted(order_id: &str) -> OrderView {
        OrderView {
            order_id: order_id.to_owned(),
            status: Status::Accepted,
            reason: None,
            history: Vec::new(),
        }
    }
}

/// The data of one SSE `status` event.
#[derive(Serialize, ToSchema)]
pub struct EventView<'a> {
    pub order_id: &'a str,
    pub seq: u32,
    pub status: Status,
    pub reason: Option<&'a str>,
    pub at: String,
}

impl<'a> EventView<'a> {
    pub fn new(e: &'a StatusEvent) -> EventView<'a> {
        EventView {
            order_id: &e.order_id,
            seq: e.seq,
            status: e.status,
            reason: e.reason.as_deref(),
            at: rfc3339_ms(e.at_ms),
        }
    }
}
