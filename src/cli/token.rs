//! `orderflow token ID`: an order's tracking token, derived here with the
//! key the instances of this configuration use (`crate::app::token_keys`),
//! so the customer of an order an upstream system wrote to the log can
//! follow it. A running instance answers the same on
//! `GET /v1/orders/{id}/tracking-token`.

use std::sync::Arc;

use anyhow::Context as _;

use super::CliError;
use crate::config::Config;
use crate::domain::order::valid_id;
use crate::domain::pan::contains_pan;
use crate::pipeline::store::StateStore;
use crate::pipeline::store::embedded::EmbeddedStore;
use crate::pipeline::store::scylla::ScyllaStore;
use crate::pipeline::tokens::TokenKeys;

/// Prints the token of `id` on one line.
pub async fn print(config: &Config, id: &str) -> Result<bool, CliError> {
    if !valid_id(id) || contains_pan(id.as_bytes()) {
        return Err(CliError::Usage(
            "an order id must match [A-Za-z0-9._:-]{1,64} and hold no card number".into(),
        ));
    }
    let keys = keys(config).await?;
    println!("{}", keys.token(id));
    Ok(true)
}

/// The configured key (no store opened), else the state store's.
async fn keys(config: &Config) -> Result<TokenKeys, CliError> {
    let (current, previous) = config.tokens.keys()?;
    if let Some((key, source)) = current {
        return TokenKeys::new(key, previous, &source).map_err(|e| CliError::Usage(e.to_string()));
    }
    // Held until the key is read, so no instance starts on it meanwhile.
    let mut _lock = None;
    let store: Arc<dyn StateStore> = match &config.scylla {
        Some(s) => {
            Arc::new(ScyllaStore::connect(s, None).await.context(
                "cannot open the ScyllaDB state store, which holds the tracking token key",
            )?)
        }
        None => {
            let path = config.data_dir.join("state.redb");
            if !path.exists() {
                return Err(CliError::Failed(anyhow::anyhow!(
                    "no state store at {}: the tracking token key is made by the first `orderflow run` on this data directory (or set ORDERFLOW_TOKEN_SECRET / `tokens.secret_file` as the instances have it)",
                    path.display()
                )));
            }
            _lock = Some(crate::app::lock_data_dir(&config.data_dir).context(
                "the tracking token key is in this data directory's state store, which the running instance holds: \
                 ask it (GET /v1/orders/{id}/tracking-token with a producer or admin token), \
                 or configure the key for both (ORDERFLOW_TOKEN_SECRET or `tokens.secret_file`)",
            )?);
            Arc::new(EmbeddedStore::open(&path).context("cannot open the state store")?)
        }
    };
    Ok(crate::app::token_keys(config, store.as_ref()).await?)
}
