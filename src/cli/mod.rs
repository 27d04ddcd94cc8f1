//! The `orderflow` command line (clap). `run` starts an instance; the
//! client commands (`produce`, `stock`, `status`, `parked`) talk to a
//! running one over HTTP with an API token from the environment
//! (`ORDERFLOW_ADMIN_TOKEN`, or the token of a role the command needs).
//!
//! Exit codes: 0 ok, 1 failure, 2 usage or configuration error.
//! Logs go to stderr: `RUST_LOG` filters (default `info`),
//! `ORDERFLOW_LOG_FORMAT=json` switches to JSON lines; colour codes only
//! when stderr is a terminal.

mod client;
mod parked;
mod produce;
pub mod replay;
pub mod sim;
mod stock;
pub mod story;
mod token;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::gateway::sim_server;
use crate::gateway::simulator::{self, SimOptions};
use crate::http::auth::{Credentials, Role};

pub const LISTEN_ENV: &str = "ORDERFLOW_LISTEN";
pub const DATA_DIR_ENV: &str = "ORDERFLOW_DATA_DIR";
pub const SERVER_ENV: &str = "ORDERFLOW_SERVER";
pub const LOG_FORMAT_ENV: &str = "ORDERFLOW_LOG_FORMAT";

#[derive(Parser, Debug)]
#[command(
    name = "orderflow",
    version,
    about = "Order-processing stream processor"
)]
pub struct Cli {
    /// TOML configuration file (defaults apply to what it leaves out).
    #[arg(long, global = true, env = "ORDERFLOW_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Accepted before the command too, as earlier versions had it; each
    /// client command lists it in its own help.
    #[arg(long = "server", hide = true, value_name = "URL")]
    pub server_before_command: Option<String>,
    /// What to do; without one, `run` with its defaults (so that
    /// `cargo run --release` starts the embedded deployment).
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an instance: the embedded log and store, processors, HTTP API.
    #[command(after_help = EXAMPLES_RUN)]
    Run(RunArgs),
    /// Write NDJSON orders (a file, or - for stdin) to the log of a running
    /// instance. Prints one result line per input line.
    #[command(after_help = EXAMPLES_PRODUCE)]
    Produce {
        /// NDJSON file of orders, or `-` for standard input.
        #[arg(value_name = "FILE|-")]
        input: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set or read stock levels.
    #[command(after_help = EXAMPLES_STOCK)]
    Stock {
        #[command(subcommand)]
        command: StockCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The park lane: records a partition set aside (undecodable, or failed
    /// processing) and those waiting behind them, and the captures and
    /// voids that failed for good.
    #[command(after_help = EXAMPLES_PARKED)]
    Parked {
        #[command(subcommand)]
        command: ParkedCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print an order's status and history (as an operator).
    #[command(after_help = EXAMPLES_STATUS)]
    Status {
        /// The order id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the tracking token of an order id, as the instances of this
    /// configuration derive it (any valid id has one, whether or not the
    /// order exists): hand it to the customer of an order written to the
    /// log. The key comes from ORDERFLOW_TOKEN_SECRET or `[tokens]`, else
    /// from the state store (embedded: only while no instance runs on the
    /// data directory).
    #[command(after_help = EXAMPLES_TOKEN)]
    Token {
        /// The order id.
        id: String,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Rebuild partition state from the log (effects suppressed) and
    /// compare with its checkpoint: a stopped embedded instance's data
    /// directory, or a running distributed deployment's Kafka topics and
    /// ScyllaDB checkpoints; exits 1 on a mismatch.
    /// With `--order ID`, tell that order's story instead; with `--diff
    /// DIR`, list the orders this binary would decide differently.
    #[command(after_help = EXAMPLES_REPLAY)]
    Replay {
        /// Only this partition (default: all).
        #[arg(long, conflicts_with = "order")]
        partition: Option<u32>,
        /// Tell the story of this order across partitions, record by
        /// record, with the stock each record saw; exits 1 if no record
        /// concerns it.
        #[arg(long)]
        order: Option<String>,
        /// With `--order`: one JSON object per record instead of text.
        #[arg(long, requires = "order")]
        json: bool,
        /// Replay the log of the stopped instance in DIR with this binary
        /// and list the orders whose outcome would differ from DIR's
        /// checkpoint (one JSON line each, then a summary); exits 1 if any.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["order", "partition"])]
        diff: Option<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Create the ScyllaDB keyspace and tables of `[scylla]` unless they
    /// exist (idempotent); run it before the first `run` that uses them.
    /// Prints what it created.
    #[command(after_help = EXAMPLES_MIGRATE)]
    Migrate(RunArgs),
    /// Run the payment gateway simulator as its own process, speaking the
    /// Stripe API subset orderflow uses (point `gateway.kind = "stripe"`,
    /// `gateway.url` at it). Prints `gateway-sim listening addr=IP:PORT`.
    #[command(after_help = EXAMPLES_GATEWAY_SIM)]
    GatewaySim(GatewaySimArgs),
    /// Benchmark a whole instance in this process: a seeded workload
    /// offered open-loop at `--rate` (0 = saturation), latency from intake
    /// to terminal status; a report to stdout, and `--json`, `--markdown`,
    /// `--plots` files. Exits 1 if an order was lost or never finished.
    #[command(after_help = EXAMPLES_BENCH)]
    Bench(Box<crate::bench::BenchArgs>),
    /// Deterministic simulation of the embedded pipeline: crash points,
    /// torn writes, gateway failures, invariants checked after every step.
    /// Exits 1 on a violation, printing a minimal trace and the command
    /// that reproduces it.
    #[command(after_help = EXAMPLES_SIM)]
    Sim(sim::SimArgs),
    /// Print a shell completion script for orderflow to standard output.
    #[command(after_help = EXAMPLES_COMPLETIONS)]
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
}

const EXAMPLES_RUN: &str = "Examples:
  orderflow run
  orderflow run --listen 0.0.0.0:8080 --data-dir /var/lib/orderflow
  ORDERFLOW_CONFIG=orderflow.toml orderflow run";
const EXAMPLES_PRODUCE: &str = "Examples:
  orderflow produce orders.ndjson
  generate-orders | orderflow produce - --server http://10.0.0.5:8080";
const EXAMPLES_STOCK: &str = "Examples:
  orderflow stock load stock.csv
  orderflow stock get SKU-1 --server http://10.0.0.5:8080";
const EXAMPLES_PARKED: &str = "Examples:
  orderflow parked list
  orderflow parked show 3:1042
  orderflow parked retry --partition 3
  orderflow parked drop 3:1042
  orderflow parked drop-effect 3 o-42 capture";
const EXAMPLES_STATUS: &str = "Examples:
  orderflow status o-42
  orderflow status o-42 --server http://10.0.0.5:8080";
const EXAMPLES_TOKEN: &str = "Examples:
  orderflow token o-42
  ORDERFLOW_CONFIG=orderflow.toml orderflow token o-42";
const EXAMPLES_REPLAY: &str = "Examples:
  orderflow replay --data-dir data
  orderflow replay --order o-42
  orderflow replay --diff /backups/data-copy
  ORDERFLOW_CONFIG=distributed.toml orderflow replay --partition 3";
const EXAMPLES_MIGRATE: &str = "Examples:
  ORDERFLOW_CONFIG=distributed.toml orderflow migrate
  ORDERFLOW_SCYLLA_NODES=10.0.0.7:9042 orderflow migrate";
const EXAMPLES_GATEWAY_SIM: &str = "Examples:
  orderflow gateway-sim --listen 127.0.0.1:12111
  orderflow gateway-sim --listen 0.0.0.0:12111 --latency-ms 20 --failure-rate 0.01";
const EXAMPLES_BENCH: &str = "Examples:
  orderflow bench --workload uniform --rate 0 --seconds 30
  orderflow bench --search --slo-p99-ms 5 --postgres postgres://postgres@127.0.0.1/postgres
  orderflow bench --kafka 127.0.0.1:9092 --scylla 127.0.0.1:9042 --rate 5000";
const EXAMPLES_SIM: &str = "Examples:
  orderflow sim --seed 7 --steps 2000
  orderflow sim --seed 1 --seeds 100";
const EXAMPLES_COMPLETIONS: &str = "Examples:
  orderflow completions bash > /etc/bash_completion.d/orderflow
  orderflow completions zsh > \"${fpath[1]}/_orderflow\"
  orderflow completions fish > ~/.config/fish/completions/orderflow.fish";

#[derive(Args, Debug)]
pub struct GatewaySimArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Latency added to every call, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub latency_ms: u64,
    /// Probability (0 to 1) that a call fails with 500 or 503.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Payment intents kept at most (1 to 100000000). A create finding them
    /// all kept forgets the settled one (captured, canceled, declined)
    /// created first; authorizations awaiting capture are never forgotten
    /// for room: when all kept intents are, the create answers 429
    /// `rate_limit` and creates nothing.
    #[arg(long, value_name = "N", default_value_t = sim_server::DEFAULT_MAX_INTENTS)]
    pub max_intents: usize,
    /// A settled intent is forgotten this long after it settled, in
    /// milliseconds (1 to 365 days; default 24 h); it then answers 404 and
    /// search no longer finds it.
    #[arg(long, value_name = "MS", default_value_t = simulator::DEFAULT_INTENT_RETENTION_MS)]
    pub intent_retention_ms: u64,
    /// An authorization not captured this long after it was made is
    /// canceled with `cancellation_reason=automatic`, as Stripe does after
    /// 7 days; in milliseconds (1 to 365 days; default 7 days).
    #[arg(long, value_name = "MS", default_value_t = simulator::DEFAULT_AUTHORIZATION_TTL_MS)]
    pub authorization_ttl_ms: u64,
    /// Idempotency keys kept at most (1 to 100000000); the oldest is
    /// forgotten first.
    #[arg(long, value_name = "N", default_value_t = sim_server::DEFAULT_MAX_KEYS)]
    pub max_keys: usize,
    /// An idempotency key is forgotten this long after its first answer,
    /// in milliseconds (1 to 365 days; default 24 h, as Stripe); reusing it
    /// then executes the request anew.
    #[arg(long, value_name = "MS", default_value_t = simulator::DEFAULT_KEY_TTL_MS)]
    pub key_ttl_ms: u64,
    /// Calls kept in `GET /ledger`, the last ones (1 to 100000000); the
    /// summary's counters stay totals.
    #[arg(long, value_name = "N", default_value_t = simulator::DEFAULT_MAX_CALLS)]
    pub max_calls: usize,
}

impl GatewaySimArgs {
    /// The simulator's options, or the usage error naming the flag out of
    /// range.
    pub fn sim_options(&self) -> Result<SimOptions, CliError> {
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(CliError::Usage(format!(
                "`--failure-rate` = {} is out of range [0, 1]",
                self.failure_rate
            )));
        }
        if self.latency_ms > 60_000 {
            return Err(CliError::Usage(format!(
                "`--latency-ms` = {} is out of range [0, 60000]",
                self.latency_ms
            )));
        }
        let options = SimOptions {
            latency: std::time::Duration::from_millis(self.latency_ms),
            failure_rate: self.failure_rate,
            record_calls: true,
            max_intents: self.max_intents,
            intent_retention_ms: self.intent_retention_ms,
            authorization_ttl_ms: self.authorization_ttl_ms,
            max_keys: self.max_keys,
            key_ttl_ms: self.key_ttl_ms,
            max_calls: self.max_calls,
            clock: simulator::Clock::System,
        };
        for (name, v, lo, hi) in options.bound_ranges() {
            if !(lo..=hi).contains(&v) {
                let flag = name.replace('_', "-");
                return Err(CliError::Usage(format!(
                    "`--{flag}` = {v} is out of range [{lo}, {hi}]"
                )));
            }
        }
        Ok(options)
    }
}

#[derive(Subcommand, Debug)]
pub enum ParkedCommand {
    /// One JSON line per parked record, by partition and offset, then one
    /// `{"failed_effect": …}` line per capture or void that failed for good.
    List,
    /// One parked record with its bytes.
    Show {
        /// PARTITION:OFFSET
        #[arg(value_parser = parked::parse_position)]
        position: (u32, u64),
    },
    /// Run the failed captures and voids again, and process the parked
    /// records again, in their original order.
    Retry {
        /// Only this partition (default: every partition with parked
        /// records or failed effects).
        #[arg(long)]
        partition: Option<u32>,
    },
    /// Take one record out of the lane for good, unprocessed.
    Drop {
        /// PARTITION:OFFSET
        #[arg(value_parser = parked::parse_position)]
        position: (u32, u64),
    },
    /// Forget a capture or void that failed for good, once it has been
    /// settled by hand at the gateway.
    DropEffect {
        partition: u32,
        order_id: String,
        #[arg(value_parser = ["capture", "void"])]
        kind: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum StockCommand {
    /// Set available stock from a JSON object `{"SKU": N, ...}` or NDJSON
    /// lines `{"sku": "SKU", "available": N}`.
    Load {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print a SKU's counters: available, reserved, sold.
    Get { sku: String },
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long, env = LISTEN_ENV, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub data: DataArgs,
}

/// Where an instance's data is: what the commands that read it offline
/// (`replay`, `token`) take.
#[derive(Args, Debug, Default, Clone)]
pub struct DataArgs {
    /// Directory of the embedded log and state store [default: data].
    #[arg(long, env = DATA_DIR_ENV, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Partitions of the `orders` topic [default: 8].
    #[arg(long, env = "ORDERFLOW_PARTITIONS", value_name = "N")]
    pub partitions: Option<u32>,
}

#[derive(Args, Debug, Clone, Default)]
pub struct ClientArgs {
    /// Base URL of a running instance (or ORDERFLOW_SERVER)
    /// [default: http:// + the listen address].
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
}

impl ClientArgs {
    /// The server named after the command, else before it, else by
    /// ORDERFLOW_SERVER.
    fn or_before(self, before: &Option<String>) -> ClientArgs {
        let env = || std::env::var(SERVER_ENV).ok().filter(|s| !s.is_empty());
        ClientArgs {
            server: self.server.or_else(|| before.clone()).or_else(env),
        }
    }
}

/// A command's failure: `Usage` (the caller's input) exits 2, `Failed`
/// exits 1.
#[derive(thiserror::Error, Debug)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Failed(e)
    }
}

impl From<crate::config::ConfigError> for CliError {
    fn from(e: crate::config::ConfigError) -> Self {
        CliError::Usage(e.to_string())
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(CliError::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(CliError::Failed(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs a parsed command; `Ok(false)` is a partial failure (exit 1).
pub async fn dispatch(cli: Cli) -> Result<bool, CliError> {
    let file = cli.config.as_deref();
    let before = &cli.server_before_command;
    let command = cli
        .command
        .unwrap_or_else(|| Command::Run(RunArgs::default()));
    match command {
        Command::Run(args) => {
            let config = run_config(file, &args)?;
            let credentials =
                Credentials::load(&config.auth).map_err(|e| CliError::Usage(e.to_string()))?;
            if credentials.is_empty() {
                tracing::warn!(
                    "no API token is configured ({}, {}, {}): the routes that need one (inventory, produce, park lane, tracking tokens) answer 403",
                    Role::Admin.env_var(),
                    Role::Reader.env_var(),
                    Role::Producer.env_var()
                );
            }
            start_app(config, credentials).await?;
            Ok(true)
        }
        Command::Produce { input, client } => {
            let client = client.or_before(before);
            let c = client::Client::new(file, &client, &[Role::Admin, Role::Producer])?;
            Ok(produce::run(&c, &input).await?)
        }
        Command::Stock {
            command: StockCommand::Load { file: path },
            client,
        } => {
            let client = client.or_before(before);
            let c = client::Client::new(file, &client, &[Role::Admin])?;
            Ok(stock::load(&c, &path).await?)
        }
        Command::Stock {
            command: StockCommand::Get { sku },
            client,
        } => {
            let client = client.or_before(before);
            let c = client::Client::new(file, &client, &[Role::Admin, Role::Reader])?;
            Ok(stock::get(&c, &sku).await?)
        }
        Command::Parked { command, client } => {
            let client = client.or_before(before);
            let c = client::Client::new(file, &client, &[Role::Admin])?;
            Ok(parked::run(&c, command).await?)
        }
        Command::Status { id, client } => {
            let client = client.or_before(before);
            let c = client::Client::new(file, &client, &[Role::Admin, Role::Reader])?;
            Ok(client::status(&c, &id).await?)
        }
        Command::Token { id, data } => {
            let config = run_config(file, &RunArgs { listen: None, data })?;
            token::print(&config, &id).await
        }
        Command::Replay {
            partition,
            order,
            json,
            diff,
            data,
        } => {
            let config = run_config(file, &RunArgs { listen: None, data })?;
            match (order, diff) {
                (Some(id), _) => Ok(replay::order_story(&config, &id, json).await?),
                (None, Some(dir)) => Ok(replay::diff(&config, &dir).await?),
                (None, None) => Ok(replay::run(&config, partition).await?),
            }
        }
        Command::Migrate(args) => {
            let config = run_config(file, &args)?;
            let Some(scylla) = &config.scylla else {
                return Err(CliError::Usage(
                    "`orderflow migrate` needs a [scylla] section or ORDERFLOW_SCYLLA_NODES".into(),
                ));
            };
            let created = crate::pipeline::store::scylla::migrate(scylla)
                .await
                .map_err(anyhow::Error::from)?;
            if created.is_empty() {
                println!(
                    "keyspace {} is up to date: nothing to create",
                    scylla.keyspace
                );
            }
            for what in created {
                println!("created {what}");
            }
            Ok(true)
        }
        Command::Bench(args) => {
            args.validate()?;
            let config = base_config(file)?;
            Ok(crate::bench::run(*args, config).await?)
        }
        Command::Sim(args) => sim::run(&args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "orderflow", &mut std::io::stdout());
            Ok(true)
        }
        Command::GatewaySim(args) => {
            let options = args.sim_options()?;
            sim_server::run(args.listen, options).await?;
            Ok(true)
        }
    }
}

/// The configuration of `run`: defaults ← file ← environment and flags,
/// then validated.
pub fn run_config(file: Option<&Path>, args: &RunArgs) -> Result<Config, CliError> {
    let mut config = base_config(file)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.data.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(p) = args.data.partitions {
        config.partitions = p;
    }
    apply_backend_env(&mut config);
    config.validate()?;
    Ok(config)
}

/// `ORDERFLOW_KAFKA_BOOTSTRAP` and `ORDERFLOW_SCYLLA_NODES` switch to the
/// distributed backends (keeping the file's other keys of those sections),
/// so a container needs no config file.
fn apply_backend_env(config: &mut Config) {
    use crate::config::{KAFKA_BOOTSTRAP_ENV, SCYLLA_NODES_ENV};
    if let Some(servers) = std::env::var(KAFKA_BOOTSTRAP_ENV)
        .ok()
        .filter(|s| !s.is_empty())
    {
        config
            .kafka
            .get_or_insert_with(Default::default)
            .bootstrap_servers = servers;
    }
    if let Some(nodes) = std::env::var(SCYLLA_NODES_ENV)
        .ok()
        .filter(|s| !s.is_empty())
    {
        config.scylla.get_or_insert_with(Default::default).nodes =
            nodes.split(',').map(|n| n.trim().to_owned()).collect();
    }
}

/// Defaults, overridden by the file when one is given.
pub fn base_config(file: Option<&Path>) -> Result<Config, CliError> {
    Ok(match file {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    })
}

/// Starts the instance and runs it until it is told to stop.
async fn start_app(config: Config, credentials: Credentials) -> anyhow::Result<()> {
    crate::app::run(config, credentials).await
}

fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var(LOG_FORMAT_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Colour codes only for a person at a terminal: in a file, a pipe or a
    // log collector they are noise that breaks searches and parsers.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second initialisation (tests) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags override the file, and invalid values are usage errors.
    #[test]
    fn run_config_layers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "partitions = 4\nlisten = \"127.0.0.1:9000\"\n").unwrap();
        let args = RunArgs {
            listen: None,
            data: DataArgs {
                data_dir: Some("/tmp/x".into()),
                partitions: None,
            },
        };
        let c = run_config(Some(&path), &args).unwrap();
        assert_eq!(
            (c.partitions, c.listen.port(), c.data_dir.as_path()),
            (4, 9000, Path::new("/tmp/x"))
        );
        let args = RunArgs {
            listen: None,
            data: DataArgs {
                data_dir: None,
                partitions: Some(0),
            },
        };
        assert!(matches!(
            run_config(Some(&path), &args),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            run_config(Some(&dir.path().join("missing.toml")), &args),
            Err(CliError::Usage(_))
        ));
    }

    /// The command line parses as documented.
    #[test]
    fn parses() {
        let cli = Cli::try_parse_from([
            "orderflow",
            "--config",
            "c.toml",
            "stock",
            "get",
            "SKU-1",
            "--server",
            "http://h:1",
        ])
        .unwrap();
        let Some(Command::Stock {
            command: StockCommand::Get { .. },
            client,
        }) = cli.command
        else {
            panic!("stock get parses as Stock/Get");
        };
        assert_eq!(client.server.as_deref(), Some("http://h:1"));
        let bare = Cli::try_parse_from(["orderflow"]).unwrap();
        assert!(bare.command.is_none(), "no subcommand means `run`");
        // Before the command, as earlier versions had it.
        let cli =
            Cli::try_parse_from(["orderflow", "--server", "http://h:2", "status", "o-1"]).unwrap();
        let Some(Command::Status { client, .. }) = cli.command else {
            panic!("status parses as Status");
        };
        let resolved = client.or_before(&cli.server_before_command);
        assert_eq!(resolved.server.as_deref(), Some("http://h:2"));
        assert!(Cli::try_parse_from(["orderflow", "produce"]).is_err());
        Cli::try_parse_from([
            "orderflow",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--partitions",
            "2",
        ])
        .unwrap();
        let cli = Cli::try_parse_from([
            "orderflow",
            "gateway-sim",
            "--listen",
            "127.0.0.1:0",
            "--latency-ms",
            "20",
            "--failure-rate",
            "0.01",
        ])
        .unwrap();
        let Some(Command::GatewaySim(args)) = cli.command else {
            panic!("gateway-sim parses as GatewaySim");
        };
        assert_eq!(args.latency_ms, 20);
        let options = args.sim_options().unwrap();
        assert_eq!(
            (options.max_intents, options.max_keys, options.max_calls),
            (1_000_000, 2_000_000, 100_000),
            "gateway-sim's own defaults"
        );
        assert_eq!(
            (
                options.intent_retention_ms,
                options.authorization_ttl_ms,
                options.key_ttl_ms
            ),
            (86_400_000, 604_800_000, 86_400_000)
        );
        assert!(options.record_calls);
        assert!(Cli::try_parse_from(["orderflow", "gateway-sim"]).is_err());
        let sim = |extra: &[&str]| {
            let base = ["orderflow", "gateway-sim", "--listen", "127.0.0.1:0"];
            let cli = Cli::try_parse_from(base.iter().chain(extra)).unwrap();
            let Some(Command::GatewaySim(args)) = cli.command else {
                panic!("gateway-sim parses as GatewaySim");
            };
            args.sim_options()
        };
        let o = sim(&[
            "--max-intents",
            "10",
            "--max-keys",
            "20",
            "--max-calls",
            "30",
            "--intent-retention-ms",
            "40",
            "--authorization-ttl-ms",
            "50",
            "--key-ttl-ms",
            "60",
        ])
        .unwrap();
        assert_eq!(
            (o.max_intents, o.max_keys, o.max_calls),
            (10, 20, 30),
            "count flags"
        );
        assert_eq!(
            (o.intent_retention_ms, o.authorization_ttl_ms, o.key_ttl_ms),
            (40, 50, 60),
            "time flags"
        );
        for flag in [
            "--max-intents",
            "--max-keys",
            "--max-calls",
            "--intent-retention-ms",
            "--authorization-ttl-ms",
            "--key-ttl-ms",
        ] {
            let e = sim(&[flag, "0"]).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("`{flag}` = 0 is out of range [1, ")),
                "{e}"
            );
        }
        let e = sim(&["--key-ttl-ms", "31622400000"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "`--key-ttl-ms` = 31622400000 is out of range [1, 31536000000]"
        );
        let e = sim(&["--failure-rate", "2"]).unwrap_err().to_string();
        assert!(e.contains("`--failure-rate` = 2"), "{e}");
        let cli = Cli::try_parse_from(["orderflow", "migrate", "--data-dir", "d"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Migrate(_))));
        let cli = Cli::try_parse_from(["orderflow", "token", "ord-1", "--data-dir", "d"]).unwrap();
        let Some(Command::Token { id, data }) = cli.command else {
            panic!("token parses as Token");
        };
        assert_eq!(
            (id.as_str(), data.data_dir),
            ("ord-1", Some(PathBuf::from("d")))
        );
        assert!(Cli::try_parse_from(["orderflow", "token"]).is_err());
    }

    /// The help of `name …`, as `orderflow name … --help` prints it.
    fn help(name: &[&str]) -> String {
        let args = ["orderflow"].iter().chain(name).chain(&["--help"]);
        match Cli::try_parse_from(args) {
            Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => e.to_string(),
            other => panic!("{name:?} --help: {other:?}"),
        }
    }

    /// Each command's help lists only its own options and shows examples.
    #[test]
    fn each_help_is_its_own_with_examples() {
        use clap::CommandFactory;
        for sub in Cli::command().get_subcommands() {
            let name = sub.get_name();
            if name == "help" {
                continue;
            }
            let text = help(&[name]);
            assert!(text.contains("Examples:"), "{name} --help has no examples");
            let client = ["produce", "stock", "parked", "status"].contains(&name);
            assert_eq!(text.contains("--server"), client, "{name} --help:\n{text}");
            let listens = ["run", "migrate", "gateway-sim"].contains(&name);
            assert_eq!(text.contains("--listen"), listens, "{name} --help:\n{text}");
        }
        assert!(help(&["parked", "list"]).contains("--server"));
    }

    /// Completions are generated for each shell clap supports.
    #[test]
    fn completions_for_every_shell() {
        use clap::CommandFactory;
        use clap::ValueEnum;
        for shell in clap_complete::Shell::value_variants() {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "orderflow", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("orderflow") && text.contains("replay"),
                "{shell}"
            );
        }
        let cli = Cli::try_parse_from(["orderflow", "completions", "bash"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Completions { .. })));
    }
}
