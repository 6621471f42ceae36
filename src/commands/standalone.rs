//! `standalone`: the whole system in one process — scheduler, worker slots and listener, over
//! one store and one queue. With no database and no broker configured that is one SQLite file
//! with the table queue in it: nothing to install. Ctrl-C (or SIGTERM) stops every part as
//! each stops on its own: running jobs get the worker's grace period, a second signal
//! interrupts them.

use crate::cli::{RegistryArgs, StandaloneArgs};
use crate::config::{Config, QueueKind};
use crate::error::{Error, Result};
use crate::shutdown::Shutdown;
use crate::store::Store;

pub async fn run(config: &Config, args: &StandaloneArgs) -> Result<()> {
    if args.workers == 0 {
        return Err(Error::Usage(
            "standalone --workers must be at least 1".into(),
        ));
    }
    if let Some(file) = &args.import {
        let import = RegistryArgs {
            import: Some(file.clone()),
            show_jobs: false,
            show_registry: false,
            pause: None,
            resume: None,
            all: false,
            note: None,
            json: false,
        };
        super::registry::run(config, &import).await?;
    }
    let store = Store::open(config).await?;
    let bind = args.bind.unwrap_or(config.listener.bind);
    let queue = config.rabbitmq.queue.clone();
    let id = gethostname::gethostname().to_string_lossy().into_owned();
    eprintln!("{}", banner(config, &store, args.workers, bind));

    // Signals stop every part; so does a part that cannot run (the listener's port taken).
    let signals = Shutdown::install();
    signals.handle_forced();
    let (stop, shutdown) = Shutdown::manual();
    let stop = std::sync::Arc::new(stop);
    {
        let (stop, mut signals) = (stop.clone(), signals.clone());
        tokio::spawn(async move {
            signals.wait().await;
            stop.stop();
            signals.forced().await;
            stop.force();
        });
    }
    // On this task (its passes hold non-Send state); the worker and listener on their own.
    let scheduler = crate::scheduler::run(&store, config, false, shutdown.clone());
    let worker = {
        let (store, config, shutdown) = (store.clone(), config.clone(), shutdown.clone());
        let options = crate::worker::WorkerOptions {
            id,
            slots: args.workers,
            queue,
        };
        tokio::spawn(async move { crate::worker::run(store, &config, options, shutdown).await })
    };
    let listener = {
        let (store, config, shutdown) = (store.clone(), config.clone(), shutdown.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let served = crate::listener::serve(&config, store, bind, shutdown).await;
            if let Err(e) = &served {
                tracing::error!(error = %e, "the listener cannot run: stopping standalone");
                stop.stop();
            }
            served
        })
    };
    let (scheduler, worker, listener) = tokio::join!(scheduler, worker, listener);
    let joined = |what: &str, e: tokio::task::JoinError| {
        Error::Runtime(format!("standalone: the {what} failed: {e}"))
    };
    let listened = listener.map_err(|e| joined("listener", e))?;
    let worked = worker.map_err(|e| joined("worker", e))?;
    scheduler.map_err(|e| Error::Runtime(format!("scheduler: {e}")))?;
    listened?;
    match worked {
        Ok(crate::worker::Stopped::Gracefully) => Ok(()),
        Ok(crate::worker::Stopped::Forced) => Err(Error::Interrupted),
        Ok(crate::worker::Stopped::Stuck) => Err(Error::Runtime(
            "every worker slot was held by a plugin call that ignores its timeout; standalone stopped so that it can be restarted (its runs are queued for their next attempt)".into(),
        )),
        Err(e) => Err(Error::Runtime(e.to_string())),
    }
}

/// What standalone tells on start: where its data lives, and that it is one host's.
fn banner(config: &Config, store: &Store, workers: usize, bind: std::net::SocketAddr) -> String {
    let config_arg = config
        .path
        .as_ref()
        .map(|p| format!(" --config {}", p.display()))
        .unwrap_or_default();
    let queue = match config.queue.kind {
        QueueKind::Table => "the table queue in the same database".to_string(),
        QueueKind::RabbitMq => format!("RabbitMQ at {}", config.rabbitmq.describe()),
    };
    let scope = if store.kind() == "sqlite" {
        "single-host: every process that uses this data (workers, `runs`, `registry`) runs on this host"
    } else {
        "scheduler, worker and listener in one process; more workers may run on other hosts"
    };
    format!(
        "jobschleuder standalone: scheduler, {workers} worker slot{} and the listener in one process\n  \
         data:     {} (registry, run history{})\n  \
         queue:    {queue}\n  \
         listener: http://{bind}\n  \
         {scope}\n  \
         runs:     jobschleuder{config_arg} runs   (in another shell)\n  \
         stop:     Ctrl-C",
        if workers == 1 { "" } else { "s" },
        config.database.describe(),
        if config.queue.kind == QueueKind::Table {
            ", queue"
        } else {
            ""
        },
    )
}
