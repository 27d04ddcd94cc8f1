//! The behavioural contract of `StateStore`, run against both backends:
//! the embedded redb store (in a temporary directory) and `ScyllaStore`
//! against the test Cassandra (`support::cassandra_contact()`), each test
//! in a keyspace of its own, migrated first and dropped at the end.
//!
//! Each case is one async fn taking a [`Backend`]; `contract!` turns it
//! into one `#[tokio::test]` per backend. Cases only the CQL store has
//! (schema, raw stored bytes, request metrics) follow at the end.

mod support;

use std::sync::Arc;
use std::time::Instant;

use ::scylla::client::session::Session;
use ::scylla::client::session_builder::SessionBuilder;
use orderflow::config::CheckpointConfig;
use orderflow::config::ScyllaConfig;
use orderflow::domain::{Envelope, Message, RecordKind};
use orderflow::pipeline::runner::core::PartitionCore;
use orderflow::pipeline::store::embedded::EmbeddedStore;
use orderflow::pipeline::store::scylla::{ScyllaStore, migrate};
use orderflow::pipeline::store::{BlobRef, Scope, Snapshot, SnapshotWrite, StateStore, StoreError};
use orderflow::stages::processor::{Input, Limits};
use orderflow::stages::snapshot::{self, Manifest};
use orderflow::stages::{PartitionState, Processor};
use orderflow::telemetry::metrics::Metrics;

/// Where a test's store keeps its data. `open` gives a fresh handle on the
/// same data (a restart of the process, or another instance).
enum Backend {
    Embedded(tempfile::TempDir),
    Cassandra(ScyllaConfig),
}

impl Backend {
    fn embedded() -> Backend {
        Backend::Embedded(tempfile::tempdir().unwrap())
    }

    async fn cassandra() -> Backend {
        let config = cassandra_config(support::unique_name("ks"));
        migrate(&config).await.unwrap();
        Backend::Cassandra(config)
    }

    async fn open(&self) -> Arc<dyn StateStore> {
        match self {
            Backend::Embedded(dir) => {
                Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap())
            }
            Backend::Cassandra(config) => {
                Arc::new(ScyllaStore::connect(config, None).await.unwrap())
            }
        }
    }

    /// Handles of `n` instances sharing the data. One process owns an
    /// embedded store, so there its instances share one handle.
    async fn instances(&self, n: usize) -> Vec<Arc<dyn StateStore>> {
        let mut out = Vec::with_capacity(n);
        let first = self.open().await;
        for _ in 1..n {
            out.push(match self {
                Backend::Embedded(_) => first.clone(),
                Backend::Cassandra(_) => self.open().await,
            });
        }
        out.push(first);
        out
    }

    /// Drops the test's keyspace (a panicking test leaves it for the
    /// next fresh start of the node).
    async fn finish(self) {
        if let Backend::Cassandra(config) = self {
            let session = raw_session().await;
            session
                .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", config.keyspace), ())
                .await
                .unwrap();
        }
    }
}

fn cassandra_config(keyspace: String) -> ScyllaConfig {
    ScyllaConfig {
        nodes: vec![support::cassandra_contact()],
        keyspace,
        ..ScyllaConfig::default()
    }
}

/// An empty keyspace, as an operator could make by hand.
async fn create_keyspace(session: &Session, keyspace: &str) {
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE {keyspace} WITH replication = \
                 {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
            ),
            (),
        )
        .await
        .unwrap();
}

/// A driver session of the test's own, for what the store never does
/// (dropping keyspaces, writing bad bytes).
async fn raw_session() -> Session {
    SessionBuilder::new()
        .known_node(support::cassandra_contact())
        .build()
        .await
        .unwrap()
}

/// One `#[tokio::test]` per backend for each case fn, with its doc comment.
macro_rules! contract {
    ($($(#[doc = $doc:literal])+ $name:ident;)+) => {
        mod embedded {
            $(
                $(#[doc = $doc])+
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = super::Backend::embedded();
                    super::$name(&backend).await;
                    backend.finish().await;
                }
            )+
        }
        mod cassandra {
            $(
                $(#[doc = $doc])+
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = super::Backend::cassandra().await;
                    super::$name(&backend).await;
                    backend.finish().await;
                }
            )+
        }
    };
}

contract! {
    /// A partition never committed loads nothing, also after a claim; unknown blobs read as absent.
    never_committed_loads_nothing;
    /// A commit's blobs, manifest and offset load back; a later commit's drops delete blobs.
    commit_roundtrip_with_blobs_and_drops;
    /// Scopes and partitions (to the ends of the u32 range) never see each other's snapshots or blobs.
    scopes_and_partitions_are_isolated;
    /// A commit by a former owner (lower epoch) is refused and leaves the snapshot as it was.
    fencing_refuses_a_former_owner;
    /// A commit with an epoch nobody claimed is refused.
    commit_without_claim_is_refused;
    /// Concurrent claims (from several instances) each get a different epoch.
    concurrent_claims_get_distinct_epochs;
    /// A snapshot of 64 blobs of 256 KiB (16 MiB) commits and reads back (and shows the latency).
    large_snapshot_roundtrips;
    /// Repeating a commit, or deleting blobs twice, changes nothing more.
    commits_and_deletes_are_idempotent;
    /// A secret is created once and stays the same across calls, instances and reopening.
    secret_stable_across_reopen;
    /// Everything committed is still there through a new handle on the same data.
    data_survives_reopen;
    /// A batch of 4,096 records (100-line orders, restocks, expiries) checkpoints within its bounds and restores equal.
    worst_batch_checkpoints;
}

fn blob(epoch: u64, id: u64) -> BlobRef {
    BlobRef { epoch, id }
}

fn write(
    scope: Scope,
    partition: u32,
    epoch: u64,
    next_offset: u64,
    blobs: &[(u64, &str)],
    drop: &[u64],
) -> SnapshotWrite {
    SnapshotWrite {
        scope,
        partition,
        epoch,
        next_offset,
        manifest: format!("manifest {next_offset}").into_bytes(),
        blobs: blobs
            .iter()
            .map(|(id, data)| (blob(epoch, *id), data.as_bytes().to_vec()))
            .collect(),
        drop: drop.iter().map(|id| blob(epoch, *id)).collect(),
    }
}

/// The bytes of blobs `ids` of `epoch`, as text (`None`: absent).
async fn read(
    store: &Arc<dyn StateStore>,
    scope: Scope,
    partition: u32,
    epoch: u64,
    ids: &[u64],
) -> Vec<Option<String>> {
    let refs: Vec<BlobRef> = ids.iter().map(|id| blob(epoch, *id)).collect();
    store
        .read_blobs(scope, partition, &refs)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.map(|b| String::from_utf8(b).unwrap()))
        .collect()
}

async fn never_committed_loads_nothing(b: &Backend) {
    let store = b.open().await;
    assert_eq!(store.load(Scope::Orders, 0).await.unwrap(), None);
    assert_eq!(store.claim(Scope::Orders, 0).await.unwrap(), 1);
    assert_eq!(store.load(Scope::Orders, 0).await.unwrap(), None);
    assert_eq!(
        read(&store, Scope::Orders, 0, 1, &[0, 1]).await,
        [None, None]
    );
}

async fn commit_roundtrip_with_blobs_and_drops(b: &Backend) {
    let store = b.open().await;
    let epoch = store.claim(Scope::Orders, 1).await.unwrap();
    store
        .commit(&write(
            Scope::Orders,
            1,
            epoch,
            10,
            &[(0, "a"), (1, "b")],
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(
        store.load(Scope::Orders, 1).await.unwrap(),
        Some(Snapshot {
            epoch,
            next_offset: 10,
            manifest: b"manifest 10".to_vec(),
        })
    );
    assert_eq!(
        read(&store, Scope::Orders, 1, epoch, &[0, 1]).await,
        [Some("a".into()), Some("b".into())]
    );
    store
        .commit(&write(Scope::Orders, 1, epoch, 20, &[(2, "c")], &[0]))
        .await
        .unwrap();
    assert_eq!(
        store
            .load(Scope::Orders, 1)
            .await
            .unwrap()
            .unwrap()
            .next_offset,
        20
    );
    assert_eq!(
        read(&store, Scope::Orders, 1, epoch, &[0, 1, 2]).await,
        [None, Some("b".into()), Some("c".into())]
    );
}

async fn scopes_and_partitions_are_isolated(b: &Backend) {
    let store = b.open().await;
    for (scope, partition) in [
        (Scope::Orders, 0),
        (Scope::Orders, u32::MAX),
        (Scope::Tracking, 0),
        (Scope::Notifications, 0),
    ] {
        let epoch = store.claim(scope, partition).await.unwrap();
        assert_eq!(epoch, 1, "{scope:?}/{partition}: an epoch of its own");
        let tag = format!("{}-{partition}", scope.name());
        let w = SnapshotWrite {
            manifest: tag.clone().into_bytes(),
            ..write(scope, partition, epoch, 5, &[(0, &tag)], &[])
        };
        store.commit(&w).await.unwrap();
    }
    for (scope, partition) in [
        (Scope::Orders, 0),
        (Scope::Orders, u32::MAX),
        (Scope::Tracking, 0),
        (Scope::Notifications, 0),
    ] {
        let tag = format!("{}-{partition}", scope.name());
        let loaded = store.load(scope, partition).await.unwrap().unwrap();
        assert_eq!(loaded.manifest, tag.as_bytes());
        assert_eq!(read(&store, scope, partition, 1, &[0]).await, [Some(tag)]);
    }
    assert_eq!(store.load(Scope::Orders, 1).await.unwrap(), None);
    assert_eq!(store.load(Scope::Tracking, 1).await.unwrap(), None);
}

async fn fencing_refuses_a_former_owner(b: &Backend) {
    let instances = b.instances(2).await;
    let (old, new) = (&instances[0], &instances[1]);
    let first = old.claim(Scope::Orders, 3).await.unwrap();
    old.commit(&write(Scope::Orders, 3, first, 10, &[(0, "old")], &[]))
        .await
        .unwrap();
    let second = new.claim(Scope::Orders, 3).await.unwrap();
    assert!(second > first);
    let before = new.load(Scope::Orders, 3).await.unwrap();
    let err = old
        .commit(&write(Scope::Orders, 3, first, 99, &[(1, "zombie")], &[0]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { epoch, stored_epoch, .. } if epoch == first && stored_epoch == second),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert_eq!(new.load(Scope::Orders, 3).await.unwrap(), before);
    assert_eq!(
        read(new, Scope::Orders, 3, first, &[0]).await,
        [Some("old".into())],
        "a fenced commit deletes nothing"
    );
    new.commit(&write(Scope::Orders, 3, second, 30, &[(0, "new")], &[]))
        .await
        .unwrap();
    assert_eq!(
        new.load(Scope::Orders, 3).await.unwrap().unwrap().epoch,
        second
    );
}

async fn commit_without_claim_is_refused(b: &Backend) {
    let store = b.open().await;
    let err = store
        .commit(&write(Scope::Orders, 6, 5, 1, &[], &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(msg) if msg.contains("never claimed")),
        "{err:?}"
    );
    assert_eq!(store.load(Scope::Orders, 6).await.unwrap(), None);
}

async fn concurrent_claims_get_distinct_epochs(b: &Backend) {
    let instances = b.instances(3).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store = instances[i % instances.len()].clone();
        tasks.push(tokio::spawn(async move {
            store.claim(Scope::Orders, 9).await.unwrap()
        }));
    }
    let mut epochs = Vec::new();
    for t in tasks {
        epochs.push(t.await.unwrap());
    }
    epochs.sort_unstable();
    assert_eq!(epochs, (1..=12).collect::<Vec<u64>>());
    instances[0]
        .commit(&write(Scope::Orders, 9, 12, 1, &[], &[]))
        .await
        .unwrap();
}

async fn large_snapshot_roundtrips(b: &Backend) {
    let store = b.open().await;
    let epoch = store.claim(Scope::Orders, 5).await.unwrap();
    let page = vec![7u8; 256 * 1024];
    let blobs: Vec<(BlobRef, Vec<u8>)> =
        (0..64).map(|id| (blob(epoch, id), page.clone())).collect();
    let w = SnapshotWrite {
        blobs: blobs.clone(),
        ..write(Scope::Orders, 5, epoch, 1, &[], &[])
    };
    let started = Instant::now();
    store.commit(&w).await.unwrap();
    let wrote = started.elapsed();
    let refs: Vec<BlobRef> = blobs.iter().map(|(r, _)| *r).collect();
    let started = Instant::now();
    let back = store.read_blobs(Scope::Orders, 5, &refs).await.unwrap();
    let loaded = started.elapsed();
    eprintln!(
        "{}: 16 MiB snapshot committed in {wrote:?}, read in {loaded:?}",
        match b {
            Backend::Embedded(_) => "embedded",
            Backend::Cassandra(_) => "cassandra",
        }
    );
    assert!(back.iter().all(|b| b.as_deref() == Some(page.as_slice())));
}

async fn commits_and_deletes_are_idempotent(b: &Backend) {
    let store = b.open().await;
    let epoch = store.claim(Scope::Notifications, 2).await.unwrap();
    let w = write(
        Scope::Notifications,
        2,
        epoch,
        7,
        &[(0, "x"), (1, "y")],
        &[],
    );
    store.commit(&w).await.unwrap();
    store.commit(&w).await.unwrap();
    let gone = [blob(epoch, 0)];
    store
        .delete_blobs(Scope::Notifications, 2, &gone)
        .await
        .unwrap();
    store
        .delete_blobs(Scope::Notifications, 2, &gone)
        .await
        .unwrap();
    store
        .delete_blobs(Scope::Notifications, 2, &[])
        .await
        .unwrap();
    assert_eq!(
        read(&store, Scope::Notifications, 2, epoch, &[0, 1]).await,
        [None, Some("y".into())]
    );
    assert_eq!(
        store
            .load(Scope::Notifications, 2)
            .await
            .unwrap()
            .unwrap()
            .next_offset,
        7
    );
}

async fn secret_stable_across_reopen(b: &Backend) {
    let first = {
        let instances = b.instances(2).await;
        let first = instances[0].secret("sealing").await.unwrap();
        assert_eq!(instances[1].secret("sealing").await.unwrap(), first);
        assert_ne!(instances[0].secret("other").await.unwrap(), first);
        first
    };
    let store = b.open().await;
    assert_eq!(store.secret("sealing").await.unwrap(), first);
}

async fn data_survives_reopen(b: &Backend) {
    let epoch = {
        let store = b.open().await;
        let epoch = store.claim(Scope::Orders, 2).await.unwrap();
        store
            .commit(&write(Scope::Orders, 2, epoch, 11, &[(0, "kept")], &[]))
            .await
            .unwrap();
        epoch
    };
    let store = b.open().await;
    let loaded = store.load(Scope::Orders, 2).await.unwrap().unwrap();
    assert_eq!((loaded.epoch, loaded.next_offset), (epoch, 11));
    assert_eq!(
        read(&store, Scope::Orders, 2, epoch, &[0]).await,
        [Some("kept".into())]
    );
    assert_eq!(store.claim(Scope::Orders, 2).await.unwrap(), epoch + 1);
}

// Cases of the CQL store alone.

/// `migrate` twice is fine, reports what it created only the first time, and connect then works.
#[tokio::test]
async fn cassandra_migrate_is_idempotent() {
    let config = cassandra_config(support::unique_name("ks"));
    let created = migrate(&config).await.unwrap();
    assert_eq!(created.len(), 4, "{created:?}");
    assert!(created[0].starts_with(&format!("keyspace {}", config.keyspace)));
    assert_eq!(migrate(&config).await.unwrap(), Vec::<String>::new());
    ScyllaStore::connect(&config, None).await.unwrap();
    Backend::Cassandra(config).finish().await;
}

/// `migrate` on a keyspace of the per-order layout names its old tables and drops none.
#[tokio::test]
async fn cassandra_migrate_names_the_old_tables() {
    let config = cassandra_config(support::unique_name("ks"));
    let session = raw_session().await;
    create_keyspace(&session, &config.keyspace).await;
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {}.intake (order_id text PRIMARY KEY, record blob)",
                config.keyspace
            ),
            (),
        )
        .await
        .unwrap();
    let report = migrate(&config).await.unwrap();
    let note = report.last().unwrap();
    assert!(
        note.contains("intake") && note.contains("DROP TABLE"),
        "{report:?}"
    );
    ScyllaStore::connect(&config, None).await.unwrap();
    Backend::Cassandra(config).finish().await;
}

/// Connecting to a missing keyspace, or one without the tables, says to run `orderflow migrate`.
#[tokio::test]
async fn cassandra_connect_without_schema_is_a_clear_error() {
    let config = cassandra_config(support::unique_name("ks"));
    let err = ScyllaStore::connect(&config, None).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("keyspace {} does not exist", config.keyspace))
            && msg.contains("run `orderflow migrate` first"),
        "{msg}"
    );

    let session = raw_session().await;
    create_keyspace(&session, &config.keyspace).await;
    let err = ScyllaStore::connect(&config, None).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, StoreError::Unavailable(_))
            && msg.contains(&format!(
                "keyspace {} has no table snapshots: run `orderflow migrate` first",
                config.keyspace
            )),
        "{msg}"
    );

    // A table of the same name with other columns is named precisely too.
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {}.snapshots (scope tinyint PRIMARY KEY, value text)",
                config.keyspace
            ),
            (),
        )
        .await
        .unwrap();
    let msg = ScyllaStore::connect(&config, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("snapshots has no column partition"), "{msg}");
    Backend::Cassandra(config).finish().await;
}

/// Undecodable stored values give `Corrupt` naming the table and key, never a panic.
#[tokio::test]
async fn cassandra_bad_stored_values_are_corrupt_not_panic() {
    let backend = Backend::cassandra().await;
    let Backend::Cassandra(config) = &backend else {
        unreachable!()
    };
    let store = backend.open().await;
    let ks = &config.keyspace;
    let session = raw_session().await;
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.secrets (name, value) VALUES (?, ?)"),
            ("s", vec![0xc1u8, 0xff]),
        )
        .await
        .unwrap();
    session
        .query_unpaged(
            format!("UPDATE {ks}.snapshots SET epoch = -1 WHERE scope = 1 AND partition = 9"),
            (),
        )
        .await
        .unwrap();
    session
        .query_unpaged(
            format!(
                "UPDATE {ks}.snapshots SET epoch = 1, next_offset = 3 WHERE scope = 1 AND partition = 8"
            ),
            (),
        )
        .await
        .unwrap();
    let errors = [
        store.secret("s").await.unwrap_err(),
        store.load(Scope::Orders, 9).await.unwrap_err(),
        store.claim(Scope::Orders, 9).await.unwrap_err(),
        store.load(Scope::Orders, 8).await.unwrap_err(),
    ];
    for err in errors {
        assert!(
            matches!(&err, StoreError::Corrupt(msg) if msg.contains('[')),
            "{err:?}"
        );
    }
    backend.finish().await;
}

/// Requests are timed per operation (one blob, one request), and a fenced commit counted per partition.
#[tokio::test]
async fn cassandra_requests_are_measured() {
    let backend = Backend::cassandra().await;
    let Backend::Cassandra(config) = &backend else {
        unreachable!()
    };
    let metrics = Arc::new(Metrics::new());
    let store = ScyllaStore::connect(config, Some(metrics.clone()))
        .await
        .unwrap();
    let first = store.claim(Scope::Orders, 4).await.unwrap();
    store
        .commit(&write(
            Scope::Orders,
            4,
            first,
            1,
            &[(0, "a"), (1, "b")],
            &[],
        ))
        .await
        .unwrap();
    store.claim(Scope::Orders, 4).await.unwrap();
    let fenced = store
        .commit(&write(Scope::Orders, 4, first, 2, &[(2, "c")], &[0]))
        .await;
    assert!(
        matches!(fenced, Err(StoreError::Fenced { .. })),
        "{fenced:?}"
    );

    let requests = |op: &str| {
        metrics
            .store_latency
            .with_label_values(&[op])
            .get_sample_count()
    };
    assert_eq!(requests("claim_read"), 2);
    assert_eq!(requests("claim"), 2);
    assert_eq!(requests("commit"), 2);
    assert_eq!(
        requests("blob_write"),
        3,
        "the fenced commit wrote its blob first"
    );
    assert_eq!(requests("blob_delete"), 0, "and deleted nothing");
    assert_eq!(metrics.checkpoint_fenced.with_label_values(&["4"]).get(), 1);
    drop(store);
    backend.finish().await;
}

/// The records of the largest batch a runner reads (4,096): restocks of
/// 64-character SKUs, 100-line orders over them, all at a log time that
/// expires the finished orders of `earlier` (their 100-line orders that
/// found no stock).
fn worst_batch() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    const BATCH: usize = 4096;
    const SKUS: usize = 1_000;
    let sku = |i: usize| format!("{i:0>64}");
    let order = |id: String, first: usize| {
        let lines: Vec<serde_json::Value> = (0..100)
            .map(|l| serde_json::json!({"sku": sku((first + l) % SKUS), "quantity": 1, "unit_price": 1}))
            .collect();
        let body = serde_json::json!({"order_id": id, "customer_id": "c".repeat(64),
            "currency": "USD", "lines": lines, "payment": {"token": "tok_visa"}});
        serde_json::to_vec(&body).unwrap()
    };
    let restock = |i: usize| {
        let body = Message::SetStock {
            sku: sku(i),
            available: 1_000_000_000_000,
        };
        Envelope::new(None, body).encode()
    };
    let earlier = (0..1_000)
        .map(|i| order(format!("early-{i:0>58}"), i))
        .collect();
    let mut batch: Vec<Vec<u8>> = (0..SKUS).map(restock).collect();
    let orders = BATCH - SKUS - 96;
    batch.extend((0..orders).map(|i| order(format!("o-{i:0>62}"), i)));
    batch.extend((0..96).map(restock));
    assert_eq!(batch.len(), BATCH);
    (earlier, batch)
}

async fn worst_batch_checkpoints(b: &Backend) {
    let store = b.open().await;
    let limits = Limits {
        finished: orderflow::stages::finished::FinishedLimits {
            max_age_ms: 60_000,
            max_entries: 1 << 20,
        },
        ..Limits::default()
    };
    let processor = Processor::new(0, 1, PartitionState::default()).with_limits(limits);
    let config = CheckpointConfig::default();
    let mut core = PartitionCore::recover(processor, 0, Manifest::empty(0), 1, config, 0);
    let (earlier, batch) = worst_batch();
    let kind = |v: &[u8]| match v.first() {
        Some(b'{') => RecordKind::OrderJson,
        _ => RecordKind::Internal,
    };
    let mut offset = 0;
    for (records, timestamp_ms) in [(&earlier, 1_000), (&batch, 1_000_000)] {
        let first = offset;
        let inputs = records.iter().enumerate().map(|(i, v)| Input {
            offset: first + i as u64,
            timestamp_ms,
            kind: kind(v),
            key: b"k",
            value: v,
        });
        let flush = core.apply(inputs);
        assert!(flush.problems.is_empty(), "{:?}", flush.problems);
        core.confirm_durable();
        offset += records.len() as u64;
    }
    let state = core.state();
    assert_eq!(
        state.orders.len(),
        4096 - 1_096,
        "the batch's orders are in flight"
    );
    assert_eq!(state.holds.len(), 100 * (4096 - 1_096));
    assert_eq!(state.finished.len(), 0, "the earlier orders expired");

    let epoch = store.claim(Scope::Orders, 0).await.unwrap();
    let write = core.take_checkpoint(epoch, 0);
    let bounds = snapshot::worst_case(&limits, 1);
    assert!(write.manifest.len() <= bounds.manifest_bytes, "{bounds:?}");
    assert!(
        write.blobs.len() <= bounds.blobs,
        "{} blobs, {bounds:?}",
        write.blobs.len()
    );
    assert!(
        write
            .blobs
            .iter()
            .all(|(_, v)| v.len() <= bounds.blob_bytes)
    );
    store.commit(&write).await.unwrap();

    let loaded = store.load(Scope::Orders, 0).await.unwrap().unwrap();
    assert_eq!(loaded.next_offset, offset);
    let manifest = Manifest::decode(0, &loaded.manifest).unwrap();
    let refs = manifest.blobs();
    let bytes = store.read_blobs(Scope::Orders, 0, &refs).await.unwrap();
    let blobs = refs
        .into_iter()
        .zip(bytes.into_iter().map(Option::unwrap))
        .collect();
    let restored = snapshot::restore(&manifest, &blobs, limits.finished).unwrap();
    assert!(restored == *core.state(), "the restored state differs");
}
