//! How far each `orders` partition's runner is behind its log, for intake's
//! admission control. Runners publish the next offset they will read;
//! intake compares it with the log's high-watermark when an order for that
//! partition arrives, so appends since the runner's last batch count at
//! once (a runner stuck on a slow batch does not hide a growing queue).
//!
//! Only partitions this instance runs are known: distributed, an order
//! whose partition another instance owns is not checked here.
//!
//! A partition whose runner died is marked down until a restarted runner
//! owns it again (or for good, once the supervisor gave up on it): intake
//! refuses its orders rather than accept what nobody will process.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::pipeline::log::{Log, Topic};

/// `next` of a partition no runner of this instance owns.
const NOT_OWNED: u64 = u64::MAX;
/// `next` of a partition whose runner died here and is not running again.
const DOWN: u64 = u64::MAX - 1;

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

    /// The runner of `partition` died; a restarted one calls [`Backlog::own`].
    pub fn down(&self, partition: u32) {
        self.processed(partition, DOWN);
    }

    /// `partition` is not run here any more (its dead runner will not be
    /// restarted: the partition is stopping or moving to another owner).
    pub fn disown(&self, partition: u32) {
        self.processed(partition, NOT_OWNED);
    }

    /// Whether the runner of `partition` died here and runs no more.
    pub fn is_down(&self, partition: u32) -> bool {
        self.next
            .get(partition as usize)
            .is_some_and(|slot| slot.load(Ordering::Acquire) == DOWN)
    }

    /// Records of `partition` appended but not yet read by its runner;
    /// `None` when this instance does not run it (or its runner is down).
    pub async fn lag(&self, log: &dyn Log, partition: u32) -> Option<u64> {
        let next = self.next.get(partition as usize)?.load(Ordering::Acquire);
        if next == NOT_OWNED || next == DOWN {
            return None;
        }
        let (_, high) = log.offsets(Topic::Orders, partition).await.ok()?;
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
        // A runner unwinding from a panic is down from this instant on,
        // before the supervisor even notices: no order slips in between.
        let next = if std::thread::panicking() {
            DOWN
        } else {
            NOT_OWNED
        };
        self.backlog.processed(self.partition, next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runner that panics leaves its partition down, one that returns
    /// leaves it unowned; owning it again brings it back.
    #[test]
    fn a_panicking_owner_leaves_the_partition_down() {
        let backlog = Backlog::new(2);
        drop(backlog.own(0, 5));
        assert!(!backlog.is_down(0));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _owned = backlog.own(1, 5);
            panic!("injected");
        }));
        assert!(unwound.is_err());
        assert!(backlog.is_down(1));
        let _owned = backlog.own(1, 5);
        assert!(!backlog.is_down(1));
    }
}
