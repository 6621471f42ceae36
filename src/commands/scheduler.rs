//! `scheduler`: initialize the schedule, run the scheduling loop, run a job now, show the
//! schedule, preview a cron expression.

use std::io::Write;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::cli::SchedulerArgs;
use crate::config::{parse_timezone, Config};
use crate::cron::CronSchedule;
use crate::error::{Error, Result};
use crate::output::{self, TitledTable};
use crate::scheduler::{self as sched, entry_zone, next_run, Publisher};
use crate::shutdown::Shutdown;
use crate::store::{EntrySchedule, NewRun, Store};

pub async fn run(config: &Config, args: &SchedulerArgs) -> Result<()> {
    if let Some(expression) = &args.preview {
        return preview(config, expression, args);
    }
    let pass = args.schedule || args.no_daemon;
    if !(args.init
        || pass
        || args.show_scheduled_jobs
        || args.show_all_scheduled_jobs
        || args.run_now.is_some())
    {
        return Err(Error::Usage(
            "scheduler: nothing to do: use --init (-i), --schedule (-s), --no-daemon (-nd), --run-now ID (-rn), \
             --show-scheduled-jobs (-sj), --show-all-scheduled-jobs (-aj) or --preview CRON"
                .into(),
        ));
    }
    let store = Store::connect(&config.database).await?;
    let mut stdout = std::io::stdout().lock();

    if args.init {
        let tz = config.timezone;
        let (count, unschedulable) = store
            .replace_schedule(&|e: &EntrySchedule, now| {
                next_run(&e.schedule, e.timezone.as_deref(), tz, now)
            })
            .await?;
        for entry in &unschedulable {
            tracing::warn!(registry_id = entry.registry_id, schedule = %entry.schedule, "registry entry has no next run; not scheduled");
        }
        store.notify("registry").await?;
        writeln!(
            stdout,
            "Scheduler initialized: {count} registry entr{} scheduled{}.",
            if count == 1 { "y" } else { "ies" },
            if unschedulable.is_empty() {
                String::new()
            } else {
                format!(", {} without a next run (see the log)", unschedulable.len())
            }
        )?;
    }

    if let Some(key) = &args.run_now {
        let job = store.find_job(key).await?.ok_or_else(|| {
            Error::Usage(format!(
                "--run-now: no job with id or name {key:?} (see `registry --show-jobs`)"
            ))
        })?;
        let job_name = job.name.clone().unwrap_or_else(|| job.id.to_string());
        let ids = store.insert_runs(&[NewRun::of_job(&job, "manual")]).await?;
        let mut publisher = Publisher::new(config, "scheduler --run-now");
        match sched::publish_queued(&store, &mut publisher, &config.rabbitmq.queue, Some(&ids))
            .await
        {
            Ok(_) => {
                tracing::info!(run = %ids[0], job = %job_name, trigger = "manual", "run queued")
            }
            Err(e) => {
                tracing::warn!(run = %ids[0], job = %job_name, error = %e, "run queued; publishing failed, a running scheduler publishes it")
            }
        }
        publisher.close().await;
        writeln!(stdout, "{}", ids[0])?;
    }

    for (wanted, due_only, title) in [
        (args.show_scheduled_jobs, true, "Scheduled jobs due now"),
        (args.show_all_scheduled_jobs, false, "All scheduled jobs"),
    ] {
        if !wanted {
            continue;
        }
        // "Due" by the database's clock, as the scheduler decides it.
        let now = if due_only {
            Some(store.now().await?)
        } else {
            None
        };
        let rows = store.scheduled(now).await?;
        if args.json {
            writeln!(stdout, "{}", output::json(&rows))?;
            continue;
        }
        let mut table = TitledTable::new(
            title,
            &[
                "id",
                "job",
                "name",
                "schedule",
                "timezone",
                "next run (local)",
                "next run (UTC)",
            ],
        );
        for row in &rows {
            let tz = entry_zone(row.timezone.as_deref(), config.timezone);
            table.row(vec![
                row.registry_id.to_string(),
                row.job.clone(),
                row.job_name.clone(),
                row.schedule.clone(),
                tz.name().to_string(),
                row.next_run
                    .with_timezone(&tz)
                    .format("%Y-%m-%d %H:%M:%S %Z")
                    .to_string(),
                row.next_run.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]);
        }
        writeln!(stdout, "{table}")?;
    }
    drop(stdout);

    if pass {
        let once = args.no_daemon;
        let shutdown = if once {
            Shutdown::never()
        } else {
            Shutdown::install()
        };
        if !once {
            tracing::info!(database = %config.database.describe(), broker = %config.rabbitmq.describe(), "scheduler started");
        }
        let summary = sched::run(&store, config, once, shutdown)
            .await
            .map_err(|e| Error::Runtime(e.to_string()))?;
        if once {
            println!(
                "Scheduling pass done: {} new entr{} scheduled, {} run{} queued, {} published.",
                summary.newly_scheduled,
                if summary.newly_scheduled == 1 {
                    "y"
                } else {
                    "ies"
                },
                summary.runs_created,
                if summary.runs_created == 1 { "" } else { "s" },
                summary.runs_published
            );
        } else {
            tracing::info!("scheduler stopped");
        }
    }
    Ok(())
}

/// Prints the next run times of `expression`, like `systemd-analyze calendar --iterations=N`.
fn preview(config: &Config, expression: &str, args: &SchedulerArgs) -> Result<()> {
    let schedule = CronSchedule::parse(expression)
        .map_err(|e| Error::Usage(format!("--preview {expression:?}: {e}")))?;
    let tz = match &args.timezone {
        Some(name) => parse_timezone(name).map_err(|e| Error::Usage(format!("--timezone: {e}")))?,
        None => config.timezone,
    };
    let from = match &args.from {
        Some(text) => parse_from(text, tz)?,
        None => Utc::now(),
    };
    let mut stdout = std::io::stdout().lock();
    // Inclusive of `from` itself.
    for time in schedule.upcoming(from - chrono::Duration::seconds(1), tz, args.count) {
        writeln!(stdout, "{}", time.with_timezone(&tz).to_rfc3339())?;
    }
    Ok(())
}

fn parse_from(text: &str, tz: Tz) -> Result<DateTime<Utc>> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S"))
        .map_err(|_| {
            Error::Usage(format!(
                "--from {text:?}: use RFC 3339 (2026-03-29T01:30:00+01:00) or YYYY-MM-DDTHH:MM:SS"
            ))
        })?;
    tz.from_local_datetime(&naive)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| {
            Error::Usage(format!(
                "--from {text:?} does not exist in {} (skipped by a clock change)",
                tz.name()
            ))
        })
}
