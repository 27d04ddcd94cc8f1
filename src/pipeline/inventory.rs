//! The inventory query and admin interface. Stock counters are owned by the
//! partition processors; runners publish the counters they change here after
//! each batch, and a stock change is itself a log message (`SetStock`), so
//! the single writer per SKU is never bypassed. A SKU whose partition
//! another instance owns (distributed deployment) is read from that
//! partition's last snapshot in the shared store (its stock page only; at
//! most `checkpoint.every_ms` old).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::domain::order::valid_sku;
use crate::domain::{Envelope, Message};
use crate::pipeline::log::{Log, LogError, Record, RecordKind, Topic, partition_for_key};
use crate::pipeline::store::{Scope, StateStore, StoreError};
use crate::stages::processor::StockRefused;
use crate::stages::snapshot::{self, Manifest};
use crate::stages::state::MAX_AVAILABLE;

/// How often a stock change on a partition owned elsewhere looks at the
/// store for the checkpoint that includes it.
const REMOTE_POLL_MS: u64 = 50;

/// Longest an admin stock change waits to be applied by its processor.
pub const APPLY_TIMEOUT_MS: u64 = 10_000;
/// Refusals kept for the admin calls waiting on them; past this many (the
/// changes came from another instance or a producer, nobody waits) the
/// oldest go.
const MAX_REFUSALS: usize = 1_024;
/// Attempts of a remote stock read whose page a newer snapshot replaced
/// between reading the manifest and the page.
const REMOTE_READ_ATTEMPTS: usize = 5;

/// A SKU's stock counters (`GET`/`PUT /v1/inventory/{sku}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    #[error("available must be at most {MAX_AVAILABLE}")]
    TooMuchStock,
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the stock change was logged but not applied within {0} ms")]
    Timeout(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The processor refused the change (a limit); nothing changed.
    #[error("the stock change was refused: {0}")]
    Refused(String),
}

pub struct Inventory {
    log: Arc<dyn Log>,
    counts: DashMap<String, StockCounts>,
    /// Per `orders` partition: the next offset its processor will apply.
    processed: Vec<watch::Sender<u64>>,
    /// Per `orders` partition: whether a runner of this instance owns it.
    owned: Vec<AtomicBool>,
    /// Refused stock changes by `(partition, offset)`, oldest first.
    refusals: std::sync::Mutex<std::collections::VecDeque<((u32, u64), String)>>,
    store: Arc<dyn StateStore>,
}

impl Inventory {
    pub fn new(log: Arc<dyn Log>, store: Arc<dyn StateStore>) -> Inventory {
        let partitions = log.partition_count(Topic::Orders);
        Inventory {
            log,
            counts: DashMap::new(),
            processed: (0..partitions).map(|_| watch::channel(0).0).collect(),
            owned: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            refusals: std::sync::Mutex::new(std::collections::VecDeque::new()),
            store,
        }
    }

    /// The supervisor tells which partitions this instance runs.
    pub fn set_owned(&self, partition: u32, owned: bool) {
        self.owned[partition as usize].store(owned, Ordering::SeqCst);
    }

    fn partition_of(&self, sku: &str) -> u32 {
        partition_for_key(sku.as_bytes(), self.log.partition_count(Topic::Orders))
    }

    /// The counters as of the last processed batch (or, for a partition
    /// owned elsewhere, its last checkpoint); `None` for a SKU that never
    /// had stock.
    pub async fn get(&self, sku: &str) -> Result<Option<StockCounts>, InventoryError> {
        let partition = self.partition_of(sku);
        if self.owned[partition as usize].load(Ordering::SeqCst) {
            return Ok(self.counts.get(sku).map(|c| c.clone()));
        }
        Ok(self.checkpointed(partition, sku).await?.1)
    }

    /// `(next_offset, counters)` of `sku` in its partition's last snapshot:
    /// the manifest, then the stock pages of the SKU's bucket (one, unless
    /// the bucket outgrew a page). Pages that a newer snapshot replaced in
    /// between are read again.
    async fn checkpointed(
        &self,
        partition: u32,
        sku: &str,
    ) -> Result<(u64, Option<StockCounts>), InventoryError> {
        for _ in 0..REMOTE_READ_ATTEMPTS {
            let Some(loaded) = self.store.load(Scope::Orders, partition).await? else {
                return Ok((0, None));
            };
            let corrupt = |e: snapshot::SnapshotError| StoreError::Corrupt(e.to_string());
            let manifest = Manifest::decode(partition, &loaded.manifest).map_err(corrupt)?;
            let pages = snapshot::stock_pages_of(&manifest, sku);
            let bytes = self
                .store
                .read_blobs(Scope::Orders, partition, &pages)
                .await?;
            if bytes.iter().any(Option::is_none) {
                continue; // replaced and deleted since the manifest was read
            }
            let mut stock = None;
            for (page, bytes) in pages.iter().zip(bytes.iter().flatten()) {
                stock = snapshot::stock_in_page(&manifest, *page, bytes, sku).map_err(corrupt)?;
                if stock.is_some() {
                    break;
                }
            }
            let counts = stock.map(|s| StockCounts {
                sku: sku.to_owned(),
                available: s.available,
                reserved: s.reserved,
                sold: s.sold,
            });
            return Ok((loaded.next_offset, counts));
        }
        Err(InventoryError::Store(StoreError::Unavailable(format!(
            "the stock page of {sku} changed under each of {REMOTE_READ_ATTEMPTS} reads"
        ))))
    }

    /// A runner reports the stock changes its processor refused.
    pub fn refused(&self, partition: u32, refused: &[StockRefused]) {
        if refused.is_empty() {
            return;
        }
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        for r in refused {
            if refusals.len() == MAX_REFUSALS {
                refusals.pop_front();
            }
            refusals.push_back(((partition, r.offset), r.reason.clone()));
        }
    }

    /// The refusal of the change at `(partition, offset)`, taken out.
    fn take_refusal(&self, partition: u32, offset: u64) -> Option<String> {
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        let at = refusals
            .iter()
            .position(|(k, _)| *k == (partition, offset))?;
        refusals.remove(at).map(|(_, reason)| reason)
    }

    /// Sets `sku`'s available stock through the log and waits until its
    /// processor has applied it, then answers the new counters.
    pub async fn set(&self, sku: &str, available: u64) -> Result<StockCounts, InventoryError> {
        if !valid_sku(sku) {
            return Err(InventoryError::InvalidSku);
        }
        if available > MAX_AVAILABLE {
            return Err(InventoryError::TooMuchStock);
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
        let partition = self.partition_of(sku);
        let offset = self
            .log
            .append(Topic::Orders, partition, vec![record])
            .await?;
        let timeout = Duration::from_millis(APPLY_TIMEOUT_MS);
        let counts = if self.owned[partition as usize].load(Ordering::SeqCst) {
            let mut rx = self.processed[partition as usize].subscribe();
            match tokio::time::timeout(timeout, rx.wait_for(|next| *next > offset)).await {
                Ok(Ok(_)) => {
                    if let Some(reason) = self.take_refusal(partition, offset) {
                        return Err(InventoryError::Refused(reason));
                    }
                    self.counts.get(sku).map(|c| c.clone())
                }
                _ => return Err(InventoryError::Timeout(APPLY_TIMEOUT_MS)),
            }
        } else {
            let waited = tokio::time::timeout(timeout, async {
                loop {
                    let (next, counts) = self.checkpointed(partition, sku).await?;
                    if next > offset {
                        return Ok::<_, InventoryError>(counts);
                    }
                    tokio::time::sleep(Duration::from_millis(REMOTE_POLL_MS)).await;
                }
            })
            .await;
            waited.map_err(|_| InventoryError::Timeout(APPLY_TIMEOUT_MS))??
        };
        Ok(counts.unwrap_or(StockCounts {
            sku: sku.to_owned(),
            ..Default::default()
        }))
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
