//! The finished set: the orders a partition finished recently, kept so that
//! the same order id again is recognised as the same order.
//!
//! Compact on purpose: a partition may remember millions of them. An entry
//! is an [`OrderKey`] (16 bytes) and a stamp (8 bytes: the terminal log time
//! with the outcome in the top bit). Entries live in a ring in the order
//! they finished, numbered from 0 for the life of the partition; a hash
//! index maps keys to ring numbers (32 bits each, wrapping). About 24 bytes
//! per entry in the ring and 5 to 10 in the index.
//!
//! Bounds: at most `max_entries` (the oldest go first, at insert), and an
//! entry older than `max_age_ms` of log time is forgotten: removed from the
//! front as time passes, and answered as unknown by [`Finished::get`] even
//! while it waits behind a younger one (log times need not be monotone).
//! Both rules depend only on the log, so a replay forgets exactly what the
//! live run forgot.

use std::collections::VecDeque;

use hashbrown::HashTable;

use crate::domain::OrderKey;

/// The top bit of a stamp: the order ended `confirmed`.
const CONFIRMED_BIT: u64 = 1 << 63;
/// Largest `max_entries`: ring numbers in the index are 32 bits.
pub const MAX_ENTRIES_LIMIT: usize = 1 << 31;

/// One finished order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishedEntry {
    pub key: OrderKey,
    /// Terminal log time (ms since the epoch), [`CONFIRMED_BIT`] set for `confirmed`.
    pub stamp: u64,
}

impl FinishedEntry {
    pub fn new(key: OrderKey, at_ms: u64, confirmed: bool) -> FinishedEntry {
        assert!(at_ms < CONFIRMED_BIT, "log time {at_ms} out of range");
        let flag = if confirmed { CONFIRMED_BIT } else { 0 };
        FinishedEntry {
            key,
            stamp: at_ms | flag,
        }
    }

    pub fn at_ms(&self) -> u64 {
        self.stamp & !CONFIRMED_BIT
    }

    pub fn confirmed(&self) -> bool {
        self.stamp & CONFIRMED_BIT != 0
    }
}

/// How long and how many finished orders are remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishedLimits {
    pub max_age_ms: u64,
    pub max_entries: usize,
}

impl Default for FinishedLimits {
    fn default() -> Self {
        FinishedLimits {
            max_age_ms: 24 * 3_600_000,
            max_entries: 1_000_000,
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Finished {
    limits: FinishedLimits,
    ring: VecDeque<FinishedEntry>,
    /// Ring number of `ring[0]`.
    first: u64,
    /// Key → ring number (low 32 bits) of its newest entry.
    index: HashTable<u32>,
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finished")
            .field("first", &self.first)
            .field("len", &self.ring.len())
            .finish_non_exhaustive()
    }
}

/// Equal when they remember the same entries under the same numbers.
impl PartialEq for Finished {
    fn eq(&self, other: &Finished) -> bool {
        self.first == other.first && self.ring == other.ring
    }
}

impl Eq for Finished {}

impl Default for Finished {
    fn default() -> Self {
        Finished::new(FinishedLimits::default())
    }
}

impl Finished {
    pub fn new(limits: FinishedLimits) -> Finished {
        assert!(
            (1..=MAX_ENTRIES_LIMIT).contains(&limits.max_entries),
            "max_entries {} out of range",
            limits.max_entries
        );
        Finished {
            limits,
            ring: VecDeque::new(),
            first: 0,
            index: HashTable::new(),
        }
    }

    /// The set with entries `entries` numbered from `first` on (a loaded
    /// snapshot). Entries past the count limit are dropped, oldest first.
    pub fn restore(
        limits: FinishedLimits,
        first: u64,
        entries: impl IntoIterator<Item = FinishedEntry>,
    ) -> Finished {
        let mut set = Finished::new(limits);
        set.first = first;
        for entry in entries {
            set.push(entry);
        }
        set
    }

    pub fn limits(&self) -> FinishedLimits {
        self.limits
    }

    /// Changes the limits (a restart with another configuration); the
    /// count limit applies at once, the age limit at the next `expire`.
    pub fn set_limits(&mut self, limits: FinishedLimits) {
        let restored = Finished::restore(limits, self.first, self.ring.iter().copied());
        *self = restored;
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Number of the oldest entry kept.
    pub fn first(&self) -> u64 {
        self.first
    }

    /// Number the next entry will get.
    pub fn next(&self) -> u64 {
        self.first + self.ring.len() as u64
    }

    /// Entries in finishing order, with their numbers.
    pub fn iter(&self) -> impl Iterator<Item = (u64, FinishedEntry)> + '_ {
        (self.first..).zip(self.ring.iter().copied())
    }

    /// Entries numbered `from..to` that are still kept.
    pub fn range(&self, from: u64, to: u64) -> impl Iterator<Item = (u64, FinishedEntry)> + '_ {
        let start = from.max(self.first).min(self.next());
        let end = to.max(start).min(self.next());
        let skip = (start - self.first) as usize;
        let take = (end - start) as usize;
        (start..).zip(self.ring.iter().skip(skip).take(take).copied())
    }

    fn number_at(&self, slot: u32) -> usize {
        slot.wrapping_sub(self.first as u32) as usize
    }

    /// Remembers that the order with `key` finished at `at_ms`.
    pub fn insert(&mut self, key: OrderKey, at_ms: u64, confirmed: bool) {
        self.push(FinishedEntry::new(key, at_ms, confirmed));
    }

    fn push(&mut self, entry: FinishedEntry) {
        if self.ring.len() == self.limits.max_entries {
            self.pop_front();
        }
        let number = self.next() as u32;
        let hash = entry.key.hash64();
        let (ring, first) = (&self.ring, self.first as u32);
        let found = self.index.find_mut(hash, |&slot| {
            ring[slot.wrapping_sub(first) as usize].key == entry.key
        });
        match found {
            // The same key again (finished, forgotten by age, finished
            // again): the index follows the newest entry.
            Some(slot) => *slot = number,
            None => {
                self.index.insert_unique(hash, number, |&slot| {
                    ring[slot.wrapping_sub(first) as usize].key.hash64()
                });
            }
        }
        self.ring.push_back(entry);
        debug_assert!(self.ring.len() <= self.limits.max_entries);
    }

    fn pop_front(&mut self) {
        let Some(entry) = self.ring.front().copied() else {
            return;
        };
        let number = self.first as u32;
        if let Ok(found) = self
            .index
            .find_entry(entry.key.hash64(), |&slot| slot == number)
        {
            found.remove();
        }
        self.ring.pop_front();
        self.first += 1;
    }

    /// Forgets, from the front, entries older than `max_age_ms` at log
    /// time `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(front) = self.ring.front() {
            if !self.too_old(front, now_ms) {
                break;
            }
            self.pop_front();
        }
    }

    fn too_old(&self, entry: &FinishedEntry, now_ms: u64) -> bool {
        entry.at_ms().saturating_add(self.limits.max_age_ms) < now_ms
    }

    /// The entry of `key` if it is remembered at log time `now_ms`.
    pub fn get(&self, key: &OrderKey, now_ms: u64) -> Option<FinishedEntry> {
        let slot = self.index.find(key.hash64(), |&slot| {
            self.ring[self.number_at(slot)].key == *key
        })?;
        let entry = self.ring[self.number_at(*slot)];
        (!self.too_old(&entry, now_ms)).then_some(entry)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn key(n: u32) -> OrderKey {
        OrderKey::of(&format!("ord-{n}"))
    }

    fn limits(max_age_ms: u64, max_entries: usize) -> FinishedLimits {
        FinishedLimits {
            max_age_ms,
            max_entries,
        }
    }

    /// The count limit drops the oldest first; lookups of dropped entries miss.
    #[test]
    fn count_limit_drops_oldest_first() {
        let mut f = Finished::new(limits(u64::MAX / 4, 3));
        for n in 0..5 {
            f.insert(key(n), 100 + u64::from(n), n % 2 == 0);
        }
        assert_eq!((f.first(), f.next(), f.len()), (2, 5, 3));
        assert!(f.get(&key(0), 200).is_none() && f.get(&key(1), 200).is_none());
        let e = f.get(&key(4), 200).unwrap();
        assert_eq!((e.at_ms(), e.confirmed()), (104, true));
        assert!(!f.get(&key(3), 200).unwrap().confirmed());
    }

    /// Age expiry pops from the front; an old entry behind a young one is
    /// already unknown to lookups.
    #[test]
    fn age_limit_by_log_time() {
        let mut f = Finished::new(limits(1_000, 10));
        f.insert(key(1), 5_000, false);
        f.insert(key(2), 1_000, false); // an older log time behind a younger one
        f.insert(key(3), 5_500, false);
        f.expire(6_000);
        assert_eq!(f.len(), 3, "the front (5,000) is not too old at 6,000");
        assert!(f.get(&key(2), 6_000).is_none(), "too old, though kept");
        assert!(f.get(&key(1), 6_000).is_some());
        assert!(f.get(&key(1), 6_001).is_none());
        f.expire(6_501);
        assert_eq!((f.first(), f.len()), (3, 0));
    }

    /// A key finished again after it was forgotten is found by its new entry.
    #[test]
    fn reinserted_key_follows_the_newest_entry() {
        let mut f = Finished::new(limits(10, 10));
        f.insert(key(1), 0, false);
        f.insert(key(1), 100, true);
        assert!(f.get(&key(1), 100).unwrap().confirmed());
        f.expire(100);
        assert_eq!(f.len(), 1, "the first entry expired");
        assert!(f.get(&key(1), 105).unwrap().confirmed());
    }

    /// `restore` rebuilds an equal set; `range` yields numbered slices.
    #[test]
    fn restore_and_range() {
        let mut f = Finished::new(limits(u64::MAX / 4, 4));
        for n in 0..7 {
            f.insert(key(n), u64::from(n), false);
        }
        let back = Finished::restore(f.limits(), f.first(), f.iter().map(|(_, e)| e));
        assert_eq!(back, f);
        assert!(back.get(&key(6), 6).is_some());
        let numbers: Vec<u64> = f.range(0, 5).map(|(n, _)| n).collect();
        assert_eq!(numbers, [3, 4]);
        assert_eq!(f.range(9, 12).count(), 0);
    }

    /// Entries are small: 24 bytes each in the ring.
    #[test]
    fn entries_are_compact() {
        assert_eq!(std::mem::size_of::<FinishedEntry>(), 24);
    }

    proptest! {
        /// Against a model (a map from key to its newest entry and number):
        /// lookups agree after any sequence of inserts and expiries.
        #[test]
        fn agrees_with_a_model(
            ops in prop::collection::vec((0u32..40, 0u64..50, any::<bool>(), any::<bool>()), 1..300),
            max_entries in 1usize..20,
            max_age_ms in 0u64..30,
        ) {
            let mut f = Finished::new(limits(max_age_ms, max_entries));
            let mut model: BTreeMap<OrderKey, (u64, FinishedEntry)> = BTreeMap::new();
            let mut now = 0u64;
            let mut numbered: Vec<FinishedEntry> = Vec::new();
            for (id, step, confirmed, expire) in ops {
                now += step % 7;
                if expire {
                    f.expire(now);
                } else {
                    let at = now.saturating_sub(step % 5);
                    f.insert(key(id), at, confirmed);
                    model.insert(key(id), (numbered.len() as u64, FinishedEntry::new(key(id), at, confirmed)));
                    numbered.push(FinishedEntry::new(key(id), at, confirmed));
                }
                prop_assert!(f.len() <= max_entries);
                for (k, (number, entry)) in &model {
                    let kept = *number >= f.first();
                    let fresh = entry.at_ms().saturating_add(max_age_ms) >= now;
                    let expected = (kept && fresh).then_some(*entry);
                    prop_assert_eq!(f.get(k, now), expected);
                }
                // The ring holds exactly the newest entries, in order.
                let tail = &numbered[f.first() as usize..];
                prop_assert_eq!(f.iter().map(|(_, e)| e).collect::<Vec<_>>(), tail.to_vec());
            }
        }
    }
}
