//! Prometheus metrics. One [`Metrics`] per process, registered in its own
//! registry and served at `GET /metrics`. Names follow Prometheus
//! conventions: `orderflow_` prefix, base units, `_total` for counters.

use std::sync::Mutex;

use prometheus::core::Collector;
use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::domain::{Status, StatusEvent};
use crate::telemetry::saga_health::{InFlight, TopK};

/// Buckets for fast internal operations (fsync, checkpoint, appends).
const IO_BUCKETS_S: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];
/// Buckets for order stage latencies (includes payment round trips).
const STAGE_BUCKETS_S: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets for whole orders, placed → terminal: stage latencies plus the
/// payment deadline (30 s by default) and retries after gateway outages.
const ORDER_BUCKETS_S: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 900.0,
];
/// Default of `metrics.top_out_of_stock_skus`.
pub const DEFAULT_TOP_SKUS: usize = 10;

const ORDERS: Desc = Desc {
    name: "orderflow_orders_total",
    help: "Order status transitions, by status and reason.",
    labels: &["status", "reason"],
    buckets: &[],
};

const STAGE_LATENCY: Desc = Desc {
    name: "orderflow_stage_latency_seconds",
    help: "Time from an order's previous status to this one, by status entered.",
    labels: &["stage"],
    buckets: STAGE_BUCKETS_S,
};

const LOG_APPEND_LATENCY: Desc = Desc {
    name: "orderflow_log_append_seconds",
    help: "Time from append request to durable acknowledgement.",
    labels: &["topic"],
    buckets: IO_BUCKETS_S,
};

const LOG_FSYNC_LATENCY: Desc = Desc {
    name: "orderflow_log_fsync_seconds",
    help: "Duration of one log fsync.",
    labels: &["topic"],
    buckets: IO_BUCKETS_S,
};

const LOG_BATCH_RECORDS: Desc = Desc {
    name: "orderflow_log_group_commit_records",
    help: "Records made durable by one fsync (group commit size).",
    labels: &["topic"],
    buckets: &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0],
};

const CHECKPOINT_LATENCY: Desc = Desc {
    name: "orderflow_checkpoint_seconds",
    help: "Duration of one partition checkpoint write.",
    labels: &["partition"],
    buckets: IO_BUCKETS_S,
};

const CHECKPOINT_BYTES: Desc = Desc {
    name: "orderflow_checkpoint_bytes",
    help: "Bytes written by one partition checkpoint (new blobs and manifest).",
    labels: &["partition"],
    buckets: &[
        1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
    ],
};

const STATE_ENTRIES: Desc = Desc {
    name: "orderflow_state_entries",
    help: "Entries of a bounded structure: finished_orders, orders_in_flight, holds, outbox, skus, parked_bytes (orders partitions), tracking_orders (read model).",
    labels: &["structure", "partition"],
    buckets: &[],
};

const QUEUE_DEPTH: Desc = Desc {
    name: "orderflow_queue_depth",
    help: "Items waiting in a bounded queue.",
    labels: &["queue"],
    buckets: &[],
};

const PARTITION_LAG: Desc = Desc {
    name: "orderflow_partition_lag_records",
    help: "Records in the log not yet read, per topic partition and consumer (runner, read_model, notifications).",
    labels: &["topic", "partition", "consumer"],
    buckets: &[],
};

const GATEWAY_CALLS: Desc = Desc {
    name: "orderflow_gateway_calls_total",
    help: "Payment gateway calls, by operation and outcome.",
    labels: &["op", "outcome"],
    buckets: &[],
};

const GATEWAY_LATENCY: Desc = Desc {
    name: "orderflow_gateway_call_seconds",
    help: "Payment gateway call latency.",
    labels: &["op"],
    buckets: STAGE_BUCKETS_S,
};

const GATEWAY_BREAKER_STATE: Desc = Desc {
    name: "orderflow_gateway_breaker_state",
    help: "Payment gateway circuit breaker state: 0 closed, 1 half-open, 2 open.",
    labels: &["gateway"],
    buckets: &[],
};

const GATEWAY_BREAKER_TRANSITIONS: Desc = Desc {
    name: "orderflow_gateway_breaker_transitions_total",
    help: "Payment gateway circuit breaker transitions, by state entered.",
    labels: &["gateway", "to"],
    buckets: &[],
};

const HTTP_REQUESTS: Desc = Desc {
    name: "orderflow_http_requests_total",
    help: "HTTP requests, by route and status code.",
    labels: &["route", "code"],
    buckets: &[],
};

const NOTIFICATION_DELIVERIES: Desc = Desc {
    name: "orderflow_notification_deliveries_total",
    help: "Notification deliveries settled, by endpoint and outcome.",
    labels: &["endpoint", "outcome"],
    buckets: &[],
};

const NOTIFICATION_RETRIES: Desc = Desc {
    name: "orderflow_notification_retries_total",
    help: "Notification attempts that failed and were retried, by endpoint.",
    labels: &["endpoint"],
    buckets: &[],
};

const NOTIFICATION_LATENCY: Desc = Desc {
    name: "orderflow_notification_delivery_seconds",
    help: "Time from a notification's start to delivered or given up, by endpoint.",
    labels: &["endpoint"],
    buckets: STAGE_BUCKETS_S,
};

const PARTITIONS_OWNED: Desc = Desc {
    name: "orderflow_partitions_owned",
    help: "Partitions this instance owns, by topic.",
    labels: &["topic"],
    buckets: &[],
};

const REBALANCES: Desc = Desc {
    name: "orderflow_rebalances_total",
    help: "Consumer-group rebalances seen, by event (assigned, revoked) and topic of the group.",
    labels: &["event", "topic"],
    buckets: &[],
};

const PARTITION_REPLAYED_RECORDS: Desc = Desc {
    name: "orderflow_partition_replayed_records_total",
    help: "Records replayed after a checkpoint was loaded, per partition.",
    labels: &["partition"],
    buckets: &[],
};

const CHECKPOINT_FENCED: Desc = Desc {
    name: "orderflow_checkpoint_fenced_total",
    help: "Checkpoint writes refused because a newer owner claimed the partition.",
    labels: &["partition"],
    buckets: &[],
};

const TASK_RESTARTS: Desc = Desc {
    name: "orderflow_task_restarts_total",
    help: "Partition tasks restarted after they died (panicked), by task and partition.",
    labels: &["task", "partition"],
    buckets: &[],
};

const TASK_OUTAGES: Desc = Desc {
    name: "orderflow_task_outages_total",
    help: "Partition tasks started again after the log or state store stayed unavailable past a call's own retries, by task and partition.",
    labels: &["task", "partition"],
    buckets: &[],
};

const TASK_DOWN: Desc = Desc {
    name: "orderflow_task_down",
    help: "1 for a partition task given up on because it kept dying, by task and partition.",
    labels: &["task", "partition"],
    buckets: &[],
};

const PARKED_RECORDS: Desc = Desc {
    name: "orderflow_parked_records",
    help: "Records in a partition's park lane.",
    labels: &["partition"],
    buckets: &[],
};

const EFFECTS_FAILED: Desc = Desc {
    name: "orderflow_effects_failed",
    help: "Captures and voids the gateway refused for good, waiting in a partition's outbox for an operator (orderflow parked).",
    labels: &["partition"],
    buckets: &[],
};

const STORE_LATENCY: Desc = Desc {
    name: "orderflow_store_request_seconds",
    help: "State store request latency, by operation.",
    labels: &["op"],
    buckets: IO_BUCKETS_S,
};

const STORE_ERRORS: Desc = Desc {
    name: "orderflow_store_errors_total",
    help: "State store requests that failed, by operation and error kind.",
    labels: &["op", "kind"],
    buckets: &[],
};

const INTAKE_SHED: Desc = Desc {
    name: "orderflow_intake_shed_total",
    help: "New orders refused by intake before the log, by the limit that refused them.",
    labels: &["reason"],
    buckets: &[],
};

const OUT_OF_STOCK_TOP_SKUS: Desc = Desc {
    name: "orderflow_out_of_stock_top_skus",
    help: "Out-of-stock orders per SKU (space-saving estimate, an upper bound), for the top-k SKUs only.",
    labels: &["sku"],
    buckets: &[],
};

const TRACKING_CONFLICTS: Desc = Desc {
    name: "orderflow_tracking_conflicts_total",
    help: "Status events the read model ignored: their order id was first seen from another home partition.",
    labels: &[],
    buckets: &[],
};

const EFFECTS_HELD_FULL: Desc = Desc {
    name: "orderflow_effects_held_full_total",
    help: "Times the effect executor held gateway.max_parked_effects captures and voids (in flight or parked) and took no new effect until one ended.",
    labels: &[],
    buckets: &[],
};

const EMAIL_BATCH_SIZE: Desc = Desc {
    name: "orderflow_notification_email_batch_size",
    help: "Emails sent per SMTP batch (one connection each).",
    labels: &[],
    buckets: &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0],
};

const PARTITION_RESTORE_LATENCY: Desc = Desc {
    name: "orderflow_partition_restore_seconds",
    help: "Time from taking a partition to having loaded its checkpoint and replayed its tail.",
    labels: &[],
    buckets: STAGE_BUCKETS_S,
};

const PARKED_OLDEST_AGE: Desc = Desc {
    name: "orderflow_parked_oldest_age_seconds",
    help: "Age of the oldest record in a partition's park lane (0 when empty).",
    labels: &["partition"],
    buckets: &[],
};

const INTAKE_INFLIGHT: Desc = Desc {
    name: "orderflow_intake_inflight",
    help: "Orders intake is taking now (parse to durable answer).",
    labels: &[],
    buckets: &[],
};

const PROCESS_RESIDENT_BYTES: Desc = Desc {
    name: "orderflow_process_resident_bytes",
    help: "Resident set size of the process, as intake's memory guard last read it (0 without a bound).",
    labels: &[],
    buckets: &[],
};

const ORDER_DURATION: Desc = Desc {
    name: "orderflow_order_duration_seconds",
    help: "Time from an order's acceptance (placed) to its terminal status, by terminal status.",
    labels: &["status"],
    buckets: ORDER_BUCKETS_S,
};

/// The series of `orderflow_order_duration_seconds`, born at 0.
const ORDER_DURATION_SERIES: [&[&str]; 4] = [
    &[Status::Confirmed.as_str()],
    &[Status::OutOfStock.as_str()],
    &[Status::PaymentDeclined.as_str()],
    &[Status::PaymentFailed.as_str()],
];

const SAGAS_IN_FLIGHT: Desc = Desc {
    name: "orderflow_sagas_in_flight",
    help: "Accepted orders not yet terminal, of the order-status partitions this instance consumes.",
    labels: &[],
    buckets: &[],
};

const SAGA_OLDEST_AGE: Desc = Desc {
    name: "orderflow_saga_oldest_age_seconds",
    help: "Age of the oldest accepted order not yet terminal (0 when none).",
    labels: &[],
    buckets: &[],
};

const SAGA_COMPENSATIONS: Desc = Desc {
    name: "orderflow_saga_compensations_total",
    help: "Failed orders undoing work, by terminal status and action (release_stock, void_payment).",
    labels: &["status", "action"],
    buckets: &[],
};

/// Every compensation the processor makes, born at 0.
const COMPENSATION_SERIES: [&[&str]; 4] = [
    &[Status::OutOfStock.as_str(), "release_stock"],
    &[Status::PaymentDeclined.as_str(), "release_stock"],
    &[Status::PaymentFailed.as_str(), "release_stock"],
    &[Status::PaymentFailed.as_str(), "void_payment"],
];

/// A metric's name, help, labels and (histograms) buckets.
struct Desc {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
}

/// Makes metrics from their [`Desc`] and registers them.
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn opts(d: &Desc) -> Opts {
        Opts::new(d.name, d.help)
    }

    fn hist_opts(d: &Desc) -> HistogramOpts {
        HistogramOpts::new(d.name, d.help).buckets(d.buckets.to_vec())
    }

    fn counter(&self, d: &Desc) -> IntCounterVec {
        registered(
            self.0,
            IntCounterVec::new(Self::opts(d), d.labels).expect("valid counter"),
        )
    }

    fn counter1(&self, d: &Desc) -> IntCounter {
        registered(
            self.0,
            IntCounter::with_opts(Self::opts(d)).expect("valid counter"),
        )
    }

    fn gauge(&self, d: &Desc) -> IntGaugeVec {
        registered(
            self.0,
            IntGaugeVec::new(Self::opts(d), d.labels).expect("valid gauge"),
        )
    }

    fn gauge1(&self, d: &Desc) -> IntGauge {
        registered(
            self.0,
            IntGauge::with_opts(Self::opts(d)).expect("valid gauge"),
        )
    }

    fn float_gauge(&self, d: &Desc) -> GaugeVec {
        registered(
            self.0,
            GaugeVec::new(Self::opts(d), d.labels).expect("valid gauge"),
        )
    }

    fn float_gauge1(&self, d: &Desc) -> Gauge {
        registered(
            self.0,
            Gauge::with_opts(Self::opts(d)).expect("valid gauge"),
        )
    }

    fn hist(&self, d: &Desc) -> HistogramVec {
        registered(
            self.0,
            HistogramVec::new(Self::hist_opts(d), d.labels).expect("valid histogram"),
        )
    }

    fn hist1(&self, d: &Desc) -> Histogram {
        registered(
            self.0,
            Histogram::with_opts(Self::hist_opts(d)).expect("valid histogram"),
        )
    }
}

/// Creates `series` at 0: a series first scraped with its first events
/// already in it would hide them from `rate`.
fn born_at_zero<M: MetricVecBuilder>(vec: MetricVec<M>, series: &[&[&str]]) -> MetricVec<M> {
    for labels in series {
        vec.with_label_values(labels);
    }
    vec
}

/// What the saga-health gauges are computed from at each scrape.
struct SagaHealth {
    in_flight: InFlight,
    top_oos: TopK,
    /// SKUs that have a series in the top-k gauge now.
    exported: Vec<String>,
}

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
    /// Bytes one checkpoint writes (blobs and manifest).
    pub checkpoint_bytes: HistogramVec,
    /// Entries of each bounded structure (`orders` partitions' state, the
    /// read model), by structure and partition.
    pub state_entries: IntGaugeVec,
    /// Status events the read model ignored: an order id seen from two
    /// home partitions.
    pub tracking_conflicts: IntCounter,
    /// Times the effect executor stopped taking effects because it held
    /// `gateway.max_parked_effects` captures and voids.
    pub effects_held_full: IntCounter,
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
    /// Partitions this instance owns, by topic (consumer-group assignment).
    pub partitions_owned: IntGaugeVec,
    /// Consumer-group rebalances seen, by event (`assigned`, `revoked`)
    /// and the topic whose group rebalanced.
    pub rebalances: IntCounterVec,
    /// Time from taking a partition to having replayed its tail.
    pub partition_restore_latency: Histogram,
    /// Records replayed after loading a checkpoint (the tail).
    pub partition_replayed_records: IntCounterVec,
    /// Checkpoint writes refused because a newer owner claimed the partition.
    pub checkpoint_fenced: IntCounterVec,
    /// Partition tasks restarted after they died, by task and partition.
    pub task_restarts: IntCounterVec,
    /// Partition tasks started again after an outage of the log or store.
    pub task_outages: IntCounterVec,
    /// 1 for a partition task given up on (it kept dying), by task and partition.
    pub task_down: IntGaugeVec,
    /// Records in a partition's park lane now.
    pub parked_records: IntGaugeVec,
    /// Captures and voids of a partition that failed for good, waiting
    /// for an operator.
    pub effects_failed: IntGaugeVec,
    /// Age of the oldest parked record of a partition (0 when none).
    pub parked_oldest_age: GaugeVec,
    /// State store request latency, by operation.
    pub store_latency: HistogramVec,
    /// State store requests that failed, by operation and error kind.
    pub store_errors: IntCounterVec,
    /// New orders intake refused before the log, by the limit that refused
    /// them (`inflight`, `backlog`, `memory`, `log_full`).
    pub intake_shed: IntCounterVec,
    /// Orders intake is taking now (counted against `intake.max_inflight`).
    pub intake_inflight: IntGauge,
    /// The resident set size intake's memory guard last read.
    pub process_resident_bytes: IntGauge,
    /// Accepted order → terminal status, by terminal status.
    pub order_duration: HistogramVec,
    /// Accepted orders not terminal yet (refreshed at each scrape).
    pub sagas_in_flight: IntGauge,
    /// Age of the oldest of them (refreshed at each scrape).
    pub saga_oldest_age: Gauge,
    /// Failed sagas undoing work, by terminal status and action
    /// (`release_stock`, `void_payment`).
    pub saga_compensations: IntCounterVec,
    /// Estimated out-of-stock orders per SKU, for the top-k SKUs only
    /// (refreshed at each scrape).
    pub out_of_stock_top_skus: IntGaugeVec,
    saga: Mutex<SagaHealth>,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::with_top_skus(DEFAULT_TOP_SKUS)
    }

    /// Metrics whose out-of-stock gauge names the `top_skus` SKUs refusing
    /// most orders (capped at [`crate::telemetry::saga_health::MAX_TOP_SKUS`]).
    pub fn with_top_skus(top_skus: usize) -> Metrics {
        let registry = Registry::new();
        let r = Registrar(&registry);
        Metrics {
            orders: r.counter(&ORDERS),
            stage_latency: r.hist(&STAGE_LATENCY),
            log_append_latency: r.hist(&LOG_APPEND_LATENCY),
            log_fsync_latency: r.hist(&LOG_FSYNC_LATENCY),
            log_batch_records: r.hist(&LOG_BATCH_RECORDS),
            checkpoint_latency: r.hist(&CHECKPOINT_LATENCY),
            checkpoint_bytes: r.hist(&CHECKPOINT_BYTES),
            state_entries: r.gauge(&STATE_ENTRIES),
            tracking_conflicts: r.counter1(&TRACKING_CONFLICTS),
            effects_held_full: r.counter1(&EFFECTS_HELD_FULL),
            queue_depth: r.gauge(&QUEUE_DEPTH),
            partition_lag: r.gauge(&PARTITION_LAG),
            gateway_calls: r.counter(&GATEWAY_CALLS),
            gateway_latency: r.hist(&GATEWAY_LATENCY),
            gateway_breaker_state: r.gauge(&GATEWAY_BREAKER_STATE),
            gateway_breaker_transitions: r.counter(&GATEWAY_BREAKER_TRANSITIONS),
            http_requests: r.counter(&HTTP_REQUESTS),
            notification_deliveries: r.counter(&NOTIFICATION_DELIVERIES),
            notification_retries: r.counter(&NOTIFICATION_RETRIES),
            notification_latency: r.hist(&NOTIFICATION_LATENCY),
            email_batch_size: r.hist1(&EMAIL_BATCH_SIZE),
            partitions_owned: r.gauge(&PARTITIONS_OWNED),
            rebalances: r.counter(&REBALANCES),
            partition_restore_latency: r.hist1(&PARTITION_RESTORE_LATENCY),
            partition_replayed_records: r.counter(&PARTITION_REPLAYED_RECORDS),
            checkpoint_fenced: r.counter(&CHECKPOINT_FENCED),
            task_restarts: r.counter(&TASK_RESTARTS),
            task_outages: r.counter(&TASK_OUTAGES),
            task_down: r.gauge(&TASK_DOWN),
            parked_records: r.gauge(&PARKED_RECORDS),
            effects_failed: r.gauge(&EFFECTS_FAILED),
            parked_oldest_age: r.float_gauge(&PARKED_OLDEST_AGE),
            store_latency: r.hist(&STORE_LATENCY),
            store_errors: r.counter(&STORE_ERRORS),
            intake_shed: r.counter(&INTAKE_SHED),
            intake_inflight: r.gauge1(&INTAKE_INFLIGHT),
            process_resident_bytes: r.gauge1(&PROCESS_RESIDENT_BYTES),
            order_duration: born_at_zero(r.hist(&ORDER_DURATION), &ORDER_DURATION_SERIES),
            sagas_in_flight: r.gauge1(&SAGAS_IN_FLIGHT),
            saga_oldest_age: r.float_gauge1(&SAGA_OLDEST_AGE),
            saga_compensations: born_at_zero(r.counter(&SAGA_COMPENSATIONS), &COMPENSATION_SERIES),
            out_of_stock_top_skus: r.gauge(&OUT_OF_STOCK_TOP_SKUS),
            saga: Mutex::new(SagaHealth {
                in_flight: InFlight::default(),
                top_oos: TopK::new(top_skus),
                exported: Vec::new(),
            }),
            registry,
        }
    }

    /// Counts a status transition that the tracking sink of `order-status`
    /// partition `partition` applied to the read model; `prev_at_ms` and
    /// `placed_at_ms` are the times of the order's previous and first
    /// statuses, if it had any.
    pub fn observe_status(
        &self,
        partition: u32,
        event: &StatusEvent,
        prev_at_ms: Option<u64>,
        placed_at_ms: Option<u64>,
    ) {
        let status = event.status;
        self.orders
            .with_label_values(&[status.as_str(), event.reason.as_deref().unwrap_or("")])
            .inc();
        if let Some(prev) = prev_at_ms {
            self.stage_latency
                .with_label_values(&[status.as_str()])
                .observe(seconds_between(prev, event.at_ms));
        }
        if status.is_terminal()
            && let Some(placed) = placed_at_ms
        {
            self.order_duration
                .with_label_values(&[status.as_str()])
                .observe(seconds_between(placed, event.at_ms));
        }
        if event.released_lines > 0 {
            self.saga_compensations
                .with_label_values(&[status.as_str(), "release_stock"])
                .inc();
        }
        // The processor voids by the authorization key after every
        // `payment_failed`: the gateway may have authorized before failing.
        if status == Status::PaymentFailed {
            self.saga_compensations
                .with_label_values(&[status.as_str(), "void_payment"])
                .inc();
        }
        let mut saga = self.saga.lock().expect("saga health lock");
        if status == Status::Accepted {
            saga.in_flight
                .accepted(partition, &event.order_id, event.at_ms);
        } else if status.is_terminal() && placed_at_ms.is_some() {
            saga.in_flight.finished(partition, &event.order_id);
        }
        for sku in &event.refused_skus {
            saga.top_oos.add(sku);
        }
    }

    /// The tracking sink stopped consuming `partition` (it moved to
    /// another instance, or this one stops): its orders in flight are no
    /// longer ours to watch.
    /// Captures and voids failed for good on the partitions this instance
    /// owns (`/readyz` shows it).
    pub fn effects_failed_now(&self) -> i64 {
        use prometheus::core::Collector;
        self.effects_failed
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_gauge().get_value() as i64)
            .sum()
    }

    /// The owner's gauges of `orders` partition `partition`: its next owner
    /// reports them from now on.
    pub fn forget_orders_partition(&self, partition: u32) {
        let label = [partition.to_string()];
        let _ = self.parked_records.remove_label_values(&[&label[0]]);
        let _ = self.parked_oldest_age.remove_label_values(&[&label[0]]);
        let _ = self.effects_failed.remove_label_values(&[&label[0]]);
    }

    pub fn forget_status_partition(&self, partition: u32) {
        let mut saga = self.saga.lock().expect("saga health lock");
        saga.in_flight.forget_partition(partition);
    }

    /// Sets the gauges derived from the saga-health structures: done per
    /// scrape rather than per event, so a burst of failures costs no sorting.
    fn refresh_saga_health(&self, now_ms: u64) {
        let mut saga = self.saga.lock().expect("saga health lock");
        self.sagas_in_flight.set(saga.in_flight.len() as i64);
        let age = saga
            .in_flight
            .oldest_at_ms()
            .map_or(0.0, |at| seconds_between(at, now_ms));
        self.saga_oldest_age.set(age);
        let top: Vec<(String, u64)> = saga
            .top_oos
            .top()
            .into_iter()
            .map(|(sku, n)| (sku.to_owned(), n))
            .collect();
        // A SKU that left the top-k loses its series, so the gauge's
        // label set stays bounded by k.
        for gone in saga
            .exported
            .iter()
            .filter(|s| !top.iter().any(|(t, _)| t == *s))
        {
            let _ = self.out_of_stock_top_skus.remove_label_values(&[gone]);
        }
        for (sku, n) in &top {
            self.out_of_stock_top_skus
                .with_label_values(&[sku])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        saga.exported = top.into_iter().map(|(sku, _)| sku).collect();
    }

    /// The text exposition format served at `/metrics`.
    pub fn render(&self) -> String {
        let now_ms = crate::wall_clock::now_ms();
        self.refresh_saga_health(now_ms);
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

/// Registers `metric` in `registry` and returns it; names are unique by
/// construction here, so a clash is a bug.
fn registered<M: Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

/// Seconds from `from_ms` to `to_ms`, 0 if the clocks disagree.
fn seconds_between(from_ms: u64, to_ms: u64) -> f64 {
    to_ms.saturating_sub(from_ms) as f64 / 1000.0
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(order_id: &str, seq: u32, status: Status, at_ms: u64) -> StatusEvent {
        StatusEvent {
            order_id: order_id.into(),
            seq,
            status,
            reason: None,
            at_ms,
            refused_skus: Vec::new(),
            released_lines: 0,
            src: None,
            email: None,
        }
    }

    fn line_of<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    /// Saga health follows the events: orders in flight and the oldest
    /// one's age, placed → terminal durations, compensations.
    #[test]
    fn saga_health_from_status_events() {
        let m = Metrics::new();
        m.observe_status(0, &event("a", 1, Status::Accepted, 1_000), None, None);
        m.observe_status(1, &event("b", 1, Status::Accepted, 5_000), None, None);
        let text = m.render();
        assert_eq!(
            line_of(&text, "orderflow_sagas_in_flight "),
            Some("orderflow_sagas_in_flight 2")
        );
        let age: f64 = line_of(&text, "orderflow_saga_oldest_age_seconds ")
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(age > 1e6, "age from a 1970 acceptance: {age}");

        let mut declined = event("a", 3, Status::PaymentDeclined, 3_500);
        declined.released_lines = 2;
        m.observe_status(0, &declined, Some(2_000), Some(1_000));
        let mut failed = event("b", 3, Status::PaymentFailed, 6_000);
        failed.released_lines = 1;
        m.observe_status(1, &failed, Some(5_500), Some(5_000));
        m.observe_status(2, &event("r", 1, Status::Rejected, 7_000), None, None);
        let text = m.render();
        assert_eq!(m.sagas_in_flight.get(), 0);
        assert_eq!(m.saga_oldest_age.get(), 0.0);
        let duration = |status: &str| {
            let h = m.order_duration.with_label_values(&[status]);
            (h.get_sample_count(), h.get_sample_sum())
        };
        assert_eq!(duration("payment_declined"), (1, 2.5));
        assert_eq!(duration("payment_failed"), (1, 1.0));
        assert_eq!(
            duration("rejected"),
            (0, 0.0),
            "never accepted: no duration"
        );
        let comp = |status: &str, action: &str| {
            m.saga_compensations
                .with_label_values(&[status, action])
                .get()
        };
        assert_eq!(comp("payment_declined", "release_stock"), 1);
        assert_eq!(comp("payment_failed", "release_stock"), 1);
        assert_eq!(comp("payment_failed", "void_payment"), 1);
        assert_eq!(comp("out_of_stock", "release_stock"), 0);
        assert!(text.contains(
            "orderflow_saga_compensations_total{action=\"release_stock\",status=\"out_of_stock\"} 0"
        ));
    }

    /// A partition that moves away takes its orders in flight along.
    #[test]
    fn forgetting_a_partition_drops_its_orders() {
        let m = Metrics::new();
        m.observe_status(4, &event("a", 1, Status::Accepted, 1_000), None, None);
        m.observe_status(5, &event("b", 1, Status::Accepted, 2_000), None, None);
        m.forget_status_partition(4);
        m.render();
        assert_eq!(m.sagas_in_flight.get(), 1);
    }

    /// The top-k gauge names the SKUs refusing most orders, and a SKU that
    /// drops out of the top-k loses its series.
    #[test]
    fn top_out_of_stock_skus_bounded_labels() {
        let m = Metrics::with_top_skus(2);
        let oos = |id: &str, skus: &[&str]| {
            let mut e = event(id, 2, Status::OutOfStock, 2_000);
            e.refused_skus = skus.iter().map(|s| s.to_string()).collect();
            m.observe_status(0, &e, Some(1_000), Some(1_000));
        };
        oos("o1", &["A"]);
        oos("o2", &["A", "B"]);
        oos("o3", &["C"]);
        let text = m.render();
        assert!(
            text.contains("orderflow_out_of_stock_top_skus{sku=\"A\"} 2"),
            "{text}"
        );
        assert!(text.contains("orderflow_out_of_stock_top_skus{sku=\"B\"} 1"));
        assert!(!text.contains("sku=\"C\""), "k = 2");
        for i in 0..3 {
            oos(&format!("c{i}"), &["C"]);
        }
        let text = m.render();
        assert!(text.contains("orderflow_out_of_stock_top_skus{sku=\"C\"} 4"));
        assert!(!text.contains("sku=\"B\""), "B left the top-k: {text}");
        let series = text
            .lines()
            .filter(|l| l.starts_with("orderflow_out_of_stock_top_skus{"))
            .count();
        assert_eq!(series, 2);
        let off = Metrics::with_top_skus(0);
        let mut e = event("x", 2, Status::OutOfStock, 2_000);
        e.refused_skus = vec!["A".into()];
        off.observe_status(0, &e, Some(1_000), Some(1_000));
        assert!(!off.render().contains("orderflow_out_of_stock_top_skus{"));
    }
}
