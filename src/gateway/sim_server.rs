//! `orderflow gateway-sim`: the payment gateway simulator as its own
//! process, speaking the subset of Stripe's HTTP API that orderflow uses,
//! over the same engine as the in-process simulator
//! (`super::simulator::SimEngine`).
//!
//! | route | answers |
//! |---|---|
//! | `POST /v1/payment_intents` | create (and confirm) a PaymentIntent; form body |
//! | `POST /v1/payment_intents/{id}/capture` | capture (`amount_to_capture`) |
//! | `POST /v1/payment_intents/{id}/cancel` | cancel (`cancellation_reason`) |
//! | `GET /v1/payment_intents/search?query=metadata['order_id']:'…'` | an order's intents |
//! | `GET /v1/payment_intents/{id}` | one intent |
//! | `GET /ledger` | the last `--max-calls` calls (op, idempotency key, order id, intent, result, received while down), the intents kept (state, captures), a summary |
//! | `GET`/`POST /admin/outage` | `{"down": true}` (optionally `"for_ms": N`) makes every API call answer 503 until `{"down": false}` |
//! | `GET`/`POST /admin/captures` | `{"refuse": true}` makes every capture answer 400 `payment_intent_unexpected_state` (a refusal for good, remembered under no idempotency key) until `{"refuse": false}` |
//! | `GET`/`POST /admin/auth` | `{"refuse": 401}` (or `403`) makes every API call answer that status, as Stripe does for a revoked key (401) or a key without the permission (403), until `{"refuse": null}` |
//! | `GET /healthz` | `ok` |
//!
//! `/v1` routes need `Authorization: Bearer sk_test_…` (any test-mode
//! key; 401 otherwise). The key is checked for its shape only and never
//! logged or stored; calls refused for it are in the ledger
//! (`auth_refused`). `Idempotency-Key` is honoured as Stripe documents; a
//! replayed answer carries `Idempotent-Replayed: true`, and every answer
//! echoes the key. Failures answer `Stripe-Should-Retry`. Every `/v1`
//! answer names the API version it was made with in `Stripe-Version`, as
//! Stripe's do: the request's `Stripe-Version`, else
//! [`DEFAULT_STRIPE_VERSION`] (an account's default). The ledger and
//! admin routes need no key: the simulator is a test tool and listens on
//! the address it is given (use loopback).
//!
//! It serves several orderflow instances through long tests, so what it
//! keeps is bounded (the engine's module doc, `super::simulator`, has the
//! details), each bound a flag refusing 0:
//!
//! | flag | default | when reached |
//! |---|---|---|
//! | `--max-intents` | 1 000 000 | a create forgets the settled intent (captured, canceled, declined) created first; when all kept intents are uncaptured authorizations it answers 429 `rate_limit` and creates nothing |
//! | `--intent-retention-ms` | 24 h | a settled intent is forgotten (then 404 `resource_missing`, not found by search) |
//! | `--authorization-ttl-ms` | 7 days | an uncaptured authorization is canceled with `cancellation_reason = "automatic"`, as Stripe does |
//! | `--max-keys` | 2 000 000 | the oldest idempotency key is forgotten |
//! | `--key-ttl-ms` | 24 h | an idempotency key is forgotten (Stripe keeps them 24 h); reusing it executes anew |
//! | `--max-calls` | 100 000 | the ledger keeps the last calls only; the summary's counters stay totals |
//!
//! The `/ledger` summary shows what is kept (`intents_kept`, `keys_kept`,
//! `calls_kept`) and counts what was forgotten (`intents_evicted`,
//! `intents_expired`, `authorizations_expired`, `keys_evicted`,
//! `keys_expired`) and refused (`rate_limited`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::simulator::{Reply, SimEngine, SimOptions};

/// gateway-sim's default of `--max-intents`: ten times the in-process
/// one, as it serves several instances.
pub const DEFAULT_MAX_INTENTS: usize = 1_000_000;
/// gateway-sim's default of `--max-keys`.
pub const DEFAULT_MAX_KEYS: usize = 2_000_000;
/// The API version of an answer to a request without `Stripe-Version`: an
/// old one, as an account's default often is, so a client that does not
/// pin its version can tell.
pub const DEFAULT_STRIPE_VERSION: &str = "2020-08-27";
use super::stripe::{ApiError, ErrorBody, Failure, PaymentIntent};

#[derive(Clone)]
struct Ctx {
    engine: Arc<SimEngine>,
    requests: Arc<AtomicU64>,
    /// Bumped by every outage switch, so a timed outage ends only itself.
    outage_gen: Arc<AtomicU64>,
    /// 401 or 403 while `/admin/auth` refuses every key; 0 otherwise.
    refuse_auth: Arc<AtomicU16>,
    /// While `/admin/captures` refuses every capture.
    refuse_captures: Arc<AtomicBool>,
}

/// The router over `engine`.
pub fn router(engine: Arc<SimEngine>) -> Router {
    let ctx = Ctx {
        engine,
        requests: Arc::new(AtomicU64::new(0)),
        outage_gen: Arc::new(AtomicU64::new(0)),
        refuse_auth: Arc::new(AtomicU16::new(0)),
        refuse_captures: Arc::new(AtomicBool::new(false)),
    };
    let api = Router::new()
        .route("/v1/payment_intents", post(create))
        .route("/v1/payment_intents/search", get(search))
        .route("/v1/payment_intents/{id}", get(retrieve))
        .route("/v1/payment_intents/{id}/capture", post(capture))
        .route("/v1/payment_intents/{id}/cancel", post(cancel))
        .route_layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            require_test_key,
        ));
    Router::new()
        .merge(api)
        .route("/ledger", get(ledger))
        .route("/admin/outage", get(outage_get).post(outage_set))
        .route("/admin/auth", get(auth_get).post(auth_set))
        .route("/admin/captures", get(captures_get).post(captures_set))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async {
            stripe_error(
                StatusCode::NOT_FOUND,
                ApiError {
                    kind: "invalid_request_error".into(),
                    message: Some("Unrecognized request URL.".into()),
                    ..ApiError::default()
                },
            )
        })
        .with_state(ctx)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<SimEngine>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(engine))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `orderflow gateway-sim`: binds `listen`, prints
/// `gateway-sim listening addr=IP:PORT` on stdout, serves an engine with
/// `options` (calls recorded) until SIGTERM or Ctrl-C.
pub async fn run(listen: SocketAddr, options: SimOptions) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let engine = Arc::new(SimEngine::new(SimOptions {
        record_calls: true,
        ..options
    }));
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "gateway-sim listening addr={addr}")?;
        out.flush()?;
    }
    let o = engine.options();
    tracing::info!(
        %addr,
        latency_ms = o.latency.as_millis() as u64,
        failure_rate = o.failure_rate,
        max_intents = o.max_intents,
        intent_retention_ms = o.intent_retention_ms,
        authorization_ttl_ms = o.authorization_ttl_ms,
        max_keys = o.max_keys,
        key_ttl_ms = o.key_ttl_ms,
        max_calls = o.max_calls,
        "gateway-sim listening"
    );
    serve(listener, engine, async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    })
    .await?;
    Ok(())
}

/// The ledger's `op` of an API call.
fn op_of(method: &axum::http::Method, path: &str) -> &'static str {
    if method == axum::http::Method::GET {
        return if path.ends_with("/search") {
            "search"
        } else {
            "retrieve"
        };
    }
    if path.ends_with("/capture") {
        "capture"
    } else if path.ends_with("/cancel") {
        "cancel"
    } else {
        "create"
    }
}

/// Checks the key (its shape, and the `/admin/auth` switch) and stamps
/// the answer with the API version it was made with.
async fn require_test_key(
    State(ctx): State<Ctx>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let well_formed = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| {
            (key.starts_with("sk_test_") || key.starts_with("rk_test_"))
                && key.len() > 8
                && key.bytes().all(|b| b.is_ascii_graphic())
        });
    let version = req
        .headers()
        .get("stripe-version")
        .cloned()
        .unwrap_or(HeaderValue::from_static(DEFAULT_STRIPE_VERSION));
    // Stripe quotes a masked key in these; this simulator quotes none of it.
    let refusal = match (well_formed, ctx.refuse_auth.load(Ordering::SeqCst)) {
        (false, _) | (true, 401) => Some((
            StatusCode::UNAUTHORIZED,
            "Invalid API Key provided: send `Authorization: Bearer sk_test_…`",
        )),
        (true, 403) => Some((
            StatusCode::FORBIDDEN,
            "The provided key does not have the required permissions for this endpoint.",
        )),
        _ => None,
    };
    let mut res = match refusal {
        None => next.run(req).await,
        Some((status, message)) => {
            let op = op_of(req.method(), req.uri().path());
            let key = idempotency_key(req.headers());
            ctx.engine
                .record_auth_refusal(op, key.as_deref(), status.as_u16());
            stripe_error(
                status,
                ApiError {
                    kind: "invalid_request_error".into(),
                    message: Some(message.into()),
                    ..ApiError::default()
                },
            )
        }
    };
    res.headers_mut().insert("stripe-version", version);
    res
}

fn stripe_error(status: StatusCode, error: ApiError) -> Response {
    (status, axum::Json(ErrorBody { error })).into_response()
}

fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
}

fn parse_form(body: &Bytes) -> Result<Vec<(String, String)>, Box<Response>> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).map_err(|_| {
        Box::new(stripe_error(
            StatusCode::BAD_REQUEST,
            ApiError {
                kind: "invalid_request_error".into(),
                message: Some("the body must be application/x-www-form-urlencoded".into()),
                ..ApiError::default()
            },
        ))
    })
}

fn answer(ctx: &Ctx, key: Option<&str>, reply: Reply) -> Response {
    let n = ctx.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let mut res = match reply.answer {
        Ok(pi) => (StatusCode::OK, axum::Json(pi)).into_response(),
        Err(Failure::Api {
            status,
            error,
            should_retry,
        }) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut res = stripe_error(code, *error);
            if let Some(retry) = should_retry {
                res.headers_mut().insert(
                    "stripe-should-retry",
                    HeaderValue::from_static(if retry { "true" } else { "false" }),
                );
            }
            res
        }
        Err(Failure::Transport(m)) => stripe_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            ApiError {
                kind: "api_error".into(),
                message: Some(m),
                ..ApiError::default()
            },
        ),
    };
    let headers = res.headers_mut();
    if let Some(key) = key.and_then(|k| HeaderValue::from_str(k).ok()) {
        headers.insert("idempotency-key", key);
    }
    if reply.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if let Ok(v) = HeaderValue::from_str(&format!("req_sim{n:012}")) {
        headers.insert("request-id", v);
    }
    res
}

async fn create(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    let params = match parse_form(&body) {
        Ok(p) => p,
        Err(res) => return *res,
    };
    let key = idempotency_key(&headers);
    let reply = ctx.engine.create(&params, key.as_deref()).await;
    tracing::debug!(
        op = "create",
        key = key.as_deref().unwrap_or(""),
        ok = reply.answer.is_ok(),
        replayed = reply.replayed,
        "gateway-sim call"
    );
    answer(&ctx, key.as_deref(), reply)
}

async fn capture(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = match parse_form(&body) {
        Ok(p) => p,
        Err(res) => return *res,
    };
    if ctx.refuse_captures.load(Ordering::SeqCst) {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            ApiError {
                kind: "invalid_request_error".into(),
                code: Some("payment_intent_unexpected_state".into()),
                message: Some("captures are refused (gateway-sim /admin/captures)".into()),
                ..ApiError::default()
            },
        );
    }
    let key = idempotency_key(&headers);
    let reply = ctx.engine.capture(&id, &params, key.as_deref()).await;
    tracing::debug!(op = "capture", payment_intent = %id, key = key.as_deref().unwrap_or(""), ok = reply.answer.is_ok(), replayed = reply.replayed, "gateway-sim call");
    answer(&ctx, key.as_deref(), reply)
}

async fn cancel(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = match parse_form(&body) {
        Ok(p) => p,
        Err(res) => return *res,
    };
    let key = idempotency_key(&headers);
    let reply = ctx.engine.cancel(&id, &params, key.as_deref()).await;
    tracing::debug!(op = "cancel", payment_intent = %id, key = key.as_deref().unwrap_or(""), ok = reply.answer.is_ok(), replayed = reply.replayed, "gateway-sim call");
    answer(&ctx, key.as_deref(), reply)
}

async fn search(State(ctx): State<Ctx>, Query(q): Query<HashMap<String, String>>) -> Response {
    let query = q.get("query").map(String::as_str).unwrap_or("");
    let reply = match ctx.engine.search(query).await {
        Ok(data) => {
            return axum::Json(serde_json::json!({
                "object": "search_result",
                "url": "/v1/payment_intents/search",
                "has_more": false,
                "next_page": null,
                "data": data,
            }))
            .into_response();
        }
        Err(f) => Reply {
            answer: Err(f),
            replayed: false,
        },
    };
    answer(&ctx, None, reply)
}

async fn retrieve(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    match ctx.engine.retrieve(&id) {
        Some(pi) => axum::Json::<PaymentIntent>(pi).into_response(),
        None => stripe_error(
            StatusCode::NOT_FOUND,
            ApiError {
                kind: "invalid_request_error".into(),
                code: Some("resource_missing".into()),
                message: Some(format!("No such payment_intent: '{id}'")),
                param: Some("intent".into()),
                ..ApiError::default()
            },
        ),
    }
}

async fn ledger(State(ctx): State<Ctx>) -> Response {
    axum::Json(ctx.engine.ledger()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutageBody {
    down: bool,
    /// End the outage by itself after this long.
    for_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthBody {
    /// 401 or 403: refuse every key with it; `null`: accept test keys.
    refuse: Option<u16>,
}

async fn auth_get(State(ctx): State<Ctx>) -> Response {
    let refuse = match ctx.refuse_auth.load(Ordering::SeqCst) {
        0 => None,
        status => Some(status),
    };
    axum::Json(serde_json::json!({ "refuse": refuse })).into_response()
}

async fn auth_set(State(ctx): State<Ctx>, body: Bytes) -> Response {
    let refuse = match serde_json::from_slice::<AuthBody>(&body) {
        Ok(AuthBody { refuse: None }) => 0,
        Ok(AuthBody {
            refuse: Some(status @ (401 | 403)),
        }) => status,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": "expected {\"refuse\": 401|403|null}"})),
            )
                .into_response();
        }
    };
    ctx.refuse_auth.store(refuse, Ordering::SeqCst);
    tracing::info!(refuse, "gateway-sim credentials switch");
    auth_get(State(ctx)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapturesBody {
    refuse: bool,
}

async fn captures_get(State(ctx): State<Ctx>) -> Response {
    let refuse = ctx.refuse_captures.load(Ordering::SeqCst);
    axum::Json(serde_json::json!({ "refuse": refuse })).into_response()
}

async fn captures_set(State(ctx): State<Ctx>, body: Bytes) -> Response {
    let Ok(CapturesBody { refuse }) = serde_json::from_slice(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": "expected {\"refuse\": true|false}"})),
        )
            .into_response();
    };
    ctx.refuse_captures.store(refuse, Ordering::SeqCst);
    tracing::info!(refuse, "gateway-sim captures switch");
    captures_get(State(ctx)).await
}

async fn outage_get(State(ctx): State<Ctx>) -> Response {
    axum::Json(serde_json::json!({"down": ctx.engine.is_down()})).into_response()
}

async fn outage_set(State(ctx): State<Ctx>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<OutageBody>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(
                serde_json::json!({"error": "expected {\"down\": true|false, \"for_ms\"?: N}"}),
            ),
        )
            .into_response();
    };
    let generation = ctx.outage_gen.fetch_add(1, Ordering::SeqCst) + 1;
    ctx.engine.set_down(req.down);
    tracing::info!(
        down = req.down,
        for_ms = req.for_ms,
        "gateway-sim outage switch"
    );
    if let (true, Some(ms)) = (req.down, req.for_ms) {
        let (engine, gen_now) = (ctx.engine.clone(), ctx.outage_gen.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if gen_now.load(Ordering::SeqCst) == generation {
                engine.set_down(false);
                tracing::info!("gateway-sim outage over");
            }
        });
    }
    axum::Json(serde_json::json!({"down": req.down})).into_response()
}
