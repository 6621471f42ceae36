//! `worker`: runs jobs through plugins. `--exec` runs one by hand, without database or queue.

use std::io::Write;

use serde_json::{json, Value};

use crate::cli::WorkerArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::plugin::{Args, Outcome, PlannedJob, PluginError, PluginHost};

/// The longest worker id the run history holds (`job_runs.worker`).
const MAX_WORKER_ID: usize = 200;

pub async fn run(config: &Config, args: &WorkerArgs) -> Result<()> {
    match &args.exec {
        Some(job) => {
            let host = PluginHost::new(config);
            let job = job.clone();
            let job_args = parse_args(args.exec_args.as_deref())?;
            let pre = args.preprocessing.clone();
            let post = args.postprocessing.clone();
            tokio::task::spawn_blocking(move || {
                exec(&host, &job, job_args, pre.as_deref(), post.as_deref())
            })
            .await
            .map_err(|e| Error::Runtime(format!("the job thread failed: {e}")))?
        }
        None => {
            let id = args
                .id
                .clone()
                .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned());
            // The run history records the worker's id; one it cannot hold would make every
            // claim fail, and runs would wait for a worker that can never take them.
            if id.trim().is_empty() || id.chars().count() > MAX_WORKER_ID {
                return Err(Error::Usage(format!(
                    "worker --id must be 1 to {MAX_WORKER_ID} characters, not {} (\"{}…\")",
                    id.chars().count(),
                    id.chars().take(20).collect::<String>()
                )));
            }
            let store = crate::store::Store::open(config).await?;
            let options = crate::worker::WorkerOptions {
                id,
                slots: args.worker.unwrap_or(1).max(1),
                queue: args
                    .queue
                    .clone()
                    .unwrap_or_else(|| config.rabbitmq.queue.clone()),
            };
            let shutdown = crate::shutdown::Shutdown::install();
            shutdown.handle_forced();
            match crate::worker::run(store, config, options, shutdown).await {
                Ok(crate::worker::Stopped::Gracefully) => Ok(()),
                Ok(crate::worker::Stopped::Forced) => Err(Error::Interrupted),
                Ok(crate::worker::Stopped::Stuck) => Err(Error::Runtime(
                    "every worker slot was held by a plugin call that ignores its timeout; the worker stopped so that it can be restarted (its runs are queued for their next attempt)".into(),
                )),
                Err(e) => Err(Error::Runtime(e.to_string())),
            }
        }
    }
}

fn parse_args(text: Option<&str>) -> Result<Args> {
    match text {
        None => Ok(Args::new()),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(other) => Err(Error::Usage(format!(
                "--args must be a JSON object, not {other}"
            ))),
            Err(e) => Err(Error::Usage(format!("--args is not valid JSON: {e}"))),
        },
    }
}

fn error_json(error: &PluginError) -> Value {
    serde_json::to_value(error.job_error()).unwrap_or_default()
}

/// One JSON line per step on stdout.
fn emit(line: &Value) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    Ok(writeln!(stdout, "{line}")?)
}

fn exec(
    host: &PluginHost,
    job: &str,
    args: Args,
    pre: Option<&str>,
    post: Option<&str>,
) -> Result<()> {
    let planned = match pre {
        Some(function) => match host.call_preprocessing(function, job, args) {
            Ok(jobs) => {
                emit(
                    &json!({"step": "preprocessing", "function": function, "status": "succeeded", "jobs": jobs}),
                )?;
                jobs
            }
            Err(error) => {
                emit(
                    &json!({"step": "preprocessing", "function": function, "status": "failed", "error": error_json(&error)}),
                )?;
                return Err(Error::Runtime(format!("preprocessing failed: {error}")));
            }
        },
        None => vec![PlannedJob::new(job, args)],
    };
    let mut failed = 0;
    let mut steps = 0;
    for planned in planned {
        let cmd = planned.cmd.clone().unwrap_or_else(|| job.to_string());
        steps += 1;
        let outcome = match host.call_job(&cmd, planned.args.clone()) {
            Ok(result) => {
                emit(
                    &json!({"step": "job", "cmd": cmd, "args": planned.args, "status": "succeeded", "result": result}),
                )?;
                Outcome {
                    result: Some(result),
                    error: None,
                }
            }
            Err(error) => {
                failed += 1;
                emit(
                    &json!({"step": "job", "cmd": cmd, "args": planned.args, "status": "failed", "error": error_json(&error)}),
                )?;
                Outcome {
                    result: error.details().cloned(),
                    error: Some(error.job_error()),
                }
            }
        };
        if let Some(function) = post {
            steps += 1;
            match host.call_postprocessing(function, planned.args.clone(), &outcome) {
                Ok(result) => emit(
                    &json!({"step": "postprocessing", "function": function, "cmd": cmd, "status": "succeeded", "result": result}),
                )?,
                Err(error) => {
                    failed += 1;
                    emit(
                        &json!({"step": "postprocessing", "function": function, "cmd": cmd, "status": "failed", "error": error_json(&error)}),
                    )?;
                }
            }
        }
    }
    if failed > 0 {
        Err(Error::Runtime(format!("{failed} of {steps} steps failed")))
    } else {
        Ok(())
    }
}
