//! Prometheus metrics. One [`Metrics`] per process, registered in its own
//! registry and served at `GET /metrics`. Names follow Prometheus
//! conventions: `orderflow_` prefix, base units, `_total` for counters.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::domain::StatusEvent;

/// Buckets for fast internal operations (fsync, checkpoint, appends).
const IO_BUCKETS_S: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];
/// Buckets for order stage latencies (includes payment round trips).
const STAGE_BUCKETS_S: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    pub registry: Registry,
    /// Status transitions by status and reason (from `order-status`).
    pub orders: IntCounterVec,
    /// Time between consecutive statuses of an order, by the stage entered.
    pub stage_latency: HistogramVec,
    pub log_append_latency: HistogramVec,
    pub log_fsync_latency: HistogramVec,
    pub log_batch_records: HistogramVec,
    pub checkpoint_latency: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub partition_lag: IntGaugeVec,
    pub gateway_calls: IntCounterVec,
    pub gateway_latency: HistogramVec,
    /// Circuit breaker state per gateway: 0 closed, 1 half-open, 2 open.
    pub gateway_breaker_state: IntGaugeVec,
    /// Circuit breaker transitions, by gateway and state entered.
    pub gateway_breaker_transitions: IntCounterVec,
    pub http_requests: IntCounterVec,
    /// Settled notifications by target and outcome (`delivered`,
    /// `abandoned`, `interrupted`, `no_contact`).
    pub notification_deliveries: IntCounterVec,
    pub notification_retries: IntCounterVec,
    /// Time from a delivery's start (waiting for a slot included) to settled.
    pub notification_latency: HistogramVec,
    /// Emails per SMTP batch (one connection each).
    pub email_batch_size: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        Metrics {
            orders: counter(
                "orderflow_orders_total",
                "Order status transitions, by status and reason.",
                &["status", "reason"],
            ),
            stage_latency: hist(
                "orderflow_stage_latency_seconds",
                "Time from an order's previous status to this one, by status entered.",
                &["stage"],
                STAGE_BUCKETS_S,
            ),
            log_append_latency: hist(
                "orderflow_log_append_seconds",
                "Time from append request to durable acknowledgement.",
                &["topic"],
                IO_BUCKETS_S,
            ),
            log_fsync_latency: hist(
                "orderflow_log_fsync_seconds",
                "Duration of one log fsync.",
                &["topic"],
                IO_BUCKETS_S,
            ),
            log_batch_records: hist(
                "orderflow_log_group_commit_records",
                "Records made durable by one fsync (group commit size).",
                &["topic"],
                &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0],
            ),
            checkpoint_latency: hist(
                "orderflow_checkpoint_seconds",
                "Duration of one partition checkpoint write.",
                &["partition"],
                IO_BUCKETS_S,
            ),
            queue_depth: gauge(
                "orderflow_queue_depth",
                "Items waiting in a bounded queue.",
                &["queue"],
            ),
            partition_lag: gauge(
                "orderflow_partition_lag_records",
                "Records in the log not yet processed, per topic partition.",
                &["topic", "partition"],
            ),
            gateway_calls: counter(
                "orderflow_gateway_calls_total",
                "Payment gateway calls, by operation and outcome.",
                &["op", "outcome"],
            ),
            gateway_latency: hist(
                "orderflow_gateway_call_seconds",
                "Payment gateway call latency.",
                &["op"],
                STAGE_BUCKETS_S,
            ),
            gateway_breaker_state: gauge(
                "orderflow_gateway_breaker_state",
                "Payment gateway circuit breaker state: 0 closed, 1 half-open, 2 open.",
                &["gateway"],
            ),
            gateway_breaker_transitions: counter(
                "orderflow_gateway_breaker_transitions_total",
                "Payment gateway circuit breaker transitions, by state entered.",
                &["gateway", "to"],
            ),
            http_requests: counter(
                "orderflow_http_requests_total",
                "HTTP requests, by route and status code.",
                &["route", "code"],
            ),
            notification_deliveries: counter(
                "orderflow_notification_deliveries_total",
                "Notification deliveries settled, by endpoint and outcome.",
                &["endpoint", "outcome"],
            ),
            notification_retries: counter(
                "orderflow_notification_retries_total",
                "Notification attempts that failed and were retried, by endpoint.",
                &["endpoint"],
            ),
            notification_latency: hist(
                "orderflow_notification_delivery_seconds",
                "Time from a notification's start to delivered or given up, by endpoint.",
                &["endpoint"],
                STAGE_BUCKETS_S,
            ),
            email_batch_size: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "orderflow_notification_email_batch_size",
                        "Emails sent per SMTP batch (one connection each).",
                    )
                    .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0]),
                )
                .expect("valid histogram");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            registry,
        }
    }

    /// Counts a status transition applied to the read model; `prev_at_ms`
    /// is the time of the order's previous status, if known.
    pub fn observe_status(&self, event: &StatusEvent, prev_at_ms: Option<u64>) {
        self.orders
            .with_label_values(&[event.status.as_str(), event.reason.as_deref().unwrap_or("")])
            .inc();
        if let Some(prev) = prev_at_ms {
            let secs = event.at_ms.saturating_sub(prev) as f64 / 1000.0;
            self.stage_latency
                .with_label_values(&[event.status.as_str()])
                .observe(secs);
        }
    }

    /// The text exposition format served at `/metrics`.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
