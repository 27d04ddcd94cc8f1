//! `orderflow sim`: runs seeds of the deterministic simulation
//! (`crate::sim`), one summary line per seed and a total; exits 1 on a
//! violation, printing the shrunk trace and the command that reproduces it.

use std::time::Instant;

use clap::Args;

use super::CliError;
use crate::sim::{self, SimConfig};

#[derive(Args, Debug)]
pub struct SimArgs {
    /// First seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Steps per seed (at most 1,000,000).
    #[arg(long, default_value_t = 10_000)]
    pub steps: u64,
    /// Seeds to run: SEED, SEED+1, ..., SEED+K-1.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub seeds: u64,
    /// Partitions of the simulated log (1 to 64).
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
}

/// Runs the seeds; `Ok(false)` (exit 1) at the first violation.
pub fn run(args: &SimArgs) -> Result<bool, CliError> {
    if args.seeds == 0 {
        return Err(CliError::Usage("--seeds must be at least 1".into()));
    }
    let last = args
        .seed
        .checked_add(args.seeds - 1)
        .ok_or_else(|| CliError::Usage("--seed + --seeds overflows u64".into()))?;
    // A production assertion that fires is reported as a violation (with
    // its message) and shrunk: the default hook would print every panic of
    // every shrinking re-run.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = run_seeds(args, last);
    std::panic::set_hook(hook);
    result
}

fn run_seeds(args: &SimArgs, last: u64) -> Result<bool, CliError> {
    let started = Instant::now();
    let (mut steps, mut crash_points, mut torn_writes) = (0, 0, 0);
    for seed in args.seed..=last {
        let config = SimConfig::new(seed, args.steps, args.partitions);
        config.validate()?;
        let run_started = Instant::now();
        match sim::run(&config) {
            Ok(o) => {
                println!(
                    "sim seed={seed} steps={} partitions={} crash_points={} torn_writes={} lost_unsynced={} cascaded_restarts={} orders={} acknowledged={} terminal={} {} captured={} state={} elapsed_ms={}",
                    args.steps,
                    args.partitions,
                    o.stats.crash_points,
                    o.stats.torn_writes,
                    o.stats.lost_records,
                    o.stats.cascaded_restarts,
                    o.orders,
                    o.acked,
                    o.terminal,
                    o.by_status
                        .iter()
                        .map(|(status, n)| format!("{status}={n}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    o.captured,
                    &o.state_hash[..16],
                    run_started.elapsed().as_millis()
                );
                steps += args.steps;
                crash_points += o.stats.crash_points;
                torn_writes += o.stats.torn_writes;
            }
            Err(failure) => {
                let v = &failure.violation;
                println!(
                    "sim seed={seed} FAILED invariant={} step={}",
                    v.invariant, v.step
                );
                eprintln!("{failure}");
                return Ok(false);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "sim total seeds={} steps={steps} crash_points={crash_points} torn_writes={torn_writes} elapsed_ms={} crash_points_per_s={:.0}",
        args.seeds,
        (secs * 1000.0) as u64,
        crash_points as f64 / secs.max(1e-9)
    );
    Ok(true)
}
