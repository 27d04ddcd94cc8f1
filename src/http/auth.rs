//! Credentials: scoped API tokens (operators, analysts, upstream systems,
//! the `orderflow` client commands) and per-order tracking tokens. None is
//! ever logged.
//!
//! An API token has one [`Role`]; a route needs a [`Scope`], which some
//! roles hold:
//!
//! | scope | routes | admin | reader | producer |
//! |---|---|---|---|---|
//! | [`Scope::ReadOrders`] | `GET /v1/orders/{id}`, `…/events`, `/track/{id}` (any order, no tracking token) | ✓ | ✓ | |
//! | [`Scope::ReadStock`] | `GET /v1/inventory/{sku}` | ✓ | ✓ | |
//! | [`Scope::WriteStock`] | `PUT /v1/inventory/{sku}` | ✓ | | |
//! | [`Scope::ParkLane`] | `/v1/admin/parked…` | ✓ | | |
//! | [`Scope::Produce`] | `POST /v1/admin/produce` | ✓ | | ✓ |
//! | [`Scope::TrackingTokens`] | `GET /v1/orders/{id}/tracking-token` | ✓ | | ✓ |
//!
//! Tokens come from the environment or from files ([`Credentials::load`]),
//! several per role at once so that one can be rotated without downtime.
//! Only their SHA-256 digests are kept, and a presented token is compared
//! with every one of them in constant time ([`Credentials::role_of`]).

use std::path::{Path, PathBuf};

use axum::http::{HeaderMap, header};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::AppState;
use super::problem::Problem;
use crate::config::{AuthConfig, Secret};

/// Most tokens one role may have at once: enough for a rotation and a few
/// systems holding a token each, few enough that every request compares
/// against all of them cheaply.
pub const MAX_TOKENS_PER_ROLE: usize = 16;
/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 256;
/// Largest token file read, in bytes (tokens, comments and blank lines).
pub const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;
/// Tokens shorter than this are accepted (for compatibility: the admin
/// token never had a minimum) but warned about at start.
pub const SHORT_TOKEN_BYTES: usize = 16;

/// What an API token may do. Closed: a route's [`Scope`] names the roles
/// that hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Operators: everything (stock, park lane, produce, any order).
    Admin,
    /// Analysts and support: read any order and any stock level.
    Reader,
    /// Upstream systems: produce orders, fetch orders' tracking tokens.
    Producer,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Reader, Role::Producer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Reader => "reader",
            Role::Producer => "producer",
        }
    }

    /// The variable holding this role's tokens, comma-separated.
    pub fn env_var(self) -> &'static str {
        match self {
            Role::Admin => crate::config::ADMIN_TOKEN_ENV,
            Role::Reader => "ORDERFLOW_READER_TOKEN",
            Role::Producer => "ORDERFLOW_PRODUCER_TOKEN",
        }
    }

    /// The variable naming a file of this role's tokens, one a line.
    pub fn file_env_var(self) -> &'static str {
        match self {
            Role::Admin => "ORDERFLOW_ADMIN_TOKEN_FILE",
            Role::Reader => "ORDERFLOW_READER_TOKEN_FILE",
            Role::Producer => "ORDERFLOW_PRODUCER_TOKEN_FILE",
        }
    }

    /// The `[auth]` key naming a file of this role's tokens.
    pub fn config_key(self) -> &'static str {
        match self {
            Role::Admin => "auth.admin_token_file",
            Role::Reader => "auth.reader_token_file",
            Role::Producer => "auth.producer_token_file",
        }
    }

    fn config_file(self, config: &AuthConfig) -> Option<&PathBuf> {
        match self {
            Role::Admin => config.admin_token_file.as_ref(),
            Role::Reader => config.reader_token_file.as_ref(),
            Role::Producer => config.producer_token_file.as_ref(),
        }
    }

    /// 1, 2, 3: the constant-time lookup's result (0 is no role).
    fn code(self) -> u8 {
        match self {
            Role::Admin => 1,
            Role::Reader => 2,
            Role::Producer => 3,
        }
    }

    fn from_code(code: u8) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a route does, as far as credentials go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Read any order (and its events, and its tracking page) without its
    /// tracking token.
    ReadOrders,
    /// Read a SKU's stock counters.
    ReadStock,
    /// Set a SKU's available stock.
    WriteStock,
    /// List, show, retry and drop parked records.
    ParkLane,
    /// Write orders to the log in bulk (`POST /v1/admin/produce`).
    Produce,
    /// Get the tracking token of any order id.
    TrackingTokens,
}

impl Scope {
    /// The roles holding this scope.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Scope::ReadOrders | Scope::ReadStock => &[Role::Admin, Role::Reader],
            Scope::WriteStock | Scope::ParkLane => &[Role::Admin],
            Scope::Produce | Scope::TrackingTokens => &[Role::Admin, Role::Producer],
        }
    }

    pub fn allows(self, role: Role) -> bool {
        self.roles().contains(&role)
    }

    /// What the scope lets a caller do, for a refusal's detail.
    pub fn action(self) -> &'static str {
        match self {
            Scope::ReadOrders => "read orders without their tracking token",
            Scope::ReadStock => "read stock",
            Scope::WriteStock => "change stock",
            Scope::ParkLane => "use the park lane",
            Scope::Produce => "produce orders",
            Scope::TrackingTokens => "get tracking tokens",
        }
    }
}

/// A configured token that cannot be used. Names where it came from (a
/// variable and its entry, or a file and its line), never its value.
#[derive(thiserror::Error, Debug)]
pub enum AuthError {
    #[error(
        "{role} tokens are set by both {first} and {second}: use one source, so that a rotation edits one list"
    )]
    TwoSources {
        role: Role,
        first: String,
        second: String,
    },
    #[error("cannot read the {role} token file {path}: {source}")]
    Read {
        role: Role,
        path: String,
        source: std::io::Error,
    },
    #[error("the {role} token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes")]
    FileTooLarge { role: Role, path: String },
    #[error("{source_name} holds no {role} token")]
    NoToken { role: Role, source_name: String },
    #[error(
        "{source_name} holds {count} {role} tokens; at most {MAX_TOKENS_PER_ROLE} per role are allowed"
    )]
    TooMany {
        role: Role,
        source_name: String,
        count: usize,
    },
    #[error("the {role} token at {at} is empty")]
    Empty { role: Role, at: String },
    #[error("the {role} token at {at} has {len} bytes; at most {MAX_TOKEN_BYTES} are allowed")]
    TooLong { role: Role, at: String, len: usize },
    #[error(
        "the {role} token at {at} holds a character other than visible ASCII (spaces and commas cannot be sent or listed)"
    )]
    BadCharacter { role: Role, at: String },
    #[error(
        "the {role} token at {at} is also the {other} token at {other_at}: each token must be listed once, in one role"
    )]
    Duplicate {
        role: Role,
        at: String,
        other: Role,
        other_at: String,
    },
}

/// One accepted token: its digest, never its value.
#[derive(Clone)]
struct Entry {
    digest: [u8; 32],
    role: Role,
}

/// The API tokens an instance accepts, by role. Its `Debug` shows only
/// how many each role has.
#[derive(Clone, Default)]
pub struct Credentials {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Credentials");
        for role in Role::ALL {
            d.field(role.as_str(), &self.count(role));
        }
        d.finish()
    }
}

/// The admin token alone, as `ORDERFLOW_ADMIN_TOKEN` was before roles
/// (`None`: no API token at all).
impl From<Option<Secret>> for Credentials {
    fn from(admin: Option<Secret>) -> Credentials {
        let entries = admin
            .iter()
            .map(|s| Entry {
                digest: digest(s.expose()),
                role: Role::Admin,
            })
            .collect();
        Credentials { entries }
    }
}

/// One token read from a source, with where it was (for errors).
struct Found {
    role: Role,
    at: String,
    token: String,
}

impl Credentials {
    /// No API token: every route that needs one answers 403.
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// Tokens given directly (tests, embedding), checked like loaded ones.
    pub fn new<'a>(
        tokens: impl IntoIterator<Item = (Role, &'a str)>,
    ) -> Result<Credentials, AuthError> {
        let mut found: Vec<Found> = Vec::new();
        for (role, token) in tokens {
            let n = found.iter().filter(|f| f.role == role).count() + 1;
            found.push(Found {
                role,
                at: format!("entry {n} of the given {role} tokens"),
                token: token.to_owned(),
            });
        }
        for role in Role::ALL {
            let count = found.iter().filter(|f| f.role == role).count();
            if count > MAX_TOKENS_PER_ROLE {
                return Err(AuthError::TooMany {
                    role,
                    source_name: format!("the given {role} tokens"),
                    count,
                });
            }
        }
        Credentials::from_found(found)
    }

    /// Every role's tokens from its one source: `ORDERFLOW_<ROLE>_TOKEN`
    /// (comma-separated), the file `ORDERFLOW_<ROLE>_TOKEN_FILE` names, or
    /// the file `auth.<role>_token_file` names (one token a line; blank
    /// lines and lines starting with `#` are skipped). Files are read now,
    /// at start. Logs how many tokens each role has and from where.
    pub fn load(config: &AuthConfig) -> Result<Credentials, AuthError> {
        Credentials::load_from(config, &|var| std::env::var(var).ok())
    }

    /// [`Credentials::load`] with `env` for the environment.
    pub fn load_from(
        config: &AuthConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Credentials, AuthError> {
        let set = |var: &str| env(var).filter(|v| !v.trim().is_empty());
        let mut found = Vec::new();
        for role in Role::ALL {
            let mut sources: Vec<(String, Source)> = Vec::new();
            if let Some(list) = set(role.env_var()) {
                sources.push((role.env_var().to_owned(), Source::List(list)));
            }
            if let Some(path) = set(role.file_env_var()) {
                sources.push((
                    format!("{} ({path})", role.file_env_var()),
                    Source::File(PathBuf::from(path)),
                ));
            }
            if let Some(path) = role.config_file(config) {
                sources.push((
                    format!("`{}` ({})", role.config_key(), path.display()),
                    Source::File(path.clone()),
                ));
            }
            let mut sources = sources.into_iter();
            let Some((name, source)) = sources.next() else {
                continue;
            };
            if let Some((second, _)) = sources.next() {
                return Err(AuthError::TwoSources {
                    role,
                    first: name,
                    second,
                });
            }
            let tokens = match source {
                Source::List(list) => list_tokens(role, &name, &list)?,
                Source::File(path) => file_tokens(role, &path)?,
            };
            if tokens.is_empty() {
                return Err(AuthError::NoToken {
                    role,
                    source_name: name,
                });
            }
            if tokens.len() > MAX_TOKENS_PER_ROLE {
                return Err(AuthError::TooMany {
                    role,
                    source_name: name,
                    count: tokens.len(),
                });
            }
            tracing::info!(role = %role, tokens = tokens.len(), source = %name, "API tokens loaded");
            for t in &tokens {
                if t.token.len() < SHORT_TOKEN_BYTES {
                    tracing::warn!(role = %role, at = %t.at, "an API token is shorter than {SHORT_TOKEN_BYTES} bytes: use at least 32 random characters");
                }
            }
            found.extend(tokens);
        }
        Credentials::from_found(found)
    }

    fn from_found(found: Vec<Found>) -> Result<Credentials, AuthError> {
        for t in &found {
            check_token(t)?;
        }
        // At start, so plain comparisons: no request is being answered.
        for (i, a) in found.iter().enumerate() {
            if let Some(b) = found[..i].iter().find(|b| b.token == a.token) {
                return Err(AuthError::Duplicate {
                    role: a.role,
                    at: a.at.clone(),
                    other: b.role,
                    other_at: b.at.clone(),
                });
            }
        }
        let entries = found
            .iter()
            .map(|t| Entry {
                digest: digest(&t.token),
                role: t.role,
            })
            .collect();
        Ok(Credentials { entries })
    }

    /// How many tokens `role` has.
    pub fn count(&self, role: Role) -> usize {
        self.entries.iter().filter(|e| e.role == role).count()
    }

    /// True when no role has a token.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The role of `presented`, if it is one of the tokens. Compares its
    /// SHA-256 digest with every token's in constant time and without an
    /// early exit, so neither which token matched, nor how much of a
    /// guess is right, nor a token's length shows in the timing.
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        let presented = digest(presented);
        let mut code = 0u8;
        for e in &self.entries {
            code.conditional_assign(&e.role.code(), e.digest[..].ct_eq(&presented[..]));
        }
        Role::from_code(code)
    }
}

enum Source {
    List(String),
    File(PathBuf),
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The entries of a comma-separated list, each trimmed.
fn list_tokens(role: Role, name: &str, list: &str) -> Result<Vec<Found>, AuthError> {
    let tokens: Vec<Found> = list
        .split(',')
        .enumerate()
        .map(|(i, t)| Found {
            role,
            at: format!("entry {} of {name}", i + 1),
            token: t.trim().to_owned(),
        })
        .collect();
    // Checked before the count, so a stray comma is named as such.
    for t in &tokens {
        if t.token.is_empty() {
            return Err(AuthError::Empty {
                role,
                at: t.at.clone(),
            });
        }
    }
    Ok(tokens)
}

/// The tokens of a file: one a line, trimmed; blank lines and `#` comments
/// skipped.
fn file_tokens(role: Role, path: &Path) -> Result<Vec<Found>, AuthError> {
    use std::io::Read as _;
    let shown = path.display().to_string();
    let read_error = |source| AuthError::Read {
        role,
        path: shown.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_TOKEN_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_TOKEN_FILE_BYTES {
        return Err(AuthError::FileTooLarge { role, path: shown });
    }
    let mut tokens = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let at = format!("line {} of {shown}", i + 1);
        let Ok(token) = std::str::from_utf8(line) else {
            return Err(AuthError::BadCharacter { role, at });
        };
        tokens.push(Found {
            role,
            at,
            token: token.to_owned(),
        });
    }
    Ok(tokens)
}

/// A token must be 1 to [`MAX_TOKEN_BYTES`] visible ASCII characters
/// without a comma: what `Authorization: Bearer` carries once trimmed, and
/// what a comma-separated list can hold.
fn check_token(t: &Found) -> Result<(), AuthError> {
    let (role, at) = (t.role, t.at.clone());
    if t.token.is_empty() {
        return Err(AuthError::Empty { role, at });
    }
    if t.token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::TooLong {
            role,
            at,
            len: t.token.len(),
        });
    }
    if !t.token.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(AuthError::BadCharacter { role, at });
    }
    Ok(())
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// `?token=...` on tracking routes.
#[derive(Deserialize, Default)]
pub struct TokenQuery {
    pub token: Option<String>,
}

/// The tracking token presented: the `Authorization` header first, else
/// the `token` query parameter.
pub fn presented_token<'a>(headers: &'a HeaderMap, query: &'a TokenQuery) -> Option<&'a str> {
    bearer(headers).or(query.token.as_deref().filter(|t| !t.is_empty()))
}

/// Lets a request in if its bearer token's role holds `scope`:
/// 403 `admin_disabled` when no role holding it has a token configured
/// (nothing could pass), 401 `unauthorized` for a missing or unknown
/// token, 403 `forbidden` for a token whose role does not hold it.
pub fn require(state: &AppState, headers: &HeaderMap, scope: Scope) -> Result<Role, Problem> {
    let credentials = &state.credentials;
    if scope.roles().iter().all(|r| credentials.count(*r) == 0) {
        return Err(Problem::admin_disabled(scope.roles()));
    }
    let Some(role) = bearer(headers).and_then(|t| credentials.role_of(t)) else {
        return Err(Problem::unauthorized(scope.roles()));
    };
    if !scope.allows(role) {
        return Err(Problem::forbidden(role, scope));
    }
    Ok(role)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn load(config: &AuthConfig, vars: &[(&str, &str)]) -> Result<Credentials, AuthError> {
        Credentials::load_from(config, &env(vars))
    }

    /// Each role's comma-separated tokens all match as that role; prefixes, extensions and other values match nothing.
    #[test]
    fn roles_from_the_environment() {
        let c = load(
            &AuthConfig::default(),
            &[
                (
                    "ORDERFLOW_ADMIN_TOKEN",
                    "admin-new-0123456789, admin-old-0123456789",
                ),
                ("ORDERFLOW_READER_TOKEN", "reader-0123456789"),
                ("ORDERFLOW_PRODUCER_TOKEN", "producer-0123456789"),
            ],
        )
        .unwrap();
        assert_eq!(c.role_of("admin-new-0123456789"), Some(Role::Admin));
        assert_eq!(c.role_of("admin-old-0123456789"), Some(Role::Admin));
        assert_eq!(c.role_of("reader-0123456789"), Some(Role::Reader));
        assert_eq!(c.role_of("producer-0123456789"), Some(Role::Producer));
        for wrong in [
            "",
            "admin-new-012345678",
            "admin-new-01234567890",
            "Reader-0123456789",
        ] {
            assert_eq!(c.role_of(wrong), None, "{wrong:?}");
        }
        let shown = format!("{c:?}");
        assert_eq!(shown, "Credentials { admin: 2, reader: 1, producer: 1 }");
        assert!(
            load(&AuthConfig::default(), &[("ORDERFLOW_ADMIN_TOKEN", "  ")])
                .unwrap()
                .is_empty()
        );
    }

    /// The admin token alone, as before roles, is one admin token.
    #[test]
    fn a_lone_admin_token_is_an_admin() {
        let c = Credentials::from(Some(Secret::new("hunter2-admin")));
        assert_eq!(c.role_of("hunter2-admin"), Some(Role::Admin));
        assert_eq!((c.count(Role::Reader), c.count(Role::Producer)), (0, 0));
        assert!(Credentials::from(None).is_empty());
    }

    /// Token files (one a line, comments skipped) from `[auth]` or `_FILE`; two sources for a role are refused.
    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("readers");
        std::fs::write(
            &path,
            "# support desk\nreader-a-0123456789\r\n\n  reader-b-0123456789  \n",
        )
        .unwrap();
        let config = AuthConfig {
            reader_token_file: Some(path.clone()),
            ..AuthConfig::default()
        };
        let c = load(&config, &[]).unwrap();
        assert_eq!(c.count(Role::Reader), 2);
        assert_eq!(c.role_of("reader-b-0123456789"), Some(Role::Reader));
        let by_env = load(
            &AuthConfig::default(),
            &[("ORDERFLOW_READER_TOKEN_FILE", path.to_str().unwrap())],
        )
        .unwrap();
        assert_eq!(by_env.role_of("reader-a-0123456789"), Some(Role::Reader));
        let e = load(&config, &[("ORDERFLOW_READER_TOKEN", "x-0123456789abcdef")]).unwrap_err();
        assert!(
            matches!(
                e,
                AuthError::TwoSources {
                    role: Role::Reader,
                    ..
                }
            ),
            "{e}"
        );
        let text = e.to_string();
        assert!(
            text.contains("ORDERFLOW_READER_TOKEN") && text.contains("auth.reader_token_file"),
            "{text}"
        );
        let missing = AuthConfig {
            admin_token_file: Some(dir.path().join("absent")),
            ..AuthConfig::default()
        };
        assert!(matches!(load(&missing, &[]), Err(AuthError::Read { .. })));
        std::fs::write(&path, "# nothing yet\n\n").unwrap();
        assert!(matches!(load(&config, &[]), Err(AuthError::NoToken { .. })));
        std::fs::write(&path, vec![b'a'; MAX_TOKEN_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            load(&config, &[]),
            Err(AuthError::FileTooLarge { .. })
        ));
    }

    /// Every limit is refused with where the token was, never its value.
    #[test]
    fn limits_are_explicit() {
        let secret = "s3cret-value-0123456789";
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{secret},,b-0123456789abcdef"),
                "entry 2 of ORDERFLOW_ADMIN_TOKEN is empty",
            ),
            (
                format!("{secret}, {}", "x".repeat(MAX_TOKEN_BYTES + 1)),
                "has 257 bytes; at most 256",
            ),
            (format!("{secret} inner"), "other than visible ASCII"),
            (
                format!("{secret},{secret}"),
                "is also the admin token at entry 1",
            ),
            (
                vec![secret; MAX_TOKENS_PER_ROLE + 1].join(","),
                "holds 17 admin tokens; at most 16",
            ),
        ];
        for (value, want) in cases {
            let e = load(&AuthConfig::default(), &[("ORDERFLOW_ADMIN_TOKEN", &value)]).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(want), "{value:?}: {text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
        let e = load(
            &AuthConfig::default(),
            &[
                ("ORDERFLOW_ADMIN_TOKEN", secret),
                ("ORDERFLOW_READER_TOKEN", secret),
            ],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains(
                "reader token at entry 1 of ORDERFLOW_READER_TOKEN is also the admin token"
            ),
            "{e}"
        );
        assert!(Credentials::new([(Role::Reader, "a,b")]).is_err());
        let many = vec![(Role::Producer, "p"); MAX_TOKENS_PER_ROLE + 1];
        assert!(matches!(
            Credentials::new(many),
            Err(AuthError::TooMany { .. })
        ));
    }

    /// Which roles hold which scope: the table of the module's doc.
    #[test]
    fn scopes_by_role() {
        use Role::*;
        use Scope::*;
        let table = [
            (ReadOrders, [true, true, false]),
            (ReadStock, [true, true, false]),
            (WriteStock, [true, false, false]),
            (ParkLane, [true, false, false]),
            (Produce, [true, false, true]),
            (TrackingTokens, [true, false, true]),
        ];
        for (scope, allowed) in table {
            for (role, want) in [Admin, Reader, Producer].into_iter().zip(allowed) {
                assert_eq!(scope.allows(role), want, "{scope:?} {role:?}");
            }
        }
    }
}
