//! Intake: accepts orders. It validates an order, settles its id, appends
//! the canonical order JSON to `orders` (keyed by the home SKU) and answers
//! once the append is durable. Nothing else: no store round trip per order.
//! The answer is a function of the order id (its tracking token is derived,
//! see [`crate::pipeline::tokens`]), so the same order id gets the same
//! answer again on any instance and after any restart, and the partition's
//! processor drops the repeated record as a known id: never a second order.
//!
//! HTTP (`POST /v1/orders`, `POST /v1/admin/produce`) and the CLI talk to
//! intake; intake talks only to the [`Log`] trait.
//!
//! Admission control: a new order is shed (503 `overloaded`, with
//! `Retry-After`) before it costs a log append when the process is above
//! `intake.max_rss_bytes`, when `intake.max_inflight` orders are being
//! taken already, or when its partition's runner is more than
//! `intake.max_backlog_records` behind, or has died and is not running
//! again yet (`down`: the supervisor restarts it). Shedding here, and not only at the
//! log's append queue, keeps that queue free for what orderflow writes
//! itself (payment results, saga messages, statuses): those are never
//! shed, and under overload the accepted orders still finish.
//!
//! Neither an order body nor a token is ever logged.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::config::IntakeConfig;
use crate::domain::order::{parse_order, valid_id};
use crate::domain::pan::contains_pan;
use crate::domain::{RejectReason, Rejection};
use crate::pipeline::backlog::Backlog;
use crate::pipeline::log::{Log, LogError, Record, RecordKind, Topic, partition_for_key};
use crate::pipeline::tokens::TokenKeys;
use crate::telemetry::metrics::Metrics;

mod admission;
mod idempotency;

use admission::{Admission, Taking};
pub use admission::{RSS_READ_EVERY_MS, Shed, resident_bytes};
pub use idempotency::{
    MAX_IDEMPOTENCY_KEY_LEN, idempotency_order_id, random_order_id, valid_idempotency_key,
};

/// Records per append call when producing a batch of raw lines.
const PRODUCE_CHUNK: usize = 256;

/// The answer to an accepted order (the first answer, when repeated).
#[derive(Clone, PartialEq, Eq)]
pub struct Accepted {
    pub order_id: String,
    pub tracking_token: String,
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("order_id", &self.order_id)
            .field("tracking_token", &"<redacted>")
            .finish()
    }
}

/// Where a raw produced line went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Produced {
    pub partition: u32,
    pub offset: u64,
    /// The line's `order_id`, when it had a plausible one.
    pub order_id: Option<String>,
}

/// Why intake refused or could not take an order. Each maps to one HTTP
/// status (see `crate::http`).
#[derive(thiserror::Error, Debug)]
pub enum IntakeError {
    /// The order breaks a rule (HTTP 400, `code` = the reason's code).
    #[error("invalid order ({}): {}", .0.reason.code(), .0.detail)]
    Invalid(Rejection),
    /// The log's append queue is full: back-pressure (HTTP 429).
    #[error("the log is full; retry later")]
    LogFull,
    /// The log cannot take writes now (HTTP 503).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The record exceeds the log's record limit (HTTP 413).
    #[error("record of {size_bytes} bytes exceeds the log limit of {max_bytes} bytes")]
    RecordTooLarge { size_bytes: usize, max_bytes: usize },
    /// Shed by admission control before the log (HTTP 503).
    #[error("overloaded ({}); retry later", .0.as_str())]
    Overloaded(Shed),
}

impl IntakeError {
    /// The stable problem code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            IntakeError::Invalid(r) => r.reason.code(),
            IntakeError::LogFull => "log_full",
            IntakeError::Unavailable(_) => "unavailable",
            IntakeError::RecordTooLarge { .. } => "record_too_large",
            IntakeError::Overloaded(_) => "overloaded",
        }
    }
}

impl From<LogError> for IntakeError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Full { .. } => IntakeError::LogFull,
            LogError::RecordTooLarge {
                size_bytes,
                max_bytes,
            } => IntakeError::RecordTooLarge {
                size_bytes,
                max_bytes,
            },
            other => IntakeError::Unavailable(other.to_string()),
        }
    }
}

fn rejection(reason: RejectReason, detail: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        detail: detail.into(),
    }
}

pub struct Intake {
    log: Arc<dyn Log>,
    keys: TokenKeys,
    metrics: Arc<Metrics>,
    admission: Admission,
}

impl Intake {
    pub fn new(log: Arc<dyn Log>, keys: TokenKeys, metrics: Arc<Metrics>) -> Intake {
        let admission = Admission::new(&IntakeConfig::default(), None, &metrics);
        Intake {
            log,
            keys,
            metrics,
            admission,
        }
    }

    /// Sets the admission limits; `backlog` is where this instance's
    /// runners report their progress.
    pub fn with_admission(mut self, config: &IntakeConfig, backlog: Arc<Backlog>) -> Intake {
        self.admission = Admission::new(config, Some(backlog), &self.metrics);
        self
    }

    fn shed(&self, reason: Shed, orders: u64) -> Shed {
        self.metrics
            .intake_shed
            .with_label_values(&[reason.as_str()])
            .inc_by(orders);
        reason
    }

    /// Admits one order (or produce batch of `orders` lines) to be taken,
    /// cheapest check first, or sheds it.
    fn admit(&self, orders: u64) -> Result<Taking<'_>, Shed> {
        let a = &self.admission;
        if a.memory.over() {
            return Err(self.shed(Shed::Memory, orders));
        }
        let permit = a
            .inflight
            .try_acquire()
            .map_err(|_| self.shed(Shed::Inflight, orders))?;
        self.metrics.intake_inflight.inc();
        Ok(Taking {
            _permit: permit,
            gauge: &self.metrics.intake_inflight,
        })
    }

    /// Sheds `orders` new orders for `partition` if its runner is too far
    /// behind, or dead.
    async fn check_backlog(&self, partition: u32, orders: u64) -> Result<(), Shed> {
        let a = &self.admission;
        let Some(backlog) = a.backlog.as_ref() else {
            return Ok(());
        };
        if backlog.is_down(partition) {
            return Err(self.shed(Shed::Down, orders));
        }
        let lag = backlog.lag(self.log.as_ref(), partition).await;
        match lag {
            Some(lag) if lag > a.max_backlog_records => Err(self.shed(Shed::Backlog, orders)),
            _ => Ok(()),
        }
    }

    /// A log error of `orders` new orders; a full append queue counts as shed.
    fn log_error(&self, e: LogError, orders: u64) -> IntakeError {
        if matches!(e, LogError::Full { .. }) {
            self.metrics
                .intake_shed
                .with_label_values(&["log_full"])
                .inc_by(orders);
        }
        IntakeError::from(e)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub async fn submit(
        &self,
        body: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<Accepted, IntakeError> {
        let _taking = self.admit(1).map_err(IntakeError::Overloaded)?;
        let parsed = parse_order(body).map_err(IntakeError::Invalid)?;
        let mut order = parsed.order;
        if !parsed.had_order_id {
            order.order_id = match idempotency_key {
                Some(key) => {
                    if !valid_idempotency_key(key) {
                        return Err(IntakeError::Invalid(rejection(
                            RejectReason::InvalidOrderId,
                            format!(
                                "the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"
                            ),
                        )));
                    }
                    idempotency_order_id(&order.customer_id, key)
                }
                None => random_order_id(),
            };
        }
        let key = order.home_sku().as_bytes().to_vec();
        let partition = partition_for_key(&key, self.log.partition_count(Topic::Orders));
        self.check_backlog(partition, 1)
            .await
            .map_err(IntakeError::Overloaded)?;
        let record = Record {
            kind: RecordKind::OrderJson,
            key,
            value: order.to_json(),
        };
        self.log
            .append(Topic::Orders, partition, vec![record])
            .await
            .map_err(|e| self.log_error(e, 1))?;
        Ok(Accepted {
            tracking_token: self.keys.token(&order.order_id),
            order_id: order.order_id,
        })
    }

    /// The tracking token of `order_id`, under the current key.
    pub fn tracking_token(&self, order_id: &str) -> String {
        self.keys.token(order_id)
    }

    /// Whether `token` is the tracking token of `order_id` (constant time).
    pub fn verify_token(&self, order_id: &str, token: &str) -> bool {
        self.keys.verify(order_id, token)
    }

    /// Writes one upstream line (`orderflow produce`) to `orders` as is.
    /// It must be JSON and hold no card number (`pan_detected`: card data
    /// never reaches the durable log); everything else is the processor's
    /// to validate (an invalid order ends `rejected`). Keyed like an upstream producer
    /// would: `lines[0].sku`, else `order_id`, else the empty key.
    pub async fn produce_raw(&self, line: &[u8]) -> Result<Produced, IntakeError> {
        let _taking = self.admit(1).map_err(IntakeError::Overloaded)?;
        let (record, order_id) = raw_record(line)?;
        let partition = partition_for_key(&record.key, self.log.partition_count(Topic::Orders));
        self.check_backlog(partition, 1)
            .await
            .map_err(IntakeError::Overloaded)?;
        let offset = self
            .log
            .append(Topic::Orders, partition, vec![record])
            .await
            .map_err(|e| self.log_error(e, 1))?;
        Ok(Produced {
            partition,
            offset,
            order_id,
        })
    }

    /// [`Intake::produce_raw`] for many lines: one append per partition
    /// (and chunk), partitions in parallel, the lines of one partition in
    /// input order. The results are in input order. Admission control
    /// applies per batch (memory, in-flight: one slot) and per partition
    /// (backlog); a shed line answers `overloaded`.
    pub async fn produce_raw_batch(&self, lines: &[&[u8]]) -> Vec<Result<Produced, IntakeError>> {
        let _taking = match self.admit(lines.len() as u64) {
            Ok(t) => t,
            Err(reason) => {
                return lines
                    .iter()
                    .map(|_| Err(IntakeError::Overloaded(reason)))
                    .collect();
            }
        };
        let count = self.log.partition_count(Topic::Orders);
        let mut results: Vec<Option<Result<Produced, IntakeError>>> =
            (0..lines.len()).map(|_| None).collect();
        let mut by_partition: BTreeMap<u32, Vec<(usize, Record, Option<String>)>> = BTreeMap::new();
        for (i, line) in lines.iter().enumerate() {
            match raw_record(line) {
                Ok((record, order_id)) => {
                    let p = partition_for_key(&record.key, count);
                    by_partition
                        .entry(p)
                        .or_default()
                        .push((i, record, order_id));
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let mut admitted = Vec::with_capacity(by_partition.len());
        for (partition, items) in by_partition {
            match self.check_backlog(partition, items.len() as u64).await {
                Ok(()) => admitted.push((partition, items)),
                Err(reason) => {
                    for (i, _, _) in items {
                        results[i] = Some(Err(IntakeError::Overloaded(reason)));
                    }
                }
            }
        }
        let jobs = admitted
            .into_iter()
            .map(|(partition, items)| self.produce_partition(partition, items));
        for done in futures::future::join_all(jobs).await {
            for (i, r) in done {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every line has a result"))
            .collect()
    }

    async fn produce_partition(
        &self,
        partition: u32,
        items: Vec<(usize, Record, Option<String>)>,
    ) -> Vec<(usize, Result<Produced, IntakeError>)> {
        let mut out = Vec::with_capacity(items.len());
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let chunk: Vec<_> = items.by_ref().take(PRODUCE_CHUNK).collect();
            let records: Vec<Record> = chunk.iter().map(|(_, r, _)| r.clone()).collect();
            match self.log.append(Topic::Orders, partition, records).await {
                Ok(first) => {
                    for (k, (i, _, order_id)) in chunk.into_iter().enumerate() {
                        out.push((
                            i,
                            Ok(Produced {
                                partition,
                                offset: first + k as u64,
                                order_id,
                            }),
                        ));
                    }
                }
                // One record too large fails its whole batch: append the
                // chunk one by one to find it and keep the others.
                Err(LogError::RecordTooLarge { .. }) => {
                    for (i, record, order_id) in chunk {
                        let r = self
                            .log
                            .append(Topic::Orders, partition, vec![record])
                            .await;
                        out.push((
                            i,
                            r.map(|offset| Produced {
                                partition,
                                offset,
                                order_id,
                            })
                            .map_err(IntakeError::from),
                        ));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    let retryable_full = matches!(e, LogError::Full { .. });
                    if retryable_full {
                        self.metrics
                            .intake_shed
                            .with_label_values(&["log_full"])
                            .inc_by(chunk.len() as u64);
                    }
                    for (i, _, _) in chunk {
                        let err = if retryable_full {
                            IntakeError::LogFull
                        } else {
                            IntakeError::Unavailable(message.clone())
                        };
                        out.push((i, Err(err)));
                    }
                }
            }
        }
        out
    }
}

/// The record of a raw line and its order id, if it has a plausible one
/// (a valid id that is not a card number: the id is echoed back).
fn raw_record(line: &[u8]) -> Result<(Record, Option<String>), IntakeError> {
    // A line holding a card number is refused here and never written: the
    // log is durable storage, and card data must not reach it.
    if contains_pan(line) {
        return Err(IntakeError::Invalid(rejection(
            RejectReason::PanDetected,
            "the line contains a card number; pay with a token".to_owned(),
        )));
    }
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        IntakeError::Invalid(rejection(
            RejectReason::MalformedJson,
            format!("line is not valid JSON (column {})", e.column()),
        ))
    })?;
    if crate::domain::order::value_contains_pan(&value) {
        return Err(IntakeError::Invalid(rejection(
            RejectReason::PanDetected,
            "the line contains a card number; pay with a token".to_owned(),
        )));
    }
    let str_at = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let sku = str_at(
        value
            .get("lines")
            .and_then(|l| l.get(0))
            .and_then(|l| l.get("sku")),
    );
    let order_id = str_at(value.get("order_id"));
    let key = sku
        .or_else(|| order_id.clone())
        .unwrap_or_default()
        .into_bytes();
    let order_id = order_id.filter(|id| valid_id(id) && !contains_pan(id.as_bytes()));
    Ok((
        Record {
            kind: RecordKind::OrderJson,
            key,
            value: line.to_vec(),
        },
        order_id,
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pipeline::log::memory::{MemoryLog, Refusal};

    /// Appends take 2 ms, so that concurrent submits overlap.
    async fn intake() -> (Arc<MemoryLog>, (), Intake) {
        let log = Arc::new(
            MemoryLog::new(8)
                .with_max_record_bytes(4096)
                .with_append_delay(Duration::from_millis(2)),
        );
        let keys = TokenKeys::new(vec![9; 32], None, "test").unwrap();
        let i = Intake::new(log.clone(), keys, Arc::new(Metrics::new()));
        (log, (), i)
    }

    fn order(id: Option<&str>) -> String {
        let id = id
            .map(|i| format!(r#""order_id":"{i}","#))
            .unwrap_or_default();
        format!(
            r#"{{{id}"customer_id":"c1","currency":"USD","lines":[{{"sku":"S-1","quantity":1,"unit_price":5}}],"payment":{{"token":"tok_visa"}}}}"#
        )
    }

    /// Sealing round-trips, and the pad differs per order id.
    /// The same order id answers the same token (the processor drops the
    /// repeated record), and only that order's token verifies.
    #[tokio::test]
    async fn same_answer_for_the_same_order_id() {
        let (log, _, i) = intake().await;
        let a = i.submit(order(Some("o-1")).as_bytes(), None).await.unwrap();
        let b = i.submit(order(Some("o-1")).as_bytes(), None).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(
            log.records().len(),
            2,
            "no store lookup: the record is appended again"
        );
        assert!(i.verify_token("o-1", &a.tracking_token));
        assert!(!i.verify_token("o-1", "nope"));
        assert!(!i.verify_token("o-2", &a.tracking_token));
        assert_eq!(a.tracking_token.len(), 43);
    }

    /// An idempotency key derives a stable id; no key gives fresh ids.
    #[tokio::test]
    async fn idempotency_key_and_random_ids() {
        let (log, _, i) = intake().await;
        let a = i.submit(order(None).as_bytes(), Some("k1")).await.unwrap();
        let b = i.submit(order(None).as_bytes(), Some("k1")).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(a.order_id, idempotency_order_id("c1", "k1"));
        assert_eq!(a.order_id.len(), 5 + 26);
        let c = i.submit(order(None).as_bytes(), None).await.unwrap();
        let d = i.submit(order(None).as_bytes(), None).await.unwrap();
        assert_ne!(c.order_id, d.order_id);
        assert!(c.order_id.starts_with("ord-") && c.order_id.len() == 30);
        assert_eq!(log.records().len(), 4);
        let bad = i
            .submit(order(None).as_bytes(), Some("has space"))
            .await
            .unwrap_err();
        assert!(matches!(bad, IntakeError::Invalid(_)));
    }

    /// Another instance (or a restart) with the same key answers the same token.
    #[tokio::test]
    async fn same_answer_on_another_instance() {
        let (log, _, i) = intake().await;
        let a = i.submit(order(Some("o-r")).as_bytes(), None).await.unwrap();
        let keys = TokenKeys::new(vec![9; 32], None, "test").unwrap();
        let j = Intake::new(log.clone(), keys, Arc::new(Metrics::new()));
        assert_eq!(
            j.submit(order(Some("o-r")).as_bytes(), None).await.unwrap(),
            a
        );
    }

    /// Invalid orders and log errors map to their variants.
    #[tokio::test]
    async fn errors() {
        let (log, _, i) = intake().await;
        let e = i.submit(b"{", None).await.unwrap_err();
        assert_eq!(e.code(), "malformed_json");
        log.refuse(Some(Refusal::Full));
        assert!(matches!(
            i.submit(order(None).as_bytes(), None).await,
            Err(IntakeError::LogFull)
        ));
        assert!(matches!(
            i.produce_raw(b"{}").await,
            Err(IntakeError::LogFull)
        ));
        let full = i.metrics().intake_shed.with_label_values(&["log_full"]);
        assert_eq!(full.get(), 2);
    }

    fn limits(max_inflight: usize, max_backlog_records: u64, max_rss_bytes: u64) -> IntakeConfig {
        IntakeConfig {
            max_inflight,
            max_backlog_records,
            max_rss_bytes,
        }
    }

    fn shed_count(i: &Intake, reason: Shed) -> u64 {
        i.metrics()
            .intake_shed
            .with_label_values(&[reason.as_str()])
            .get()
    }

    /// Past `max_inflight` orders being taken, the next ones are shed at
    /// once (no waiting), counted, and never reach the log.
    #[tokio::test]
    async fn inflight_limit_sheds_at_once() {
        let (log, _, i) = intake().await;
        let i = Arc::new(i.with_admission(&limits(2, 1_000, 0), Arc::new(Backlog::new(8))));
        // The test runtime has one thread: every task runs until its
        // append (2 ms in the test log) before the first one finishes.
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let i = i.clone();
                tokio::spawn(async move { i.submit(order(None).as_bytes(), None).await })
            })
            .collect();
        let answers: Vec<_> = futures::future::join_all(tasks)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let accepted = answers.iter().filter(|a| a.is_ok()).count();
        assert_eq!(accepted, 2);
        assert!(answers.iter().filter_map(|a| a.as_ref().err()).all(|e| {
            matches!(e, IntakeError::Overloaded(Shed::Inflight)) && e.code() == "overloaded"
        }));
        assert_eq!(log.records().len(), 2);
        assert_eq!(shed_count(&i, Shed::Inflight), 14);
        assert_eq!(i.metrics().intake_inflight.get(), 0);
        // The slots are free again.
        i.submit(order(None).as_bytes(), None).await.unwrap();
    }

    /// New orders for a partition whose runner is more than
    /// `max_backlog_records` behind are shed; other partitions, and
    /// partitions no runner here owns, are not.
    #[tokio::test]
    async fn backlog_limit_sheds_the_lagging_partition() {
        let (log, _, i) = intake().await;
        let backlog = Arc::new(Backlog::new(8));
        let i = i.with_admission(&limits(16, 1, 0), backlog.clone());
        let p = partition_for_key(b"S-1", 8);
        let owned = backlog.own(p, 0);
        i.submit(order(None).as_bytes(), None).await.unwrap();
        i.submit(order(None).as_bytes(), None).await.unwrap();
        let e = i.submit(order(None).as_bytes(), None).await.unwrap_err();
        assert!(matches!(e, IntakeError::Overloaded(Shed::Backlog)), "{e}");
        let lines: Vec<&[u8]> = vec![
            br#"{"order_id":"a","lines":[{"sku":"S-1"}]}"#,
            br#"{"order_id":"b","lines":[{"sku":"T-9"}]}"#,
        ];
        assert_ne!(partition_for_key(b"T-9", 8), p);
        let r = i.produce_raw_batch(&lines).await;
        assert!(matches!(r[0], Err(IntakeError::Overloaded(Shed::Backlog))));
        assert!(r[1].is_ok());
        assert_eq!(shed_count(&i, Shed::Backlog), 2);
        // The runner caught up: taken again.
        backlog.processed(p, log.offsets(Topic::Orders, p).await.unwrap().1);
        i.submit(order(None).as_bytes(), None).await.unwrap();
        drop(owned);
        for _ in 0..3 {
            i.submit(order(None).as_bytes(), None).await.unwrap();
        }
    }

    /// Above `max_rss_bytes` every new order is shed (submit and produce);
    /// under a bound the process is far below, nothing is.
    #[tokio::test]
    async fn memory_guard_sheds_above_the_bound() {
        let rss = resident_bytes().expect("/proc/self/statm is readable on Linux");
        assert!(rss > crate::config::MIN_RSS_BOUND_BYTES);
        let (log, _, i) = intake().await;
        let tight = i.with_admission(
            &limits(16, 1_000, crate::config::MIN_RSS_BOUND_BYTES),
            Arc::new(Backlog::new(8)),
        );
        let e = tight
            .submit(order(None).as_bytes(), None)
            .await
            .unwrap_err();
        assert!(matches!(e, IntakeError::Overloaded(Shed::Memory)), "{e}");
        let r = tight
            .produce_raw_batch(&[b"{}".as_slice(), b"{}".as_slice()])
            .await;
        assert!(
            r.iter()
                .all(|r| matches!(r, Err(IntakeError::Overloaded(Shed::Memory))))
        );
        assert_eq!(shed_count(&tight, Shed::Memory), 3);
        assert!(tight.metrics().process_resident_bytes.get() > 0);
        assert_eq!(log.records().len(), 0);
        let roomy = tight.with_admission(
            &limits(16, 1_000, crate::config::MAX_RSS_BOUND_BYTES),
            Arc::new(Backlog::new(8)),
        );
        roomy.submit(order(None).as_bytes(), None).await.unwrap();
    }

    /// Raw lines are written as is, keyed by SKU, then order id; non-JSON fails.
    #[tokio::test]
    async fn produce_raw_lines() {
        let (log, _, i) = intake().await;
        let p = i
            .produce_raw(br#"{"order_id":"x1","lines":[{"sku":"S-1"}]}"#)
            .await
            .unwrap();
        assert_eq!(p.order_id.as_deref(), Some("x1"));
        assert_eq!(p.partition, partition_for_key(b"S-1", 8));
        let q = i.produce_raw(br#"{"order_id":"x2"}"#).await.unwrap();
        assert_eq!(q.partition, partition_for_key(b"x2", 8));
        // A card number anywhere refuses the line: it never reaches the log.
        let r = i
            .produce_raw(br#"{"order_id":"4242424242424242"}"#)
            .await
            .unwrap_err();
        assert_eq!(r.code(), "pan_detected");
        assert!(matches!(
            i.produce_raw(b"nope").await,
            Err(IntakeError::Invalid(_))
        ));
        assert_eq!(log.records().len(), 2);
        let stored = log.record(p.partition, p.offset);
        assert_eq!(
            stored.value,
            br#"{"order_id":"x1","lines":[{"sku":"S-1"}]}"#.to_vec()
        );
        assert_eq!(stored.kind, RecordKind::OrderJson);
    }

    /// A batch keeps input order per partition and isolates bad lines.
    #[tokio::test]
    async fn produce_batch() {
        let (log, _, i) = intake().await;
        let big = format!(r#"{{"order_id":"big","pad":"{}"}}"#, "x".repeat(5000));
        let lines: Vec<&[u8]> = vec![
            br#"{"order_id":"a","lines":[{"sku":"S"}]}"#,
            b"not json",
            br#"{"order_id":"b","lines":[{"sku":"S"}]}"#,
            big.as_bytes(),
            br#"{"order_id":"c","lines":[{"sku":"T"}]}"#,
        ];
        let r = i.produce_raw_batch(&lines).await;
        assert_eq!(r.len(), 5);
        let (a, b) = (r[0].as_ref().unwrap(), r[2].as_ref().unwrap());
        assert_eq!((a.partition, a.offset + 1), (b.partition, b.offset));
        assert!(matches!(r[1], Err(IntakeError::Invalid(_))));
        assert!(matches!(r[3], Err(IntakeError::RecordTooLarge { .. })));
        assert_eq!(r[4].as_ref().unwrap().order_id.as_deref(), Some("c"));
        assert_eq!(log.records().len(), 3);
    }
}
