//! `orderflow replay --order ID`: the story of one order, told by replaying
//! every `orders` partition of a stopped instance with effects suppressed
//! and keeping the records that concern the order: what each record was,
//! the stock it found and left, the statuses and messages it produced and
//! the order's state after it. Steps come in causal order: each
//! partition's in offset order, a message after the step that sent it
//! (its id names the sender's position), and otherwise by log time.
//!
//! Nothing here prints an order's raw JSON: a record written straight to
//! the log may hold a card number (the processor refuses it; the story
//! says so), and contacts are personal data.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

use crate::domain::OrderKey;
use crate::domain::order::parse_order;
use crate::domain::parked::ParkEvent;
use crate::domain::{Envelope, Message, RecordKind};
use crate::pipeline::log::{Log, LogError, LogRecord, Topic, partition_for_key};
use crate::pipeline::runner::{Inspect, replay_inspected};
use crate::stages::processor::{Limits, order_id_of};
use crate::stages::state::{Stock, StockTable};
use crate::stages::{Output, PartitionState};

/// Most steps one story keeps: an order has a handful of records (about
/// three per line plus payment); more means a runaway loop worth seeing
/// the start of, not a story worth gigabytes.
pub const MAX_STEPS: usize = 10_000;

/// One record that concerned the order, and what processing it did.
#[derive(Debug, Serialize)]
pub struct Step {
    pub partition: u32,
    pub offset: u64,
    /// Log time of the record, ms since the epoch.
    pub at_ms: u64,
    /// What the record was.
    pub record: String,
    /// Stock rows the record changed or was refused on: SKU → (before, after).
    pub stock: BTreeMap<String, (Stock, Stock)>,
    /// Status transitions it caused, as `status` or `status (reason)`.
    pub statuses: Vec<String>,
    /// Messages it sent, as `pN: message`.
    pub sent: Vec<String>,
    /// Payment effects it asked for.
    pub effects: Vec<String>,
    /// Why it could not be applied, or why it went to the park lane.
    pub problems: Vec<String>,
    /// The order as this partition remembered it afterwards (its home
    /// partition: status, seq and saga lines; another: the lines it holds).
    pub order_after: Option<String>,
    /// Position (partition, offset) of the step that sent this message.
    #[serde(skip)]
    cause: Option<(u32, u64)>,
}

/// Collects the steps of one partition.
struct Collector<'a> {
    order_id: &'a str,
    partition: u32,
    partitions: u32,
    stock_before: StockTable,
    /// The watched record's message, decoded once in `before`; `None` for
    /// an order's JSON.
    envelope: Option<Envelope>,
    steps: Vec<Step>,
}

impl Inspect for Collector<'_> {
    fn before(&mut self, record: &LogRecord, state: &PartitionState) -> bool {
        if self.steps.len() >= MAX_STEPS {
            return false;
        }
        // An undecodable message names no order, so it concerns none.
        let (concerns, envelope) = match record.kind {
            RecordKind::OrderJson => (
                order_id_of(&record.value).as_deref() == Some(self.order_id),
                None,
            ),
            RecordKind::Internal => match Envelope::decode(&record.value) {
                Ok(env) => (env.body.concerns(self.order_id), Some(env)),
                Err(_) => (false, None),
            },
        };
        if !concerns {
            return false;
        }
        self.envelope = envelope;
        // Which rows the record will touch is known only afterwards; the
        // few records of one order can afford a copy of the stock rows.
        self.stock_before.clone_from(&state.stock);
        true
    }

    fn after(&mut self, record: &LogRecord, state: &PartitionState, out: &Output) {
        // The rows it changed, and the row a reservation was refused on.
        let mut skus: BTreeSet<&str> = out.stock_touched.iter().map(String::as_str).collect();
        let envelope = self.envelope.take();
        if let Some(Envelope {
            body: Message::Reserve { sku, .. },
            ..
        }) = &envelope
        {
            skus.insert(sku);
        }
        let stock = skus
            .into_iter()
            .map(|sku| {
                let before = self.stock_before.get(sku).cloned().unwrap_or_default();
                let after = state.stock.get(sku).cloned().unwrap_or_default();
                (sku.to_owned(), (before, after))
            })
            .collect();
        let mut problems = out.problems.clone();
        problems.extend(out.parked.iter().filter_map(|e| match e {
            ParkEvent::Parked(p) => Some(format!("parked: {}", p.reason)),
            _ => None,
        }));
        self.steps.push(Step {
            partition: self.partition,
            offset: record.offset,
            at_ms: record.timestamp_ms,
            record: describe(record, envelope.as_ref(), self.order_id),
            stock,
            statuses: out
                .statuses
                .iter()
                .filter(|s| s.order_id == self.order_id)
                .map(|s| match &s.reason {
                    Some(r) => format!("{} ({r})", s.status),
                    None => s.status.to_string(),
                })
                .collect(),
            sent: out
                .messages
                .iter()
                .map(|m| {
                    let to = partition_for_key(m.key.as_bytes(), self.partitions);
                    match Envelope::decode(&m.value) {
                        Ok(env) => format!("p{to}: {:?}", env.body),
                        Err(e) => format!("p{to}: undecodable message ({e})"),
                    }
                })
                .collect(),
            effects: out
                .effects
                .iter()
                .filter(|e| e.order_id == self.order_id)
                .map(|e| format!("{} {} {}", e.kind.as_str(), e.amount, e.currency))
                .collect(),
            problems,
            order_after: order_after(state, self.order_id, record.timestamp_ms),
            cause: envelope
                .and_then(|env| env.id)
                .map(|id| (id.src_partition, id.src_offset)),
        });
    }
}

/// What a record was, without its raw bytes: its message (of a results
/// record, the order's result), or a summary of the order its JSON holds.
fn describe(record: &LogRecord, envelope: Option<&Envelope>, order_id: &str) -> String {
    match envelope {
        Some(Envelope {
            body: Message::Results { results },
            ..
        }) => {
            let mine: Vec<String> = results
                .iter()
                .filter(|r| r.body.concerns(order_id))
                .map(|r| format!("{:?}", r.body))
                .collect();
            format!(
                "{} (with {} other results)",
                mine.join(", "),
                results.len() - mine.len()
            )
        }
        Some(env) => format!("{:?}", env.body),
        None => match parse_order(&record.value) {
            Ok(parsed) => {
                let lines: Vec<String> = parsed
                    .order
                    .lines
                    .iter()
                    .map(|l| format!("{} x{}", l.sku, l.quantity))
                    .collect();
                format!("order placed: {}", lines.join(", "))
            }
            Err(rejection) => format!(
                "order placed, invalid: {:?} ({})",
                rejection.reason, rejection.detail
            ),
        },
    }
}

fn order_after(state: &PartitionState, order_id: &str, now_ms: u64) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(done) = state.finished.get(&OrderKey::of(order_id), now_ms) {
        parts.push(match done.confirmed() {
            true => "finished, confirmed".to_owned(),
            false => "finished, not confirmed".to_owned(),
        });
    }
    if let Some(rec) = state.orders.get(order_id) {
        parts.push(format!("{} (seq {})", rec.status, rec.seq));
        if let Some(saga) = &rec.saga {
            let lines: Vec<String> = saga
                .lines
                .iter()
                .map(|l| format!("{} x{} {:?}", l.sku, l.quantity, l.state))
                .collect();
            parts.push(format!("saga lines: {}", lines.join(", ")));
        }
    }
    let holds: Vec<String> = state
        .holds
        .range((order_id.to_owned(), 0)..=(order_id.to_owned(), u16::MAX))
        .map(|((_, line), h)| format!("line {line}: {} x{}", h.sku, h.quantity))
        .collect();
    if !holds.is_empty() {
        parts.push(format!("holds {}", holds.join(", ")));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Replays every partition of `log` to its end and returns the order's
/// steps in causal order.
pub async fn collect(log: &dyn Log, order_id: &str, limits: Limits) -> Result<Vec<Step>, LogError> {
    let partitions = log.partition_count(Topic::Orders);
    let mut per_partition = Vec::new();
    for partition in 0..partitions {
        let mut collector = Collector {
            order_id,
            partition,
            partitions,
            stock_before: StockTable::default(),
            envelope: None,
            steps: Vec::new(),
        };
        replay_inspected(log, partition, u64::MAX, limits, &mut collector).await?;
        per_partition.push(VecDeque::from(collector.steps));
    }
    let mut steps = causal_order(per_partition);
    steps.truncate(MAX_STEPS);
    Ok(steps)
}

/// Merges the partitions' steps (each in offset order): the next step is
/// the earliest in log time among those whose sender, if it is a step of
/// the story, came already. Log time alone is not enough: records of
/// different partitions written in the same millisecond tie.
fn causal_order(mut queues: Vec<VecDeque<Step>>) -> Vec<Step> {
    let positions: BTreeSet<(u32, u64)> = queues
        .iter()
        .flatten()
        .map(|s| (s.partition, s.offset))
        .collect();
    let mut done = BTreeSet::new();
    let mut ordered = Vec::with_capacity(positions.len());
    loop {
        let heads = queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.front().map(|s| (i, s)));
        let ready = |s: &Step| {
            s.cause
                .is_none_or(|c| !positions.contains(&c) || done.contains(&c))
        };
        let earliest = |(_, s): &(usize, &Step)| (s.at_ms, s.partition);
        // Nothing ready means a cycle, which causality rules out; log time
        // then decides rather than looping forever.
        let next = heads
            .clone()
            .filter(|(_, s)| ready(s))
            .min_by_key(earliest)
            .or_else(|| heads.min_by_key(earliest))
            .map(|(i, _)| i);
        let Some(i) = next else { return ordered };
        let step = queues[i].pop_front().expect("a head was found");
        done.insert((step.partition, step.offset));
        ordered.push(step);
    }
}

/// The steps as text, one block per step.
pub fn render(order_id: &str, steps: &[Step]) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let partitions: BTreeSet<u32> = steps.iter().map(|s| s.partition).collect();
    let _ = writeln!(
        text,
        "order {order_id}: {} records on {} partitions",
        steps.len(),
        partitions.len()
    );
    for s in steps {
        let _ = writeln!(
            text,
            "p{}@{} at {} ms  {}",
            s.partition, s.offset, s.at_ms, s.record
        );
        for (sku, (before, after)) in &s.stock {
            let _ = if before == after {
                writeln!(
                    text,
                    "    stock {sku}: available {}, reserved {}, sold {} (unchanged)",
                    before.available, before.reserved, before.sold
                )
            } else {
                writeln!(
                    text,
                    "    stock {sku}: available {}→{}, reserved {}→{}, sold {}→{}",
                    before.available,
                    after.available,
                    before.reserved,
                    after.reserved,
                    before.sold,
                    after.sold
                )
            };
        }
        for status in &s.statuses {
            let _ = writeln!(text, "    status {status}");
        }
        for effect in &s.effects {
            let _ = writeln!(text, "    effect {effect}");
        }
        for sent in &s.sent {
            let _ = writeln!(text, "    sent {sent}");
        }
        for problem in &s.problems {
            let _ = writeln!(text, "    problem {problem}");
        }
        if let Some(order) = &s.order_after {
            let _ = writeln!(text, "    now {order}");
        }
    }
    text
}
