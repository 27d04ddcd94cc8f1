//! The park lane as operators see it: the records the partition
//! processors set aside (read back from `orders-parked`), and the retry and
//! drop commands, which are control messages on `orders` so that the
//! processor decides in log order, as a replay will again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::parked::{ParkEvent, ParkedRecord};
use crate::domain::{Envelope, Message, RecordKind};
use crate::pipeline::log::{Log, LogError, Record, Topic};

/// Most lane records one listing reads (per partition); a longer lane is
/// an error that says so rather than an unbounded scan.
pub const MAX_LANE_RECORDS: u64 = 1_000_000;
const READ_BATCH: usize = 4096;

#[derive(thiserror::Error, Debug)]
pub enum ParkedError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("partition {partition} does not exist (there are {count})")]
    NoSuchPartition { partition: u32, count: u32 },
    #[error(
        "the park lane of partition {partition} holds {records} records, over the {MAX_LANE_RECORDS} a listing reads"
    )]
    LaneTooLong { partition: u32, records: u64 },
}

pub struct ParkLane {
    log: Arc<dyn Log>,
}

impl ParkLane {
    pub fn new(log: Arc<dyn Log>) -> ParkLane {
        ParkLane { log }
    }

    fn check(&self, partition: u32) -> Result<(), ParkedError> {
        let count = self.log.partition_count(Topic::Orders);
        if partition >= count {
            return Err(ParkedError::NoSuchPartition { partition, count });
        }
        Ok(())
    }

    /// The records parked now (parked and neither retried nor dropped
    /// since), by partition and offset.
    pub async fn list(&self) -> Result<Vec<ParkedRecord>, ParkedError> {
        let mut parked = BTreeMap::new();
        for partition in 0..self.log.partition_count(Topic::Parked) {
            let (low, high) = self.log.offsets(Topic::Parked, partition)?;
            if high - low > MAX_LANE_RECORDS {
                return Err(ParkedError::LaneTooLong {
                    partition,
                    records: high - low,
                });
            }
            let mut next = low;
            while next < high {
                let batch = self
                    .log
                    .read(Topic::Parked, partition, next, READ_BATCH, Duration::ZERO)
                    .await?;
                let Some(last) = batch.last() else { break };
                next = last.offset + 1;
                for r in &batch {
                    // Written by this build's processors only; a record of
                    // a newer build is skipped rather than failing the list.
                    match ParkEvent::decode(&r.value) {
                        Ok(ParkEvent::Parked(p)) => {
                            parked.insert((p.partition, p.offset), p);
                        }
                        Ok(e) => {
                            parked.remove(&e.position());
                        }
                        Err(e) => {
                            tracing::warn!(partition, offset = r.offset, error = %e, "park lane record skipped")
                        }
                    }
                }
            }
        }
        Ok(parked.into_values().collect())
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
