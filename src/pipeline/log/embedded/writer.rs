//! The single writer of one partition: group commit.
//!
//! One OS thread per partition drains the bounded append queue: it takes
//! every queued append up to `max_batch_records` records, writes their
//! frames, makes them durable with ONE `fdatasync`, publishes the new
//! durable high-watermark to readers and only then acknowledges every
//! appender of the batch. An OS thread rather than a tokio task because it
//! spends its life in blocking `write`/`fdatasync` calls.
//!
//! A batch that fails on a full disk is rolled back (see
//! [`Writer::roll_back`]); any other failure fails the whole log.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use prometheus::{Histogram, IntGauge};
use tokio::sync::{mpsc, oneshot};

use super::faults::Faults;
use super::segment::{
    INDEX_INTERVAL_BYTES, IndexEntry, encode_frame, frame_bytes, segment_file_name,
};
use super::{Health, PartitionShared, SegmentInfo, sync_dir};
use crate::pipeline::is_disk_full;
use crate::pipeline::log::{LogError, Record};

/// Encoded frames are handed to the kernel once this many bytes are
/// buffered, so a batch of large records never needs a second copy of the
/// whole batch in memory.
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// What the append queue carries.
pub(super) enum WriterMsg {
    Append(PendingAppend),
    /// `release_before` moved: check retention now rather than after the
    /// next append.
    Retention,
    /// Finish what is queued before this, then stop; answer when done.
    Shutdown(oneshot::Sender<()>),
}

/// One `append` call waiting for durability.
pub(super) struct PendingAppend {
    pub records: Vec<Record>,
    /// Gets the offset of the first record once all are durable.
    pub ack: oneshot::Sender<Result<u64, LogError>>,
}

/// The limits the writer enforces (from `LogConfig`).
#[derive(Clone, Copy, Debug)]
pub(super) struct WriterConfig {
    pub segment_size_bytes: u64,
    pub retention_bytes: u64,
    pub max_batch_records: usize,
    pub fsync: bool,
}

/// Per-topic metric handles, resolved once at open.
pub(super) struct WriterMetrics {
    pub fsync_latency: Histogram,
    pub batch_records: Histogram,
    pub queue_depth: IntGauge,
}

/// The partition's active (last) segment as the writer sees it, including
/// bytes written but not yet durable.
pub(super) struct ActiveSegment {
    pub file: File,
    pub path: Arc<Path>,
    pub base_offset: u64,
    /// Bytes in the file plus bytes still in the write buffer.
    pub size_bytes: u64,
    pub record_count: u64,
    pub last_index_position: u64,
}

/// Why a batch could not be made durable.
enum Failure {
    /// The disk is full. Nothing of the batch after the last fsync was
    /// published, so truncating it away leaves the log as it was.
    DiskFull(String),
    /// The log cannot be trusted any more (a failed fsync above all).
    Fatal(String),
}

fn fsync_failed(path: &Path, e: &std::io::Error) -> Failure {
    Failure::Fatal(format!(
        "fsync failed on {}: {e}: the log cannot be trusted; stopping",
        path.display()
    ))
}

pub(super) struct Writer {
    pub shared: Arc<PartitionShared>,
    pub health: Arc<Health>,
    pub faults: Arc<Faults>,
    pub config: WriterConfig,
    pub metrics: WriterMetrics,
    pub active: ActiveSegment,
    /// Next offset to assign.
    pub next_offset: u64,
    /// Timestamps never go backwards within a partition, even if the wall
    /// clock does (NTP step): the processors see only these.
    pub last_timestamp_ms: u64,
    /// Bytes of all segments of the partition (published).
    pub total_bytes: u64,
    /// Frames encoded but not yet handed to the kernel.
    pub buf: Vec<u8>,
    /// Index entries of the active segment not yet published.
    pub pending_index: Vec<IndexEntry>,
    /// Records written since the last publish.
    pub unpublished_records: u64,
    /// The last batch failed on a full disk (said once, until one succeeds).
    pub disk_full: bool,
}

impl Writer {
    /// The thread's body: runs until `Shutdown` or until every sender is gone.
    pub(super) fn run(mut self, mut queue: mpsc::Receiver<WriterMsg>) {
        let mut batch: Vec<PendingAppend> = Vec::new();
        while let Some(first) = queue.blocking_recv() {
            let mut shutdown = None;
            let mut retention = false;
            let mut batch_records = 0usize;
            let mut msg = Some(first);
            while let Some(m) = msg.take() {
                match m {
                    WriterMsg::Append(append) => {
                        self.metrics.queue_depth.dec();
                        batch_records += append.records.len();
                        batch.push(append);
                    }
                    WriterMsg::Retention => retention = true,
                    WriterMsg::Shutdown(ack) => {
                        shutdown = Some(ack);
                        break;
                    }
                }
                // An append is never split: the batch may exceed the limit
                // by the records of its last append.
                if batch_records < self.config.max_batch_records {
                    msg = queue.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.commit(&mut batch);
            }
            if retention || self.total_bytes > self.config.retention_bytes {
                self.enforce_retention();
            }
            if let Some(ack) = shutdown {
                self.finish(queue, ack);
                return;
            }
        }
    }

    /// After `Shutdown`: refuse what raced in behind it, then answer.
    fn finish(&mut self, mut queue: mpsc::Receiver<WriterMsg>, ack: oneshot::Sender<()>) {
        queue.close();
        let mut acks = vec![ack];
        while let Ok(msg) = queue.try_recv() {
            match msg {
                WriterMsg::Append(append) => {
                    self.metrics.queue_depth.dec();
                    let _ = append
                        .ack
                        .send(Err(LogError::Unavailable("log closed".into())));
                }
                WriterMsg::Retention => {}
                WriterMsg::Shutdown(ack) => acks.push(ack),
            }
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }

    /// Writes and syncs one batch and answers its appenders.
    fn commit(&mut self, batch: &mut Vec<PendingAppend>) {
        if let Some(reason) = self.health.failure() {
            for append in batch.drain(..) {
                let _ = append.ack.send(Err(LogError::Unavailable(reason.clone())));
            }
            return;
        }
        let reason = match self.write_batch(batch) {
            Ok(first_offsets) => {
                if std::mem::take(&mut self.disk_full) {
                    tracing::info!(
                        topic = self.shared.topic.name(),
                        partition = self.shared.partition,
                        "log writes resumed: the disk has space again"
                    );
                }
                for (append, first) in batch.drain(..).zip(first_offsets) {
                    // The appender may have stopped waiting; its records are
                    // durable either way.
                    let _ = append.ack.send(Ok(first));
                }
                return;
            }
            Err(Failure::DiskFull(reason)) => match self.roll_back() {
                Ok(()) => {
                    if !std::mem::replace(&mut self.disk_full, true) {
                        tracing::error!(
                            topic = self.shared.topic.name(),
                            partition = self.shared.partition,
                            %reason,
                            "log write failed: the disk is full; rolled back to the last durable record, appends fail until space is freed"
                        );
                    }
                    reason
                }
                Err(why) => self.fail(format!(
                    "{reason}; then truncating the partial write failed: {why}: the log cannot be trusted; stopping"
                )),
            },
            Err(Failure::Fatal(reason)) => self.fail(reason),
        };
        // Appends of a batch that was partly published before a segment
        // roll fail too: their callers retry, and receivers dedupe.
        for append in batch.drain(..) {
            let _ = append.ack.send(Err(LogError::Unavailable(reason.clone())));
        }
    }

    /// Makes the log refuse every later append; returns `reason`.
    fn fail(&self, reason: String) -> String {
        tracing::error!(
            topic = self.shared.topic.name(),
            partition = self.shared.partition,
            %reason,
            "log write failed; the log refuses all further appends"
        );
        // Whatever was written after the last good fsync cannot be trusted
        // (fsync may have dropped the dirty pages), so no later write may
        // pretend to follow it.
        self.health.fail(reason.clone());
        reason
    }

    /// After a write found the disk full: truncates the active segment back
    /// to its published (durable) length, makes that durable and forgets
    /// everything unpublished, so the next batch starts right after the
    /// last durable record and no torn frame stays in the file. Published
    /// records are untouched: the rollback never goes below what readers
    /// were shown or appenders were told.
    fn roll_back(&mut self) -> Result<(), String> {
        self.buf.clear();
        self.pending_index.clear();
        self.unpublished_records = 0;
        let durable = {
            let segments = self
                .shared
                .segments
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            segments
                .back()
                .filter(|s| s.base_offset == self.active.base_offset)
                .map(|s| {
                    (
                        s.size_bytes,
                        s.record_count,
                        s.index.last().map_or(0, |e| e.position),
                    )
                })
        };
        let Some((size_bytes, record_count, last_index_position)) = durable else {
            return Err(format!(
                "{} is not the partition's last published segment",
                self.active.path.display()
            ));
        };
        let path = self.active.path.display();
        self.faults
            .set_len(&self.active.file, size_bytes)
            .map_err(|e| format!("truncating {path} to {size_bytes} bytes: {e}"))?;
        if self.config.fsync {
            self.faults
                .sync_data(&self.active.file)
                .map_err(|e| format!("fsync of {path} after truncating it: {e}"))?;
        }
        // The file is append-only again from here on; readers must not
        // keep bytes they may have read ahead beyond the durable end.
        self.shared.rolled_back();
        self.active.size_bytes = size_bytes;
        self.active.record_count = record_count;
        self.active.last_index_position = last_index_position;
        self.next_offset = self.shared.high_offset.load(Ordering::Acquire);
        Ok(())
    }

    /// Encodes, writes and syncs every record of the batch; returns the first
    /// offset of each append.
    fn write_batch(&mut self, batch: &[PendingAppend]) -> Result<Vec<u64>, Failure> {
        // One clock read per batch: every record of a group commit carries
        // the same timestamp.
        let timestamp_ms = crate::wall_clock::now_ms().max(self.last_timestamp_ms);
        self.last_timestamp_ms = timestamp_ms;
        let mut first_offsets = Vec::with_capacity(batch.len());
        for append in batch {
            first_offsets.push(self.next_offset);
            for record in &append.records {
                let frame_len = frame_bytes(&record.key, &record.value) as u64;
                // Roll before a record that would overflow the segment, so a
                // segment exceeds the limit only by holding one oversized record.
                if self.active.size_bytes > 0
                    && self.active.size_bytes + frame_len > self.config.segment_size_bytes
                {
                    self.sync_and_publish()?;
                    self.roll()?;
                }
                let position = self.active.size_bytes;
                if position - self.active.last_index_position >= INDEX_INTERVAL_BYTES {
                    self.pending_index.push(IndexEntry {
                        offset: self.next_offset,
                        position,
                    });
                    self.active.last_index_position = position;
                }
                encode_frame(
                    &mut self.buf,
                    record.kind,
                    timestamp_ms,
                    &record.key,
                    &record.value,
                );
                self.active.size_bytes += frame_len;
                self.active.record_count += 1;
                self.next_offset += 1;
                self.unpublished_records += 1;
                if self.buf.len() >= WRITE_BUFFER_BYTES {
                    self.flush_buffer()?;
                }
            }
        }
        self.sync_and_publish()?;
        Ok(first_offsets)
    }

    fn flush_buffer(&mut self) -> Result<(), Failure> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let result = self.faults.write_all(&mut self.active.file, &self.buf);
        self.buf.clear();
        result.map_err(|e| {
            let path = self.active.path.display();
            if is_disk_full(&e) {
                Failure::DiskFull(format!("disk full: writing {path} failed: {e}"))
            } else {
                Failure::Fatal(format!(
                    "write failed on {path}: {e}: the log cannot be trusted; stopping"
                ))
            }
        })
    }

    /// Makes everything written durable, then shows it to readers.
    fn sync_and_publish(&mut self) -> Result<(), Failure> {
        self.flush_buffer()?;
        if self.unpublished_records == 0 {
            return Ok(());
        }
        if self.config.fsync {
            let started = Instant::now();
            self.faults
                .sync_data(&self.active.file)
                .map_err(|e| fsync_failed(&self.active.path, &e))?;
            self.metrics
                .fsync_latency
                .observe(started.elapsed().as_secs_f64());
        }
        self.metrics
            .batch_records
            .observe(self.unpublished_records as f64);
        {
            let mut segments = self.shared.segments_mut();
            if let Some(segment) = segments
                .back_mut()
                .filter(|s| s.base_offset == self.active.base_offset)
            {
                self.total_bytes += self.active.size_bytes - segment.size_bytes;
                segment.record_count = self.active.record_count;
                segment.size_bytes = self.active.size_bytes;
                segment.index.append(&mut self.pending_index);
            }
        }
        // Segment metadata first, watermark second (Release): a reader that
        // sees the new high-watermark finds every record below it.
        self.shared
            .high_offset
            .store(self.next_offset, Ordering::Release);
        self.shared.appended.notify_waiters();
        self.unpublished_records = 0;
        Ok(())
    }

    /// Starts a new segment at `next_offset`. The previous one is already
    /// synced and published.
    fn roll(&mut self) -> Result<(), Failure> {
        let base_offset = self.next_offset;
        let path: Arc<Path> = self.shared.dir.join(segment_file_name(base_offset)).into();
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| {
                if is_disk_full(&e) {
                    Failure::DiskFull(format!(
                        "disk full: cannot create segment {}: {e}",
                        path.display()
                    ))
                } else {
                    Failure::Fatal(format!("cannot create segment {}: {e}", path.display()))
                }
            })?;
        if self.config.fsync {
            // The new file's directory entry must be durable before any of
            // its records is acknowledged.
            sync_dir(&self.shared.dir).map_err(|e| fsync_failed(&self.shared.dir, &e))?;
        }
        self.shared
            .segments_mut()
            .push_back(SegmentInfo::new(base_offset, path.clone()));
        self.active = ActiveSegment {
            file,
            path,
            base_offset,
            size_bytes: 0,
            record_count: 0,
            last_index_position: 0,
        };
        Ok(())
    }

    /// Deletes the oldest whole segments while the partition is over
    /// `retention_bytes`, but only those every reader has released, and
    /// never the active one.
    fn enforce_retention(&mut self) {
        let released_before = self.shared.released_before.load(Ordering::Acquire);
        let mut doomed = Vec::new();
        let low = {
            let mut segments = self.shared.segments_mut();
            while segments.len() > 1 && self.total_bytes > self.config.retention_bytes {
                let Some(oldest) = segments.front() else {
                    break;
                };
                if oldest.base_offset + oldest.record_count > released_before {
                    break;
                }
                if let Some(oldest) = segments.pop_front() {
                    self.total_bytes -= oldest.size_bytes;
                    doomed.push(oldest);
                }
            }
            segments.front().map(|s| s.base_offset)
        };
        if doomed.is_empty() {
            return;
        }
        if let Some(low) = low {
            // Before the files go: a reader checking `low` first never opens
            // a deleted segment (one racing past the check gets NotFound,
            // reported as OffsetOutOfRange).
            self.shared.low_offset.store(low, Ordering::Release);
            self.shared.drop_cursors_below(low);
        }
        for segment in doomed {
            match std::fs::remove_file(&segment.path) {
                Ok(()) => {
                    tracing::debug!(file = %segment.path.display(), "retention deleted segment")
                }
                // Not fatal: a leftover segment is found again at the next
                // open, contiguous with the rest, and deleted later.
                Err(e) => {
                    tracing::warn!(file = %segment.path.display(), error = %e, "retention could not delete segment")
                }
            }
        }
    }
}
