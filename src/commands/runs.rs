//! `runs`: the run history.

use std::io::Write;

use chrono::{DateTime, Utc};

use crate::cli::RunsArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::output::{self, cell, TitledTable};
use crate::store::{RunRow, Store, RUN_TRIGGERS};

use crate::store::RUN_STATUSES as STATUSES;

pub async fn run(config: &Config, args: &RunsArgs) -> Result<()> {
    if let Some(status) = &args.status {
        if !STATUSES.contains(&status.as_str()) {
            return Err(Error::Usage(format!(
                "--status {status:?}: use one of {}",
                STATUSES.join(", ")
            )));
        }
    }
    if let Some(trigger) = &args.trigger {
        if !RUN_TRIGGERS.contains(&trigger.as_str()) {
            return Err(Error::Usage(format!(
                "--trigger {trigger:?}: use one of {}",
                RUN_TRIGGERS.join(", ")
            )));
        }
    }
    if args.limit < 1 {
        return Err(Error::Usage("--limit must be at least 1".into()));
    }
    let show = match &args.show {
        Some(text) => Some(uuid::Uuid::parse_str(text.trim()).map_err(|_| {
            Error::Usage(format!(
                "--show {text:?} is not a run id (a UUID, as `runs` lists them)"
            ))
        })?),
        None => None,
    };
    let cancel = match &args.cancel {
        Some(text) => Some(uuid::Uuid::parse_str(text.trim()).map_err(|_| {
            Error::Usage(format!(
                "--cancel {text:?} is not a run id (a UUID, as `runs` lists them)"
            ))
        })?),
        None => None,
    };
    if args.dead_letters && config.queue.kind != crate::config::QueueKind::Table {
        return Err(Error::Usage(format!(
            "--dead-letters lists the table queue's dead letters; this config uses RabbitMQ, which keeps them in the queue {:?} (see them in its management UI, or with `rabbitmqadmin get queue={}.dead`)",
            format!("{}.dead", config.rabbitmq.queue),
            config.rabbitmq.queue
        )));
    }
    let store = Store::open(config).await?;
    let mut stdout = std::io::stdout().lock();
    if args.dead_letters {
        let letters = store.queue_dead_letters(args.limit).await?;
        if args.json {
            writeln!(stdout, "{}", output::json(&letters))?;
            return Ok(());
        }
        let mut table = TitledTable::new(
            "Dead letters",
            &[
                "id",
                "queue",
                "job",
                "run",
                "deliveries",
                "reason",
                "dead at",
            ],
        );
        for letter in &letters {
            let message = crate::queue::JobMessage::parse(&letter.body).ok();
            table.row(vec![
                letter.id.to_string(),
                letter.queue.clone(),
                crate::queue::table::describe_body(&letter.body),
                message
                    .and_then(|m| m.run_id)
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
                letter.deliveries.to_string(),
                cell(Some(letter.reason.as_str())),
                letter.dead_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]);
        }
        writeln!(stdout, "{table}")?;
        return Ok(());
    }
    if let Some(id) = cancel {
        let done = store.cancel_run(id).await?.ok_or_else(|| {
            Error::Usage(format!("--cancel: no run {id} (it may have been pruned)"))
        })?;
        if args.json {
            writeln!(stdout, "{}", output::json(&done))?;
            return Ok(());
        }
        let children = |ids: &[uuid::Uuid]| ids.iter().filter(|c| **c != id).count();
        let line = if done.cancelled.contains(&id) {
            format!("Run {id} was queued: recorded cancelled; it will not run.")
        } else if done.already_asked {
            format!(
                "Run {id} is already being cancelled on worker {}; it will be recorded cancelled when it has stopped.",
                done.worker.as_deref().unwrap_or("?")
            )
        } else if done.asked.contains(&id) {
            format!(
                "Run {id} is running on worker {}: it is being stopped and will be recorded cancelled.",
                done.worker.as_deref().unwrap_or("?")
            )
        } else {
            format!(
                "Run {id} has ended already ({}): nothing to cancel.",
                done.status
            )
        };
        writeln!(stdout, "{line}")?;
        let (now, later) = (children(&done.cancelled), children(&done.asked));
        if now + later > 0 {
            writeln!(
                stdout,
                "Its fan-out children: {now} cancelled, {later} running and being stopped."
            )?;
        }
        tracing::info!(run = %id, cancelled = done.cancelled.len(), stopping = done.asked.len(), "cancel asked for");
        return Ok(());
    }
    match show {
        Some(id) => {
            let run = store
                .run(id)
                .await?
                .ok_or_else(|| Error::Runtime(format!("no run {id} (it may have been pruned)")))?;
            let children = store.children(id).await?;
            if args.json {
                let mut value = serde_json::to_value(&run).unwrap_or_default();
                value["children"] = serde_json::to_value(&children).unwrap_or_default();
                writeln!(stdout, "{}", output::json(&value))?;
                return Ok(());
            }
            let mut table = TitledTable::new(&format!("Run {id}"), &["field", "value"]);
            let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
            for (field, value) in [
                ("job", run.job_name.clone()),
                ("plugin job", run.job.clone()),
                ("trigger", run.trigger.clone()),
                ("status", run.status.clone()),
                (
                    "attempt",
                    format!("{} (retries allowed: {})", run.attempt, run.max_retries),
                ),
                ("worker", cell(run.worker.as_deref())),
                ("queue", cell(run.queue.as_deref())),
                ("scheduled for", time(run.scheduled_for)),
                ("not before", time(run.not_before)),
                ("created", run.created_at.to_rfc3339()),
                ("published", time(run.published_at)),
                ("started", time(run.started_at)),
                ("finished", time(run.finished_at)),
                ("duration", duration(&run)),
                (
                    "parent",
                    run.parent_id.map(|p| p.to_string()).unwrap_or_default(),
                ),
                ("arguments", run.arguments.to_string()),
                ("error", cell(run.error.as_deref())),
            ] {
                table.row(vec![field.to_string(), value]);
            }
            writeln!(stdout, "{table}")?;
            if let Some(result) = &run.result {
                writeln!(stdout, "Result\n{}", output::json(result))?;
            }
            if !children.is_empty() {
                writeln!(
                    stdout,
                    "{}",
                    list("Child runs (fan-out, and chained after it)", &children)
                )?;
            }
        }
        None => {
            let runs = store
                .runs(
                    args.job.as_deref(),
                    args.status.as_deref(),
                    args.trigger.as_deref(),
                    args.limit,
                )
                .await?;
            if args.json {
                writeln!(stdout, "{}", output::json(&runs))?;
            } else {
                writeln!(stdout, "{}", list("Recent runs", &runs))?;
            }
        }
    }
    Ok(())
}

fn duration(run: &RunRow) -> String {
    match (run.started_at, run.finished_at) {
        (Some(start), Some(end)) => {
            format!("{:.3}s", (end - start).num_milliseconds() as f64 / 1000.0)
        }
        (Some(start), None) if run.status == "running" => {
            format!(
                "{:.0}s so far",
                (Utc::now() - start).num_milliseconds() as f64 / 1000.0
            )
        }
        _ => String::new(),
    }
}

fn list(title: &str, runs: &[RunRow]) -> TitledTable {
    let mut table = TitledTable::new(
        title,
        &[
            "id",
            "job",
            "trigger",
            "scheduled for",
            "status",
            "attempt",
            "worker",
            "duration",
        ],
    );
    for run in runs {
        table.row(vec![
            run.id.to_string(),
            run.job_name.clone(),
            run.trigger.clone(),
            run.scheduled_for
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
            run.status.clone(),
            run.attempt.to_string(),
            cell(run.worker.as_deref()),
            duration(run),
        ]);
    }
    table
}
