//! `listener`: the HTTP server for webhooks, the JSON API, health and metrics.

use crate::cli::ListenerArgs;
use crate::config::Config;
use crate::error::Result;
use crate::shutdown::Shutdown;
use crate::store::Store;

pub async fn run(config: &Config, args: &ListenerArgs) -> Result<()> {
    let shutdown = Shutdown::install();
    let store = Store::open(config).await?;
    let bind = args.bind.unwrap_or(config.listener.bind);
    crate::listener::serve(config, store, bind, shutdown).await
}
