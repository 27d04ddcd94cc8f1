//! `GET /v1/orders/{id}/events`: Server-Sent Events of an order's status
//! changes. Subscribes first, then sends the history so far, then live
//! events, deduplicated by `seq`; ends after a terminal status (or when
//! the instance shuts down). Each event is `event: status`, `id: <seq>`,
//! `data: {"order_id","seq","status","reason","at"}`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::broadcast::error::RecvError;

use super::Ctx;
use super::Health;
use super::auth::TokenQuery;
use super::problem::Problem;
use super::routes::authorize_request;
use super::views::EventView;
use crate::domain::StatusEvent;
use crate::pipeline::store::TrackingView;
use crate::sinks::tracking::Tracking;

/// How often a waiting stream checks whether the instance is shutting down.
const SHUTDOWN_POLL: Duration = Duration::from_millis(250);
/// Keep-alive comment interval.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How often a live stream re-reads the read model. In distributed mode
/// the live feed and the read model are fed by different consumers, so an
/// event can pass this instance's feed before the subscription exists
/// while the read model does not hold it yet; the re-read closes that gap.
const RESYNC_POLLS: u32 = 4;

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
    let view = state.tracking.get(&id).await.map_err(|e| {
        tracing::warn!(error = %e, "tracking read failed");
        Problem::unavailable(state.config.retry_after_s)
    })?;
    if view.is_none() && matches!(access, super::routes::Access::Admin) {
        let known = state
            .intake
            .exists(&id)
            .await
            .map_err(|_| Problem::unavailable(state.config.retry_after_s))?;
        if !known {
            return Err(Problem::order_not_found());
        }
    }
    let mut stream = EventStream {
        order_id: id,
        tracking: state.tracking.clone(),
        health: state.health.clone(),
        rx,
        closed: false,
        backlog: VecDeque::new(),
        last_seq: 0,
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
    backlog: VecDeque<StatusEvent>,
    last_seq: u32,
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
            self.backlog.push_back(StatusEvent {
                order_id: v.order_id.clone(),
                seq: h.seq,
                status: h.status,
                reason,
                at_ms: h.at_ms,
                refused_skus: Vec::new(),
                released_lines: 0,
            });
        }
    }

    async fn resync(&mut self) {
        if let Ok(Some(v)) = self.tracking.get(&self.order_id).await {
            self.queue_view(&v);
        }
    }

    /// The next event to send, or `None` to end the stream.
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            while let Some(ev) = self.backlog.pop_front() {
                if ev.seq <= self.last_seq {
                    continue;
                }
                self.last_seq = ev.seq;
                self.done = ev.status.is_terminal();
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
                    Ok(ev) => self.backlog.push_back(ev),
                    Err(RecvError::Lagged(_)) => self.resync().await,
                    Err(RecvError::Closed) => {
                        self.closed = true;
                        self.resync().await;
                    }
                },
                _ = tokio::time::sleep(SHUTDOWN_POLL) => {
                    self.idle_polls += 1;
                    if self.idle_polls >= RESYNC_POLLS {
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
