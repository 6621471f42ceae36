//! `scheduler`: initialize the schedule, run the scheduling loop, run a job now, show the
//! schedule, preview a cron expression.

use std::io::Write;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

use crate::cli::SchedulerArgs;
use crate::commands::registry::paused_state;
use crate::config::{parse_timezone, Config};
use crate::cron::CronSchedule;
use crate::error::{Error, Result};
use crate::output::{self, TitledTable};
use crate::scheduler::{self as sched, entry_zone, next_run, Publisher};
use crate::shutdown::Shutdown;
use crate::store::{EntrySchedule, NewRun, Store};

pub async fn run(config: &Config, args: &SchedulerArgs) -> Result<()> {
    if let Some(expression) = &args.preview {
        return preview(config, expression, args).await;
    }
    if args.from.is_some() && args.backfill.is_none() {
        return Err(Error::Usage(
            "--from goes with --preview or --backfill".into(),
        ));
    }
    let pass = args.schedule || args.no_daemon;
    if !(args.init
        || pass
        || args.show_scheduled_jobs
        || args.show_all_scheduled_jobs
        || args.run_now.is_some()
        || args.backfill.is_some())
    {
        return Err(Error::Usage(
            "scheduler: nothing to do: use --init (-i), --schedule (-s), --no-daemon (-nd), --run-now ID (-rn), \
             --show-scheduled-jobs (-sj), --show-all-scheduled-jobs (-aj), --backfill NAME or --preview CRON"
                .into(),
        ));
    }
    let store = Store::open(config).await?;
    let mut stdout = std::io::stdout().lock();

    if let Some(name) = &args.backfill {
        backfill(config, &store, name, args, &mut stdout).await?;
    }

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
        // With the table queue the run is published already, unless its message is too large:
        // this pass then records it dead at once.
        let mut publisher = Publisher::new(config, &store, "scheduler --run-now");
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
        let mut rows = store.scheduled(now).await?;
        for row in &mut rows {
            row.starts_at = Some(sched::start_of(
                &row.job_name,
                row.next_run,
                row.jitter_seconds,
            ));
        }
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
                "starts (local)",
                "state",
            ],
        );
        for row in &rows {
            let tz = entry_zone(row.timezone.as_deref(), config.timezone);
            let local = |t: DateTime<Utc>| {
                t.with_timezone(&tz)
                    .format("%Y-%m-%d %H:%M:%S %Z")
                    .to_string()
            };
            table.row(vec![
                row.registry_id.to_string(),
                row.job.clone(),
                row.job_name.clone(),
                row.schedule.clone(),
                tz.name().to_string(),
                local(row.next_run),
                row.next_run.format("%Y-%m-%d %H:%M:%S").to_string(),
                row.starts_at.map(local).unwrap_or_default(),
                paused_state(row.paused, row.paused_note.as_deref()),
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
/// When `expression` is not a cron expression but a job's name in the registry, its schedule,
/// zone and jitter are used, and each line shows the slot and when its run starts.
async fn preview(config: &Config, expression: &str, args: &SchedulerArgs) -> Result<()> {
    let (schedule, zone, job) = match CronSchedule::parse(expression) {
        Ok(schedule) => (schedule, None, None),
        // A wrong expression is reported as such, without a database.
        Err(cron_error) if looks_like_cron(expression) => {
            return Err(Error::Usage(format!(
                "--preview {expression:?}: {cron_error}"
            )))
        }
        Err(cron_error) => {
            let store = Store::open(config).await?;
            let entry = store
                .registry()
                .await?
                .into_iter()
                .find(|e| e.name.as_deref() == Some(expression));
            let Some(entry) = entry else {
                return Err(Error::Usage(format!(
                    "--preview {expression:?}: not a cron expression ({cron_error}), nor the name of a scheduled job"
                )));
            };
            let schedule = CronSchedule::parse(&entry.schedule).map_err(|e| {
                Error::Usage(format!(
                    "--preview {expression:?}: its schedule {:?}: {e}",
                    entry.schedule
                ))
            })?;
            (schedule, entry.timezone.clone(), Some(entry))
        }
    };
    let tz = match (&args.timezone, &zone) {
        (Some(name), _) => {
            parse_timezone(name).map_err(|e| Error::Usage(format!("--timezone: {e}")))?
        }
        (None, zone) => entry_zone(zone.as_deref(), config.timezone),
    };
    let from = match &args.from {
        Some(text) => parse_from(text, tz)?,
        None => Utc::now(),
    };
    let mut stdout = std::io::stdout().lock();
    // Inclusive of `from` itself.
    for time in schedule.upcoming(from - chrono::Duration::seconds(1), tz, args.count) {
        match &job {
            Some(entry) if entry.jitter_seconds.is_some() => {
                let name = entry.name.as_deref().unwrap_or_default();
                let starts = sched::start_of(name, time, entry.jitter_seconds);
                writeln!(
                    stdout,
                    "{} starts {}",
                    time.with_timezone(&tz).to_rfc3339(),
                    starts.with_timezone(&tz).to_rfc3339()
                )?;
            }
            _ => writeln!(stdout, "{}", time.with_timezone(&tz).to_rfc3339())?,
        }
    }
    Ok(())
}

/// Whether `text` is meant as a cron expression (a nickname, or five to seven fields of what
/// cron fields are made of) rather than a job's name.
fn looks_like_cron(text: &str) -> bool {
    let fields: Vec<&str> = text.split_whitespace().collect();
    text.trim_start().starts_with('@')
        || ((5..=7).contains(&fields.len())
            && fields.iter().all(|field| {
                field
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "*/,-?#".contains(c))
            }))
}

/// Slots that need `--yes` to be backfilled.
const BACKFILL_CONFIRM_ABOVE: usize = 1000;

/// `--backfill NAME --from --to`: one run per slot of the range, in the job's zone.
async fn backfill(
    config: &Config,
    store: &Store,
    name: &str,
    args: &SchedulerArgs,
    stdout: &mut impl Write,
) -> Result<()> {
    let job = store.find_job(name).await?.ok_or_else(|| {
        Error::Usage(format!(
            "--backfill: no job with id or name {name:?} (see `registry --show-jobs`)"
        ))
    })?;
    let job_name = job.name.clone().unwrap_or_else(|| job.id.to_string());
    let entry = store
        .registry()
        .await?
        .into_iter()
        .find(|e| e.job == job.id)
        .ok_or_else(|| {
            Error::Usage(format!(
                "--backfill {job_name:?}: the job has no schedule, so it has no slots to fill"
            ))
        })?;
    let schedule = CronSchedule::parse(&entry.schedule).map_err(|e| {
        Error::Usage(format!(
            "--backfill {job_name:?}: its schedule {:?}: {e}",
            entry.schedule
        ))
    })?;
    let tz = entry_zone(entry.timezone.as_deref(), config.timezone);
    let (Some(from), Some(to)) = (&args.from, &args.to) else {
        return Err(Error::Usage("--backfill needs --from and --to".into()));
    };
    let from = parse_from(from, tz)?;
    let to = parse_from(to, tz)?;
    if to < from {
        return Err(Error::Usage(format!(
            "--backfill: --to ({}) is before --from ({})",
            to.with_timezone(&tz).to_rfc3339(),
            from.with_timezone(&tz).to_rfc3339()
        )));
    }
    let now = store.now().await?;
    if to > now {
        return Err(Error::Usage(format!(
            "--backfill: --to ({}) is in the future; a backfill fills past slots, the scheduler fires the coming ones",
            to.with_timezone(&tz).to_rfc3339()
        )));
    }
    let mut slots = Vec::new();
    let mut after = from - chrono::Duration::seconds(1);
    while let Some(slot) = schedule.next_after(after, tz) {
        if slot > to {
            break;
        }
        slots.push(slot);
        after = slot;
        if slots.len() > 10_000_000 {
            return Err(Error::Usage(
                "--backfill: more than 10,000,000 slots; choose a shorter range".into(),
            ));
        }
    }
    if slots.len() > BACKFILL_CONFIRM_ABOVE && !args.yes {
        return Err(Error::Usage(format!(
            "--backfill {job_name:?}: {} slots from {} to {}: more than {BACKFILL_CONFIRM_ABOVE}; add --yes to create up to that many runs",
            slots.len(),
            from.with_timezone(&tz).to_rfc3339(),
            to.with_timezone(&tz).to_rfc3339()
        )));
    }
    let mut progress = |done: usize, total: usize| {
        if total >= 20_000 {
            eprintln!("backfilling: {done}/{total} slots written");
        }
    };
    let created = store.backfill(&job, &slots, &mut progress).await?;
    tracing::info!(job = %job_name, slots = slots.len(), created, trigger = "backfill", "backfill done");
    writeln!(
        stdout,
        "Backfilled {job_name}: {} slot{} from {} to {} ({}); {created} run{} created, {} slot{} had a run already.",
        slots.len(),
        if slots.len() == 1 { "" } else { "s" },
        from.with_timezone(&tz).to_rfc3339(),
        to.with_timezone(&tz).to_rfc3339(),
        tz.name(),
        if created == 1 { "" } else { "s" },
        slots.len() - created,
        if slots.len() - created == 1 { "" } else { "s" },
    )?;
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
