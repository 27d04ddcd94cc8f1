//! Several consumers of one log, each releasing at its own pace: the log's
//! retention may delete only what *every* consumer has released.
//!
//! [`Log::release_before`] holds one mark per partition. With the tracking
//! sink and the notifications sink both reading `order-status`, the faster
//! one must not let retention delete what the slower one still needs, so
//! each gets a [`ReleaseView`] and the log sees the smallest mark.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use crate::pipeline::log::{Log, LogError, LogRecord, Record, Topic};

struct Shared {
    inner: Arc<dyn Log>,
    /// Per (topic, partition): each consumer's release mark.
    marks: Mutex<HashMap<(Topic, u32), Vec<u64>>>,
    consumers: usize,
}

/// One consumer's view of a shared log: everything is the log's, except
/// `release_before`, which releases only up to the slowest consumer.
#[derive(Clone)]
pub struct ReleaseView {
    shared: Arc<Shared>,
    consumer: usize,
}

impl ReleaseView {
    /// `consumers` views of `log`, one per consumer.
    pub fn split(log: Arc<dyn Log>, consumers: usize) -> Vec<Arc<dyn Log>> {
        let shared = Arc::new(Shared {
            inner: log,
            marks: Mutex::new(HashMap::new()),
            consumers,
        });
        (0..consumers)
            .map(|consumer| {
                Arc::new(ReleaseView {
                    shared: shared.clone(),
                    consumer,
                }) as Arc<dyn Log>
            })
            .collect()
    }
}

#[async_trait]
impl Log for ReleaseView {
    fn partition_count(&self, topic: Topic) -> u32 {
        self.shared.inner.partition_count(topic)
    }

    async fn append(
        &self,
        topic: Topic,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<u64, LogError> {
        self.shared.inner.append(topic, partition, records).await
    }

    async fn read(
        &self,
        topic: Topic,
        partition: u32,
        from: u64,
        max_records: usize,
        wait: Duration,
    ) -> Result<Vec<LogRecord>, LogError> {
        self.shared
            .inner
            .read(topic, partition, from, max_records, wait)
            .await
    }

    async fn offsets(&self, topic: Topic, partition: u32) -> Result<(u64, u64), LogError> {
        self.shared.inner.offsets(topic, partition).await
    }

    fn release_before(&self, topic: Topic, partition: u32, offset: u64) {
        let lowest = {
            let mut marks = self
                .shared
                .marks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mine = marks
                .entry((topic, partition))
                .or_insert_with(|| vec![0; self.shared.consumers]);
            mine[self.consumer] = mine[self.consumer].max(offset);
            mine.iter().copied().min().unwrap_or(0)
        };
        if lowest > 0 {
            self.shared.inner.release_before(topic, partition, lowest);
        }
    }

    fn forget(&self, topic: Topic, partition: u32) {
        self.shared.inner.forget(topic, partition)
    }

    fn may_recover(&self) -> bool {
        self.shared.inner.may_recover()
    }

    async fn failed(&self) -> String {
        self.shared.inner.failed().await
    }

    async fn close(&self) {
        self.shared.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::log::memory::MemoryLog;

    /// The log sees the slowest consumer's mark, never more.
    #[test]
    fn releases_the_minimum() {
        let spy = Arc::new(MemoryLog::new(1));
        let views = ReleaseView::split(spy.clone(), 2);
        views[0].release_before(Topic::OrderStatus, 0, 100);
        assert!(
            spy.released.lock().unwrap().is_empty(),
            "the other consumer is at 0"
        );
        views[1].release_before(Topic::OrderStatus, 0, 40);
        views[1].release_before(Topic::OrderStatus, 0, 30);
        views[1].release_before(Topic::OrderStatus, 0, 150);
        assert_eq!(*spy.released.lock().unwrap(), vec![40, 40, 100]);
    }
}
