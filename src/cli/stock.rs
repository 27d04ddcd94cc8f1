//! `orderflow stock load FILE` and `orderflow stock get SKU`.

use std::path::Path;

use anyhow::Context as _;
use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Client, failure, send};
use crate::stages::state::MAX_AVAILABLE;

/// A SKU that could not be set.
#[derive(serde::Serialize)]
struct StockFailure<'a> {
    sku: &'a str,
    error: &'a str,
    code: &'a str,
}

/// One stock line of the input, or why it is not one.
type Entry = (String, Result<u64, String>);

/// `available` of one entry: an integer from 0 to [`MAX_AVAILABLE`], as
/// the server takes (checked here too, so a bad line is named by its place).
fn available(v: Option<&Value>) -> Result<u64, String> {
    match v.and_then(Value::as_u64) {
        Some(n) if n <= MAX_AVAILABLE => Ok(n),
        Some(n) => Err(format!("available {n} exceeds {MAX_AVAILABLE}")),
        None => Err("available must be a non-negative integer".to_owned()),
    }
}

/// A JSON object `{"SKU": N, ...}`, else NDJSON `{"sku", "available"}`.
pub fn parse_stock(text: &str) -> Result<Vec<Entry>, String> {
    // A single NDJSON line `{"sku", "available"}` is an object too.
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text)
        && !(map.len() == 2 && map.contains_key("sku") && map.contains_key("available"))
    {
        return Ok(map
            .into_iter()
            .map(|(sku, v)| {
                let n = available(Some(&v));
                (sku, n)
            })
            .collect());
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("line {}: not JSON: {e}", i + 1))?;
        let sku = v.get("sku").and_then(Value::as_str).ok_or_else(|| {
            format!(
                "line {}: expected {{\"sku\": \"...\", \"available\": N}}",
                i + 1
            )
        })?;
        let n = available(v.get("available")).map_err(|e| format!("line {}: {e}", i + 1));
        out.push((sku.to_owned(), n));
    }
    Ok(out)
}

/// Sets every SKU of the file, in order; prints one JSON line per SKU.
pub async fn load(client: &Client, path: &Path) -> anyhow::Result<bool> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let entries = parse_stock(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut ok = true;
    for (sku, available) in entries {
        let line = match available {
            Err(e) => {
                ok = false;
                serde_json::to_string(&StockFailure {
                    sku: &sku,
                    error: &e,
                    code: "invalid_body",
                })?
            }
            Ok(n) => {
                let req = client
                    .request(Method::PUT, &["v1", "inventory", &sku])
                    .json(&json!({ "available": n }));
                let res = send(client, req).await?;
                if res.status().is_success() {
                    let text = res
                        .text()
                        .await
                        .context("cannot read the server's answer")?;
                    println!("{}", text.trim_end());
                    continue;
                } else {
                    let f = failure(res).await;
                    if matches!(f.code.as_str(), "unauthorized" | "admin_disabled") {
                        anyhow::bail!("{f}");
                    }
                    ok = false;
                    serde_json::to_string(&StockFailure {
                        sku: &sku,
                        error: &f.detail,
                        code: &f.code,
                    })?
                }
            }
        };
        println!("{line}");
    }
    Ok(ok)
}

/// Prints a SKU's counters.
pub async fn get(client: &Client, sku: &str) -> anyhow::Result<bool> {
    let res = send(
        client,
        client.request(Method::GET, &["v1", "inventory", sku]),
    )
    .await?;
    if !res.status().is_success() {
        eprintln!("error: {}", failure(res).await);
        return Ok(false);
    }
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

    /// Both input shapes parse; bad values are per-entry errors.
    #[test]
    fn shapes() {
        let obj = parse_stock(r#"{"A": 5, "B": -1}"#).unwrap();
        assert_eq!(obj[0], ("A".to_owned(), Ok(5)));
        assert!(obj[1].1.is_err());
        let nd =
            parse_stock("{\"sku\":\"A\",\"available\":3}\n\n{\"sku\":\"B\",\"available\":4}\n")
                .unwrap();
        assert_eq!(nd, vec![("A".to_owned(), Ok(3)), ("B".to_owned(), Ok(4))]);
        assert!(parse_stock("nope").is_err());
        // Above the limit the counters could wrap: refused before sending.
        let big = parse_stock(r#"{"A": 1000000000000, "B": 18446744073709551615}"#).unwrap();
        assert_eq!(big[0].1, Ok(MAX_AVAILABLE));
        assert!(big[1].1.as_ref().unwrap_err().contains("exceeds"));
        let line = parse_stock("{\"sku\":\"C\",\"available\":1000000000001}\n").unwrap();
        assert!(
            line[0]
                .1
                .as_ref()
                .unwrap_err()
                .starts_with("line 1: available")
        );
    }
}
