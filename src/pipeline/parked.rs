//! The park lane as operators see it: the records the partition
//! processors set aside and the captures and voids that failed for good
//! (read from their last checkpoints), and the retry and drop commands,
//! which are control messages on `orders` so that the processor decides in
//! log order, as a replay will again.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::domain::parked::ParkedRecord;
use crate::domain::{Effect, EffectKind, Envelope, Message, RecordKind};
use crate::pipeline::log::{Log, LogError, Record, Topic};
use crate::pipeline::store::{Scope, StateStore, StoreError};
use crate::stages::snapshot::{self, BlobRef, Manifest, SnapshotError};

/// Reads of one partition's lane before a listing gives up: each retry
/// follows a checkpoint that replaced (and deleted) the pages between the
/// manifest read and the page read.
const LANE_READ_ATTEMPTS: usize = 5;

#[derive(thiserror::Error, Debug)]
pub enum ParkedError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("partition {partition} does not exist (there are {count})")]
    NoSuchPartition { partition: u32, count: u32 },
}

/// A capture or void the gateway refused for good, waiting in partition
/// `partition`'s outbox for an operator.
#[derive(Debug)]
pub struct FailedEffect {
    pub partition: u32,
    pub effect: Effect,
    pub reason: String,
}

pub struct ParkLane {
    log: Arc<dyn Log>,
    store: Arc<dyn StateStore>,
}

impl ParkLane {
    pub fn new(log: Arc<dyn Log>, store: Arc<dyn StateStore>) -> ParkLane {
        ParkLane { log, store }
    }

    fn check(&self, partition: u32) -> Result<(), ParkedError> {
        let count = self.log.partition_count(Topic::Orders);
        if partition >= count {
            return Err(ParkedError::NoSuchPartition { partition, count });
        }
        Ok(())
    }

    /// The records parked as of each partition's last checkpoint, by
    /// partition and offset. The lane is part of the processor's state, so
    /// the checkpoint is its bounded, indexed copy (`orders-parked` is an
    /// audit trail with a retention, not something to fold on every call).
    pub async fn list(&self) -> Result<Vec<ParkedRecord>, ParkedError> {
        let mut parked = Vec::new();
        for partition in 0..self.log.partition_count(Topic::Orders) {
            parked.extend(self.checkpointed(partition).await?);
        }
        Ok(parked)
    }

    async fn checkpointed(&self, partition: u32) -> Result<Vec<ParkedRecord>, ParkedError> {
        let lane = self
            .read_checkpoint(partition, |m| m.lane.clone(), snapshot::parked_lane)
            .await?;
        Ok(lane.map(|l| l.into_values().collect()).unwrap_or_default())
    }

    /// The captures and voids that failed for good, as of each partition's
    /// last checkpoint, by partition and order.
    pub async fn failed_effects(&self) -> Result<Vec<FailedEffect>, ParkedError> {
        let mut failed = Vec::new();
        for partition in 0..self.log.partition_count(Topic::Orders) {
            let listed = self
                .read_checkpoint(partition, |m| m.head.clone(), snapshot::failed_effects)
                .await?;
            failed.extend(
                listed
                    .into_iter()
                    .flatten()
                    .map(|(effect, reason)| FailedEffect {
                        partition,
                        effect,
                        reason,
                    }),
            );
        }
        Ok(failed)
    }

    /// Decodes the `pages` of partition `partition`'s last checkpoint;
    /// `None` without a checkpoint.
    async fn read_checkpoint<T>(
        &self,
        partition: u32,
        pages: impl Fn(&Manifest) -> Vec<BlobRef>,
        decode: impl Fn(&Manifest, &BTreeMap<BlobRef, Vec<u8>>) -> Result<T, SnapshotError>,
    ) -> Result<Option<T>, ParkedError> {
        let corrupt = |e: SnapshotError| StoreError::Corrupt(e.to_string());
        for _ in 0..LANE_READ_ATTEMPTS {
            let Some(loaded) = self.store.load(Scope::Orders, partition).await? else {
                return Ok(None);
            };
            let manifest = Manifest::decode(partition, &loaded.manifest).map_err(corrupt)?;
            let refs = pages(&manifest);
            let bytes = self
                .store
                .read_blobs(Scope::Orders, partition, &refs)
                .await?;
            if bytes.iter().any(Option::is_none) {
                continue; // replaced and deleted since the manifest was read
            }
            let blobs = refs.into_iter().zip(bytes.into_iter().flatten()).collect();
            return Ok(Some(decode(&manifest, &blobs).map_err(corrupt)?));
        }
        Err(StoreError::Unavailable(format!(
            "the checkpoint of partition {partition} changed under each of {LANE_READ_ATTEMPTS} reads"
        ))
        .into())
    }

    /// Asks partition `partition` to process its parked records again, in
    /// order. Returns the offset of the command on `orders`.
    pub async fn retry(&self, partition: u32) -> Result<u64, ParkedError> {
        self.command(partition, Message::RetryParked).await
    }

    /// Asks partition `partition` to drop the parked record at `offset`.
    pub async fn drop_record(&self, partition: u32, offset: u64) -> Result<u64, ParkedError> {
        self.command(partition, Message::DropParked { offset })
            .await
    }

    /// Asks partition `partition` to forget a failed capture or void (an
    /// operator settled it by hand).
    pub async fn drop_effect(
        &self,
        partition: u32,
        order_id: String,
        kind: EffectKind,
    ) -> Result<u64, ParkedError> {
        self.command(partition, Message::DropEffect { order_id, kind })
            .await
    }

    async fn command(&self, partition: u32, body: Message) -> Result<u64, ParkedError> {
        self.check(partition)?;
        let record = Record {
            kind: RecordKind::Internal,
            key: b"orderflow-parked".to_vec(),
            value: Envelope::new(None, body).encode(),
        };
        Ok(self
            .log
            .append(Topic::Orders, partition, vec![record])
            .await?)
    }
}
