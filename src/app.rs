//! Wiring of a running instance: the one place where backends are chosen.
//! `start` opens the data directory (locked against a second process),
//! the embedded log and store, starts one runner per `orders` partition,
//! the effect executor, the tracking and notifications sinks and the HTTP
//! server. `shutdown` stops intake, drains, checkpoints and closes
//! everything in order.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, GatewayKind, Secret};
use crate::gateway::PaymentGateway;
use crate::gateway::breaker::{Breaker, BreakerConfig};
use crate::gateway::simulator::Simulator;
use crate::gateway::stripe::StripeClient;
use crate::http::{AppState, Health};
use crate::pipeline::effects;
use crate::pipeline::intake::Intake;
use crate::pipeline::inventory::Inventory;
use crate::pipeline::log::embedded::EmbeddedLog;
use crate::pipeline::log::{Log, Topic};
use crate::pipeline::runner::{self, RunnerDeps, RunnerExit};
use crate::pipeline::store::StateStore;
use crate::pipeline::store::embedded::EmbeddedStore;
use crate::sinks::metrics::Metrics;
use crate::sinks::notifications;
use crate::sinks::tracking::{self, Tracking};

/// A running instance.
pub struct App {
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown_tx: watch::Sender<bool>,
    http_stop: Option<tokio::sync::oneshot::Sender<()>>,
    http: JoinHandle<std::io::Result<()>>,
    runners: Vec<JoinHandle<Result<RunnerExit, runner::RunnerError>>>,
    sinks: Vec<JoinHandle<Result<(), tracking::SinkError>>>,
    notifications: Option<notifications::Running>,
    executor: JoinHandle<()>,
    log: Arc<dyn Log>,
    fatal_rx: mpsc::Receiver<String>,
    _lock: File,
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

pub async fn start(config: Config, admin_token: Option<Secret>) -> anyhow::Result<App> {
    config.validate()?;
    let gateway = Gateway::from_config(&config)?;
    start_inner(config, admin_token, gateway).await
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

/// `start` with a given simulator, which tests keep across restarts the way
/// a real gateway outlives the process. It is wrapped in the circuit
/// breaker like any configured gateway (`gateway.kind` is ignored).
pub async fn start_with_gateway(
    config: Config,
    admin_token: Option<Secret>,
    gateway: Arc<Simulator>,
) -> anyhow::Result<App> {
    start_inner(config, admin_token, Gateway::Simulator(gateway)).await
}

async fn start_inner(
    config: Config,
    admin_token: Option<Secret>,
    gateway: Gateway,
) -> anyhow::Result<App> {
    config.validate()?;
    let lock = lock_data_dir(&config.data_dir)?;
    let metrics = Arc::new(Metrics::new());
    let topics = [
        (Topic::Orders, config.partitions),
        (Topic::OrderStatus, config.status_partitions),
    ];
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(
        &config.data_dir.join("log"),
        &topics,
        &config.log,
        metrics.clone(),
    )?);
    let store: Arc<dyn StateStore> =
        Arc::new(EmbeddedStore::open(&config.data_dir.join("state.redb"))?);
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
    );
    let inventory = Arc::new(Inventory::new(log.clone()));
    let tracking = Arc::new(Tracking::new(store.clone(), metrics.clone()));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (fatal_tx, fatal_rx) = mpsc::channel::<String>(64);
    let recovered = Arc::new(Semaphore::new(0));

    let mut runners = Vec::new();
    for partition in 0..config.partitions {
        let deps = RunnerDeps {
            log: log.clone(),
            store: store.clone(),
            effects: effects.clone(),
            inventory: inventory.clone(),
            metrics: metrics.clone(),
            checkpoint: config.checkpoint.clone(),
            retention: config.processor.retention(),
            epoch: 1,
            recovered: recovered.clone(),
        };
        let (rx, fatal) = (shutdown_rx.clone(), fatal_tx.clone());
        runners.push(tokio::spawn(async move {
            let result = runner::run(partition, deps, rx).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "partition runner failed");
                let _ = fatal.send(e.to_string()).await;
            }
            result
        }));
    }
    drop(effects);

    // Two consumers of `order-status` when notifications are on: retention
    // keeps what the slower one still needs.
    let (tracking_log, notifications_log) = match &config.notifications {
        Some(_) => {
            let views = crate::pipeline::log::release::ReleaseView::split(log.clone(), 2);
            (views[0].clone(), Some(views[1].clone()))
        }
        None => (log.clone(), None),
    };
    let positions = store.sink_positions(tracking::SINK_NAME).await?;
    let mut sinks = Vec::new();
    for partition in 0..config.status_partitions {
        let next = positions.get(&partition).copied().unwrap_or(0);
        let (t, l, rx, fatal) = (
            tracking.clone(),
            tracking_log.clone(),
            shutdown_rx.clone(),
            fatal_tx.clone(),
        );
        sinks.push(tokio::spawn(async move {
            let result = tracking::run_sink(t, l, partition, next, rx).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "tracking sink failed");
                let _ = fatal.send(e.to_string()).await;
            }
            result
        }));
    }
    let notifications = match (&config.notifications, notifications_log) {
        (Some(n), Some(l)) => Some(
            notifications::start(
                n,
                store.clone(),
                l,
                metrics.clone(),
                shutdown_rx.clone(),
                fatal_tx.clone(),
            )
            .await?,
        ),
        _ => None,
    };

    let health = Arc::new(Health {
        gateway: Some(breaker.clone()),
        ..Health::default()
    });
    health.accepting.store(true, Ordering::SeqCst);
    {
        let (health, recovered, n) = (health.clone(), recovered.clone(), config.partitions);
        tokio::spawn(async move {
            if let Ok(permits) = recovered.acquire_many(n).await {
                permits.forget();
                health.ready.store(true, Ordering::SeqCst);
            }
        });
    }
    let intake = Arc::new(Intake::new(log.clone(), store.clone(), metrics.clone()).await?);
    let state = AppState {
        intake,
        tracking,
        inventory,
        metrics: metrics.clone(),
        admin_token,
        config: config.http.clone(),
        health: health.clone(),
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let (http_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = crate::http::router(state);
    let http = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
    });
    tracing::info!(%addr, data_dir = %config.data_dir.display(), partitions = config.partitions, "orderflow listening");
    Ok(App {
        addr,
        health,
        shutdown_tx,
        http_stop: Some(http_stop),
        http,
        runners,
        sinks,
        notifications,
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
        let mut exits = Vec::new();
        let mut first_error = None;
        for r in self.runners {
            match r.await? {
                Ok(exit) => exits.push(exit),
                Err(e) => {
                    first_error.get_or_insert(anyhow::Error::from(e));
                }
            }
        }
        self.executor.await?;
        for s in self.sinks {
            if let Err(e) = s.await? {
                first_error.get_or_insert(anyhow::Error::from(e));
            }
        }
        if let Some(n) = self.notifications
            && let Err(e) = n.join().await
        {
            first_error.get_or_insert(e);
        }
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
pub async fn run(config: Config, admin_token: Option<Secret>) -> anyhow::Result<()> {
    start(config, admin_token).await?.run_until_signal().await
}
