//! One module per subcommand; this file only dispatches.

pub mod listener;
pub mod registry;
pub mod runs;
pub mod scheduler;
pub mod standalone;
pub mod worker;

use crate::cli::Command;
use crate::config::Config;
use crate::error::Result;

pub async fn dispatch(config: &Config, command: &Command) -> Result<()> {
    match command {
        Command::Registry(args) => registry::run(config, args).await,
        Command::Scheduler(args) => scheduler::run(config, args).await,
        Command::Worker(args) => worker::run(config, args).await,
        Command::Listener(args) => listener::run(config, args).await,
        Command::Runs(args) => runs::run(config, args).await,
        Command::Standalone(args) => standalone::run(config, args).await,
    }
}
