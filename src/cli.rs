//! The command line: clap definitions, and the translation of the original's two-letter short
//! options (`-sj`, `-rn 4`, ...) that clap cannot express.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// A distributed, cron-style job scheduler.
#[derive(Debug, Parser)]
#[command(name = "jobschleuder", version, about, long_about = None)]
pub struct Cli {
    /// Log level: error, warn, info, debug, trace (any case), or a full tracing filter such as
    /// `info,jobschleuder::store=debug`. Default: the config's general.logging.loglevel, else info.
    #[arg(long, global = true, value_name = "LOGLEVEL")]
    pub loglevel: Option<String>,

    /// Where logs go: stderr (default), stdout, json (one JSON object per line on stderr), or a
    /// file path (appended to).
    #[arg(long, global = true, value_name = "LOGHANDLER")]
    pub loghandler: Option<String>,

    /// Tags every log line of this process with this id, to follow one operation across hosts.
    #[arg(long, global = true, value_name = "UUID")]
    pub uuid: Option<String>,

    /// Configuration file. Default: ./jobschleuder.yaml, then
    /// $XDG_CONFIG_HOME/jobschleuder/config.yaml, then /etc/jobschleuder/config.yaml.
    #[arg(long, global = true, value_name = "CONFIG")]
    pub config: Option<PathBuf>,

    /// Enable debug logging of plugin code.
    #[arg(long = "debug-veritas", global = true)]
    pub debug_veritas: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Task registry: import the job file, show jobs and the registry.
    Registry(RegistryArgs),
    /// Task scheduler: fires registry entries on their cron schedules.
    Scheduler(SchedulerArgs),
    /// Task worker: runs queued jobs through plugins.
    Worker(WorkerArgs),
    /// Listener to process webhooks.
    Listener(ListenerArgs),
    /// Run history: recent runs, one run with its result and fan-out children.
    Runs(RunsArgs),
    /// Scheduler, worker slots and listener in one process, on one host: with no database and
    /// no broker configured, everything lives in one SQLite file.
    Standalone(StandaloneArgs),
}

#[derive(Debug, Args)]
pub struct StandaloneArgs {
    /// Import this job file first (replacing the registry, as `registry --import` does).
    #[arg(long, value_name = "FILE")]
    pub import: Option<PathBuf>,

    /// Number of concurrent job slots.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub workers: usize,

    /// The listener's address and port (default: listener.bind, else 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Import a job file into the registry, replacing all jobs (one transaction).
    #[arg(long = "import", short = 'i', value_name = "IMPORT_FILENAME")]
    pub import: Option<PathBuf>,

    /// Show all jobs [-sj].
    #[arg(long = "show-jobs")]
    pub show_jobs: bool,

    /// Show the registry [-sr].
    #[arg(long = "show-registry")]
    pub show_registry: bool,

    /// Pause the registry entry of job NAME (name or id; repeatable): it fires nothing until
    /// resumed. `--all`: every entry.
    #[arg(long, value_name = "NAME", num_args = 0..=1, action = clap::ArgAction::Append, conflicts_with = "resume")]
    pub pause: Option<Vec<String>>,

    /// Resume paused entries (repeatable): they go on from now; missed slots follow each
    /// job's `misfire` policy. `--all`: every entry.
    #[arg(long, value_name = "NAME", num_args = 0..=1, action = clap::ArgAction::Append)]
    pub resume: Option<Vec<String>>,

    /// With --pause or --resume and no NAME: every registry entry.
    #[arg(long)]
    pub all: bool,

    /// With --pause: why, shown with the paused entry.
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,

    /// Print --show-* output as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Clean old values and initialize the scheduler.
    #[arg(long, short = 'i')]
    pub init: bool,

    /// Start scheduling jobs.
    #[arg(long, short = 's')]
    pub schedule: bool,

    /// Show scheduled jobs that are due now [-sj].
    #[arg(long = "show-scheduled-jobs")]
    pub show_scheduled_jobs: bool,

    /// Show all scheduled jobs [-aj].
    #[arg(long = "show-all-scheduled-jobs")]
    pub show_all_scheduled_jobs: bool,

    /// Run a job now, by job id or job name [-rn].
    #[arg(long = "run-now", value_name = "RUN_NOW")]
    pub run_now: Option<String>,

    /// Exit after one scheduling pass [-nd].
    #[arg(long = "no-daemon")]
    pub no_daemon: bool,

    /// Print the next run times of a cron expression (no database needed), one per line,
    /// RFC 3339 with the zone's UTC offset, to check a schedule before importing it.
    #[arg(long, value_name = "CRON")]
    pub preview: Option<String>,

    /// With --preview: the zone the expression is read in (default: the config's).
    #[arg(long, value_name = "TZ", requires = "preview")]
    pub timezone: Option<String>,

    /// With --preview: start from this time (RFC 3339, or YYYY-MM-DDTHH:MM:SS in the zone);
    /// default now. A run at exactly this time is included. With --backfill: the first slot.
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,

    /// Create one run of job NAME per slot from --from to --to (both included, in the job's
    /// zone; trigger `backfill`). Slots that have a run are left alone.
    #[arg(long, value_name = "NAME", requires_all = ["from", "to"], conflicts_with = "preview")]
    pub backfill: Option<String>,

    /// With --backfill: the last slot (RFC 3339, or YYYY-MM-DDTHH:MM:SS in the job's zone); not
    /// after now.
    #[arg(long, value_name = "TIME", requires = "backfill")]
    pub to: Option<String>,

    /// With --backfill: go ahead with more than 1,000 slots.
    #[arg(long, requires = "backfill")]
    pub yes: bool,

    /// With --preview: how many run times.
    #[arg(long, value_name = "N", default_value_t = 5, requires = "preview")]
    pub count: usize,

    /// Print --show-* output as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Worker id, used in logs and in the run history. Default: the host name.
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,

    /// Number of concurrent job slots to start (the broker's prefetch). Default 1.
    #[arg(long, value_name = "WORKER")]
    pub worker: Option<usize>,

    /// Consume this queue instead of the configured one.
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,

    /// Run job NAME by hand, in this process, without database or queue: preprocessing (if
    /// given), the job (each fanned-out job), postprocessing (if given). Prints each result as
    /// one JSON line; exits 1 if any step failed.
    #[arg(long, value_name = "NAME")]
    pub exec: Option<String>,

    /// With --exec: the job's arguments, a JSON object.
    #[arg(long = "args", value_name = "JSON", requires = "exec")]
    pub exec_args: Option<String>,

    /// With --exec: the preprocessing function to run first.
    #[arg(long, value_name = "FUNCTION", requires = "exec")]
    pub preprocessing: Option<String>,

    /// With --exec: the postprocessing function to run after each job.
    #[arg(long, value_name = "FUNCTION", requires = "exec")]
    pub postprocessing: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListenerArgs {
    /// The address and port to listen on (default: listener.bind, else 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    pub bind: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Only runs of this job (name or id).
    #[arg(long, value_name = "JOB")]
    pub job: Option<String>,

    /// Only runs with this status: queued, running, succeeded, failed, dead, skipped or
    /// cancelled.
    #[arg(long, value_name = "STATUS")]
    pub status: Option<String>,

    /// Only runs with this trigger: schedule, manual, webhook, chain or backfill.
    #[arg(long, value_name = "TRIGGER")]
    pub trigger: Option<String>,

    /// How many runs, newest first.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub limit: i64,

    /// One run in full: its arguments, result or error, and its child runs.
    #[arg(long, value_name = "RUN_ID", conflicts_with_all = ["job", "status", "trigger"])]
    pub show: Option<String>,

    /// Cancel a run (and its fan-out children): a queued run is recorded cancelled and never
    /// runs; a running one is stopped by its worker within about a second.
    #[arg(long, value_name = "RUN_ID", conflicts_with_all = ["job", "status", "trigger", "show"])]
    pub cancel: Option<String>,

    /// The table queue's dead letters, newest first: messages no worker could use
    /// (unparsable, an unknown run, handed out too often). RabbitMQ keeps its own in
    /// `<queue>.dead`.
    #[arg(long, conflicts_with_all = ["job", "status", "trigger", "show", "cancel"])]
    pub dead_letters: bool,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The original's single-dash, two-letter options, per subcommand, and the long option each means.
const TWO_LETTER: &[(&str, &str, &str)] = &[
    ("registry", "-sj", "--show-jobs"),
    ("registry", "-sr", "--show-registry"),
    ("scheduler", "-sj", "--show-scheduled-jobs"),
    ("scheduler", "-aj", "--show-all-scheduled-jobs"),
    ("scheduler", "-rn", "--run-now"),
    ("scheduler", "-nd", "--no-daemon"),
];

/// Options whose next argument is a value, so that a value such as a file named `-sj` is left alone.
const TAKES_VALUE: &[&str] = &[
    "--loglevel",
    "--loghandler",
    "--uuid",
    "--config",
    "--import",
    "-i",
    "--run-now",
    "-rn",
    "--id",
    "--worker",
    "--exec",
    "--args",
    "--preprocessing",
    "--postprocessing",
    "--queue",
    "--preview",
    "--timezone",
    "--from",
    "--count",
    "--job",
    "--status",
    "--limit",
    "--show",
    "--note",
    "--backfill",
    "--to",
    "--trigger",
    "--cancel",
];

const SUBCOMMANDS: &[&str] = &["registry", "scheduler", "worker", "listener", "runs"];

/// Rewrites the original's two-letter short options (`-sj`, `-rn 4`, `-rn=4`) into their long
/// forms so that clap, which has only one-letter short options, can parse them.
pub fn translate_two_letter_options<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut out = Vec::new();
    let mut subcommand: Option<String> = None;
    let mut value_expected = false;
    let mut passthrough = false;
    for (index, arg) in args.into_iter().enumerate() {
        let arg: OsString = arg.into();
        if index == 0 || passthrough || value_expected {
            value_expected = false;
            out.push(arg);
            continue;
        }
        let Some(text) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if text == "--" {
            passthrough = true;
            out.push(arg);
            continue;
        }
        if subcommand.is_none() && SUBCOMMANDS.contains(&text) {
            subcommand = Some(text.to_string());
            out.push(arg);
            continue;
        }
        let (flag, inline_value) = match text.split_once('=') {
            Some((flag, value)) => (flag, Some(value)),
            None => (text, None),
        };
        let translated = subcommand.as_deref().and_then(|sub| {
            TWO_LETTER
                .iter()
                .find(|(s, short, _)| *s == sub && *short == flag)
                .map(|(_, _, long)| *long)
        });
        let flag = translated.unwrap_or(flag);
        // `-i` is `--import FILE` for the registry but the flag `--init` for the scheduler.
        let takes_value = TAKES_VALUE.contains(&flag)
            && !(flag == "-i" && subcommand.as_deref() != Some("registry"));
        if inline_value.is_none() && takes_value {
            value_expected = true;
        }
        match (translated, inline_value) {
            (Some(long), Some(value)) => out.push(format!("{long}={value}").into()),
            (Some(long), None) => out.push(long.into()),
            (None, _) => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(args: &[&str]) -> Vec<String> {
        translate_two_letter_options(args.iter().copied())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn two_letter_options_depend_on_the_subcommand() {
        assert_eq!(
            translate(&["js", "registry", "-sj", "-sr"]),
            ["js", "registry", "--show-jobs", "--show-registry"]
        );
        assert_eq!(
            translate(&[
                "js",
                "--loglevel",
                "debug",
                "scheduler",
                "-sj",
                "-aj",
                "-nd",
                "-rn",
                "4"
            ]),
            [
                "js",
                "--loglevel",
                "debug",
                "scheduler",
                "--show-scheduled-jobs",
                "--show-all-scheduled-jobs",
                "--no-daemon",
                "--run-now",
                "4"
            ]
        );
        assert_eq!(
            translate(&["js", "scheduler", "-rn=backup"]),
            ["js", "scheduler", "--run-now=backup"]
        );
    }

    #[test]
    fn values_are_never_translated() {
        assert_eq!(
            translate(&["js", "registry", "-i", "-sj"]),
            ["js", "registry", "-i", "-sj"]
        );
        assert_eq!(
            translate(&["js", "scheduler", "-rn", "-nd"]),
            ["js", "scheduler", "--run-now", "-nd"]
        );
        assert_eq!(
            translate(&["js", "-sj", "registry"]),
            ["js", "-sj", "registry"]
        );
        assert_eq!(
            translate(&["js", "scheduler", "-i", "-nd", "-i", "-sj"]),
            [
                "js",
                "scheduler",
                "-i",
                "--no-daemon",
                "-i",
                "--show-scheduled-jobs"
            ]
        );
    }

    #[test]
    fn the_translated_arguments_parse() {
        let cli = Cli::try_parse_from(translate_two_letter_options([
            "js",
            "scheduler",
            "-s",
            "-nd",
            "-rn",
            "7",
        ]))
        .unwrap();
        let Command::Scheduler(args) = cli.command else {
            panic!("not the scheduler")
        };
        assert!(args.schedule && args.no_daemon);
        assert_eq!(args.run_now.as_deref(), Some("7"));
    }
}
