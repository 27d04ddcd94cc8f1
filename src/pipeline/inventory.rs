//! The inventory query and admin interface. Stock counters are owned by the
//! partition processors; runners publish the counters they change here after
//! each batch, and a stock change is itself a log message (`SetStock`), so
//! the single writer per SKU is never bypassed.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::domain::order::valid_sku;
use crate::domain::{Envelope, Message};
use crate::pipeline::log::{Log, LogError, Record, RecordKind, Topic, partition_for_key};

/// Longest an admin stock change waits to be applied by its processor.
pub const APPLY_TIMEOUT_MS: u64 = 10_000;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockCounts {
    pub sku: String,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
}

#[derive(thiserror::Error, Debug)]
pub enum InventoryError {
    #[error("invalid SKU: must match [A-Za-z0-9._-]{{1,64}}")]
    InvalidSku,
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the stock change was logged but not applied within {0} ms")]
    Timeout(u64),
}

pub struct Inventory {
    log: Arc<dyn Log>,
    counts: DashMap<String, StockCounts>,
    /// Per `orders` partition: the next offset its processor will apply.
    processed: Vec<watch::Sender<u64>>,
}

impl Inventory {
    pub fn new(log: Arc<dyn Log>) -> Inventory {
        let partitions = log.partition_count(Topic::Orders);
        let processed = (0..partitions).map(|_| watch::channel(0).0).collect();
        Inventory {
            log,
            counts: DashMap::new(),
            processed,
        }
    }

    /// The counters as of the last processed batch; `None` for a SKU that
    /// never had stock.
    pub fn get(&self, sku: &str) -> Option<StockCounts> {
        self.counts.get(sku).map(|c| c.clone())
    }

    /// Sets `sku`'s available stock through the log and waits until its
    /// processor has applied it, then answers the new counters.
    pub async fn set(&self, sku: &str, available: u64) -> Result<StockCounts, InventoryError> {
        if !valid_sku(sku) {
            return Err(InventoryError::InvalidSku);
        }
        let msg = Envelope::new(
            None,
            Message::SetStock {
                sku: sku.to_owned(),
                available,
            },
        );
        let record = Record {
            kind: RecordKind::Internal,
            key: sku.as_bytes().to_vec(),
            value: msg.encode(),
        };
        let partition = partition_for_key(sku.as_bytes(), self.log.partition_count(Topic::Orders));
        let offset = self
            .log
            .append(Topic::Orders, partition, vec![record])
            .await?;
        let mut rx = self.processed[partition as usize].subscribe();
        let applied = tokio::time::timeout(
            Duration::from_millis(APPLY_TIMEOUT_MS),
            rx.wait_for(|next| *next > offset),
        )
        .await;
        match applied {
            Ok(Ok(_)) => Ok(self.get(sku).unwrap_or(StockCounts {
                sku: sku.to_owned(),
                ..Default::default()
            })),
            _ => Err(InventoryError::Timeout(APPLY_TIMEOUT_MS)),
        }
    }

    /// Called by a runner after a batch: publish counters, then progress.
    pub fn publish(
        &self,
        partition: u32,
        counts: impl IntoIterator<Item = StockCounts>,
        next_offset: u64,
    ) {
        for c in counts {
            self.counts.insert(c.sku.clone(), c);
        }
        self.processed[partition as usize].send_replace(next_offset);
    }
}
