//! `orderflow produce FILE|-`: NDJSON orders to a running instance's log
//! through `POST /v1/admin/produce`. A line that is not JSON is reported
//! with its line number and not sent; the others go in chunks. One result
//! line per non-blank input line is printed, in input order:
//! `{"line","partition","offset","order_id"}` or `{"line","error","code"}`.
//! Lines the server could not take for now (`log_full`, `unavailable`)
//! are retried with backoff before they count as failed.

use std::collections::{BTreeMap, VecDeque};
use std::io::BufRead;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::client::{Client, failure, retryable, send};

/// Bytes of order lines per request (the server takes 64× its body limit).
const CHUNK_BYTES: usize = 1024 * 1024;
const CHUNK_LINES: usize = 5000;
const MAX_ATTEMPTS: u32 = 6;

/// Input lines to send: (input line number, bytes).
type Lines = Vec<(usize, Vec<u8>)>;

enum Slot {
    /// Not sent: not JSON.
    Local { line: usize, error: String },
    Sent { line: usize },
}

#[derive(Default)]
struct Chunk {
    slots: Vec<Slot>,
    lines: Lines,
    bytes: usize,
}

/// Totals over a run.
#[derive(Default)]
struct Tally {
    ok: usize,
    failed: usize,
}

pub async fn run(client: &Client, input: &str) -> anyhow::Result<bool> {
    let reader: Box<dyn BufRead> = if input == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(input).with_context(|| format!("cannot open {input}"))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut tally = Tally::default();
    let mut chunk = Chunk::default();
    for (i, line) in reader.split(b'\n').enumerate() {
        let number = i + 1;
        let mut line = line.with_context(|| format!("cannot read {input} at line {number}"))?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&line) {
            chunk.slots.push(Slot::Local { line: number, error: format!("not JSON (column {})", e.column()) });
            continue;
        }
        if !chunk.lines.is_empty() && (chunk.bytes + line.len() > CHUNK_BYTES || chunk.lines.len() >= CHUNK_LINES) {
            flush(client, std::mem::take(&mut chunk), &mut tally).await?;
        }
        chunk.bytes += line.len() + 1;
        chunk.slots.push(Slot::Sent { line: number });
        chunk.lines.push((number, line));
    }
    flush(client, chunk, &mut tally).await?;
    eprintln!("produced {} line(s), {} failed", tally.ok, tally.failed);
    Ok(tally.failed == 0)
}

async fn flush(client: &Client, chunk: Chunk, tally: &mut Tally) -> anyhow::Result<()> {
    let mut results = send_lines(client, chunk.lines).await?;
    let mut out = std::io::stdout().lock();
    for slot in chunk.slots {
        let v = match slot {
            Slot::Local { line, error } => json!({"line": line, "error": error, "code": "malformed_json"}),
            Slot::Sent { line } => results
                .remove(&line)
                .unwrap_or_else(|| json!({"line": line, "error": "the server answered no result for this line", "code": "no_result"})),
        };
        if v.get("error").is_some() {
            tally.failed += 1;
        } else {
            tally.ok += 1;
        }
        use std::io::Write as _;
        writeln!(out, "{v}")?;
    }
    Ok(())
}

fn backoff(attempt: u32, hint: Option<Duration>) -> Duration {
    hint.map(|h| h.min(Duration::from_secs(10)))
        .unwrap_or_else(|| Duration::from_millis(200u64 << attempt.min(5)).min(Duration::from_secs(5)))
}

/// Sends lines, retrying what may succeed later; results by input line.
async fn send_lines(client: &Client, lines: Lines) -> anyhow::Result<BTreeMap<usize, Value>> {
    let mut out = BTreeMap::new();
    let mut queue: VecDeque<(Lines, u32)> = VecDeque::new();
    if !lines.is_empty() {
        queue.push_back((lines, 0));
    }
    while let Some((batch, attempt)) = queue.pop_front() {
        let mut body = Vec::with_capacity(batch.iter().map(|(_, l)| l.len() + 1).sum());
        for (_, l) in &batch {
            body.extend_from_slice(l);
            body.push(b'\n');
        }
        let req = client
            .request(Method::POST, &["v1", "admin", "produce"])
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body);
        let res = send(client, req).await?;
        if res.status().is_success() {
            let text = res.text().await.context("cannot read the server's answer")?;
            let mut again = Vec::new();
            for row in text.lines().filter(|l| !l.trim().is_empty()) {
                let mut v: Value = serde_json::from_str(row).context("the server's answer is not NDJSON")?;
                let Some(k) = v.get("line").and_then(Value::as_u64).filter(|k| (1..=batch.len() as u64).contains(k)) else {
                    anyhow::bail!("the server answered a result for a line it was not sent");
                };
                let (number, line) = &batch[k as usize - 1];
                v["line"] = json!(number);
                let code = v.get("code").and_then(Value::as_str).unwrap_or("");
                if matches!(code, "log_full" | "unavailable") && attempt + 1 < MAX_ATTEMPTS {
                    again.push((*number, line.clone()));
                } else {
                    out.insert(*number, v);
                }
            }
            if !again.is_empty() {
                tokio::time::sleep(backoff(attempt, None)).await;
                queue.push_front((again, attempt + 1));
            }
            continue;
        }
        let f = failure(res).await;
        if matches!(f.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            anyhow::bail!("{f}");
        }
        if f.status == StatusCode::PAYLOAD_TOO_LARGE && batch.len() > 1 {
            // Find the line that is too large: send them one by one.
            for item in batch.into_iter().rev() {
                queue.push_front((vec![item], attempt));
            }
            continue;
        }
        if retryable(f.status) && attempt + 1 < MAX_ATTEMPTS {
            tokio::time::sleep(backoff(attempt, f.retry_after)).await;
            queue.push_front((batch, attempt + 1));
            continue;
        }
        for (number, _) in batch {
            out.insert(number, json!({"line": number, "error": f.detail, "code": f.code}));
        }
    }
    Ok(out)
}
