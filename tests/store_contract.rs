//! The behavioural contract of `StateStore`, run against both backends:
//! the embedded redb store (in a temporary directory) and `ScyllaStore`
//! against the test Cassandra (`support::cassandra_contact()`), each test
//! in a keyspace of its own, migrated first and dropped at the end.
//!
//! Each case is one async fn taking a [`Backend`]; `contract!` turns it
//! into one `#[tokio::test]` per backend. Cases only the CQL store has
//! (schema, size limits, raw stored bytes) follow at the end.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ::scylla::client::session::Session;
use ::scylla::client::session_builder::SessionBuilder;
use orderflow::config::ScyllaConfig;
use orderflow::domain::{Status, StatusEvent};
use orderflow::pipeline::store::embedded::EmbeddedStore;
use orderflow::pipeline::store::scylla::{MAX_CHECKPOINT_BYTES, ScyllaStore, migrate};
use orderflow::pipeline::store::{
    Applied, CheckpointWrite, IntakeRecord, Notified, PartitionCheckpoint, StateStore, StoreError,
};
use orderflow::sinks::metrics::Metrics;

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
    /// Puts then deletes across two checkpoints load back as the merged rows, in key order.
    checkpoint_roundtrip_puts_then_deletes;
    /// Within one write, the last of repeated puts wins and a key both put and deleted ends deleted.
    checkpoint_write_dedupes_its_rows;
    /// Loading a partition returns only its own rows, including at the ends of the u32 range.
    partitions_are_isolated;
    /// A checkpoint with a lower epoch than the stored one is refused and changes nothing.
    fencing_refuses_lower_epoch_and_leaves_data_unchanged;
    /// Each claim returns a higher epoch and fences the former owner, whose write leaves nothing.
    claim_raises_the_epoch_and_fences_the_former_owner;
    /// Concurrent claims (from several instances) each get a different epoch.
    concurrent_claims_get_distinct_epochs;
    /// A checkpoint of 20,000 rows round-trips (and shows the write latency).
    large_checkpoint_roundtrips;
    /// The first intake record for an order id wins; a second put returns it unchanged.
    put_intake_first_wins;
    /// Concurrent puts from several instances keep one record per order id, the same for every caller.
    concurrent_put_intake_is_first_wins_per_id;
    /// A repeated (order_id, seq) is skipped, and sink positions only move forward, per sink.
    apply_tracking_dedupes_and_positions_only_move_forward;
    /// A secret is created once and stays the same across calls, instances and reopening.
    secret_stable_across_reopen;
    /// Contacts read back per order id; settled seqs and positions only move forward and persist.
    contacts_and_notified_roundtrip;
    /// Everything written is still there through a new handle on the same data.
    data_survives_reopen;
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
        token_sha256: [7; 32],
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

fn notified(target: &str, order_id: &str, seq: u32) -> Notified {
    Notified {
        target: target.into(),
        order_id: order_id.into(),
        seq,
    }
}

async fn checkpoint_roundtrip_puts_then_deletes(b: &Backend) {
    let store = b.open().await;
    assert_eq!(store.load_checkpoint(0).await.unwrap(), None);
    store
        .write_checkpoint(checkpoint(
            0,
            1,
            10,
            &[("b", "2"), ("a", "1"), ("c", "3")],
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(
        store.load_checkpoint(0).await.unwrap(),
        Some(PartitionCheckpoint {
            next_offset: 10,
            epoch: 1,
            rows: vec![row("a", "1"), row("b", "2"), row("c", "3")]
        })
    );
    store
        .write_checkpoint(checkpoint(
            0,
            1,
            25,
            &[("b", "20"), ("d", "4")],
            &["a", "zz-absent"],
        ))
        .await
        .unwrap();
    assert_eq!(
        store.load_checkpoint(0).await.unwrap(),
        Some(PartitionCheckpoint {
            next_offset: 25,
            epoch: 1,
            rows: vec![row("b", "20"), row("c", "3"), row("d", "4")]
        })
    );
}

async fn checkpoint_write_dedupes_its_rows(b: &Backend) {
    let store = b.open().await;
    store
        .write_checkpoint(checkpoint(1, 1, 5, &[("keep", "old"), ("gone", "x")], &[]))
        .await
        .unwrap();
    store
        .write_checkpoint(checkpoint(
            1,
            1,
            6,
            &[
                ("k", "first"),
                ("gone", "revived?"),
                ("k", "last"),
                ("new", "1"),
                ("new", "2"),
            ],
            &["gone", "new"],
        ))
        .await
        .unwrap();
    let cp = store.load_checkpoint(1).await.unwrap().unwrap();
    assert_eq!(
        (cp.next_offset, cp.rows),
        (6, vec![row("k", "last"), row("keep", "old")])
    );
}

async fn partitions_are_isolated(b: &Backend) {
    let store = b.open().await;
    for p in [0, 1, 2, u32::MAX] {
        let key = format!("k{p}");
        store
            .write_checkpoint(checkpoint(
                p,
                1,
                u64::from(p) + 1,
                &[(&key, "v"), ("", "empty-key")],
                &[],
            ))
            .await
            .unwrap();
    }
    for p in [0, 1, 2, u32::MAX] {
        let cp = store.load_checkpoint(p).await.unwrap().unwrap();
        assert_eq!(cp.next_offset, u64::from(p) + 1);
        assert_eq!(
            cp.rows,
            vec![row("", "empty-key"), row(&format!("k{p}"), "v")]
        );
    }
    assert_eq!(store.load_checkpoint(3).await.unwrap(), None);
}

async fn fencing_refuses_lower_epoch_and_leaves_data_unchanged(b: &Backend) {
    let store = b.open().await;
    store
        .write_checkpoint(checkpoint(7, 5, 100, &[("a", "1"), ("b", "2")], &[]))
        .await
        .unwrap();
    let before = store.load_checkpoint(7).await.unwrap();
    let err = store
        .write_checkpoint(checkpoint(7, 4, 200, &[("a", "stale"), ("c", "3")], &["b"]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Fenced {
                partition: 7,
                epoch: 4,
                stored_epoch: 5
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert_eq!(store.load_checkpoint(7).await.unwrap(), before);

    // The same epoch and a newer one are accepted; the newer epoch is stored.
    store
        .write_checkpoint(checkpoint(7, 5, 150, &[], &[]))
        .await
        .unwrap();
    store
        .write_checkpoint(checkpoint(7, 6, 160, &[], &["a"]))
        .await
        .unwrap();
    let after = store.load_checkpoint(7).await.unwrap().unwrap();
    assert_eq!(
        (after.next_offset, after.epoch, after.rows),
        (160, 6, vec![row("b", "2")])
    );
}

async fn claim_raises_the_epoch_and_fences_the_former_owner(b: &Backend) {
    let [old_owner, new_owner] = <[_; 2]>::try_from(b.instances(2).await).ok().unwrap();
    assert_eq!(old_owner.load_row(3, b"a").await.unwrap(), None);
    let first = old_owner.claim_partition(3).await.unwrap();
    // Claimed but never checkpointed: no rows, offset 0.
    let claimed = old_owner.load_checkpoint(3).await.unwrap().unwrap();
    assert_eq!(
        (claimed.next_offset, claimed.epoch, claimed.rows.len()),
        (0, first, 0)
    );
    assert_eq!(old_owner.load_row(3, b"a").await.unwrap(), Some((0, None)));
    old_owner
        .write_checkpoint(checkpoint(3, first, 10, &[("a", "1")], &[]))
        .await
        .unwrap();

    let second = new_owner.claim_partition(3).await.unwrap();
    assert!(second > first);
    let stale = old_owner
        .write_checkpoint(checkpoint(3, first, 20, &[("a", "2"), ("b", "x")], &["a"]))
        .await;
    assert!(
        matches!(stale, Err(StoreError::Fenced { partition: 3, epoch, stored_epoch })
            if epoch == first && stored_epoch == second),
        "{stale:?}"
    );
    let cp = new_owner.load_checkpoint(3).await.unwrap().unwrap();
    assert_eq!(
        (cp.next_offset, cp.epoch, cp.rows),
        (10, second, vec![row("a", "1")])
    );
    assert_eq!(
        new_owner.load_row(3, b"a").await.unwrap(),
        Some((10, Some(b"1".to_vec())))
    );
    assert_eq!(new_owner.load_row(3, b"b").await.unwrap(), Some((10, None)));
    assert_eq!(new_owner.load_row(4, b"a").await.unwrap(), None);
    new_owner
        .write_checkpoint(checkpoint(3, second, 30, &[("a", "3")], &[]))
        .await
        .unwrap();
    assert_eq!(
        new_owner.load_checkpoint(3).await.unwrap().unwrap().epoch,
        second
    );
}

async fn concurrent_claims_get_distinct_epochs(b: &Backend) {
    let instances = b.instances(3).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store = instances[i % instances.len()].clone();
        tasks.push(tokio::spawn(async move {
            store.claim_partition(9).await.unwrap()
        }));
    }
    let mut epochs = Vec::new();
    for t in tasks {
        epochs.push(t.await.unwrap());
    }
    epochs.sort_unstable();
    assert_eq!(epochs, (1..=12).collect::<Vec<u64>>());
    let cp = instances[0].load_checkpoint(9).await.unwrap().unwrap();
    assert_eq!(cp.epoch, 12);
}

/// `n` rows of a realistic size: 16-byte keys, 64-byte values.
fn many_rows(n: usize, tag: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let key = format!("sku-{i:012}").into_bytes();
            let value = format!("{tag}:{i:060}").into_bytes();
            (key, value)
        })
        .collect()
}

async fn large_checkpoint_roundtrips(b: &Backend) {
    let store = b.open().await;
    let epoch = store.claim_partition(5).await.unwrap();
    for (n, next_offset) in [(1_000, 1_000), (20_000, 21_000)] {
        let puts = many_rows(n, &format!("v{n}"));
        let write = CheckpointWrite {
            partition: 5,
            epoch,
            next_offset,
            puts: puts.clone(),
            deletes: Vec::new(),
        };
        let started = Instant::now();
        store.write_checkpoint(write).await.unwrap();
        let wrote = started.elapsed();
        let started = Instant::now();
        let cp = store.load_checkpoint(5).await.unwrap().unwrap();
        let loaded = started.elapsed();
        eprintln!(
            "{}: checkpoint of {n} rows written in {wrote:?}, loaded in {loaded:?}",
            match b {
                Backend::Embedded(_) => "embedded",
                Backend::Cassandra(_) => "cassandra",
            }
        );
        assert_eq!(cp.next_offset, next_offset);
        // The 20,000 overwrite the first 1,000 keys and add the rest.
        assert_eq!(cp.rows, puts);
    }
}

async fn put_intake_first_wins(b: &Backend) {
    let store = b.open().await;
    assert_eq!(store.get_intake("ord-1").await.unwrap(), None);
    assert_eq!(
        store.put_intake(intake("ord-1", 1)).await.unwrap(),
        intake("ord-1", 1)
    );
    assert_eq!(
        store.put_intake(intake("ord-1", 2)).await.unwrap(),
        intake("ord-1", 1)
    );
    assert_eq!(
        store.get_intake("ord-1").await.unwrap(),
        Some(intake("ord-1", 1))
    );
    assert_eq!(
        store.put_intake(intake("ord-2", 2)).await.unwrap(),
        intake("ord-2", 2)
    );
}

async fn concurrent_put_intake_is_first_wins_per_id(b: &Backend) {
    let instances = b.instances(2).await;
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let store = instances[i as usize % 2].clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("ord-{}", i % 40);
            (id.clone(), store.put_intake(intake(&id, i)).await.unwrap())
        }));
    }
    let mut winners: BTreeMap<String, IntakeRecord> = BTreeMap::new();
    for t in tasks {
        let (id, stored) = t.await.unwrap();
        let first = winners.entry(id.clone()).or_insert_with(|| stored.clone());
        assert_eq!(*first, stored, "{id} has one record");
    }
    assert_eq!(winners.len(), 40);
    for (id, record) in &winners {
        for store in &instances {
            assert_eq!(store.get_intake(id).await.unwrap().as_ref(), Some(record));
        }
    }
}

async fn apply_tracking_dedupes_and_positions_only_move_forward(b: &Backend) {
    let store = b.open().await;
    let batch = [
        event("a", 1, Status::Accepted),
        event("b", 1, Status::Accepted),
        event("a", 2, Status::Reserved),
    ];
    let events = |applied: Vec<Applied>| applied.into_iter().map(|a| a.event).collect::<Vec<_>>();
    let new = store
        .apply_tracking("tracking", &[(0, 10), (1, 4)], &batch)
        .await
        .unwrap();
    assert_eq!(
        new[2].prev_at_ms,
        Some(event("a", 1, Status::Accepted).at_ms)
    );
    assert_eq!(events(new), batch.to_vec());

    // Replayed events (also within one batch) are dropped; new ones are returned in input order.
    let replay = [
        event("a", 2, Status::Reserved),
        event("b", 2, Status::OutOfStock),
        event("a", 1, Status::Accepted),
        event("b", 2, Status::OutOfStock),
    ];
    let new = store
        .apply_tracking("tracking", &[(0, 7), (1, 9), (2, 1)], &replay)
        .await
        .unwrap();
    assert_eq!(new.len(), 1);
    assert_eq!(
        new[0].prev_at_ms,
        Some(event("b", 1, Status::Accepted).at_ms)
    );
    assert_eq!(events(new), vec![event("b", 2, Status::OutOfStock)]);

    let a = store.get_tracking("a").await.unwrap().unwrap();
    assert_eq!((a.order_id.as_str(), a.status), ("a", Status::Reserved));
    assert_eq!(
        a.history.iter().map(|h| h.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let b_view = store.get_tracking("b").await.unwrap().unwrap();
    assert_eq!(
        (b_view.status, b_view.history.len()),
        (Status::OutOfStock, 2)
    );
    assert_eq!(store.get_tracking("c").await.unwrap(), None);

    assert_eq!(
        store.sink_positions("tracking").await.unwrap(),
        BTreeMap::from([(0, 10), (1, 9), (2, 1)])
    );
    assert_eq!(
        store.sink_positions("track").await.unwrap(),
        BTreeMap::new()
    );
    store.apply_tracking("track", &[(0, 1)], &[]).await.unwrap();
    assert_eq!(
        store.sink_positions("track").await.unwrap(),
        BTreeMap::from([(0, 1)])
    );
    assert_eq!(store.sink_positions("tracking").await.unwrap()[&0], 10);
}

async fn secret_stable_across_reopen(b: &Backend) {
    let first = {
        let store = b.open().await;
        let first = store.secret("sealing").await.unwrap();
        assert_eq!(store.secret("sealing").await.unwrap(), first);
        assert_ne!(store.secret("other").await.unwrap(), first);
        first
    };
    let instances = b.instances(2).await;
    for store in &instances {
        assert_eq!(store.secret("sealing").await.unwrap(), first);
    }
    // Instances racing to create the same secret all end with the same one.
    let racing = futures::future::join_all(instances.iter().map(|s| s.secret("fresh"))).await;
    let racing: Vec<[u8; 32]> = racing.into_iter().map(Result::unwrap).collect();
    assert!(racing.iter().all(|s| *s == racing[0]), "{racing:?}");
}

async fn contacts_and_notified_roundtrip(b: &Backend) {
    let ids = ["o1".to_owned(), "o2".to_owned()];
    {
        let store = b.open().await;
        store.put_contact("o1", "ada@example.com").await.unwrap();
        assert_eq!(
            store.get_contacts(&ids).await.unwrap(),
            vec![Some("ada@example.com".to_owned()), None]
        );
        assert_eq!(
            store.get_contacts(&[]).await.unwrap(),
            Vec::<Option<String>>::new()
        );
        store
            .record_notified(
                "notifications",
                &[(0, 7)],
                &[notified("webhook:a", "o1", 2), notified("email", "o1", 4)],
            )
            .await
            .unwrap();
        // A lower seq and a lower position never move anything back.
        store
            .record_notified(
                "notifications",
                &[(0, 3), (1, 2)],
                &[
                    notified("webhook:a", "o1", 1),
                    notified("webhook:a", "o2", 1),
                ],
            )
            .await
            .unwrap();
    }
    let store = b.open().await;
    let keys = [
        ("webhook:a".to_owned(), "o1".to_owned()),
        ("webhook:a".to_owned(), "o2".to_owned()),
        ("email".to_owned(), "o1".to_owned()),
        ("webhook:b".to_owned(), "o1".to_owned()),
    ];
    assert_eq!(
        store.notified(&keys).await.unwrap(),
        vec![Some(2), Some(1), Some(4), None]
    );
    assert_eq!(
        store.sink_positions("notifications").await.unwrap(),
        BTreeMap::from([(0, 7), (1, 2)])
    );
    assert_eq!(
        store.get_contacts(&ids[..1]).await.unwrap(),
        vec![Some("ada@example.com".to_owned())]
    );
}

async fn data_survives_reopen(b: &Backend) {
    let (cp, view) = {
        let store = b.open().await;
        store
            .write_checkpoint(checkpoint(2, 3, 42, &[("sku", "stock")], &[]))
            .await
            .unwrap();
        store.put_intake(intake("ord-1", 9)).await.unwrap();
        store
            .apply_tracking(
                "tracking",
                &[(0, 5)],
                &[event("ord-1", 1, Status::Accepted)],
            )
            .await
            .unwrap();
        (
            store.load_checkpoint(2).await.unwrap(),
            store.get_tracking("ord-1").await.unwrap(),
        )
    };
    assert!(cp.is_some() && view.is_some());
    let store = b.open().await;
    assert_eq!(store.load_checkpoint(2).await.unwrap(), cp);
    assert_eq!(
        store.get_intake("ord-1").await.unwrap(),
        Some(intake("ord-1", 9))
    );
    assert_eq!(store.get_tracking("ord-1").await.unwrap(), view);
    assert_eq!(
        store.sink_positions("tracking").await.unwrap(),
        BTreeMap::from([(0, 5)])
    );
}

// Cases of the CQL store alone.

/// `migrate` twice is fine, reports what it created only the first time, and connect then works.
#[tokio::test]
async fn cassandra_migrate_is_idempotent() {
    let config = cassandra_config(support::unique_name("ks"));
    let created = migrate(&config).await.unwrap();
    assert_eq!(created.len(), 8, "{created:?}");
    assert!(created[0].starts_with(&format!("keyspace {}", config.keyspace)));
    assert_eq!(migrate(&config).await.unwrap(), Vec::<String>::new());
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
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE {} WITH replication = \
                 {{'class': 'SimpleStrategy', 'replication_factor': 1}}",
                config.keyspace
            ),
            (),
        )
        .await
        .unwrap();
    let err = ScyllaStore::connect(&config, None).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, StoreError::Unavailable(_))
            && msg.contains(&format!(
                "keyspace {} has no table partition_state: run `orderflow migrate` first",
                config.keyspace
            )),
        "{msg}"
    );

    // A table of the same name with other columns is named precisely too.
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {}.partition_state (partition int PRIMARY KEY, value text)",
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
    assert!(msg.contains("partition_state has no column key"), "{msg}");
    Backend::Cassandra(config).finish().await;
}

/// A checkpoint just under the size limit is written; one over it is refused, naming the limit.
#[tokio::test]
async fn cassandra_checkpoint_size_limit_is_explicit() {
    let backend = Backend::cassandra().await;
    let store = backend.open().await;
    let value = vec![7u8; 64 * 1024];
    let rows = MAX_CHECKPOINT_BYTES / (value.len() + 16 + 64) - 1;
    let puts: Vec<_> = (0..rows)
        .map(|i| (format!("{i:08}").into_bytes(), value.clone()))
        .collect();
    let write = |puts: Vec<(Vec<u8>, Vec<u8>)>| CheckpointWrite {
        partition: 0,
        epoch: 1,
        next_offset: 1,
        puts,
        deletes: Vec::new(),
    };
    store.write_checkpoint(write(puts.clone())).await.unwrap();
    assert_eq!(
        store.load_checkpoint(0).await.unwrap().unwrap().rows.len(),
        rows
    );

    let mut over = puts;
    over.extend((0..20).map(|i| (format!("x{i:07}").into_bytes(), value.clone())));
    let err = store.write_checkpoint(write(over)).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, StoreError::Unavailable(_))
            && msg.contains("too large for one conditional batch")
            && msg.contains(&format!("limit {MAX_CHECKPOINT_BYTES}")),
        "{msg}"
    );
    backend.finish().await;
}

/// Undecodable stored bytes give `Corrupt` naming the table and key, never a panic.
#[tokio::test]
async fn cassandra_bad_stored_bytes_are_corrupt_not_panic() {
    let backend = Backend::cassandra().await;
    let Backend::Cassandra(config) = &backend else {
        unreachable!()
    };
    let store = backend.open().await;
    let ks = &config.keyspace;
    let session = raw_session().await;
    let junk = vec![0xc1u8, 0xff];
    for (table, key) in [("intake", "order_id"), ("tracking", "order_id")] {
        let cols = if table == "intake" {
            "record"
        } else {
            "\"view\""
        };
        session
            .query_unpaged(
                format!("INSERT INTO {ks}.{table} ({key}, {cols}) VALUES (?, ?)"),
                ("ord-x", junk.clone()),
            )
            .await
            .unwrap();
    }
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.secrets (name, value) VALUES (?, ?)"),
            ("s", junk.clone()),
        )
        .await
        .unwrap();
    session
        .query_unpaged(
            format!("UPDATE {ks}.partition_state SET epoch = -1 WHERE partition = 9"),
            (),
        )
        .await
        .unwrap();
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
        store.claim_partition(9).await.unwrap_err(),
    ];
    for err in errors {
        assert!(
            matches!(&err, StoreError::Corrupt(msg) if msg.contains('[')),
            "{err:?}"
        );
    }
    backend.finish().await;
}

/// Requests are timed per operation, failures counted by kind, and a fenced write counted per partition.
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
    let first = store.claim_partition(4).await.unwrap();
    store
        .write_checkpoint(checkpoint(4, first, 1, &[("a", "1")], &[]))
        .await
        .unwrap();
    store.claim_partition(4).await.unwrap();
    let fenced = store
        .write_checkpoint(checkpoint(4, first, 2, &[("a", "2")], &[]))
        .await;
    assert!(
        matches!(fenced, Err(StoreError::Fenced { .. })),
        "{fenced:?}"
    );
    let huge = vec![0u8; MAX_CHECKPOINT_BYTES];
    let too_large = store
        .write_checkpoint(CheckpointWrite {
            partition: 4,
            epoch: first + 1,
            next_offset: 3,
            puts: vec![(b"huge".to_vec(), huge)],
            deletes: Vec::new(),
        })
        .await;
    assert!(matches!(too_large, Err(StoreError::Unavailable(_))));
    store.put_intake(intake("ord-1", 1)).await.unwrap();

    let latency = |op: &str| {
        metrics
            .store_latency
            .with_label_values(&[op])
            .get_sample_count()
    };
    assert_eq!(latency("claim_read"), 2);
    assert_eq!(latency("claim"), 2);
    assert_eq!(latency("write_checkpoint"), 2);
    assert_eq!(latency("put_intake"), 1);
    assert_eq!(
        metrics
            .store_errors
            .with_label_values(&["write_checkpoint", "too_large"])
            .get(),
        1
    );
    assert_eq!(metrics.checkpoint_fenced.with_label_values(&["4"]).get(), 1);
    drop(store);
    backend.finish().await;
}
