//! `orderflow produce FILE|-`: NDJSON orders to a running instance's log
//! through `POST /v1/admin/produce`. A line that is not JSON (or holds a
//! card number) is reported with its line number and not sent; the others
//! go in chunks. One result
//! line per non-blank input line is printed, in input order:
//! `{"line","partition","offset","order_id"}` or `{"line","error","code"}`.
//! Lines the server could not take for now (`log_full`, `overloaded`, `unavailable`)
//! are retried with backoff before they count as failed.

use std::collections::{BTreeMap, VecDeque};
use std::io::BufRead;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::client::{Client, failure, retryable, send};
use crate::domain::pan::contains_pan;

/// Bytes of order lines per request (the server takes 64× its body limit).
const CHUNK_BYTES: usize = 1024 * 1024;
const CHUNK_LINES: usize = 5000;
const MAX_ATTEMPTS: u32 = 6;

/// Input lines to send: (input line number, bytes).
type Lines = Vec<(usize, Vec<u8>)>;

enum Slot {
    /// Not sent: not JSON, or holds a card number.
    Local {
        line: usize,
        error: String,
        code: &'static str,
    },
    Sent {
        line: usize,
    },
}

#[derive(Default)]
struct Chunk {
    slots: Vec<Slot>,
    lines: Lines,
    bytes: usize,
}

/// One printed result, fields in the order of the server's answer.
#[derive(Serialize, Deserialize, Debug)]
#[serde(untagged)]
enum Row {
    Err {
        line: usize,
        error: String,
        code: String,
    },
    Ok {
        line: usize,
        partition: u32,
        offset: u64,
        order_id: Option<String>,
    },
}

impl Row {
    fn fail(line: usize, error: impl Into<String>, code: impl Into<String>) -> Row {
        Row::Err {
            line,
            error: error.into(),
            code: code.into(),
        }
    }

    fn line_mut(&mut self) -> &mut usize {
        match self {
            Row::Err { line, .. } | Row::Ok { line, .. } => line,
        }
    }

    fn code(&self) -> Option<&str> {
        match self {
            Row::Err { code, .. } => Some(code),
            Row::Ok { .. } => None,
        }
    }
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
            chunk.slots.push(Slot::Local {
                line: number,
                error: format!("not JSON (column {})", e.column()),
                code: "malformed_json",
            });
            continue;
        }
        // The server refuses these too; card data need not travel at all.
        if contains_pan(&line) {
            let error = "the line contains a card number; pay with a token".to_owned();
            chunk.slots.push(Slot::Local {
                line: number,
                error,
                code: "pan_detected",
            });
            continue;
        }
        if !chunk.lines.is_empty()
            && (chunk.bytes + line.len() > CHUNK_BYTES || chunk.lines.len() >= CHUNK_LINES)
        {
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
        let row = match slot {
            Slot::Local { line, error, code } => Row::fail(line, error, code),
            Slot::Sent { line } => results.remove(&line).unwrap_or_else(|| {
                Row::fail(
                    line,
                    "the server answered no result for this line",
                    "no_result",
                )
            }),
        };
        if row.code().is_some() {
            tally.failed += 1;
        } else {
            tally.ok += 1;
        }
        use std::io::Write as _;
        writeln!(out, "{}", serde_json::to_string(&row)?)?;
    }
    Ok(())
}

fn backoff(attempt: u32, hint: Option<Duration>) -> Duration {
    hint.map(|h| h.min(Duration::from_secs(10)))
        .unwrap_or_else(|| {
            Duration::from_millis(200u64 << attempt.min(5)).min(Duration::from_secs(5))
        })
}

/// Sends lines, retrying what may succeed later; results by input line.
async fn send_lines(client: &Client, lines: Lines) -> anyhow::Result<BTreeMap<usize, Row>> {
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
            let text = res
                .text()
                .await
                .context("cannot read the server's answer")?;
            let mut again = Vec::new();
            for row in text.lines().filter(|l| !l.trim().is_empty()) {
                let mut v: Row = serde_json::from_str(row)
                    .context("the server's answer is not the produce NDJSON")?;
                let k = *v.line_mut();
                if !(1..=batch.len()).contains(&k) {
                    anyhow::bail!("the server answered a result for a line it was not sent");
                }
                let (number, line) = &batch[k - 1];
                *v.line_mut() = *number;
                if matches!(v.code(), Some("log_full" | "overloaded" | "unavailable"))
                    && attempt + 1 < MAX_ATTEMPTS
                {
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
            out.insert(number, Row::fail(number, f.detail.clone(), f.code.clone()));
        }
    }
    Ok(out)
}
