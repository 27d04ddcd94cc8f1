//! The embedded log: durable, partitioned, append-only segment files on
//! local disk, for the one-process deployment.
//!
//! Layout: `{dir}/{topic}/{partition:05}/{base_offset:020}.seg`, where a
//! segment's name is the offset of its first record (format in
//! [`segment`]). A partition is its segments in base-offset order; only the
//! last one (the active segment) is ever written.
//!
//! Writes: one writer thread per partition (see [`writer`]) drains a bounded
//! queue of appends and group-commits them: write a batch, one `fdatasync`,
//! then acknowledge. `append` returns only once its records are durable; a
//! full queue fails at once with [`LogError::Full`] (back-pressure, never an
//! unbounded wait).
//!
//! Disk faults: a write that finds the disk full (ENOSPC, EDQUOT) fails only
//! its batch. The writer truncates the segment back to its last durable
//! length (and fsyncs that), so no torn frame stays behind, answers the
//! batch with [`LogError::Unavailable`] naming the full disk and tries
//! again with the next batch: appends resume once space is freed, without
//! a restart. Any other failure (a failed fsync, another write error, a
//! rollback that fails itself) makes the whole log refuse every later
//! append and resolves [`Log::failed`], on which the instance stops: after
//! a failed fsync the kernel may have dropped the dirty pages, so what the
//! file holds can no longer be trusted. Tests inject these faults through
//! [`faults`] (debug builds only).
//!
//! Timestamps: the writer stamps every record with the wall clock (ms since
//! the Unix epoch) when it writes the batch, never going backwards within a
//! partition. That stored stamp is the only clock the partition processors
//! see, which keeps them deterministic under replay.
//!
//! Reads: readers only ever see durable records. Each partition publishes a
//! durable high-watermark (after the fsync) and wakes waiting readers; see
//! [`reader`] for how sequential reads avoid rescanning.
//!
//! Recovery: [`EmbeddedLog::open`] scans every segment, truncates a torn
//! tail of the last segment of a partition and refuses (with
//! [`LogError::Corrupt`]) any other damage. Retention deletes whole old
//! segments once the partition exceeds `retention_bytes` and every reader
//! has released them (`release_before`).
//!
//! One process must own a data directory: nothing here locks it.

mod faults;
mod reader;
pub mod segment;
mod writer;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus::Histogram;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use self::faults::Faults;
use self::reader::{Located, ReadCursor};
use self::segment::{HARD_MAX_RECORD_BYTES, IndexEntry, MAX_KEY_BYTES};
use self::writer::{ActiveSegment, PendingAppend, Writer, WriterConfig, WriterMetrics, WriterMsg};
use crate::config::LogConfig;
use crate::pipeline::log::{Log, LogError, LogRecord, READ_MAX_BYTES, Record, Topic};
use crate::telemetry::metrics::Metrics;

/// Partitions one topic may have (one writer thread each).
pub const MAX_PARTITIONS_PER_TOPIC: u32 = 1024;
/// Open read cursors kept per partition: enough for the processor, the
/// sinks and a replay reading the same partition at different places.
const MAX_CACHED_CURSORS: usize = 4;
/// A read this close to the head of a partition reads on the calling
/// task, of at most this many records and bytes (about 20 µs of copying
/// from the page cache); farther behind, it reads on the blocking pool.
const INLINE_READ_RECORDS: u64 = 256;
const INLINE_READ_BYTES: usize = 256 * 1024;

/// The durable embedded log. See the module documentation.
pub struct EmbeddedLog {
    topics: Vec<TopicPartitions>,
    closed: AtomicBool,
    health: Arc<Health>,
    /// Test-only I/O faults (see [`faults`]); inert in release builds.
    #[cfg_attr(not(test), allow(dead_code))]
    faults: Arc<Faults>,
    max_record_bytes: usize,
    append_queue_depth: usize,
}

struct TopicPartitions {
    topic: Topic,
    partitions: Vec<PartitionHandle>,
}

/// The appender's side of a partition. The writer thread holds only the
/// shared state, so dropping the log drops the queue's senders and lets the
/// writers finish.
struct PartitionHandle {
    shared: Arc<PartitionShared>,
    queue: mpsc::Sender<WriterMsg>,
    append_latency: Histogram,
    /// `log_append:{topic}`, shared by the topic's partitions.
    queue_depth: prometheus::IntGauge,
}

/// Whether the log can still be trusted with writes.
struct Health {
    /// The failure that made the log refuse appends for good, if any.
    failure: watch::Sender<Option<String>>,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            failure: watch::Sender::new(None),
        }
    }
}

impl Health {
    fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Records the first failure; later ones add nothing.
    fn fail(&self, reason: String) {
        self.failure.send_if_modified(|failure| {
            if failure.is_some() {
                return false;
            }
            *failure = Some(reason);
            true
        });
    }

    /// Resolves with the failure once there is one.
    async fn failed(&self) -> String {
        let mut failure = self.failure.subscribe();
        let reason = failure
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|f| f.clone());
        match reason {
            Some(reason) => reason,
            // Unreachable: `self` holds the sender.
            None => std::future::pending().await,
        }
    }
}

/// One segment as readers see it (durable records only).
struct SegmentInfo {
    base_offset: u64,
    path: Arc<Path>,
    record_count: u64,
    size_bytes: u64,
    /// Sparse, sorted by offset, starts with `(base_offset, 0)`.
    index: Vec<IndexEntry>,
}

impl SegmentInfo {
    fn new(base_offset: u64, path: Arc<Path>) -> SegmentInfo {
        SegmentInfo {
            base_offset,
            path,
            record_count: 0,
            size_bytes: 0,
            index: vec![IndexEntry {
                offset: base_offset,
                position: 0,
            }],
        }
    }
}

/// State of one partition shared by its writer and its readers.
struct PartitionShared {
    topic: Topic,
    partition: u32,
    dir: PathBuf,
    /// Oldest first; the last is the active segment.
    segments: RwLock<VecDeque<SegmentInfo>>,
    /// First offset still kept (moves up when retention deletes).
    low_offset: AtomicU64,
    /// Durable high-watermark: next offset to be made durable.
    high_offset: AtomicU64,
    /// Set by `release_before`: no reader needs anything below it.
    released_before: AtomicU64,
    /// Woken after every publish of the high-watermark.
    appended: Notify,
    cursors: Mutex<Vec<ReadCursor>>,
    /// Counts rollbacks: the writer truncating unpublished bytes away after
    /// a write found the disk full. A cursor's read-ahead buffer may hold
    /// such bytes, and new records later take their place, so a cursor
    /// opened before a rollback is never reused after it.
    rollbacks: AtomicU64,
}

impl PartitionShared {
    fn segments_mut(&self) -> RwLockWriteGuard<'_, VecDeque<SegmentInfo>> {
        // No code panics while holding the lock; if something ever did, the
        // list is still consistent (every update is a single assignment
        // block), so go on rather than poison every later reader.
        self.segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn offsets(&self) -> (u64, u64) {
        // High first: `low <= high` even if retention runs in between.
        let high = self.high_offset.load(Ordering::Acquire);
        let low = self.low_offset.load(Ordering::Acquire);
        (low.min(high), high)
    }

    fn out_of_range(&self, offset: u64) -> LogError {
        let (low, high) = self.offsets();
        LogError::OffsetOutOfRange {
            topic: self.topic.name(),
            partition: self.partition,
            offset,
            low,
            high,
        }
    }

    /// Where the published record `offset` lives.
    fn locate(&self, offset: u64) -> Option<Located> {
        let segments = self.segments.read().unwrap_or_else(PoisonError::into_inner);
        let i = segments
            .partition_point(|s| s.base_offset <= offset)
            .checked_sub(1)?;
        let segment = segments.get(i)?;
        let end_offset = segment.base_offset + segment.record_count;
        if offset >= end_offset {
            return None;
        }
        let j = segment
            .index
            .partition_point(|e| e.offset <= offset)
            .checked_sub(1)?;
        let entry = segment.index.get(j)?;
        Some(Located {
            segment_base: segment.base_offset,
            end_offset,
            path: segment.path.clone(),
            index_offset: entry.offset,
            index_position: entry.position,
        })
    }

    fn take_cursor(&self, next_offset: u64) -> Option<ReadCursor> {
        let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
        let i = cursors.iter().position(|c| c.next_offset == next_offset)?;
        Some(cursors.swap_remove(i))
    }

    fn put_cursor(&self, cursor: ReadCursor) {
        let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock `rolled_back` takes, so a cursor is either
        // refused here or dropped there.
        if cursor.rollbacks != self.rollbacks.load(Ordering::Acquire) {
            return;
        }
        if cursors.len() >= MAX_CACHED_CURSORS {
            cursors.remove(0);
        }
        cursors.push(cursor);
    }

    /// The writer truncated unpublished bytes: no cursor from before is reused.
    fn rolled_back(&self) {
        let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
        self.rollbacks.fetch_add(1, Ordering::AcqRel);
        cursors.clear();
    }

    /// Closes cursors on segments retention deleted, releasing their disk space.
    fn drop_cursors_below(&self, low: u64) {
        let mut cursors = self.cursors.lock().unwrap_or_else(PoisonError::into_inner);
        cursors.retain(|c| c.segment_base >= low);
    }
}

/// A failed file operation on `path`.
pub(crate) fn io_error(path: &Path, source: std::io::Error) -> LogError {
    LogError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn invalid_setup(detail: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("invalid embedded log setup: {detail}"))
}

/// Makes a directory's entries (files created or removed in it) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        // Directories cannot be opened for syncing elsewhere; their entries
        // are made durable by the file system's own journal.
        let _ = dir;
        Ok(())
    }
}

/// Creates `dir` and any missing parents, syncing each parent that gained
/// an entry so the new directories survive a crash.
fn create_dirs(dir: &Path, fsync: bool) -> Result<(), LogError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dirs(parent, fsync)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(io_error(dir, e)),
    }
    if fsync && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent).map_err(|e| io_error(parent, e))?;
    }
    Ok(())
}

impl EmbeddedLog {
    /// Opens (creating what is missing) the log in `dir` with the given
    /// topics and partition counts, recovering every partition, and starts
    /// one writer thread per partition.
    pub fn open(
        dir: &Path,
        topics: &[(Topic, u32)],
        config: &LogConfig,
        metrics: Arc<Metrics>,
    ) -> Result<EmbeddedLog, LogError> {
        if config.max_record_bytes > HARD_MAX_RECORD_BYTES {
            return Err(invalid_setup(format!(
                "max_record_bytes {} exceeds the segment format's limit of {HARD_MAX_RECORD_BYTES}",
                config.max_record_bytes
            )));
        }
        if config.append_queue_depth == 0
            || config.max_batch_records == 0
            || config.segment_size_bytes == 0
        {
            return Err(invalid_setup(
                "append_queue_depth, max_batch_records and segment_size_bytes must be at least 1",
            ));
        }
        create_dirs(dir, config.fsync)?;
        let health = Arc::new(Health::default());
        let faults = Arc::new(Faults::from_env());
        let mut opened: Vec<TopicPartitions> = Vec::with_capacity(topics.len());
        for &(topic, count) in topics {
            if opened.iter().any(|t| t.topic == topic) {
                return Err(invalid_setup(format!(
                    "topic {} is listed twice",
                    topic.name()
                )));
            }
            if count == 0 || count > MAX_PARTITIONS_PER_TOPIC {
                return Err(invalid_setup(format!(
                    "topic {} has {count} partitions; allowed 1 to {MAX_PARTITIONS_PER_TOPIC}",
                    topic.name()
                )));
            }
            let topic_dir = dir.join(topic.name());
            let mut partitions = Vec::with_capacity(count as usize);
            for partition in 0..count {
                let partition_dir = topic_dir.join(format!("{partition:05}"));
                partitions.push(open_partition(
                    topic,
                    partition,
                    partition_dir,
                    config,
                    &metrics,
                    &health,
                    &faults,
                )?);
            }
            opened.push(TopicPartitions { topic, partitions });
        }
        Ok(EmbeddedLog {
            topics: opened,
            closed: AtomicBool::new(false),
            health,
            faults,
            max_record_bytes: config.max_record_bytes,
            append_queue_depth: config.append_queue_depth,
        })
    }

    fn handle(&self, topic: Topic, partition: u32) -> Result<&PartitionHandle, LogError> {
        let partitions = self
            .topics
            .iter()
            .find(|t| t.topic == topic)
            .map_or(&[][..], |t| &t.partitions[..]);
        partitions
            .get(partition as usize)
            .ok_or(LogError::NoSuchPartition {
                topic: topic.name(),
                partition,
                count: partitions.len() as u32,
            })
    }

    /// Why appends are refused, if they are.
    fn refusal(&self) -> Option<LogError> {
        if self.closed.load(Ordering::Acquire) {
            return Some(LogError::Unavailable("log closed".into()));
        }
        self.health.failure().map(LogError::Unavailable)
    }

    /// The writer is gone without answering (closed, or it stopped).
    fn writer_gone(&self) -> LogError {
        self.refusal()
            .unwrap_or_else(|| LogError::Unavailable("log writer stopped".into()))
    }

    fn check_record(&self, record: &Record) -> Result<(), LogError> {
        let size_bytes = record.key.len() + record.value.len();
        if size_bytes > self.max_record_bytes {
            return Err(LogError::RecordTooLarge {
                size_bytes,
                max_bytes: self.max_record_bytes,
            });
        }
        if record.key.len() > MAX_KEY_BYTES {
            return Err(LogError::RecordTooLarge {
                size_bytes: record.key.len(),
                max_bytes: MAX_KEY_BYTES,
            });
        }
        Ok(())
    }
}

/// Recovers one partition directory and starts its writer.
fn open_partition(
    topic: Topic,
    partition: u32,
    dir: PathBuf,
    config: &LogConfig,
    metrics: &Metrics,
    health: &Arc<Health>,
    faults: &Arc<Faults>,
) -> Result<PartitionHandle, LogError> {
    create_dirs(&dir, config.fsync)?;
    let mut bases = Vec::new();
    let entries = std::fs::read_dir(&dir).map_err(|e| io_error(&dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(&dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| segment::is_segment_name(n)) else {
            tracing::warn!(file = %path.display(), "ignoring a file that is not a log segment");
            continue;
        };
        let base = segment::parse_segment_name(name).ok_or_else(|| LogError::Corrupt {
            path: path.display().to_string(),
            position: 0,
            offset: 0,
            detail: "segment file name is not a 20-digit base offset followed by .seg".into(),
        })?;
        bases.push(base);
    }
    bases.sort_unstable();
    if bases.is_empty() {
        let path = dir.join(segment::segment_file_name(0));
        File::create_new(&path).map_err(|e| io_error(&path, e))?;
        if config.fsync {
            sync_dir(&dir).map_err(|e| io_error(&dir, e))?;
        }
        bases.push(0);
    }

    let mut segments = VecDeque::with_capacity(bases.len());
    let mut last_timestamp_ms = 0;
    let mut total_bytes = 0;
    let last = bases.len() - 1;
    for (i, &base) in bases.iter().enumerate() {
        let path: Arc<Path> = dir.join(segment::segment_file_name(base)).into();
        if let Some(previous) = segments
            .back()
            .map(|s: &SegmentInfo| s.base_offset + s.record_count)
            && previous != base
        {
            return Err(LogError::Corrupt {
                path: path.display().to_string(),
                position: 0,
                offset: previous,
                detail: format!(
                    "segment starts at offset {base} but the previous one ends at {previous} (missing or overlapping segment)"
                ),
            });
        }
        let scanned = segment::recover_segment(&path, base, i == last)?;
        last_timestamp_ms = last_timestamp_ms.max(scanned.last_timestamp_ms.unwrap_or(0));
        total_bytes += scanned.size_bytes;
        segments.push_back(SegmentInfo {
            base_offset: base,
            path,
            record_count: scanned.record_count,
            size_bytes: scanned.size_bytes,
            index: scanned.index,
        });
    }
    let (low, high, active) = match (segments.front(), segments.back()) {
        (Some(first), Some(active)) => (
            first.base_offset,
            active.base_offset + active.record_count,
            active,
        ),
        _ => return Err(invalid_setup("no segment after recovery")),
    };
    let file = OpenOptions::new()
        .append(true)
        .open(&active.path)
        .map_err(|e| io_error(&active.path, e))?;
    let active = ActiveSegment {
        file,
        path: active.path.clone(),
        base_offset: active.base_offset,
        size_bytes: active.size_bytes,
        record_count: active.record_count,
        last_index_position: active.index.last().map_or(0, |e| e.position),
    };

    let shared = Arc::new(PartitionShared {
        topic,
        partition,
        dir,
        segments: RwLock::new(segments),
        low_offset: AtomicU64::new(low),
        high_offset: AtomicU64::new(high),
        released_before: AtomicU64::new(0),
        appended: Notify::new(),
        cursors: Mutex::new(Vec::with_capacity(MAX_CACHED_CURSORS)),
        rollbacks: AtomicU64::new(0),
    });
    let label = [topic.name()];
    let queue_depth =
        metrics
            .queue_depth
            .with_label_values(&[format!("log_append:{}", topic.name()).as_str()]);
    let writer = Writer {
        shared: shared.clone(),
        health: health.clone(),
        faults: faults.clone(),
        config: WriterConfig {
            segment_size_bytes: config.segment_size_bytes,
            retention_bytes: config.retention_bytes,
            max_batch_records: config.max_batch_records,
            fsync: config.fsync,
        },
        metrics: WriterMetrics {
            fsync_latency: metrics.log_fsync_latency.with_label_values(&label),
            batch_records: metrics.log_batch_records.with_label_values(&label),
            queue_depth: queue_depth.clone(),
        },
        active,
        next_offset: high,
        last_timestamp_ms,
        total_bytes,
        buf: Vec::new(),
        pending_index: Vec::new(),
        unpublished_records: 0,
        disk_full: false,
    };
    let (queue, receiver) = mpsc::channel(config.append_queue_depth);
    std::thread::Builder::new()
        .name(format!("log-{}-{partition:05}", topic.name()))
        .spawn(move || writer.run(receiver))
        .map_err(|e| LogError::Unavailable(format!("cannot start the log writer thread: {e}")))?;
    Ok(PartitionHandle {
        shared,
        queue,
        append_latency: metrics.log_append_latency.with_label_values(&label),
        queue_depth,
    })
}

#[async_trait]
impl Log for EmbeddedLog {
    fn partition_count(&self, topic: Topic) -> u32 {
        self.topics
            .iter()
            .find(|t| t.topic == topic)
            .map_or(0, |t| t.partitions.len() as u32)
    }

    /// An empty `records` writes nothing and returns the current
    /// high-watermark.
    async fn append(
        &self,
        topic: Topic,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<u64, LogError> {
        let handle = self.handle(topic, partition)?;
        if let Some(refusal) = self.refusal() {
            return Err(refusal);
        }
        for record in &records {
            self.check_record(record)?;
        }
        if records.is_empty() {
            return Ok(handle.shared.high_offset.load(Ordering::Acquire));
        }
        let started = Instant::now();
        let (ack, acked) = oneshot::channel();
        // Counted before sending so the writer's decrement never precedes it.
        handle.queue_depth.inc();
        if let Err(e) = handle
            .queue
            .try_send(WriterMsg::Append(PendingAppend { records, ack }))
        {
            handle.queue_depth.dec();
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => LogError::Full {
                    depth: self.append_queue_depth,
                },
                mpsc::error::TrySendError::Closed(_) => self.writer_gone(),
            });
        }
        let first_offset = acked.await.unwrap_or_else(|_| Err(self.writer_gone()))?;
        handle
            .append_latency
            .observe(started.elapsed().as_secs_f64());
        Ok(first_offset)
    }

    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max_records: usize,
        wait: Duration,
    ) -> Result<Vec<LogRecord>, LogError> {
        let shared = self.handle(topic, partition)?.shared.clone();
        // `None`: a wait too long to represent, i.e. until a record comes.
        let deadline = tokio::time::Instant::now().checked_add(wait);
        loop {
            // Registered before the watermark is checked, so an append
            // published in between still wakes this reader.
            let appended = shared.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();

            let (low, high) = shared.offsets();
            if from < low || from > high {
                return Err(shared.out_of_range(from));
            }
            if from < high {
                if max_records == 0 {
                    return Ok(Vec::new());
                }
                // The tail just written is (nearly always) in the page
                // cache: a little of it is read here, for less than the two
                // context switches of a hop to the blocking pool. Older
                // records may need the disk, and file reads that wait must
                // stay off the async worker threads.
                if high - from <= INLINE_READ_RECORDS {
                    let max = max_records.min(INLINE_READ_RECORDS as usize);
                    return reader::read_records(&shared, from, max, INLINE_READ_BYTES, high);
                }
                let reader = shared.clone();
                return tokio::task::spawn_blocking(move || {
                    reader::read_records(&reader, from, max_records, READ_MAX_BYTES, high)
                })
                .await
                .unwrap_or_else(|e| {
                    Err(LogError::Unavailable(format!("log read task failed: {e}")))
                });
            }
            match deadline {
                _ if wait.is_zero() => return Ok(Vec::new()),
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, appended).await.is_err() {
                        return Ok(Vec::new());
                    }
                }
                None => appended.await,
            }
        }
    }

    async fn offsets(&self, topic: Topic, partition: u32) -> Result<(u64, u64), LogError> {
        Ok(self.handle(topic, partition)?.shared.offsets())
    }

    /// True unless the log refuses appends for good or is closed: an
    /// `Unavailable` append was then a full disk, which the writer rolled
    /// back, and the next append may succeed once space is freed.
    fn may_recover(&self) -> bool {
        self.refusal().is_none()
    }

    async fn failed(&self) -> String {
        self.health.failed().await
    }

    fn release_before(&self, topic: Topic, partition: u32, offset: u64) {
        let Ok(handle) = self.handle(topic, partition) else {
            return;
        };
        handle
            .shared
            .released_before
            .store(offset, Ordering::Release);
        // If the queue is full the writer checks retention after that batch
        // anyway; nothing is lost by not waiting.
        let _ = handle.queue.try_send(WriterMsg::Retention);
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for handle in self.topics.iter().flat_map(|t| &t.partitions) {
            let (done, finished) = oneshot::channel();
            // Queued behind every accepted append, so those are written
            // first. Fails only if the writer already stopped.
            if handle.queue.send(WriterMsg::Shutdown(done)).await.is_ok() {
                let _ = finished.await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
