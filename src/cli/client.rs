//! The HTTP client of the client commands.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::Value;

use super::{CliError, ClientArgs, LISTEN_ENV, base_config};
use crate::config::Secret;
use crate::http::auth::Role;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Secret,
}

/// A problem+json answer, reduced to what a command prints.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub code: String,
    pub detail: String,
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.detail)
    }
}

impl Client {
    /// The server is `--server` / `ORDERFLOW_SERVER`, else `http://` + the
    /// listen address (`ORDERFLOW_LISTEN`, the config file, the default).
    /// The token is the first of `ORDERFLOW_<ROLE>_TOKEN` of the first of
    /// `roles` (the roles the command's route accepts) that is set.
    pub fn new(
        config_file: Option<&Path>,
        args: &ClientArgs,
        roles: &[Role],
    ) -> Result<Client, CliError> {
        let token = client_token(roles, &|var| std::env::var(var).ok())?;
        let server = match &args.server {
            Some(s) => s.clone(),
            None => {
                let mut listen = base_config(config_file)?.listen;
                if let Ok(v) = std::env::var(LISTEN_ENV) {
                    listen = v.parse::<SocketAddr>().map_err(|e| {
                        CliError::Usage(format!("{LISTEN_ENV}={v:?} is not an address: {e}"))
                    })?;
                }
                if listen.ip().is_unspecified() {
                    listen.set_ip(if listen.is_ipv4() {
                        [127, 0, 0, 1].into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                format!("http://{listen}")
            }
        };
        let base = Url::parse(&server)
            .map_err(|e| CliError::Usage(format!("invalid server URL {server:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(CliError::Usage(format!(
                "invalid server URL {server:?}: use http:// or https://"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| CliError::Failed(anyhow::anyhow!("cannot build the HTTP client: {e}")))?;
        Ok(Client { http, base, token })
    }

    /// `base` + the path segments (each percent-encoded).
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().expect("http(s) URLs have paths");
            path.pop_if_empty();
            path.extend(segments);
        }
        url
    }

    pub fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        self.http
            .request(method, self.url(segments))
            .bearer_auth(self.token.expose())
    }

    pub fn base(&self) -> &Url {
        &self.base
    }
}

/// The token a client command sends: the first entry of the first of
/// `roles`' variables that is set. A variable may list several tokens (the
/// server's rotation list): the first is the newest by convention.
fn client_token(roles: &[Role], env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, CliError> {
    roles
        .iter()
        .find_map(|role| {
            let list = env(role.env_var())?;
            let first = list.split(',').next()?.trim();
            (!first.is_empty()).then(|| Secret::new(first))
        })
        .ok_or_else(|| {
            let vars: Vec<&str> = roles.iter().map(|r| r.env_var()).collect();
            CliError::Usage(format!(
                "{} must hold a token of the server ({} role)",
                vars.join(" or "),
                roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))
        })
}

/// Sends a request; a transport error names the server.
pub async fn send(client: &Client, req: RequestBuilder) -> anyhow::Result<Response> {
    req.send()
        .await
        .with_context(|| format!("cannot reach orderflow at {}", client.base()))
}

/// The failure of a non-success answer (problem+json when possible).
pub async fn failure(res: Response) -> Failure {
    let status = res.status();
    let retry_after = res
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let text = res.text().await.unwrap_or_default();
    let problem: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let field = |k: &str| problem.get(k).and_then(Value::as_str).map(str::to_owned);
    Failure {
        status,
        code: field("code").unwrap_or_else(|| format!("http_{}", status.as_u16())),
        detail: field("detail").unwrap_or_else(|| text.chars().take(200).collect()),
        retry_after,
    }
}

/// True for answers that a later retry may turn into success.
pub fn retryable(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    )
}

/// `orderflow status ID`: prints the order's view as JSON.
pub async fn status(client: &Client, id: &str) -> anyhow::Result<bool> {
    let res = send(client, client.request(Method::GET, &["v1", "orders", id])).await?;
    if !res.status().is_success() {
        let f = failure(res).await;
        if f.code == "order_not_found" {
            eprintln!("error: no order {id:?}");
        } else {
            eprintln!("error: {f}");
        }
        return Ok(false);
    }
    // As the server wrote it (field order of the contract), one line.
    let text = res
        .text()
        .await
        .context("cannot read the server's answer")?;
    println!("{}", text.trim_end());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command sends the first token of the first usable role that has one, else names every variable tried.
    #[test]
    fn client_token_by_role() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let producer_only = env(&[("ORDERFLOW_PRODUCER_TOKEN", " p-new , p-old")]);
        let t = client_token(&[Role::Admin, Role::Producer], &producer_only).unwrap();
        assert_eq!(t.expose(), "p-new");
        let both = env(&[
            ("ORDERFLOW_ADMIN_TOKEN", "a-1"),
            ("ORDERFLOW_READER_TOKEN", "r-1"),
        ]);
        assert_eq!(
            client_token(&[Role::Admin, Role::Reader], &both)
                .unwrap()
                .expose(),
            "a-1"
        );
        let Err(CliError::Usage(e)) = client_token(&[Role::Admin, Role::Reader], &producer_only)
        else {
            panic!("no admin or reader token is a usage error");
        };
        assert!(
            e.contains("ORDERFLOW_ADMIN_TOKEN or ORDERFLOW_READER_TOKEN"),
            "{e}"
        );
    }
}
