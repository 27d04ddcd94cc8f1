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
//! - `partition_state`: `partition (u32 BE) ++ row key` → row value; one
//!   partition is one contiguous key range;
//! - `partition_meta`: `partition (u32 BE)` → `next_offset (u64 BE) ++ epoch (u64 BE)`;
//! - `intake`: `order_id` → MessagePack (named fields) of [`IntakeRecord`];
//! - `tracking`: `order_id` → MessagePack of [`TrackingView`] (its compact stored form);
//! - `sink_positions`: `len(sink) (u32 BE) ++ sink ++ partition (u32 BE)` → `next offset (u64 BE)`;
//! - `secrets`: `name` → 32 bytes;
//! - `contacts`: `order_id` → contact email (UTF-8), written by intake;
//! - `notified`: `len(target) (u32 BE) ++ target ++ order_id` → highest
//!   settled notification seq (u32 BE).
//!
//! Every write is one redb write transaction committed with
//! [`Durability::Immediate`], except `put_contact` (see there); blocking
//! redb calls run on tokio's blocking pool.
//!
//! I/O errors: after one, redb refuses every later call until the database
//! is opened again, so the store reopens it (see [`Db`]) and a full disk
//! ([`StoreError::DiskFull`]) passes once space is freed, without a restart.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};
use serde::de::DeserializeOwned;

use super::{
    Applied, CheckpointWrite, IntakeRecord, Notified, PartitionCheckpoint, StateStore, StoreError,
    TrackingView, decode, encode,
};
use crate::domain::StatusEvent;
use crate::pipeline::is_disk_full;

type BytesTable = TableDefinition<'static, &'static [u8], &'static [u8]>;

// Table names, also used in error messages.
const STATE_T: &str = "partition_state";
const META_T: &str = "partition_meta";
const INTAKE_T: &str = "intake";
const TRACKING_T: &str = "tracking";
const SINK_POSITIONS_T: &str = "sink_positions";
const SECRETS_T: &str = "secrets";

const STATE: BytesTable = TableDefinition::new(STATE_T);
const META: BytesTable = TableDefinition::new(META_T);
const INTAKE: BytesTable = TableDefinition::new(INTAKE_T);
const TRACKING: BytesTable = TableDefinition::new(TRACKING_T);
const SINK_POSITIONS: BytesTable = TableDefinition::new(SINK_POSITIONS_T);
const SECRETS: BytesTable = TableDefinition::new(SECRETS_T);
const CONTACTS_T: &str = "contacts";
const NOTIFIED_T: &str = "notified";
const CONTACTS: BytesTable = TableDefinition::new(CONTACTS_T);
const NOTIFIED: BytesTable = TableDefinition::new(NOTIFIED_T);

const ALL_TABLES: [BytesTable; 8] = [
    STATE,
    META,
    INTAKE,
    TRACKING,
    SINK_POSITIONS,
    SECRETS,
    CONTACTS,
    NOTIFIED,
];

/// The [`StateStore`] kept in one redb database file.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Db>,
    intake: Arc<IntakeCommitter>,
}

/// Longest wait of a reopen for the calls still using the failed database
/// (they fail fast, so this is only an upper bound).
const REOPEN_WAIT: Duration = Duration::from_secs(5);
/// Contacts remembered until their order's intake record is durable; past
/// this many (orders whose append failed never get one) they are forgotten.
const MAX_UNSYNCED_CONTACTS: usize = 4 * INTAKE_QUEUE_DEPTH;

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
    /// Contacts committed without an fsync (`put_contact`) whose order's
    /// intake record is not yet durable. A reopen loses commits that were
    /// not made durable, so the intake commit writes these again.
    unsynced_contacts: Mutex<HashMap<String, String>>,
}

impl Db {
    fn new(path: &Path, db: Database) -> Db {
        Db {
            path: path.to_owned(),
            current: Mutex::new(Some(Arc::new(db))),
            retired: Mutex::new(Weak::new()),
            disk_full: AtomicBool::new(false),
            unsynced_contacts: Mutex::new(HashMap::new()),
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

    fn remember_contact(&self, order_id: String, email: String) {
        let mut contacts = self
            .unsynced_contacts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if contacts.len() >= MAX_UNSYNCED_CONTACTS {
            contacts.clear();
        }
        contacts.insert(order_id, email);
    }

    /// The unsynced contacts of `order_ids`, taken out of the map.
    fn take_contacts<'a>(
        &self,
        order_ids: impl Iterator<Item = &'a str>,
    ) -> HashMap<String, String> {
        let mut contacts = self
            .unsynced_contacts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        order_ids
            .filter_map(|id| contacts.remove_entry(id))
            .collect()
    }
}

/// The group-commit thread for intake records. Dropping the last handle
/// closes its queue and waits for it, so the database file is closed when
/// the store is gone (a reopen right after must not find it still open).
struct IntakeCommitter {
    tx: Option<tokio::sync::mpsc::Sender<IntakeJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for IntakeCommitter {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An intake record to insert and where to send the stored one.
type IntakeJob = (
    IntakeRecord,
    tokio::sync::oneshot::Sender<Result<IntakeRecord, StoreError>>,
);

/// Intake records waiting for the group-commit thread before `put_intake`
/// callers wait (back-pressure, not an error).
pub const INTAKE_QUEUE_DEPTH: usize = 16_384;
/// Most intake records committed in one transaction.
const INTAKE_BATCH_MAX: usize = 4_096;

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens the database file at `path`, creating it (and its tables) if
    /// absent. The parent directory must exist. Fails with `Unavailable` if
    /// another `EmbeddedStore` (in this or another process) has it open.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let at = path.display();
        let db = Database::create(path).map_err(|e| redb_err(e, format_args!("opening {at}")))?;
        // Create every table up front, so read transactions can always open them.
        let txn = begin_write(&db)?;
        for table in ALL_TABLES {
            txn.open_table(table)
                .map_err(|e| redb_err(e, format_args!("creating table {}", table.name())))?;
        }
        commit(txn, "creating tables")?;
        let db = Arc::new(Db::new(path, db));
        let intake = spawn_intake_committer(Arc::clone(&db))?;
        Ok(EmbeddedStore { db, intake })
    }

    /// Runs `f` with the database on tokio's blocking pool.
    /// Reads and decodes the row of `table` under a text key (an order id).
    async fn get_row<T>(&self, table: BytesTable, key: &str) -> Result<Option<T>, StoreError>
    where
        T: DeserializeOwned + Send + 'static,
    {
        let key = key.to_owned();
        self.blocking(move |db| {
            let name = table.name();
            let txn = db.begin_read().map_err(|e| redb_err(e, "begin read"))?;
            let rows = txn
                .open_table(table)
                .map_err(|e| redb_err(e, format_args!("opening {name}")))?;
            let stored = rows
                .get(key.as_bytes())
                .map_err(|e| redb_err(e, format_args!("{name}[{key:?}]")))?;
            stored.map(|v| decode(v.value(), name, &key)).transpose()
        })
        .await
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || db.run(f))
            .await
            .map_err(|e| StoreError::Unavailable(format!("state store task failed: {e}")))?
    }
}

/// Starts the thread that commits intake records in groups: one write
/// transaction (and one fsync) for every record waiting, instead of one per
/// HTTP request. It stops when the store is dropped.
fn spawn_intake_committer(db: Arc<Db>) -> Result<Arc<IntakeCommitter>, StoreError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<IntakeJob>(INTAKE_QUEUE_DEPTH);
    let thread = std::thread::Builder::new()
        .name("orderflow-intake".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
                while batch.len() < INTAKE_BATCH_MAX {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let (records, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                let contacts = db.take_contacts(records.iter().map(|r| r.order_id.as_str()));
                let result = db.run(|d| put_intake_batch(d, records, &contacts));
                if result.is_err() {
                    // Not durable: the next attempt of these orders needs them.
                    for (order_id, email) in contacts {
                        db.remember_contact(order_id, email);
                    }
                }
                match result {
                    Ok(stored) => {
                        for (reply, record) in replies.into_iter().zip(stored) {
                            let _ = reply.send(Ok(record));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        })
        .map_err(|e| StoreError::Unavailable(format!("cannot start the intake committer: {e}")))?;
    Ok(Arc::new(IntakeCommitter {
        tx: Some(tx),
        thread: Some(thread),
    }))
}

/// Inserts each record unless its order id is stored (the first one wins,
/// also within the batch); returns the stored record for each, in order.
/// Writes the `contacts` of the records it inserts again, in the same
/// transaction: an order's contact is then durable when its intake record
/// is, even if a reopen lost the commit of `put_contact`.
fn put_intake_batch(
    db: &Database,
    records: Vec<IntakeRecord>,
    contacts: &HashMap<String, String>,
) -> Result<Vec<IntakeRecord>, StoreError> {
    let txn = begin_write(db)?;
    let mut stored = Vec::with_capacity(records.len());
    {
        let mut table = txn
            .open_table(INTAKE)
            .map_err(|e| redb_err(e, format_args!("opening {INTAKE_T}")))?;
        let mut contacts_table = None;
        for record in records {
            let key = record.order_id.as_bytes();
            let existing = {
                let found = table
                    .get(key)
                    .map_err(|e| redb_err(e, format_args!("{INTAKE_T}[{:?}]", record.order_id)))?;
                found
                    .map(|v| decode(v.value(), INTAKE_T, &record.order_id))
                    .transpose()?
            };
            if let Some(existing) = existing {
                stored.push(existing);
                continue;
            }
            let bytes = encode(&record, INTAKE_T, &record.order_id)?;
            table
                .insert(key, bytes.as_slice())
                .map_err(|e| redb_err(e, format_args!("{INTAKE_T}[{:?}] put", record.order_id)))?;
            if let Some(email) = contacts.get(&record.order_id) {
                if contacts_table.is_none() {
                    contacts_table = Some(
                        txn.open_table(CONTACTS)
                            .map_err(|e| redb_err(e, format_args!("opening {CONTACTS_T}")))?,
                    );
                }
                if let Some(contacts_table) = contacts_table.as_mut() {
                    contacts_table.insert(key, email.as_bytes()).map_err(|e| {
                        redb_err(e, format_args!("{CONTACTS_T}[{:?}] put", record.order_id))
                    })?;
                }
            }
            stored.push(record);
        }
    }
    commit(txn, format_args!("{INTAKE_T} batch of {}", stored.len()))?;
    Ok(stored)
}

#[async_trait]
impl StateStore for EmbeddedStore {
    async fn load_checkpoint(
        &self,
        partition: u32,
    ) -> Result<Option<PartitionCheckpoint>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(|e| redb_err(e, "begin read"))?;
            let meta = txn
                .open_table(META)
                .map_err(|e| redb_err(e, format_args!("opening {META_T}")))?;
            let prefix = partition.to_be_bytes();
            let (next_offset, epoch) = {
                let stored = meta
                    .get(prefix.as_slice())
                    .map_err(|e| redb_err(e, format_args!("{META_T}[{partition}]")))?;
                match stored {
                    None => return Ok(None),
                    Some(v) => decode_meta(v.value(), partition)?,
                }
            };
            let state = txn
                .open_table(STATE)
                .map_err(|e| redb_err(e, format_args!("opening {STATE_T}")))?;
            let end = partition.checked_add(1).map(u32::to_be_bytes);
            let upper = match &end {
                Some(end) => Bound::Excluded(end.as_slice()),
                None => Bound::Unbounded,
            };
            let range = state
                .range::<&[u8]>((Bound::Included(prefix.as_slice()), upper))
                .map_err(|e| {
                    redb_err(e, format_args!("{STATE_T} scan of partition {partition}"))
                })?;
            let mut rows = Vec::new();
            for entry in range {
                let (k, v) = entry.map_err(|e| {
                    redb_err(e, format_args!("{STATE_T} scan of partition {partition}"))
                })?;
                let key = k.value().strip_prefix(prefix.as_slice()).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "{STATE_T}: key {} outside partition {partition}",
                        hex::encode(k.value())
                    ))
                })?;
                rows.push((key.to_vec(), v.value().to_vec()));
            }
            Ok(Some(PartitionCheckpoint {
                next_offset,
                epoch,
                rows,
            }))
        })
        .await
    }

    async fn load_row(
        &self,
        partition: u32,
        key: &[u8],
    ) -> Result<Option<(u64, Option<Vec<u8>>)>, StoreError> {
        let key = key.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(|e| redb_err(e, "begin read"))?;
            let meta = txn
                .open_table(META)
                .map_err(|e| redb_err(e, format_args!("opening {META_T}")))?;
            let prefix = partition.to_be_bytes();
            let next_offset = match meta
                .get(prefix.as_slice())
                .map_err(|e| redb_err(e, format_args!("{META_T}[{partition}]")))?
            {
                None => return Ok(None),
                Some(v) => decode_meta(v.value(), partition)?.0,
            };
            let state = txn
                .open_table(STATE)
                .map_err(|e| redb_err(e, format_args!("opening {STATE_T}")))?;
            let mut full = Vec::with_capacity(4 + key.len());
            composite(&mut full, &prefix, &key);
            let value = state
                .get(full.as_slice())
                .map_err(|e| redb_err(e, format_args!("{STATE_T}[{partition}] get")))?
                .map(|v| v.value().to_vec());
            Ok(Some((next_offset, value)))
        })
        .await
    }

    async fn claim_partition(&self, partition: u32) -> Result<u64, StoreError> {
        self.blocking(move |db| {
            let prefix = partition.to_be_bytes();
            let txn = begin_write(db)?;
            let epoch = {
                let mut meta = txn
                    .open_table(META)
                    .map_err(|e| redb_err(e, format_args!("opening {META_T}")))?;
                let (next_offset, stored_epoch) = {
                    let stored = meta
                        .get(prefix.as_slice())
                        .map_err(|e| redb_err(e, format_args!("{META_T}[{partition}]")))?;
                    match stored {
                        None => (0, 0),
                        Some(v) => decode_meta(v.value(), partition)?,
                    }
                };
                let epoch = stored_epoch + 1;
                meta.insert(
                    prefix.as_slice(),
                    encode_meta(next_offset, epoch).as_slice(),
                )
                .map_err(|e| redb_err(e, format_args!("{META_T}[{partition}] put")))?;
                epoch
            };
            commit(txn, format_args!("claim of partition {partition}"))?;
            Ok(epoch)
        })
        .await
    }

    /// One transaction: fencing check, puts, then deletes (a key in both
    /// ends deleted), then the partition's offset and epoch.
    async fn write_checkpoint(&self, mut write: CheckpointWrite) -> Result<(), StoreError> {
        self.blocking(move |db| {
            let partition = write.partition;
            let prefix = partition.to_be_bytes();
            // Sorted input touches each B-tree leaf once; the stable sort keeps
            // the last of repeated puts last. Usually already sorted.
            if !write.puts.is_sorted_by(|a, b| a.0 <= b.0) {
                write.puts.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if !write.deletes.is_sorted() {
                write.deletes.sort_unstable();
            }
            let txn = begin_write(db)?;
            {
                let mut meta = txn
                    .open_table(META)
                    .map_err(|e| redb_err(e, format_args!("opening {META_T}")))?;
                let stored_epoch = {
                    let stored = meta
                        .get(prefix.as_slice())
                        .map_err(|e| redb_err(e, format_args!("{META_T}[{partition}]")))?;
                    match stored {
                        None => None,
                        Some(v) => Some(decode_meta(v.value(), partition)?.1),
                    }
                };
                if let Some(stored_epoch) = stored_epoch
                    && stored_epoch > write.epoch
                {
                    // Dropping the uncommitted transaction aborts it: nothing is written.
                    return Err(StoreError::Fenced {
                        partition,
                        epoch: write.epoch,
                        stored_epoch,
                    });
                }
                let mut state = txn
                    .open_table(STATE)
                    .map_err(|e| redb_err(e, format_args!("opening {STATE_T}")))?;
                let mut key = Vec::with_capacity(64);
                for (k, v) in &write.puts {
                    composite(&mut key, &prefix, k);
                    state.insert(key.as_slice(), v.as_slice()).map_err(|e| {
                        redb_err(
                            e,
                            format_args!("{STATE_T}[{partition}, {}] put", hex::encode(k)),
                        )
                    })?;
                }
                for k in &write.deletes {
                    composite(&mut key, &prefix, k);
                    state.remove(key.as_slice()).map_err(|e| {
                        redb_err(
                            e,
                            format_args!("{STATE_T}[{partition}, {}] delete", hex::encode(k)),
                        )
                    })?;
                }
                meta.insert(
                    prefix.as_slice(),
                    encode_meta(write.next_offset, write.epoch).as_slice(),
                )
                .map_err(|e| redb_err(e, format_args!("{META_T}[{partition}] put")))?;
            }
            commit(txn, format_args!("checkpoint of partition {partition}"))
        })
        .await
    }

    async fn get_intake(&self, order_id: &str) -> Result<Option<IntakeRecord>, StoreError> {
        self.get_row(INTAKE, order_id).await
    }

    async fn put_intake(&self, record: IntakeRecord) -> Result<IntakeRecord, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || StoreError::Unavailable("the intake committer stopped".into());
        let tx = self.intake.tx.as_ref().ok_or_else(gone)?;
        tx.send((record, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn sink_positions(&self, sink: &str) -> Result<BTreeMap<u32, u64>, StoreError> {
        let sink = sink.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(|e| redb_err(e, "begin read"))?;
            let table = txn
                .open_table(SINK_POSITIONS)
                .map_err(|e| redb_err(e, format_args!("opening {SINK_POSITIONS_T}")))?;
            let prefix = sink_prefix(&sink)?;
            let start = [prefix.as_slice(), &0u32.to_be_bytes()].concat();
            let end = [prefix.as_slice(), &u32::MAX.to_be_bytes()].concat();
            let range = table
                .range::<&[u8]>(start.as_slice()..=end.as_slice())
                .map_err(|e| {
                    redb_err(e, format_args!("{SINK_POSITIONS_T} scan of sink {sink:?}"))
                })?;
            let mut positions = BTreeMap::new();
            for entry in range {
                let (k, v) = entry.map_err(|e| {
                    redb_err(e, format_args!("{SINK_POSITIONS_T} scan of sink {sink:?}"))
                })?;
                let partition = k
                    .value()
                    .strip_prefix(prefix.as_slice())
                    .and_then(|p| <[u8; 4]>::try_from(p).ok())
                    .map(u32::from_be_bytes)
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "{SINK_POSITIONS_T}: bad key {} for sink {sink:?}",
                            hex::encode(k.value())
                        ))
                    })?;
                positions.insert(
                    partition,
                    decode_u64(
                        v.value(),
                        SINK_POSITIONS_T,
                        &format_args!("{sink:?}/{partition}"),
                    )?,
                );
            }
            Ok(positions)
        })
        .await
    }

    /// One transaction: each event is applied to its order's view unless
    /// `(order_id, seq)` is not newer than what the view holds; each
    /// position keeps the larger of the stored and the given offset.
    async fn apply_tracking(
        &self,
        sink: &str,
        positions: &[(u32, u64)],
        events: &[StatusEvent],
    ) -> Result<Vec<Applied>, StoreError> {
        if positions.is_empty() && events.is_empty() {
            return Ok(Vec::new());
        }
        let sink = sink.to_owned();
        let positions = positions.to_vec();
        let events = events.to_vec();
        self.blocking(move |db| {
            let txn = begin_write(db)?;
            // Per event, if new: `Some((time of the order's previous status,
            // time of its first))`.
            type Times = (Option<u64>, Option<u64>);
            let mut applied: Vec<Option<Times>> = vec![None; events.len()];
            {
                let mut views = txn
                    .open_table(TRACKING)
                    .map_err(|e| redb_err(e, format_args!("opening {TRACKING_T}")))?;
                // Each order's view is read once, updated in memory by all of its
                // events in the batch, and written once (in key order).
                let mut touched: BTreeMap<&str, (Option<TrackingView>, bool)> = BTreeMap::new();
                for (event, applied) in events.iter().zip(applied.iter_mut()) {
                    let id = event.order_id.as_str();
                    let (view, dirty) = match touched.entry(id) {
                        std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::btree_map::Entry::Vacant(slot) => {
                            let stored = views
                                .get(id.as_bytes())
                                .map_err(|e| redb_err(e, format_args!("{TRACKING_T}[{id:?}]")))?;
                            let view = stored
                                .map(|v| decode::<TrackingView>(v.value(), TRACKING_T, id))
                                .transpose()?
                                .map(|v| v.keyed(id));
                            slot.insert((view, false))
                        }
                    };
                    let history = view.as_ref().map(|v| v.history.as_slice());
                    let prev_at_ms = history.and_then(|h| h.last()).map(|h| h.at_ms);
                    let placed_at_ms = history.and_then(|h| h.first()).map(|h| h.at_ms);
                    if TrackingView::apply(view, event) {
                        *applied = Some((prev_at_ms, placed_at_ms));
                        *dirty = true;
                    }
                }
                for (id, (view, dirty)) in &touched {
                    if let (Some(view), true) = (view, dirty) {
                        let bytes = encode(view, TRACKING_T, id)?;
                        views
                            .insert(id.as_bytes(), bytes.as_slice())
                            .map_err(|e| redb_err(e, format_args!("{TRACKING_T}[{id:?}] put")))?;
                    }
                }

                let mut table = txn
                    .open_table(SINK_POSITIONS)
                    .map_err(|e| redb_err(e, format_args!("opening {SINK_POSITIONS_T}")))?;
                let prefix = sink_prefix(&sink)?;
                let mut key = Vec::with_capacity(prefix.len() + 4);
                for &(partition, next) in &positions {
                    composite(&mut key, &prefix, &partition.to_be_bytes());
                    let old = {
                        let stored = table.get(key.as_slice()).map_err(|e| {
                            redb_err(e, format_args!("{SINK_POSITIONS_T}[{sink:?}/{partition}]"))
                        })?;
                        match stored {
                            None => None,
                            Some(v) => Some(decode_u64(
                                v.value(),
                                SINK_POSITIONS_T,
                                &format_args!("{sink:?}/{partition}"),
                            )?),
                        }
                    };
                    if old.is_none_or(|old| next > old) {
                        table
                            .insert(key.as_slice(), next.to_be_bytes().as_slice())
                            .map_err(|e| {
                                redb_err(
                                    e,
                                    format_args!("{SINK_POSITIONS_T}[{sink:?}/{partition}] put"),
                                )
                            })?;
                    }
                }
            }
            commit(txn, format_args!("tracking batch of sink {sink:?}"))?;
            Ok(events
                .into_iter()
                .zip(applied)
                .filter_map(|(event, new)| {
                    new.map(|(prev_at_ms, placed_at_ms)| Applied {
                        event,
                        prev_at_ms,
                        placed_at_ms,
                    })
                })
                .collect())
        })
        .await
    }

    async fn get_tracking(&self, order_id: &str) -> Result<Option<TrackingView>, StoreError> {
        let view: Option<TrackingView> = self.get_row(TRACKING, order_id).await?;
        Ok(view.map(|v| v.keyed(order_id)))
    }

    async fn secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
        let name = name.to_owned();
        self.blocking(move |db| {
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

    /// Committed with [`Durability::None`]: no fsync of its own (intake
    /// stays one group-committed fsync per batch of requests). redb makes
    /// it durable with the next durable commit, at the latest the
    /// `put_intake` of the same request, which returns before the `202`.
    async fn put_contact(&self, order_id: &str, email: &str) -> Result<(), StoreError> {
        let (order_id, email) = (order_id.to_owned(), email.to_owned());
        self.blocking(move |db| {
            let mut txn = db.begin_write().map_err(|e| redb_err(e, "begin write"))?;
            txn.set_durability(Durability::None)
                .map_err(|e| redb_err(e, "set durability"))?;
            {
                let mut table = txn
                    .open_table(CONTACTS)
                    .map_err(|e| redb_err(e, format_args!("opening {CONTACTS_T}")))?;
                table
                    .insert(order_id.as_bytes(), email.as_bytes())
                    .map_err(|e| redb_err(e, format_args!("{CONTACTS_T}[{order_id:?}] put")))?;
            }
            commit(txn, format_args!("{CONTACTS_T}[{order_id:?}]"))?;
            Ok((order_id, email))
        })
        .await
        .map(|(order_id, email)| self.db.remember_contact(order_id, email))
    }

    async fn get_contacts(&self, order_ids: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        if order_ids.is_empty() {
            return Ok(Vec::new());
        }
        let order_ids = order_ids.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(|e| redb_err(e, "begin read"))?;
            let table = txn
                .open_table(CONTACTS)
                .map_err(|e| redb_err(e, format_args!("opening {CONTACTS_T}")))?;
            order_ids
                .iter()
                .map(|id| {
                    let stored = table
                        .get(id.as_bytes())
                        .map_err(|e| redb_err(e, format_args!("{CONTACTS_T}[{id:?}]")))?;
                    stored
                        .map(|v| {
                            String::from_utf8(v.value().to_vec()).map_err(|_| {
                                StoreError::Corrupt(format!("{CONTACTS_T}[{id:?}]: not UTF-8"))
                            })
                        })
                        .transpose()
                })
                .collect()
        })
        .await
    }

    async fn notified(&self, keys: &[(String, String)]) -> Result<Vec<Option<u32>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys = keys.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(|e| redb_err(e, "begin read"))?;
            let table = txn
                .open_table(NOTIFIED)
                .map_err(|e| redb_err(e, format_args!("opening {NOTIFIED_T}")))?;
            let mut key = Vec::with_capacity(64);
            keys.iter()
                .map(|(target, order_id)| {
                    composite(&mut key, &sink_prefix(target)?, order_id.as_bytes());
                    let stored = table.get(key.as_slice()).map_err(|e| {
                        redb_err(e, format_args!("{NOTIFIED_T}[{target:?}/{order_id:?}]"))
                    })?;
                    stored
                        .map(|v| decode_seq(v.value(), target, order_id))
                        .transpose()
                })
                .collect()
        })
        .await
    }

    /// One transaction: each settled `(target, order_id)` keeps the larger
    /// seq, each position the larger offset.
    async fn record_notified(
        &self,
        sink: &str,
        positions: &[(u32, u64)],
        settled: &[Notified],
    ) -> Result<(), StoreError> {
        if positions.is_empty() && settled.is_empty() {
            return Ok(());
        }
        let sink = sink.to_owned();
        let positions = positions.to_vec();
        let settled = settled.to_vec();
        self.blocking(move |db| {
            let txn = begin_write(db)?;
            {
                let mut table = txn
                    .open_table(NOTIFIED)
                    .map_err(|e| redb_err(e, format_args!("opening {NOTIFIED_T}")))?;
                let mut key = Vec::with_capacity(64);
                for n in &settled {
                    composite(&mut key, &sink_prefix(&n.target)?, n.order_id.as_bytes());
                    let what = || format!("{NOTIFIED_T}[{:?}/{:?}]", n.target, n.order_id);
                    let old = {
                        let stored = table.get(key.as_slice()).map_err(|e| redb_err(e, what()))?;
                        match stored {
                            None => None,
                            Some(v) => Some(decode_seq(v.value(), &n.target, &n.order_id)?),
                        }
                    };
                    if old.is_none_or(|old| n.seq > old) {
                        table
                            .insert(key.as_slice(), n.seq.to_be_bytes().as_slice())
                            .map_err(|e| redb_err(e, format_args!("{} put", what())))?;
                    }
                }
            }
            advance_positions(&txn, &sink, &positions)?;
            commit(txn, format_args!("notifications batch of sink {sink:?}"))
        })
        .await
    }
}

/// Moves each `(partition, next)` position of `sink` forward (a position
/// keeps the larger of the stored and the given offset).
fn advance_positions(
    txn: &WriteTransaction,
    sink: &str,
    positions: &[(u32, u64)],
) -> Result<(), StoreError> {
    let mut table = txn
        .open_table(SINK_POSITIONS)
        .map_err(|e| redb_err(e, format_args!("opening {SINK_POSITIONS_T}")))?;
    let prefix = sink_prefix(sink)?;
    let mut key = Vec::with_capacity(prefix.len() + 4);
    for &(partition, next) in positions {
        composite(&mut key, &prefix, &partition.to_be_bytes());
        let what = || format!("{SINK_POSITIONS_T}[{sink:?}/{partition}]");
        let old = {
            let stored = table.get(key.as_slice()).map_err(|e| redb_err(e, what()))?;
            match stored {
                None => None,
                Some(v) => Some(decode_u64(
                    v.value(),
                    SINK_POSITIONS_T,
                    &format_args!("{sink:?}/{partition}"),
                )?),
            }
        };
        if old.is_none_or(|old| next > old) {
            table
                .insert(key.as_slice(), next.to_be_bytes().as_slice())
                .map_err(|e| redb_err(e, format_args!("{} put", what())))?;
        }
    }
    Ok(())
}

fn decode_seq(bytes: &[u8], target: &str, order_id: &str) -> Result<u32, StoreError> {
    <[u8; 4]>::try_from(bytes)
        .map(u32::from_be_bytes)
        .map_err(|_| {
            StoreError::Corrupt(format!(
                "{NOTIFIED_T}[{target:?}/{order_id:?}]: expected 4 bytes, found {}",
                bytes.len()
            ))
        })
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

/// Writes `prefix ++ suffix` into `buf`, reusing its allocation.
fn composite(buf: &mut Vec<u8>, prefix: &[u8], suffix: &[u8]) {
    buf.clear();
    buf.extend_from_slice(prefix);
    buf.extend_from_slice(suffix);
}

fn sink_prefix(sink: &str) -> Result<Vec<u8>, StoreError> {
    let len = u32::try_from(sink.len()).map_err(|_| {
        StoreError::Unavailable(format!("sink name of {} bytes is too long", sink.len()))
    })?;
    Ok([len.to_be_bytes().as_slice(), sink.as_bytes()].concat())
}

fn encode_meta(next_offset: u64, epoch: u64) -> [u8; 16] {
    let mut out = [0; 16];
    out[..8].copy_from_slice(&next_offset.to_be_bytes());
    out[8..].copy_from_slice(&epoch.to_be_bytes());
    out
}

/// `(next_offset, epoch)` from a `partition_meta` value.
fn decode_meta(bytes: &[u8], partition: u32) -> Result<(u64, u64), StoreError> {
    let bytes: &[u8; 16] = bytes.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "{META_T}[{partition}]: expected 16 bytes, found {}",
            bytes.len()
        ))
    })?;
    let (offset, epoch) = bytes.split_at(8);
    let word = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or_default());
    Ok((word(offset), word(epoch)))
}

fn decode_u64(bytes: &[u8], table: &str, key: &dyn Display) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| {
            StoreError::Corrupt(format!(
                "{table}[{key}]: expected 8 bytes, found {}",
                bytes.len()
            ))
        })
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
    use crate::domain::Status;

    fn store_in(dir: &tempfile::TempDir) -> EmbeddedStore {
        EmbeddedStore::open(&dir.path().join("state.redb")).unwrap()
    }

    fn row(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    fn checkpoint(
        partition: u32,
        epoch: u64,
        next_offset: u64,
        puts: &[(&str, &str)],
        deletes: &[&str],
    ) -> CheckpointWrite {
        CheckpointWrite {
            partition,
            epoch,
            next_offset,
            puts: puts.iter().map(|(k, v)| row(k, v)).collect(),
            deletes: deletes.iter().map(|k| k.as_bytes().to_vec()).collect(),
        }
    }

    fn intake(order_id: &str, offset: u64) -> IntakeRecord {
        IntakeRecord {
            order_id: order_id.to_owned(),
            token_sha256: [offset as u8; 32],
            sealed_token: vec![1, 2, 3],
            partition: 3,
            offset,
        }
    }

    fn event(order_id: &str, seq: u32, status: Status) -> StatusEvent {
        StatusEvent {
            order_id: order_id.to_owned(),
            seq,
            status,
            reason: None,
            at_ms: 1_000 + u64::from(seq),
            refused_skus: Vec::new(),
            released_lines: 0,
        }
    }

    /// Undecodable stored bytes give `Corrupt` naming the table and key, never a panic.
    #[tokio::test]
    async fn bad_stored_bytes_are_corrupt_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(&dir);
        {
            let txn = store.db.get().unwrap().begin_write().unwrap();
            for (table, key) in [
                (INTAKE, b"ord-x".as_slice()),
                (TRACKING, b"ord-x"),
                (SECRETS, b"s"),
                (META, &9u32.to_be_bytes()),
            ] {
                txn.open_table(table)
                    .unwrap()
                    .insert(key, [0xc1u8, 0xff].as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let errors = [
            store.get_intake("ord-x").await.unwrap_err(),
            store.put_intake(intake("ord-x", 1)).await.unwrap_err(),
            store.get_tracking("ord-x").await.unwrap_err(),
            store
                .apply_tracking("t", &[], &[event("ord-x", 1, Status::Accepted)])
                .await
                .unwrap_err(),
            store.secret("s").await.unwrap_err(),
            store.load_checkpoint(9).await.unwrap_err(),
            store
                .write_checkpoint(checkpoint(9, 1, 1, &[], &[]))
                .await
                .unwrap_err(),
        ];
        for err in errors {
            assert!(
                matches!(&err, StoreError::Corrupt(msg) if msg.contains('[')),
                "{err:?}"
            );
        }
    }
}
