//! The schema: tables derived from their column lists, the check of an
//! existing keyspace against them, and `orderflow migrate`.

use std::collections::HashMap;

use scylla::client::session::Session;
use scylla::response::query_result::QueryResult;

use super::*;
use crate::config::ScyllaConfig;
use crate::pipeline::store::StoreError;

pub(super) const SNAPSHOTS_T: &str = "snapshots";
pub(super) const BLOBS_T: &str = "snapshot_blobs";
pub(super) const SECRETS_T: &str = "secrets";

/// Tables of the per-order layout of earlier versions: `migrate` names
/// them (nothing reads them any more) but never drops them itself.
pub(super) const LEGACY_TABLES: [&str; 7] = [
    "partition_state",
    "intake",
    "tracking",
    "sink_positions",
    "contacts",
    "notified",
    "partition_meta",
];

/// A column of the schema: name, CQL type, and its kind as
/// `system_schema.columns` lists it.
pub(super) type Column = (&'static str, &'static str, &'static str);

/// A table of the schema. `CREATE TABLE` is derived from the columns, so
/// the statement and the check of an existing table cannot disagree. No
/// table sets a TTL: nothing here expires by time (a blob is deleted when
/// the snapshot that replaced it is committed, a row is overwritten), and
/// a TTL that ran out under a snapshot still referencing its blob would
/// lose state.
pub(super) struct TableDef {
    pub(super) name: &'static str,
    pub(super) columns: &'static [Column],
    /// Table options, set at creation and again by every `migrate`.
    pub(super) options: &'static str,
}

pub(super) const TABLES: [TableDef; 3] = [
    TableDef {
        name: SNAPSHOTS_T,
        columns: &[
            ("scope", "tinyint", "partition_key"),
            ("partition", "int", "partition_key"),
            ("epoch", "bigint", "regular"),
            ("next_offset", "bigint", "regular"),
            ("manifest", "blob", "regular"),
        ],
        // One small row per partition, overwritten by every commit and
        // read at every claim: leveled compaction keeps a row's versions in
        // few SSTables, so reads stay cheap however often it is written.
        // Nothing here is ever deleted, so gc_grace_seconds does not matter.
        options: "compaction = {'class': 'LeveledCompactionStrategy'}",
    },
    TableDef {
        name: BLOBS_T,
        columns: &[
            ("scope", "tinyint", "partition_key"),
            ("partition", "int", "partition_key"),
            ("epoch", "bigint", "partition_key"),
            ("id", "bigint", "partition_key"),
            ("data", "blob", "regular"),
        ],
        // Written once, deleted whole when a snapshot no longer references
        // them; no read ever touches a deleted blob. gc_grace_seconds is one
        // day instead of ten, so their partition tombstones are purged
        // sooner (a node down for longer must be repaired before it comes
        // back, the usual rule); unchecked tombstone compaction lets a
        // single SSTable full of them be compacted away on its own.
        options: "gc_grace_seconds = 86400 AND compaction = {'class': \
                  'SizeTieredCompactionStrategy', 'unchecked_tombstone_compaction': 'true'}",
    },
    TableDef {
        name: SECRETS_T,
        columns: &[
            ("name", "text", "partition_key"),
            ("value", "blob", "regular"),
        ],
        // A handful of rows, written once.
        options: "comment = 'orderflow secrets: written once, never deleted'",
    },
];

impl TableDef {
    /// `CREATE TABLE IF NOT EXISTS ks.name (...) WITH options`.
    pub(super) fn create(&self, ks: &str) -> String {
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|(name, ty, _)| format!("{name} {ty}"))
            .collect();
        let keys: Vec<&str> = self
            .columns
            .iter()
            .filter(|(_, _, kind)| *kind == "partition_key")
            .map(|(name, _, _)| *name)
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.{} ({}, PRIMARY KEY (({}))) WITH {}",
            self.name,
            columns.join(", "),
            keys.join(", "),
            self.options
        )
    }
}

/// The keyspace name as CQL stores it. It is spliced into statements, so
/// it is checked here too (not only by `Config::validate`).
pub(super) fn keyspace_of(config: &ScyllaConfig) -> Result<String, StoreError> {
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
pub(super) async fn schema_query(
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
pub(super) async fn schema_columns(
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
pub(super) async fn check_schema(session: &Session, ks: &str) -> Result<(), StoreError> {
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

/// Drops the keyspace with every table in it (the bench's own keyspace
/// when a run ends; no command of an operator's does this).
pub async fn drop_keyspace(config: &ScyllaConfig) -> Result<(), StoreError> {
    let ks = keyspace_of(config)?;
    let session = open_session(config, &ks).await?;
    let what = format!("dropping keyspace {ks}");
    schema_query(&session, &what, format!("DROP KEYSPACE IF EXISTS {ks}")).await?;
    Ok(())
}

/// Creates the keyspace (`NetworkTopologyStrategy`, `scylla.replication_factor`
/// in every datacenter) and every table unless they exist, sets every
/// table's options again (an older keyspace gets the current ones), waits
/// until every node agrees on the schema, and checks it. Idempotent.
/// Returns one line per thing it did or found worth saying.
pub async fn migrate(config: &ScyllaConfig) -> Result<Vec<String>, StoreError> {
    let ks = keyspace_of(config)?;
    let session = open_session(config, &ks).await?;
    let before = schema_columns(&session, &ks).await?;
    let mut report = Vec::new();
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
        report.push(format!(
            "keyspace {ks} (NetworkTopologyStrategy, replication_factor {rf})"
        ));
    }
    let existed = |name: &str| {
        before
            .as_ref()
            .is_some_and(|cols| cols.keys().any(|(t, _)| t == name))
    };
    for table in &TABLES {
        let name = table.name;
        schema_query(
            &session,
            &format!("creating table {ks}.{name}"),
            table.create(&ks),
        )
        .await?;
        schema_query(
            &session,
            &format!("setting the options of {ks}.{name}"),
            format!("ALTER TABLE {ks}.{name} WITH {}", table.options),
        )
        .await?;
        if !existed(name) {
            report.push(format!("table {ks}.{name}"));
        }
    }
    let legacy: Vec<&str> = LEGACY_TABLES.into_iter().filter(|t| existed(t)).collect();
    if !legacy.is_empty() {
        report.push(format!(
            "note: {ks} still has the per-order tables of an earlier version ({}); nothing reads \
             them any more: drop them with DROP TABLE once no instance of that version runs",
            legacy.join(", ")
        ));
    }
    session.await_schema_agreement().await.map_err(|e| {
        StoreError::Unavailable(format!("waiting for schema agreement on {ks}: {e}"))
    })?;
    check_schema(&session, &ks).await?;
    Ok(report)
}
