//! `orderflow parked list|show|retry|drop|drop-effect`: the park lane and
//! the failed captures and voids of a running instance, through its admin
//! routes.

use reqwest::Method;
use serde_json::Value;

use super::ParkedCommand;
use super::client::{Client, failure, send};

/// `P:OFFSET`, the position of a parked record.
pub fn parse_position(s: &str) -> Result<(u32, u64), String> {
    let (p, o) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected PARTITION:OFFSET, e.g. 3:1042"))?;
    let p = p
        .parse()
        .map_err(|_| format!("{s:?}: bad partition {p:?}"))?;
    let o = o.parse().map_err(|_| format!("{s:?}: bad offset {o:?}"))?;
    Ok((p, o))
}

/// Prints the answer (one JSON document, or one line per parked record
/// for `list`); false on an error answer.
pub async fn run(client: &Client, command: ParkedCommand) -> anyhow::Result<bool> {
    match command {
        ParkedCommand::List => {
            let Some(v) = call(client, Method::GET, &["v1", "admin", "parked"]).await? else {
                return Ok(false);
            };
            for r in v["parked"].as_array().into_iter().flatten() {
                println!("{r}");
            }
            for f in v["failed_effects"].as_array().into_iter().flatten() {
                println!("{}", serde_json::json!({ "failed_effect": f }));
            }
            Ok(true)
        }
        ParkedCommand::Show { position } => {
            let (p, o) = position;
            let path = ["v1", "admin", "parked", &p.to_string(), &o.to_string()];
            print(call(client, Method::GET, &path).await?)
        }
        ParkedCommand::Retry { partition } => {
            let partitions = match partition {
                Some(p) => vec![p],
                None => partitions_with_parked(client).await?,
            };
            let mut ok = true;
            for p in partitions {
                let path = ["v1", "admin", "parked", &p.to_string(), "retry"];
                ok &= print(call(client, Method::POST, &path).await?)?;
            }
            Ok(ok)
        }
        ParkedCommand::Drop { position } => {
            let (p, o) = position;
            let path = [
                "v1",
                "admin",
                "parked",
                &p.to_string(),
                &o.to_string(),
                "drop",
            ];
            print(call(client, Method::POST, &path).await?)
        }
        ParkedCommand::DropEffect {
            partition,
            order_id,
            kind,
        } => {
            let p = partition.to_string();
            let path = [
                "v1", "admin", "parked", &p, "effects", &order_id, &kind, "drop",
            ];
            print(call(client, Method::POST, &path).await?)
        }
    }
}

/// The partitions that have parked records or failed effects now.
async fn partitions_with_parked(client: &Client) -> anyhow::Result<Vec<u32>> {
    let Some(v) = call(client, Method::GET, &["v1", "admin", "parked"]).await? else {
        anyhow::bail!("cannot list the park lane");
    };
    let listed = ["parked", "failed_effects"].map(|list| v[list].as_array().cloned());
    let ps: std::collections::BTreeSet<u32> = listed
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|r| u32::try_from(r["partition"].as_u64()?).ok())
        .collect();
    Ok(ps.into_iter().collect())
}

async fn call(client: &Client, method: Method, path: &[&str]) -> anyhow::Result<Option<Value>> {
    let res = send(client, client.request(method, path)).await?;
    if !res.status().is_success() {
        eprintln!("error: {}", failure(res).await);
        return Ok(None);
    }
    Ok(Some(res.json().await?))
}

fn print(v: Option<Value>) -> anyhow::Result<bool> {
    match v {
        Some(v) => {
            println!("{v}");
            Ok(true)
        }
        None => Ok(false),
    }
}
