//! The partition runner's decisions, without I/O, tasks or clocks: which
//! records the processor has applied, what each batch must append and
//! where, which effects may go to the executor and when, when a checkpoint
//! is due and what it holds. The async runner (`super::run`) and the
//! simulation (`crate::sim`) both drive it; they differ only in how they
//! read, append, wait for durability and tell the time.
//!
//! Protocol: [`PartitionCore::apply`] a batch, make its appends durable,
//! then [`PartitionCore::confirm_durable`], which releases the batch's
//! effects; only then may the next batch be applied or a checkpoint taken
//! ([`PartitionCore::take_checkpoint`] refuses otherwise). That order is
//! what makes checkpoint + replay lose nothing: a checkpoint never covers
//! output a crash could still drop, and an effect never runs for output
//! that may vanish.

use std::collections::BTreeMap;

use crate::config::CheckpointConfig;
use crate::domain::Effect;
use crate::pipeline::log::{Record, Topic};
use crate::pipeline::store::{Scope, SnapshotWrite};
use crate::stages::processor::{Input, StockRefused};
use crate::stages::snapshot::{self, Manifest};
use crate::stages::{Output, PartitionState, Processor};

use super::output_batches;

/// What one applied batch asks of the caller.
#[derive(Debug, Default)]
pub struct Flush {
    /// Records to append, by topic and partition, order kept within each.
    pub appends: BTreeMap<(Topic, u32), Vec<Record>>,
    /// Records the processor skipped, and why.
    pub problems: Vec<String>,
    /// The SKUs whose stock changed, sorted, without repeats.
    pub stock_touched: Vec<String>,
    /// Stock changes the processor refused.
    pub stock_refused: Vec<StockRefused>,
}

pub struct PartitionCore {
    processor: Processor,
    status_partitions: u32,
    checkpoint: CheckpointConfig,
    /// Next offset to read.
    next_offset: u64,
    /// Records applied since the last checkpoint.
    since_checkpoint: u64,
    last_checkpoint_ms: u64,
    /// Output handed out by `apply` whose durability is not confirmed yet.
    unconfirmed: bool,
    /// The effects of that output, released by `confirm_durable`.
    held_effects: Vec<Effect>,
    /// The manifest of the last snapshot taken (or loaded).
    manifest: Manifest,
    /// Reused between batches.
    out: Output,
}

impl PartitionCore {
    /// A runner resuming from its checkpoint: `processor` holds the loaded
    /// state, `next_offset` the checkpoint's offset and `manifest` its
    /// manifest (empty for a partition without one). `now_ms` starts the
    /// checkpoint timer; the caller's clock must not go back.
    pub fn recover(
        processor: Processor,
        next_offset: u64,
        manifest: Manifest,
        status_partitions: u32,
        checkpoint: CheckpointConfig,
        now_ms: u64,
    ) -> PartitionCore {
        assert!(status_partitions > 0, "order-status has no partition");
        assert_eq!(
            manifest.partition, processor.partition,
            "another partition's manifest"
        );
        PartitionCore {
            manifest,
            processor,
            status_partitions,
            checkpoint,
            next_offset,
            since_checkpoint: 0,
            last_checkpoint_ms: now_ms,
            unconfirmed: false,
            held_effects: Vec::new(),
            out: Output::default(),
        }
    }

    /// The outbox of the loaded state: effects that may not have run
    /// before the crash, to run again (their idempotency keys make that
    /// safe) before the first batch.
    pub fn pending_effects(&self) -> Vec<Effect> {
        self.processor.pending_effects()
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub fn processor(&self) -> &Processor {
        &self.processor
    }

    pub fn state(&self) -> &PartitionState {
        &self.processor.state
    }

    /// Whether output handed out by [`PartitionCore::apply`] still waits
    /// for [`PartitionCore::confirm_durable`].
    pub fn is_unconfirmed(&self) -> bool {
        self.unconfirmed
    }

    /// Applies `records` in order (the log's next ones, from
    /// [`PartitionCore::next_offset`]) and returns what to append. Their
    /// effects wait in the core until the appends are confirmed durable.
    pub fn apply<'a>(&mut self, records: impl IntoIterator<Item = Input<'a>>) -> Flush {
        assert!(
            !self.unconfirmed,
            "partition {}: a batch applied before the previous output was durable",
            self.processor.partition
        );
        self.out.clear();
        let mut applied: u64 = 0;
        for record in records {
            assert!(
                record.offset >= self.next_offset,
                "partition {}: offset {} read again (next is {})",
                self.processor.partition,
                record.offset,
                self.next_offset
            );
            let offset = record.offset;
            self.processor.apply(record, &mut self.out);
            self.next_offset = offset + 1;
            applied += 1;
        }
        self.since_checkpoint += applied;
        self.unconfirmed = true;
        self.held_effects.append(&mut self.out.effects);
        let (partition, orders_n) = (self.processor.partition, self.processor.partitions);
        let appends = output_batches(&mut self.out, partition, orders_n, self.status_partitions);
        let mut stock_touched = std::mem::take(&mut self.out.stock_touched);
        stock_touched.sort_unstable();
        stock_touched.dedup();
        Flush {
            appends,
            problems: std::mem::take(&mut self.out.problems),
            stock_touched,
            stock_refused: std::mem::take(&mut self.out.stock_refused),
        }
    }

    /// The caller made the last batch's appends durable: its effects may
    /// go to the executor now (in the order the processor emitted them).
    pub fn confirm_durable(&mut self) -> Vec<Effect> {
        self.unconfirmed = false;
        std::mem::take(&mut self.held_effects)
    }

    /// The production rule: every `every_messages` records, or every
    /// `every_ms` when anything was applied since the last one. A due
    /// checkpoint starts once the previous write (if any) finished, so the
    /// partition never waits for the store; nothing forces one sooner,
    /// since a checkpoint's size is bounded by the state's bounds.
    pub fn checkpoint_due(&self, now_ms: u64) -> bool {
        let elapsed_ms = now_ms.saturating_sub(self.last_checkpoint_ms);
        self.since_checkpoint >= self.checkpoint.every_messages
            || (self.since_checkpoint > 0 && elapsed_ms >= self.checkpoint.every_ms)
    }

    /// The next snapshot (what changed since the last one, plus the head)
    /// with the next offset, and the timer restarted at `now_ms`. Panics if
    /// output is not yet confirmed durable: a checkpoint past it could
    /// outlive that output.
    pub fn take_checkpoint(&mut self, epoch: u64, now_ms: u64) -> SnapshotWrite {
        assert!(
            !self.unconfirmed,
            "partition {}: checkpoint before the output was durable",
            self.processor.partition
        );
        self.checkpoint_unguarded(epoch, now_ms)
    }

    /// [`PartitionCore::take_checkpoint`] without the durability guard:
    /// only for the simulation's injected bug (`Bug::CheckpointUnflushed`),
    /// which proves the simulation catches what the guard prevents.
    pub(crate) fn checkpoint_unguarded(&mut self, epoch: u64, now_ms: u64) -> SnapshotWrite {
        let cp = snapshot::checkpoint(&mut self.processor.state, &mut self.manifest, epoch);
        self.since_checkpoint = 0;
        self.last_checkpoint_ms = now_ms;
        SnapshotWrite {
            scope: Scope::Orders,
            partition: self.processor.partition,
            epoch,
            next_offset: self.next_offset,
            manifest: cp.manifest,
            blobs: cp.blobs,
            drop: cp.drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Envelope, Message, RecordKind};

    fn core(every_messages: u64, every_ms: u64) -> PartitionCore {
        let processor = Processor::new(0, 1, PartitionState::default());
        let config = CheckpointConfig {
            every_messages,
            every_ms,
        };
        PartitionCore::recover(processor, 0, Manifest::empty(0), 1, config, 1_000)
    }

    fn set_stock(sku: &str, available: u64) -> Vec<u8> {
        let body = Message::SetStock {
            sku: sku.into(),
            available,
        };
        Envelope::new(None, body).encode()
    }

    fn input<'a>(offset: u64, key: &'a [u8], value: &'a [u8]) -> Input<'a> {
        Input {
            offset,
            timestamp_ms: 1_000 + offset,
            kind: RecordKind::Internal,
            key,
            value,
        }
    }

    /// Applies `n` restocks from the next offset and confirms them.
    fn apply_confirmed(c: &mut PartitionCore, n: u64) {
        let bodies: Vec<Vec<u8>> = (0..n).map(|i| set_stock("SKU-0", i)).collect();
        let first = c.next_offset();
        let flush = c.apply(
            bodies
                .iter()
                .enumerate()
                .map(|(i, b)| input(first + i as u64, b"SKU-0", b)),
        );
        assert!(flush.problems.is_empty(), "{:?}", flush.problems);
        c.confirm_durable();
    }

    /// Applying advances the next offset and reports the touched SKUs once each.
    #[test]
    fn apply_advances_and_reports() {
        let mut c = core(100, 1_000);
        let (a, b) = (set_stock("SKU-0", 5), set_stock("SKU-0", 7));
        let flush = c.apply([input(0, b"SKU-0", &a), input(3, b"SKU-0", &b)]);
        assert_eq!(c.next_offset(), 4);
        assert_eq!(flush.stock_touched, ["SKU-0"]);
        assert!(c.is_unconfirmed());
        assert!(c.confirm_durable().is_empty());
        assert_eq!(c.state().stock.get("SKU-0").unwrap().available, 7);
    }

    /// A checkpoint is due after `every_messages` records.
    #[test]
    fn due_by_message_count() {
        let mut c = core(3, 60_000);
        apply_confirmed(&mut c, 2);
        assert!(!c.checkpoint_due(1_000));
        apply_confirmed(&mut c, 1);
        assert!(c.checkpoint_due(1_000));
        let write = c.take_checkpoint(7, 1_000);
        assert_eq!((write.epoch, write.next_offset), (7, 3));
        assert!(!write.blobs.is_empty());
        assert!(!c.checkpoint_due(1_000));
    }

    /// After `every_ms`, a checkpoint is due only if something was applied.
    #[test]
    fn due_by_time_only_after_changes() {
        let mut c = core(100, 500);
        assert!(!c.checkpoint_due(10_000));
        apply_confirmed(&mut c, 1);
        assert!(!c.checkpoint_due(1_499));
        assert!(c.checkpoint_due(1_500));
        c.take_checkpoint(1, 1_500);
        apply_confirmed(&mut c, 1);
        assert!(!c.checkpoint_due(1_999));
        assert!(c.checkpoint_due(2_000));
    }

    /// A checkpoint taken before the output is confirmed durable is refused.
    #[test]
    #[should_panic(expected = "checkpoint before the output was durable")]
    fn checkpoint_before_durable_is_refused() {
        let mut c = core(1, 1_000);
        let body = set_stock("SKU-0", 1);
        let _flush = c.apply([input(0, b"SKU-0", &body)]);
        c.take_checkpoint(1, 1_000);
    }

    /// A batch applied before the previous one was confirmed is refused.
    #[test]
    #[should_panic(expected = "before the previous output was durable")]
    fn apply_before_durable_is_refused() {
        let mut c = core(100, 1_000);
        let _flush = c.apply(std::iter::empty());
        let _flush = c.apply(std::iter::empty());
    }

    /// The unguarded checkpoint (the simulation's injected bug) does go past unconfirmed output.
    #[test]
    fn unguarded_checkpoint_skips_the_guard() {
        let mut c = core(1, 1_000);
        let body = set_stock("SKU-0", 1);
        let _flush = c.apply([input(0, b"SKU-0", &body)]);
        assert_eq!(c.checkpoint_unguarded(1, 1_000).next_offset, 1);
    }

    /// Effects are held until the output is confirmed, and the outbox is offered at recovery.
    #[test]
    fn effects_wait_for_durable_output() {
        let order = serde_json::json!({"order_id": "o1", "customer_id": "c1", "currency": "USD",
            "lines": [{"sku": "SKU-0", "quantity": 1, "unit_price": 100}],
            "payment": {"token": "tok_visa"}});
        let order = serde_json::to_vec(&order).unwrap();
        let stock = set_stock("SKU-0", 5);
        let mut c = core(100, 1_000);
        let _ = c.apply([input(0, b"SKU-0", &stock)]);
        c.confirm_durable();
        let flush = c.apply([Input {
            kind: RecordKind::OrderJson,
            ..input(1, b"SKU-0", &order)
        }]);
        assert!(flush.problems.is_empty(), "{:?}", flush.problems);
        assert!(!flush.appends.is_empty());
        let effects = c.confirm_durable();
        assert_eq!(effects.len(), 1, "{effects:?}");
        assert!(c.confirm_durable().is_empty());
        let write = c.take_checkpoint(1, 1_000);
        let manifest = Manifest::decode(0, &write.manifest).unwrap();
        let blobs = write.blobs.into_iter().collect();
        let state = snapshot::restore(&manifest, &blobs, Default::default()).unwrap();
        let recovered = PartitionCore::recover(
            Processor::new(0, 1, state),
            write.next_offset,
            manifest,
            1,
            CheckpointConfig::default(),
            0,
        );
        assert_eq!(recovered.next_offset(), 2);
        assert_eq!(recovered.pending_effects(), effects);
    }
}
