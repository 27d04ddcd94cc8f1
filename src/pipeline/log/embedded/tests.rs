use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::pipeline::log::RecordKind;

fn config() -> LogConfig {
    LogConfig {
        segment_size_bytes: 1 << 20,
        retention_bytes: 1 << 30,
        max_record_bytes: 4096,
        append_queue_depth: 1024,
        max_batch_records: 512,
        fsync: true,
    }
}

const TOPICS: [(Topic, u32); 2] = [(Topic::Orders, 4), (Topic::OrderStatus, 2)];

fn open(dir: &Path, config: &LogConfig) -> EmbeddedLog {
    EmbeddedLog::open(dir, &TOPICS, config, Arc::new(Metrics::new())).expect("open log")
}

fn record(key: &str, value: &str) -> Record {
    Record {
        kind: RecordKind::Internal,
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

/// Reads `[from, high)` in chunks of `chunk` records.
async fn read_all(
    log: &EmbeddedLog,
    topic: Topic,
    partition: u32,
    from: u64,
    chunk: usize,
) -> Vec<LogRecord> {
    let (_, high) = log.offsets(topic, partition).await.unwrap();
    let mut out = Vec::new();
    let mut next = from;
    while next < high {
        let batch = log
            .read(topic, partition, next, chunk, Duration::ZERO)
            .await
            .unwrap();
        assert!(!batch.is_empty(), "no progress at {next} of {high}");
        for r in &batch {
            assert_eq!(r.offset, next, "offsets are contiguous");
            next += 1;
        }
        out.extend(batch);
    }
    out
}

fn segment_files(dir: &Path, topic: Topic, partition: u32) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir.join(topic.name()).join(format!("{partition:05}")))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
    files.sort();
    files
}

/// Records appended to many partitions of both topics read back intact, in order.
#[tokio::test]
async fn append_read_round_trip_across_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), &config());
    for (topic, partitions) in TOPICS {
        for p in 0..partitions {
            for i in 0..300 {
                let kind = if i % 2 == 0 {
                    RecordKind::OrderJson
                } else {
                    RecordKind::Internal
                };
                let rec = Record {
                    kind,
                    key: format!("{}-{p}", topic.name()).into_bytes(),
                    value: format!("v{i}").into_bytes(),
                };
                log.append(topic, p, vec![rec]).await.unwrap();
            }
        }
    }
    for (topic, partitions) in TOPICS {
        for p in 0..partitions {
            let records = read_all(&log, topic, p, 0, 97).await;
            assert_eq!(records.len(), 300);
            for (i, r) in records.iter().enumerate() {
                assert_eq!(r.key, format!("{}-{p}", topic.name()).into_bytes());
                assert_eq!(r.value, format!("v{i}").into_bytes());
                assert_eq!(
                    r.kind,
                    if i % 2 == 0 {
                        RecordKind::OrderJson
                    } else {
                        RecordKind::Internal
                    }
                );
                assert!(r.timestamp_ms > 1_600_000_000_000, "wall clock ms");
            }
            assert!(
                records
                    .windows(2)
                    .all(|w| w[0].timestamp_ms <= w[1].timestamp_ms),
                "timestamps never go back"
            );
        }
    }
    log.close().await;
}

/// `append` returns the offset of its first record; offsets are dense and increasing.
#[tokio::test]
async fn offsets_monotonic_and_first_offset_returned() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), &config());
    assert_eq!(log.offsets(Topic::Orders, 1).await.unwrap(), (0, 0));
    let mut expected = 0;
    for n in 1..=20u64 {
        let records = (0..n).map(|i| record("k", &format!("{n}/{i}"))).collect();
        let first = log.append(Topic::Orders, 1, records).await.unwrap();
        assert_eq!(first, expected);
        expected += n;
        assert_eq!(log.offsets(Topic::Orders, 1).await.unwrap(), (0, expected));
    }
    assert_eq!(
        log.append(Topic::Orders, 1, Vec::new()).await.unwrap(),
        expected,
        "empty append writes nothing"
    );
    let records = read_all(&log, Topic::Orders, 1, 0, 1000).await;
    assert_eq!(records.len() as u64, expected);
    assert_eq!(
        log.offsets(Topic::Orders, 0).await.unwrap(),
        (0, 0),
        "other partitions untouched"
    );

    let out_of_range = log
        .read(Topic::Orders, 1, expected + 1, 10, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        matches!(out_of_range, LogError::OffsetOutOfRange { offset, high, .. } if offset == expected + 1 && high == expected)
    );
    let none = log
        .read(Topic::Orders, 1, expected, 10, Duration::ZERO)
        .await
        .unwrap();
    assert!(none.is_empty(), "from == high is an empty read");
    let missing = log
        .append(Topic::Orders, 4, vec![record("k", "v")])
        .await
        .unwrap_err();
    assert!(matches!(
        missing,
        LogError::NoSuchPartition {
            partition: 4,
            count: 4,
            ..
        }
    ));
}

/// A read at the high-watermark waits, wakes on an append, and times out empty.
#[tokio::test]
async fn read_waits_and_wakes_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(dir.path(), &config()));

    let started = std::time::Instant::now();
    let empty = log
        .read(Topic::Orders, 0, 0, 10, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(empty.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(50));

    let reader = {
        let log = log.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let records = log
                .read(Topic::Orders, 0, 0, 10, Duration::from_secs(30))
                .await
                .unwrap();
            (records, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    log.append(Topic::Orders, 0, vec![record("k", "hello")])
        .await
        .unwrap();
    let (records, waited) = reader.await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, b"hello");
    assert!(
        waited < Duration::from_secs(10),
        "woken by the append, not the timeout"
    );
}

/// 50 concurrent appenders × 200 appends: all acknowledged, grouped into
/// fewer fsyncs, and readable in each appender's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_many_concurrent_appenders() {
    const TASKS: usize = 50;
    const PER_TASK: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let log = Arc::new(EmbeddedLog::open(dir.path(), &TOPICS, &config(), metrics.clone()).unwrap());
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut offsets = Vec::with_capacity(PER_TASK);
            for i in 0..PER_TASK {
                offsets.push(
                    log.append(
                        Topic::Orders,
                        2,
                        vec![record(&format!("t{t}"), &i.to_string())],
                    )
                    .await
                    .unwrap(),
                );
            }
            offsets
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        let offsets = task.await.unwrap();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "one appender's offsets increase"
        );
        acked.extend(offsets);
    }
    acked.sort_unstable();
    acked.dedup();
    assert_eq!(
        acked.len(),
        TASKS * PER_TASK,
        "every append got its own offset"
    );

    let records = read_all(&log, Topic::Orders, 2, 0, 1000).await;
    assert_eq!(records.len(), TASKS * PER_TASK);
    let mut next_per_task: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for r in &records {
        let next = next_per_task.entry(r.key.clone()).or_default();
        assert_eq!(r.value, next.to_string().into_bytes(), "task order kept");
        *next += 1;
    }
    assert_eq!(next_per_task.len(), TASKS);

    let batches = metrics.log_batch_records.with_label_values(&["orders"]);
    assert_eq!(batches.get_sample_sum() as usize, TASKS * PER_TASK);
    assert!(batches.get_sample_count() as usize <= TASKS * PER_TASK);
    assert_eq!(
        metrics
            .queue_depth
            .with_label_values(&["log_append:orders"])
            .get(),
        0
    );
    assert_eq!(
        metrics
            .log_append_latency
            .with_label_values(&["orders"])
            .get_sample_count() as usize,
        TASKS * PER_TASK
    );
}

/// With tiny segments the log rolls often, and reads from any offset cross
/// segment boundaries correctly (also after reopening, from the rebuilt index).
#[tokio::test]
async fn segments_roll_and_reads_cross_segments() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_size_bytes: 512,
        ..config()
    };
    let log = open(dir.path(), &config);
    let value = "x".repeat(40);
    for i in 0..300 {
        log.append(
            Topic::Orders,
            0,
            vec![
                record(&format!("k{i}"), &value),
                record("pair", &i.to_string()),
            ],
        )
        .await
        .unwrap();
    }
    let files = segment_files(dir.path(), Topic::Orders, 0);
    assert!(files.len() > 20, "rolled into {} segments", files.len());
    for f in &files[..files.len() - 1] {
        assert!(
            std::fs::metadata(f).unwrap().len() <= 512,
            "segment {} within the limit",
            f.display()
        );
    }
    let all = read_all(&log, Topic::Orders, 0, 0, 1000).await;
    assert_eq!(all.len(), 600);
    for (i, pair) in all.chunks(2).enumerate() {
        assert_eq!(pair[0].key, format!("k{i}").into_bytes());
        assert_eq!(pair[1].value, i.to_string().into_bytes());
    }
    for from in [0u64, 1, 7, 8, 9, 300, 599] {
        for chunk in [1usize, 3, 50] {
            let got = log
                .read(Topic::Orders, 0, from, chunk, Duration::ZERO)
                .await
                .unwrap();
            assert_eq!(
                got,
                all[from as usize..(from as usize + chunk).min(600)].to_vec(),
                "from {from} chunk {chunk}"
            );
        }
    }
    log.close().await;
    let log = open(dir.path(), &config);
    assert_eq!(
        read_all(&log, Topic::Orders, 0, 123, 7).await,
        all[123..].to_vec()
    );
}

/// Retention deletes only whole segments below the released offset, only
/// while over the size limit, and never the active segment.
#[tokio::test]
async fn retention_deletes_only_released_segments() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_size_bytes: 256,
        retention_bytes: 1024,
        ..config()
    };
    let log = open(dir.path(), &config);
    for i in 0..200 {
        log.append(Topic::Orders, 3, vec![record("k", &format!("{i:>20}"))])
            .await
            .unwrap();
    }
    let before = segment_files(dir.path(), Topic::Orders, 3);
    assert!(before.len() > 10);
    assert_eq!(
        log.offsets(Topic::Orders, 3).await.unwrap(),
        (0, 200),
        "nothing released, nothing deleted"
    );

    log.release_before(Topic::Orders, 3, 100);
    let low = wait_for_low(&log, 3, |low| low > 0).await;
    assert!(low <= 100, "kept everything not released (low {low})");
    assert!(low > 50, "deleted most released segments (low {low})");
    let remaining = wait_for_files_from(dir.path(), 3, low).await;
    assert!(remaining.len() < before.len());
    let err = log
        .read(Topic::Orders, 3, low - 1, 10, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        matches!(err, LogError::OffsetOutOfRange { low: l, high: 200, .. } if l == low),
        "{err}"
    );
    let kept = read_all(&log, Topic::Orders, 3, low, 33).await;
    assert_eq!(kept.len() as u64, 200 - low);
    assert_eq!(kept[0].value, format!("{low:>20}").into_bytes());

    // Everything released: shrinks to the limit, but the active segment stays.
    log.release_before(Topic::Orders, 3, 200);
    let low = wait_for_low(&log, 3, |l| l > low).await;
    let remaining = wait_for_files_from(dir.path(), 3, low).await;
    let bytes: u64 = remaining
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(bytes <= 1024, "{bytes} bytes left");
    assert!(!remaining.is_empty());
    let (low, high) = log.offsets(Topic::Orders, 3).await.unwrap();
    assert!(low < high, "active segment kept");
    assert_eq!(
        log.append(Topic::Orders, 3, vec![record("k", "after")])
            .await
            .unwrap(),
        200
    );
}

/// The partition's segment files once the oldest is the one starting at
/// `low` (retention publishes `low` first, then unlinks the files).
async fn wait_for_files_from(dir: &Path, partition: u32, low: u64) -> Vec<PathBuf> {
    for _ in 0..500 {
        let files = segment_files(dir, Topic::Orders, partition);
        let first = files
            .first()
            .and_then(|f| segment::parse_segment_name(f.file_name()?.to_str()?));
        if first == Some(low) {
            return files;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("retention did not delete the segments below {low}");
}

async fn wait_for_low(log: &EmbeddedLog, partition: u32, done: impl Fn(u64) -> bool) -> u64 {
    for _ in 0..500 {
        let (low, _) = log.offsets(Topic::Orders, partition).await.unwrap();
        if done(low) {
            return low;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("retention did not run");
}

/// Closing and reopening keeps every record, timestamp and offset; appends continue.
#[tokio::test]
async fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_size_bytes: 4096,
        ..config()
    };
    let log = open(dir.path(), &config);
    for i in 0..500 {
        log.append(
            Topic::OrderStatus,
            i % 2,
            vec![record(&format!("ord-{i}"), &"s".repeat(i as usize % 50))],
        )
        .await
        .unwrap();
    }
    let before = [
        read_all(&log, Topic::OrderStatus, 0, 0, 64).await,
        read_all(&log, Topic::OrderStatus, 1, 0, 64).await,
    ];
    log.close().await;
    let err = log
        .append(Topic::OrderStatus, 0, vec![record("k", "v")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LogError::Unavailable(m) if m == "log closed"),
        "{err}"
    );
    drop(log);

    let log = open(dir.path(), &config);
    for p in 0..2 {
        assert_eq!(log.offsets(Topic::OrderStatus, p).await.unwrap(), (0, 250));
        assert_eq!(
            read_all(&log, Topic::OrderStatus, p, 0, 64).await,
            before[p as usize]
        );
    }
    assert_eq!(
        log.append(Topic::OrderStatus, 1, vec![record("k", "v")])
            .await
            .unwrap(),
        250
    );
    let last = log
        .read(Topic::OrderStatus, 1, 250, 1, Duration::ZERO)
        .await
        .unwrap();
    assert!(
        last[0].timestamp_ms >= before[1][249].timestamp_ms,
        "timestamps continue forward"
    );
}

/// A record above `max_record_bytes` (or a key above 64 KiB) is refused; one at the limit is not.
#[tokio::test]
async fn record_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), &config());
    let at_limit = Record {
        kind: RecordKind::OrderJson,
        key: vec![b'k'; 96],
        value: vec![b'v'; 4000],
    };
    assert_eq!(
        log.append(Topic::Orders, 0, vec![at_limit]).await.unwrap(),
        0
    );
    let over = Record {
        kind: RecordKind::OrderJson,
        key: vec![b'k'; 96],
        value: vec![b'v'; 4001],
    };
    let err = log
        .append(Topic::Orders, 0, vec![record("a", "b"), over])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LogError::RecordTooLarge {
                size_bytes: 4097,
                max_bytes: 4096
            }
        ),
        "{err}"
    );
    assert_eq!(
        log.offsets(Topic::Orders, 0).await.unwrap(),
        (0, 1),
        "nothing of a refused append is written"
    );

    let big = LogConfig {
        max_record_bytes: 1 << 20,
        segment_size_bytes: 1 << 21,
        ..config()
    };
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), &big);
    let long_key = Record {
        kind: RecordKind::OrderJson,
        key: vec![b'k'; 70_000],
        value: Vec::new(),
    };
    let err = log
        .append(Topic::Orders, 0, vec![long_key])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LogError::RecordTooLarge {
                size_bytes: 70_000,
                max_bytes: 65_535
            }
        ),
        "{err}"
    );
}

/// A flood of appends into a tiny queue gets `Full` at once for some, and
/// every acknowledged record is readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_when_queue_full() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        append_queue_depth: 1,
        max_batch_records: 1,
        ..config()
    };
    let log = Arc::new(open(dir.path(), &config));
    let appends: Vec<_> = (0..2000)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                (
                    i,
                    log.append(Topic::Orders, 0, vec![record("k", &i.to_string())])
                        .await,
                )
            })
        })
        .collect();
    let mut acked = BTreeMap::new();
    let mut full = 0;
    for append in appends {
        match append.await.unwrap() {
            (i, Ok(offset)) => {
                acked.insert(offset, i);
            }
            (_, Err(LogError::Full { depth })) => {
                assert_eq!(depth, 1);
                full += 1;
            }
            (_, Err(e)) => panic!("unexpected error {e}"),
        }
    }
    assert!(full > 0, "some appends were refused");
    assert!(!acked.is_empty());
    let records = read_all(&log, Topic::Orders, 0, 0, 500).await;
    assert_eq!(
        records.len(),
        acked.len(),
        "only acknowledged appends were written"
    );
    for r in records {
        assert_eq!(r.value, acked[&r.offset].to_string().into_bytes());
    }
}

/// Invalid setups are refused with a message, not a panic.
#[test]
fn open_refuses_bad_setup() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let err = EmbeddedLog::open(
        dir.path(),
        &[(Topic::Orders, 0)],
        &config(),
        metrics.clone(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("0 partitions"), "{err}");
    let err = EmbeddedLog::open(
        dir.path(),
        &[(Topic::Orders, 1), (Topic::Orders, 2)],
        &config(),
        metrics.clone(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("listed twice"), "{err}");
    let zero_depth = LogConfig {
        append_queue_depth: 0,
        ..config()
    };
    assert!(EmbeddedLog::open(dir.path(), &TOPICS, &zero_depth, metrics).is_err());
}

/// Disk faults injected through the log's I/O seam (debug builds only).
#[cfg(debug_assertions)]
mod disk_faults {
    use super::*;
    use crate::pipeline::log::embedded::faults::Fault;

    fn values(records: &[LogRecord]) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8(r.value.clone()).unwrap())
            .collect()
    }

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    async fn append_values(log: &EmbeddedLog, values: &[String]) -> Result<u64, LogError> {
        let records = values.iter().map(|v| record("k", v)).collect();
        log.append(Topic::Orders, 0, records).await
    }

    fn named(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
    }

    /// A write that finds the disk full fails only its batch, with a message
    /// naming the full disk; the torn bytes are truncated away, the next
    /// append once space is back takes the next offset, and a reopen finds
    /// nothing to repair.
    #[tokio::test]
    async fn disk_full_write_is_rolled_back_and_appends_resume() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), &config());
        let before = named("before", 10);
        for v in &before {
            append_values(&log, std::slice::from_ref(v)).await.unwrap();
        }
        let segment = segment_files(dir.path(), Topic::Orders, 0).pop().unwrap();
        let durable = file_len(&segment);

        log.faults.arm(Fault::WriteEnospc, true);
        for _ in 0..3 {
            let err = append_values(&log, &named("lost", 5)).await.unwrap_err();
            assert!(
                matches!(&err, LogError::Unavailable(m) if m.contains("disk full")),
                "{err}"
            );
            assert!(log.may_recover(), "a full disk is not a failure for good");
            assert_eq!(file_len(&segment), durable, "the partial write is gone");
            assert_eq!(log.offsets(Topic::Orders, 0).await.unwrap(), (0, 10));
        }
        log.faults.arm(Fault::WriteEnospc, false);

        let after = named("after", 2);
        assert_eq!(append_values(&log, &after).await.unwrap(), 10);
        let expected: Vec<String> = before.iter().chain(&after).cloned().collect();
        assert_eq!(
            values(&read_all(&log, Topic::Orders, 0, 0, 100).await),
            expected
        );
        log.close().await;
        let len = file_len(&segment);

        let log = open(dir.path(), &config());
        assert_eq!(file_len(&segment), len, "no torn tail to truncate");
        assert_eq!(
            values(&read_all(&log, Topic::Orders, 0, 0, 100).await),
            expected
        );
    }

    /// A full disk right after a segment roll rolls the new segment back to
    /// empty; appends then continue in it.
    #[tokio::test]
    async fn disk_full_after_a_segment_roll() {
        let dir = tempfile::tempdir().unwrap();
        let frame = segment::frame_bytes(b"k", b"full-0000") as u64;
        let config = LogConfig {
            segment_size_bytes: 10 * frame,
            ..config()
        };
        let log = open(dir.path(), &config);
        let first = named("full", 10);
        for v in &first {
            append_values(&log, std::slice::from_ref(v)).await.unwrap();
        }
        assert_eq!(segment_files(dir.path(), Topic::Orders, 0).len(), 1);

        log.faults.arm(Fault::WriteEnospc, true);
        let err = append_values(&log, &named("lost", 3)).await.unwrap_err();
        assert!(matches!(&err, LogError::Unavailable(m) if m.contains("disk full")));
        log.faults.arm(Fault::WriteEnospc, false);
        let files = segment_files(dir.path(), Topic::Orders, 0);
        assert_eq!(files.len(), 2, "the roll happened before the write");
        assert_eq!(file_len(&files[0]), 10 * frame);
        assert_eq!(file_len(&files[1]), 0, "the new segment was rolled back");

        let next = named("next", 3);
        assert_eq!(append_values(&log, &next).await.unwrap(), 10);
        let expected: Vec<String> = first.iter().chain(&next).cloned().collect();
        assert_eq!(
            values(&read_all(&log, Topic::Orders, 0, 0, 100).await),
            expected
        );
        log.close().await;
        let log = open(dir.path(), &config);
        assert_eq!(
            values(&read_all(&log, Topic::Orders, 0, 0, 100).await),
            expected
        );
    }

    /// A failed fsync makes the log refuse every later append on every
    /// partition, with a message naming the file, and resolves `failed`;
    /// what was durable before stays readable.
    #[tokio::test]
    async fn failed_fsync_fails_the_log_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), &config());
        let before = named("before", 3);
        append_values(&log, &before).await.unwrap();

        log.faults.arm(Fault::Fsync, true);
        let err = append_values(&log, &named("lost", 1)).await.unwrap_err();
        let LogError::Unavailable(message) = &err else {
            panic!("{err}");
        };
        assert!(message.starts_with("fsync failed on "), "{message}");
        assert!(message.contains(".seg"), "names the segment: {message}");
        assert!(
            message.ends_with("the log cannot be trusted; stopping"),
            "{message}"
        );
        assert!(!log.may_recover());
        let failed = tokio::time::timeout(Duration::from_secs(10), log.failed())
            .await
            .expect("failed() resolves");
        assert_eq!(&failed, message);

        log.faults.arm(Fault::Fsync, false);
        for (topic, partition) in [(Topic::Orders, 0), (Topic::OrderStatus, 1)] {
            let err = log
                .append(topic, partition, vec![record("k", "later")])
                .await
                .unwrap_err();
            assert!(
                matches!(&err, LogError::Unavailable(m) if m == message),
                "{err}"
            );
        }
        assert_eq!(
            values(&read_all(&log, Topic::Orders, 0, 0, 100).await),
            before
        );
    }

    /// When truncating a torn write fails too, the log can no longer vouch
    /// for the file: it refuses appends for good.
    #[tokio::test]
    async fn failed_rollback_fails_the_log_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), &config());
        append_values(&log, &named("before", 2)).await.unwrap();
        log.faults.arm(Fault::WriteEnospc, true);
        log.faults.arm(Fault::Truncate, true);
        let err = append_values(&log, &named("lost", 2)).await.unwrap_err();
        assert!(
            matches!(&err, LogError::Unavailable(m)
                if m.contains("disk full") && m.ends_with("the log cannot be trusted; stopping")),
            "{err}"
        );
        assert!(!log.may_recover());
        log.faults.arm(Fault::WriteEnospc, false);
        log.faults.arm(Fault::Truncate, false);
        assert!(append_values(&log, &named("later", 1)).await.is_err());
    }

    /// Read cursors opened before a rollback are never reused after it:
    /// their read-ahead may hold bytes that were truncated away.
    #[tokio::test]
    async fn rollback_retires_read_cursors() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), &config());
        append_values(&log, &named("v", 2)).await.unwrap();
        let shared = log.handle(Topic::Orders, 0).unwrap().shared.clone();
        let read_first = || log.read(Topic::Orders, 0, 0, 1, Duration::ZERO);

        // Cached by a read, dropped by the rollback.
        assert_eq!(read_first().await.unwrap().len(), 1);
        log.faults.arm(Fault::WriteEnospc, true);
        append_values(&log, &named("lost", 1)).await.unwrap_err();
        log.faults.arm(Fault::WriteEnospc, false);
        assert!(shared.take_cursor(1).is_none());

        // In use during the rollback, refused when handed back.
        assert_eq!(read_first().await.unwrap().len(), 1);
        let cursor = shared.take_cursor(1).expect("cached by the read");
        shared.rolled_back();
        shared.put_cursor(cursor);
        assert!(shared.take_cursor(1).is_none());

        append_values(&log, &named("w", 1)).await.unwrap();
        assert_eq!(
            values(&read_all(&log, Topic::Orders, 0, 0, 1).await),
            ["v-0000", "v-0001", "w-0000"]
        );
    }
}
