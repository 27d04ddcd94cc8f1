//! The distributed state store: ScyllaDB (or Apache Cassandra, same CQL)
//! through the `scylla` driver. Every instance of a deployment shares it.
//!
//! Data model (keyspace from `scylla.keyspace`; `orderflow migrate` creates
//! it). Nothing is written per order; see docs/design.md, "Snapshots":
//! - `snapshots ((scope, partition)) epoch, next_offset, manifest`: one row
//!   per scope and partition, overwritten in place by every commit (an
//!   overwrite is a newer cell, never a tombstone);
//! - `snapshot_blobs ((scope, partition, epoch, id)) data`: the immutable
//!   blobs a manifest references. Each blob is its own CQL partition, so a
//!   blob that is replaced is deleted as a whole partition that nothing
//!   ever reads again: no read meets a tombstone, whatever the volume;
//! - `secrets (name) value`: 32 bytes.
//!
//! Commits and fencing. A commit writes its blobs (plain `INSERT`s, in
//! parallel), then the row with one lightweight transaction `UPDATE ...
//! IF epoch = <the writer's>`, then deletes the blobs it replaced. A former
//! owner whose epoch a claim raised gets `[applied] = false` with the stored
//! epoch and writes nothing of the row ([`StoreError::Fenced`]); its blobs
//! carry its own epoch in their key, so they can never overwrite one the
//! current owner references. `claim` raises the epoch with `IF epoch =
//! <read value>` (or `IF NOT EXISTS` for the first claim). Since every
//! claim and commit is a Paxos round on the same row, a new owner, which
//! claims before it loads, reads everything committed before its claim.
//!
//! No statement is a batch, and the largest value is one blob (at most a
//! few hundred KiB): orderflow needs none of Cassandra's or ScyllaDB's
//! limits raised (`batch_size_fail_threshold`, `commitlog_segment_size`,
//! `native_transport_max_frame_size`, tombstone thresholds keep their
//! defaults).
//!
//! Retries and idempotency. The session uses the driver's default retry
//! policy, which retries a timed-out write only when its statement is
//! marked idempotent: every `SELECT`, the blob `INSERT`s and `DELETE`s. Not
//! the LWTs, whose outcome a blind repeat could misreport; a caller sees
//! their timeout as [`StoreError::Unavailable`] and tries again itself.
//!
//! Consistency: reads and writes at `scylla.consistency`, LWTs with the
//! matching serial consistency. Statements name their keyspace, and all of
//! them are prepared once at connect: token-aware routing (the driver's
//! default) then sends each request to a replica of its partition, and to
//! the right shard on ScyllaDB.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::response::query_result::QueryResult;
use scylla::value::{CqlValue, Row};

mod failure;
mod schema;
mod session;
mod statements;

use self::failure::*;
use self::schema::*;
pub use self::schema::{drop_keyspace, migrate};
use self::statements::Statements;

use self::session::open_session;
use super::embedded::not_owner;
use super::{BlobRef, Scope, Snapshot, SnapshotWrite, StateStore, StoreError};
use crate::config::ScyllaConfig;
use crate::telemetry::metrics::Metrics;

/// Blob requests one call runs concurrently.
const CONCURRENCY: usize = 16;
/// LWT rounds a claim tries before giving up: a round only fails again if
/// another claim changed the epoch in between.
const MAX_LWT_ATTEMPTS: usize = 16;

/// The [`StateStore`] kept in a ScyllaDB (or Cassandra) keyspace.
pub struct ScyllaStore {
    session: Session,
    keyspace: String,
    st: Statements,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaStore")
            .field("keyspace", &self.keyspace)
            .finish_non_exhaustive()
    }
}

fn cql_scope(scope: Scope) -> i8 {
    scope.code() as i8
}

/// A log partition as its CQL `int` (the same 32 bits).
fn cql_partition(partition: u32) -> i32 {
    i32::from_ne_bytes(partition.to_ne_bytes())
}

/// `v` as a CQL `bigint`; values past `i64::MAX` never occur in practice.
fn bigint(v: u64, what: &str) -> Result<i64, Failure> {
    i64::try_from(v).map_err(|_| Failure::Refused {
        kind: "too_large",
        error: StoreError::Unavailable(format!("{what} = {v} does not fit a CQL bigint")),
    })
}

fn unsigned(v: i64, what: &dyn std::fmt::Display) -> Result<u64, Failure> {
    u64::try_from(v).map_err(|_| Failure::Corrupt(format!("{what}: negative value {v}")))
}

/// What a lightweight transaction answered: whether it applied and, if it
/// did not, the stored value of `column` (`None`: null or not returned).
fn lwt_outcome(result: QueryResult, column: &str) -> Result<(bool, Option<CqlValue>), Failure> {
    let rows = result.into_rows_result()?;
    let specs = rows.column_specs();
    let applied_at = specs
        .get_by_name("[applied]")
        .map(|(i, _)| i)
        .ok_or_else(|| driver("decode", "LWT result without an [applied] column"))?;
    let column_at = specs.get_by_name(column).map(|(i, _)| i);
    let Some(row) = rows.maybe_first_row::<Row>()? else {
        return Err(driver("decode", "LWT result without rows"));
    };
    let mut columns = row.columns;
    let applied = columns
        .get(applied_at)
        .and_then(|v| v.as_ref())
        .and_then(CqlValue::as_boolean)
        .ok_or_else(|| driver("decode", "LWT result with a null [applied]"))?;
    let value = column_at.and_then(|i| columns.get_mut(i).and_then(Option::take));
    Ok((applied, value))
}

fn stored_bigint(
    value: Option<CqlValue>,
    what: &dyn std::fmt::Display,
) -> Result<Option<u64>, Failure> {
    match value {
        None => Ok(None),
        Some(CqlValue::BigInt(v)) => unsigned(v, what).map(Some),
        Some(other) => Err(Failure::Corrupt(format!("{what}: not a bigint: {other:?}"))),
    }
}

fn stored_blob(value: Option<CqlValue>, what: &dyn std::fmt::Display) -> Result<Vec<u8>, Failure> {
    match value {
        Some(CqlValue::Blob(v)) => Ok(v),
        None => Err(Failure::Corrupt(format!("{what}: null"))),
        Some(_) => Err(Failure::Corrupt(format!("{what}: not a blob"))),
    }
}

fn decode_secret(bytes: &[u8], name: &str) -> Result<[u8; 32], Failure> {
    <[u8; 32]>::try_from(bytes).map_err(|_| {
        Failure::Corrupt(format!(
            "{SECRETS_T}[{name:?}]: expected 32 bytes, found {}",
            bytes.len()
        ))
    })
}

/// A snapshot row as read: the epoch, and the snapshot once one was committed.
type StoredRow = (Option<u64>, Option<Snapshot>);

impl ScyllaStore {
    /// Connects to `config.nodes` and prepares every statement, after
    /// checking that the keyspace has the schema `migrate` creates.
    pub async fn connect(
        config: &ScyllaConfig,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<ScyllaStore, StoreError> {
        let keyspace = keyspace_of(config)?;
        let session = open_session(config, &keyspace).await?;
        check_schema(&session, &keyspace).await?;
        let st = Statements::prepare(&session, &keyspace).await?;
        Ok(ScyllaStore {
            session,
            keyspace,
            st,
            metrics,
        })
    }

    /// Runs one request: its latency goes to `store_latency{op}` (whose
    /// count is the number of requests), a failure to `store_errors{op,
    /// kind}` and to a `StoreError` naming `op`.
    async fn timed<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let outcome = request.await;
        if let Some(m) = &self.metrics {
            m.store_latency
                .with_label_values(&[op])
                .observe(started.elapsed().as_secs_f64());
            if let Err(f) = &outcome {
                m.store_errors.with_label_values(&[op, f.kind()]).inc();
            }
        }
        outcome.map_err(|f| f.into_store_error(op))
    }

    /// The row of `(scope, partition)`; `None` if it was never claimed.
    async fn read_row(
        &self,
        op: &'static str,
        scope: Scope,
        partition: u32,
    ) -> Result<Option<StoredRow>, StoreError> {
        self.timed(op, async {
            let rows = self
                .session
                .execute_unpaged(
                    &self.st.read_row,
                    (cql_scope(scope), cql_partition(partition)),
                )
                .await?
                .into_rows_result()?;
            let Some((epoch, next_offset, manifest)) =
                rows.maybe_first_row::<(Option<i64>, Option<i64>, Option<Vec<u8>>)>()?
            else {
                return Ok(None);
            };
            let what = format!("{SNAPSHOTS_T}[{}/{partition}]", scope.name());
            let epoch = epoch.map(|e| unsigned(e, &what)).transpose()?;
            let snapshot = match (next_offset, manifest) {
                (Some(next_offset), Some(manifest)) => Some(Snapshot {
                    epoch: epoch.unwrap_or(0),
                    next_offset: unsigned(next_offset, &what)?,
                    manifest,
                }),
                (None, None) => None,
                _ => return Err(Failure::Corrupt(format!("{what}: half a snapshot"))),
            };
            Ok(Some((epoch, snapshot)))
        })
        .await
    }

    async fn put_blob(
        &self,
        scope: Scope,
        partition: u32,
        blob: BlobRef,
        data: &[u8],
    ) -> Result<(), StoreError> {
        self.timed("blob_write", async {
            let values = (
                cql_scope(scope),
                cql_partition(partition),
                bigint(blob.epoch, "epoch")?,
                bigint(blob.id, "blob id")?,
                data,
            );
            self.session
                .execute_unpaged(&self.st.put_blob, values)
                .await?;
            Ok(())
        })
        .await
    }

    async fn delete_blob(
        &self,
        scope: Scope,
        partition: u32,
        blob: BlobRef,
    ) -> Result<(), StoreError> {
        self.timed("blob_delete", async {
            let values = (
                cql_scope(scope),
                cql_partition(partition),
                bigint(blob.epoch, "epoch")?,
                bigint(blob.id, "blob id")?,
            );
            self.session
                .execute_unpaged(&self.st.delete_blob, values)
                .await?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl StateStore for ScyllaStore {
    /// Reads the epoch, then raises it by one with `IF epoch = <read>` (or
    /// `IF NOT EXISTS` for the first claim); a lost race (another claim in
    /// between) tries again from the epoch the LWT answered with.
    async fn claim(&self, scope: Scope, partition: u32) -> Result<u64, StoreError> {
        let what = format!("{SNAPSHOTS_T}[{}/{partition}].epoch", scope.name());
        let (s, p) = (cql_scope(scope), cql_partition(partition));
        let mut current = self
            .read_row("claim_read", scope, partition)
            .await?
            .map(|(epoch, _)| epoch);
        for _ in 0..MAX_LWT_ATTEMPTS {
            let next = current.flatten().unwrap_or(0) + 1;
            let (applied, stored) = self
                .timed("claim", async {
                    let result = match current {
                        None => {
                            self.session
                                .execute_unpaged(&self.st.first_claim, (s, p))
                                .await?
                        }
                        Some(epoch) => {
                            let expected = epoch.map(|e| bigint(e, "epoch")).transpose()?;
                            let values = (bigint(next, "epoch")?, s, p, expected);
                            self.session.execute_unpaged(&self.st.claim, values).await?
                        }
                    };
                    let (applied, stored) = lwt_outcome(result, "epoch")?;
                    Ok((applied, stored_bigint(stored, &what)?))
                })
                .await?;
            if applied {
                return Ok(next);
            }
            current = Some(stored);
        }
        Err(StoreError::Unavailable(format!(
            "claim of {} partition {partition}: the epoch changed under each of \
             {MAX_LWT_ATTEMPTS} attempts (other instances are claiming it)",
            scope.name()
        )))
    }

    async fn load(&self, scope: Scope, partition: u32) -> Result<Option<Snapshot>, StoreError> {
        Ok(self
            .read_row("load", scope, partition)
            .await?
            .and_then(|(_, snapshot)| snapshot))
    }

    async fn read_blobs(
        &self,
        scope: Scope,
        partition: u32,
        blobs: &[BlobRef],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let reads: Vec<_> = blobs
            .iter()
            .map(|blob| {
                self.timed("blob_read", async move {
                    let values = (
                        cql_scope(scope),
                        cql_partition(partition),
                        bigint(blob.epoch, "epoch")?,
                        bigint(blob.id, "blob id")?,
                    );
                    let rows = self
                        .session
                        .execute_unpaged(&self.st.get_blob, values)
                        .await?
                        .into_rows_result()?;
                    let what = format!("{BLOBS_T}[{}/{partition}/{blob:?}]", scope.name());
                    match rows.maybe_first_row::<(Option<Vec<u8>>,)>()? {
                        None => Ok(None),
                        Some((data,)) => stored_blob(data.map(CqlValue::Blob), &what).map(Some),
                    }
                })
            })
            .collect();
        futures::stream::iter(reads)
            .buffered(CONCURRENCY)
            .try_collect()
            .await
    }

    /// Blobs (in parallel), then the row by LWT, then the deletions.
    async fn commit(&self, write: &SnapshotWrite) -> Result<(), StoreError> {
        let (scope, partition) = (write.scope, write.partition);
        let puts: Vec<_> = write
            .blobs
            .iter()
            .map(|(blob, data)| self.put_blob(scope, partition, *blob, data))
            .collect();
        futures::stream::iter(puts)
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        let what = format!("{SNAPSHOTS_T}[{}/{partition}].epoch", scope.name());
        let (applied, stored) = self
            .timed("commit", async {
                let values = (
                    bigint(write.next_offset, "next_offset")?,
                    write.manifest.as_slice(),
                    cql_scope(scope),
                    cql_partition(partition),
                    bigint(write.epoch, "epoch")?,
                );
                let result = self
                    .session
                    .execute_unpaged(&self.st.commit, values)
                    .await?;
                let (applied, stored) = lwt_outcome(result, "epoch")?;
                Ok((applied, stored_bigint(stored, &what)?))
            })
            .await?;
        if !applied {
            let error = not_owner(scope, partition, write.epoch, stored.unwrap_or(0));
            if let (Some(m), StoreError::Fenced { .. }) = (&self.metrics, &error) {
                m.checkpoint_fenced
                    .with_label_values(&[&partition.to_string()])
                    .inc();
            }
            return Err(error);
        }
        self.delete_blobs(scope, partition, &write.drop).await
    }

    async fn delete_blobs(
        &self,
        scope: Scope,
        partition: u32,
        blobs: &[BlobRef],
    ) -> Result<(), StoreError> {
        let deletes: Vec<_> = blobs
            .iter()
            .map(|blob| self.delete_blob(scope, partition, *blob))
            .collect();
        futures::stream::iter(deletes)
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Reads it; if absent, `INSERT ... IF NOT EXISTS` a random one, and
    /// whoever lost that race takes the winner's from the LWT answer.
    async fn secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
        let what = format!("{SECRETS_T}[{name:?}]");
        let stored = self
            .timed("secret_read", async {
                let rows = self
                    .session
                    .execute_unpaged(&self.st.get_secret, (name,))
                    .await?
                    .into_rows_result()?;
                match rows.maybe_first_row::<(Option<Vec<u8>>,)>()? {
                    None => Ok(None),
                    Some((bytes,)) => {
                        decode_secret(&stored_blob(bytes.map(CqlValue::Blob), &what)?, name)
                            .map(Some)
                    }
                }
            })
            .await?;
        if let Some(secret) = stored {
            return Ok(secret);
        }
        self.timed("secret_create", async {
            let secret = rand::random::<[u8; 32]>();
            let result = self
                .session
                .execute_unpaged(&self.st.create_secret, (name, secret.as_slice()))
                .await?;
            match lwt_outcome(result, "value")? {
                (true, _) => Ok(secret),
                (false, stored) => decode_secret(&stored_blob(stored, &what)?, name),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyspace(name: &str) -> Result<String, StoreError> {
        keyspace_of(&ScyllaConfig {
            keyspace: name.into(),
            ..ScyllaConfig::default()
        })
    }

    /// Keyspace names spliced into CQL are checked, and folded to lower case like CQL does.
    #[test]
    fn keyspace_names_are_checked_and_folded() {
        assert_eq!(keyspace("OrderFlow_1").unwrap(), "orderflow_1");
        for bad in ["", "1ks", "ks-1", "ks;DROP", "k s", &"k".repeat(49)] {
            assert!(keyspace(bad).is_err(), "{bad:?}");
        }
        assert!(keyspace(&"k".repeat(48)).is_ok());
    }

    /// `CREATE TABLE` comes from the column list: every column, the
    /// partition key, and the table's options.
    #[test]
    fn create_statements_follow_the_columns() {
        assert_eq!(
            TABLES[1].create("ks"),
            "CREATE TABLE IF NOT EXISTS ks.snapshot_blobs (scope tinyint, partition int, \
             epoch bigint, id bigint, data blob, PRIMARY KEY ((scope, partition, epoch, id))) \
             WITH gc_grace_seconds = 86400 AND compaction = {'class': \
             'SizeTieredCompactionStrategy', 'unchecked_tombstone_compaction': 'true'}"
        );
    }

    /// Log partitions map onto CQL ints, the whole u32 range.
    #[test]
    fn partitions_fit_cql_int() {
        for p in [0, 1, i32::MAX as u32, i32::MAX as u32 + 1, u32::MAX] {
            assert_eq!(u32::from_ne_bytes(cql_partition(p).to_ne_bytes()), p);
        }
        assert_eq!(cql_partition(u32::MAX), -1);
    }
}
