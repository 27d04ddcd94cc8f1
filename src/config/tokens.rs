//! `[tokens]` (the tracking-token key) and `[auth]` (API tokens by role).

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Secret};

/// Environment variable with the key tracking tokens are derived with.
pub const TOKEN_SECRET_ENV: &str = "ORDERFLOW_TOKEN_SECRET";
/// Environment variable with the previous key, accepted during a rotation.
pub const TOKEN_SECRET_PREVIOUS_ENV: &str = "ORDERFLOW_TOKEN_SECRET_PREVIOUS";
/// `[tokens]`: where the tracking token key comes from. The environment
/// wins over the files; with neither, a random key kept in the state store
/// (shared by every instance) is used.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TokensConfig {
    pub secret_file: Option<PathBuf>,
    pub previous_secret_file: Option<PathBuf>,
}
/// A configured key and where it came from (a variable's name or a path).
pub type SourcedKey = (Vec<u8>, String);
impl TokensConfig {
    /// `(current, previous)` keys from the environment or the files, with
    /// where they came from; `None` for the current key when neither is set.
    pub fn keys(&self) -> Result<(Option<SourcedKey>, Option<Vec<u8>>), ConfigError> {
        let read = |env: &str, file: &Option<PathBuf>| -> Result<Option<SourcedKey>, ConfigError> {
            if let Some(secret) = Secret::from_env(env) {
                return Ok(Some((secret.expose().as_bytes().to_vec(), env.to_owned())));
            }
            let Some(path) = file else { return Ok(None) };
            let text = std::fs::read(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let key = text.trim_ascii_end().to_vec();
            Ok(Some((key, path.display().to_string())))
        };
        let current = read(TOKEN_SECRET_ENV, &self.secret_file)?;
        let previous = read(TOKEN_SECRET_PREVIOUS_ENV, &self.previous_secret_file)?;
        if current.is_none() && previous.is_some() {
            return Err(ConfigError::Invalid(format!(
                "a previous tracking token key is set without a current one: set {TOKEN_SECRET_ENV} or `tokens.secret_file`"
            )));
        }
        Ok((current, previous.map(|(key, _)| key)))
    }
}
/// `[auth]`: files of API tokens, one a line, per role; read at start by
/// `crate::http::auth::Credentials::load`. A role's tokens may instead come
/// from `ORDERFLOW_<ROLE>_TOKEN` (comma-separated) or the file
/// `ORDERFLOW_<ROLE>_TOKEN_FILE` names; one source per role.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub admin_token_file: Option<PathBuf>,
    pub reader_token_file: Option<PathBuf>,
    pub producer_token_file: Option<PathBuf>,
}
/// Environment variable holding the admin tokens (comma-separated; see
/// `crate::http::auth::Role`).
pub const ADMIN_TOKEN_ENV: &str = "ORDERFLOW_ADMIN_TOKEN";
