//! The supervisor: runs the partition tasks of the partitions this
//! instance owns, as [`Membership`](crate::pipeline::membership) changes
//! say. An `orders` partition gets a runner (after claiming a new
//! ownership epoch); an `order-status` partition gets the task that writes
//! the tracking read model's replay point and, when configured, the
//! notifications sink (the read model itself is fed on every instance). Embedded, everything is
//! assigned once at start; distributed, partitions come and go with
//! consumer-group rebalances, and a revoked partition's tasks stop (the
//! runner checkpoints) before the group may hand it on.
//!
//! Every partition task runs under a watcher ([`spawn_watched`]) that sees
//! it die the moment it panics: it restarts it by the normal start path
//! (claim, load the checkpoint, replay) after a back-off, counting each
//! restart, and gives up on a task that keeps dying
//! ([`crate::pipeline::restart`]): the instance turns not ready, naming
//! the task; distributed, it also stops (the fatal path), which leaves the
//! consumer group so another instance takes the partitions. A task that
//! fails with an error (not a panic) reports it on the fatal path, as
//! before: those are failures of the log or store, not of the task.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::CheckpointConfig;
use crate::http::Health;
use crate::pipeline::backlog::Backlog;
use crate::pipeline::effects::EffectSender;
use crate::pipeline::inventory::Inventory;
use crate::pipeline::log::{Log, Topic};
use crate::pipeline::membership::{Change, Part};
use crate::pipeline::restart::{Deaths, RestartPolicy, SignalOnce, Verdict};
use crate::pipeline::runner::{self, PanicFault, RunnerDeps, RunnerError, RunnerExit};
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
    /// Test seam of supervision: this partition's runner panics.
    pub panic_runner: Option<(u32, Arc<PanicFault>)>,
    /// How the partition tasks are watched and restarted.
    pub supervision: Supervision,
}

/// What the watcher of a partition task needs to restart it or give up.
#[derive(Clone)]
pub struct Supervision {
    pub policy: RestartPolicy,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Where a dead runner's partition is marked down for intake.
    pub backlog: Arc<Backlog>,
    pub fatal: mpsc::Sender<String>,
    /// Distributed, a task given up on stops the instance, so the group
    /// hands its partitions to another instance. Embedded, nobody else
    /// can take them: the instance stays up, not ready, refusing the dead
    /// partition's orders, and serving the others and every read.
    pub stop_when_down: bool,
}

/// Which partition task a watcher watches.
#[derive(Clone, Copy, Debug)]
pub struct TaskName {
    /// The `task` label: `runner`, `tracking_owner`, `notifications`, `read_model`.
    pub task: &'static str,
    pub topic: Topic,
    pub partition: u32,
}

impl std::fmt::Display for TaskName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (task, topic, p) = (self.task, self.topic.name(), self.partition);
        write!(f, "{task} of {topic} partition {p}")
    }
}

/// Runs the task `start` makes, and again (a fresh one from `start`) after
/// a back-off each time it panics while `stop` still says `running`;
/// gives up on it per `s.policy`. Returns what the last run returned.
pub fn spawn_watched<S, T>(
    s: Supervision,
    name: TaskName,
    mut stop: watch::Receiver<S>,
    running: S,
    mut start: impl FnMut() -> BoxFuture<'static, T> + Send + 'static,
) -> JoinHandle<T>
where
    S: PartialEq + Send + Sync + 'static,
    T: Default + Send + 'static,
{
    tokio::spawn(async move {
        let mut deaths = Deaths::new(s.policy);
        let clock = Instant::now();
        loop {
            let panic = match tokio::spawn(start()).await {
                Ok(out) => return out,
                Err(e) if e.is_panic() => panic_message(e.into_panic()),
                // Cancelled: the runtime itself is going away.
                Err(_) => return T::default(),
            };
            if name.topic == Topic::Orders {
                s.backlog.down(name.partition);
            }
            if *stop.borrow() != running {
                tracing::error!(task = %name, %panic, "partition task panicked while stopping");
                return s.stopped_dead(name);
            }
            let backoff_ms = match deaths.died(clock.elapsed().as_millis() as u64) {
                Verdict::Restart { backoff_ms, deaths } => {
                    tracing::error!(task = %name, %panic, deaths, backoff_ms, "partition task panicked; restarting it from its checkpoint");
                    backoff_ms
                }
                Verdict::GiveUp { deaths } => {
                    s.give_up(name, &panic, deaths).await;
                    return T::default();
                }
            };
            let backoff = tokio::time::sleep(Duration::from_millis(backoff_ms));
            tokio::select! {
                _ = backoff => {}
                _ = stop.wait_for(|mode| *mode != running) => return s.stopped_dead(name),
            }
            s.metrics
                .task_restarts
                .with_label_values(&[name.task, &name.partition.to_string()])
                .inc();
        }
    })
}

impl Supervision {
    /// A dead task's partition stops here before it was restarted: a
    /// runner's partition may be owned elsewhere next, and must not stay
    /// refused here.
    fn stopped_dead<T: Default>(&self, name: TaskName) -> T {
        if name.topic == Topic::Orders {
            self.backlog.disown(name.partition);
        }
        T::default()
    }

    /// `name` kept dying: not ready from now on, naming it (not the panic,
    /// which only the log shows: `/readyz` is public); distributed, stop.
    async fn give_up(&self, name: TaskName, panic: &str, deaths: u32) {
        let window_ms = self.policy.window_ms;
        let reason = format!("{name} died {deaths} times within {window_ms} ms");
        tracing::error!(task = %name, %panic, deaths, window_ms, stopping = self.stop_when_down, "partition task keeps dying; given up on it: the instance is not ready");
        self.metrics
            .task_down
            .with_label_values(&[name.task, &name.partition.to_string()])
            .set(1);
        self.health.mark_down(reason.clone());
        if self.stop_when_down {
            let _ = self.fatal.send(reason).await;
        }
    }
}

/// The text a panic was raised with.
fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => (*text).to_owned(),
            Err(_) => "a panic without a message".to_owned(),
        },
    }
}

/// One owned partition's tasks.
struct Running {
    stop: watch::Sender<Stop>,
    tasks: Vec<JoinHandle<Option<RunnerExit>>>,
}

struct Supervisor {
    deps: Arc<Deps>,
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
        deps: Arc::new(deps),
        running: BTreeMap::new(),
        became_ready: false,
    };
    let mut membership_open = true;
    loop {
        tokio::select! {
            change = changes.recv(), if membership_open => match change {
                Some(Change::Assigned(parts)) => s.start(parts),
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
    fn start(&mut self, parts: Vec<Part>) {
        let recovered = Arc::new(Semaphore::new(0));
        let mut runners = 0;
        for part in parts {
            if self.running.contains_key(&part) {
                continue;
            }
            let (stop, stop_rx) = watch::channel(Stop::Run);
            let tasks = match part {
                (Topic::Orders, p) => {
                    runners += 1;
                    vec![self.start_runner(p, stop_rx, &recovered)]
                }
                (Topic::OrderStatus, p) => {
                    let (tasks, started) = self.start_sinks(p, stop_rx, &recovered);
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

    /// Runs partition `partition` under a watcher: each run claims it
    /// (a new epoch fences the former owner, or a dead run's checkpoint
    /// still being written) and starts from its checkpoint.
    fn start_runner(
        &self,
        partition: u32,
        stop: watch::Receiver<Stop>,
        recovered: &Arc<Semaphore>,
    ) -> JoinHandle<Option<RunnerExit>> {
        let name = TaskName {
            task: "runner",
            topic: Topic::Orders,
            partition,
        };
        let (d, recovered) = (self.deps.clone(), SignalOnce::new(recovered.clone()));
        let rx = stop.clone();
        let start = move || run_runner(d.clone(), partition, rx.clone(), recovered.clone()).boxed();
        spawn_watched(self.deps.supervision.clone(), name, stop, Stop::Run, start)
    }

    /// The sinks of `order-status` partition `partition`, and how many of
    /// them add a permit to `started` once they know where they start (the
    /// notifications sink: readiness waits for it, so that nothing placed
    /// after `/readyz` turned 200 falls before its position).
    fn start_sinks(
        &self,
        partition: u32,
        stop: watch::Receiver<Stop>,
        started: &Arc<Semaphore>,
    ) -> (Vec<JoinHandle<Option<RunnerExit>>>, u32) {
        let d = &self.deps;
        let name = |task| TaskName {
            task,
            topic: Topic::OrderStatus,
            partition,
        };
        let mut tasks = Vec::new();
        let (t, store, log, rx, fatal) = (
            d.tracking.clone(),
            d.store.clone(),
            d.tracking_log.clone(),
            stop.clone(),
            d.fatal.clone(),
        );
        let owner = move || {
            let (t, store, log, rx, fatal) = (
                t.clone(),
                store.clone(),
                log.clone(),
                rx.clone(),
                fatal.clone(),
            );
            async move {
                if let Err(e) = tracking::run_owner(t, store, log, partition, rx).await {
                    tracing::error!(error = %e, "tracking replay point failed");
                    let _ = fatal.send(e.to_string()).await;
                }
                None
            }
            .boxed()
        };
        let supervision = d.supervision.clone();
        let watched = spawn_watched(
            supervision.clone(),
            name("tracking_owner"),
            stop.clone(),
            Stop::Run,
            owner,
        );
        tasks.push(watched);
        let mut signalling = 0;
        if let Some((n, log)) = &d.notifications {
            let (n, log, fatal, rx) = (n.clone(), log.clone(), d.fatal.clone(), stop.clone());
            let started = SignalOnce::new(started.clone());
            signalling += 1;
            let sink = move || {
                let run = notifications::run_partition(
                    n.clone(),
                    log.clone(),
                    partition,
                    rx.clone(),
                    started.clone(),
                );
                let fatal = fatal.clone();
                async move {
                    if let Err(e) = run.await {
                        tracing::error!(error = %e, "notifications sink failed");
                        let _ = fatal.send(e.to_string()).await;
                    }
                    None
                }
                .boxed()
            };
            tasks.push(spawn_watched(
                supervision,
                name("notifications"),
                stop,
                Stop::Run,
                sink,
            ));
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

/// One run of partition `partition`'s runner: claim, load, run; what it
/// returns once stopped (`None` when fenced or failed).
async fn run_runner(
    d: Arc<Deps>,
    partition: u32,
    stop: watch::Receiver<Stop>,
    recovered: Arc<SignalOnce>,
) -> Option<RunnerExit> {
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
    let panic_fault = d
        .panic_runner
        .as_ref()
        .filter(|(p, _)| *p == partition)
        .map(|(_, fault)| fault.clone());
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
        panic_fault,
    };
    match runner::run(partition, deps, stop).await {
        Ok(exit) => Some(exit),
        Err(RunnerError::Store {
            source: StoreError::Fenced { stored_epoch, .. },
            ..
        }) => {
            // Not fatal: another instance owns the partition now (the
            // store counted the refusal).
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
            let _ = d.fatal.send(e.to_string()).await;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    fn supervision(max_deaths: u32) -> (Supervision, mpsc::Receiver<String>) {
        let (fatal, fatal_rx) = mpsc::channel(4);
        let s = Supervision {
            policy: RestartPolicy {
                initial_backoff_ms: 1,
                max_backoff_ms: 2,
                max_deaths,
                window_ms: 60_000,
            },
            metrics: Arc::new(Metrics::with_top_skus(0)),
            health: Arc::new(Health::new()),
            backlog: Arc::new(Backlog::new(4)),
            fatal,
            stop_when_down: true,
        };
        (s, fatal_rx)
    }

    const RUNNER_2: TaskName = TaskName {
        task: "runner",
        topic: Topic::Orders,
        partition: 2,
    };

    /// A task that panics on its first `panics` runs, then returns `runs`.
    fn flaky(panics: u32) -> impl FnMut() -> BoxFuture<'static, u32> + Send + 'static {
        let runs = Arc::new(AtomicU32::new(0));
        move || {
            let runs = runs.clone();
            async move {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(run > panics, "injected panic {run}");
                run
            }
            .boxed()
        }
    }

    /// Panicked runs are restarted and counted; the run that returns ends the watcher.
    #[tokio::test]
    async fn panics_are_restarted_and_counted() {
        let (s, _fatal) = supervision(3);
        let (_stop, rx) = watch::channel(Stop::Run);
        let runs = spawn_watched(s.clone(), RUNNER_2, rx, Stop::Run, flaky(3));
        assert_eq!(runs.await.unwrap(), 4);
        let restarts = s.metrics.task_restarts.with_label_values(&["runner", "2"]);
        assert_eq!(restarts.get(), 3);
        assert!(s.health.down_reasons().is_empty());
    }

    /// One death too many: down in `/readyz`, the partition refused, the fatal path told.
    #[tokio::test]
    async fn a_task_that_keeps_dying_is_given_up_on() {
        let (s, mut fatal) = supervision(2);
        let (_stop, rx) = watch::channel(Stop::Run);
        let runs = spawn_watched(s.clone(), RUNNER_2, rx, Stop::Run, flaky(u32::MAX));
        assert_eq!(runs.await.unwrap(), 0);
        let reason = "runner of orders partition 2 died 3 times within 60000 ms";
        assert_eq!(s.health.down_reasons(), [reason]);
        assert!(s.backlog.is_down(2));
        assert_eq!(fatal.recv().await.as_deref(), Some(reason));
        let down = s.metrics.task_down.with_label_values(&["runner", "2"]);
        assert_eq!(down.get(), 1);
    }

    /// A task that dies while its partition stops is not restarted, and
    /// the partition is not left refused here.
    #[tokio::test]
    async fn no_restart_once_stopping() {
        let (s, _fatal) = supervision(3);
        let (stop, rx) = watch::channel(Stop::Now);
        let runs = spawn_watched(s.clone(), RUNNER_2, rx, Stop::Run, flaky(1));
        assert_eq!(runs.await.unwrap(), 0);
        assert!(!s.backlog.is_down(2));
        drop(stop);
    }
}
