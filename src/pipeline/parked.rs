//! The park lane as operators see it: the records the partition
//! processors set aside (read from their last checkpoints), and the retry and
//! drop commands, which are control messages on `orders` so that the
//! processor decides in log order, as a replay will again.

use std::sync::Arc;

use crate::domain::parked::ParkedRecord;
use crate::domain::{Envelope, Message, RecordKind};
use crate::pipeline::log::{Log, LogError, Record, Topic};
use crate::pipeline::store::{Scope, StateStore, StoreError};
use crate::stages::snapshot::{self, Manifest};

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
        let corrupt = |e: snapshot::SnapshotError| StoreError::Corrupt(e.to_string());
        for _ in 0..LANE_READ_ATTEMPTS {
            let Some(loaded) = self.store.load(Scope::Orders, partition).await? else {
                return Ok(Vec::new());
            };
            let manifest = Manifest::decode(partition, &loaded.manifest).map_err(corrupt)?;
            let bytes = self
                .store
                .read_blobs(Scope::Orders, partition, &manifest.lane)
                .await?;
            if bytes.iter().any(Option::is_none) {
                continue; // replaced and deleted since the manifest was read
            }
            let blobs = manifest
                .lane
                .iter()
                .copied()
                .zip(bytes.into_iter().flatten())
                .collect();
            let lane = snapshot::parked_lane(&manifest, &blobs).map_err(corrupt)?;
            return Ok(lane.into_values().collect());
        }
        Err(StoreError::Unavailable(format!(
            "the park lane of partition {partition} changed under each of {LANE_READ_ATTEMPTS} reads"
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
