//! `GET /v1/orders/{id}/events`: Server-Sent Events of an order's status
//! changes. Subscribes first, then sends the history so far, then live
//! events, in `seq` order without repeats; ends after a terminal status
//! (or when the instance shuts down). Each event is `event: status`,
//! `id: <seq>`, `data: {"order_id","seq","status","reason","at"}`.
//!
//! The live events and the read model come from the same consumer (the
//! read model applies a batch, then hands its new events to subscribers),
//! so the model is never behind a live event. A subscriber that lags (its
//! buffer overflowed) re-reads the model; a live event past a gap in `seq`
//! waits while the model is re-read to fill it (at most `GAP_WAIT`, then the
//! stream goes on rather than stall), and a stream with nothing to send
//! re-reads the model every `RESYNC_POLLS` polls.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::broadcast::error::RecvError;

use super::Ctx;
use super::auth::TokenQuery;
use super::problem::Problem;
use super::routes::authorize_request;
use super::views::EventView;
use crate::domain::StatusEvent;
use crate::sinks::tracking::{Tracking, TrackingView};
use crate::telemetry::Health;

/// How often a waiting stream checks whether the instance is shutting down.
const SHUTDOWN_POLL: Duration = Duration::from_millis(250);
/// Keep-alive comment interval.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Polls with nothing to send before a stream re-reads the read model.
const RESYNC_POLLS: u32 = 4;
/// Longest a live event waits for the read model to fill a gap before it.
const GAP_WAIT: Duration = Duration::from_secs(5);

/// Follow an order live.
///
/// `GET /v1/orders/{id}/events`: Server-Sent Events, the history first.
#[utoipa::path(
    get,
    path = "/v1/orders/{id}/events",
    tag = "orders",
    params(("id" = String, Path, description = "The order id.")),
    security(("bearer" = []), ("tracking_token" = [])),
    responses(
        (status = 200, description = "Server-Sent Events: `event: status`, `id: <seq>`, data an `EventView`; the history first, then live, ending after a terminal status.", content_type = "text/event-stream", body = EventView),
        (status = 503, description = "`too_many_streams`: `http.max_sse_streams` are open."),
    ),
)]
pub(crate) async fn order_events(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let state = &ctx.app;
    let (id, access) = authorize_request(state, path, query, &headers).await?;
    let permit = ctx
        .sse_permits
        .clone()
        .try_acquire_owned()
        .map_err(|_| Problem::too_many_streams(state.config.retry_after_s))?;
    // Subscribe before reading the view, so no event falls in between.
    let rx = state.tracking.subscribe(&id);
    let view = state.tracking.get(&id);
    if view.is_none() && matches!(access, super::routes::Access::Credential) {
        return Err(Problem::order_not_found());
    }
    let mut stream = EventStream {
        order_id: id,
        tracking: state.tracking.clone(),
        health: state.health.clone(),
        rx,
        closed: false,
        pending: BTreeMap::new(),
        last_seq: 0,
        gap_since: None,
        done: false,
        idle_polls: 0,
        _permit: permit,
    };
    if let Some(v) = view {
        stream.queue_view(&v);
    }
    Ok(Sse::new(stream.into_stream())
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

struct EventStream {
    order_id: String,
    tracking: Arc<Tracking>,
    health: Arc<Health>,
    rx: crate::sinks::tracking::Subscription,
    /// The live channel is gone: poll the read model instead.
    closed: bool,
    /// Events not sent yet, by `seq`.
    pending: BTreeMap<u32, StatusEvent>,
    last_seq: u32,
    /// Since when the next pending event waits behind a gap in `seq`.
    gap_since: Option<Instant>,
    done: bool,
    /// Shutdown polls since the last event or re-read (`RESYNC_POLLS`).
    idle_polls: u32,
    /// Held while the stream lives (`max_sse_streams`).
    _permit: OwnedSemaphorePermit,
}

impl EventStream {
    /// Queues the view's history (the reason belongs to its last entry).
    fn queue_view(&mut self, v: &TrackingView) {
        let last = v.history.last().map(|h| h.seq);
        for h in &v.history {
            let reason = if Some(h.seq) == last {
                v.reason.clone()
            } else {
                None
            };
            self.queue(StatusEvent {
                order_id: v.order_id.clone(),
                seq: h.seq,
                status: h.status,
                reason,
                at_ms: h.at_ms,
                refused_skus: Vec::new(),
                released_lines: 0,
                src: None,
                email: None,
            });
        }
    }

    /// Keeps `ev` for sending unless it was sent already.
    fn queue(&mut self, ev: StatusEvent) {
        if ev.seq > self.last_seq {
            self.pending.entry(ev.seq).or_insert(ev);
        }
    }

    async fn resync(&mut self) {
        if let Some(v) = self.tracking.get(&self.order_id) {
            self.queue_view(&v);
        }
    }

    /// The next event to send: the one right after the last sent, or the
    /// first after a gap once the gap has waited `GAP_WAIT` to be filled.
    fn next_ready(&mut self) -> Option<StatusEvent> {
        let (&seq, _) = self.pending.first_key_value()?;
        let waited_out = self.gap_since.is_some_and(|t| t.elapsed() >= GAP_WAIT);
        if seq != self.last_seq + 1 && !waited_out {
            self.gap_since.get_or_insert_with(Instant::now);
            return None;
        }
        self.gap_since = None;
        self.pending.pop_first().map(|(_, ev)| ev)
    }

    /// The next event to send, or `None` to end the stream.
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.next_ready() {
                debug_assert!(ev.seq > self.last_seq, "sent in seq order, once");
                self.last_seq = ev.seq;
                self.done = ev.status.is_terminal();
                self.idle_polls = 0;
                let data = serde_json::to_string(&EventView::new(&ev))
                    .expect("an event always serializes");
                return Some(
                    Event::default()
                        .event("status")
                        .id(ev.seq.to_string())
                        .data(data),
                );
            }
            if self.done || !self.health.is_accepting() {
                return None;
            }
            if self.closed {
                tokio::time::sleep(SHUTDOWN_POLL).await;
                self.resync().await;
                continue;
            }
            tokio::select! {
                r = self.rx.recv() => match r {
                    Ok(ev) => self.queue(ev),
                    Err(RecvError::Lagged(_)) => self.resync().await,
                    Err(RecvError::Closed) => {
                        self.closed = true;
                        self.resync().await;
                    }
                },
                _ = tokio::time::sleep(SHUTDOWN_POLL) => {
                    // Behind a gap, re-read at every poll; else now and then.
                    self.idle_polls += 1;
                    if self.gap_since.is_some() || self.idle_polls >= RESYNC_POLLS {
                        self.idle_polls = 0;
                        self.resync().await;
                    }
                }
            }
        }
    }

    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        futures::stream::unfold(self, |mut s| async move {
            s.next_event().await.map(|e| (Ok(e), s))
        })
    }
}
