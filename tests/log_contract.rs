//! The `Log` contract, one suite run against both backends: the embedded
//! segment log in a temporary directory and Kafka on the test broker
//! (`scripts/kafka`, or `ORDERFLOW_TEST_KAFKA`), each test on topics of its
//! own. A few Kafka-only tests cover what only Kafka has: other clients
//! producing to the topics, and topics that already exist.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use orderflow::config::{KafkaConfig, LogConfig, PropertyValue};
use orderflow::pipeline::log::embedded::EmbeddedLog;
use orderflow::pipeline::log::kafka::{KafkaLog, topic_name};
use orderflow::pipeline::log::{
    Log, LogError, LogRecord, READ_MAX_BYTES, Record, RecordKind, Topic, append_keyed,
    partition_for_key,
};
use orderflow::telemetry::metrics::Metrics;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const ORDERS_PARTITIONS: u32 = 6;
const STATUS_PARTITIONS: u32 = 2;
const TOPICS: [(Topic, u32); 2] = [
    (Topic::Orders, ORDERS_PARTITIONS),
    (Topic::OrderStatus, STATUS_PARTITIONS),
];
const MAX_RECORD_BYTES: usize = 4096;
/// Long enough for any fetch on a loaded test machine; reads return as soon
/// as a record is there.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
enum Backend {
    Embedded,
    Kafka,
}

struct Fixture {
    log: Arc<dyn Log>,
    metrics: Arc<Metrics>,
    /// Kafka only: the configuration the log was connected with.
    kafka: Option<KafkaConfig>,
    _dir: Option<tempfile::TempDir>,
}

fn kafka_config() -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: support::kafka_bootstrap(),
        topic_prefix: format!("{}.", support::unique_name("t")),
        ..KafkaConfig::default()
    }
}

async fn connect_kafka(config: &KafkaConfig, metrics: Arc<Metrics>) -> KafkaLog {
    KafkaLog::connect(config, &TOPICS, MAX_RECORD_BYTES, metrics)
        .await
        .expect("connect to Kafka")
}

impl Fixture {
    async fn open(backend: Backend) -> Fixture {
        Fixture::open_with(backend, |_| {}).await
    }

    /// A fixture whose Kafka client is configured by `tune` as well.
    async fn open_with(
        backend: Backend,
        tune: impl FnOnce(&mut KafkaConfig) + Send + 'static,
    ) -> Fixture {
        let metrics = Arc::new(Metrics::new());
        match backend {
            Backend::Embedded => {
                let dir = tempfile::tempdir().unwrap();
                let config = LogConfig {
                    max_record_bytes: MAX_RECORD_BYTES,
                    ..LogConfig::default()
                };
                let log = EmbeddedLog::open(dir.path(), &TOPICS, &config, metrics.clone())
                    .expect("open the embedded log");
                Fixture {
                    log: Arc::new(log),
                    metrics,
                    kafka: None,
                    _dir: Some(dir),
                }
            }
            Backend::Kafka => {
                let config = tokio::task::spawn_blocking(|| {
                    let mut config = kafka_config();
                    tune(&mut config);
                    config
                })
                .await
                .unwrap();
                let log = connect_kafka(&config, metrics.clone()).await;
                Fixture {
                    log: Arc::new(log),
                    metrics,
                    kafka: Some(config),
                    _dir: None,
                }
            }
        }
    }

    /// Writes `value` under `key` to `partition` of `orders` the way an
    /// upstream producer does: for Kafka, a plain client with no header;
    /// for the embedded log, a record flagged as order JSON.
    async fn produce_plain(&self, partition: u32, key: &[u8], value: &[u8]) -> u64 {
        match &self.kafka {
            None => self
                .log
                .append(
                    Topic::Orders,
                    partition,
                    vec![record(RecordKind::OrderJson, key, value)],
                )
                .await
                .unwrap(),
            Some(config) => {
                let producer = plain_producer(config);
                let topic = topic_name(&config.topic_prefix, Topic::Orders);
                let delivery = producer
                    .send(
                        FutureRecord::to(&topic)
                            .partition(partition as i32)
                            .key(key)
                            .payload(value),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .expect("plain produce");
                delivery.offset as u64
            }
        }
    }
}

/// A producer as any upstream system would configure it: none of
/// orderflow's settings, only librdkafka's Java-compatible partitioner.
fn plain_producer(config: &KafkaConfig) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap_servers)
        .set("partitioner", "murmur2_random")
        .create()
        .expect("plain producer")
}

fn record(kind: RecordKind, key: &[u8], value: &[u8]) -> Record {
    Record {
        kind,
        key: key.to_vec(),
        value: value.to_vec(),
    }
}

fn internal(key: &str, value: &str) -> Record {
    record(RecordKind::Internal, key.as_bytes(), value.as_bytes())
}

/// Reads `count` records of one partition from `from`, in batches of at
/// most `batch`, checking that offsets only go up.
async fn read_n(
    log: &dyn Log,
    topic: Topic,
    partition: u32,
    from: u64,
    count: usize,
    batch: usize,
) -> Vec<LogRecord> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out: Vec<LogRecord> = Vec::with_capacity(count);
    let mut next = from;
    while out.len() < count {
        assert!(
            Instant::now() < deadline,
            "read {} of {count} records of {topic:?}/{partition}",
            out.len()
        );
        let records = log
            .read(topic, partition, next, batch, Duration::from_millis(500))
            .await
            .unwrap();
        assert!(records.len() <= batch, "at most max_records");
        for r in records {
            assert!(r.offset >= next, "offsets go up: {} after {next}", r.offset);
            next = r.offset + 1;
            out.push(r);
        }
    }
    out
}

/// Runs each contract case as one test per backend.
macro_rules! contract {
    ($($(#[doc = $doc:expr])+ $name:ident;)+) => {
        mod embedded {
            $(
                $(#[doc = $doc])+
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::Embedded).await
                }
            )+
        }
        mod kafka {
            $(
                $(#[doc = $doc])+
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::Kafka).await
                }
            )+
        }
    };
}

contract! {
    /// Appended records read back in order, with their kinds, keys, values and log timestamps.
    append_then_read;
    /// `offsets` is (0, 0) on an empty partition and `high` moves with every append.
    offsets_follow_appends;
    /// A read at the end waits up to `wait`, returns empty, and returns early when a record comes.
    read_waits_then_returns_empty;
    /// Reading again from an earlier offset after reading further returns the same records.
    reread_from_earlier_offset;
    /// Every partition read by a task of its own gets exactly its records, in order.
    partitions_read_concurrently;
    /// Two readers of one partition at different positions both get every record.
    two_readers_of_one_partition;
    /// A record above the limit fails the whole append and writes nothing; one at the limit fits.
    record_too_large;
    /// `append_keyed` writes each key to the partition murmur2 gives it.
    append_keyed_follows_murmur2;
    /// A record written as upstream producers do, without a kind, reads back as order JSON.
    plain_record_reads_as_order_json;
    /// Reading past the end is out of range, and reading a valid offset afterwards still works.
    read_past_end_is_out_of_range;
    /// Reads dropped mid-way (as `select!` drops them) lose no record.
    cancelled_reads_lose_nothing;
    /// A read of large records stops at READ_MAX_BYTES (plus the record that crossed it), whatever count it asks.
    reads_are_bounded_in_bytes;
}

async fn append_then_read(backend: Backend) {
    let f = Fixture::open(backend).await;
    let log = f.log.as_ref();
    let json = br#"{"order_id":"ord-1","lines":[]}"#;
    let records = vec![
        internal("SKU-1", "first"),
        record(RecordKind::OrderJson, b"SKU-2", json),
        internal("", "third, empty key"),
    ];
    let first = log.append(Topic::Orders, 1, records.clone()).await.unwrap();
    assert_eq!(first, 0, "a new partition starts at offset 0");
    let second = log
        .append(Topic::Orders, 1, vec![internal("SKU-3", "fourth")])
        .await
        .unwrap();
    assert_eq!(second, 3);

    let read = read_n(log, Topic::Orders, 1, 0, 4, 10).await;
    let mut expected = records;
    expected.push(internal("SKU-3", "fourth"));
    for (i, (got, want)) in read.iter().zip(&expected).enumerate() {
        assert_eq!(got.offset, i as u64);
        assert_eq!(got.kind, want.kind, "kind of record {i}");
        assert_eq!(got.key, want.key, "key of record {i}");
        assert_eq!(got.value, want.value, "value of record {i}");
        assert!(got.timestamp_ms > 1_600_000_000_000, "stamped by the log");
    }
    assert!(
        read.windows(2)
            .all(|w| w[0].timestamp_ms <= w[1].timestamp_ms),
        "log time never goes back within a partition"
    );
    let appends = f
        .metrics
        .log_append_latency
        .with_label_values(&["orders"])
        .get_sample_count();
    assert_eq!(appends, 2, "every append is timed");
}

async fn offsets_follow_appends(backend: Backend) {
    let f = Fixture::open(backend).await;
    let log = f.log.as_ref();
    assert_eq!(log.offsets(Topic::Orders, 2).await.unwrap(), (0, 0));
    log.append(
        Topic::Orders,
        2,
        vec![internal("a", "1"), internal("a", "2")],
    )
    .await
    .unwrap();
    assert_eq!(log.offsets(Topic::Orders, 2).await.unwrap(), (0, 2));
    log.append(
        Topic::Orders,
        2,
        vec![internal("a", "3"), internal("a", "4"), internal("a", "5")],
    )
    .await
    .unwrap();
    assert_eq!(log.offsets(Topic::Orders, 2).await.unwrap(), (0, 5));
    assert_eq!(
        log.offsets(Topic::Orders, 3).await.unwrap(),
        (0, 0),
        "other partitions do not move"
    );
    assert_eq!(log.offsets(Topic::OrderStatus, 0).await.unwrap(), (0, 0));
    assert!(matches!(
        log.offsets(Topic::Orders, ORDERS_PARTITIONS).await,
        Err(LogError::NoSuchPartition { .. })
    ));
}

async fn read_waits_then_returns_empty(backend: Backend) {
    let f = Fixture::open(backend).await;
    let log = f.log.clone();
    let started = Instant::now();
    let records = log
        .read(Topic::Orders, 3, 0, 10, Duration::from_millis(400))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(records.is_empty());
    assert!(
        waited >= Duration::from_millis(350),
        "returned after {waited:?}, before the wait was over"
    );

    let writer = log.clone();
    let append = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer
            .append(Topic::Orders, 3, vec![internal("k", "late")])
            .await
            .unwrap()
    });
    let started = Instant::now();
    let records = log
        .read(Topic::Orders, 3, 0, 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(append.await.unwrap(), 0);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].value, b"late");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "a record ends the wait"
    );
}

async fn reread_from_earlier_offset(backend: Backend) {
    let f = Fixture::open(backend).await;
    let log = f.log.as_ref();
    let records: Vec<Record> = (0..20).map(|i| internal("k", &format!("r{i}"))).collect();
    log.append(Topic::Orders, 4, records).await.unwrap();
    let value = |r: &LogRecord| String::from_utf8(r.value.clone()).unwrap();

    let all = read_n(log, Topic::Orders, 4, 0, 20, 100).await;
    assert_eq!(
        all.iter().map(value).collect::<Vec<_>>(),
        (0..20).map(|i| format!("r{i}")).collect::<Vec<_>>()
    );

    for (from, n) in [(5, 3), (15, 5), (0, 2), (2, 18), (19, 1)] {
        let again = read_n(log, Topic::Orders, 4, from, n, n).await;
        let offsets: Vec<u64> = again.iter().map(|r| r.offset).collect();
        assert_eq!(
            offsets,
            (from..from + n as u64).collect::<Vec<_>>(),
            "from {from}"
        );
        assert_eq!(value(&again[0]), format!("r{from}"));
    }
    let end = log
        .read(Topic::Orders, 4, 20, 10, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(end.is_empty(), "nothing after the last record");
}

async fn partitions_read_concurrently(backend: Backend) {
    const PER_PARTITION: usize = 60;
    let f = Fixture::open(backend).await;
    let readers: Vec<_> = (0..ORDERS_PARTITIONS)
        .map(|p| {
            let log = f.log.clone();
            tokio::spawn(async move {
                read_n(log.as_ref(), Topic::Orders, p, 0, PER_PARTITION, 7).await
            })
        })
        .collect();
    // Interleaved across partitions, while the readers wait.
    for round in 0..PER_PARTITION / 5 {
        for p in 0..ORDERS_PARTITIONS {
            let batch = (0..5)
                .map(|i| internal(&format!("p{p}"), &format!("{}", round * 5 + i)))
                .collect();
            f.log.append(Topic::Orders, p, batch).await.unwrap();
        }
    }
    for (p, reader) in readers.into_iter().enumerate() {
        let records = reader.await.unwrap();
        assert_eq!(records.len(), PER_PARTITION);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.offset, i as u64, "partition {p}");
            assert_eq!(r.key, format!("p{p}").into_bytes(), "partition {p}");
            assert_eq!(r.value, i.to_string().into_bytes(), "partition {p}");
        }
    }
}

async fn two_readers_of_one_partition(backend: Backend) {
    const COUNT: usize = 200;
    let f = Fixture::open(backend).await;
    let records: Vec<Record> = (0..COUNT).map(|i| internal("o", &i.to_string())).collect();
    f.log.append(Topic::OrderStatus, 1, records).await.unwrap();
    // A fast reader in big batches and a slow one in small batches, as the
    // tracking and notification sinks read the same partition.
    let fast = {
        let log = f.log.clone();
        tokio::spawn(async move { read_n(log.as_ref(), Topic::OrderStatus, 1, 0, COUNT, 64).await })
    };
    let slow = {
        let log = f.log.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let mut next = 0;
            while out.len() < COUNT {
                let batch = read_n(
                    log.as_ref(),
                    Topic::OrderStatus,
                    1,
                    next,
                    3.min(COUNT - out.len()),
                    3,
                )
                .await;
                next = batch.last().unwrap().offset + 1;
                out.extend(batch);
                tokio::task::yield_now().await;
            }
            out
        })
    };
    for records in [fast.await.unwrap(), slow.await.unwrap()] {
        let values: Vec<Vec<u8>> = records.iter().map(|r| r.value.clone()).collect();
        let want: Vec<Vec<u8>> = (0..COUNT).map(|i| i.to_string().into_bytes()).collect();
        assert_eq!(values, want);
    }
}

async fn record_too_large(backend: Backend) {
    let f = Fixture::open(backend).await;
    let log = f.log.as_ref();
    let key = b"SKU-big".to_vec();
    let too_big = record(
        RecordKind::Internal,
        &key,
        &vec![b'x'; MAX_RECORD_BYTES - key.len() + 1],
    );
    let err = log
        .append(Topic::Orders, 5, vec![internal("ok", "fits"), too_big])
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    match err {
        LogError::RecordTooLarge {
            size_bytes,
            max_bytes,
        } => {
            assert_eq!(size_bytes, MAX_RECORD_BYTES + 1);
            assert_eq!(max_bytes, MAX_RECORD_BYTES);
        }
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    assert_eq!(
        log.offsets(Topic::Orders, 5).await.unwrap(),
        (0, 0),
        "nothing of the batch was written"
    );

    let at_limit = record(
        RecordKind::Internal,
        &key,
        &vec![b'y'; MAX_RECORD_BYTES - key.len()],
    );
    let offset = log
        .append(Topic::Orders, 5, vec![at_limit.clone()])
        .await
        .unwrap();
    let read = read_n(log, Topic::Orders, 5, offset, 1, 1).await;
    assert_eq!(read[0].value, at_limit.value, "a record at the limit fits");
}

async fn reads_are_bounded_in_bytes(backend: Backend) {
    // Kafka: fetches large enough to bring every record at once, so that
    // only the bound cuts the read.
    let f = Fixture::open_with(backend, |config| {
        for key in ["max.partition.fetch.bytes", "fetch.max.bytes"] {
            config.client.insert(
                key.into(),
                PropertyValue::Integer(4 * READ_MAX_BYTES as i64),
            );
        }
    })
    .await;
    let log = f.log.as_ref();
    let big = record(
        RecordKind::Internal,
        b"k",
        &vec![b'z'; MAX_RECORD_BYTES - 1],
    );
    let count = READ_MAX_BYTES / MAX_RECORD_BYTES + 64;
    for _ in 0..count / 64 {
        log.append(Topic::Orders, 2, vec![big.clone(); 64])
            .await
            .unwrap();
    }
    let (mut next, mut reads) = (0, 0);
    while next < count as u64 {
        let records = log.read(Topic::Orders, 2, next, count, WAIT).await.unwrap();
        let bytes: usize = records.iter().map(LogRecord::size_bytes).sum();
        assert!(
            bytes < READ_MAX_BYTES + MAX_RECORD_BYTES,
            "a read of {} records, {bytes} bytes",
            records.len()
        );
        next = records.last().expect("records are there").offset + 1;
        reads += 1;
    }
    assert!(reads >= 2, "{reads} reads");
}

async fn append_keyed_follows_murmur2(backend: Backend) {
    let f = Fixture::open(backend).await;
    let log = f.log.as_ref();
    let mut placed = Vec::new();
    for i in 0..40 {
        let key = format!("SKU-{i}");
        let (partition, offset) =
            append_keyed(log, Topic::Orders, internal(&key, &format!("v{i}")))
                .await
                .unwrap();
        assert_eq!(
            partition,
            partition_for_key(key.as_bytes(), ORDERS_PARTITIONS),
            "{key}"
        );
        placed.push((key, partition, offset));
    }
    assert!(
        placed
            .iter()
            .map(|p| p.1)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1,
        "keys spread over partitions"
    );
    for (key, partition, offset) in placed {
        let read = read_n(log, Topic::Orders, partition, offset, 1, 1).await;
        assert_eq!(read[0].offset, offset);
        assert_eq!(read[0].key, key.into_bytes());
    }
}

async fn plain_record_reads_as_order_json(backend: Backend) {
    let f = Fixture::open(backend).await;
    let body = br#"{"order_id":"ord-1001","customer_id":"cus-42","currency":"USD","lines":[{"sku":"SKU-1","quantity":2,"unit_price":1999}],"payment":{"token":"tok_visa"}}"#;
    let offset = f.produce_plain(0, b"SKU-1", body).await;
    f.log
        .append(Topic::Orders, 0, vec![internal("SKU-1", "envelope")])
        .await
        .unwrap();
    let read = read_n(f.log.as_ref(), Topic::Orders, 0, offset, 2, 10).await;
    assert_eq!(read[0].kind, RecordKind::OrderJson);
    assert_eq!(read[0].key, b"SKU-1");
    assert_eq!(read[0].value, body);
    assert_eq!(
        read[1].kind,
        RecordKind::Internal,
        "orderflow's own records stay apart"
    );
}

async fn read_past_end_is_out_of_range(backend: Backend) {
    let f = Fixture::open(backend).await;
    let log = f.log.as_ref();
    log.append(
        Topic::Orders,
        5,
        vec![internal("k", "0"), internal("k", "1")],
    )
    .await
    .unwrap();
    match log.read(Topic::Orders, 5, 7, 10, WAIT).await {
        Err(LogError::OffsetOutOfRange {
            offset, low, high, ..
        }) => assert_eq!((offset, low, high), (7, 0, 2)),
        other => panic!("expected OffsetOutOfRange, got {other:?}"),
    }
    let read = read_n(log, Topic::Orders, 5, 1, 1, 10).await;
    assert_eq!(read[0].value, b"1");
}

async fn cancelled_reads_lose_nothing(backend: Backend) {
    const COUNT: u64 = 150;
    let f = Fixture::open(backend).await;
    let writer = f.log.clone();
    let append = tokio::spawn(async move {
        for i in 0..COUNT {
            writer
                .append(Topic::Orders, 0, vec![internal("k", &i.to_string())])
                .await
                .unwrap();
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next = 0;
    let mut cancelled = 0;
    let mut round: u64 = 0;
    while next < COUNT {
        assert!(Instant::now() < deadline, "stuck at {next}");
        round += 1;
        let limit = Duration::from_micros(200 + round * 7919 % 3000);
        let read = f
            .log
            .read(Topic::Orders, 0, next, 4, Duration::from_secs(5));
        match tokio::time::timeout(limit, read).await {
            Err(_) => cancelled += 1,
            Ok(records) => {
                for r in records.unwrap() {
                    assert_eq!(r.offset, next, "no record skipped");
                    assert_eq!(r.value, next.to_string().into_bytes());
                    next += 1;
                }
            }
        }
    }
    append.await.unwrap();
    assert!(cancelled > 0, "some reads were cancelled");
}

/// While a partition is read, `offsets` follows other producers' appends without asking the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_offsets_follow_other_producers() {
    let f = Fixture::open(Backend::Kafka).await;
    let log = f.log.as_ref();
    assert_eq!(log.offsets(Topic::Orders, 4).await.unwrap(), (0, 0));
    assert!(
        log.read(Topic::Orders, 4, 0, 10, Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty()
    );
    for i in 0..3 {
        f.produce_plain(4, b"k", i.to_string().as_bytes()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while log.offsets(Topic::Orders, 4).await.unwrap() != (0, 3) {
        assert!(
            Instant::now() < deadline,
            "offsets stayed at {:?}",
            log.offsets(Topic::Orders, 4).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain librdkafka producer (`murmur2_random`, no partition given) puts keys where `partition_for_key` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_other_producers_partition_like_partition_for_key() {
    let f = Fixture::open(Backend::Kafka).await;
    let config = f.kafka.as_ref().unwrap();
    let producer = plain_producer(config);
    let topic = topic_name(&config.topic_prefix, Topic::Orders);
    let mut sends = Vec::new();
    for i in 0..300u32 {
        // Lengths 1 to 40 cover every murmur2 tail length.
        let key = format!("{i}-{}", "k".repeat((i % 37) as usize)).into_bytes();
        let send = producer.send_result(FutureRecord::to(&topic).key(&key).payload("{}"));
        let delivery = match send {
            Ok(d) => d,
            Err((e, _)) => panic!("queue: {e}"),
        };
        sends.push((key, delivery));
    }
    for (key, delivery) in sends {
        let d = delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
        assert_eq!(
            d.partition as u32,
            partition_for_key(&key, ORDERS_PARTITIONS),
            "key {:?}",
            String::from_utf8_lossy(&key)
        );
    }
}

/// Connecting to topics that exist with another partition count fails and says which and how.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_partition_count_mismatch_is_refused() {
    let f = Fixture::open(Backend::Kafka).await;
    let config = f.kafka.clone().unwrap();
    let topics = [(Topic::Orders, 4), (Topic::OrderStatus, STATUS_PARTITIONS)];
    let err = match KafkaLog::connect(&config, &topics, MAX_RECORD_BYTES, Arc::new(Metrics::new()))
        .await
    {
        Ok(_) => panic!("connected with 4 partitions to a topic of {ORDERS_PARTITIONS}"),
        Err(e) => e.to_string(),
    };
    let name = topic_name(&config.topic_prefix, Topic::Orders);
    assert!(err.contains(&format!("`{name}`")), "{err}");
    assert!(
        err.contains(&format!("has {ORDERS_PARTITIONS} partitions")),
        "{err}"
    );
    assert!(err.contains("configured for 4"), "{err}");
}

/// Record time is the broker's append time, whatever time the producer set.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_record_time_is_log_append_time() {
    let f = Fixture::open(Backend::Kafka).await;
    let config = f.kafka.as_ref().unwrap();
    let topic = topic_name(&config.topic_prefix, Topic::Orders);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    plain_producer(config)
        .send(
            FutureRecord::to(&topic)
                .partition(2)
                .key("k")
                .payload("{}")
                .timestamp(1_000),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let read = read_n(f.log.as_ref(), Topic::Orders, 2, 0, 1, 1).await;
    assert!(
        read[0].timestamp_ms + 60_000 >= before,
        "timestamp {} is the producer's, not the broker's",
        read[0].timestamp_ms
    );
}

/// After `forget`, offsets come from the leader again and reading resumes where asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_forget_then_read_again() {
    let f = Fixture::open(Backend::Kafka).await;
    let log = f.log.as_ref();
    log.append(
        Topic::Orders,
        1,
        (0..5).map(|i| internal("k", &i.to_string())).collect(),
    )
    .await
    .unwrap();
    assert_eq!(read_n(log, Topic::Orders, 1, 0, 5, 10).await.len(), 5);
    assert_eq!(log.offsets(Topic::Orders, 1).await.unwrap(), (0, 5));

    log.forget(Topic::Orders, 1);
    let other = connect_kafka(f.kafka.as_ref().unwrap(), Arc::new(Metrics::new())).await;
    other
        .append(
            Topic::Orders,
            1,
            (5..8).map(|i| internal("k", &i.to_string())).collect(),
        )
        .await
        .unwrap();
    assert_eq!(
        log.offsets(Topic::Orders, 1).await.unwrap(),
        (0, 8),
        "asked the leader again"
    );
    let read = read_n(log, Topic::Orders, 1, 3, 5, 10).await;
    let values: Vec<Vec<u8>> = read.iter().map(|r| r.value.clone()).collect();
    let want: Vec<Vec<u8>> = (3..8).map(|i: i32| i.to_string().into_bytes()).collect();
    assert_eq!(values, want);
}

/// `orders-parked` is created with the configured `retention.ms`; `orders` keeps the broker's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_parked_topic_has_a_retention() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    let config = KafkaConfig {
        parked_retention_ms: 3_600_000,
        ..kafka_config()
    };
    let topics = [(Topic::Orders, 1), (Topic::Parked, 1)];
    KafkaLog::connect(&config, &topics, MAX_RECORD_BYTES, Arc::new(Metrics::new()))
        .await
        .expect("connect to Kafka");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap_servers)
        .create()
        .unwrap();
    let parked = topic_name(&config.topic_prefix, Topic::Parked);
    let orders = topic_name(&config.topic_prefix, Topic::Orders);
    let specifiers = [
        ResourceSpecifier::Topic(&parked),
        ResourceSpecifier::Topic(&orders),
    ];
    let results = admin
        .describe_configs(&specifiers, &AdminOptions::new())
        .await
        .unwrap();
    let retention: Vec<Option<String>> = results
        .into_iter()
        .map(|r| r.unwrap().get("retention.ms").and_then(|e| e.value.clone()))
        .collect();
    assert_eq!(retention[0].as_deref(), Some("3600000"));
    assert_ne!(retention[1].as_deref(), Some("3600000"));
}
