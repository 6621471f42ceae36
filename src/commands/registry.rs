//! `registry`: import the job file, show jobs and registry entries.

use std::io::Write;
use std::time::Instant;

use crate::cli::RegistryArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::jobfile::{self, KnownPlugins};
use crate::output::{self, cell, TitledTable};
use crate::store::{JobRow, Store};

/// Files at least this large get progress lines on stderr.
const PROGRESS_FROM: usize = 20_000;

pub async fn run(config: &Config, args: &RegistryArgs) -> Result<()> {
    let pausing = match (&args.pause, &args.resume) {
        (Some(names), _) => Some((true, names)),
        (None, Some(names)) => Some((false, names)),
        (None, None) => None,
    };
    if args.import.is_none() && !args.show_jobs && !args.show_registry && pausing.is_none() {
        return Err(Error::Usage(
            "registry: nothing to do: use --import FILE (-i), --show-jobs (-sj), --show-registry (-sr), \
             --pause NAME or --resume NAME"
                .into(),
        ));
    }
    if let Some((pause, names)) = pausing {
        let flag = if pause { "--pause" } else { "--resume" };
        match (names.is_empty(), args.all) {
            (true, false) => {
                return Err(Error::Usage(format!(
                    "{flag}: name a job (repeat {flag} for several), or give --all for every entry"
                )))
            }
            (false, true) => {
                return Err(Error::Usage(format!(
                    "{flag}: give job names or --all, not both"
                )))
            }
            _ => {}
        }
        if args.note.is_some() && !pause {
            return Err(Error::Usage("--note goes with --pause".into()));
        }
    } else if args.all || args.note.is_some() {
        return Err(Error::Usage(
            "--all and --note go with --pause or --resume".into(),
        ));
    }
    // Validate the file before connecting: a bad file is reported even with the database down.
    let jobs = match &args.import {
        Some(path) => {
            let started = Instant::now();
            let known = KnownPlugins {
                jobs: &config.plugins,
                preprocessing: &config.preprocessing,
            };
            let jobs = jobfile::load(path, Some(&known))?;
            tracing::info!(file = %path.display(), jobs = jobs.len(), elapsed_ms = started.elapsed().as_millis() as u64, "job file is valid");
            Some((path, jobs))
        }
        None => None,
    };
    let store = Store::open(config).await?;
    let mut stdout = std::io::stdout().lock();

    if let Some((path, jobs)) = jobs {
        let started = Instant::now();
        let total = jobs.len();
        let mut progress = |done: usize, total: usize| {
            if total >= PROGRESS_FROM {
                eprintln!("importing: {done}/{total} jobs written");
            }
        };
        let summary = store.replace_registry(&jobs, &mut progress).await?;
        let elapsed = started.elapsed();
        tracing::info!(file = %path.display(), imported = summary.imported, removed = summary.removed, "registry replaced");
        writeln!(
            stdout,
            "Imported {total} job{} from {} in {:.2}s: {} new, {} replaced, {} removed; {} scheduled.",
            if total == 1 { "" } else { "s" },
            path.display(),
            elapsed.as_secs_f64(),
            summary.added,
            summary.replaced,
            summary.removed,
            summary.scheduled,
        )
        ?;
    }

    if let Some((pause, names)) = pausing {
        let names = (!args.all).then_some(names.as_slice());
        let changes = match store.set_paused(names, pause, args.note.as_deref()).await? {
            Ok(changes) => changes,
            Err(missing) => {
                return Err(Error::Usage(format!(
                    "{}: no registry entry for {}: a job needs a `schedule` to have one (see `registry --show-registry`); nothing was changed",
                    if pause { "--pause" } else { "--resume" },
                    missing
                        .iter()
                        .map(|n| format!("{n:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        let changed = changes.iter().filter(|c| c.was_paused != pause).count();
        for change in &changes {
            tracing::info!(job = %change.name, paused = pause, "registry entry {}", if pause { "paused" } else { "resumed" });
        }
        writeln!(
            stdout,
            "{} {changed} registry entr{}{}.",
            if pause { "Paused" } else { "Resumed" },
            if changed == 1 { "y" } else { "ies" },
            match changes.len() - changed {
                0 => String::new(),
                same => format!(
                    " ({same} {} already)",
                    if pause { "paused" } else { "active" }
                ),
            }
        )?;
    }

    if args.show_jobs {
        let jobs = store.jobs().await?;
        if args.json {
            writeln!(stdout, "{}", output::json(&jobs))?;
        } else {
            let mut table = TitledTable::new(
                "All Jobs",
                &[
                    "id", "name", "job", "descr", "pre", "post", "args", "control",
                ],
            );
            for job in &jobs {
                table.row(vec![
                    job.id.to_string(),
                    cell(job.name.as_deref()),
                    job.job.clone(),
                    cell(job.description.as_deref()),
                    cell(job.preprocessing.as_deref()),
                    cell(job.postprocessing.as_deref()),
                    job.arguments
                        .as_ref()
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                    control(job),
                ]);
            }
            writeln!(stdout, "{table}")?;
        }
    }

    if args.show_registry {
        let entries = store.registry().await?;
        if args.json {
            writeln!(stdout, "{}", output::json(&entries))?;
        } else {
            let mut table = TitledTable::new(
                "Job registry",
                &[
                    "id",
                    "job",
                    "name",
                    "description",
                    "schedule",
                    "timezone",
                    "state",
                ],
            );
            for entry in &entries {
                table.row(vec![
                    entry.id.to_string(),
                    entry.job.to_string(),
                    cell(entry.name.as_deref()),
                    cell(entry.description.as_deref()),
                    entry.schedule.clone(),
                    entry
                        .timezone
                        .clone()
                        .unwrap_or_else(|| format!("{} (config)", config.timezone.name())),
                    paused_state(entry.paused, entry.paused_note.as_deref()),
                ]);
            }
            writeln!(stdout, "{table}")?;
        }
    }
    Ok(())
}

/// "paused (note)" or "active".
pub fn paused_state(paused: bool, note: Option<&str>) -> String {
    match (paused, note) {
        (false, _) => "active".into(),
        (true, Some(note)) if !note.is_empty() => format!("paused: {note}"),
        (true, _) => "paused".into(),
    }
}

/// A job's operator settings that differ from the defaults, in one cell.
fn control(job: &JobRow) -> String {
    let mut parts = Vec::new();
    if job.paused {
        parts.push(paused_state(true, job.paused_note.as_deref()));
    }
    if job.concurrency != "allow" {
        parts.push(format!("concurrency {}", job.concurrency));
    }
    if let Some(jitter) = job.jitter_seconds {
        parts.push(format!("jitter {jitter}s"));
    }
    for (field, names) in [
        ("on_success", &job.on_success),
        ("on_failure", &job.on_failure),
    ] {
        if let Some(serde_json::Value::Array(names)) = names {
            let names: Vec<&str> = names.iter().filter_map(|n| n.as_str()).collect();
            parts.push(format!("{field} {}", names.join(",")));
        }
    }
    parts.join("; ")
}
