//! Wiring of a running instance: the one place where backends are chosen.
//! `start` opens the log (embedded in `data_dir`, locked against a second
//! process, or Kafka) and the state store (embedded or ScyllaDB), the
//! effect executor, the membership that says which partitions this
//! instance owns (all of them embedded; a share of them in a Kafka
//! consumer group) with the supervisor that runs their runners and sinks,
//! and the HTTP server. `shutdown` stops intake, stops the partitions
//! (runners checkpoint), leaves the group and closes everything in order.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, GatewayKind};
use crate::gateway::PaymentGateway;
use crate::gateway::breaker::{Breaker, BreakerConfig};
use crate::gateway::simulator::Simulator;
use crate::gateway::stripe::StripeClient;
use crate::http::AppState;
use crate::http::auth::Credentials;
use crate::pipeline::backlog::Backlog;
use crate::pipeline::effects;
use crate::pipeline::intake::Intake;
use crate::pipeline::inventory::Inventory;
use crate::pipeline::log::embedded::EmbeddedLog;
use crate::pipeline::log::kafka::KafkaLog;
use crate::pipeline::log::{Log, Topic};
use crate::pipeline::membership::kafka::KafkaGroup;
use crate::pipeline::membership::{Membership, Static};
use crate::pipeline::runner::{PanicFault, RunnerExit};
use crate::pipeline::sink::StatusSink;
use crate::pipeline::store::StateStore;
use crate::pipeline::store::embedded::EmbeddedStore;
use crate::pipeline::store::scylla::ScyllaStore;
use crate::pipeline::supervisor::{self, Stop};
use crate::pipeline::tokens::TokenKeys;
use crate::sinks::notifications;
use crate::sinks::tracking::{self, Tracking};
use crate::telemetry::Health;
use crate::telemetry::metrics::Metrics;

/// A running instance.
pub struct App {
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown_tx: watch::Sender<bool>,
    http_stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: JoinHandle<std::io::Result<()>>,
    supervisor: JoinHandle<Vec<RunnerExit>>,
    membership: Box<dyn Membership>,
    read_model: Vec<JoinHandle<()>>,
    notifications: Option<notifications::Running>,
    executor: JoinHandle<()>,
    log: Arc<dyn Log>,
    fatal_rx: mpsc::Receiver<String>,
    _lock: Option<File>,
    /// The in-process simulator, when `gateway.kind` is `simulator`.
    pub simulator: Option<Arc<Simulator>>,
    /// The circuit breaker every gateway call goes through.
    pub breaker: Arc<Breaker>,
    pub store: Arc<dyn StateStore>,
    pub metrics: Arc<Metrics>,
}

/// Takes an exclusive OS lock on the data directory, so a second process
/// is refused at once instead of writing beside the first.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let path = dir.join("LOCK");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "data directory {} is in use by another orderflow process (lock held on {}); stop it first or choose another --data-dir",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Starts an instance accepting `credentials` as API tokens (an
/// `Option<Secret>` is the admin token alone).
pub async fn start(config: Config, credentials: impl Into<Credentials>) -> anyhow::Result<App> {
    config.validate()?;
    let gateway = Gateway::from_config(&config)?;
    start_inner(config, credentials.into(), gateway).await
}

/// The payment gateway chosen by `gateway.kind`: the one place it is
/// chosen. Either kind is wrapped in the circuit breaker by `start`.
pub enum Gateway {
    Simulator(Arc<Simulator>),
    /// Stripe, `stripe-mock` or `orderflow gateway-sim` at `gateway.url`.
    Stripe(Arc<StripeClient>),
}

impl Gateway {
    /// Builds the configured gateway; `stripe` reads its secret key
    /// (`ORDERFLOW_STRIPE_SECRET_KEY`, else `gateway.secret_key_file`).
    pub fn from_config(config: &Config) -> anyhow::Result<Gateway> {
        let g = &config.gateway;
        Ok(match g.kind {
            GatewayKind::Simulator => Gateway::Simulator(Arc::new(Simulator::new(g))),
            GatewayKind::Stripe => {
                let key = g.stripe_secret_key()?;
                let client = StripeClient::from_config(g, key)
                    .context("cannot build the Stripe HTTP client")?;
                tracing::info!(url = %client.api().base_url(), timeout_ms = g.timeout_ms, "payment gateway: Stripe API");
                Gateway::Stripe(Arc::new(client))
            }
        })
    }

    fn split(
        self,
    ) -> (
        Option<Arc<Simulator>>,
        &'static str,
        Arc<dyn PaymentGateway>,
    ) {
        match self {
            Gateway::Simulator(s) => (Some(s.clone()), "simulator", s),
            Gateway::Stripe(c) => (None, "stripe", c),
        }
    }
}

async fn start_inner(
    config: Config,
    credentials: Credentials,
    gateway: Gateway,
) -> anyhow::Result<App> {
    config.validate()?;
    let lock = lock_if_local(&config)?;
    let metrics = Arc::new(Metrics::with_top_skus(config.metrics.top_out_of_stock_skus));
    // Before anything starts, so a bad certificate leaves nothing running.
    let server = crate::http::server::Server::new(&config.http, &metrics)?;
    let log = open_log(&config, &metrics).await?;
    let store = open_store(&config, &metrics).await?;
    let (simulator, gateway_name, inner) = gateway.split();
    let breaker = Arc::new(Breaker::new(
        gateway_name,
        inner,
        BreakerConfig::from(&config.gateway),
        Some(metrics.clone()),
    ));
    let (effects, executor) = effects::spawn(
        log.clone(),
        breaker.clone() as Arc<dyn PaymentGateway>,
        metrics.clone(),
        config.gateway.clone(),
        config.log.max_record_bytes,
    );
    let inventory = Arc::new(Inventory::new(log.clone(), store.clone()));
    let tracking = Arc::new(Tracking::new(
        config.status_partitions,
        crate::sinks::tracking::ModelLimits::from_config(&config.tracking),
        metrics.clone(),
    ));
    let keys = token_keys(&config, store.as_ref()).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (fatal_tx, fatal_rx) = mpsc::channel::<String>(64);
    stop_when_log_fails(log.clone(), fatal_tx.clone(), shutdown_rx.clone());
    let health = Arc::new(Health {
        gateway: Some(breaker.clone()),
        ..Health::default()
    });
    if let Some(sim) = &simulator {
        publish_simulator_sizes(sim.clone(), metrics.clone(), shutdown_rx.clone());
    }

    let (tracking_log, notifications) = status_logs(&config, &log, &store, &metrics)?;
    let backlog = Arc::new(Backlog::new(config.partitions));
    let supervision = supervisor::Supervision {
        policy: crate::pipeline::restart::RestartPolicy::from_config(&config.supervisor),
        metrics: metrics.clone(),
        health: health.clone(),
        backlog: backlog.clone(),
        fatal: fatal_tx.clone(),
        stop_when_down: config.kafka.is_some(),
    };
    let deps = supervisor::Deps {
        log: log.clone(),
        store: store.clone(),
        effects,
        inventory: inventory.clone(),
        metrics: metrics.clone(),
        backlog: backlog.clone(),
        checkpoint: config.checkpoint.clone(),
        limits: config.processor.limits(),
        sinks: status_sinks(&tracking, &store, tracking_log, notifications.as_ref()),
        health: health.clone(),
        fatal: fatal_tx.clone(),
        // Embedded, one process sees everything: finish it. Distributed,
        // the log never stops growing: stop now, the next owner replays.
        shutdown_mode: if config.kafka.is_some() {
            Stop::Now
        } else {
            Stop::Drain
        },
        poison_customer: poison_customer(),
        panic_runner: panic_runner(),
        supervision: supervision.clone(),
    };
    let mut membership: Box<dyn Membership> = match &config.kafka {
        Some(k) => Box::new(KafkaGroup::new(k, metrics.clone())),
        None => Box::new(Static::all(config.partitions, config.status_partitions)),
    };
    let (changes_tx, changes_rx) = mpsc::channel(16);
    let supervisor = tokio::spawn(supervisor::run(
        deps,
        changes_rx,
        membership.groups(),
        shutdown_rx.clone(),
    ));
    membership.start(changes_tx)?;
    let read_model = start_read_model(
        &config,
        &supervision,
        &log,
        &store,
        &tracking,
        shutdown_rx.clone(),
    )
    .await?;

    health.accepting.store(true, Ordering::SeqCst);
    let intake = Arc::new(
        Intake::new(log.clone(), keys, metrics.clone()).with_admission(&config.intake, backlog),
    );
    let state = AppState {
        intake,
        tracking,
        inventory,
        parked: Arc::new(crate::pipeline::parked::ParkLane::new(
            log.clone(),
            store.clone(),
        )),
        metrics: metrics.clone(),
        credentials: Arc::new(credentials),
        config: config.http.clone(),
        health: health.clone(),
    };
    let (addr, http_stop, http) = serve_http(&config, server, state).await?;
    Ok(App {
        addr,
        health,
        shutdown_tx,
        http_stop: Some(http_stop),
        http,
        supervisor,
        membership,
        read_model,
        notifications: notifications.map(|(n, _)| n),
        executor,
        log,
        fatal_rx,
        _lock: lock,
        simulator,
        breaker,
        store,
        metrics,
    })
}

/// A log that refuses appends for good (a failed fsync) cannot be trusted:
/// the instance stops, rather than answer 503 until someone notices.
fn stop_when_log_fails(
    log: Arc<dyn Log>,
    fatal: mpsc::Sender<String>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let failed = tokio::select! {
            reason = log.failed() => Some(reason),
            _ = stop.wait_for(|stopping| *stopping) => None,
        };
        if let Some(reason) = failed {
            let _ = fatal.send(reason).await;
        }
    });
}

/// The running notifications sink and its view of `order-status`.
type Notifications = (notifications::Running, Arc<dyn Log>);

/// The `order-status` log of the read model and, when notifications are
/// on, the notifier with its own view: two consumers, so retention keeps
/// what the slower one still needs.
fn status_logs(
    config: &Config,
    log: &Arc<dyn Log>,
    store: &Arc<dyn StateStore>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<dyn Log>, Option<Notifications>)> {
    let Some(n) = &config.notifications else {
        return Ok((log.clone(), None));
    };
    let views = crate::pipeline::log::release::ReleaseView::split(log.clone(), 2);
    let running = notifications::start(n, store.clone(), metrics.clone())?;
    Ok((views[0].clone(), Some((running, views[1].clone()))))
}

/// Binds `config.listen` and serves the API until the returned sender fires.
async fn serve_http(
    config: &Config,
    server: crate::http::server::Server,
    state: AppState,
) -> anyhow::Result<(
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    JoinHandle<std::io::Result<()>>,
)> {
    let tls = server.is_tls();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let (http_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = crate::http::router(state);
    let http = tokio::spawn(server.serve(listener, router, async move {
        let _ = stop_rx.await;
    }));
    tracing::info!(%addr, tls, log = if config.kafka.is_some() { "kafka" } else { "embedded" }, store = if config.scylla.is_some() { "scylla" } else { "embedded" }, partitions = config.partitions, "orderflow listening");
    Ok((addr, http_stop, http))
}

/// How often the in-process simulator's sizes go to the metrics.
const SIM_SIZES_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Publishes the in-process gateway simulator's bounded structures as
/// `orderflow_state_entries{structure="gateway_sim_*"}` until shutdown.
fn publish_simulator_sizes(
    sim: Arc<Simulator>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            let sizes = sim.engine().sizes();
            for (structure, n) in [
                ("gateway_sim_intents", sizes.intents),
                ("gateway_sim_keys", sizes.keys),
                ("gateway_sim_calls", sizes.calls),
            ] {
                metrics
                    .state_entries
                    .with_label_values(&[structure, "all"])
                    .set(n as i64);
            }
            tokio::select! {
                _ = tokio::time::sleep(SIM_SIZES_EVERY) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
}

/// Environment variable of the park lane's test seam (debug builds only).
pub const POISON_CUSTOMER_ENV: &str = "ORDERFLOW_FAULT_POISON_CUSTOMER";

/// In debug builds only (the tests' binary), orders of the customer named
/// by `ORDERFLOW_FAULT_POISON_CUSTOMER` fail processing as if they hit a
/// bug, so the tests can exercise the park lane end to end; release
/// builds never read it.
fn poison_customer() -> Option<String> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let customer = std::env::var(POISON_CUSTOMER_ENV)
        .ok()
        .filter(|c| !c.is_empty())?;
    tracing::warn!(
        customer,
        "fault injection: orders of this customer will be parked"
    );
    Some(customer)
}

/// Environment variable of the supervisor's test seam (debug builds only).
pub const PANIC_RUNNER_ENV: &str = "ORDERFLOW_FAULT_PANIC_RUNNER";

/// In debug builds only (the tests' binary), `ORDERFLOW_FAULT_PANIC_RUNNER
/// = <partition>:<times>` makes that partition's runner panic on its next
/// `times` batches, counted over its restarts, so the tests see the
/// supervisor restart it and, past its death limit, give up; release
/// builds never read it.
fn panic_runner() -> Option<(u32, Arc<PanicFault>)> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let value = std::env::var(PANIC_RUNNER_ENV).ok()?;
    let parsed = value
        .split_once(':')
        .and_then(|(p, n)| Some((p.parse::<u32>().ok()?, n.parse::<u32>().ok()?)));
    let Some((partition, times)) = parsed else {
        tracing::warn!(
            value,
            "fault injection: {PANIC_RUNNER_ENV} is not <partition>:<times>; ignored"
        );
        return None;
    };
    tracing::warn!(
        partition,
        times,
        "fault injection: this partition's runner will panic"
    );
    Some((partition, Arc::new(PanicFault::new(times))))
}

/// Only a deployment with something on local disk takes the data dir.
pub fn lock_if_local(config: &Config) -> anyhow::Result<Option<File>> {
    Ok(match (&config.kafka, &config.scylla) {
        (Some(_), Some(_)) => None,
        _ => Some(lock_data_dir(&config.data_dir)?),
    })
}

/// The log backend: Kafka when `[kafka]` is configured, else the embedded
/// segment log in `data_dir/log`. The one place it is chosen.
pub async fn open_log(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<dyn Log>> {
    let topics = topics(config);
    Ok(match &config.kafka {
        Some(k) => Arc::new(
            KafkaLog::connect(k, &topics, config.log.max_record_bytes, metrics.clone())
                .await
                .context("cannot open the Kafka log")?,
        ),
        None => Arc::new(EmbeddedLog::open(
            &config.data_dir.join("log"),
            &topics,
            &config.log,
            metrics.clone(),
        )?),
    })
}

/// The state store backend: ScyllaDB when `[scylla]` is configured, else
/// the embedded store in `data_dir/state.redb`. The one place it is chosen.
pub async fn open_store(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Arc<dyn StateStore>> {
    Ok(match &config.scylla {
        Some(s) => Arc::new(
            ScyllaStore::connect(s, Some(metrics.clone()))
                .await
                .context("cannot open the ScyllaDB state store")?,
        ),
        None => Arc::new(
            EmbeddedStore::open(&config.data_dir.join("state.redb"))?.with_metrics(metrics.clone()),
        ),
    })
}

/// The tracking token keys: from the environment or `[tokens]` files, else
/// the state store's shared secret (created once, the same on every
/// instance). Never logged; only where they came from is.
pub async fn token_keys(config: &Config, store: &dyn StateStore) -> anyhow::Result<TokenKeys> {
    let (current, previous) = config.tokens.keys()?;
    let (key, source) = match current {
        Some(found) => found,
        None => (
            store.secret(TOKEN_SECRET).await?.to_vec(),
            format!("the state store's `{TOKEN_SECRET}` secret"),
        ),
    };
    tracing::info!(source = %source, rotating = previous.is_some(), "tracking token key loaded");
    Ok(TokenKeys::new(key, previous, &source)?)
}

/// Name of the state store's secret that tracking tokens are derived from
/// when no key is configured.
pub const TOKEN_SECRET: &str = "tracking-token-key";

/// Starts the read model's consumers: one per `order-status` partition, on
/// every instance. Distributed, they read through a Kafka client of their
/// own (their reads must not disturb the sinks' positions on the shared one).
async fn start_read_model(
    config: &Config,
    supervision: &supervisor::Supervision,
    log: &Arc<dyn Log>,
    store: &Arc<dyn StateStore>,
    tracking: &Arc<Tracking>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let metrics = &supervision.metrics;
    let log: Arc<dyn Log> = match &config.kafka {
        Some(kafka) => Arc::new(
            KafkaLog::connect(
                kafka,
                &topics(config),
                config.log.max_record_bytes,
                metrics.clone(),
            )
            .await
            .context("cannot open the Kafka log for the read model")?,
        ),
        None => log.clone(),
    };
    Ok((0..config.status_partitions)
        .map(|p| {
            let name = supervisor::TaskName {
                task: "read_model",
                topic: Topic::OrderStatus,
                partition: p,
            };
            let (t, l, s, rx, sv) = (
                tracking.clone(),
                log.clone(),
                store.clone(),
                stop.clone(),
                supervision.clone(),
            );
            let consumer = move || {
                let (t, l, s, rx, sv) = (t.clone(), l.clone(), s.clone(), rx.clone(), sv.clone());
                let stop = rx.clone();
                let attempt = move || {
                    tracking::run_consumer(t.clone(), l.clone(), s.clone(), p, rx.clone()).boxed()
                };
                async move {
                    if let Err(e) = sv.through_outages(name, stop, false, attempt).await {
                        tracing::error!(error = %e, "read model consumer failed");
                        let _ = sv.fatal.send(e.to_string()).await;
                    }
                }
                .boxed()
            };
            supervisor::spawn_watched(supervision.clone(), name, stop.clone(), false, consumer)
        })
        .collect())
}

fn topics(config: &Config) -> [(Topic, u32); 3] {
    [
        (Topic::Orders, config.partitions),
        (Topic::OrderStatus, config.status_partitions),
        (Topic::Parked, config.partitions),
    ]
}

impl App {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The log this instance runs on (benchmarks and tools append to it
    /// directly, as an upstream producer would).
    pub fn log(&self) -> Arc<dyn Log> {
        self.log.clone()
    }

    /// Stops intake, drains every partition, checkpoints, closes the log.
    /// Returns each partition's final state hash.
    pub async fn shutdown(mut self) -> anyhow::Result<Vec<RunnerExit>> {
        self.health.accepting.store(false, Ordering::SeqCst);
        self.health.ready.store(false, Ordering::SeqCst);
        if let Some(stop) = self.http_stop.take() {
            let _ = stop.send(());
        }
        let http = self.http.await;
        self.shutdown_tx.send_replace(true);
        // Runners stop (and checkpoint) first, then the sinks; only then
        // does this instance leave the group, so the next owners load
        // current checkpoints.
        let exits = self.supervisor.await?;
        let mut membership = self.membership;
        tokio::task::spawn_blocking(move || membership.leave()).await?;
        self.executor.await?;
        if let Some(n) = self.notifications {
            n.join().await;
        }
        for task in self.read_model {
            let _ = task.await;
        }
        let mut first_error = None;
        self.log.close().await;
        if let Err(e) = http? {
            first_error.get_or_insert(anyhow::Error::from(e).context("HTTP server failed"));
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(exits),
        }
    }

    /// Waits for SIGTERM/SIGINT (then shuts down cleanly) or for a fatal
    /// error in a partition or sink (then shuts down and reports it).
    pub async fn run_until_signal(mut self) -> anyhow::Result<()> {
        let fatal = tokio::select! {
            _ = shutdown_signal() => None,
            msg = self.fatal_rx.recv() => msg,
        };
        tracing::info!("shutting down: stopping intake, draining partitions");
        let result = self.shutdown().await;
        match (fatal, result) {
            (Some(msg), _) => anyhow::bail!("stopped after a fatal error: {msg}"),
            (None, r) => r.map(|_| ()),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `orderflow run`: start, serve until a signal, shut down cleanly.
pub async fn run(config: Config, credentials: Credentials) -> anyhow::Result<()> {
    start(config, credentials).await?.run_until_signal().await
}

/// The consumers of `order-status` each owned status partition runs: the
/// read model's owner (its replay points) and, when configured,
/// notifications.
fn status_sinks(
    tracking: &Arc<Tracking>,
    store: &Arc<dyn StateStore>,
    tracking_log: Arc<dyn Log>,
    notifications: Option<&Notifications>,
) -> Vec<Arc<dyn StatusSink>> {
    let mut sinks: Vec<Arc<dyn StatusSink>> = vec![Arc::new(tracking::OwnerSink {
        tracking: tracking.clone(),
        store: store.clone(),
        log: tracking_log,
    })];
    if let Some((running, log)) = notifications {
        sinks.push(Arc::new(notifications::NotificationsSink {
            notifier: running.notifier.clone(),
            log: log.clone(),
        }));
    }
    sinks
}
