//! Bounded structures behind the saga-health metrics, fed by status events
//! in the metrics sink (outside the partition processors, so a wall clock
//! is fine here): the orders in flight with their acceptance times, and the
//! SKUs refusing most lines (space-saving top-k).

use std::collections::{BTreeSet, HashMap};

/// Orders in flight tracked one by one (for the oldest one's age). Past it,
/// new orders are only counted, so memory stays bounded (about 200 bytes an
/// order: some 20 MB) while the oldest ones, the interesting ones, stay
/// tracked.
pub const MAX_TRACKED_SAGAS: usize = 100_000;

/// Hard limit of `metrics.top_out_of_stock_skus` (k): one gauge series per
/// SKU, so this bounds the label cardinality of the top-k gauge.
pub const MAX_TOP_SKUS: usize = 100;

/// Space-saving counters kept per reported SKU: with `m = k × this`, every
/// SKU refused more than `N / m` times of `N` refusals is tracked, and each
/// count is over by at most `N / m`.
const COUNTERS_PER_TOP_SKU: usize = 10;

/// Accepted orders that have not reached a terminal status yet, as seen by
/// this instance's tracking sink, per `order-status` partition (a partition
/// that moves to another instance takes its orders along).
#[derive(Default)]
pub struct InFlight {
    /// order id → (status partition, acceptance time in ms).
    orders: HashMap<String, (u32, u64)>,
    by_age: BTreeSet<(u64, String)>,
    /// Per partition: orders in flight beyond [`MAX_TRACKED_SAGAS`].
    untracked: HashMap<u32, u64>,
}

impl InFlight {
    pub fn accepted(&mut self, partition: u32, order_id: &str, at_ms: u64) {
        if self.orders.contains_key(order_id) {
            return;
        }
        if self.orders.len() >= MAX_TRACKED_SAGAS {
            *self.untracked.entry(partition).or_default() += 1;
            return;
        }
        self.orders.insert(order_id.to_owned(), (partition, at_ms));
        self.by_age.insert((at_ms, order_id.to_owned()));
    }

    /// An order reached a terminal status after being accepted.
    pub fn finished(&mut self, partition: u32, order_id: &str) {
        if let Some((_, at)) = self.orders.remove(order_id) {
            self.by_age.remove(&(at, order_id.to_owned()));
        } else if let Some(n) = self.untracked.get_mut(&partition) {
            // Either one of the untracked ones or one accepted before this
            // sink started: the count is approximate only past the bound.
            *n = n.saturating_sub(1);
        }
    }

    /// Drops what belongs to a partition this instance no longer consumes.
    pub fn forget_partition(&mut self, partition: u32) {
        let by_age = &mut self.by_age;
        self.orders.retain(|id, &mut (p, at)| {
            let keep = p != partition;
            if !keep {
                by_age.remove(&(at, id.clone()));
            }
            keep
        });
        self.untracked.remove(&partition);
    }

    pub fn len(&self) -> u64 {
        self.orders.len() as u64 + self.untracked.values().sum::<u64>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Acceptance time of the oldest order in flight.
    pub fn oldest_at_ms(&self) -> Option<u64> {
        self.by_age.first().map(|(at, _)| *at)
    }
}

/// The space-saving algorithm (Metwally, Agrawal, El Abbadi, 2005): at most
/// `capacity` counters; an unseen item takes over the smallest counter and
/// inherits its count, so heavy hitters survive and memory never grows.
pub struct TopK {
    k: usize,
    capacity: usize,
    counts: HashMap<String, u64>,
}

impl TopK {
    /// Reports the `k` (at most [`MAX_TOP_SKUS`]) most frequent items.
    pub fn new(k: usize) -> TopK {
        let k = k.min(MAX_TOP_SKUS);
        TopK {
            k,
            capacity: k * COUNTERS_PER_TOP_SKU,
            counts: HashMap::new(),
        }
    }

    pub fn add(&mut self, item: &str) {
        if self.capacity == 0 {
            return;
        }
        if let Some(n) = self.counts.get_mut(item) {
            *n += 1;
            return;
        }
        if self.counts.len() < self.capacity {
            self.counts.insert(item.to_owned(), 1);
            return;
        }
        // A linear scan of at most 1,000 counters, only for an item not
        // tracked yet; ties go to the largest name so eviction is repeatable.
        let (victim, min) = self
            .counts
            .iter()
            .min_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(s, n)| (s.clone(), *n))
            .expect("a full table has a minimum");
        self.counts.remove(&victim);
        self.counts.insert(item.to_owned(), min + 1);
    }

    /// The `k` largest estimated counts, largest first (ties by name).
    pub fn top(&self) -> Vec<(&str, u64)> {
        let mut all: Vec<(&str, u64)> = self.counts.iter().map(|(s, n)| (s.as_str(), *n)).collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        all.truncate(self.k);
        all
    }

    pub fn counters(&self) -> usize {
        self.counts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Orders leave when they end; the oldest is reported; a moved
    /// partition takes its orders along.
    #[test]
    fn in_flight_tracks_the_oldest() {
        let mut f = InFlight::default();
        f.accepted(0, "a", 100);
        f.accepted(1, "b", 50);
        f.accepted(0, "c", 200);
        f.accepted(0, "a", 100);
        assert_eq!((f.len(), f.oldest_at_ms()), (3, Some(50)));
        f.finished(1, "b");
        assert_eq!((f.len(), f.oldest_at_ms()), (2, Some(100)));
        f.finished(0, "unknown");
        assert_eq!(f.len(), 2);
        f.forget_partition(0);
        assert!(f.is_empty());
        assert_eq!(f.oldest_at_ms(), None);
    }

    /// Past the bound orders are counted, not stored, and the oldest stays.
    #[test]
    fn in_flight_is_bounded() {
        let mut f = InFlight::default();
        for i in 0..MAX_TRACKED_SAGAS as u64 + 5 {
            f.accepted(3, &format!("o{i}"), 1_000 + i);
        }
        assert_eq!(f.len(), MAX_TRACKED_SAGAS as u64 + 5);
        assert_eq!(f.orders.len(), MAX_TRACKED_SAGAS);
        assert_eq!(f.oldest_at_ms(), Some(1_000));
        f.finished(3, "never-tracked");
        assert_eq!(f.len(), MAX_TRACKED_SAGAS as u64 + 4);
        f.forget_partition(3);
        assert!(f.is_empty());
    }

    /// Heavy hitters survive a long tail of distinct items with their exact
    /// counts when they arrive first; memory stays at the capacity.
    #[test]
    fn top_k_keeps_heavy_hitters_in_bounded_memory() {
        let mut t = TopK::new(2);
        for _ in 0..1_000 {
            t.add("hot");
        }
        for _ in 0..600 {
            t.add("warm");
        }
        // 2,000 distinct items over 18 free counters: the tail's estimates
        // climb to about 2,000 / 18, still far below "warm".
        for i in 0..2_000 {
            t.add(&format!("tail-{i}"));
        }
        assert_eq!(t.counters(), 2 * COUNTERS_PER_TOP_SKU);
        let top = t.top();
        assert_eq!(top.iter().map(|e| e.0).collect::<Vec<_>>(), ["hot", "warm"]);
        assert_eq!((top[0].1, top[1].1), (1_000, 600));
    }

    /// A hot item arriving after the table filled still rises to the top;
    /// k is capped at the hard limit; k = 0 keeps nothing.
    #[test]
    fn top_k_late_hitter_and_limits() {
        let mut t = TopK::new(1);
        for i in 0..COUNTERS_PER_TOP_SKU {
            t.add(&format!("cold-{i}"));
        }
        for _ in 0..5 {
            t.add("hot");
        }
        assert_eq!(t.top()[0].0, "hot");
        assert_eq!(TopK::new(10_000).k, MAX_TOP_SKUS);
        let mut off = TopK::new(0);
        off.add("x");
        assert!(off.top().is_empty() && off.counters() == 0);
    }
}
