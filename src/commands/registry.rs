//! `registry`: import the job file, show jobs and registry entries.

use std::io::Write;
use std::time::Instant;

use crate::cli::RegistryArgs;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::jobfile::{self, KnownPlugins};
use crate::output::{self, cell, TitledTable};
use crate::store::Store;

/// Files at least this large get progress lines on stderr.
const PROGRESS_FROM: usize = 20_000;

pub async fn run(config: &Config, args: &RegistryArgs) -> Result<()> {
    if args.import.is_none() && !args.show_jobs && !args.show_registry {
        return Err(Error::Usage(
            "registry: nothing to do: use --import FILE (-i), --show-jobs (-sj) or --show-registry (-sr)".into(),
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
    let store = Store::connect(&config.database).await?;
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

    if args.show_jobs {
        let jobs = store.jobs().await?;
        if args.json {
            writeln!(stdout, "{}", output::json(&jobs))?;
        } else {
            let mut table = TitledTable::new(
                "All Jobs",
                &["id", "name", "job", "descr", "pre", "post", "args"],
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
                &["id", "job", "name", "description", "schedule", "timezone"],
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
                ]);
            }
            writeln!(stdout, "{table}")?;
        }
    }
    Ok(())
}
