//! A secret read from the environment or a file: compared in constant
//! time, never printed (its `Debug` is redacted).

use std::path::Path;

use super::ConfigError;

/// A secret from the environment (admin token, API keys). Its `Debug` and
/// `Display` never show it, and comparison takes constant time.
#[derive(Clone)]
pub struct Secret(String);
/// Equality is [`Secret::matches`]: a derived `==` would stop at the first
/// differing byte and leak, through timing, how much of a guess is right.
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.matches(&other.0)
    }
}
impl Eq for Secret {}
impl Secret {
    /// `None` for an absent or empty value.
    pub fn from_env(var: &str) -> Option<Secret> {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret)
    }

    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The variable `env`, else the trimmed content of `file` (the config
    /// key `key` names it). Errors say where it was looked for, never what
    /// was found.
    pub fn from_env_or_file(
        env: &str,
        file: Option<&Path>,
        key: &str,
    ) -> Result<Secret, ConfigError> {
        if let Some(secret) = Secret::from_env(env) {
            return Ok(secret);
        }
        let Some(path) = file else {
            return Err(ConfigError::Invalid(format!("set {env} or `{key}`")));
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let value = text.trim();
        if value.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "`{key}` {} is empty",
                path.display()
            )));
        }
        Ok(Secret::new(value))
    }

    /// Constant-time comparison with a presented value.
    pub fn matches(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        // Hash both sides so neither length nor content leaks through timing.
        use sha2::{Digest, Sha256};
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(presented.as_bytes());
        a.ct_eq(&b).into()
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
#[cfg(test)]
mod secret_tests {
    use super::*;

    /// A secret never prints and compares only equal to itself.
    #[test]
    fn redacted_and_constant_time() {
        let s = Secret::new("hunter2-admin");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(s.matches("hunter2-admin"));
        assert!(!s.matches("hunter2-admiN"));
        assert!(!s.matches(""));
    }

    /// `==` between secrets takes the constant-time path too: equal only
    /// to the same value, never to a prefix, an extension or a near miss.
    #[test]
    fn equality_is_the_constant_time_match() {
        let s = Secret::new("hunter2-admin");
        assert_eq!(s, Secret::new("hunter2-admin"));
        for other in ["hunter2-admi", "hunter2-admin2", "Hunter2-admin", ""] {
            assert_ne!(s, Secret::new(other), "{other:?}");
        }
    }
}
