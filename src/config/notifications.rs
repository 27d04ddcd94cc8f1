//! The `[notifications]` section of the configuration.
//! Absent: no notifications. Every key is checked by [`NotificationsConfig::validate`]
//! at start, with a message naming the key.

use std::path::PathBuf;

use serde::Deserialize;

use super::range;
use crate::config::{ConfigError, Secret};

/// `[notifications]`: delivery settings shared by every target, the
/// webhook endpoints and the optional email settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    /// Deliveries in flight at once per target (webhook endpoint, or email).
    /// Also the most deliveries a crash can repeat per target.
    pub max_in_flight: usize,
    /// Status events read ahead per `order-status` partition whose
    /// notifications are not settled yet (back-pressure on a slow target).
    pub max_pending_events: usize,
    /// Attempts per notification before it is given up.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt up to `retry_max_ms`, with jitter.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// A notification is given up once its next retry would start later
    /// than this after its first attempt.
    pub retry_total_ms: u64,
    /// One attempt (an HTTP request, one SMTP exchange) at most.
    pub timeout_ms: u64,
    /// `[[notifications.webhooks]]`
    pub webhooks: Vec<WebhookConfig>,
    /// `[notifications.email]`
    pub email: Option<EmailConfig>,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            max_in_flight: 32,
            max_pending_events: 4096,
            max_attempts: 12,
            retry_base_ms: 500,
            retry_max_ms: 60_000,
            retry_total_ms: 3_600_000,
            timeout_ms: 10_000,
            webhooks: Vec::new(),
            email: None,
        }
    }
}

/// Which status events an endpoint receives.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventFilter {
    /// Every status change (`accepted`, `reserved`, `paid`, then the terminal one).
    #[default]
    All,
    /// Only the terminal status (`confirmed` or a failure).
    Terminal,
}

/// One `[[notifications.webhooks]]` endpoint.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `[A-Za-z0-9_-]{1,64}`, unique: names the endpoint in metrics and in
    /// the store's record of what it was sent (keep it when the URL moves).
    pub name: String,
    /// `http://` or `https://` URL the events are POSTed to.
    pub url: String,
    /// Environment variable holding the signing secret ...
    #[serde(default)]
    pub secret_env: Option<String>,
    /// ... or a file holding it (trailing newline ignored). Exactly one.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub events: EventFilter,
}

/// SMTP transport security.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain SMTP upgraded with STARTTLS (refused if the server cannot).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
    /// No encryption: only for a relay on the same host or a test server.
    None,
}

/// `[notifications.email]`: emails on `confirmed` and on a terminal failure.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    pub smtp_host: String,
    pub smtp_port: u16,
    pub tls: SmtpTls,
    /// Sender mailbox, e.g. `"Shop <orders@example.com>"`.
    pub from: String,
    /// SMTP AUTH user (needs `tls` = `starttls` or `tls`) ...
    pub username: Option<String>,
    /// ... and the environment variable holding its password.
    pub password_env: Option<String>,
    /// Emails that become due within this window go over one SMTP connection.
    pub batch_window_ms: u64,
    /// Most emails per batch (per connection).
    pub max_batch: usize,
}

impl Default for EmailConfig {
    fn default() -> Self {
        EmailConfig {
            smtp_host: String::new(),
            smtp_port: 587,
            tls: SmtpTls::default(),
            from: String::new(),
            username: None,
            password_env: None,
            batch_window_ms: 1_000,
            max_batch: 100,
        }
    }
}

/// The store and metrics name of the email target.
pub const EMAIL_TARGET: &str = "email";

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl NotificationsConfig {
    /// Checks every key; the message names it. Secrets are not read here
    /// (see [`WebhookConfig::secret`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        range("notifications.max_in_flight", self.max_in_flight, 1, 10_000)?;
        range(
            "notifications.max_pending_events",
            self.max_pending_events,
            1,
            1 << 20,
        )?;
        range("notifications.max_attempts", self.max_attempts, 1, 1000)?;
        range(
            "notifications.retry_base_ms",
            self.retry_base_ms,
            1,
            3_600_000,
        )?;
        range(
            "notifications.retry_max_ms",
            self.retry_max_ms,
            self.retry_base_ms,
            86_400_000,
        )?;
        range(
            "notifications.retry_total_ms",
            self.retry_total_ms,
            0,
            7 * 86_400_000,
        )?;
        range("notifications.timeout_ms", self.timeout_ms, 1, 600_000)?;
        if self.webhooks.is_empty() && self.email.is_none() {
            return Err(ConfigError::Invalid(
                "`notifications` has neither `webhooks` nor `email`: remove the section to disable notifications"
                    .into(),
            ));
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            let key = format!("notifications.webhooks[{i}]");
            if !valid_name(&w.name) || w.name == EMAIL_TARGET {
                return Err(ConfigError::Invalid(format!(
                    "`{key}.name` = {:?} must be 1 to 64 of [A-Za-z0-9_-] and not {EMAIL_TARGET:?}",
                    w.name
                )));
            }
            if self.webhooks[..i].iter().any(|o| o.name == w.name) {
                return Err(ConfigError::Invalid(format!(
                    "`{key}.name` = {:?} is used twice",
                    w.name
                )));
            }
            let url = reqwest::Url::parse(&w.url)
                .map_err(|e| ConfigError::Invalid(format!("`{key}.url` is not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(ConfigError::Invalid(format!(
                    "`{key}.url` must be an http:// or https:// URL"
                )));
            }
            if w.secret_env.is_some() == w.secret_file.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "`{key}` needs exactly one of `secret_env` and `secret_file`"
                )));
            }
        }
        if let Some(e) = &self.email {
            if e.smtp_host.is_empty() {
                return Err(ConfigError::Invalid(
                    "`notifications.email.smtp_host` is required".into(),
                ));
            }
            range("notifications.email.smtp_port", e.smtp_port, 1, u16::MAX)?;
            e.from.parse::<lettre::message::Mailbox>().map_err(|err| {
                ConfigError::Invalid(format!(
                    "`notifications.email.from` is not a mailbox: {err}"
                ))
            })?;
            if e.username.is_some() != e.password_env.is_some() {
                return Err(ConfigError::Invalid(
                    "`notifications.email.username` and `password_env` go together".into(),
                ));
            }
            if e.username.is_some() && e.tls == SmtpTls::None {
                return Err(ConfigError::Invalid(
                    "`notifications.email.username` needs `tls` = \"starttls\" or \"tls\": a password is never sent in clear"
                        .into(),
                ));
            }
            range(
                "notifications.email.batch_window_ms",
                e.batch_window_ms,
                0,
                600_000,
            )?;
            range("notifications.email.max_batch", e.max_batch, 1, 10_000)?;
        }
        Ok(())
    }
}

impl WebhookConfig {
    /// The signing secret, from `secret_env` or `secret_file`. An absent or
    /// empty secret is an error naming where it was looked for (never the value).
    pub fn secret(&self) -> Result<Secret, ConfigError> {
        let name = &self.name;
        match (&self.secret_env, &self.secret_file) {
            (Some(var), _) => Secret::from_env(var).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "webhook {name:?}: environment variable {var} is unset or empty"
                ))
            }),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::Invalid(format!(
                        "webhook {name:?}: cannot read secret_file {}: {e}",
                        path.display()
                    ))
                })?;
                let text = text.trim_end_matches(['\r', '\n']);
                if text.is_empty() {
                    return Err(ConfigError::Invalid(format!(
                        "webhook {name:?}: secret_file {} is empty",
                        path.display()
                    )));
                }
                Ok(Secret::new(text))
            }
            (None, None) => Err(ConfigError::Invalid(format!(
                "webhook {name:?} needs `secret_env` or `secret_file`"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<NotificationsConfig, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Wrap {
            notifications: NotificationsConfig,
        }
        let w: Wrap = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        w.notifications.validate().map_err(|e| e.to_string())?;
        Ok(w.notifications)
    }

    /// A full section parses with its defaults; each bad key is named.
    #[test]
    fn parse_and_validate() {
        let c = parse(
            r#"[notifications]
            max_in_flight = 4
            [[notifications.webhooks]]
            name = "crm"
            url = "https://crm.example.com/hooks"
            secret_env = "ORDERFLOW_WEBHOOK_SECRET_CRM"
            events = "terminal"
            [notifications.email]
            smtp_host = "smtp.example.com"
            from = "Shop <orders@example.com>"
            "#,
        )
        .unwrap();
        assert_eq!(c.max_in_flight, 4);
        assert_eq!(c.webhooks[0].events, EventFilter::Terminal);
        let email = c.email.unwrap();
        assert_eq!((email.smtp_port, email.tls), (587, SmtpTls::Starttls));

        let hook = |extra: &str| {
            format!(
                "[notifications]\n[[notifications.webhooks]]\nname = \"a\"\nurl = \"http://127.0.0.1:9/x\"\n{extra}"
            )
        };
        for (text, needle) in [
            ("[notifications]\n".to_owned(), "neither"),
            (hook(""), "exactly one of"),
            (hook("secret_env = \"A\"\nsecret_file = \"/x\""), "exactly one of"),
            (hook("secret_env = \"A\"\nevents = \"some\""), "unknown variant"),
            (hook("secret_env = \"A\"\nurll = \"x\""), "unknown field"),
            (
                hook("secret_env = \"A\"").replace("http://127.0.0.1:9/x", "ftp://h/x"),
                "http:// or https://",
            ),
            (
                hook("secret_env = \"A\"").replace("name = \"a\"", "name = \"email\""),
                "`notifications.webhooks[0].name`",
            ),
            (
                format!(
                    "{}\n[[notifications.webhooks]]\nname = \"a\"\nurl = \"http://h/\"\nsecret_env = \"B\"",
                    hook("secret_env = \"A\"")
                ),
                "used twice",
            ),
            (
                "[notifications]\n[notifications.email]\nfrom = \"a@b.c\"".to_owned(),
                "smtp_host",
            ),
            (
                "[notifications]\n[notifications.email]\nsmtp_host = \"h\"\nfrom = \"nope\""
                    .to_owned(),
                "`notifications.email.from`",
            ),
            (
                "[notifications]\n[notifications.email]\nsmtp_host = \"h\"\nfrom = \"a@b.c\"\ntls = \"none\"\nusername = \"u\"\npassword_env = \"P\""
                    .to_owned(),
                "never sent in clear",
            ),
            (
                hook("secret_env = \"A\"").replace("[notifications]", "[notifications]\nmax_attempts = 0"),
                "`notifications.max_attempts` = 0",
            ),
        ] {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(needle), "{text}\n→ {err}");
        }
    }

    /// The example in docs/notifications.md parses and validates.
    #[test]
    fn readme_example_is_valid() {
        let readme = include_str!("../../docs/notifications.md");
        let section = readme
            .split_once("## Notifications")
            .expect("a Notifications section")
            .1;
        let example = section
            .split_once("```toml\n")
            .and_then(|(_, rest)| rest.split_once("```"))
            .expect("a TOML example")
            .0;
        let c = parse(example).unwrap();
        assert_eq!((c.webhooks.len(), c.email.is_some()), (1, true));
    }

    /// A secret comes from its file without the trailing newline; an
    /// empty or missing one is an error that never shows a value.
    #[test]
    fn secret_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "whsec_abc\n").unwrap();
        let w = WebhookConfig {
            name: "a".into(),
            url: "http://h/".into(),
            secret_env: None,
            secret_file: Some(path.clone()),
            events: EventFilter::All,
        };
        assert_eq!(w.secret().unwrap().expose(), "whsec_abc");
        std::fs::write(&path, "\n").unwrap();
        assert!(w.secret().unwrap_err().to_string().contains("is empty"));
        let env = WebhookConfig {
            secret_env: Some("ORDERFLOW_TEST_UNSET_SECRET_VAR".into()),
            secret_file: None,
            ..w
        };
        assert!(
            env.secret()
                .unwrap_err()
                .to_string()
                .contains("unset or empty")
        );
    }
}
