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
//! consumer group so another instance takes the partitions.
//!
//! A task that fails because the log or the state store stayed unavailable
//! past the call's own retries (an [`Outage`]: a store node restarting, a
//! broker election) is started again after a back-off, for as long as the
//! outage lasts, and counted; it never stops the instance, since no other
//! instance would fare better. Any other error goes to the fatal path.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use super::sink::StatusSink;
use crate::config::CheckpointConfig;
use crate::pipeline::backlog::Backlog;
use crate::pipeline::effects::EffectSender;
use crate::pipeline::inventory::Inventory;
use crate::pipeline::log::{Log, Topic};
use crate::pipeline::membership::{Change, Part};
use crate::pipeline::restart::{Deaths, Outage, RestartPolicy, SignalOnce, Verdict};
use crate::pipeline::runner::{self, PanicFault, RunnerDeps, RunnerError, RunnerExit};
use crate::pipeline::store::{Scope, StateStore, StoreError, with_retries};
use crate::stages::processor::Limits;
use crate::telemetry::Health;
use crate::telemetry::metrics::Metrics;

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
    /// The consumers of `order-status` run on each status partition owned.
    pub sinks: Vec<Arc<dyn StatusSink>>,
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
    /// Runs `attempt` again, after a back-off, each time it fails with an
    /// [`Outage`] while `stop` still says `running`, counting each in
    /// `orderflow_task_outages_total`; returns the first other result (or
    /// the outage, once stopping). While a runner waits, intake refuses
    /// its partition (503) rather than queue orders nobody processes.
    pub async fn through_outages<S, T, E>(
        &self,
        name: TaskName,
        mut stop: watch::Receiver<S>,
        running: S,
        mut attempt: impl FnMut() -> BoxFuture<'static, Result<T, E>>,
    ) -> Result<T, E>
    where
        S: PartialEq,
        E: Outage,
    {
        let mut backoff_ms = self.policy.initial_backoff_ms;
        loop {
            let started = Instant::now();
            let e = match attempt().await {
                Err(e) if e.is_outage() => e,
                other => return other,
            };
            if *stop.borrow() != running {
                return Err(self.stopped_dead_with(name, e));
            }
            // A run that lasted got past the last outage: start over.
            if started.elapsed() > Duration::from_millis(self.policy.max_backoff_ms) {
                backoff_ms = self.policy.initial_backoff_ms;
            }
            tracing::warn!(task = %name, error = %e, backoff_ms, "partition task stopped by an outage of the log or state store; starting it again");
            self.metrics
                .task_outages
                .with_label_values(&[name.task, &name.partition.to_string()])
                .inc();
            if name.topic == Topic::Orders {
                self.backlog.down(name.partition);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                _ = stop.wait_for(|mode| *mode != running) => return Err(self.stopped_dead_with(name, e)),
            }
            backoff_ms = (backoff_ms * 2).min(self.policy.max_backoff_ms);
        }
    }

    /// A dead task's partition stops here before it was restarted: a
    /// runner's partition may be owned elsewhere next, and must not stay
    /// refused here.
    fn stopped_dead<T: Default>(&self, name: TaskName) -> T {
        self.stopped_dead_with(name, T::default())
    }

    fn stopped_dead_with<T>(&self, name: TaskName, out: T) -> T {
        if name.topic == Topic::Orders {
            self.backlog.disown(name.partition);
        }
        out
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
    /// Until the instance is ready: what readiness waits for.
    startup: Option<Startup>,
    /// The task that turns the instance ready. It holds the sinks (and
    /// through them the state store), so shutdown ends it too: an
    /// instance stopped before it was ready must not keep them.
    readiness: Option<tokio::task::JoinHandle<()>>,
}

/// The instance turns ready once every group's first assignment has
/// recovered (runners replayed their tails, sinks know where they start)
/// and the read model has applied the status log as it is then.
struct Startup {
    /// Groups whose first assignment has not arrived yet.
    groups_left: usize,
    /// One permit per recovered task of the first assignments.
    recovered: Arc<Semaphore>,
    /// How many permits readiness waits for.
    tasks: u32,
}

/// Runs until `shutdown` turns true; then stops every runner, then every
/// sink (so the sinks see the runners' last statuses), and returns the
/// runners' exits.
/// `groups`: how many first assignments the membership sends.
pub async fn run(
    deps: Deps,
    mut changes: mpsc::Receiver<Change>,
    groups: usize,
    mut shutdown: watch::Receiver<bool>,
) -> Vec<RunnerExit> {
    assert!(groups > 0, "a membership has at least one group");
    let mut s = Supervisor {
        deps: Arc::new(deps),
        running: BTreeMap::new(),
        startup: Some(Startup {
            groups_left: groups,
            recovered: Arc::new(Semaphore::new(0)),
            tasks: 0,
        }),
        readiness: None,
    };
    let mut membership_open = true;
    loop {
        tokio::select! {
            change = changes.recv(), if membership_open => match change {
                Some(Change::Assigned { parts, first }) => s.start(parts, first),
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
    if let Some(readiness) = s.readiness.take() {
        readiness.abort();
        let _ = readiness.await;
    }
    exits.sort_by_key(|e| e.partition);
    exits
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

impl Supervisor {
    fn start(&mut self, parts: Vec<Part>, first: bool) {
        // Later assignments signal a semaphore nobody waits on.
        let recovered = match (&self.startup, first) {
            (Some(startup), true) => startup.recovered.clone(),
            _ => Arc::new(Semaphore::new(0)),
        };
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
        if first {
            self.first_assigned(runners);
        }
    }

    /// A group's first assignment started `tasks` that signal recovery;
    /// after the last group's, readiness waits for them all.
    fn first_assigned(&mut self, tasks: u32) {
        let Some(startup) = self.startup.as_mut() else {
            return;
        };
        startup.tasks += tasks;
        startup.groups_left -= 1;
        if startup.groups_left > 0 {
            return;
        }
        let Startup {
            recovered, tasks, ..
        } = self.startup.take().expect("checked above");
        let (health, sinks) = (self.deps.health.clone(), self.deps.sinks.clone());
        self.readiness = Some(tokio::spawn(async move {
            let Ok(permits) = recovered.acquire_many(tasks).await else {
                return;
            };
            permits.forget();
            // After the runners' recovery: their re-emitted statuses too.
            for sink in &sinks {
                while let Err(e) = sink.caught_up().await {
                    tracing::warn!(task = sink.task(), error = %e, "cannot read the status log's end; readiness waits");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            health.ready.store(true, Ordering::SeqCst);
        }));
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
    /// them add a permit to `started` once they know where they start
    /// ([`StatusSink::gates_readiness`]).
    fn start_sinks(
        &self,
        partition: u32,
        stop: watch::Receiver<Stop>,
        started: &Arc<Semaphore>,
    ) -> (Vec<JoinHandle<Option<RunnerExit>>>, u32) {
        let mut tasks = Vec::new();
        let mut signalling = 0;
        for sink in &self.deps.sinks {
            let name = TaskName {
                task: sink.task(),
                topic: Topic::OrderStatus,
                partition,
            };
            let started = sink
                .gates_readiness()
                .then(|| SignalOnce::new(started.clone()));
            signalling += u32::from(started.is_some());
            let (s, sink, rx) = (self.deps.supervision.clone(), sink.clone(), stop.clone());
            let start = move || {
                let (sink, rx, started) = (sink.clone(), rx.clone(), started.clone());
                let stop = rx.clone();
                let attempt = move || sink.run(partition, rx.clone(), started.clone());
                run_sink(s.clone(), name, stop, attempt).boxed()
            };
            tasks.push(spawn_watched(
                self.deps.supervision.clone(),
                name,
                stop.clone(),
                Stop::Run,
                start,
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
                self.deps.metrics.forget_orders_partition(p);
            }
            // The next owner reports this partition's lag from now on (the
            // read model's, fed on every instance, stays).
            let owner = match topic {
                Topic::Orders => "runner",
                _ => "notifications",
            };
            let _ = self.deps.metrics.partition_lag.remove_label_values(&[
                topic.name(),
                &p.to_string(),
                owner,
            ]);
        }
        self.publish_owned();
        exits
    }
}

/// One run of a sink task: `attempt` through outages; any other failure
/// goes to the fatal path.
async fn run_sink<E: Outage + Send>(
    s: Supervision,
    name: TaskName,
    stop: watch::Receiver<Stop>,
    attempt: impl FnMut() -> BoxFuture<'static, Result<(), E>> + Send,
) -> Option<RunnerExit> {
    if let Err(e) = s.through_outages(name, stop, Stop::Run, attempt).await {
        tracing::error!(task = %name, error = %e, "partition task failed");
        let _ = s.fatal.send(e.to_string()).await;
    }
    None
}

/// One run of partition `partition`'s runner, started again through
/// outages; what it returns once stopped (`None` when fenced or failed).
async fn run_runner(
    d: Arc<Deps>,
    partition: u32,
    stop: watch::Receiver<Stop>,
    recovered: Arc<SignalOnce>,
) -> Option<RunnerExit> {
    let name = TaskName {
        task: "runner",
        topic: Topic::Orders,
        partition,
    };
    let attempt = || attempt_runner(d.clone(), partition, stop.clone(), recovered.clone()).boxed();
    let supervision = &d.supervision;
    match supervision
        .through_outages(name, stop.clone(), Stop::Run, attempt)
        .await
    {
        Ok(exit) => exit,
        Err(e) => {
            tracing::error!(error = %e, "partition runner failed");
            let _ = d.fatal.send(e.to_string()).await;
            None
        }
    }
}

/// Claims partition `partition`, loads it and runs it; `None` when a
/// newer owner fenced it.
async fn attempt_runner(
    d: Arc<Deps>,
    partition: u32,
    stop: watch::Receiver<Stop>,
    recovered: Arc<SignalOnce>,
) -> Result<Option<RunnerExit>, RunnerError> {
    let epoch = with_retries("claim partition", || {
        d.store.claim(Scope::Orders, partition)
    })
    .await
    .map_err(|source| RunnerError::Store { partition, source })?;
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
        Ok(exit) => Ok(Some(exit)),
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
            Ok(None)
        }
        Err(e) => Err(e),
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

    /// A failure of the test tasks below; `outage` says whether an outage explains it.
    #[derive(Debug)]
    struct Failed {
        outage: bool,
    }

    impl std::fmt::Display for Failed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "failed (outage: {})", self.outage)
        }
    }

    impl Outage for Failed {
        fn is_outage(&self) -> bool {
            self.outage
        }
    }

    /// A task that fails with `errors` in turn, then returns how many runs it took.
    fn failing(
        errors: Vec<Failed>,
    ) -> impl FnMut() -> BoxFuture<'static, Result<u32, Failed>> + Send + 'static {
        let errors = Arc::new(std::sync::Mutex::new(errors.into_iter()));
        let runs = Arc::new(AtomicU32::new(0));
        move || {
            let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let next = errors.lock().unwrap().next();
            async move { next.map_or(Ok(run), Err) }.boxed()
        }
    }

    /// Outages start the task again, each counted, past any death limit,
    /// until a run succeeds; the partition is refused meanwhile.
    #[tokio::test]
    async fn outages_start_the_task_again() {
        let (s, _fatal) = supervision(1);
        let (_stop, rx) = watch::channel(Stop::Run);
        let outages = (0..5).map(|_| Failed { outage: true }).collect();
        let runs = s.through_outages(RUNNER_2, rx, Stop::Run, failing(outages));
        assert_eq!(runs.await.unwrap(), 6);
        let counted = s.metrics.task_outages.with_label_values(&["runner", "2"]);
        assert_eq!(counted.get(), 5);
        assert!(
            s.backlog.is_down(2),
            "refused until the runner owns it again"
        );
    }

    /// An error no outage explains is returned at once, for the fatal path.
    #[tokio::test]
    async fn other_errors_are_not_retried() {
        let (s, _fatal) = supervision(3);
        let (_stop, rx) = watch::channel(Stop::Run);
        let errors = vec![Failed { outage: false }, Failed { outage: true }];
        let run = s.through_outages(RUNNER_2, rx, Stop::Run, failing(errors));
        assert!(!run.await.unwrap_err().is_outage());
        let counted = s.metrics.task_outages.with_label_values(&["runner", "2"]);
        assert_eq!(counted.get(), 0);
    }

    /// Once the partition stops, an outage is returned, and the partition
    /// is not left refused here.
    #[tokio::test]
    async fn no_outage_retry_once_stopping() {
        let (s, _fatal) = supervision(3);
        let (stop, rx) = watch::channel(Stop::Run);
        let errors = (0..1000).map(|_| Failed { outage: true }).collect();
        let run = tokio::spawn({
            let s = s.clone();
            async move {
                s.through_outages(RUNNER_2, rx, Stop::Run, failing(errors))
                    .await
            }
        });
        let counted = s.metrics.task_outages.with_label_values(&["runner", "2"]);
        while counted.get() == 0 {
            tokio::task::yield_now().await;
        }
        stop.send_replace(Stop::Now);
        assert!(run.await.unwrap().unwrap_err().is_outage());
        assert!(!s.backlog.is_down(2));
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
