//! Deterministic simulation of the whole embedded pipeline in one thread.
//! The invariants of docs/design.md are checked after every step and at the end; a
//! failing seed reproduces exactly and is shrunk to a minimal trace.
//!
//! Production code, run as is:
//! - every partition's `Processor` and `PartitionState` (checkpoint rows,
//!   hash), the message and status encodings, the partitioner;
//! - the partition runner's core (`pipeline::runner::core::PartitionCore`):
//!   what a batch appends where (`runner::output_batches`), effects held
//!   until the output is durable, the checkpoint-due rules (on the
//!   simulated clock), the refusal of a checkpoint past unconfirmed output,
//!   recovery from a checkpoint with its outbox;
//! - the effect executor's retry policy (`pipeline::effects::policy`):
//!   attempts, payment deadline, back-off and its jitter, an
//!   authorization's give-up, a capture's or void's parking;
//! - the log's frame codec and its torn-tail recovery rule.
//!
//! Simulated: the disks (page cache, fsync, crash points, torn writes),
//! the payment gateway (latency, failures before or after executing,
//! outages, a ledger; no circuit breaker), the clock, and the scheduling
//! that production leaves to tokio (which runner reads when, when an fsync
//! lands, when calls start and answer), chosen by a seeded scheduler. The
//! async shells around the two cores (`runner::run`, the executor's tasks,
//! the checkpoint task, the reporter) are not run: `world` and `executor`
//! play their part, in simulated time.
//!
//! - `disk`        one log partition's bytes, fsync, crash, recovery
//! - `gateway`     authorize / capture / void and the payment ledger
//! - `executor`    gateway calls in simulated time, under the retry policy
//! - `world`       partitions, runner cores, checkpoints, producer, consumer
//! - `invariants`  what is checked, and when
//!
//! Determinism: all randomness comes from `StdRng::seed_from_u64`, either
//! while generating the steps from the seed or from the entropy a step
//! carries (so dropping steps while shrinking leaves the others as they
//! were); time is the simulated clock, stamped into records as the log
//! writer does; only ordered maps are iterated.

mod disk;
mod executor;
mod gateway;
mod invariants;
mod world;

#[cfg(test)]
mod tests;

use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use world::{Outcome, Stats, World, sku_count};

/// Upper bound of `--steps`: the logs of a run live in memory (about 2 KB
/// a step).
pub const MAX_STEPS: u64 = 1_000_000;
/// Bounds of `--partitions`.
pub const MAX_PARTITIONS: u32 = 64;
/// Re-runs the shrinker may spend on one failure, and steps over all of
/// them (a long failing run shrinks less, not for hours).
pub const SHRINK_RUNS: usize = 3_000;
pub const SHRINK_STEPS: usize = 20_000_000;
/// Order ids a repeated order is drawn from: the most recent ones, as a
/// retrying producer repeats (far younger than the retention).
const RECENT_IDS: u32 = 20;

/// A deliberately injected bug, for the simulation's own tests: proof that
/// the checks can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// A crash also cuts into the last durable record.
    TearDurable,
    /// A runner checkpoints before its output is durable (past the runner
    /// core's guard, on purpose).
    CheckpointUnflushed,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub steps: u64,
    pub partitions: u32,
    pub bug: Option<Bug>,
}

impl SimConfig {
    pub fn new(seed: u64, steps: u64, partitions: u32) -> SimConfig {
        SimConfig {
            seed,
            steps,
            partitions,
            bug: None,
        }
    }

    /// The limits, as a usage error.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        if self.steps > MAX_STEPS {
            return Err(crate::config::ConfigError::Usage(format!(
                "--steps {} is above the limit of {MAX_STEPS}",
                self.steps
            )));
        }
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return Err(crate::config::ConfigError::Usage(format!(
                "--partitions {} is out of range 1..={MAX_PARTITIONS}",
                self.partitions
            )));
        }
        Ok(())
    }

    /// The command line that runs this seed again.
    pub fn command(&self) -> String {
        format!(
            "orderflow sim --seed {} --steps {} --partitions {}",
            self.seed, self.steps, self.partitions
        )
    }
}

/// One scheduler decision. Steps carry their own randomness (`entropy`),
/// so a step does the same whatever steps are dropped around it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A producer writes order `o{id}` (a repeated id re-sends the first
    /// body): lines of `(sku, quantity)`, quantity 0 being invalid.
    Place {
        id: u32,
        lines: Vec<(u16, u32)>,
        decline: bool,
    },
    /// Admin: set a SKU's available stock.
    Restock { sku: u16, available: u64 },
    /// The runner of partition `p` processes up to `count` records.
    Process { p: u32, count: u32 },
    /// The runner of `p` checkpoints now, due or not, as a stop or an
    /// ownership move makes it (if its output is durable).
    Checkpoint { p: u32 },
    /// The executor starts up to `count` gateway calls.
    Effects { count: u32, entropy: u64 },
    /// fsync of partition `p` (`orders` and `order-status`).
    Fsync { p: u32 },
    /// The clock moves on; calls answered by then report.
    Advance { ms: u64 },
    /// Partition `p` crashes: its logs keep the durable prefix and a torn
    /// part of the rest, its runner restarts.
    Crash { p: u32, entropy: u64 },
    /// The whole process crashes.
    CrashAll { entropy: u64 },
    /// The gateway goes down or comes back.
    Outage { down: bool },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Place { id, lines, decline } => {
                write!(f, "place o{id}")?;
                for (sku, q) in lines {
                    write!(f, " SKU-{sku} x{q}")?;
                }
                if *decline {
                    write!(f, " (declined card)")?;
                }
                Ok(())
            }
            Step::Restock { sku, available } => write!(f, "restock SKU-{sku} to {available}"),
            Step::Process { p, count } => write!(f, "process p{p} up to {count} records"),
            Step::Checkpoint { p } => write!(f, "checkpoint p{p}"),
            Step::Effects { count, entropy } => {
                write!(
                    f,
                    "start up to {count} gateway calls (entropy {entropy:#x})"
                )
            }
            Step::Fsync { p } => write!(f, "fsync p{p}"),
            Step::Advance { ms } => write!(f, "advance clock {ms} ms"),
            Step::Crash { p, entropy } => write!(f, "crash p{p} (entropy {entropy:#x})"),
            Step::CrashAll { entropy } => write!(f, "crash the process (entropy {entropy:#x})"),
            Step::Outage { down: true } => write!(f, "gateway outage starts"),
            Step::Outage { down: false } => write!(f, "gateway outage ends"),
        }
    }
}

/// An invariant found broken, without the step it broke at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breach {
    pub invariant: &'static str,
    pub detail: String,
}

impl Breach {
    pub fn new(invariant: &'static str, detail: impl Into<String>) -> Breach {
        Breach {
            invariant,
            detail: detail.into(),
        }
    }
}

/// A broken invariant at step `step` (the step count itself: at the end).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub step: usize,
    pub detail: String,
}

/// A failing run: the violation, and the minimal trace that still breaks
/// the same invariant.
#[derive(Clone, Debug)]
pub struct Failure {
    pub config: SimConfig,
    pub violation: Violation,
    pub trace: Vec<Step>,
    /// What the minimal trace breaks (same invariant, maybe another step).
    pub trace_violation: Violation,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.violation;
        writeln!(
            f,
            "invariant `{}` violated at step {} of seed {}: {}",
            v.invariant, v.step, self.config.seed, v.detail
        )?;
        let t = &self.trace_violation;
        let at = match t.step == self.trace.len() {
            true => "in the final checks".to_owned(),
            false => format!("at step {}", t.step),
        };
        writeln!(
            f,
            "minimal trace, {} steps then drain and final checks; it breaks `{}` {at}: {}",
            self.trace.len(),
            t.invariant,
            t.detail
        )?;
        for (i, step) in self.trace.iter().enumerate() {
            writeln!(f, "  {i:>4}  {step}")?;
        }
        write!(f, "reproduce: {}", self.config.command())
    }
}

/// The steps of a seed: the shop's initial stock, then the scheduler's
/// random choices.
pub fn generate(config: &SimConfig) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let (n, skus) = (config.partitions, sku_count(config.partitions));
    let mut steps: Vec<Step> = (0..skus)
        .map(|sku| Step::Restock {
            sku: sku as u16,
            available: rng.random_range(5..40),
        })
        .chain((0..n).map(|p| Step::Fsync { p }))
        .collect();
    steps.truncate(config.steps as usize);
    let mut next_id = 0;
    while (steps.len() as u64) < config.steps {
        steps.push(random_step(&mut rng, n, skus, &mut next_id));
    }
    steps
}

fn random_step(rng: &mut StdRng, n: u32, skus: usize, next_id: &mut u32) -> Step {
    let p = rng.random_range(0..n);
    match rng.random_range(0..100) {
        0..25 => {
            let id = if *next_id > 0 && rng.random_bool(0.1) {
                next_id.saturating_sub(rng.random_range(1..=RECENT_IDS))
            } else {
                *next_id += 1;
                *next_id
            };
            let lines = (0..rng.random_range(1..=5))
                .map(|_| {
                    let quantity = if rng.random_bool(0.02) {
                        0
                    } else {
                        rng.random_range(1..4)
                    };
                    (rng.random_range(0..skus) as u16, quantity)
                })
                .collect();
            Step::Place {
                id,
                lines,
                decline: rng.random_bool(0.1),
            }
        }
        25..30 => Step::Restock {
            sku: rng.random_range(0..skus) as u16,
            available: rng.random_range(0..80),
        },
        30..52 => Step::Process {
            p,
            count: rng.random_range(1..=16),
        },
        52..57 => Step::Checkpoint { p },
        57..67 => Step::Effects {
            count: rng.random_range(1..=8),
            entropy: rng.random(),
        },
        67..82 => Step::Fsync { p },
        82..90 => Step::Advance {
            ms: rng.random_range(1..=500),
        },
        90..98 => Step::Crash {
            p,
            entropy: rng.random(),
        },
        98 => Step::CrashAll {
            entropy: rng.random(),
        },
        _ => Step::Outage {
            down: rng.random_bool(0.5),
        },
    }
}

/// Runs `steps` in a fresh world, checking after every step, then drains
/// and runs the final checks.
/// A production assertion that fires (a panic) is a violation too, named
/// `assertion`, so it is shrunk and reproduced like the others.
pub fn run_steps(config: &SimConfig, steps: &[Step]) -> Result<Outcome, Violation> {
    let mut world = World::new(config.partitions, config.bug);
    for (i, step) in steps.iter().enumerate() {
        guarded(|| world.step(step)).map_err(|b| at(b, i))?;
    }
    let end = steps.len();
    guarded(|| world.drain().and_then(|()| world.check_final())).map_err(|b| at(b, end))?;
    Ok(world.outcome())
}

/// Runs `f`, turning a panic into a breach. The world is dropped after a
/// breach, so state a panic left half-changed is never looked at again.
fn guarded(f: impl FnOnce() -> Result<(), Breach>) -> Result<(), Breach> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("a panic without a message");
        Err(Breach::new("assertion", message.to_owned()))
    })
}

fn at(b: Breach, step: usize) -> Violation {
    Violation {
        invariant: b.invariant,
        step,
        detail: b.detail,
    }
}

/// Runs a seed; on a violation, shrinks it to a minimal trace.
pub fn run(config: &SimConfig) -> Result<Outcome, Box<Failure>> {
    let steps = generate(config);
    let violation = match run_steps(config, &steps) {
        Ok(outcome) => return Ok(outcome),
        Err(v) => v,
    };
    let (trace, trace_violation) = shrink(config, steps, &violation, SHRINK_RUNS);
    Err(Box::new(Failure {
        config: config.clone(),
        violation,
        trace,
        trace_violation,
    }))
}

/// Drops chunks of steps, then single steps, while the run still breaks
/// the same invariant (at most `budget` re-runs and [`SHRINK_STEPS`]
/// steps in all; each run is deterministic).
pub fn shrink(
    config: &SimConfig,
    steps: Vec<Step>,
    violation: &Violation,
    budget: usize,
) -> (Vec<Step>, Violation) {
    let target = violation.invariant;
    let mut best = violation.clone();
    let mut current = steps;
    current.truncate(best.step + 1);
    let (mut runs, mut spent) = (0, 0);
    let mut chunk = current.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        while i < current.len() && runs < budget && spent < SHRINK_STEPS {
            let mut candidate = current.clone();
            candidate.drain(i..(i + chunk).min(current.len()));
            runs += 1;
            spent += candidate.len();
            match run_steps(config, &candidate) {
                Err(v) if v.invariant == target => {
                    candidate.truncate(v.step + 1);
                    current = candidate;
                    best = v;
                }
                _ => i += chunk,
            }
        }
        if chunk == 1 || runs >= budget || spent >= SHRINK_STEPS {
            return (current, best);
        }
        chunk = chunk.div_ceil(2);
    }
}
