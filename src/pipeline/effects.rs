//! The effect executor: runs the processor's effects (payment calls)
//! outside the state machine and appends their results to the log, where
//! the processor applies them in order. A partition never waits for a
//! payment: it goes on with other orders while calls are in flight.
//!
//! Effects are at-least-once (they are re-run after a crash from the
//! processor's outbox); the gateway's idempotency keys make that safe.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::config::GatewayConfig;
use crate::domain::{Effect, EffectKind, Envelope, Message, PaymentOutcome, RecordKind};
use crate::gateway::{AuthorizeOutcome, AuthorizeRequest, GatewayError, PaymentGateway};
use crate::pipeline::log::{Log, LogError, Record, Topic, append_keyed};
use crate::sinks::metrics::Metrics;

/// Effects queued for the executor before runners wait (back-pressure).
pub const EFFECT_QUEUE_DEPTH: usize = 65_536;
/// Longest back-off between two attempts.
const MAX_BACKOFF_MS: u64 = 5_000;
/// Reason of `payment_failed` when every attempt failed.
pub const REASON_GATEWAY_UNAVAILABLE: &str = "gateway_unavailable";

#[derive(Clone)]
pub struct EffectSender {
    tx: mpsc::Sender<Effect>,
    depth: prometheus::IntGauge,
}

impl EffectSender {
    /// Queues an effect, waiting while the queue is full.
    pub async fn submit(&self, effect: Effect) -> Result<(), Effect> {
        let result = self.tx.send(effect).await.map_err(|e| e.0);
        self.depth
            .set((self.tx.max_capacity() - self.tx.capacity()) as i64);
        result
    }
}

struct Executor {
    log: Arc<dyn Log>,
    gateway: Arc<dyn PaymentGateway>,
    metrics: Arc<Metrics>,
    config: GatewayConfig,
}

/// Starts the executor; it stops when every `EffectSender` is dropped and
/// the calls in flight are done.
pub fn spawn(
    log: Arc<dyn Log>,
    gateway: Arc<dyn PaymentGateway>,
    metrics: Arc<Metrics>,
    config: GatewayConfig,
) -> (EffectSender, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Effect>(EFFECT_QUEUE_DEPTH);
    let inflight = Arc::new(Semaphore::new(config.max_inflight));
    let exec = Arc::new(Executor {
        log,
        gateway,
        metrics,
        config,
    });
    let depth = exec.metrics.queue_depth.with_label_values(&["effects"]);
    let handle = tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        while let Some(effect) = rx.recv().await {
            let permit = inflight
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let exec = exec.clone();
            tasks.spawn(async move {
                exec.run(effect).await;
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    });
    (EffectSender { tx, depth }, handle)
}

impl Executor {
    async fn run(&self, effect: Effect) {
        let body = match effect.kind {
            EffectKind::Authorize => {
                let outcome = self.authorize(&effect).await;
                Some(Message::PaymentResult {
                    order_id: effect.order_id.clone(),
                    outcome,
                })
            }
            EffectKind::Capture | EffectKind::Void => {
                self.settle(&effect).await.then(|| Message::EffectDone {
                    order_id: effect.order_id.clone(),
                    kind: effect.kind,
                })
            }
        };
        if let Some(body) = body {
            self.report(&effect.reply_key, body).await;
        }
    }

    async fn authorize(&self, effect: &Effect) -> PaymentOutcome {
        let req = AuthorizeRequest {
            order_id: effect.order_id.clone(),
            amount: effect.amount,
            currency: effect.currency.clone(),
            token: effect.token.clone(),
            idempotency_key: effect.idempotency_key(),
        };
        match self
            .retrying("authorize", || self.gateway.authorize(&req))
            .await
        {
            Ok(AuthorizeOutcome::Authorized { payment_id }) => {
                PaymentOutcome::Authorized { payment_id }
            }
            Ok(AuthorizeOutcome::Declined { code }) => PaymentOutcome::Declined { code },
            Err(e) => {
                tracing::warn!(order_id = %effect.order_id, error = %e, "authorization failed after retries");
                PaymentOutcome::Failed {
                    reason: REASON_GATEWAY_UNAVAILABLE.to_owned(),
                }
            }
        }
    }

    /// Capture or void; true once done (or refused for good, which is
    /// logged: retrying cannot help and the outbox must not grow forever).
    async fn settle(&self, effect: &Effect) -> bool {
        let key = effect.idempotency_key();
        let result = match effect.kind {
            EffectKind::Capture => {
                self.retrying("capture", || {
                    self.gateway
                        .capture(&effect.payment_id, effect.amount, &key)
                })
                .await
            }
            _ => {
                self.retrying("void", || {
                    self.gateway
                        .void(&effect.order_id, &effect.payment_id, &key)
                })
                .await
            }
        };
        match result {
            Ok(()) => true,
            Err(GatewayError::Refused(reason)) => {
                tracing::error!(order_id = %effect.order_id, op = effect.kind.as_str(), %reason, "gateway refused; giving up");
                true
            }
            Err(e) => {
                // Left in the outbox: retried at the next start.
                tracing::error!(order_id = %effect.order_id, op = effect.kind.as_str(), error = %e, "gateway unavailable; will retry after restart");
                false
            }
        }
    }

    /// Calls `f` up to `max_attempts` times with exponential back-off and
    /// jitter, retrying only retryable errors.
    async fn retrying<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T, GatewayError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, GatewayError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let result = f().await;
            self.metrics
                .gateway_latency
                .with_label_values(&[op])
                .observe(started.elapsed().as_secs_f64());
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) if e.is_retryable() => "unavailable",
                Err(_) => "refused",
            };
            self.metrics
                .gateway_calls
                .with_label_values(&[op, outcome])
                .inc();
            match result {
                Err(e) if e.is_retryable() && attempt < self.config.max_attempts => {
                    let base = self
                        .config
                        .retry_base_ms
                        .saturating_mul(1 << (attempt - 1).min(16))
                        .min(MAX_BACKOFF_MS);
                    let jitter = rand::rng().random_range(0..=base / 2);
                    tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
                }
                other => return other,
            }
        }
    }

    /// Appends a result to the home partition, retrying while the log is
    /// only busy. If the log is down the effect stays in the outbox.
    async fn report(&self, reply_key: &str, body: Message) {
        let value = Envelope::new(None, body).encode();
        let mut delay_ms = 1;
        loop {
            let record = Record {
                kind: RecordKind::Internal,
                key: reply_key.as_bytes().to_vec(),
                value: value.clone(),
            };
            match append_keyed(self.log.as_ref(), Topic::Orders, record).await {
                Ok(_) => return,
                Err(LogError::Full { .. }) => {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    delay_ms = (delay_ms * 2).min(MAX_BACKOFF_MS);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot log an effect result; it is re-run after restart");
                    return;
                }
            }
        }
    }
}
