//! `--search`: the highest open-loop rate the pipeline sustains. A closed
//! loop at `--max-inflight` finds the ceiling `C` (what it completes when
//! never kept waiting); open-loop trials then bisect `[0, C]`. A trial is
//! sustainable when it completed at least `MIN_ACHIEVED_SHARE` of what it
//! offered, its p99 (coordinated-omission corrected) stayed within
//! `--slo-p99-ms`, and nothing was lost or left unfinished after its drain.
//! Each trial runs on a fresh instance and data directory, so a backlog
//! left by an overloaded trial never slows the next.

use serde::Serialize;

use super::BenchArgs;
use super::report::Report;

/// Share of the offered rate a sustainable trial completes.
pub const MIN_ACHIEVED_SHARE: f64 = 0.95;
/// Warm-up of each trial, seconds.
const TRIAL_WARMUP_S: f64 = 1.0;
/// How long a trial's backlog may take to drain; longer is not sustainable.
const TRIAL_DRAIN_S: u64 = 5;
/// Bounds of `--search-trials` (open-loop trials after the ceiling).
pub const MAX_TRIALS: u32 = 20;

/// One trial of the search.
#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    /// Offered orders/s; 0 for the closed-loop ceiling.
    pub rate: u64,
    pub achieved_rate: f64,
    pub p99_ms: f64,
    pub incomplete: u64,
    pub lost: u64,
    pub sustainable: bool,
}

/// What the search found, recorded in the final report.
#[derive(Clone, Debug, Serialize)]
pub struct Search {
    pub slo_p99_ms: f64,
    pub ceiling_rate: f64,
    /// Highest sustainable rate found (0 if none).
    pub rate: u64,
    pub trials: Vec<Trial>,
    /// Whether the measured run at `rate` met the same criteria: short
    /// trials can miss stalls that a longer run meets.
    pub confirmed: Option<bool>,
}

impl Trial {
    pub fn of(rate: u64, report: &Report, slo_p99_ms: f64) -> Trial {
        let sustainable = rate > 0
            && report.achieved_rate >= MIN_ACHIEVED_SHARE * rate as f64
            && report.latency.p99_ms <= slo_p99_ms
            && report.incomplete == 0
            && report.lost == 0;
        Trial {
            rate,
            achieved_rate: report.achieved_rate,
            p99_ms: report.latency.p99_ms,
            incomplete: report.incomplete,
            lost: report.lost,
            sustainable,
        }
    }
}

/// The settings of one trial: the run's own, shorter, at `rate`.
fn trial_args(args: &BenchArgs, rate: u64) -> BenchArgs {
    BenchArgs {
        rate,
        seconds: args.trial_seconds,
        warmup_seconds: TRIAL_WARMUP_S,
        drain_seconds: TRIAL_DRAIN_S,
        search: false,
        postgres: None,
        json: None,
        markdown: None,
        plots: None,
        ..args.clone()
    }
}

/// Runs the search; `measure` runs one trial and returns its report.
pub async fn run<F, Fut>(args: &BenchArgs, mut measure: F) -> anyhow::Result<Search>
where
    F: FnMut(BenchArgs) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Report>>,
{
    let slo = args.slo_p99_ms;
    let ceiling = measure(trial_args(args, 0)).await?;
    let mut trials = vec![Trial::of(0, &ceiling, slo)];
    eprintln!(
        "search: closed-loop ceiling {:.0} orders/s",
        ceiling.achieved_rate
    );
    let (mut lo, mut hi) = (0u64, ceiling.achieved_rate.round() as u64);
    for i in 0..args.search_trials {
        let rate = lo + (hi - lo) / 2;
        if rate == lo || rate == 0 {
            break; // the interval is down to one order/s
        }
        let report = measure(trial_args(args, rate)).await?;
        let trial = Trial::of(rate, &report, slo);
        eprintln!(
            "search: trial {}/{} at {rate}/s: achieved {:.0}/s, p99 {:.1} ms, {} unfinished, {} lost: {}",
            i + 1,
            args.search_trials,
            trial.achieved_rate,
            trial.p99_ms,
            trial.incomplete,
            trial.lost,
            if trial.sustainable {
                "sustained"
            } else {
                "not sustained"
            }
        );
        if trial.sustainable {
            lo = rate;
        } else {
            hi = rate;
        }
        trials.push(trial);
    }
    Ok(Search {
        slo_p99_ms: slo,
        ceiling_rate: ceiling.achieved_rate,
        rate: lo,
        trials,
        confirmed: None,
    })
}

impl Search {
    /// One line: the ceiling, the rate found and each trial's verdict.
    pub fn summary(&self) -> String {
        let trials: Vec<String> = self
            .trials
            .iter()
            .filter(|t| t.rate > 0)
            .map(|t| {
                let verdict = if t.sustainable { "ok" } else { "over" };
                format!("{}/s {verdict} (p99 {:.1} ms)", t.rate, t.p99_ms)
            })
            .collect();
        let measured = match self.confirmed {
            Some(true) => "; the measured run held it",
            Some(false) => {
                "; the measured run did NOT hold it (longer --trial-seconds meet the stalls it met)"
            }
            None => "",
        };
        format!(
            "highest sustained open-loop rate {}/s with p99 <= {} ms (closed-loop ceiling {:.0}/s; trials: {}){measured}",
            self.rate,
            self.slo_p99_ms,
            self.ceiling_rate,
            trials.join(", ")
        )
    }
}
