//! The log: a partitioned, durable, append-only sequence of records per
//! topic. The pipeline sees only the [`Log`] trait; the embedded segment log
//! and Kafka implement it, and `crate::app` picks one at start-up.

pub mod embedded;
pub mod kafka;
#[cfg(test)]
pub(crate) mod memory;
pub mod release;

use std::time::Duration;

use async_trait::async_trait;

pub use crate::domain::RecordKind;
pub use crate::domain::partition::{murmur2, partition_for_key};

/// The two topics of the design.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Topic {
    /// Orders and orderflow's own saga/effect messages, keyed by SKU.
    Orders,
    /// Status transitions, keyed by order id.
    OrderStatus,
    /// The park lane: records an `orders` partition set aside, and what
    /// became of them (`crate::domain::parked`). Same partition count and
    /// numbering as `orders`.
    Parked,
}

impl Topic {
    pub const ALL: [Topic; 3] = [Topic::Orders, Topic::OrderStatus, Topic::Parked];

    pub fn name(self) -> &'static str {
        match self {
            Topic::Orders => "orders",
            Topic::OrderStatus => "order-status",
            Topic::Parked => "orders-parked",
        }
    }
}

/// A record to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// One read returns records of at most this many key + value bytes in all
/// (but always at least one record), whatever `max_records` asks: what a
/// batch holds in memory must not depend on how large producers make
/// their records.
pub const READ_MAX_BYTES: usize = 8 * 1024 * 1024;

/// A record read back, with its position and the time the log stamped on it
/// at append. That timestamp is the only time the processor ever sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub kind: RecordKind,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl LogRecord {
    /// What [`READ_MAX_BYTES`] counts of it.
    pub fn size_bytes(&self) -> usize {
        self.key.len() + self.value.len()
    }
}

/// Whose fault a failure is and whether trying again can help.
#[derive(thiserror::Error, Debug)]
pub enum LogError {
    /// The append queue is full: back-pressure, retry later (HTTP 429).
    #[error("log append queue is full ({depth} batches waiting); retry later")]
    Full { depth: usize },
    /// The log refuses writes (disk full, fsync failed, shutting down) (HTTP 503).
    #[error("log unavailable: {0}")]
    Unavailable(String),
    #[error("record of {size_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    RecordTooLarge { size_bytes: usize, max_bytes: usize },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A record in the middle of a segment is damaged: operator action needed.
    #[error("corrupt log record in {path} at byte {position} (offset {offset}): {detail}")]
    Corrupt {
        path: String,
        position: u64,
        offset: u64,
        detail: String,
    },
    #[error("partition {partition} does not exist (topic {topic} has {count})")]
    NoSuchPartition {
        topic: &'static str,
        partition: u32,
        count: u32,
    },
    #[error("offset {offset} is out of range [{low}, {high}) for {topic}/{partition}")]
    OffsetOutOfRange {
        topic: &'static str,
        partition: u32,
        offset: u64,
        low: u64,
        high: u64,
    },
}

impl LogError {
    /// True when the same call may succeed later without anyone acting.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LogError::Full { .. } | LogError::Unavailable(_))
    }
}

#[async_trait]
pub trait Log: Send + Sync + 'static {
    fn partition_count(&self, topic: Topic) -> u32;

    /// Appends `records` to one partition, in order. Returns the offset of
    /// the first once every record is durable (fsynced / acknowledged by
    /// the brokers), never before.
    async fn append(
        &self,
        topic: Topic,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<u64, LogError>;

    /// Reads up to `max_records` durable records from offset `from`, and
    /// stops early once they hold [`READ_MAX_BYTES`]. If none is there yet,
    /// waits up to `wait` for one; an empty result is no error.
    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max_records: usize,
        wait: Duration,
    ) -> Result<Vec<LogRecord>, LogError>;

    /// `(low, high)`: the first offset still kept and the next offset to be
    /// written (only durable records count).
    async fn offsets(&self, topic: Topic, partition: u32) -> Result<(u64, u64), LogError>;

    /// Everything below `offset` has been checkpointed by every reader of
    /// this partition; retention may delete whole segments below it.
    fn release_before(&self, topic: Topic, partition: u32, offset: u64);

    /// This instance no longer reads `partition` (its ownership moved):
    /// a backend that fetches ahead stops doing so.
    fn forget(&self, _topic: Topic, _partition: u32) {}

    /// Asked after an append failed with [`LogError::Unavailable`]: true
    /// when a later append may succeed without a restart (the embedded log
    /// after a write found its disk full and rolled it back). A writer that
    /// must not drop its output then waits and retries instead of stopping.
    /// False when the log refuses appends for good or is closed, and for
    /// backends that cannot tell.
    fn may_recover(&self) -> bool {
        false
    }

    /// Resolves, with the reason, once the log refuses appends for good
    /// (the embedded log after a failed fsync): the instance must stop.
    /// Never resolves on backends without such a state.
    async fn failed(&self) -> String {
        std::future::pending().await
    }

    /// Stops accepting appends and flushes what is queued.
    async fn close(&self);
}

/// Appends one record to the partition its key hashes to.
pub async fn append_keyed(
    log: &dyn Log,
    topic: Topic,
    record: Record,
) -> Result<(u32, u64), LogError> {
    let partition = partition_for_key(&record.key, log.partition_count(topic));
    let offset = log.append(topic, partition, vec![record]).await?;
    Ok((partition, offset))
}
