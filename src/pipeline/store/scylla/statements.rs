//! Every statement, prepared once at connect (token-aware routing then
//! sends each request to a replica of its partition).

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use super::*;
use crate::pipeline::store::StoreError;

/// Every statement the store runs, prepared once at connect.
pub(super) struct Statements {
    pub(super) read_row: PreparedStatement,
    pub(super) first_claim: PreparedStatement,
    pub(super) claim: PreparedStatement,
    pub(super) commit: PreparedStatement,
    pub(super) put_blob: PreparedStatement,
    pub(super) get_blob: PreparedStatement,
    pub(super) delete_blob: PreparedStatement,
    pub(super) get_secret: PreparedStatement,
    pub(super) create_secret: PreparedStatement,
}

impl Statements {
    pub(super) async fn prepare(session: &Session, ks: &str) -> Result<Statements, StoreError> {
        // `idempotent` marks what the retry policy may repeat (module comment).
        let prepare = async |cql: String, idempotent: bool| {
            let mut statement = session.prepare(cql.as_str()).await.map_err(|e| {
                StoreError::Unavailable(format!("preparing statement `{cql}`: {e}"))
            })?;
            statement.set_is_idempotent(idempotent);
            Ok::<_, StoreError>(statement)
        };
        let row = "WHERE scope = ? AND partition = ?";
        let blob = "WHERE scope = ? AND partition = ? AND epoch = ? AND id = ?";
        Ok(Statements {
            read_row: prepare(
                format!("SELECT epoch, next_offset, manifest FROM {ks}.{SNAPSHOTS_T} {row}"),
                true,
            )
            .await?,
            first_claim: prepare(
                format!(
                    "INSERT INTO {ks}.{SNAPSHOTS_T} (scope, partition, epoch) VALUES (?, ?, 1) \
                     IF NOT EXISTS"
                ),
                false,
            )
            .await?,
            claim: prepare(
                format!("UPDATE {ks}.{SNAPSHOTS_T} SET epoch = ? {row} IF epoch = ?"),
                false,
            )
            .await?,
            commit: prepare(
                format!(
                    "UPDATE {ks}.{SNAPSHOTS_T} SET next_offset = ?, manifest = ? {row} IF epoch = ?"
                ),
                false,
            )
            .await?,
            put_blob: prepare(
                format!(
                    "INSERT INTO {ks}.{BLOBS_T} (scope, partition, epoch, id, data) \
                     VALUES (?, ?, ?, ?, ?)"
                ),
                true,
            )
            .await?,
            get_blob: prepare(format!("SELECT data FROM {ks}.{BLOBS_T} {blob}"), true).await?,
            delete_blob: prepare(format!("DELETE FROM {ks}.{BLOBS_T} {blob}"), true).await?,
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
        })
    }
}
