//! jobschleuder: a distributed, cron-style job scheduler.
//!
//! Operators describe jobs in a YAML file; `registry --import` loads it into the store; a
//! scheduler fires registry entries on their cron schedules; workers on many hosts run them
//! through plugins; a listener turns webhooks into runs. `standalone` runs all of it in one
//! process on one host, with SQLite and the table queue.
//!
//! # Layout
//! ARCHITECTURE.md (at the repository's top) has the same list as its code map, with what each
//! module may call and must never do, and the invariants that keep runs exactly once.
//! - [`cli`]: the command line (clap), including the original's two-letter short options.
//! - [`config`]: the YAML configuration, environment overrides, secrets.
//! - [`logging`]: level filter, log handlers, the `--uuid` tag.
//! - [`jobfile`]: the job file: parsing and complete validation.
//! - [`cron`]: cron expressions and next-run times in a zone, with Vixie cron's DST rules.
//! - [`store`]: the database behind one interface: [`store::postgres`] and [`store::sqlite`],
//!   each with its migrations and every query.
//! - [`plugin`]: the plugin host: loading cdylib plugins and calling them across the C ABI.
//! - [`python`]: the original's Python plugins, run unchanged in Python processes of their own.
//! - [`queue`]: the queue behind one interface, and the message format: [`queue::rabbitmq`]
//!   (publishing with confirms, consuming) and [`queue::table`] (a table in the database).
//! - [`scheduler`]: due schedule rows become runs; queued runs are published (the outbox).
//! - [`worker`]: deliveries become plugin calls; results are recorded, then acknowledged.
//! - [`listener`]: webhooks become runs; the JSON API, `/healthz` and `/metrics`.
//! - [`shutdown`]: SIGTERM/SIGINT handling: a graceful stop, then an immediate one.
//! - [`process`]: the processes a worker started, killed when it stops.
//! - [`output`]: tables and JSON for `--show-*`.
//! - [`commands`]: one module per subcommand.
//! - [`error`]: the error type commands return, and exit codes.

pub mod cli;
pub mod commands;
pub mod config;
pub mod cron;
pub mod error;
pub mod jobfile;
pub mod listener;
pub mod logging;
pub mod output;
pub mod plugin;
pub mod process;
pub mod python;
pub mod queue;
pub mod scheduler;
pub mod shutdown;
pub mod store;
pub mod worker;

pub use error::{Error, Result};

/// Runs a parsed command line: loads the configuration, sets up logging, runs the subcommand.
pub fn run(cli: cli::Cli) -> Result<()> {
    let config = config::Config::load(cli.config.as_deref())?;
    let level = cli
        .loglevel
        .clone()
        .or_else(|| config.loglevel.clone())
        .unwrap_or_else(|| "info".to_string());
    let handler = logging::LogHandler::parse(cli.loghandler.as_deref().unwrap_or("stderr"));
    logging::init(&level, &handler, cli.uuid.clone(), cli.debug_veritas)?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    tracing::debug!(config = %config.origin(), database = %config.database.describe(), queue = %queue::Queue::describe(&config), "configuration loaded");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(commands::dispatch(&config, &cli.command));
    // Plugin calls abandoned after a grace period may still run on their threads: do not wait
    // for them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
