//! Emails through SMTP (`lettre`): one email on `confirmed` and one on a
//! terminal failure, to the order's contact email that intake stored.
//!
//! Batching: the first email that becomes due opens a window of
//! `batch_window_ms`; every email due within it (up to `max_batch`) goes
//! over one SMTP connection (a connection broken mid-batch is opened again
//! for the rest). Each email's answer (`250`, or why not) goes back to the
//! delivery that asked for it, which records it or retries it.
//!
//! Each email carries a deterministic `Message-ID` and an
//! `Orderflow-Event-Id: <order_id>:<seq>` header, so a resend after a crash
//! can be recognised downstream.

use std::time::Duration;

use lettre::message::header::{ContentType, Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::AttemptError;
use super::webhook::{EVENT_ID_HEADER, event_id};
use crate::config::ConfigError;
use crate::config::Secret;
use crate::config::notifications::{EmailConfig, SmtpTls};
use crate::domain::{Status, StatusEvent};
use crate::telemetry::metrics::Metrics;

/// Whether `status` gets an email: `confirmed` and every terminal failure.
pub fn wants(status: Status) -> bool {
    status.is_terminal()
}

/// The `Orderflow-Event-Id` email header.
#[derive(Clone)]
struct EventIdHeader(String);

impl Header for EventIdHeader {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str(EVENT_ID_HEADER)
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(EventIdHeader(s.to_owned()))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// Subject and plain-text body of the email for `event`.
pub fn render(event: &StatusEvent) -> (String, String) {
    let id = &event.order_id;
    if event.status == Status::Confirmed {
        (
            format!("Order {id} confirmed"),
            format!("Hello,\n\nyour order {id} is confirmed.\n\nThank you.\n"),
        )
    } else {
        let reason = event
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        (
            format!("Order {id} could not be completed"),
            format!(
                "Hello,\n\nyour order {id} could not be completed: {}{reason}.\nNo payment was taken.\n",
                event.status
            ),
        )
    }
}

/// An email waiting for its batch, and where its answer goes.
struct EmailJob {
    message: Message,
    reply: oneshot::Sender<Result<(), AttemptError>>,
}

/// Settings of one SMTP server, as the batcher uses them.
struct Smtp {
    host: String,
    port: u16,
    tls: SmtpTls,
    credentials: Option<Credentials>,
    timeout: Duration,
    window: Duration,
    max_batch: usize,
}

/// The handle deliveries send emails through; the batcher task behind it
/// stops once every handle is gone.
pub(crate) struct Mailer {
    tx: mpsc::Sender<EmailJob>,
    from: Mailbox,
    /// The right-hand side of our `Message-ID`s (the sender's domain).
    domain: String,
}

impl Mailer {
    /// Starts the batcher. `timeout` bounds each SMTP step.
    pub fn spawn(
        config: &EmailConfig,
        timeout: Duration,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<(Mailer, JoinHandle<()>), ConfigError> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("`notifications.email.from`: {e}")))?;
        let credentials = match (&config.username, &config.password_env) {
            (Some(user), Some(var)) => {
                let password = Secret::from_env(var).ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "email: environment variable {var} is unset or empty"
                    ))
                })?;
                Some(Credentials::new(user.clone(), password.expose().to_owned()))
            }
            _ => None,
        };
        let smtp = Smtp {
            host: config.smtp_host.clone(),
            port: config.smtp_port,
            tls: config.tls,
            credentials,
            timeout,
            window: Duration::from_millis(config.batch_window_ms),
            max_batch: config.max_batch,
        };
        let (tx, rx) = mpsc::channel(config.max_batch.saturating_mul(2).max(16));
        let task = tokio::spawn(run_batcher(smtp, rx, metrics));
        let domain = from.email.domain().to_owned();
        Ok((Mailer { tx, from, domain }, task))
    }

    /// Sends the email for `event` to `to` in the next batch and waits for
    /// the server's answer.
    pub async fn send(&self, to: &str, event: &StatusEvent) -> Result<(), AttemptError> {
        let message = self.message(to, event)?;
        let (reply, answer) = oneshot::channel();
        let stopped = || AttemptError::Transient {
            detail: "the mailer stopped".into(),
            retry_after: None,
        };
        self.tx
            .send(EmailJob { message, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }

    fn message(&self, to: &str, event: &StatusEvent) -> Result<Message, AttemptError> {
        let to: Mailbox = to
            .parse()
            .map_err(|e| AttemptError::Permanent(format!("contact email is not a mailbox: {e}")))?;
        let (subject, body) = render(event);
        // Order ids are [A-Za-z0-9._:-]; `:` is not allowed in a Message-ID.
        let local = event.order_id.replace(':', "=");
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(format!("<{local}.{}@{}>", event.seq, self.domain)))
            .header(EventIdHeader(event_id(event)))
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| AttemptError::Permanent(format!("cannot build the email: {e}")))
    }
}

async fn run_batcher(
    smtp: Smtp,
    mut rx: mpsc::Receiver<EmailJob>,
    metrics: std::sync::Arc<Metrics>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + smtp.window;
        while batch.len() < smtp.max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) => batch.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        metrics.email_batch_size.observe(batch.len() as f64);
        send_batch(&smtp, batch).await;
    }
}

/// Sends a batch over one connection (opened again only if it breaks).
async fn send_batch(smtp: &Smtp, batch: Vec<EmailJob>) {
    let mut conn: Option<AsyncSmtpConnection> = None;
    let mut jobs = batch.into_iter();
    while let Some(job) = jobs.next() {
        if conn.as_ref().is_none_or(AsyncSmtpConnection::has_broken) {
            match connect(smtp).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    // The server is not reachable now: the whole rest of
                    // the batch is retried later, each by its delivery.
                    tracing::warn!(host = %smtp.host, port = smtp.port, error = %e.detail(), "SMTP connection failed");
                    let _ = job.reply.send(Err(e.clone()));
                    for job in jobs {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                    return;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let sent = tokio::time::timeout(
            smtp.timeout,
            c.send(job.message.envelope(), &job.message.formatted()),
        )
        .await;
        let result = match sent {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => {
                // The connection is in an unknown state: drop it.
                conn = None;
                Err(AttemptError::Transient {
                    detail: "SMTP send timed out".into(),
                    retry_after: None,
                })
            }
        };
        let _ = job.reply.send(result);
    }
    if let Some(mut c) = conn
        && !c.has_broken()
    {
        let _ = tokio::time::timeout(smtp.timeout, c.quit()).await;
    }
}

/// SMTP 5xx and client errors (a message that cannot be sent as it is)
/// are permanent; 4xx, network, TLS and timeouts are worth retrying.
fn classify(e: &lettre::transport::smtp::Error) -> AttemptError {
    let detail = format!("SMTP: {}", loggable(e));
    if e.is_permanent() || e.is_client() {
        AttemptError::Permanent(detail)
    } else {
        AttemptError::Transient {
            detail,
            retry_after: None,
        }
    }
}

/// What of an SMTP error may reach the info-level log, where attempt
/// details end up (`notification given up`): its kind and reply code.
/// A server's reply text often quotes the recipient's address (`550 5.1.1
/// <ada@example.com>: Recipient address rejected`), and a client error our
/// envelope, so their text goes to the debug log only. Network and TLS
/// errors come from the OS and rustls and are kept whole.
fn loggable(e: &lettre::transport::smtp::Error) -> String {
    let kind = if e.is_permanent() {
        "permanent error"
    } else if e.is_transient() {
        "transient error"
    } else if e.is_response() {
        "unreadable reply"
    } else if e.is_client() {
        "client error"
    } else {
        return e.to_string();
    };
    tracing::debug!(error = %e, "SMTP error, with the server's reply text");
    match e.status() {
        Some(code) => format!("{kind} ({code}; reply text at debug level)"),
        None => format!("{kind} (text at debug level)"),
    }
}

async fn connect(smtp: &Smtp) -> Result<AsyncSmtpConnection, AttemptError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| AttemptError::Transient {
        detail: format!("SMTP {what}: {e}"),
        retry_after: None,
    };
    // The server's answers to the greeting, STARTTLS and AUTH: kind and
    // code only (see `loggable`).
    let refused = |what: &str, e: &lettre::transport::smtp::Error| failed(what, &loggable(e));
    let hello = ClientId::default();
    let tls = || TlsParameters::new_rustls(smtp.host.clone()).map_err(|e| failed("TLS setup", &e));
    let implicit = match smtp.tls {
        SmtpTls::Tls => Some(tls()?),
        SmtpTls::Starttls | SmtpTls::None => None,
    };
    let connecting = async {
        match implicit {
            Some(tls) => AsyncSmtpConnection::connect_tokio1(
                (smtp.host.as_str(), smtp.port),
                Some(smtp.timeout),
                &hello,
                Some(tls),
                None,
            )
            .await
            .map_err(|e| refused("connect", &e)),
            None => {
                // Our own socket, to turn Nagle off: SMTP is a chain of
                // small writes each waiting for an answer, and Nagle with
                // delayed ACKs cost ~40 ms per email (BENCHMARKS.md).
                let tcp = tokio::net::TcpStream::connect((smtp.host.as_str(), smtp.port))
                    .await
                    .map_err(|e| failed("connect", &e))?;
                tcp.set_nodelay(true).map_err(|e| failed("connect", &e))?;
                AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello)
                    .await
                    .map_err(|e| refused("connect", &e))
            }
        }
    };
    let mut conn = tokio::time::timeout(smtp.timeout, connecting)
        .await
        .map_err(|_| failed("connect", &"timed out"))??;
    if smtp.tls == SmtpTls::Starttls {
        tokio::time::timeout(smtp.timeout, conn.starttls(tls()?, &hello))
            .await
            .map_err(|_| failed("STARTTLS", &"timed out"))?
            .map_err(|e| refused("STARTTLS", &e))?;
    }
    if let Some(credentials) = &smtp.credentials {
        tokio::time::timeout(
            smtp.timeout,
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials),
        )
        .await
        .map_err(|_| failed("AUTH", &"timed out"))?
        .map_err(|e| refused("AUTH", &e))?;
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Confirmed and failed orders get their own subject; reasons show.
    #[test]
    fn render_texts() {
        let mut e = StatusEvent {
            order_id: "ord-7".into(),
            seq: 5,
            status: Status::Confirmed,
            reason: None,
            at_ms: 0,
            refused_skus: Vec::new(),
            released_lines: 0,
            src: None,
            email: None,
        };
        assert_eq!(render(&e).0, "Order ord-7 confirmed");
        e.status = Status::OutOfStock;
        e.reason = Some("insufficient_stock".into());
        let (subject, body) = render(&e);
        assert_eq!(subject, "Order ord-7 could not be completed");
        assert!(body.contains("out_of_stock (insufficient_stock)"), "{body}");
        assert!(wants(Status::Confirmed) && wants(Status::PaymentFailed));
        assert!(!wants(Status::Paid));
    }
}
