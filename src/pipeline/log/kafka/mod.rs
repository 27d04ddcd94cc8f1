//! Apache Kafka (or Redpanda) as the log, for the distributed deployment.
//!
//! Topics: `{topic_prefix}orders`, `{topic_prefix}order-status` and
//! `{topic_prefix}orders-parked`, created at [`KafkaLog::connect`] when
//! absent (`orders-parked` with `retention.ms = kafka.parked_retention_ms`),
//! with
//! `message.timestamp.type=LogAppendTime`: the broker stamps every record
//! when it appends it, so time comes from the log, as in the embedded log,
//! whatever clock an upstream producer has. Kafka deletes by its own
//! retention, never by orderflow's checkpoints (`release_before` is a
//! no-op): give both topics a `retention.ms` well above the longest time a
//! partition may go without a checkpoint (an instance down, a sink turned
//! off), and `retention.bytes=-1` or a size that holds that much traffic. A
//! checkpoint older than the retention cannot be replayed and the runner
//! stops on `OffsetOutOfRange`.
//!
//! Writes: one idempotent producer (`acks=all`, at most 5 requests in
//! flight), so records of one `append` keep their order even when
//! librdkafka retries. Every record goes to the partition the caller chose;
//! the producer's `murmur2_random` partitioner never runs for orderflow's
//! records and is set only so that this client hashes keys as the Java
//! client does, like every other producer of `orders` must.
//!
//! Record kinds: upstream producers write the order JSON with no header;
//! orderflow's own records carry a header [`KIND_HEADER`] (the embedded
//! log's record flag). No header means [`RecordKind::OrderJson`].
//!
//! Reads: no client per partition (each librdkafka client runs several
//! threads). A topic has up to [`MAX_CURSORS_PER_PARTITION`] consumers,
//! created as needed; each holds a partition at most once, with a fetch
//! position of its own and its own queue (`split_partition_queue`), read
//! asynchronously. Such a (consumer, partition) pair is a *cursor*. A read
//! takes the cursor already at `from`, so sequential readers never seek; a
//! second reader of the same partition (the tracking and notification
//! sinks both read every `order-status` partition, at their own pace) gets
//! a cursor of its own instead of making the two seek back and forth; a
//! reader elsewhere (a runner restarting from its checkpoint) seeks a
//! cursor no one has read for [`ABANDONED_AFTER`] before it adds a
//! consumer, and seeks any free one once there are as many as allowed.
//! Partitions are assigned by hand (`incremental_assign`, no
//! group subscription: partition ownership is decided by the group
//! membership component) on first read, and [`Log::forget`] drops
//! them when ownership is lost; a cursor unused for [`CURSOR_IDLE`] is
//! dropped too, so a former reader's position is not fetched forever.
//! Offsets are never committed to Kafka: orderflow's checkpoints in the
//! state store own them.
//!
//! Watermarks: [`Log::offsets`] asks the partition leader the first time
//! it is called for a partition (and after [`Log::forget`]); after
//! that it answers from memory: the highest of what that query, this
//! process's own acknowledged appends, its reads, and librdkafka's cached
//! watermarks (refreshed by every fetch response of a cursor) have shown.
//!
//! Connections: every client shares the settings of [`client_config`]
//! (brokers, TLS, SASL, `[kafka.client]`).

use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use prometheus::Histogram;
use rdkafka::Message;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{Consumer, DefaultConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::OwnedMutexGuard;

use crate::config::KafkaConfig;
use crate::pipeline::log::{Log, LogError, LogRecord, READ_MAX_BYTES, Record, RecordKind, Topic};
use crate::telemetry::metrics::Metrics;

mod client;
pub use client::client_config;
use client::{Refusal, RefusalContext};

/// Header naming the kind of an orderflow record; absent on the order JSON
/// that upstream producers write.
pub const KIND_HEADER: &str = "orderflow-kind";
/// [`KIND_HEADER`] value of [`RecordKind::Internal`].
const KIND_INTERNAL: &[u8] = b"internal";
/// Partitions one topic may have (as in the embedded log).
pub const MAX_PARTITIONS_PER_TOPIC: u32 = 1024;
/// Readers of one partition at different positions that each keep a
/// fetch position: the runner or the two `order-status` sinks, plus one
/// for a replay or a reader starting over.
pub const MAX_CURSORS_PER_PARTITION: usize = 3;
/// A cursor not read for this long stops fetching.
pub const CURSOR_IDLE: Duration = Duration::from_secs(60);
const REAP_EVERY: Duration = Duration::from_secs(10);
/// A cursor not read for this long is taken by a reader at another
/// position; a live reader (the runner, a sink) reads far more often.
const ABANDONED_AFTER: Duration = Duration::from_secs(2);
/// Room for the record batch, record and header framing around the
/// largest key + value, in `message.max.bytes` and the topics'
/// `max.message.bytes`.
const FRAMING_BYTES: usize = 64 * 1024;
/// Records the producer queues before appends fail with `LogError::Full`.
const PRODUCER_QUEUE_RECORDS: usize = 100_000;
/// Bytes a cursor may fetch ahead of its reader before librdkafka pauses
/// it: a few fetch responses, without letting a slow reader of one of
/// hundreds of partitions hold librdkafka's default of 64 MiB.
const PREFETCH_BYTES: usize = 4 * 1024 * 1024;
/// Longest wait for librdkafka to take a seek (a local operation).
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before queueing the rest of a batch the producer queue refused.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);

/// The Kafka topic of `topic` under `prefix`.
pub fn topic_name(prefix: &str, topic: Topic) -> String {
    format!("{prefix}{}", topic.name())
}

/// The Kafka log. See the module documentation.
pub struct KafkaLog {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    max_record_bytes: usize,
    request_timeout: Duration,
    producer: FutureProducer<RefusalContext>,
    topics: Vec<TopicState>,
    closed: AtomicBool,
}

struct TopicState {
    topic: Topic,
    name: String,
    c_name: CString,
    partitions: Vec<PartitionState>,
    /// Consumer `i` holds cursor `i` of any partition; created on demand.
    consumers: Mutex<Vec<Arc<ReaderConsumer>>>,
    append_latency: Histogram,
}

#[derive(Default)]
struct PartitionState {
    /// Highest watermarks seen; valid once `known`.
    low: AtomicU64,
    high: AtomicU64,
    /// The leader was asked since start or the last `forget`.
    known: AtomicBool,
    /// Cursor `i` lives on consumer `i`.
    cursors: Mutex<Vec<Arc<Cursor>>>,
}

impl PartitionState {
    fn merge(&self, low: i64, high: i64) {
        if let Ok(low) = u64::try_from(low) {
            self.low.fetch_max(low, Ordering::AcqRel);
        }
        if let Ok(high) = u64::try_from(high) {
            self.high.fetch_max(high, Ordering::AcqRel);
        }
    }

    fn get(&self) -> (u64, u64) {
        let high = self.high.load(Ordering::Acquire);
        (self.low.load(Ordering::Acquire).min(high), high)
    }
}

type PartitionQueue = StreamPartitionQueue<DefaultConsumerContext>;

/// One librdkafka consumer of a topic, and the task serving its main queue.
struct ReaderConsumer {
    consumer: Arc<StreamConsumer>,
    events: tokio::task::AbortHandle,
}

impl Drop for ReaderConsumer {
    fn drop(&mut self) {
        self.events.abort();
    }
}

/// A partition on one consumer: a fetch position and its queue.
struct Cursor {
    consumer: Arc<ReaderConsumer>,
    partition: u32,
    /// Held for a whole read: one reader per cursor at a time. `None`
    /// until first assigned; split again at every assignment (a partition
    /// dropped from the assignment may come back with a new queue).
    queue: Arc<tokio::sync::Mutex<Option<PartitionQueue>>>,
    pos: Mutex<CursorPos>,
}

struct CursorPos {
    state: PosState,
    last_used: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PosState {
    /// Not in the consumer's assignment.
    Unassigned,
    /// Assigned; the next record the queue yields is at this offset or,
    /// past a gap (compaction, transaction markers), after it.
    At(u64),
    /// Assigned, but librdkafka stopped fetching after an error (offset
    /// out of range): only a new assignment restarts it.
    Stopped,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one still
    // holds a consistent value.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unavailable(what: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(what.to_string())
}

impl KafkaLog {
    /// Connects to the brokers, creates the topics that are missing, checks
    /// the partition counts of those that exist and waits until every
    /// partition has a leader. Needs a Tokio runtime.
    pub async fn connect(
        config: &KafkaConfig,
        topics: &[(Topic, u32)],
        max_record_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Result<KafkaLog, LogError> {
        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let max_message_bytes = max_record_bytes.saturating_add(FRAMING_BYTES);
        let mut wanted = Vec::with_capacity(topics.len());
        for &(topic, count) in topics {
            if wanted.iter().any(|(t, _, _)| *t == topic) {
                return Err(unavailable(format!(
                    "invalid Kafka log setup: topic {} is listed twice",
                    topic.name()
                )));
            }
            if count == 0 || count > MAX_PARTITIONS_PER_TOPIC {
                return Err(unavailable(format!(
                    "invalid Kafka log setup: topic {} has {count} partitions; allowed 1 to {MAX_PARTITIONS_PER_TOPIC}",
                    topic.name()
                )));
            }
            wanted.push((topic, topic_name(&config.topic_prefix, topic), count));
        }

        let refusals = RefusalContext::default();
        let producer: FutureProducer<RefusalContext> = client_config(config)
            .map_err(|e| unavailable(e.to_string()))?
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("linger.ms", config.linger_ms.to_string())
            .set("message.max.bytes", max_message_bytes.to_string())
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", config.request_timeout_ms.to_string())
            .set("request.timeout.ms", config.request_timeout_ms.to_string())
            .set(
                "queue.buffering.max.messages",
                PRODUCER_QUEUE_RECORDS.to_string(),
            )
            .create_with_context(refusals.clone())
            .map_err(|e| unavailable(format!("cannot create the Kafka producer: {e}")))?;
        let admin = admin_client(config)?;

        // Nothing reads `orders-parked` back (the lane is listed from the
        // checkpoints): it is an audit trail, kept for a bounded time.
        let names: Vec<(String, u32, Option<u64>)> = wanted
            .iter()
            .map(|(t, n, c)| {
                let retention_ms = (*t == Topic::Parked).then_some(config.parked_retention_ms);
                (n.clone(), *c, retention_ms)
            })
            .collect();
        ensure_topics(
            &producer,
            &refusals,
            &admin,
            config,
            &names,
            max_message_bytes,
            request_timeout,
        )
        .await?;

        let topics = wanted
            .into_iter()
            .map(|(topic, name, count)| {
                let c_name = CString::new(name.clone())
                    .map_err(|_| unavailable(format!("topic name {name:?} contains NUL")))?;
                Ok(TopicState {
                    topic,
                    c_name,
                    partitions: (0..count).map(|_| PartitionState::default()).collect(),
                    consumers: Mutex::new(Vec::new()),
                    append_latency: metrics
                        .log_append_latency
                        .with_label_values(&[topic.name()]),
                    name,
                })
            })
            .collect::<Result<Vec<_>, LogError>>()?;
        let inner = Arc::new(Inner {
            config: config.clone(),
            max_record_bytes,
            request_timeout,
            producer,
            topics,
            closed: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(reap_idle_cursors(weak));
        Ok(KafkaLog { inner })
    }
}

fn admin_client(config: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, LogError> {
    client_config(config)
        .map_err(|e| unavailable(e.to_string()))?
        .create()
        .map_err(|e| unavailable(format!("cannot create the Kafka admin client: {e}")))
}

/// Deletes every topic of `config`'s prefix (the bench's own topics when
/// a run ends; no command of an operator's does this).
pub async fn delete_topics(config: &KafkaConfig, timeout: Duration) -> Result<(), LogError> {
    let admin = admin_client(config)?;
    let names: Vec<String> = Topic::ALL
        .iter()
        .map(|t| topic_name(&config.topic_prefix, *t))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let results = admin
        .delete_topics(&names, &options)
        .await
        .map_err(|e| unavailable(format!("cannot delete Kafka topics: {e}")))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((name, code)) => {
                return Err(unavailable(format!("cannot delete topic {name}: {code}")));
            }
        }
    }
    Ok(())
}

/// Creates the missing topics, checks the partition counts and waits until
/// every partition of every topic has a leader.
async fn ensure_topics(
    producer: &FutureProducer<RefusalContext>,
    refusals: &RefusalContext,
    admin: &AdminClient<DefaultClientContext>,
    config: &KafkaConfig,
    topics: &[(String, u32, Option<u64>)],
    max_message_bytes: usize,
    timeout: Duration,
) -> Result<(), LogError> {
    let deadline = Instant::now() + timeout;
    let mut missing = Vec::new();
    let mut existing = Vec::new();
    for (name, count, retention_ms) in topics {
        match describe_topic(producer, refusals, name, deadline).await? {
            TopicView::Missing => {
                missing.push((name.as_str(), *count, retention_ms.map(|ms| ms.to_string())))
            }
            TopicView::Present { partitions, .. } => {
                check_partition_count(name, *count, partitions)?;
                existing.push(name.as_str());
            }
        }
    }
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    if !missing.is_empty() {
        let replication = i32::from(config.replication_factor);
        let max_message_bytes = max_message_bytes.to_string();
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|(name, count, retention_ms)| {
                let topic =
                    NewTopic::new(name, *count as i32, TopicReplication::Fixed(replication))
                        .set("message.timestamp.type", "LogAppendTime")
                        .set("max.message.bytes", &max_message_bytes);
                match retention_ms {
                    Some(ms) => topic.set("retention.ms", ms),
                    None => topic,
                }
            })
            .collect();
        let results = admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "cannot create Kafka topics at {}: {e}",
                    config.bootstrap_servers
                ))
            })?;
        for result in results {
            match result {
                // Another instance starting at the same time created it;
                // its partition count is checked below like any other.
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(unavailable(format!(
                        "cannot create Kafka topic `{name}` (replication factor {replication}): {code}"
                    )));
                }
            }
        }
    }
    warn_on_topic_configs(admin, &existing, max_message_bytes, &options).await;
    for (name, count, _) in topics {
        loop {
            match describe_topic(producer, refusals, name, deadline).await? {
                TopicView::Present {
                    partitions,
                    all_led,
                } => {
                    check_partition_count(name, *count, partitions)?;
                    if all_led {
                        break;
                    }
                }
                TopicView::Missing => {}
            }
            if Instant::now() >= deadline {
                return Err(unavailable(format!(
                    "Kafka topic `{name}` has no leader for every partition after {} ms",
                    timeout.as_millis()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

enum TopicView {
    Missing,
    Present { partitions: u32, all_led: bool },
}

/// The topic as the cluster's metadata shows it, retrying until `deadline`
/// while no broker answers.
async fn describe_topic(
    producer: &FutureProducer<RefusalContext>,
    refusals: &RefusalContext,
    name: &str,
    deadline: Instant,
) -> Result<TopicView, LogError> {
    loop {
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let (client, topic) = (producer.clone(), name.to_owned());
        // A metadata request blocks its thread.
        let metadata = tokio::task::spawn_blocking(move || {
            client.client().fetch_metadata(Some(&topic), remaining)
        })
        .await
        .map_err(|e| unavailable(format!("Kafka metadata task failed: {e}")))?;
        let error = match metadata {
            Ok(metadata) => {
                let Some(t) = metadata.topics().iter().find(|t| t.name() == name) else {
                    return Ok(TopicView::Missing);
                };
                match t.error().map(RDKafkaErrorCode::from) {
                    // Still being created (by another instance).
                    None if t.partitions().is_empty() => return Ok(TopicView::Missing),
                    None => {
                        return Ok(TopicView::Present {
                            partitions: t.partitions().len() as u32,
                            all_led: t
                                .partitions()
                                .iter()
                                .all(|p| p.leader() >= 0 && p.error().is_none()),
                        });
                    }
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                        return Ok(TopicView::Missing);
                    }
                    // Leader elections right after creation, and the like.
                    Some(code) => code.to_string(),
                }
            }
            Err(e) => e.to_string(),
        };
        let refusal = refusals.last();
        if let Some(Refusal::Authentication(reason)) = &refusal {
            return Err(unavailable(format!(
                "Kafka refused orderflow's credentials (check `[kafka.sasl]`): {reason}"
            )));
        }
        if Instant::now() >= deadline {
            let cause = match refusal {
                Some(Refusal::Tls(reason)) => {
                    format!(" (TLS failed: {reason}; check `[kafka.tls]`)")
                }
                _ => String::new(),
            };
            return Err(unavailable(format!(
                "cannot read Kafka metadata of topic `{name}`: {error}{cause}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn check_partition_count(name: &str, expected: u32, actual: u32) -> Result<(), LogError> {
    if actual == expected {
        return Ok(());
    }
    Err(unavailable(format!(
        "Kafka topic `{name}` has {actual} partitions but orderflow is configured for {expected}: \
         configure {actual}, or use another topic prefix (adding partitions to the topic would move \
         keys to other partitions, and their state with them)"
    )))
}

/// Topics made by someone else may lack the settings orderflow creates its
/// own with; that is worth a warning, not a refusal.
async fn warn_on_topic_configs(
    admin: &AdminClient<DefaultClientContext>,
    names: &[&str],
    max_message_bytes: usize,
    options: &AdminOptions,
) {
    if names.is_empty() {
        return;
    }
    let specifiers: Vec<ResourceSpecifier<'_>> =
        names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let results = match admin.describe_configs(&specifiers, options).await {
        Ok(results) => results,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the Kafka topics' configuration");
            return;
        }
    };
    for (name, result) in names.iter().zip(results) {
        let Ok(resource) = result else { continue };
        let value = |key: &str| resource.get(key).and_then(|e| e.value.clone());
        if let Some(kind) = value("message.timestamp.type")
            && kind != "LogAppendTime"
        {
            tracing::warn!(
                topic = name,
                %kind,
                "topic stamps records with the producers' clocks, not the broker's: set message.timestamp.type=LogAppendTime"
            );
        }
        if let Some(max) = value("max.message.bytes").and_then(|v| v.parse::<usize>().ok())
            && max < max_message_bytes
        {
            tracing::warn!(
                topic = name,
                max,
                needed = max_message_bytes,
                "topic's max.message.bytes is below log.max_record_bytes plus framing: the broker will refuse the largest records"
            );
        }
    }
}

impl Inner {
    fn topic(&self, topic: Topic) -> Option<&TopicState> {
        self.topics.iter().find(|t| t.topic == topic)
    }

    fn partition(
        &self,
        topic: Topic,
        partition: u32,
    ) -> Result<(&TopicState, &PartitionState), LogError> {
        let ts = self.topic(topic);
        ts.and_then(|ts| Some((ts, ts.partitions.get(partition as usize)?)))
            .ok_or(LogError::NoSuchPartition {
                topic: topic.name(),
                partition,
                count: ts.map_or(0, |ts| ts.partitions.len() as u32),
            })
    }

    /// Asks the partition leader for the watermarks (blocks the thread).
    fn query_watermarks(&self, ts: &TopicState, partition: u32) -> Result<(), LogError> {
        let deadline = Instant::now() + self.request_timeout;
        let (low, high) = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.producer.client().fetch_watermarks(
                &ts.name,
                partition as i32,
                remaining.max(Duration::from_millis(100)),
            ) {
                Ok(watermarks) => break watermarks,
                // librdkafka does not retry this request when leadership
                // moves (or, right after the topic's creation, is still
                // being settled); the metadata refresh it triggers does.
                Err(e) if Instant::now() < deadline && is_transient(&e) => {
                    tracing::debug!(topic = %ts.name, partition, error = %e, "retrying the offsets query");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(unavailable(format!(
                        "cannot read the offsets of Kafka topic `{}` partition {partition}: {e}",
                        ts.name
                    )));
                }
            }
        };
        let ps = &ts.partitions[partition as usize];
        ps.merge(low, high);
        ps.known.store(true, Ordering::Release);
        Ok(())
    }

    /// The watermarks, asking the leader off the async threads if they are
    /// not known yet.
    async fn watermarks(
        self: &Arc<Self>,
        topic: Topic,
        partition: u32,
    ) -> Result<(u64, u64), LogError> {
        let (ts, ps) = self.partition(topic, partition)?;
        if !ps.known.load(Ordering::Acquire) {
            let inner = self.clone();
            tokio::task::spawn_blocking(move || {
                let ts = inner.topic(topic).expect("checked above");
                inner.query_watermarks(ts, partition)
            })
            .await
            .map_err(|e| unavailable(format!("Kafka offsets task failed: {e}")))??;
        }
        Ok(self.cached_offsets(ts, ps, partition))
    }

    /// The watermarks known, raised by librdkafka's cached ones of every
    /// consumer fetching the partition. No network round trip.
    fn cached_offsets(&self, ts: &TopicState, ps: &PartitionState, partition: u32) -> (u64, u64) {
        for cursor in lock(&ps.cursors).iter() {
            if lock(&cursor.pos).state == PosState::Unassigned {
                continue;
            }
            if let Some((low, high)) =
                fetched_watermarks(&cursor.consumer.consumer, &ts.c_name, partition)
            {
                ps.merge(low, high);
            }
        }
        ps.get()
    }

    fn out_of_range(&self, ts: &TopicState, partition: u32, offset: u64) -> LogError {
        let (low, high) = ts.partitions[partition as usize].get();
        LogError::OffsetOutOfRange {
            topic: ts.topic.name(),
            partition,
            offset,
            low,
            high,
        }
    }

    /// Consumer `index` of the topic, created if it is the next one.
    fn consumer(&self, ts: &TopicState, index: usize) -> Result<Arc<ReaderConsumer>, LogError> {
        let mut consumers = lock(&ts.consumers);
        if let Some(c) = consumers.get(index) {
            return Ok(c.clone());
        }
        debug_assert_eq!(index, consumers.len(), "cursors are created in order");
        let consumer: StreamConsumer = client_config(&self.config)
            .map_err(|e| unavailable(e.to_string()))?
            .set(
                "client.id",
                format!("orderflow-log-{}-{index}", ts.topic.name()),
            )
            // `assign` needs a group id, but nothing joins this group or
            // commits to it: it only has to differ from the membership
            // group's.
            .set("group.id", format!("{}.log-readers", self.config.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Out of range is the caller's to handle (OffsetOutOfRange),
            // never a silent jump.
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed")
            .set(
                "queued.max.messages.kbytes",
                (PREFETCH_BYTES.max(self.max_record_bytes) / 1024).to_string(),
            )
            .create()
            .map_err(|e| unavailable(format!("cannot create a Kafka consumer: {e}")))?;
        let consumer = Arc::new(consumer);
        // Aborted when the last cursor on this consumer goes, which lets
        // the consumer go too.
        let events =
            tokio::spawn(serve_main_queue(consumer.clone(), ts.name.clone())).abort_handle();
        let c = Arc::new(ReaderConsumer { consumer, events });
        consumers.push(c.clone());
        Ok(c)
    }

    /// A cursor of `partition`, held for one read, whose queue yields the
    /// record at `from` next.
    async fn acquire(
        self: &Arc<Self>,
        ts: &TopicState,
        partition: u32,
        from: u64,
    ) -> Result<(Arc<Cursor>, OwnedMutexGuard<Option<PartitionQueue>>), LogError> {
        let ps = &ts.partitions[partition as usize];
        let (cursor, guard) = {
            let mut cursors = lock(&ps.cursors);
            let mut picked = None;
            // Already there: no seek.
            for c in cursors.iter() {
                if lock(&c.pos).state == PosState::At(from)
                    && let Ok(g) = c.queue.clone().try_lock_owned()
                {
                    picked = Some((c.clone(), g));
                    break;
                }
            }
            // A free cursor that is not fetching anything useful.
            if picked.is_none() {
                for c in cursors.iter() {
                    if lock(&c.pos).state != PosState::Unassigned
                        && lock(&c.pos).state != PosState::Stopped
                    {
                        continue;
                    }
                    if let Ok(g) = c.queue.clone().try_lock_owned() {
                        picked = Some((c.clone(), g));
                        break;
                    }
                }
            }
            // A free cursor its reader left (it ended, or restarted from
            // a checkpoint): seeking it costs less than another consumer.
            if picked.is_none() {
                picked = cursors.iter().find_map(|c| {
                    if lock(&c.pos).last_used.elapsed() < ABANDONED_AFTER {
                        return None;
                    }
                    let g = c.queue.clone().try_lock_owned().ok()?;
                    Some((c.clone(), g))
                });
            }
            // Another reader at another position: a cursor of its own.
            if picked.is_none() && cursors.len() < MAX_CURSORS_PER_PARTITION {
                let c = Arc::new(Cursor {
                    consumer: self.consumer(ts, cursors.len())?,
                    partition,
                    queue: Arc::new(tokio::sync::Mutex::new(None)),
                    pos: Mutex::new(CursorPos {
                        state: PosState::Unassigned,
                        last_used: Instant::now(),
                    }),
                });
                let g = c
                    .queue
                    .clone()
                    .try_lock_owned()
                    .expect("a new cursor is free");
                cursors.push(c.clone());
                picked = Some((c, g));
            }
            match picked {
                Some((c, g)) => (c, Some(g)),
                // Too many readers: seek the least recently used cursor,
                // waiting for it if every one is being read.
                None => {
                    let lru = cursors
                        .iter()
                        .min_by_key(|c| {
                            let free = c.queue.try_lock().is_ok();
                            (!free, lock(&c.pos).last_used)
                        })
                        .expect("a partition with no free cursor has some")
                        .clone();
                    let g = lru.queue.clone().try_lock_owned().ok();
                    (lru, g)
                }
            }
        };
        let guard = match guard {
            Some(g) => g,
            None => cursor.queue.clone().lock_owned().await,
        };
        let guard = self
            .reposition(ts.topic, cursor.clone(), guard, from)
            .await?;
        Ok((cursor, guard))
    }

    /// [`Self::position`], off the async workers when it has to seek or
    /// assign: both wait on librdkafka's threads (a seek up to
    /// [`SEEK_TIMEOUT`]). A cursor already there costs no thread hop.
    async fn reposition(
        self: &Arc<Self>,
        topic: Topic,
        cursor: Arc<Cursor>,
        mut queue: OwnedMutexGuard<Option<PartitionQueue>>,
        from: u64,
    ) -> Result<OwnedMutexGuard<Option<PartitionQueue>>, LogError> {
        {
            let mut pos = lock(&cursor.pos);
            if queue.is_some() && pos.state == PosState::At(from) {
                pos.last_used = Instant::now();
                return Ok(queue);
            }
        }
        let inner = self.clone();
        tokio::task::spawn_blocking(move || {
            let ts = inner.topic(topic).expect("a topic of this log");
            inner
                .position(ts, &cursor, &mut queue, from)
                .map(|()| queue)
        })
        .await
        .map_err(|e| unavailable(format!("Kafka seek task failed: {e}")))?
    }

    /// Makes the cursor's queue yield `from` next: a seek if it is
    /// fetching elsewhere, else a new assignment. Only through
    /// [`Self::reposition`], which returns early for a cursor already there.
    fn position(
        &self,
        ts: &TopicState,
        cursor: &Cursor,
        queue: &mut Option<PartitionQueue>,
        from: u64,
    ) -> Result<(), LogError> {
        let mut pos = lock(&cursor.pos);
        pos.last_used = Instant::now();
        let consumer = &cursor.consumer.consumer;
        match pos.state {
            PosState::At(at) if queue.is_some() => {
                tracing::debug!(topic = %ts.name, partition = cursor.partition, at, from, "cursor seeks");
                match consumer.seek(
                    &ts.name,
                    cursor.partition as i32,
                    Offset::Offset(from as i64),
                    SEEK_TIMEOUT,
                ) {
                    Ok(()) => {
                        pos.state = PosState::At(from);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::debug!(topic = %ts.name, partition = cursor.partition, error = %e, "seek refused, assigning the partition again");
                        unassign(ts, cursor);
                    }
                }
            }
            PosState::At(_) | PosState::Stopped => unassign(ts, cursor),
            PosState::Unassigned => {}
        }
        pos.state = PosState::Unassigned;
        // Split before assigning: a queue split by the application keeps
        // its records when librdkafka starts the fetcher, which otherwise
        // routes them to the consumer's main queue. The former queue goes
        // first, as dropping it turns off the wake-ups of its partition.
        *queue = None;
        *queue = Some(
            consumer
                .split_partition_queue(&ts.name, cursor.partition as i32)
                .ok_or_else(|| {
                    unavailable(format!(
                        "cannot split a queue for Kafka topic `{}` partition {}",
                        ts.name, cursor.partition
                    ))
                })?,
        );
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &ts.name,
            cursor.partition as i32,
            Offset::Offset(from as i64),
        )
        .map_err(|e| unavailable(format!("invalid Kafka offset {from}: {e}")))?;
        consumer.incremental_assign(&tpl).map_err(|e| {
            unavailable(format!(
                "cannot assign Kafka topic `{}` partition {}: {e}",
                ts.name, cursor.partition
            ))
        })?;
        tracing::debug!(topic = %ts.name, partition = cursor.partition, from, "partition assigned to a cursor");
        pos.state = PosState::At(from);
        Ok(())
    }

    /// Unassigns cursors no one has read for [`CURSOR_IDLE`].
    fn reap_idle(&self) {
        for ts in &self.topics {
            for ps in &ts.partitions {
                for cursor in lock(&ps.cursors).iter() {
                    let Ok(_reading) = cursor.queue.try_lock() else {
                        continue;
                    };
                    let mut pos = lock(&cursor.pos);
                    if pos.state != PosState::Unassigned && pos.last_used.elapsed() >= CURSOR_IDLE {
                        unassign(ts, cursor);
                        pos.state = PosState::Unassigned;
                    }
                }
            }
        }
    }
}

fn unassign(ts: &TopicState, cursor: &Cursor) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&ts.name, cursor.partition as i32);
    if let Err(e) = cursor.consumer.consumer.incremental_unassign(&tpl) {
        tracing::warn!(topic = %ts.name, partition = cursor.partition, error = %e, "cannot unassign a Kafka partition");
    }
}

/// librdkafka's watermarks of `partition` from its last fetch response, if
/// any, without a request.
fn fetched_watermarks(
    consumer: &StreamConsumer,
    topic: &CStr,
    partition: u32,
) -> Option<(i64, i64)> {
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client handle lives as long as `consumer`, `topic` is a
    // NUL-terminated string that outlives the call, and `low` and `high`
    // are valid for writes. rdkafka exposes no safe wrapper for this
    // lookup of the cached values (only `fetch_watermarks`, which asks
    // the broker).
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition as i32,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR).then_some((low, high))
}

/// Serves a reader consumer's main queue, where librdkafka reports
/// client-wide errors (every partition's records go to split queues).
async fn serve_main_queue(consumer: Arc<StreamConsumer>, topic: String) {
    loop {
        match consumer.recv().await {
            Ok(m) => tracing::warn!(
                topic = %topic,
                partition = m.partition(),
                offset = m.offset(),
                "record on a Kafka consumer's main queue ignored"
            ),
            Err(e) => tracing::warn!(topic = %topic, error = %e, "Kafka consumer error"),
        }
    }
}

async fn reap_idle_cursors(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.reap_idle();
    }
}

fn kind_of(message: &BorrowedMessage<'_>) -> RecordKind {
    let Some(headers) = message.headers() else {
        return RecordKind::OrderJson;
    };
    match headers.iter().find(|h| h.key == KIND_HEADER) {
        None => RecordKind::OrderJson,
        Some(h) if h.value == Some(KIND_INTERNAL) => RecordKind::Internal,
        // A header no version of orderflow writes: it is no upstream order
        // JSON; as an internal message the processor refuses it, the same
        // way on every replay.
        Some(h) => {
            // Its length only: the value is anyone's bytes (a card number).
            tracing::warn!(
                offset = message.offset(),
                value_bytes = h.value.map_or(0, <[u8]>::len),
                "unknown {KIND_HEADER} header; read as an internal record"
            );
            RecordKind::Internal
        }
    }
}

fn kind_header(kind: RecordKind) -> Option<OwnedHeaders> {
    match kind {
        RecordKind::OrderJson => None,
        RecordKind::Internal => Some(OwnedHeaders::new().insert(Header {
            key: KIND_HEADER,
            value: Some(KIND_INTERNAL),
        })),
    }
}

fn to_log_record(message: &BorrowedMessage<'_>) -> LogRecord {
    LogRecord {
        offset: message.offset().max(0) as u64,
        timestamp_ms: message.timestamp().to_millis().unwrap_or(0).max(0) as u64,
        kind: kind_of(message),
        key: message.key().unwrap_or_default().to_vec(),
        value: message.payload().unwrap_or_default().to_vec(),
    }
}

/// Errors of a partition leader in transition, which clear by themselves.
fn is_transient(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::FencedLeaderEpoch
                | RDKafkaErrorCode::UnknownLeaderEpoch
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::NetworkException
        )
    )
}

fn is_out_of_range(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange)
    )
}

#[async_trait]
impl Log for KafkaLog {
    fn partition_count(&self, topic: Topic) -> u32 {
        self.inner
            .topic(topic)
            .map_or(0, |t| t.partitions.len() as u32)
    }

    /// An empty `records` writes nothing and returns the high watermark.
    async fn append(
        &self,
        topic: Topic,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<u64, LogError> {
        let inner = &self.inner;
        let (ts, ps) = inner.partition(topic, partition)?;
        if inner.closed.load(Ordering::Acquire) {
            return Err(unavailable("log closed"));
        }
        for record in &records {
            let size_bytes = record.key.len() + record.value.len();
            if size_bytes > inner.max_record_bytes {
                return Err(LogError::RecordTooLarge {
                    size_bytes,
                    max_bytes: inner.max_record_bytes,
                });
            }
        }
        if records.is_empty() {
            return Ok(inner.watermarks(topic, partition).await?.1);
        }
        let started = Instant::now();
        let queue_deadline = started + inner.request_timeout;
        let mut deliveries = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            let mut future_record = FutureRecord::to(&ts.name)
                .partition(partition as i32)
                .key(record.key.as_slice())
                .payload(record.value.as_slice());
            if let Some(headers) = kind_header(record.kind) {
                future_record = future_record.headers(headers);
            }
            loop {
                match inner.producer.send_result(future_record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if i == 0 =>
                    {
                        return Err(LogError::Full {
                            depth: PRODUCER_QUEUE_RECORDS,
                        });
                    }
                    // Part of the batch is queued already: failing now
                    // would write a prefix, so wait for room instead.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if Instant::now() < queue_deadline =>
                    {
                        future_record = back;
                        tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                    }
                    Err((e, _)) => {
                        return Err(unavailable(format!(
                            "cannot queue record {i} of {} for Kafka topic `{}` partition {partition} \
                             (the records before it may still be written): {e}",
                            records.len(),
                            ts.name
                        )));
                    }
                }
            }
        }
        let mut first_offset = None;
        let mut last_offset = 0;
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(d)) => {
                    let offset = d.offset.max(0) as u64;
                    first_offset.get_or_insert(offset);
                    last_offset = last_offset.max(offset);
                }
                Ok(Err((e, _))) => {
                    let hint = match e.rdkafka_error_code() {
                        Some(RDKafkaErrorCode::MessageTimedOut) => format!(
                            " (not acknowledged by all in-sync replicas within {} ms)",
                            inner.request_timeout.as_millis()
                        ),
                        Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                            " (the topic's max.message.bytes is below log.max_record_bytes)".into()
                        }
                        _ => String::new(),
                    };
                    return Err(unavailable(format!(
                        "append to Kafka topic `{}` partition {partition} failed: {e}{hint}",
                        ts.name
                    )));
                }
                Err(_) => return Err(unavailable("Kafka producer shut down")),
            }
        }
        ps.high.fetch_max(last_offset + 1, Ordering::AcqRel);
        ts.append_latency.observe(started.elapsed().as_secs_f64());
        Ok(first_offset.expect("at least one record was delivered"))
    }

    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max_records: usize,
        wait: Duration,
    ) -> Result<Vec<LogRecord>, LogError> {
        let inner = &self.inner;
        let (ts, ps) = inner.partition(topic, partition)?;
        let (low, high) = inner.watermarks(topic, partition).await?;
        if from < low {
            return Err(inner.out_of_range(ts, partition, from));
        }
        if max_records == 0 {
            return Ok(Vec::new());
        }
        // Records known to be there are fetched even with no `wait` (a
        // replay reads with none), as the embedded log returns them.
        let wait = if from < high {
            wait.max(inner.request_timeout)
        } else {
            wait
        };
        let deadline = tokio::time::Instant::now().checked_add(wait);
        let (cursor, mut queue) = inner.acquire(ts, partition, from).await?;
        let mut repositioned = false;
        let mut records = Vec::new();
        let mut stopped = false;
        loop {
            let Some(q) = queue.as_ref() else {
                return Err(unavailable("Kafka cursor lost its queue"));
            };
            let mut stream = q.stream();
            let first = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(m) => m,
                    Err(_) => break,
                },
                None => stream.next().await,
            };
            let Some(first) = first else { break };
            match first {
                Ok(m) if (m.offset() as u64) < from || m.offset() < 0 => continue,
                Ok(m) => records.push(to_log_record(&m)),
                Err(e) if is_out_of_range(&e) => {
                    drop(stream);
                    lock(&cursor.pos).state = PosState::Stopped;
                    let inner2 = self.inner.clone();
                    tokio::task::spawn_blocking(move || {
                        let ts = inner2.topic(topic).expect("checked above");
                        inner2.query_watermarks(ts, partition)
                    })
                    .await
                    .map_err(|e| unavailable(format!("Kafka offsets task failed: {e}")))??;
                    let (low, high) = ps.get();
                    if from < low || from > high || repositioned {
                        return Err(inner.out_of_range(ts, partition, from));
                    }
                    // Retention or a leader change raced the fetch; once more.
                    repositioned = true;
                    queue = inner.reposition(topic, cursor.clone(), queue, from).await?;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(topic = %ts.name, partition, error = %e, "Kafka fetch error");
                    continue;
                }
            }
            // Whatever else is fetched already, without waiting.
            let mut bytes = records.iter().map(LogRecord::size_bytes).sum::<usize>();
            while records.len() < max_records && bytes < READ_MAX_BYTES {
                match stream.next().now_or_never() {
                    Some(Some(Ok(m))) => {
                        let last = records.last().map_or(from, |r: &LogRecord| r.offset);
                        if m.offset() >= 0 && m.offset() as u64 > last {
                            let record = to_log_record(&m);
                            bytes += record.size_bytes();
                            records.push(record);
                        }
                    }
                    Some(Some(Err(e))) => {
                        tracing::warn!(topic = %ts.name, partition, error = %e, "Kafka fetch error");
                        stopped = is_out_of_range(&e);
                        break;
                    }
                    Some(None) | None => break,
                }
            }
            break;
        }
        let mut pos = lock(&cursor.pos);
        pos.last_used = Instant::now();
        if let Some(last) = records.last() {
            ps.high.fetch_max(last.offset + 1, Ordering::AcqRel);
            // Unless `forget` unassigned it meanwhile.
            if let PosState::At(_) = pos.state {
                pos.state = PosState::At(last.offset + 1);
            }
        }
        if stopped {
            pos.state = PosState::Stopped;
        }
        Ok(records)
    }

    /// The first call for a partition asks its leader (a round trip, on
    /// a blocking thread); later ones answer from memory.
    async fn offsets(&self, topic: Topic, partition: u32) -> Result<(u64, u64), LogError> {
        self.inner.watermarks(topic, partition).await
    }

    /// Kafka deletes by its own retention (see the module documentation).
    fn release_before(&self, _topic: Topic, _partition: u32, _offset: u64) {}

    /// Stops fetching `partition` and forgets its watermarks, so that the
    /// next `offsets` asks the leader again: the new owner has appended
    /// meanwhile.
    fn forget(&self, topic: Topic, partition: u32) {
        let Ok((ts, ps)) = self.inner.partition(topic, partition) else {
            return;
        };
        ps.known.store(false, Ordering::Release);
        for cursor in lock(&ps.cursors).iter() {
            let mut pos = lock(&cursor.pos);
            if pos.state != PosState::Unassigned {
                unassign(ts, cursor);
                pos.state = PosState::Unassigned;
            }
        }
    }

    async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let producer = self.inner.producer.clone();
        let timeout = self.inner.request_timeout;
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "Kafka producer not flushed on close");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names follow the prefix, as other deployments sharing a cluster expect.
    #[test]
    fn topic_names() {
        assert_eq!(topic_name("", Topic::Orders), "orders");
        assert_eq!(topic_name("t1.", Topic::OrderStatus), "t1.order-status");
    }

    /// Only orderflow's own records carry the kind header.
    #[test]
    fn kind_header_only_for_internal() {
        assert!(kind_header(RecordKind::OrderJson).is_none());
        let h = kind_header(RecordKind::Internal).unwrap();
        assert_eq!(h.count(), 1);
        assert_eq!(h.get(0).key, KIND_HEADER);
        assert_eq!(h.get(0).value, Some(KIND_INTERNAL));
    }
}
