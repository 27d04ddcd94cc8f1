//! The simulated world: every `orders` partition with its runner, the
//! `order-status` partitions and their consumer, the producer, the effect
//! executor and the gateway, all driven one step at a time on a simulated
//! clock.
//!
//! Each runner is the production runner core
//! (`crate::pipeline::runner::core::PartitionCore`): it applies a batch to
//! the production `Processor`, says what to append where, holds the
//! batch's effects until the output is confirmed durable, decides when a
//! checkpoint is due (by the simulated clock) and refuses one past output
//! that is not durable. What this module adds is what production does with
//! I/O: it reads only durable records from the simulated disks, appends the
//! output to them and confirms it once an fsync made it durable (the
//! runner waits until then, as `runner::run` awaits its appends); it
//! applies a checkpoint write atomically (blobs, manifest and offset
//! together, as one redb transaction); after a crash it recovers a new core from the
//! checkpoint, resubmits its outbox and replays the tail. An append that a
//! crash drops before it was durable fails the runner that waited for it,
//! which restarts the same way. Checkpoints happen when the core says they
//! are due, after each batch, and when a `Checkpoint` step forces one (as a
//! stop or an ownership move does in production).

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::config::CheckpointConfig;
use crate::domain::message::KeyedResult;
use crate::domain::partition::partition_for_key;
use crate::domain::{Envelope, Message, RecordKind, Status, StatusEvent};
use crate::pipeline::effects::result_records;
use crate::pipeline::log::{Record, Topic};
use crate::pipeline::runner::core::PartitionCore;
use crate::pipeline::store::{BlobRef, SnapshotWrite};
use crate::stages::snapshot::{self, Manifest};
use crate::stages::state::Stock;
use crate::stages::{Output, PartitionState, Processor};

use super::disk::SimDisk;
use super::executor::{Executor, FAILURE_RATE};
use super::gateway::{DECLINED_TOKEN, SimGateway};
use super::invariants::{StatusView, check_settled, check_stock};
use super::{Breach, Bug, Step};

/// The runners' checkpoint rules: production's, with a message count
/// small enough for a run of a few thousand steps to reach it.
const CHECKPOINT: CheckpointConfig = CheckpointConfig {
    every_messages: 100,
    every_ms: 1_000,
};
/// Ownership epoch of every checkpoint (one process owns every partition).
const EPOCH: u64 = 1;
/// Small, so that busy rounds split their results over several records.
const SIM_MAX_RECORD_BYTES: usize = 4096;
/// Simulated wall clock at the start (ms since the Unix epoch).
const START_MS: u64 = 1_700_000_000_000;
/// Rounds the final drain may take before it counts as stuck.
const MAX_DRAIN_ROUNDS: usize = 100_000;

/// Which simulated log a runner waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LogRef {
    Orders(usize),
    Status(usize),
}

struct Runner {
    core: PartitionCore,
    /// Output appended but not yet durable: the runner waits for it before
    /// it confirms the output to its core.
    waiting: Vec<(LogRef, u64)>,
}

impl Runner {
    /// A runner recovered from checkpoint `cp` at `now_ms`.
    fn recover(p: u32, partitions: u32, cp: &Checkpoint, now_ms: u64) -> Result<Runner, Breach> {
        let breach = |e: snapshot::SnapshotError| Breach::new("checkpoint-loads", e.to_string());
        let (state, manifest) = match &cp.manifest {
            None => (PartitionState::default(), Manifest::empty(p)),
            Some(bytes) => {
                let manifest = Manifest::decode(p, bytes).map_err(breach)?;
                let limits = crate::stages::processor::Limits::default().finished;
                (
                    snapshot::restore(&manifest, &cp.blobs, limits).map_err(breach)?,
                    manifest,
                )
            }
        };
        let processor = processor(p, partitions, state);
        // `order-status` has as many partitions as `orders` here.
        let core =
            PartitionCore::recover(processor, cp.next, manifest, partitions, CHECKPOINT, now_ms);
        Ok(Runner {
            core,
            waiting: Vec::new(),
        })
    }

    fn state(&self) -> &PartitionState {
        self.core.state()
    }
}

/// What the simulated state store holds of one partition.
#[derive(Default)]
struct Checkpoint {
    manifest: Option<Vec<u8>>,
    blobs: BTreeMap<BlobRef, Vec<u8>>,
    next: u64,
}

impl Checkpoint {
    /// Applies a write atomically: blobs, manifest, offset and deletions together.
    fn write(&mut self, write: SnapshotWrite) {
        assert_eq!(write.epoch, EPOCH, "a checkpoint of another owner");
        self.blobs.extend(write.blobs);
        for blob in &write.drop {
            self.blobs.remove(blob);
        }
        self.manifest = Some(write.manifest);
        self.next = write.next_offset;
    }
}

struct Placed {
    home: String,
    body: Vec<u8>,
    lines: Vec<(String, u32)>,
    amount: u64,
}

#[derive(Default)]
struct Producer {
    /// Order bodies by id: a repeated id re-sends the first body, as a
    /// producer retrying does.
    placed: BTreeMap<String, Placed>,
    /// Appended, waiting to be durable before the producer is answered.
    pending: Vec<(String, usize, u64)>,
    /// Answered: durable at `(partition, offset)`.
    acked: BTreeMap<String, (usize, u64)>,
    /// The same, by partition and offset.
    acked_at: Vec<BTreeMap<u64, String>>,
}

/// Counters of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Crashes simulated (of one partition or of the whole process).
    pub crash_points: u64,
    /// Log partitions whose torn tail recovery truncated (a partial or
    /// damaged frame; one crash tears up to two logs per partition).
    pub torn_writes: u64,
    /// Records written but not durable that crashes dropped.
    pub lost_records: u64,
    /// Runner restarts caused by an append lost in another partition's crash.
    pub cascaded_restarts: u64,
}

/// What a finished run leaves, for the summary line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stats: Stats,
    pub orders: usize,
    pub acked: usize,
    pub terminal: usize,
    /// Orders by last status (the paths the run went through).
    pub by_status: BTreeMap<Status, usize>,
    pub captured: u64,
    /// SHA-256 over every partition's state hash: equal runs, equal hash.
    pub state_hash: String,
}

pub struct World {
    n: usize,
    skus: Vec<String>,
    orders: Vec<SimDisk>,
    statuses: Vec<SimDisk>,
    runners: Vec<Runner>,
    checkpoints: Vec<Checkpoint>,
    executor: Executor,
    gateway: SimGateway,
    producer: Producer,
    view: StatusView,
    status_next: Vec<u64>,
    clock_ms: u64,
    outage: bool,
    failure_rate: f64,
    bug: Option<Bug>,
    stats: Stats,
}

fn processor(partition: u32, partitions: u32, state: PartitionState) -> Processor {
    Processor::new(partition, partitions, state)
}

/// The state a runner would checkpoint now loads back to itself (a whole
/// snapshot, written from nothing and read back).
fn check_snapshot_loads(partition: u32, state: &PartitionState) -> Result<(), Breach> {
    let (manifest, blobs) = snapshot::full(state, partition);
    let limits = state.finished.limits();
    match snapshot::restore(&manifest, &blobs, limits) {
        Ok(back) if back == *state => Ok(()),
        Ok(_) => Err(Breach::new(
            "snapshot-loads",
            format!("partition {partition}: the snapshot loads back to another state"),
        )),
        Err(e) => Err(Breach::new("snapshot-loads", e.to_string())),
    }
}

/// The SKUs of a world of `partitions` partitions.
pub fn sku_count(partitions: u32) -> usize {
    (2 * partitions as usize).max(6)
}

impl World {
    pub fn new(partitions: u32, bug: Option<Bug>) -> World {
        let n = partitions as usize;
        World {
            n,
            skus: (0..sku_count(partitions))
                .map(|i| format!("SKU-{i}"))
                .collect(),
            orders: (0..n).map(|_| SimDisk::default()).collect(),
            statuses: (0..n).map(|_| SimDisk::default()).collect(),
            runners: (0..partitions)
                .map(|p| Runner::recover(p, partitions, &Checkpoint::default(), START_MS))
                .collect::<Result<_, _>>()
                .expect("an empty checkpoint loads"),
            checkpoints: (0..n).map(|_| Checkpoint::default()).collect(),
            executor: Executor::default(),
            gateway: SimGateway::default(),
            producer: Producer {
                acked_at: vec![BTreeMap::new(); n],
                ..Producer::default()
            },
            view: StatusView::default(),
            status_next: vec![0; n],
            clock_ms: START_MS,
            outage: false,
            failure_rate: FAILURE_RATE,
            bug,
            stats: Stats::default(),
        }
    }

    /// Applies one step, then checks the invariants that hold at every step.
    pub fn step(&mut self, step: &Step) -> Result<(), Breach> {
        let n = self.n as u32;
        let mut crashed: Vec<usize> = Vec::new();
        match step {
            Step::Place { id, lines, decline } => self.place(*id, lines, *decline),
            Step::Restock { sku, available } => self.restock(*sku as usize, *available),
            Step::Process { p, count } => self.process((p % n) as usize, *count as usize)?,
            Step::Checkpoint { p } => self.checkpoint((p % n) as usize),
            Step::Effects { count, entropy } => self.run_effects(*count as usize, *entropy)?,
            Step::Fsync { p } => self.fsync((p % n) as usize),
            Step::Advance { ms } => {
                self.clock_ms += ms;
                self.deliver();
            }
            Step::Crash { p, entropy } => {
                crashed.push((p % n) as usize);
                self.crash(&crashed, false, *entropy)?;
            }
            Step::CrashAll { entropy } => {
                crashed.extend(0..self.n);
                self.crash(&crashed, true, *entropy)?;
            }
            Step::Outage { down } => self.outage = *down,
        }
        self.after_step(&crashed)
    }

    fn place(&mut self, id: u32, lines: &[(u16, u32)], decline: bool) {
        let order_id = format!("o{id}");
        if !self.producer.placed.contains_key(&order_id) {
            let placed = self.order_body(&order_id, lines, decline);
            self.producer.placed.insert(order_id.clone(), placed);
        }
        let placed = &self.producer.placed[&order_id];
        let p = partition_for_key(placed.home.as_bytes(), self.n as u32) as usize;
        let offset = self.orders[p].append(
            RecordKind::OrderJson,
            self.clock_ms,
            placed.home.as_bytes(),
            &placed.body,
        );
        self.producer.pending.push((order_id, p, offset));
    }

    /// The contract's order JSON; a quantity of 0 makes it invalid (it
    /// ends `rejected`).
    fn order_body(&self, order_id: &str, lines: &[(u16, u32)], decline: bool) -> Placed {
        let lines: Vec<(String, u32, u64)> = lines
            .iter()
            .map(|&(s, q)| {
                let s = usize::from(s) % self.skus.len();
                (self.skus[s].clone(), q, 100 + 10 * s as u64)
            })
            .collect();
        let json_lines: Vec<_> = lines
            .iter()
            .map(|(sku, q, price)| serde_json::json!({"sku": sku, "quantity": q, "unit_price": price}))
            .collect();
        let token = if decline { DECLINED_TOKEN } else { "tok_visa" };
        let body = serde_json::json!({"order_id": order_id, "customer_id": "cus-1",
            "currency": "USD", "lines": json_lines, "payment": {"token": token}});
        Placed {
            home: lines.first().map(|l| l.0.clone()).unwrap_or_default(),
            body: serde_json::to_vec(&body).expect("JSON serializes"),
            amount: lines
                .iter()
                .map(|(_, q, price)| u64::from(*q) * price)
                .sum(),
            lines: lines.into_iter().map(|(sku, q, _)| (sku, q)).collect(),
        }
    }

    fn restock(&mut self, sku: usize, available: u64) {
        let sku = self.skus[sku % self.skus.len()].clone();
        let body = Message::SetStock {
            sku: sku.clone(),
            available,
        };
        self.append_internal(&sku, body);
    }

    /// Appends a message from intake or the executor (no id: deduplicated
    /// by state); nobody waits for it.
    fn append_internal(&mut self, key: &str, body: Message) {
        let p = partition_for_key(key.as_bytes(), self.n as u32) as usize;
        let value = Envelope::new(None, body).encode();
        self.orders[p].append(RecordKind::Internal, self.clock_ms, key.as_bytes(), &value);
    }

    fn fsync(&mut self, p: usize) {
        self.orders[p].fsync();
        self.statuses[p].fsync();
    }

    /// One batch of the runner of `p`: up to `count` durable records.
    fn process(&mut self, p: usize, count: usize) -> Result<(), Breach> {
        if !self.try_flush(p) {
            return Ok(()); // still waiting for its last output to be durable
        }
        let disk = &self.orders[p];
        let runner = &mut self.runners[p];
        let next = runner.core.next_offset();
        let end = disk.durable().min(next.saturating_add(count as u64));
        let records = (next..end)
            .map(|offset| {
                disk.input(offset).map_err(|e| {
                    Breach::new(
                        "log-readable",
                        format!("partition {p} offset {offset}: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let flush = runner.core.apply(records);
        if let Some(problem) = flush.problems.first() {
            return Err(Breach::new(
                "records-apply",
                format!("partition {p}: {problem}"),
            ));
        }
        self.append_output(p, flush.appends)?;
        // Nothing to wait for confirms at once, as an empty append returns.
        self.try_flush(p);
        Ok(())
    }

    /// Appends a batch's output, routed by the core (saga messages to
    /// `orders`, statuses to `order-status`); the runner waits until it is
    /// durable.
    fn append_output(
        &mut self,
        p: usize,
        appends: BTreeMap<(Topic, u32), Vec<Record>>,
    ) -> Result<(), Breach> {
        let runner = &mut self.runners[p];
        for ((topic, q), records) in appends {
            let (disk, log) = match topic {
                Topic::Orders => (&mut self.orders[q as usize], LogRef::Orders(q as usize)),
                Topic::OrderStatus => (&mut self.statuses[q as usize], LogRef::Status(q as usize)),
                Topic::Parked => {
                    return Err(Breach::new(
                        "records-apply",
                        format!("partition {p} parked a record"),
                    ));
                }
            };
            for r in records {
                let offset = disk.append(r.kind, self.clock_ms, &r.key, &r.value);
                runner.waiting.push((log, offset));
            }
        }
        Ok(())
    }

    /// Whether the runner of `p` has no output waiting to be durable. Once
    /// it has none, the output is confirmed to its core, the effects the
    /// core held go to the executor, and a checkpoint is taken if the core
    /// says one is due (as `runner::run` does after every batch).
    fn try_flush(&mut self, p: usize) -> bool {
        let runner = &mut self.runners[p];
        let (orders, statuses) = (&self.orders, &self.statuses);
        let durable = |log: &LogRef| match *log {
            LogRef::Orders(q) => orders[q].durable(),
            LogRef::Status(q) => statuses[q].durable(),
        };
        if !runner.waiting.iter().all(|(log, off)| durable(log) > *off) {
            return false;
        }
        runner.waiting.clear();
        if runner.core.is_unconfirmed() {
            for effect in runner.core.confirm_durable() {
                self.executor.submit(effect, self.clock_ms);
            }
        }
        // Checkpoint writes are instant here: none is ever in flight.
        if runner.core.checkpoint_due(self.clock_ms) {
            let write = runner.core.take_checkpoint(EPOCH, self.clock_ms);
            self.checkpoints[p].write(write);
        }
        true
    }

    /// A checkpoint the scheduler forces, taken only once the output before
    /// it is durable (the injected bug takes it anyway, past the core's
    /// guard).
    fn checkpoint(&mut self, p: usize) {
        let flushed = self.try_flush(p);
        let runner = &mut self.runners[p];
        let write = match (flushed, self.bug) {
            (true, _) => runner.core.take_checkpoint(EPOCH, self.clock_ms),
            (false, Some(Bug::CheckpointUnflushed)) => {
                runner.core.checkpoint_unguarded(EPOCH, self.clock_ms)
            }
            (false, _) => return,
        };
        self.checkpoints[p].write(write);
    }

    fn run_effects(&mut self, count: usize, entropy: u64) -> Result<(), Breach> {
        let mut rng = StdRng::seed_from_u64(entropy);
        let shape = (self.failure_rate, self.outage);
        self.executor
            .start(count, self.clock_ms, shape, &mut rng, &mut self.gateway)?;
        self.deliver();
        Ok(())
    }

    /// Appends the results of the calls answered by now (not waited for:
    /// a lost result leaves its effect in the outbox).
    /// Like the executor's reporter, the results of one partition go out
    /// together, as results records.
    fn deliver(&mut self) {
        let mut by_partition: BTreeMap<usize, Vec<KeyedResult>> = BTreeMap::new();
        for (key, body) in self.executor.deliver(self.clock_ms) {
            let p = partition_for_key(key.as_bytes(), self.n as u32) as usize;
            by_partition
                .entry(p)
                .or_default()
                .push(KeyedResult { key, body });
        }
        for (p, results) in by_partition {
            for record in result_records(&results, SIM_MAX_RECORD_BYTES) {
                self.orders[p].append(record.kind, self.clock_ms, &record.key, &record.value);
            }
        }
    }

    /// A crash of the partitions `parts` (their logs lose what was not
    /// durable, their runners restart), or of the whole process.
    fn crash(&mut self, parts: &[usize], whole: bool, entropy: u64) -> Result<(), Breach> {
        self.stats.crash_points += 1;
        let mut rng = StdRng::seed_from_u64(entropy);
        let tear_durable = self.bug == Some(Bug::TearDurable);
        for &p in parts {
            for (topic, disk) in [
                ("orders", &mut self.orders[p]),
                ("order-status", &mut self.statuses[p]),
            ] {
                let torn = disk.crash(rng.random(), tear_durable).map_err(|e| {
                    Breach::new("log-recovers", format!("{topic} partition {p}: {e}"))
                })?;
                self.stats.torn_writes += u64::from(torn.torn_tail);
                self.stats.lost_records += torn.lost_records;
            }
        }
        if whole {
            self.executor.abandon();
            self.producer.pending.clear();
        }
        let orders = &self.orders;
        self.producer
            .pending
            .retain(|(_, p, offset)| orders[*p].written() > *offset);
        let mut restart: BTreeSet<usize> = parts.iter().copied().collect();
        for (q, runner) in self.runners.iter().enumerate() {
            let lost = runner.waiting.iter().any(|(log, offset)| match *log {
                LogRef::Orders(d) => self.orders[d].written() <= *offset,
                LogRef::Status(d) => self.statuses[d].written() <= *offset,
            });
            if lost && restart.insert(q) {
                self.stats.cascaded_restarts += 1;
            }
        }
        for p in restart {
            self.restart_runner(p)?;
        }
        Ok(())
    }

    /// Load the checkpoint, resubmit the outbox, replay from its offset.
    fn restart_runner(&mut self, p: usize) -> Result<(), Breach> {
        let runner = Runner::recover(p as u32, self.n as u32, &self.checkpoints[p], self.clock_ms)?;
        for effect in runner.core.pending_effects() {
            self.executor.submit(effect, self.clock_ms);
        }
        self.runners[p] = runner;
        Ok(())
    }

    /// `crashed`: the partitions whose logs a crash just recovered.
    fn after_step(&mut self, crashed: &[usize]) -> Result<(), Breach> {
        self.acknowledge();
        self.consume_statuses()?;
        for (p, runner) in self.runners.iter().enumerate() {
            check_stock(p as u32, runner.state())?;
            check_snapshot_loads(p as u32, runner.state())?;
        }
        if !crashed.is_empty() {
            self.check_durable(crashed)?;
        }
        Ok(())
    }

    /// The producer is answered for what became durable.
    fn acknowledge(&mut self) {
        let orders = &self.orders;
        let Producer {
            pending,
            acked,
            acked_at,
            ..
        } = &mut self.producer;
        pending.retain(|(id, p, offset)| {
            if orders[*p].durable() <= *offset {
                return true;
            }
            if !acked.contains_key(id) {
                acked.insert(id.clone(), (*p, *offset));
                acked_at[*p].insert(*offset, id.clone());
            }
            false
        });
    }

    /// The tracking consumer reads the durable status records.
    fn consume_statuses(&mut self) -> Result<(), Breach> {
        for q in 0..self.n {
            while self.status_next[q] < self.statuses[q].durable() {
                let offset = self.status_next[q];
                let record = self.statuses[q].read(offset).map_err(|e| {
                    Breach::new("log-readable", format!("order-status {q}:{offset}: {e}"))
                })?;
                let event = StatusEvent::decode(record.value)
                    .map_err(|e| Breach::new("log-readable", e.to_string()))?;
                self.view.apply(event)?;
                self.status_next[q] += 1;
            }
        }
        Ok(())
    }

    /// Invariant 6 after a crash: every acknowledged order is still in the
    /// durable log, and nothing a checkpoint or a consumer went past is
    /// gone. Only the crashed partitions' logs changed, and only in their
    /// active segment: recovery never rewrites a sealed one (it refuses
    /// damage there as corrupt).
    fn check_durable(&self, crashed: &[usize]) -> Result<(), Breach> {
        for &p in crashed {
            let disk = &self.orders[p];
            for (&offset, id) in self.producer.acked_at[p].range(disk.segment_base()..) {
                let body = &self.producer.placed[id].body;
                let kept = disk.durable() > offset
                    && disk.read(offset).is_ok_and(|r| r.value == body.as_slice());
                if !kept {
                    return Err(Breach::new(
                        "acknowledged-not-lost",
                        format!(
                            "order {id}, acknowledged at partition {p} offset {offset}, is gone"
                        ),
                    ));
                }
            }
        }
        for &p in crashed {
            let (cp, log) = (self.checkpoints[p].next, self.orders[p].durable());
            let (read, status_log) = (self.status_next[p], self.statuses[p].durable());
            if cp > log || read > status_log {
                return Err(Breach::new(
                    "durable-not-lost",
                    format!(
                        "partition {p}: checkpoint at {cp} of {log} records, status consumer at {read} of {status_log}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Runs to quiescence with no more crashes, failures or outage: every
    /// log synced and read, every output durable, every effect done.
    pub fn drain(&mut self) -> Result<(), Breach> {
        self.outage = false;
        self.failure_rate = 0.0;
        for round in 0..MAX_DRAIN_ROUNDS {
            for p in 0..self.n {
                self.fsync(p);
            }
            self.after_step(&[])?;
            let mut busy = false;
            for p in 0..self.n {
                let before = self.runners[p].core.next_offset();
                self.process(p, usize::MAX)?;
                let runner = &self.runners[p];
                busy |= runner.core.next_offset() != before || !runner.waiting.is_empty();
            }
            if !self.executor.is_idle() {
                busy = true;
                let mut rng = StdRng::seed_from_u64(round as u64);
                self.executor.start(
                    usize::MAX,
                    self.clock_ms,
                    (0.0, false),
                    &mut rng,
                    &mut self.gateway,
                )?;
                if let Some(due) = self.executor.next_due_ms() {
                    self.clock_ms = self.clock_ms.max(due);
                }
                self.deliver();
            }
            busy |= !self
                .orders
                .iter()
                .chain(&self.statuses)
                .all(SimDisk::is_synced);
            if !busy {
                return Ok(());
            }
        }
        Err(Breach::new(
            "drain-quiesces",
            format!("still busy after {MAX_DRAIN_ROUNDS} rounds"),
        ))
    }

    /// The end-of-run invariants, after [`World::drain`].
    pub fn check_final(&self) -> Result<(), Breach> {
        for id in self.producer.acked.keys() {
            if !self.view.last(id).is_some_and(Status::is_terminal) {
                return Err(Breach::new(
                    "acknowledged-terminal",
                    format!("order {id} ended {:?}", self.view.last(id)),
                ));
            }
        }
        for (id, history) in &self.view.orders {
            let last = history.last().map(|e| e.status);
            if !last.is_some_and(Status::is_terminal) {
                return Err(Breach::new(
                    "terminal-at-end",
                    format!("order {id} ended {last:?}"),
                ));
            }
        }
        for (p, runner) in self.runners.iter().enumerate() {
            check_settled(p as u32, runner.state())?;
        }
        self.check_money_and_stock()?;
        self.check_replay()
    }

    /// Invariant 4 and the books: confirmed orders captured once, nothing
    /// else captured, every other authorization voided, money captured =
    /// confirmed amounts, sold stock = confirmed quantities.
    fn check_money_and_stock(&self) -> Result<(), Breach> {
        let confirmed = |id: &str| self.view.last(id) == Some(Status::Confirmed);
        for (payment_id, intent) in &self.gateway.intents {
            let ok = match confirmed(&intent.order_id) {
                true => intent.captures == 1 && !intent.voided,
                false => intent.captures == 0 && intent.voided,
            };
            if !ok {
                return Err(Breach::new(
                    "captured-iff-confirmed",
                    format!(
                        "{payment_id} of {} ({:?}): {intent:?}",
                        intent.order_id,
                        self.view.last(&intent.order_id)
                    ),
                ));
            }
        }
        let (captured, by_order) = self.gateway.captured();
        let mut expected = 0;
        let mut sold: BTreeMap<&str, u64> = BTreeMap::new();
        for id in self.view.orders.keys().filter(|id| confirmed(id)) {
            if by_order.get(id.as_str()) != Some(&1) {
                return Err(Breach::new(
                    "captured-iff-confirmed",
                    format!("order {id} confirmed, not captured once"),
                ));
            }
            let placed = &self.producer.placed[id];
            expected += placed.amount;
            for (sku, q) in &placed.lines {
                *sold.entry(sku).or_default() += u64::from(*q);
            }
        }
        if captured != expected {
            return Err(Breach::new(
                "money-agrees",
                format!("captured {captured}, confirmed orders total {expected}"),
            ));
        }
        for runner in &self.runners {
            for (sku, stock) in runner.state().stock.iter() {
                let want = sold.get(sku.as_str()).copied().unwrap_or(0);
                if stock.sold != want || stock.reserved != 0 {
                    return Err(Breach::new(
                        "stock-agrees",
                        format!("{sku}: {stock:?}, confirmed orders bought {want}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Invariant 5: replaying each partition from offset 0 gives the live
    /// state hash.
    fn check_replay(&self) -> Result<(), Breach> {
        for p in 0..self.n {
            let mut replay = processor(p as u32, self.n as u32, PartitionState::default());
            let mut out = Output::default();
            let disk = &self.orders[p];
            for offset in 0..disk.durable() {
                let input = disk
                    .input(offset)
                    .map_err(|e| Breach::new("log-readable", e.to_string()))?;
                replay.apply(input, &mut out);
                out.clear();
            }
            let live = self.runners[p].state().hash();
            if replay.state.hash() != live {
                return Err(Breach::new(
                    "replay-determinism",
                    format!("partition {p}: replay from 0 differs from the live state"),
                ));
            }
        }
        Ok(())
    }

    pub fn outcome(&self) -> Outcome {
        let mut h = Sha256::new();
        for runner in &self.runners {
            h.update(runner.state().hash());
        }
        Outcome {
            stats: self.stats,
            orders: self.view.orders.len(),
            acked: self.producer.acked.len(),
            terminal: self.view.terminal_count(),
            by_status: self.view.by_status(),
            captured: self.gateway.captured().0,
            state_hash: hex::encode(h.finalize()),
        }
    }

    /// SKU number `i` of this world.
    pub fn sku(&self, i: usize) -> &str {
        &self.skus[i % self.skus.len()]
    }

    /// The live stock counters of a SKU.
    pub fn stock(&self, sku: &str) -> Option<&Stock> {
        let p = partition_for_key(sku.as_bytes(), self.n as u32) as usize;
        self.runners[p].state().stock.get(sku)
    }

    /// An order's last status, as the tracking consumer saw it.
    pub fn status(&self, order_id: &str) -> Option<Status> {
        self.view.last(order_id)
    }
}
