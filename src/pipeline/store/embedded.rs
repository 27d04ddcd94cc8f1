//! The embedded state store: one [redb](https://docs.rs/redb) file in the
//! data directory.
//!
//! Why redb: it is pure Rust (no C toolchain, no system library), fully
//! ACID on copy-on-write B-trees, and single-writer / multi-reader MVCC,
//! which matches one process owning its data directory (readers never block
//! the writer). A commit flips between two checksummed commit slots, so it
//! is crash-safe with no write-ahead log to replay on start-up. Its file
//! format is stable and documented, and the crate is well maintained.
//!
//! Layout. Every table maps bytes to bytes and this file encodes both sides
//! itself, so that no stored byte can make a decoder panic (bad bytes give
//! [`StoreError::Corrupt`]):
//! - `snapshots`: `scope (u8) ++ partition (u32 BE)` → `epoch (u64 BE) ++
//!   committed (u8: 0 after a claim alone, 1 once a snapshot is committed)
//!   ++ next_offset (u64 BE) ++ manifest`;
//! - `snapshot_blobs`: `scope (u8) ++ partition (u32 BE) ++ epoch (u64 BE)
//!   ++ id (u64 BE)` → the blob;
//! - `secrets`: `name` → 32 bytes.
//!
//! A commit is one write transaction (fencing check, blobs, snapshot row,
//! deletions) with [`Durability::Immediate`]; blocking redb calls run on
//! tokio's blocking pool. Nothing here is written per order: the file's
//! size follows the partitions' snapshots, which are bounded.
//!
//! Data directories of versions before bounded snapshots hold per-order
//! tables (`partition_state`, `intake`, `tracking`, ...); this version
//! refuses them with a message saying what to do, rather than misread them.
//!
//! I/O errors: after one, redb refuses every later call until the database
//! is opened again, so the store reopens it (see [`Db`]) and a full disk
//! ([`StoreError::DiskFull`]) passes once space is freed, without a restart.

use std::cell::Cell;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};

use super::{BlobRef, Scope, Snapshot, SnapshotWrite, StateStore, StoreError};
use crate::pipeline::is_disk_full;
use crate::telemetry::metrics::Metrics;

type BytesTable = TableDefinition<'static, &'static [u8], &'static [u8]>;

// Table names, also used in error messages.
const SNAPSHOTS_T: &str = "snapshots";
const BLOBS_T: &str = "snapshot_blobs";
const SECRETS_T: &str = "secrets";

const SNAPSHOTS: BytesTable = TableDefinition::new(SNAPSHOTS_T);
const BLOBS: BytesTable = TableDefinition::new(BLOBS_T);
const SECRETS: BytesTable = TableDefinition::new(SECRETS_T);

const ALL_TABLES: [BytesTable; 3] = [SNAPSHOTS, BLOBS, SECRETS];

/// Tables of the per-order layout of earlier versions.
const LEGACY_TABLES: [&str; 6] = [
    "partition_state",
    "intake",
    "tracking",
    "contacts",
    "notified",
    "sink_positions",
];

/// The [`StateStore`] kept in one redb database file.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Db>,
    /// Requests by operation, as `orderflow_store_request_seconds` (the
    /// same series the CQL store reports).
    metrics: Option<Arc<Metrics>>,
}

/// Longest wait of a reopen for the calls still using the failed database
/// (they fail fast, so this is only an upper bound).
const REOPEN_WAIT: Duration = Duration::from_secs(5);

thread_local! {
    /// Set by [`redb_err`] when redb reports an I/O failure on this thread,
    /// for [`Db::run`] to see after the call (the mapped error no longer says).
    static IO_FAILED: Cell<bool> = const { Cell::new(false) };
}

/// The redb database, reopened after an I/O error.
///
/// After a failed read, write or fsync, redb answers every later call with
/// `PreviousIo` until the `Database` is dropped and opened again, which
/// repairs it from its last durable commit. On a full disk that would stop
/// the store for good. Instead, the call that met the error takes the
/// database out of service and the next call opens it again, after the
/// calls still running on the old one are done (redb locks the file). While
/// the disk stays full the reopened database fails the same way, and every
/// such failure is a retryable `DiskFull`.
struct Db {
    path: PathBuf,
    /// `None` from an I/O error until the next call reopens it.
    current: Mutex<Option<Arc<Database>>>,
    /// The database taken out of service, until its last user drops it.
    retired: Mutex<Weak<Database>>,
    /// The last I/O error was a full disk, and no call succeeded since.
    disk_full: AtomicBool,
}

impl Db {
    fn new(path: &Path, db: Database) -> Db {
        Db {
            path: path.to_owned(),
            current: Mutex::new(Some(Arc::new(db))),
            retired: Mutex::new(Weak::new()),
            disk_full: AtomicBool::new(false),
        }
    }

    /// Runs `f` on the database, reopening it first if an I/O error took it
    /// out of service, and taking it out if `f` meets one.
    fn run<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let db = self.get().map_err(|e| self.classify(e, true))?;
        IO_FAILED.set(false);
        let result = f(&db);
        let io_failed = IO_FAILED.replace(false);
        if io_failed {
            self.retire(db);
        }
        match result {
            Ok(value) => {
                self.disk_full.store(false, Ordering::Relaxed);
                Ok(value)
            }
            Err(e) => Err(self.classify(e, io_failed)),
        }
    }

    /// A failure of a call that met an I/O error while the disk was full
    /// (`PreviousIo` because another call hit the full disk first, or a
    /// reopen that cannot repair yet) is as passing as that one.
    fn classify(&self, e: StoreError, io_failed: bool) -> StoreError {
        match e {
            StoreError::DiskFull(_) => {
                self.disk_full.store(true, Ordering::Relaxed);
                e
            }
            StoreError::Unavailable(detail)
                if io_failed && self.disk_full.load(Ordering::Relaxed) =>
            {
                StoreError::DiskFull(format!("{detail} (after the disk was found full)"))
            }
            e => e,
        }
    }

    /// The database in service, opened again if it was taken out.
    fn get(&self) -> Result<Arc<Database>, StoreError> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(db) = current.as_ref() {
            return Ok(Arc::clone(db));
        }
        // redb refuses a second open of a file: wait for the calls still
        // running on the old database (they fail fast) to drop it.
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let deadline = Instant::now() + REOPEN_WAIT;
        while retired.strong_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let at = self.path.display();
        let db = Database::create(&self.path)
            .map_err(|e| redb_err(e, format_args!("reopening {at} after an I/O error")))?;
        tracing::info!(path = %at, "state store reopened after an I/O error");
        let db = Arc::new(db);
        *current = Some(Arc::clone(&db));
        Ok(db)
    }

    /// Takes `failed` out of service (if no other call did already).
    fn retire(&self, failed: Arc<Database>) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|db| Arc::ptr_eq(db, &failed)) {
            *current = None;
            *self.retired.lock().unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(&failed);
            tracing::warn!(
                path = %self.path.display(),
                "state store I/O error: the database is reopened, from its last durable commit, before the next call"
            );
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens the database file at `path`, creating it (and its tables) if
    /// absent. The parent directory must exist. Fails with `Unavailable` if
    /// another `EmbeddedStore` (in this or another process) has it open,
    /// and with `Corrupt` for a file of the earlier per-order layout.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let at = path.display();
        let db = Database::create(path).map_err(|e| redb_err(e, format_args!("opening {at}")))?;
        refuse_legacy(&db, path)?;
        // Create every table up front, so read transactions can always open them.
        let txn = begin_write(&db)?;
        for table in ALL_TABLES {
            txn.open_table(table)
                .map_err(|e| redb_err(e, format_args!("creating table {}", table.name())))?;
        }
        commit(txn, "creating tables")?;
        Ok(EmbeddedStore {
            db: Arc::new(Db::new(path, db)),
            metrics: None,
        })
    }

    /// Times every request into `metrics` (per operation).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> EmbeddedStore {
        self.metrics = Some(metrics);
        self
    }

    /// Runs `f` with the database on tokio's blocking pool, timed as `op`.
    async fn blocking<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || db.run(f))
            .await
            .map_err(|e| StoreError::Unavailable(format!("state store task failed: {e}")))?;
        if let Some(m) = &self.metrics {
            m.store_latency
                .with_label_values(&[op])
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }
}

/// Refuses a file with the tables of the per-order layout: this version
/// can neither read nor bound them.
fn refuse_legacy(db: &Database, path: &Path) -> Result<(), StoreError> {
    let txn = db.begin_read().map_err(|e| redb_err(e, "begin read"))?;
    let tables = txn
        .list_tables()
        .map_err(|e| redb_err(e, "listing tables"))?;
    let legacy: Vec<String> = tables
        .map(|t| t.name().to_owned())
        .filter(|name| LEGACY_TABLES.contains(&name.as_str()))
        .collect();
    if legacy.is_empty() {
        return Ok(());
    }
    Err(StoreError::Corrupt(format!(
        "{} was written by an orderflow before bounded snapshots (it holds the per-order tables {}); \
         this version cannot read it. Let the version that wrote it finish its orders, then start \
         this one on a new --data-dir and load stock again with `orderflow stock load`",
        path.display(),
        legacy.join(", ")
    )))
}

fn snapshot_key(scope: Scope, partition: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = scope.code();
    key[1..].copy_from_slice(&partition.to_be_bytes());
    key
}

fn blob_key(scope: Scope, partition: u32, blob: BlobRef) -> [u8; 21] {
    let mut key = [0u8; 21];
    key[..5].copy_from_slice(&snapshot_key(scope, partition));
    key[5..13].copy_from_slice(&blob.epoch.to_be_bytes());
    key[13..].copy_from_slice(&blob.id.to_be_bytes());
    key
}

/// A snapshot row: the epoch, whether a snapshot was committed, the offset
/// and the manifest.
struct Row {
    epoch: u64,
    snapshot: Option<Snapshot>,
}

fn encode_row(epoch: u64, snapshot: Option<(&u64, &[u8])>) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + snapshot.map_or(0, |s| s.1.len()));
    out.extend_from_slice(&epoch.to_be_bytes());
    match snapshot {
        None => out.push(0),
        Some((next_offset, manifest)) => {
            out.push(1);
            out.extend_from_slice(&next_offset.to_be_bytes());
            out.extend_from_slice(manifest);
        }
    }
    out
}

fn decode_row(bytes: &[u8], scope: Scope, partition: u32) -> Result<Row, StoreError> {
    let bad = || {
        StoreError::Corrupt(format!(
            "{SNAPSHOTS_T}[{}/{partition}]: malformed row of {} bytes",
            scope.name(),
            bytes.len()
        ))
    };
    let word = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    if bytes.len() < 9 {
        return Err(bad());
    }
    let epoch = word(&bytes[..8]);
    let snapshot = match bytes[8] {
        0 if bytes.len() == 9 => None,
        1 if bytes.len() >= 17 => Some(Snapshot {
            epoch,
            next_offset: word(&bytes[9..17]),
            manifest: bytes[17..].to_vec(),
        }),
        _ => return Err(bad()),
    };
    Ok(Row { epoch, snapshot })
}

fn read_row(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    scope: Scope,
    partition: u32,
) -> Result<Option<Row>, StoreError> {
    let key = snapshot_key(scope, partition);
    let stored = table.get(key.as_slice()).map_err(|e| {
        redb_err(
            e,
            format_args!("{SNAPSHOTS_T}[{}/{partition}]", scope.name()),
        )
    })?;
    stored
        .map(|v| decode_row(v.value(), scope, partition))
        .transpose()
}

#[async_trait]
impl StateStore for EmbeddedStore {
    async fn claim(&self, scope: Scope, partition: u32) -> Result<u64, StoreError> {
        self.blocking("claim", move |db| {
            let txn = begin_write(db)?;
            let epoch = {
                let mut rows = txn
                    .open_table(SNAPSHOTS)
                    .map_err(|e| redb_err(e, format_args!("opening {SNAPSHOTS_T}")))?;
                let row = read_row(&rows, scope, partition)?;
                let epoch = row.as_ref().map_or(0, |r| r.epoch) + 1;
                let snapshot = row.as_ref().and_then(|r| r.snapshot.as_ref());
                let value = encode_row(
                    epoch,
                    snapshot.map(|s| (&s.next_offset, s.manifest.as_slice())),
                );
                let key = snapshot_key(scope, partition);
                rows.insert(key.as_slice(), value.as_slice()).map_err(|e| {
                    redb_err(
                        e,
                        format_args!("{SNAPSHOTS_T}[{}/{partition}] put", scope.name()),
                    )
                })?;
                epoch
            };
            commit(
                txn,
                format_args!("claim of {} partition {partition}", scope.name()),
            )?;
            Ok(epoch)
        })
        .await
    }

    async fn load(&self, scope: Scope, partition: u32) -> Result<Option<Snapshot>, StoreError> {
        self.blocking("load", move |db| {
            let txn = db.begin_read().map_err(|e| redb_err(e, "begin read"))?;
            let rows = txn
                .open_table(SNAPSHOTS)
                .map_err(|e| redb_err(e, format_args!("opening {SNAPSHOTS_T}")))?;
            Ok(read_row(&rows, scope, partition)?.and_then(|r| r.snapshot))
        })
        .await
    }

    async fn read_blobs(
        &self,
        scope: Scope,
        partition: u32,
        blobs: &[BlobRef],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let blobs = blobs.to_vec();
        self.blocking("blob_read", move |db| {
            let txn = db.begin_read().map_err(|e| redb_err(e, "begin read"))?;
            let table = txn
                .open_table(BLOBS)
                .map_err(|e| redb_err(e, format_args!("opening {BLOBS_T}")))?;
            blobs
                .iter()
                .map(|blob| {
                    let key = blob_key(scope, partition, *blob);
                    let stored = table.get(key.as_slice()).map_err(|e| {
                        redb_err(
                            e,
                            format_args!("{BLOBS_T}[{}/{partition}/{blob:?}]", scope.name()),
                        )
                    })?;
                    Ok(stored.map(|v| v.value().to_vec()))
                })
                .collect()
        })
        .await
    }

    /// One transaction: fencing check, blobs, the row, then deletions.
    async fn commit(&self, write: &SnapshotWrite) -> Result<(), StoreError> {
        let write = write.clone();
        let metrics = self.metrics.clone();
        self.blocking("commit", move |db| {
            let (scope, partition) = (write.scope, write.partition);
            let txn = begin_write(db)?;
            {
                let mut rows = txn
                    .open_table(SNAPSHOTS)
                    .map_err(|e| redb_err(e, format_args!("opening {SNAPSHOTS_T}")))?;
                let stored_epoch = read_row(&rows, scope, partition)?.map_or(0, |r| r.epoch);
                if stored_epoch != write.epoch {
                    // Dropping the uncommitted transaction aborts it: nothing is written.
                    let error = not_owner(scope, partition, write.epoch, stored_epoch);
                    if let (Some(m), StoreError::Fenced { .. }) = (&metrics, &error) {
                        m.checkpoint_fenced
                            .with_label_values(&[&partition.to_string()])
                            .inc();
                    }
                    return Err(error);
                }
                let mut blobs = txn
                    .open_table(BLOBS)
                    .map_err(|e| redb_err(e, format_args!("opening {BLOBS_T}")))?;
                for (blob, bytes) in &write.blobs {
                    let key = blob_key(scope, partition, *blob);
                    blobs
                        .insert(key.as_slice(), bytes.as_slice())
                        .map_err(|e| {
                            redb_err(
                                e,
                                format_args!(
                                    "{BLOBS_T}[{}/{partition}/{blob:?}] put",
                                    scope.name()
                                ),
                            )
                        })?;
                }
                let value = encode_row(write.epoch, Some((&write.next_offset, &write.manifest)));
                let key = snapshot_key(scope, partition);
                rows.insert(key.as_slice(), value.as_slice()).map_err(|e| {
                    redb_err(
                        e,
                        format_args!("{SNAPSHOTS_T}[{}/{partition}] put", scope.name()),
                    )
                })?;
                delete_in(&mut blobs, scope, partition, &write.drop)?;
            }
            commit(
                txn,
                format_args!("snapshot of {} partition {partition}", scope.name()),
            )
        })
        .await
    }

    async fn delete_blobs(
        &self,
        scope: Scope,
        partition: u32,
        blobs: &[BlobRef],
    ) -> Result<(), StoreError> {
        if blobs.is_empty() {
            return Ok(());
        }
        let blobs = blobs.to_vec();
        self.blocking("blob_delete", move |db| {
            let txn = begin_write(db)?;
            {
                let mut table = txn
                    .open_table(BLOBS)
                    .map_err(|e| redb_err(e, format_args!("opening {BLOBS_T}")))?;
                delete_in(&mut table, scope, partition, &blobs)?;
            }
            commit(
                txn,
                format_args!("blob deletion of {} partition {partition}", scope.name()),
            )
        })
        .await
    }

    async fn secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
        let name = name.to_owned();
        self.blocking("secret", move |db| {
            {
                let txn = db.begin_read().map_err(|e| redb_err(e, "begin read"))?;
                let table = txn
                    .open_table(SECRETS)
                    .map_err(|e| redb_err(e, format_args!("opening {SECRETS_T}")))?;
                let stored = table
                    .get(name.as_bytes())
                    .map_err(|e| redb_err(e, format_args!("{SECRETS_T}[{name:?}]")))?;
                if let Some(v) = stored {
                    return decode_secret(v.value(), &name);
                }
            }
            // Absent: create it, unless another caller did since (read again
            // inside the write transaction; writers are serialized).
            let txn = begin_write(db)?;
            let secret = {
                let mut table = txn
                    .open_table(SECRETS)
                    .map_err(|e| redb_err(e, format_args!("opening {SECRETS_T}")))?;
                let existing = {
                    let stored = table
                        .get(name.as_bytes())
                        .map_err(|e| redb_err(e, format_args!("{SECRETS_T}[{name:?}]")))?;
                    stored
                        .map(|v| decode_secret(v.value(), &name))
                        .transpose()?
                };
                if let Some(existing) = existing {
                    return Ok(existing);
                }
                let secret = rand::random::<[u8; 32]>();
                table
                    .insert(name.as_bytes(), secret.as_slice())
                    .map_err(|e| redb_err(e, format_args!("{SECRETS_T}[{name:?}] put")))?;
                secret
            };
            commit(txn, format_args!("{SECRETS_T}[{name:?}]"))?;
            Ok(secret)
        })
        .await
    }
}

/// The error of a commit by `epoch` where `stored` is the partition's epoch.
pub(crate) fn not_owner(scope: Scope, partition: u32, epoch: u64, stored: u64) -> StoreError {
    if stored > epoch {
        StoreError::Fenced {
            scope: scope.name(),
            partition,
            epoch,
            stored_epoch: stored,
        }
    } else {
        StoreError::Corrupt(format!(
            "commit of {} partition {partition} with epoch {epoch}, which was never claimed (stored epoch {stored})",
            scope.name()
        ))
    }
}

fn delete_in(
    table: &mut redb::Table<'_, &'static [u8], &'static [u8]>,
    scope: Scope,
    partition: u32,
    blobs: &[BlobRef],
) -> Result<(), StoreError> {
    for blob in blobs {
        let key = blob_key(scope, partition, *blob);
        table.remove(key.as_slice()).map_err(|e| {
            redb_err(
                e,
                format_args!("{BLOBS_T}[{}/{partition}/{blob:?}] delete", scope.name()),
            )
        })?;
    }
    Ok(())
}

fn begin_write(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut txn = db.begin_write().map_err(|e| redb_err(e, "begin write"))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| redb_err(e, "set durability"))?;
    Ok(txn)
}

fn commit(txn: WriteTransaction, what: impl Display) -> Result<(), StoreError> {
    txn.commit()
        .map_err(|e| redb_err(e, format_args!("commit of {what}")))
}

/// Maps a redb error: damaged or mismatched data is `Corrupt`, the rest
/// (I/O, closed database, file locked by another process) `Unavailable`.
fn redb_err(err: impl Into<redb::Error>, what: impl Display) -> StoreError {
    let err = err.into();
    if matches!(err, redb::Error::Io(_) | redb::Error::PreviousIo) {
        IO_FAILED.set(true);
    }
    match err {
        redb::Error::Io(e) if is_disk_full(&e) => StoreError::DiskFull(format!("{what}: {e}")),
        redb::Error::Corrupted(msg) => StoreError::Corrupt(format!("{what}: {msg}")),
        err @ (redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. }
        | redb::Error::TableDoesNotExist(_)
        | redb::Error::UpgradeRequired(_)) => StoreError::Corrupt(format!("{what}: {err}")),
        err => StoreError::Unavailable(format!("{what}: {err}")),
    }
}

fn decode_secret(bytes: &[u8], name: &str) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(bytes).map_err(|_| {
        StoreError::Corrupt(format!(
            "{SECRETS_T}[{name:?}]: expected 32 bytes, found {}",
            bytes.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit refused because a newer owner claimed the partition is counted once.
    #[tokio::test]
    async fn a_fenced_commit_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let store = EmbeddedStore::open(&dir.path().join("state.redb"))
            .unwrap()
            .with_metrics(metrics.clone());
        let first = store.claim(Scope::Orders, 7).await.unwrap();
        store.claim(Scope::Orders, 7).await.unwrap();
        let write = SnapshotWrite::manifest_only(Scope::Orders, 7, first, 1, vec![]);
        let fenced = store.commit(&write).await;
        assert!(
            matches!(fenced, Err(StoreError::Fenced { .. })),
            "{fenced:?}"
        );
        let counted = metrics.checkpoint_fenced.with_label_values(&["7"]).get();
        assert_eq!(counted, 1);
    }

    /// Undecodable stored rows give `Corrupt` naming the table and key, never a panic.
    #[tokio::test]
    async fn bad_stored_bytes_are_corrupt_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        {
            let txn = store.db.get().unwrap().begin_write().unwrap();
            txn.open_table(SECRETS)
                .unwrap()
                .insert(b"s".as_slice(), [0xc1u8, 0xff].as_slice())
                .unwrap();
            let key = snapshot_key(Scope::Orders, 9);
            txn.open_table(SNAPSHOTS)
                .unwrap()
                .insert(key.as_slice(), [0u8; 8].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let write = SnapshotWrite::manifest_only(Scope::Orders, 9, 1, 1, vec![]);
        let errors = [
            store.secret("s").await.unwrap_err(),
            store.load(Scope::Orders, 9).await.unwrap_err(),
            store.claim(Scope::Orders, 9).await.unwrap_err(),
            store.commit(&write).await.unwrap_err(),
        ];
        for err in errors {
            assert!(
                matches!(&err, StoreError::Corrupt(msg) if msg.contains('[')),
                "{err:?}"
            );
        }
    }

    /// A file of the per-order layout is refused with what to do.
    #[test]
    fn refuses_the_per_order_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let legacy: BytesTable = TableDefinition::new("intake");
            txn.open_table(legacy).unwrap();
            txn.commit().unwrap();
        }
        let err = EmbeddedStore::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("intake") && err.contains("new --data-dir"),
            "{err}"
        );
    }
}
