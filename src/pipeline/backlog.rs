//! How far each `orders` partition's runner is behind its log, for intake's
//! admission control. Runners publish the next offset they will read;
//! intake compares it with the log's high-watermark when an order for that
//! partition arrives, so appends since the runner's last batch count at
//! once (a runner stuck on a slow batch does not hide a growing queue).
//!
//! Only partitions this instance runs are known: distributed, an order
//! whose partition another instance owns is not checked here.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::pipeline::log::{Log, Topic};

/// `next` of a partition no runner of this instance owns.
const NOT_OWNED: u64 = u64::MAX;

pub struct Backlog {
    next: Vec<AtomicU64>,
}

impl Backlog {
    /// Every partition unowned until its runner starts.
    pub fn new(partitions: u32) -> Backlog {
        Backlog {
            next: (0..partitions).map(|_| AtomicU64::new(NOT_OWNED)).collect(),
        }
    }

    /// A runner starts reading `partition` at `next`; the returned guard
    /// marks it unowned again when the runner ends, however it ends.
    pub fn own(&self, partition: u32, next: u64) -> Owned<'_> {
        self.processed(partition, next);
        Owned {
            backlog: self,
            partition,
        }
    }

    /// The runner of `partition` will read `next` next.
    pub fn processed(&self, partition: u32, next: u64) {
        if let Some(slot) = self.next.get(partition as usize) {
            slot.store(next, Ordering::Release);
        }
    }

    /// Records of `partition` appended but not yet read by its runner;
    /// `None` when this instance does not run it.
    pub fn lag(&self, log: &dyn Log, partition: u32) -> Option<u64> {
        let next = self.next.get(partition as usize)?.load(Ordering::Acquire);
        if next == NOT_OWNED {
            return None;
        }
        let (_, high) = log.offsets(Topic::Orders, partition).ok()?;
        Some(high.saturating_sub(next))
    }
}

/// See [`Backlog::own`].
pub struct Owned<'a> {
    backlog: &'a Backlog,
    partition: u32,
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        self.backlog.processed(self.partition, NOT_OWNED);
    }
}
