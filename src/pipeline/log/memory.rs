//! An in-memory [`Log`] for unit tests: it keeps what is appended, can be
//! told to refuse appends, notes the release marks it is given, and lets
//! tests wait on its counts instead of on time.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Log, LogError, LogRecord, Record, Topic};

/// How the log refuses appends while told to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Full,
    Unavailable,
}

pub struct MemoryLog {
    partitions: u32,
    /// Refused as too large above this.
    max_record_bytes: usize,
    /// Each append waits this long, so that appends can overlap.
    append_delay: Duration,
    refusing: Mutex<Option<Refusal>>,
    /// Every record appended, with its partition, in append order.
    records: Mutex<Vec<(u32, Record)>>,
    /// When each refusal happened (tokio time, which tests may pause).
    pub refused_at: Mutex<Vec<Instant>>,
    pub refusals: watch::Sender<usize>,
    appended: watch::Sender<usize>,
    /// The offsets `release_before` was called with, in order.
    pub released: Mutex<Vec<u64>>,
}

impl MemoryLog {
    pub fn new(partitions: u32) -> MemoryLog {
        MemoryLog {
            partitions,
            max_record_bytes: usize::MAX,
            append_delay: Duration::ZERO,
            refusing: Mutex::new(None),
            records: Mutex::new(Vec::new()),
            refused_at: Mutex::new(Vec::new()),
            refusals: watch::Sender::new(0),
            appended: watch::Sender::new(0),
            released: Mutex::new(Vec::new()),
        }
    }

    pub fn with_max_record_bytes(mut self, max_record_bytes: usize) -> MemoryLog {
        self.max_record_bytes = max_record_bytes;
        self
    }

    pub fn with_append_delay(mut self, delay: Duration) -> MemoryLog {
        self.append_delay = delay;
        self
    }

    /// Refuse every append from now on (`Some`), or take them again.
    pub fn refuse(&self, refusal: Option<Refusal>) {
        *self.refusing.lock().unwrap() = refusal;
    }

    /// Every record appended so far, with its partition, in order.
    pub fn records(&self) -> Vec<(u32, Record)> {
        self.records.lock().unwrap().clone()
    }

    /// The record at `offset` of `partition`.
    pub fn record(&self, partition: u32, offset: u64) -> Record {
        let records = self.records.lock().unwrap();
        let mut of_partition = records.iter().filter(|(p, _)| *p == partition);
        of_partition.nth(offset as usize).unwrap().1.clone()
    }

    /// Waits until `n` appends were refused.
    pub async fn refused(&self, n: usize) {
        let mut rx = self.refusals.subscribe();
        rx.wait_for(|r| *r >= n).await.unwrap();
    }

    /// Waits until the records appended so far satisfy `done`.
    pub async fn until(&self, done: impl Fn(&[(u32, Record)]) -> bool) {
        let mut rx = self.appended.subscribe();
        rx.wait_for(|_| done(&self.records.lock().unwrap()))
            .await
            .unwrap();
    }

    fn refusal(&self) -> Option<LogError> {
        let refusal = (*self.refusing.lock().unwrap())?;
        self.refused_at.lock().unwrap().push(Instant::now());
        self.refusals.send_modify(|n| *n += 1);
        Some(match refusal {
            Refusal::Full => LogError::Full { depth: 1 },
            Refusal::Unavailable => LogError::Unavailable("the test log refuses".into()),
        })
    }
}

#[async_trait]
impl Log for MemoryLog {
    fn partition_count(&self, _: Topic) -> u32 {
        self.partitions
    }

    async fn append(&self, _: Topic, partition: u32, batch: Vec<Record>) -> Result<u64, LogError> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        if let Some(r) = batch.iter().find(|r| r.value.len() > self.max_record_bytes) {
            return Err(LogError::RecordTooLarge {
                size_bytes: r.value.len(),
                max_bytes: self.max_record_bytes,
            });
        }
        if !self.append_delay.is_zero() {
            tokio::time::sleep(self.append_delay).await;
        }
        let n = batch.len();
        let first = {
            let mut records = self.records.lock().unwrap();
            let first = records.iter().filter(|(p, _)| *p == partition).count() as u64;
            records.extend(batch.into_iter().map(|r| (partition, r)));
            first
        };
        self.appended.send_modify(|a| *a += n);
        Ok(first)
    }

    async fn read(
        &self,
        _: Topic,
        _: u32,
        _: u64,
        _: usize,
        _: Duration,
    ) -> Result<Vec<LogRecord>, LogError> {
        Ok(Vec::new())
    }

    async fn offsets(&self, _: Topic, partition: u32) -> Result<(u64, u64), LogError> {
        let records = self.records.lock().unwrap();
        let n = records.iter().filter(|(p, _)| *p == partition).count();
        Ok((0, n as u64))
    }

    fn release_before(&self, _: Topic, _: u32, offset: u64) {
        self.released.lock().unwrap().push(offset);
    }

    async fn close(&self) {}
}
