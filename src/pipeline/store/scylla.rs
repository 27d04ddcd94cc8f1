//! The distributed state store: ScyllaDB (or Apache Cassandra, same CQL)
//! through the `scylla` driver. Every instance of a deployment shares it.
//!
//! Data model (keyspace from `scylla.keyspace`; `orderflow migrate` creates it):
//! - `partition_state (partition int, key blob, value blob, epoch bigint
//!   static, next_offset bigint static, PRIMARY KEY (partition, key))`: a log
//!   partition's whole state is ONE CQL partition: its rows (clustered by
//!   key, so they load in key order) and, in static columns, the ownership
//!   epoch and the next offset. One CQL partition is what a single
//!   lightweight transaction (LWT) can change atomically, which is why;
//! - `intake (order_id text PRIMARY KEY, record blob)`: MessagePack of
//!   [`IntakeRecord`];
//! - `tracking (order_id text PRIMARY KEY, "view" blob)` (`view` is a CQL
//!   keyword, so it is quoted): MessagePack of
//!   [`TrackingView`], written with the write timestamp = the seq of its last
//!   history entry;
//! - `sink_positions (sink text, partition int, next_offset bigint,
//!   PRIMARY KEY (sink, partition))`, written with the write timestamp = the
//!   offset;
//! - `secrets (name text PRIMARY KEY, value blob)`: 32 bytes;
//! - `contacts (order_id text PRIMARY KEY, email text)`;
//! - `notified (target text, order_id text, seq int, PRIMARY KEY ((target,
//!   order_id)))`, written with the write timestamp = the seq.
//!
//! Why those write timestamps: CQL keeps the cell with the highest write
//! timestamp, whatever order writes arrive in. A view, a position or a seq
//! written with its own version as timestamp can therefore only move
//! forward (`max(stored, new)` in the server, with no read before the write
//! and no lost update when two instances overlap during a rebalance). Every
//! write to these three tables must use it: a write with the default
//! timestamp (the wall clock in microseconds) would win over them forever.
//!
//! Checkpoints and fencing. `write_checkpoint` is one single-partition
//! conditional batch: every put (`INSERT`) and delete (`DELETE`) of the
//! write plus `UPDATE partition_state SET epoch = ?, next_offset = ? WHERE
//! partition = ? IF epoch = ?`. A conditional batch applies all or nothing,
//! isolated, through Paxos: a former owner whose epoch was raised by
//! `claim_partition` gets `[applied] = false` with the stored epoch, and
//! nothing it sent is written ([`StoreError::Fenced`]). `claim_partition`
//! raises the static `epoch` with `UPDATE ... IF epoch = <read value>` (a
//! never-claimed partition compares with null). Since every claim and
//! checkpoint is a Paxos round on the same partition, a claim also finishes
//! any round a former owner left half-done: a new owner, which claims before
//! it loads, reads everything committed before its claim.
//!
//! Other tables: `put_intake` and `secret` are `INSERT ... IF NOT EXISTS`
//! (the first writer wins across instances; the loser gets the stored value
//! back in the LWT result). `apply_tracking` and `record_notified` write the
//! changed rows, then the positions (one single-partition batch per sink):
//! not one atomic write as in the embedded store, but a crash in between
//! only leaves positions behind, and what is then read again is deduped by
//! `(order_id, seq)`.
//!
//! Retries and idempotency. The session uses the driver's default retry
//! policy, which retries a timed-out write only when its statement is
//! marked idempotent. Marked (`set_is_idempotent(true)`): every `SELECT`,
//! the plain upserts (`contacts`; `tracking`, `sink_positions` and
//! `notified`, whose fixed write timestamps make a repeat a no-op) and the
//! positions batch. Not marked: the LWTs (`IF ...` updates, `IF NOT EXISTS`
//! inserts, the checkpoint batch), whose outcome a blind repeat could
//! misreport; a caller sees their timeout as [`StoreError::Unavailable`]
//! and tries again itself.
//!
//! Consistency: reads and writes at `scylla.consistency`, LWTs with the
//! matching serial consistency. Statements name their keyspace, and all of
//! them are prepared once at connect: token-aware routing (the driver's
//! default) then sends each request to a replica of its partition, and to
//! the right shard on ScyllaDB.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{
    DbError, DeserializationError, ExecutionError, IntoRowsResultError, MaybeFirstRowError,
    NextPageError, NextRowError, PagerExecutionError, RequestAttemptError, RequestError, RowsError,
    TypeCheckError,
};
use scylla::response::query_result::QueryResult;
use scylla::serialize::SerializationError;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::statement::batch::{Batch, BatchStatement, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};

use super::{
    Applied, CheckpointWrite, IntakeRecord, Notified, PartitionCheckpoint, StateStore, StoreError,
    TrackingView, decode, encode,
};
use crate::config::{CqlConsistency, ScyllaConfig};
use crate::domain::StatusEvent;
use crate::sinks::metrics::Metrics;

/// Largest checkpoint write accepted, by its estimated size on the wire.
/// One conditional batch must fit in one CQL frame (Cassandra's
/// `native_transport_max_frame_size`) and one mutation (half of
/// `commitlog_segment_size`), and stay under `batch_size_fail_threshold`:
/// the servers' defaults of all three are lower, so a deployment raises
/// them (as `scripts/cassandra` does for the tests).
pub const MAX_CHECKPOINT_BYTES: usize = 16 * 1024 * 1024;
/// Most rows (puts and deletes) in one checkpoint write: the CQL batch
/// frame counts its statements in 16 bits, and one is the epoch update.
pub const MAX_CHECKPOINT_ROWS: usize = u16::MAX as usize - 1;
/// Estimated bytes of one batch statement besides its key and value
/// (statement kind, prepared id, value count and lengths, cell metadata).
const ROW_OVERHEAD_BYTES: usize = 48;
/// Rows per page when a partition's state is loaded.
const LOAD_PAGE_ROWS: i32 = 2_000;
/// Rows read or written concurrently by one call (views, contacts, seqs).
const CONCURRENCY: usize = 64;
/// LWT rounds a claim or a checkpoint tries before giving up: a round only
/// fails again if another claim changed the epoch in between.
const MAX_LWT_ATTEMPTS: usize = 16;

const STATE_T: &str = "partition_state";
const INTAKE_T: &str = "intake";
const TRACKING_T: &str = "tracking";
const SINK_POSITIONS_T: &str = "sink_positions";
const SECRETS_T: &str = "secrets";
const CONTACTS_T: &str = "contacts";
const NOTIFIED_T: &str = "notified";

/// A table of the schema: its columns as `system_schema.columns` lists
/// them (name, CQL type, kind) and what follows `CREATE TABLE name`.
struct TableDef {
    name: &'static str,
    columns: &'static [(&'static str, &'static str, &'static str)],
    definition: &'static str,
}

const TABLES: [TableDef; 7] = [
    TableDef {
        name: STATE_T,
        columns: &[
            ("partition", "int", "partition_key"),
            ("key", "blob", "clustering"),
            ("value", "blob", "regular"),
            ("epoch", "bigint", "static"),
            ("next_offset", "bigint", "static"),
        ],
        definition: "(partition int, key blob, value blob, epoch bigint static, \
                     next_offset bigint static, PRIMARY KEY (partition, key))",
    },
    TableDef {
        name: INTAKE_T,
        columns: &[
            ("order_id", "text", "partition_key"),
            ("record", "blob", "regular"),
        ],
        definition: "(order_id text PRIMARY KEY, record blob)",
    },
    TableDef {
        name: TRACKING_T,
        columns: &[
            ("order_id", "text", "partition_key"),
            ("view", "blob", "regular"),
        ],
        // `view` is a CQL keyword: quoted wherever it is named.
        definition: "(order_id text PRIMARY KEY, \"view\" blob)",
    },
    TableDef {
        name: SINK_POSITIONS_T,
        columns: &[
            ("sink", "text", "partition_key"),
            ("partition", "int", "clustering"),
            ("next_offset", "bigint", "regular"),
        ],
        definition: "(sink text, partition int, next_offset bigint, \
                     PRIMARY KEY (sink, partition))",
    },
    TableDef {
        name: SECRETS_T,
        columns: &[
            ("name", "text", "partition_key"),
            ("value", "blob", "regular"),
        ],
        definition: "(name text PRIMARY KEY, value blob)",
    },
    TableDef {
        name: CONTACTS_T,
        columns: &[
            ("order_id", "text", "partition_key"),
            ("email", "text", "regular"),
        ],
        definition: "(order_id text PRIMARY KEY, email text)",
    },
    TableDef {
        name: NOTIFIED_T,
        columns: &[
            ("target", "text", "partition_key"),
            ("order_id", "text", "partition_key"),
            ("seq", "int", "regular"),
        ],
        definition: "(target text, order_id text, seq int, PRIMARY KEY ((target, order_id)))",
    },
];

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

/// Every statement the store runs, prepared once at connect.
struct Statements {
    load: PreparedStatement,
    read_statics: PreparedStatement,
    load_row: PreparedStatement,
    claim: PreparedStatement,
    checkpoint_update: PreparedStatement,
    checkpoint_put: PreparedStatement,
    checkpoint_delete: PreparedStatement,
    get_intake: PreparedStatement,
    put_intake: PreparedStatement,
    sink_positions: PreparedStatement,
    put_position: PreparedStatement,
    get_tracking: PreparedStatement,
    put_tracking: PreparedStatement,
    get_secret: PreparedStatement,
    create_secret: PreparedStatement,
    put_contact: PreparedStatement,
    get_contact: PreparedStatement,
    get_notified: PreparedStatement,
    put_notified: PreparedStatement,
}

impl Statements {
    async fn prepare(session: &Session, ks: &str) -> Result<Statements, StoreError> {
        // `idempotent` marks what the retry policy may repeat (module comment).
        let prepare = async |cql: String, idempotent: bool| {
            let mut statement = session.prepare(cql.as_str()).await.map_err(|e| {
                StoreError::Unavailable(format!("preparing statement `{cql}`: {e}"))
            })?;
            statement.set_is_idempotent(idempotent);
            Ok::<_, StoreError>(statement)
        };
        let mut load = prepare(
            format!(
                "SELECT key, value, epoch, next_offset FROM {ks}.{STATE_T} WHERE partition = ?"
            ),
            true,
        )
        .await?;
        load.set_page_size(LOAD_PAGE_ROWS);
        Ok(Statements {
            load,
            read_statics: prepare(
                format!(
                    "SELECT epoch, next_offset FROM {ks}.{STATE_T} WHERE partition = ? LIMIT 1"
                ),
                true,
            )
            .await?,
            load_row: prepare(
                format!("SELECT value FROM {ks}.{STATE_T} WHERE partition = ? AND key = ?"),
                true,
            )
            .await?,
            claim: prepare(
                format!("UPDATE {ks}.{STATE_T} SET epoch = ? WHERE partition = ? IF epoch = ?"),
                false,
            )
            .await?,
            checkpoint_update: prepare(
                format!(
                    "UPDATE {ks}.{STATE_T} SET epoch = ?, next_offset = ? \
                     WHERE partition = ? IF epoch = ?"
                ),
                false,
            )
            .await?,
            checkpoint_put: prepare(
                format!("INSERT INTO {ks}.{STATE_T} (partition, key, value) VALUES (?, ?, ?)"),
                false,
            )
            .await?,
            checkpoint_delete: prepare(
                format!("DELETE FROM {ks}.{STATE_T} WHERE partition = ? AND key = ?"),
                false,
            )
            .await?,
            get_intake: prepare(
                format!("SELECT record FROM {ks}.{INTAKE_T} WHERE order_id = ?"),
                true,
            )
            .await?,
            put_intake: prepare(
                format!(
                    "INSERT INTO {ks}.{INTAKE_T} (order_id, record) VALUES (?, ?) IF NOT EXISTS"
                ),
                false,
            )
            .await?,
            sink_positions: prepare(
                format!(
                    "SELECT partition, next_offset FROM {ks}.{SINK_POSITIONS_T} WHERE sink = ?"
                ),
                true,
            )
            .await?,
            put_position: prepare(
                format!(
                    "INSERT INTO {ks}.{SINK_POSITIONS_T} (sink, partition, next_offset) \
                     VALUES (?, ?, ?) USING TIMESTAMP ?"
                ),
                true,
            )
            .await?,
            get_tracking: prepare(
                format!("SELECT \"view\" FROM {ks}.{TRACKING_T} WHERE order_id = ?"),
                true,
            )
            .await?,
            put_tracking: prepare(
                format!(
                    "INSERT INTO {ks}.{TRACKING_T} (order_id, \"view\") VALUES (?, ?) \
                     USING TIMESTAMP ?"
                ),
                true,
            )
            .await?,
            get_secret: prepare(
                format!("SELECT value FROM {ks}.{SECRETS_T} WHERE name = ?"),
                true,
            )
            .await?,
            create_secret: prepare(
                format!("INSERT INTO {ks}.{SECRETS_T} (name, value) VALUES (?, ?) IF NOT EXISTS"),
                false,
            )
            .await?,
            put_contact: prepare(
                format!("INSERT INTO {ks}.{CONTACTS_T} (order_id, email) VALUES (?, ?)"),
                true,
            )
            .await?,
            get_contact: prepare(
                format!("SELECT email FROM {ks}.{CONTACTS_T} WHERE order_id = ?"),
                true,
            )
            .await?,
            get_notified: prepare(
                format!("SELECT seq FROM {ks}.{NOTIFIED_T} WHERE target = ? AND order_id = ?"),
                true,
            )
            .await?,
            put_notified: prepare(
                format!(
                    "INSERT INTO {ks}.{NOTIFIED_T} (target, order_id, seq) VALUES (?, ?, ?) \
                     USING TIMESTAMP ?"
                ),
                true,
            )
            .await?,
        })
    }
}

/// Why one request failed, before the helper names its operation.
enum Failure {
    /// The driver or the database failed; `kind` labels `store_errors`.
    Unavailable { kind: &'static str, detail: String },
    /// Stored bytes (or values) that cannot be decoded.
    Corrupt(String),
    /// A request refused before it was sent.
    Refused {
        kind: &'static str,
        error: StoreError,
    },
}

impl Failure {
    fn kind(&self) -> &'static str {
        match self {
            Failure::Unavailable { kind, .. } | Failure::Refused { kind, .. } => kind,
            Failure::Corrupt(_) => "corrupt",
        }
    }

    fn into_store_error(self, op: &str) -> StoreError {
        match self {
            Failure::Unavailable { detail, .. } => {
                StoreError::Unavailable(format!("{op}: {detail}"))
            }
            Failure::Corrupt(detail) => StoreError::Corrupt(format!("{op}: {detail}")),
            Failure::Refused { error, .. } => error,
        }
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Corrupt(detail) => Failure::Corrupt(detail),
            error => Failure::Refused {
                kind: "refused",
                error,
            },
        }
    }
}

fn attempt_kind(e: &RequestAttemptError) -> &'static str {
    match e {
        RequestAttemptError::DbError(db, _) => match db {
            DbError::ReadTimeout { .. } | DbError::WriteTimeout { .. } => "timeout",
            DbError::Unavailable { .. } => "unavailable",
            DbError::Overloaded => "overloaded",
            DbError::Invalid | DbError::SyntaxError => "invalid",
            _ => "db_error",
        },
        RequestAttemptError::BrokenConnectionError(_)
        | RequestAttemptError::UnableToAllocStreamId => "connection",
        _ => "driver",
    }
}

fn execution_kind(e: &ExecutionError) -> &'static str {
    match e {
        ExecutionError::RequestTimeout(_) => "timeout",
        ExecutionError::EmptyPlan | ExecutionError::ConnectionPoolError(_) => "connection",
        ExecutionError::LastAttemptError(e) => attempt_kind(e),
        _ => "driver",
    }
}

/// The kind of a failed page fetch (the same kinds as a single request).
fn page_kind(e: &NextPageError) -> &'static str {
    match e {
        NextPageError::RequestFailure(RequestError::RequestTimeout(_)) => "timeout",
        NextPageError::RequestFailure(
            RequestError::EmptyPlan | RequestError::ConnectionPoolError(_),
        ) => "connection",
        NextPageError::RequestFailure(RequestError::LastAttemptError(e)) => attempt_kind(e),
        _ => "driver",
    }
}

fn driver(kind: &'static str, e: impl std::fmt::Display) -> Failure {
    Failure::Unavailable {
        kind,
        detail: e.to_string(),
    }
}

impl From<ExecutionError> for Failure {
    fn from(e: ExecutionError) -> Self {
        driver(execution_kind(&e), e)
    }
}

impl From<PagerExecutionError> for Failure {
    fn from(e: PagerExecutionError) -> Self {
        let kind = match &e {
            PagerExecutionError::NextPageError(e) => page_kind(e),
            _ => "driver",
        };
        driver(kind, e)
    }
}

impl From<NextRowError> for Failure {
    fn from(e: NextRowError) -> Self {
        let kind = match &e {
            NextRowError::NextPageError(e) => page_kind(e),
            NextRowError::RowDeserializationError(_) => "decode",
            _ => "driver",
        };
        driver(kind, e)
    }
}

/// Result shapes the server sent that do not match the prepared statements
/// (a schema changed behind the store's back).
macro_rules! decode_failure {
    ($($t:ty),*) => {$(
        impl From<$t> for Failure {
            fn from(e: $t) -> Self {
                driver("decode", e)
            }
        }
    )*};
}
decode_failure!(
    IntoRowsResultError,
    RowsError,
    MaybeFirstRowError,
    TypeCheckError,
    DeserializationError
);

/// The driver session with the configured contact points, request timeout
/// and consistency; token-aware routing and retries are the driver's defaults.
async fn open_session(config: &ScyllaConfig, keyspace: &str) -> Result<Session, StoreError> {
    let (consistency, serial) = match config.consistency {
        CqlConsistency::LocalQuorum => (Consistency::LocalQuorum, SerialConsistency::LocalSerial),
        CqlConsistency::Quorum => (Consistency::Quorum, SerialConsistency::Serial),
        CqlConsistency::One => (Consistency::One, SerialConsistency::LocalSerial),
    };
    let profile = ExecutionProfile::builder()
        .consistency(consistency)
        .serial_consistency(Some(serial))
        .request_timeout(Some(Duration::from_millis(config.request_timeout_ms)))
        .build();
    SessionBuilder::new()
        .known_nodes(&config.nodes)
        .default_execution_profile_handle(profile.into_handle())
        // Token-aware routing needs only this keyspace's replication.
        .keyspaces_to_fetch([keyspace])
        .build()
        .await
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to ScyllaDB nodes {:?}: {e}",
                config.nodes
            ))
        })
}

/// The keyspace name as CQL stores it. It is spliced into statements, so
/// it is checked here too (not only by `Config::validate`).
fn keyspace_of(config: &ScyllaConfig) -> Result<String, StoreError> {
    let ks = &config.keyspace;
    let valid = ks.len() <= 48
        && ks.starts_with(|c: char| c.is_ascii_alphabetic())
        && ks.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(StoreError::Unavailable(format!(
            "keyspace name {ks:?}: a letter, then letters, digits or `_`, at most 48"
        )));
    }
    // Unquoted CQL names are case-insensitive and stored in lower case.
    Ok(ks.to_ascii_lowercase())
}

/// Runs one schema request (connect and migrate only, never a hot path).
async fn schema_query(
    session: &Session,
    what: &str,
    cql: String,
) -> Result<QueryResult, StoreError> {
    session
        .query_unpaged(cql, ())
        .await
        .map_err(|e| StoreError::Unavailable(format!("{what}: {e}")))
}

/// Columns `(table, column) → (type, kind)` of keyspace `ks`, or `None`
/// if the keyspace does not exist.
async fn schema_columns(
    session: &Session,
    ks: &str,
) -> Result<Option<HashMap<(String, String), (String, String)>>, StoreError> {
    let what = format!("reading the schema of keyspace {ks}");
    let bad = |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("{what}: {e}"));
    let keyspaces = schema_query(
        session,
        &what,
        format!("SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = '{ks}'"),
    )
    .await?
    .into_rows_result()
    .map_err(|e| bad(&e))?;
    if keyspaces.rows_num() == 0 {
        return Ok(None);
    }
    let columns = schema_query(
        session,
        &what,
        format!(
            "SELECT table_name, column_name, type, kind FROM system_schema.columns \
             WHERE keyspace_name = '{ks}'"
        ),
    )
    .await?
    .into_rows_result()
    .map_err(|e| bad(&e))?;
    let mut out = HashMap::new();
    for row in columns
        .rows::<(String, String, String, String)>()
        .map_err(|e| bad(&e))?
    {
        let (table, column, ty, kind) = row.map_err(|e| bad(&e))?;
        out.insert((table, column), (ty, kind));
    }
    Ok(Some(out))
}

/// Checks that keyspace `ks` has every table with every column as
/// `migrate` creates them; the error says what is missing or different.
async fn check_schema(session: &Session, ks: &str) -> Result<(), StoreError> {
    let migrate = "run `orderflow migrate` first";
    let Some(columns) = schema_columns(session, ks).await? else {
        return Err(StoreError::Unavailable(format!(
            "keyspace {ks} does not exist: {migrate}"
        )));
    };
    for table in &TABLES {
        let name = table.name;
        if !columns.keys().any(|(t, _)| t == name) {
            return Err(StoreError::Unavailable(format!(
                "keyspace {ks} has no table {name}: {migrate}"
            )));
        }
        for &(column, ty, kind) in table.columns {
            match columns.get(&(name.to_owned(), column.to_owned())) {
                Some((t, k)) if t == ty && k == kind => {}
                Some((t, k)) => {
                    return Err(StoreError::Unavailable(format!(
                        "table {ks}.{name}: column {column} is {t} ({k}), expected {ty} ({kind}); \
                         this keyspace was not created by `orderflow migrate`"
                    )));
                }
                None => {
                    return Err(StoreError::Unavailable(format!(
                        "table {ks}.{name} has no column {column}: \
                         this keyspace was not created by `orderflow migrate`"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Creates the keyspace (`NetworkTopologyStrategy`, `scylla.replication_factor`
/// in every datacenter) and every table, unless they exist, waits until
/// every node agrees on the schema, and checks it. Idempotent. Returns one
/// line per keyspace or table it created (none when all existed).
pub async fn migrate(config: &ScyllaConfig) -> Result<Vec<String>, StoreError> {
    let ks = keyspace_of(config)?;
    let session = open_session(config, &ks).await?;
    let before = schema_columns(&session, &ks).await?;
    let mut created = Vec::new();
    let rf = config.replication_factor;
    schema_query(
        &session,
        &format!("creating keyspace {ks}"),
        format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
             {{'class': 'NetworkTopologyStrategy', 'replication_factor': {rf}}}"
        ),
    )
    .await?;
    if before.is_none() {
        created.push(format!(
            "keyspace {ks} (NetworkTopologyStrategy, replication_factor {rf})"
        ));
    }
    for table in &TABLES {
        let name = table.name;
        schema_query(
            &session,
            &format!("creating table {ks}.{name}"),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.{name} {}",
                table.definition
            ),
        )
        .await?;
        let existed = before
            .as_ref()
            .is_some_and(|cols| cols.keys().any(|(t, _)| t == name));
        if !existed {
            created.push(format!("table {ks}.{name}"));
        }
    }
    session.await_schema_agreement().await.map_err(|e| {
        StoreError::Unavailable(format!("waiting for schema agreement on {ks}: {e}"))
    })?;
    check_schema(&session, &ks).await?;
    Ok(created)
}

/// Values of one statement of a checkpoint batch.
enum CheckpointRow<'a> {
    /// `SET epoch = ?, next_offset = ? WHERE partition = ? IF epoch = ?`.
    Update {
        epoch: i64,
        next_offset: i64,
        partition: i32,
        expected: Option<i64>,
    },
    Put {
        partition: i32,
        key: &'a [u8],
        value: &'a [u8],
    },
    Delete {
        partition: i32,
        key: &'a [u8],
    },
}

impl SerializeRow for CheckpointRow<'_> {
    fn serialize(
        &self,
        ctx: &RowSerializationContext<'_>,
        writer: &mut RowWriter,
    ) -> Result<(), SerializationError> {
        match *self {
            CheckpointRow::Update {
                epoch,
                next_offset,
                partition,
                expected,
            } => (epoch, next_offset, partition, expected).serialize(ctx, writer),
            CheckpointRow::Put {
                partition,
                key,
                value,
            } => (partition, key, value).serialize(ctx, writer),
            CheckpointRow::Delete { partition, key } => (partition, key).serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// A log partition as its CQL `int` (the same 32 bits).
fn cql_partition(partition: u32) -> i32 {
    i32::from_ne_bytes(partition.to_ne_bytes())
}

fn log_partition(partition: i32) -> u32 {
    u32::from_ne_bytes(partition.to_ne_bytes())
}

/// `v` as a CQL `bigint`; values past `i64::MAX` never occur in practice.
fn bigint(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v)
        .map_err(|_| StoreError::Unavailable(format!("{what} = {v} does not fit a CQL bigint")))
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

/// Key → value of the puts of one checkpoint write.
type Puts<'a> = BTreeMap<&'a [u8], &'a [u8]>;

/// Puts and deletes of one write as they go into its batch, in key order:
/// a key deleted is not also put (it ends deleted), and a key put more
/// than once keeps its last value.
fn checkpoint_rows(write: &CheckpointWrite) -> (Puts<'_>, BTreeSet<&[u8]>) {
    let deletes: BTreeSet<&[u8]> = write.deletes.iter().map(Vec::as_slice).collect();
    let mut puts = BTreeMap::new();
    for (k, v) in &write.puts {
        if !deletes.contains(k.as_slice()) {
            puts.insert(k.as_slice(), v.as_slice());
        }
    }
    (puts, deletes)
}

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

    /// Runs one request: its latency goes to `store_latency{op}`, a failure
    /// to `store_errors{op, kind}` and to a `StoreError` naming `op`.
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

    /// The first column of the one row `statement` selects, if any.
    async fn get_one<V>(
        &self,
        op: &'static str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Option<Option<V>>, StoreError>
    where
        V: for<'f, 'm> scylla::deserialize::value::DeserializeValue<'f, 'm>,
    {
        self.timed(op, async {
            let rows = self
                .session
                .execute_unpaged(statement, values)
                .await?
                .into_rows_result()?;
            Ok(rows.maybe_first_row::<(Option<V>,)>()?.map(|(v,)| v))
        })
        .await
    }

    /// A blob-valued row by its text key (intake, tracking), decoded.
    async fn get_record<T: serde::de::DeserializeOwned>(
        &self,
        op: &'static str,
        statement: &PreparedStatement,
        table: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.timed(op, async {
            let rows = self
                .session
                .execute_unpaged(statement, (key,))
                .await?
                .into_rows_result()?;
            match rows.maybe_first_row::<(Option<Vec<u8>>,)>()? {
                None => Ok(None),
                Some((None,)) => Err(Failure::Corrupt(format!("{table}[{key:?}]: null"))),
                Some((Some(bytes),)) => Ok(Some(decode(&bytes, table, key)?)),
            }
        })
        .await
    }

    /// Counts a write refused before any request, like a failed one.
    fn refuse(&self, op: &str, kind: &str, error: StoreError) -> StoreError {
        if let Some(m) = &self.metrics {
            m.store_errors.with_label_values(&[op, kind]).inc();
        }
        error
    }

    /// The static `(epoch, next_offset)` of `partition`; `None` if the
    /// partition has neither them nor any row.
    async fn read_statics(
        &self,
        op: &'static str,
        partition: u32,
    ) -> Result<Option<(Option<u64>, Option<u64>)>, StoreError> {
        self.timed(op, async {
            let rows = self
                .session
                .execute_unpaged(&self.st.read_statics, (cql_partition(partition),))
                .await?
                .into_rows_result()?;
            let Some((epoch, next_offset)) =
                rows.maybe_first_row::<(Option<i64>, Option<i64>)>()?
            else {
                return Ok(None);
            };
            let what = format!("{STATE_T}[{partition}]");
            let epoch = epoch.map(|v| unsigned(v, &what)).transpose()?;
            let next_offset = next_offset.map(|v| unsigned(v, &what)).transpose()?;
            Ok(Some((epoch, next_offset)))
        })
        .await
    }

    /// Moves each `(partition, next)` position of `sink` forward: one
    /// single-partition batch, each write timestamped with its offset.
    async fn advance_positions(
        &self,
        sink: &str,
        positions: &[(u32, u64)],
    ) -> Result<(), StoreError> {
        if positions.is_empty() {
            return Ok(());
        }
        self.timed("positions_write", async {
            let mut values = Vec::with_capacity(positions.len());
            for &(partition, next) in positions {
                let next = bigint(next, "sink position")?;
                values.push((sink, cql_partition(partition), next, next));
            }
            let mut batch = Batch::new_with_statements(
                BatchType::Unlogged,
                vec![BatchStatement::PreparedStatement(self.st.put_position.clone()); values.len()],
            );
            batch.set_is_idempotent(true);
            self.session.batch(&batch, &values).await?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl StateStore for ScyllaStore {
    /// Pages through the partition. Every row carries the static epoch and
    /// offset, so a checkpoint committed between two pages shows as a
    /// change of them and the load fails (retryable) instead of mixing two
    /// checkpoints; after `claim_partition` no other writer can commit one.
    async fn load_checkpoint(
        &self,
        partition: u32,
    ) -> Result<Option<PartitionCheckpoint>, StoreError> {
        self.timed("load_checkpoint", async {
            let mut pages = self
                .session
                .execute_iter(self.st.load.clone(), (cql_partition(partition),))
                .await?
                .rows_stream::<(Option<Vec<u8>>, Option<Vec<u8>>, Option<i64>, Option<i64>)>()?;
            let mut statics = None;
            let mut rows = Vec::new();
            let what = format!("{STATE_T}[{partition}]");
            while let Some((key, value, epoch, next_offset)) = pages.try_next().await? {
                match statics {
                    None => statics = Some((epoch, next_offset)),
                    Some(seen) if seen != (epoch, next_offset) => {
                        return Err(Failure::Unavailable {
                            kind: "concurrent_write",
                            detail: format!(
                                "partition {partition} was checkpointed while it was loaded"
                            ),
                        });
                    }
                    Some(_) => {}
                }
                // A partition with only static values has one row of nulls.
                if let Some(key) = key {
                    let value = value.ok_or_else(|| {
                        Failure::Corrupt(format!("{what}[{}]: null value", hex::encode(&key)))
                    })?;
                    rows.push((key, value));
                }
            }
            let Some((epoch, next_offset)) = statics else {
                return Ok(None);
            };
            Ok(Some(PartitionCheckpoint {
                next_offset: next_offset.map_or(Ok(0), |v| unsigned(v, &what))?,
                epoch: epoch.map_or(Ok(0), |v| unsigned(v, &what))?,
                rows,
            }))
        })
        .await
    }

    /// Two reads, the offset first: the row read after it belongs to that
    /// checkpoint or a later one, so it includes everything before the offset.
    async fn load_row(
        &self,
        partition: u32,
        key: &[u8],
    ) -> Result<Option<(u64, Option<Vec<u8>>)>, StoreError> {
        let Some((_, next_offset)) = self.read_statics("load_row", partition).await? else {
            return Ok(None);
        };
        let value = self
            .timed("load_row", async {
                let rows = self
                    .session
                    .execute_unpaged(&self.st.load_row, (cql_partition(partition), key))
                    .await?
                    .into_rows_result()?;
                match rows.maybe_first_row::<(Option<Vec<u8>>,)>()? {
                    None => Ok(None),
                    Some((Some(value),)) => Ok(Some(value)),
                    Some((None,)) => Err(Failure::Corrupt(format!(
                        "{STATE_T}[{partition}][{}]: null value",
                        hex::encode(key)
                    ))),
                }
            })
            .await?;
        Ok(Some((next_offset.unwrap_or(0), value)))
    }

    /// Reads the epoch, then raises it by one with `IF epoch = <read>`; a
    /// lost race (another claim in between) tries again from the epoch the
    /// LWT answered with.
    async fn claim_partition(&self, partition: u32) -> Result<u64, StoreError> {
        let p = cql_partition(partition);
        let what = format!("{STATE_T}[{partition}].epoch");
        let mut current = self
            .read_statics("claim_read", partition)
            .await?
            .and_then(|(epoch, _)| epoch);
        for _ in 0..MAX_LWT_ATTEMPTS {
            let next = current.unwrap_or(0) + 1;
            let (applied, stored) = self
                .timed("claim", async {
                    let values = (
                        bigint(next, "epoch")?,
                        p,
                        current.map(|e| bigint(e, "epoch")).transpose()?,
                    );
                    let result = self.session.execute_unpaged(&self.st.claim, values).await?;
                    let (applied, stored) = lwt_outcome(result, "epoch")?;
                    Ok((applied, stored_bigint(stored, &what)?))
                })
                .await?;
            if applied {
                return Ok(next);
            }
            current = stored;
        }
        Err(StoreError::Unavailable(format!(
            "claim of partition {partition}: the epoch changed under each of \
             {MAX_LWT_ATTEMPTS} attempts (other instances are claiming it)"
        )))
    }

    /// One conditional batch (module comment). The condition is first the
    /// write's own epoch; if the stored one is lower (or was never set)
    /// the write takes the partition like the embedded store does, by
    /// sending the batch again conditioned on the stored value.
    async fn write_checkpoint(&self, write: CheckpointWrite) -> Result<(), StoreError> {
        let partition = write.partition;
        let (puts, deletes) = checkpoint_rows(&write);
        let rows = puts.len() + deletes.len();
        let bytes: usize = puts
            .iter()
            .map(|(k, v)| k.len() + v.len() + ROW_OVERHEAD_BYTES)
            .chain(deletes.iter().map(|k| k.len() + ROW_OVERHEAD_BYTES))
            .sum();
        if rows > MAX_CHECKPOINT_ROWS || bytes > MAX_CHECKPOINT_BYTES {
            let error = StoreError::Unavailable(format!(
                "checkpoint of partition {partition} is too large for one conditional batch: \
                 {rows} rows (limit {MAX_CHECKPOINT_ROWS}), about {bytes} bytes \
                 (limit {MAX_CHECKPOINT_BYTES}); checkpoint more often"
            ));
            return Err(self.refuse("write_checkpoint", "too_large", error));
        }
        let p = cql_partition(partition);
        let epoch = bigint(write.epoch, "epoch")?;
        let next_offset = bigint(write.next_offset, "next_offset")?;
        let mut statements = Vec::with_capacity(rows + 1);
        let mut values = Vec::with_capacity(rows + 1);
        statements.push(BatchStatement::PreparedStatement(
            self.st.checkpoint_update.clone(),
        ));
        values.push(CheckpointRow::Update {
            epoch,
            next_offset,
            partition: p,
            expected: Some(epoch),
        });
        for (&key, &value) in &puts {
            statements.push(BatchStatement::PreparedStatement(
                self.st.checkpoint_put.clone(),
            ));
            values.push(CheckpointRow::Put {
                partition: p,
                key,
                value,
            });
        }
        for &key in &deletes {
            statements.push(BatchStatement::PreparedStatement(
                self.st.checkpoint_delete.clone(),
            ));
            values.push(CheckpointRow::Delete { partition: p, key });
        }
        // One partition: atomic and isolated without the batchlog a logged
        // batch would add.
        let batch = Batch::new_with_statements(BatchType::Unlogged, statements);
        let what = format!("{STATE_T}[{partition}].epoch");
        for _ in 0..MAX_LWT_ATTEMPTS {
            let (applied, stored) = self
                .timed("write_checkpoint", async {
                    let result = self.session.batch(&batch, &values).await?;
                    let (applied, stored) = lwt_outcome(result, "epoch")?;
                    Ok((applied, stored_bigint(stored, &what)?))
                })
                .await?;
            if applied {
                return Ok(());
            }
            match stored {
                Some(stored_epoch) if stored_epoch > write.epoch => {
                    if let Some(m) = &self.metrics {
                        m.checkpoint_fenced
                            .with_label_values(&[&partition.to_string()])
                            .inc();
                    }
                    return Err(StoreError::Fenced {
                        partition,
                        epoch: write.epoch,
                        stored_epoch,
                    });
                }
                // Never claimed, or by a lower epoch: take it over.
                stored => {
                    let expected = stored.map(|e| bigint(e, "epoch")).transpose()?;
                    if let Some(CheckpointRow::Update { expected: e, .. }) = values.first_mut() {
                        *e = expected;
                    }
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "checkpoint of partition {partition}: the epoch changed under each of \
             {MAX_LWT_ATTEMPTS} attempts"
        )))
    }

    async fn get_intake(&self, order_id: &str) -> Result<Option<IntakeRecord>, StoreError> {
        self.get_record("get_intake", &self.st.get_intake, INTAKE_T, order_id)
            .await
    }

    /// `INSERT ... IF NOT EXISTS`: the first record of an order id wins
    /// across instances; a later put gets the stored one from the LWT answer.
    async fn put_intake(&self, record: IntakeRecord) -> Result<IntakeRecord, StoreError> {
        let id = record.order_id.as_str();
        let bytes = encode(&record, INTAKE_T, id)?;
        let (applied, stored) = self
            .timed("put_intake", async {
                let result = self
                    .session
                    .execute_unpaged(&self.st.put_intake, (id, bytes.as_slice()))
                    .await?;
                lwt_outcome(result, "record")
            })
            .await?;
        if applied {
            return Ok(record);
        }
        let what = format!("{INTAKE_T}[{id:?}]");
        let stored = self
            .timed("put_intake", async { stored_blob(stored, &what) })
            .await?;
        decode(&stored, INTAKE_T, id)
    }

    async fn sink_positions(&self, sink: &str) -> Result<BTreeMap<u32, u64>, StoreError> {
        self.timed("sink_positions", async {
            let mut rows = self
                .session
                .execute_iter(self.st.sink_positions.clone(), (sink,))
                .await?
                .rows_stream::<(i32, Option<i64>)>()?;
            let mut positions = BTreeMap::new();
            while let Some((partition, next)) = rows.try_next().await? {
                let partition = log_partition(partition);
                let what = format!("{SINK_POSITIONS_T}[{sink:?}/{partition}]");
                let next = next.ok_or_else(|| Failure::Corrupt(format!("{what}: null")))?;
                positions.insert(partition, unsigned(next, &what)?);
            }
            Ok(positions)
        })
        .await
    }

    /// Reads the views of the events' orders (concurrently), applies the
    /// events in order, writes the changed views (each timestamped with
    /// its last seq, so an older view never overwrites a newer one), then
    /// moves the positions forward.
    async fn apply_tracking(
        &self,
        sink: &str,
        positions: &[(u32, u64)],
        events: &[StatusEvent],
    ) -> Result<Vec<Applied>, StoreError> {
        // Each order's view is read once, updated by all of its events in
        // the batch, and written once.
        let mut slot_of: HashMap<&str, usize> = HashMap::new();
        let mut ids: Vec<&str> = Vec::new();
        for event in events {
            slot_of.entry(&event.order_id).or_insert_with(|| {
                ids.push(&event.order_id);
                ids.len() - 1
            });
        }
        let reads: Vec<_> = ids
            .iter()
            .map(|id| async move {
                let view: Option<TrackingView> = self
                    .get_record("tracking_read", &self.st.get_tracking, TRACKING_T, id)
                    .await?;
                Ok::<_, StoreError>(view.map(|v| v.keyed(id)))
            })
            .collect();
        let mut views: Vec<Option<TrackingView>> = futures::stream::iter(reads)
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        let mut dirty = vec![false; ids.len()];
        let mut applied = Vec::new();
        for event in events {
            let slot = slot_of[event.order_id.as_str()];
            let view = &mut views[slot];
            let history = view.as_ref().map(|v| v.history.as_slice());
            let prev_at_ms = history.and_then(|h| h.last()).map(|h| h.at_ms);
            let placed_at_ms = history.and_then(|h| h.first()).map(|h| h.at_ms);
            if TrackingView::apply(view, event) {
                dirty[slot] = true;
                applied.push(Applied {
                    event: event.clone(),
                    prev_at_ms,
                    placed_at_ms,
                });
            }
        }
        let mut changed = Vec::new();
        for ((id, view), dirty) in ids.iter().zip(&views).zip(dirty) {
            if let (Some(view), true) = (view, dirty) {
                let last_seq = view.history.last().map_or(0, |h| h.seq);
                changed.push((*id, encode(view, TRACKING_T, id)?, i64::from(last_seq)));
            }
        }
        let writes: Vec<_> = changed
            .iter()
            .map(|(id, bytes, last_seq)| {
                self.timed("tracking_write", async move {
                    self.session
                        .execute_unpaged(&self.st.put_tracking, (*id, bytes.as_slice(), *last_seq))
                        .await?;
                    Ok(())
                })
            })
            .collect();
        futures::stream::iter(writes)
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        self.advance_positions(sink, positions).await?;
        Ok(applied)
    }

    async fn get_tracking(&self, order_id: &str) -> Result<Option<TrackingView>, StoreError> {
        let view: Option<TrackingView> = self
            .get_record("get_tracking", &self.st.get_tracking, TRACKING_T, order_id)
            .await?;
        Ok(view.map(|v| v.keyed(order_id)))
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

    /// A plain upsert, durable (at the configured consistency) on return.
    async fn put_contact(&self, order_id: &str, email: &str) -> Result<(), StoreError> {
        self.timed("put_contact", async {
            self.session
                .execute_unpaged(&self.st.put_contact, (order_id, email))
                .await?;
            Ok(())
        })
        .await
    }

    async fn get_contacts(&self, order_ids: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        let reads: Vec<_> = order_ids
            .iter()
            .map(|id| async move {
                let email = self
                    .get_one::<String>("get_contacts", &self.st.get_contact, (id,))
                    .await?;
                Ok::<_, StoreError>(email.flatten())
            })
            .collect();
        futures::stream::iter(reads)
            .buffered(CONCURRENCY)
            .try_collect()
            .await
    }

    async fn notified(&self, keys: &[(String, String)]) -> Result<Vec<Option<u32>>, StoreError> {
        let reads: Vec<_> = keys
            .iter()
            .map(|(target, order_id)| async move {
                let seq = self
                    .get_one::<i32>("notified", &self.st.get_notified, (target, order_id))
                    .await?;
                seq.flatten()
                    .map(|s| {
                        u32::try_from(s).map_err(|_| {
                            StoreError::Corrupt(format!(
                                "{NOTIFIED_T}[{target:?}/{order_id:?}]: negative seq {s}"
                            ))
                        })
                    })
                    .transpose()
            })
            .collect();
        futures::stream::iter(reads)
            .buffered(CONCURRENCY)
            .try_collect()
            .await
    }

    /// Writes each settled seq timestamped with itself (the larger seq
    /// wins in the server), then moves the positions forward.
    async fn record_notified(
        &self,
        sink: &str,
        positions: &[(u32, u64)],
        settled: &[Notified],
    ) -> Result<(), StoreError> {
        let writes: Vec<_> = settled
            .iter()
            .map(|n| {
                self.timed("record_notified", async move {
                    let seq = i32::try_from(n.seq).map_err(|_| {
                        StoreError::Unavailable(format!(
                            "notification seq {} does not fit a CQL int",
                            n.seq
                        ))
                    })?;
                    self.session
                        .execute_unpaged(
                            &self.st.put_notified,
                            (&n.target, &n.order_id, seq, i64::from(seq)),
                        )
                        .await?;
                    Ok(())
                })
            })
            .collect();
        futures::stream::iter(writes)
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        self.advance_positions(sink, positions).await
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

    /// A write's rows go to the batch in key order, the last put of a key
    /// winning, and a key both put and deleted only deleted.
    #[test]
    fn checkpoint_rows_dedupe_puts_and_deletes() {
        let write = CheckpointWrite {
            partition: 0,
            epoch: 1,
            next_offset: 1,
            puts: [("b", "1"), ("a", "1"), ("b", "2"), ("c", "1")]
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
            deletes: vec![b"c".to_vec(), b"d".to_vec(), b"c".to_vec()],
        };
        let (puts, deletes) = checkpoint_rows(&write);
        assert_eq!(
            puts.into_iter().collect::<Vec<_>>(),
            vec![(&b"a"[..], &b"1"[..]), (&b"b"[..], &b"2"[..])]
        );
        assert_eq!(
            deletes.into_iter().collect::<Vec<_>>(),
            vec![&b"c"[..], &b"d"[..]]
        );
    }

    /// Log partitions map onto CQL ints and back, the whole u32 range.
    #[test]
    fn partitions_roundtrip_through_cql_int() {
        for p in [0, 1, i32::MAX as u32, i32::MAX as u32 + 1, u32::MAX] {
            assert_eq!(log_partition(cql_partition(p)), p);
        }
        assert_eq!(cql_partition(u32::MAX), -1);
    }
}
