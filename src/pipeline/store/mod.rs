//! The state store: bounded snapshots of derived state, never a row per
//! order (docs/design.md, "The principle"). It keeps, per *scope* and
//! partition, one snapshot row (the owner's epoch, the log offset the
//! snapshot was taken at and a small manifest) and the immutable blobs the
//! manifest references, plus a few named secrets. The pipeline sees only
//! the [`StateStore`] trait; redb (embedded) and ScyllaDB implement it, and
//! `crate::app` picks one at start-up.

pub mod embedded;
pub mod scylla;

use async_trait::async_trait;

pub use crate::stages::snapshot::BlobRef;

/// Whose snapshots: a closed set, each with its own partitions and owners.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// An `orders` partition's processor state (manifest + blobs).
    Orders,
    /// The tracking read model's replay point of an `order-status`
    /// partition (a manifest only).
    Tracking,
    /// The notifications sink's position of an `order-status` partition
    /// (a manifest only).
    Notifications,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Orders, Scope::Tracking, Scope::Notifications];

    /// The stored code (never renumber).
    pub fn code(self) -> u8 {
        match self {
            Scope::Orders => 1,
            Scope::Tracking => 2,
            Scope::Notifications => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scope::Orders => "orders",
            Scope::Tracking => "tracking",
            Scope::Notifications => "notifications",
        }
    }
}

/// A committed snapshot row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The epoch of the owner that committed it.
    pub epoch: u64,
    /// The log offset to go on from after loading it.
    pub next_offset: u64,
    /// What the snapshot consists of (its owner's encoding).
    pub manifest: Vec<u8>,
}

/// One commit: blobs first, then the snapshot row (only if `epoch` still
/// owns the partition), then the deletion of blobs it replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotWrite {
    pub scope: Scope,
    pub partition: u32,
    pub epoch: u64,
    pub next_offset: u64,
    pub manifest: Vec<u8>,
    pub blobs: Vec<(BlobRef, Vec<u8>)>,
    pub drop: Vec<BlobRef>,
}

impl SnapshotWrite {
    /// A write of a manifest alone (the sinks' small snapshots).
    pub fn manifest_only(
        scope: Scope,
        partition: u32,
        epoch: u64,
        next_offset: u64,
        manifest: Vec<u8>,
    ) -> SnapshotWrite {
        SnapshotWrite {
            scope,
            partition,
            epoch,
            next_offset,
            manifest,
            blobs: Vec::new(),
            drop: Vec::new(),
        }
    }

    /// Bytes written: blobs and manifest.
    pub fn bytes(&self) -> usize {
        self.manifest.len() + self.blobs.iter().map(|(_, b)| b.len()).sum::<usize>()
    }
}

/// Whose fault a failure is and whether trying again can help.
#[derive(thiserror::Error, Debug, Clone)]
pub enum StoreError {
    /// A newer owner of the partition has claimed or written: this writer
    /// must stop (not a fault; not retryable).
    #[error(
        "{scope} snapshot of partition {partition} fenced: epoch {epoch} < stored epoch {stored_epoch}"
    )]
    Fenced {
        scope: &'static str,
        partition: u32,
        epoch: u64,
        stored_epoch: u64,
    },
    /// The store cannot be reached or timed out (retryable).
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The disk under the store is full: unavailable until someone frees
    /// space (the embedded store reopens itself then; see there).
    #[error("state store unavailable: disk full: {0}")]
    DiskFull(String),
    /// Stored data that cannot be read: an operator's problem, not retryable.
    #[error("state store data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::DiskFull(_))
    }
}

/// Attempts of a store call that fails with a retryable error (a timeout,
/// a node down) before the caller gives up: with the back-off below, about
/// 15 s in all, longer than a store node's restart or a paused process's
/// stale timers.
pub const STORE_ATTEMPTS: u32 = 10;
const STORE_BACKOFF_FIRST_MS: u64 = 25;
const STORE_BACKOFF_MAX_MS: u64 = 4_000;

/// Runs `call` until it succeeds, fails for good, or fails retryably
/// [`STORE_ATTEMPTS`] times. A full disk ([`StoreError::DiskFull`]) counts
/// no attempt: it lasts until someone frees space, however long that takes,
/// and stopping the instance would not free any. Only for calls that are
/// safe to repeat (commits with the same epoch and blobs, loads).
pub async fn with_retries<T, F, Fut>(what: &str, mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay_ms = STORE_BACKOFF_FIRST_MS;
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e @ StoreError::DiskFull(_)) => {
                tracing::warn!(what, error = %e, "state store call failed; retrying once the disk has space");
            }
            Err(e) if e.is_retryable() && attempt < STORE_ATTEMPTS => {
                tracing::warn!(what, attempt, error = %e, "state store call failed; retrying");
                attempt += 1;
            }
            other => return other,
        }
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        delay_ms = (delay_ms * 2).min(STORE_BACKOFF_MAX_MS);
    }
}

#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Makes the caller the owner of `(scope, partition)`: returns a new
    /// epoch, higher than any claimed before, and stores it so that from
    /// then on a commit with a lower epoch fails with `Fenced` (a former
    /// owner that is only paused cannot overwrite this one's snapshot).
    async fn claim(&self, scope: Scope, partition: u32) -> Result<u64, StoreError>;

    /// The last committed snapshot row of `(scope, partition)`, or `None`
    /// if none was ever committed.
    async fn load(&self, scope: Scope, partition: u32) -> Result<Option<Snapshot>, StoreError>;

    /// The bytes of each blob, in order; `None` for a blob that is not
    /// (or no longer) stored.
    async fn read_blobs(
        &self,
        scope: Scope,
        partition: u32,
        blobs: &[BlobRef],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError>;

    /// Writes `write.blobs`, then the snapshot row, only if `write.epoch`
    /// is still the partition's epoch (else `Fenced`, and the row is
    /// untouched), then deletes `write.drop`. Safe to repeat.
    async fn commit(&self, write: &SnapshotWrite) -> Result<(), StoreError>;

    /// Deletes blobs no snapshot references any more (idempotent).
    async fn delete_blobs(
        &self,
        scope: Scope,
        partition: u32,
        blobs: &[BlobRef],
    ) -> Result<(), StoreError>;

    /// A 32-byte secret named `name`, created at random on first use and
    /// kept in the store from then on (the same for every instance).
    async fn secret(&self, name: &str) -> Result<[u8; 32], StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `with_retries` over a call failing with `error` `failures` times.
    async fn attempts_until(error: StoreError, failures: u32) -> (Result<(), StoreError>, u32) {
        let mut calls = 0;
        let result = with_retries("test", || {
            calls += 1;
            let outcome = if calls <= failures {
                Err(error.clone())
            } else {
                Ok(())
            };
            async move { outcome }
        })
        .await;
        (result, calls)
    }

    /// A full disk is waited out however long it lasts; other retryable
    /// errors give up after `STORE_ATTEMPTS`, and the rest at once.
    #[tokio::test(start_paused = true)]
    async fn retries_a_full_disk_without_limit() {
        let failures = 5 * STORE_ATTEMPTS;
        let (result, calls) =
            attempts_until(StoreError::DiskFull("no space".into()), failures).await;
        assert!(result.is_ok());
        assert_eq!(calls, failures + 1);

        let (result, calls) =
            attempts_until(StoreError::Unavailable("timeout".into()), failures).await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))));
        assert_eq!(calls, STORE_ATTEMPTS);

        let (result, calls) = attempts_until(StoreError::Corrupt("bad".into()), failures).await;
        assert!(matches!(result, Err(StoreError::Corrupt(_))));
        assert_eq!(calls, 1);
    }
}
