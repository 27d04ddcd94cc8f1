//! The supervisor: runs the partition tasks of the partitions this
//! instance owns, as [`Membership`](crate::pipeline::membership) changes
//! say. An `orders` partition gets a runner (after claiming a new
//! ownership epoch); an `order-status` partition gets the task that writes
//! the tracking read model's replay point and, when configured, the
//! notifications sink (the read model itself is fed on every instance). Embedded, everything is
//! assigned once at start; distributed, partitions come and go with
//! consumer-group rebalances, and a revoked partition's tasks stop (the
//! runner checkpoints) before the group may hand it on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::CheckpointConfig;
use crate::http::Health;
use crate::pipeline::backlog::Backlog;
use crate::pipeline::effects::EffectSender;
use crate::pipeline::inventory::Inventory;
use crate::pipeline::log::{Log, Topic};
use crate::pipeline::membership::{Change, Part};
use crate::pipeline::runner::{self, RunnerDeps, RunnerError, RunnerExit};
use crate::pipeline::store::{Scope, StateStore, StoreError, with_retries};
use crate::sinks::metrics::Metrics;
use crate::sinks::notifications::{self, Notifier};
use crate::sinks::tracking::{self, Tracking};
use crate::stages::processor::Limits;

/// What a partition task is told to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Run,
    /// Process what the log holds now, then stop (embedded shutdown).
    Drain,
    /// Finish the batch in hand and stop (ownership moves, or a
    /// distributed shutdown: the next owner replays the rest).
    Now,
}

/// Everything the partition tasks are built from.
pub struct Deps {
    pub log: Arc<dyn Log>,
    pub store: Arc<dyn StateStore>,
    pub effects: EffectSender,
    pub inventory: Arc<Inventory>,
    pub metrics: Arc<Metrics>,
    /// Runners publish their progress here for intake's admission control.
    pub backlog: Arc<Backlog>,
    pub checkpoint: CheckpointConfig,
    pub limits: Limits,
    pub tracking: Arc<Tracking>,
    /// The log the tracking read model releases (a release view when the
    /// notifications sink reads `order-status` too).
    pub tracking_log: Arc<dyn Log>,
    /// The notifier and its log view, when notifications are configured.
    pub notifications: Option<(Arc<Notifier>, Arc<dyn Log>)>,
    pub health: Arc<Health>,
    /// A task that fails for good reports here (the instance stops).
    pub fatal: mpsc::Sender<String>,
    /// How tasks stop at shutdown.
    pub shutdown_mode: Stop,
    /// Test seam of the park lane (`Processor::poison_customer`).
    pub poison_customer: Option<String>,
}

/// One owned partition's tasks.
struct Running {
    stop: watch::Sender<Stop>,
    tasks: Vec<JoinHandle<Option<RunnerExit>>>,
}

struct Supervisor {
    deps: Deps,
    running: BTreeMap<Part, Running>,
    became_ready: bool,
}

/// Runs until `shutdown` turns true; then stops every runner, then every
/// sink (so the sinks see the runners' last statuses), and returns the
/// runners' exits.
pub async fn run(
    deps: Deps,
    mut changes: mpsc::Receiver<Change>,
    mut shutdown: watch::Receiver<bool>,
) -> Vec<RunnerExit> {
    let mut s = Supervisor {
        deps,
        running: BTreeMap::new(),
        became_ready: false,
    };
    let mut membership_open = true;
    loop {
        tokio::select! {
            change = changes.recv(), if membership_open => match change {
                Some(Change::Assigned(parts)) => s.start(parts).await,
                Some(Change::Revoked { parts, lost, done }) => {
                    if lost {
                        tracing::warn!(?parts, "partitions lost (session expired): stopping them; their checkpoints are fenced");
                    }
                    s.stop(&parts, Stop::Now).await;
                    for (topic, p) in &parts {
                        s.deps.log.forget(*topic, *p);
                    }
                    let _ = done.send(());
                }
                // Static membership sends one assignment and is done.
                None => membership_open = false,
            },
            _ = stopped(&mut shutdown) => break,
        }
    }
    let mode = s.deps.shutdown_mode;
    let runners: Vec<Part> = s
        .running
        .keys()
        .filter(|(t, _)| *t == Topic::Orders)
        .copied()
        .collect();
    let mut exits = s.stop(&runners, mode).await;
    let sinks: Vec<Part> = s.running.keys().copied().collect();
    exits.extend(s.stop(&sinks, mode).await);
    exits.sort_by_key(|e| e.partition);
    exits
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

impl Supervisor {
    async fn start(&mut self, parts: Vec<Part>) {
        let recovered = Arc::new(Semaphore::new(0));
        let mut runners = 0;
        for part in parts {
            if self.running.contains_key(&part) {
                continue;
            }
            let (stop, stop_rx) = watch::channel(Stop::Run);
            let tasks = match part {
                (Topic::Orders, p) => {
                    match self.start_runner(p, stop_rx, recovered.clone()).await {
                        Some(task) => {
                            runners += 1;
                            vec![task]
                        }
                        None => continue,
                    }
                }
                (Topic::OrderStatus, p) => {
                    let (tasks, started) = self.start_sinks(p, stop_rx, recovered.clone());
                    runners += started;
                    tasks
                }
                // Nobody owns the park lane: it is read on demand.
                (Topic::Parked, _) => continue,
            };
            self.running.insert(part, Running { stop, tasks });
        }
        self.publish_owned();
        // Ready once the first assignment's partitions and the read
        // model have caught up.
        if !self.became_ready {
            self.became_ready = true;
            let (health, tracking) = (self.deps.health.clone(), self.deps.tracking.clone());
            tokio::spawn(async move {
                if let Ok(permits) = recovered.acquire_many(runners).await {
                    permits.forget();
                    tracking.wait_caught_up().await;
                    health.ready.store(true, Ordering::SeqCst);
                }
            });
        }
    }

    fn publish_owned(&self) {
        for topic in Topic::ALL {
            let owned = self.running.keys().filter(|(t, _)| *t == topic).count();
            self.deps
                .metrics
                .partitions_owned
                .with_label_values(&[topic.name()])
                .set(owned as i64);
        }
    }

    /// Claims the partition (a new epoch fences the former owner) and runs it.
    async fn start_runner(
        &self,
        partition: u32,
        stop: watch::Receiver<Stop>,
        recovered: Arc<Semaphore>,
    ) -> Option<JoinHandle<Option<RunnerExit>>> {
        let d = &self.deps;
        let claimed = with_retries("claim partition", || {
            d.store.claim(Scope::Orders, partition)
        });
        let epoch = match claimed.await {
            Ok(epoch) => epoch,
            Err(e) => {
                let _ = d
                    .fatal
                    .send(format!("cannot claim partition {partition}: {e}"))
                    .await;
                return None;
            }
        };
        tracing::info!(partition, epoch, "partition claimed");
        d.inventory.set_owned(partition, true);
        let deps = RunnerDeps {
            log: d.log.clone(),
            store: d.store.clone(),
            effects: d.effects.clone(),
            inventory: d.inventory.clone(),
            metrics: d.metrics.clone(),
            checkpoint: d.checkpoint.clone(),
            limits: d.limits,
            epoch,
            recovered,
            backlog: d.backlog.clone(),
            poison_customer: d.poison_customer.clone(),
        };
        let (fatal, metrics) = (d.fatal.clone(), d.metrics.clone());
        Some(tokio::spawn(async move {
            match runner::run(partition, deps, stop).await {
                Ok(exit) => Some(exit),
                Err(RunnerError::Store {
                    source: StoreError::Fenced { stored_epoch, .. },
                    ..
                }) => {
                    // Not fatal: another instance owns the partition now.
                    metrics
                        .checkpoint_fenced
                        .with_label_values(&[&partition.to_string()])
                        .inc();
                    tracing::warn!(
                        partition,
                        epoch,
                        stored_epoch,
                        "partition taken over by a newer owner; this runner stops"
                    );
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "partition runner failed");
                    let _ = fatal.send(e.to_string()).await;
                    None
                }
            }
        }))
    }

    /// The sinks of `order-status` partition `partition`, and how many of
    /// them add a permit to `started` once they know where they start (the
    /// notifications sink: readiness waits for it, so that nothing placed
    /// after `/readyz` turned 200 falls before its position).
    fn start_sinks(
        &self,
        partition: u32,
        stop: watch::Receiver<Stop>,
        started: Arc<Semaphore>,
    ) -> (Vec<JoinHandle<Option<RunnerExit>>>, u32) {
        let d = &self.deps;
        let mut tasks = Vec::new();
        let (t, store, log, rx, fatal) = (
            d.tracking.clone(),
            d.store.clone(),
            d.tracking_log.clone(),
            stop.clone(),
            d.fatal.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = tracking::run_owner(t, store, log, partition, rx).await {
                tracing::error!(error = %e, "tracking replay point failed");
                let _ = fatal.send(e.to_string()).await;
            }
            None
        }));
        let mut signalling = 0;
        if let Some((n, log)) = &d.notifications {
            let (n, log, fatal) = (n.clone(), log.clone(), d.fatal.clone());
            signalling += 1;
            tasks.push(tokio::spawn(async move {
                let run = notifications::run_partition(n, log, partition, stop, started);
                if let Err(e) = run.await {
                    tracing::error!(error = %e, "notifications sink failed");
                    let _ = fatal.send(e.to_string()).await;
                }
                None
            }));
        }
        (tasks, signalling)
    }

    /// Tells the tasks of `parts` to stop and waits for them.
    async fn stop(&mut self, parts: &[Part], mode: Stop) -> Vec<RunnerExit> {
        let stopping: Vec<(Part, Running)> = parts
            .iter()
            .filter_map(|part| self.running.remove(part).map(|r| (*part, r)))
            .collect();
        for (_, r) in &stopping {
            r.stop.send_replace(mode);
        }
        let mut exits = Vec::new();
        for ((topic, p), r) in stopping {
            for task in r.tasks {
                match task.await {
                    Ok(Some(exit)) => exits.push(exit),
                    Ok(None) => {}
                    Err(e) => tracing::error!(partition = p, error = %e, "partition task panicked"),
                }
            }
            if topic == Topic::Orders {
                self.deps.inventory.set_owned(p, false);
            }
            // The next owner reports this partition's lag from now on.
            let _ = self
                .deps
                .metrics
                .partition_lag
                .remove_label_values(&[topic.name(), &p.to_string()]);
        }
        self.publish_owned();
        exits
    }
}
