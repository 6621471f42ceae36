//! The job file (the original's YAML format): parsing and complete validation, so that a bad file
//! is reported whole — every problem, each naming the job — before anything touches the database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use serde::Deserialize;

use crate::config::parse_timezone;
use crate::cron::CronSchedule;

/// Lengths of the original's `varchar` columns, checked here so that the database never has to.
pub const MAX_JOB: usize = 50;
const MAX_DESCRIPTION: usize = 100;
const MAX_FUNCTION: usize = 50;
const MAX_SCHEDULE: usize = 100;
pub const MAX_NAME: usize = 200;
const MAX_QUEUE: usize = 255;
/// The longest `jitter`.
pub const MAX_JITTER: Duration = Duration::from_secs(24 * 3600);

/// One job of the file, valid by construction.
#[derive(Debug, Clone)]
pub struct JobDefinition {
    /// The YAML `id`: the job's stable name.
    pub name: String,
    /// The plugin job to run (`cmd` on the wire).
    pub job: String,
    pub description: Option<String>,
    pub preprocessing: Option<String>,
    pub postprocessing: Option<String>,
    pub arguments: serde_json::Map<String, serde_json::Value>,
    /// `None`: the job runs only when asked (`scheduler --run-now`, webhooks). Shared by the
    /// jobs of a file that have the same expression.
    pub schedule: Option<Arc<CronSchedule>>,
    /// `None`: the config's zone.
    pub timezone: Option<Tz>,
    pub timeout: Option<Duration>,
    pub retries: u32,
    /// `None`: the configured queue.
    pub queue: Option<String>,
    pub misfire: Misfire,
    /// What a slot does while a run of this job is queued or running.
    pub concurrency: Concurrency,
    /// Jobs (by name) that get a run when a run of this one succeeds.
    pub on_success: Vec<String>,
    /// Jobs that get a run when a run of this one fails for good (after its last attempt).
    pub on_failure: Vec<String>,
    /// Each slot starts this much later at most (a deterministic share of it per job and slot).
    pub jitter: Option<Duration>,
}

/// What a slot does while a run of the same job is queued or running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Concurrency {
    /// Runs overlap (the original's behaviour).
    #[default]
    Allow,
    /// The new slot is recorded `skipped`, with the run it waited for.
    Forbid,
    /// The older runs are cancelled; the new one runs.
    Replace,
}

impl Concurrency {
    pub fn as_str(self) -> &'static str {
        match self {
            Concurrency::Allow => "allow",
            Concurrency::Forbid => "forbid",
            Concurrency::Replace => "replace",
        }
    }

    pub fn parse(value: &str) -> Option<Concurrency> {
        match value {
            "allow" => Some(Concurrency::Allow),
            "forbid" => Some(Concurrency::Forbid),
            "replace" => Some(Concurrency::Replace),
            _ => None,
        }
    }
}

/// What to do with runs missed while no scheduler was running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Misfire {
    /// Run once, then go on from now (the original's rule).
    #[default]
    RunOnce,
    /// Drop missed runs; go on from now.
    Skip,
}

impl Misfire {
    pub fn as_str(self) -> &'static str {
        match self {
            Misfire::RunOnce => "run_once",
            Misfire::Skip => "skip",
        }
    }

    pub fn parse(value: &str) -> Option<Misfire> {
        match value {
            "run_once" | "run-once" | "once" => Some(Misfire::RunOnce),
            "skip" => Some(Misfire::Skip),
            _ => None,
        }
    }
}

/// The names of functions the config knows, to catch a misspelt job at import.
pub struct KnownPlugins<'a> {
    pub jobs: &'a BTreeMap<String, crate::config::PluginLocation>,
    pub preprocessing: &'a BTreeMap<String, crate::config::PluginLocation>,
}

/// One thing wrong with a job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: "line 3 column 5", "job 2 (id \"backup\", line 7)", or the whole file.
    pub location: String,
    pub message: String,
}

/// A job file that cannot be imported, with every problem found.
#[derive(Debug)]
pub struct JobFileError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for JobFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        write!(
            f,
            "job file {} has {count} problem{}; nothing was imported",
            self.path.display(),
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            if problem.location.is_empty() {
                write!(f, "\n  - {}", problem.message)?;
            } else {
                write!(f, "\n  - {}: {}", problem.location, problem.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for JobFileError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    jobs: Option<Vec<serde_yaml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    id: Option<serde_yaml::Value>,
    job: Option<String>,
    schedule: Option<String>,
    description: Option<String>,
    preprocessing: Option<String>,
    postprocessing: Option<String>,
    arguments: Option<serde_json::Map<String, serde_json::Value>>,
    timezone: Option<String>,
    timeout: Option<serde_yaml::Value>,
    retries: Option<u32>,
    queue: Option<String>,
    misfire: Option<String>,
    concurrency: Option<String>,
    on_success: Option<Vec<String>>,
    on_failure: Option<Vec<String>>,
    jitter: Option<serde_yaml::Value>,
}

/// Reads and validates a job file.
pub fn load(
    path: &Path,
    known: Option<&KnownPlugins<'_>>,
) -> Result<Vec<JobDefinition>, JobFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| JobFileError {
        path: path.to_path_buf(),
        problems: vec![Problem {
            location: String::new(),
            message: format!("cannot read it: {e}"),
        }],
    })?;
    parse(path, &text, known)
}

/// Validates job file text; `path` is used in messages only.
///
/// A valid file is read straight into its jobs (no tree of the whole document in memory);
/// only a file with problems is read again as a tree, to report every problem of every job
/// with its place.
pub fn parse(
    path: &Path,
    text: &str,
    known: Option<&KnownPlugins<'_>>,
) -> Result<Vec<JobDefinition>, JobFileError> {
    if let Some(jobs) = parse_valid(text, known) {
        return Ok(jobs);
    }
    parse_reporting(path, text, known)
}

/// The jobs of a file without a single problem; `None` at the first one.
///
/// A YAML parser holds every event of the text it reads (about 30 times the text's size), so a
/// file laid out as usual — `jobs:`, then one block item per job — is read [`CHUNK_JOBS`] items
/// at a time: a run of block items means the same alone as inside its list, and each item is
/// read as the whole reading reads it (a YAML value, then a job). Any other layout (flow style,
/// anchors and aliases, other top-level keys, several documents, line breaks other than '\n')
/// and any problem make the file be read whole, which decides.
fn parse_valid(text: &str, known: Option<&KnownPlugins<'_>>) -> Option<Vec<JobDefinition>> {
    let (chunks, expected) = job_chunks(text, CHUNK_JOBS)?;
    if expected == 0 {
        // `jobs:` without a job: the whole reading says what is wrong.
        return None;
    }
    let mut schedules = Schedules::default();
    let mut seen: HashSet<String> = HashSet::with_capacity(expected);
    let mut jobs = Vec::with_capacity(expected);
    for chunk in chunks {
        // Each item as a YAML value first, then as a job — exactly as the whole reading does
        // (reading a job straight from the text would take `job: 123` as text, and let a
        // repeated argument overwrite the first).
        let items: Vec<serde_yaml::Value> = serde_yaml::from_str(chunk).ok()?;
        for item in items {
            let raw: RawJob = serde_yaml::from_value(item).ok()?;
            let job = validate(raw, known, &mut schedules).ok()?;
            if !seen.insert(job.name.clone()) {
                return None;
            }
            jobs.push(job);
        }
    }
    let names: HashSet<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    if !chain_problems(&jobs, &names).is_empty() {
        return None;
    }
    (jobs.len() == expected).then_some(jobs)
}

/// What is wrong with the chains of valid jobs: names no job of the file has (`ids`: every id
/// of the file), and loops (a chain that leads back to its start would run forever). Each as
/// (index of the job in `jobs`, message).
fn chain_problems(jobs: &[JobDefinition], ids: &HashSet<&str>) -> Vec<(usize, String)> {
    let mut problems = Vec::new();
    let index: HashMap<&str, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.name.as_str(), i))
        .collect();
    for (i, job) in jobs.iter().enumerate() {
        for (field, names) in [
            ("on_success", &job.on_success),
            ("on_failure", &job.on_failure),
        ] {
            for name in names {
                if !ids.contains(name.as_str()) {
                    problems.push((i, format!("{field}: no job has the id {name:?}")));
                }
            }
        }
    }
    // Loops: a depth-first walk; a job met again while on the current path closes a loop.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks = vec![Mark::New; jobs.len()];
    let successors = |i: usize| -> Vec<usize> {
        jobs[i]
            .on_success
            .iter()
            .chain(&jobs[i].on_failure)
            .filter_map(|n| index.get(n.as_str()).copied())
            .collect()
    };
    for start in 0..jobs.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // (job, its successors not yet walked)
        let mut path: Vec<(usize, Vec<usize>)> = vec![(start, successors(start))];
        marks[start] = Mark::OnPath;
        while let Some((node, pending)) = path.last_mut() {
            let node = *node;
            match pending.pop() {
                Some(next) if marks[next] == Mark::OnPath => {
                    let from = path.iter().position(|(n, _)| *n == next).unwrap_or(0);
                    let mut cycle: Vec<&str> = path[from..]
                        .iter()
                        .map(|(n, _)| jobs[*n].name.as_str())
                        .collect();
                    cycle.push(jobs[next].name.as_str());
                    problems.push((
                        next,
                        format!(
                            "its on_success/on_failure chain loops: {} (a chain must end)",
                            cycle.join(" → ")
                        ),
                    ));
                }
                Some(next) if marks[next] == Mark::New => {
                    marks[next] = Mark::OnPath;
                    path.push((next, successors(next)));
                }
                Some(_) => {}
                None => {
                    marks[node] = Mark::Done;
                    path.pop();
                }
            }
        }
    }
    problems
}

/// Jobs read per YAML document when a file is read in chunks.
const CHUNK_JOBS: usize = 1000;

/// The text of a file that is `jobs:` followed by a block list at indentation 0 (each item
/// starting with `- ` at the start of its line), cut into runs of at most `size` items, and
/// the number of items; `None` when the file is laid out otherwise.
fn job_chunks(text: &str, size: usize) -> Option<(Vec<&str>, usize)> {
    if text.starts_with('%') || text.contains("\n---") || text.contains("\n...") {
        return None;
    }
    // Lines end only at '\n' here; YAML also ends them at a lone CR and at U+0085, U+2028
    // and U+2029.
    let other_breaks = text.contains(['\u{85}', '\u{2028}', '\u{2029}'])
        || text
            .as_bytes()
            .windows(2)
            .any(|w| w[0] == b'\r' && w[1] != b'\n')
        || text.ends_with('\r');
    if other_breaks {
        return None;
    }
    // Anchors and aliases: the parser resolves an alias to the last anchor of that name in
    // the text it reads, which a chunk would change. (A `&` or `*` before a name inside a
    // string only makes the file be read whole.)
    let names_follow = |mark: u8| {
        text.as_bytes()
            .windows(2)
            .any(|w| w[0] == mark && (w[1].is_ascii_alphanumeric() || matches!(w[1], b'_' | b'-')))
    };
    if names_follow(b'&') || names_follow(b'*') {
        return None;
    }
    let is_filler = |line: &str| {
        let trimmed = line.trim_start();
        trimmed.is_empty() || trimmed.starts_with('#')
    };
    let mut offset = 0;
    let mut lines = text.split_inclusive('\n').map(|line| {
        let start = offset;
        offset += line.len();
        (start, line)
    });
    // `jobs:` first, alone on its line.
    loop {
        let (_, line) = lines.next()?;
        if is_filler(line) {
            continue;
        }
        // Nothing after `jobs:` but a comment, which YAML starts only after a space.
        let rest = line.strip_prefix("jobs:")?;
        if !rest.trim().is_empty() && !rest.starts_with([' ', '\t']) {
            return None;
        }
        if !rest.trim().is_empty() && !rest.trim_start().starts_with('#') {
            return None;
        }
        break;
    }
    let mut chunks = Vec::new();
    let mut chunk_start: Option<usize> = None;
    let mut items = 0;
    let mut total = 0;
    for (at, line) in lines {
        if is_filler(line) {
            continue;
        }
        if line.starts_with(' ') {
            // Inside an item (its first item must have started).
            chunk_start?;
            continue;
        }
        if !(line.starts_with("- ") || line.trim_end() == "-") {
            return None;
        }
        if items == size {
            chunks.push(&text[chunk_start?..at]);
            chunk_start = None;
            items = 0;
        }
        chunk_start.get_or_insert(at);
        items += 1;
        total += 1;
    }
    if let Some(from) = chunk_start {
        chunks.push(&text[from..]);
    }
    Some((chunks, total))
}

fn parse_reporting(
    path: &Path,
    text: &str,
    known: Option<&KnownPlugins<'_>>,
) -> Result<Vec<JobDefinition>, JobFileError> {
    let fail = |problems: Vec<Problem>| JobFileError {
        path: path.to_path_buf(),
        problems,
    };
    let document: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| fail(vec![yaml_problem(&e, "")]))?;
    if document.is_null() {
        return Err(fail(vec![Problem {
            location: String::new(),
            message: "the file is empty: expected a `jobs:` list".into(),
        }]));
    }
    let raw: RawFile = serde_path_to_error::deserialize(document).map_err(|e| {
        let key = e.path().to_string();
        fail(vec![Problem {
            location: String::new(),
            message: format!(
                "{}{}",
                if key == "." {
                    String::new()
                } else {
                    format!("{key}: ")
                },
                e.inner()
            ),
        }])
    })?;
    let Some(items) = raw.jobs else {
        return Err(fail(vec![Problem {
            location: String::new(),
            message: "no `jobs:` list: the file must start with `jobs:` followed by a list of jobs"
                .into(),
        }]));
    };

    let mut problems = Vec::new();
    let mut schedules = Schedules::default();
    let mut jobs = Vec::with_capacity(items.len());
    let mut locations = Vec::with_capacity(items.len());
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(items.len());
    let lines = IdLines::new(text);
    for (index, item) in items.into_iter().enumerate() {
        let number = index + 1;
        let id_hint = item.get("id").and_then(scalar_string);
        let location = match &id_hint {
            Some(id) => match lines.line_of(id) {
                Some(line) => format!("job {number} (id {id:?}, line {line})"),
                None => format!("job {number} (id {id:?})"),
            },
            None => format!("job {number}"),
        };
        let mut problem = |message: String| {
            problems.push(Problem {
                location: location.clone(),
                message,
            })
        };
        let raw: RawJob = match serde_path_to_error::deserialize(item) {
            Ok(raw) => raw,
            Err(e) => {
                let key = e.path().to_string();
                let message = e.into_inner().to_string();
                problem(if key == "." {
                    message
                } else {
                    format!("{key}: {message}")
                });
                continue;
            }
        };
        // Duplicates are found among all ids, valid jobs or not.
        let duplicate = match &id_hint {
            Some(id) => match seen.get(id) {
                Some(first) => {
                    problem(format!("duplicate id {id:?}: job {first} has it already"));
                    true
                }
                None => {
                    seen.insert(id.clone(), number);
                    false
                }
            },
            None => false,
        };
        match validate(raw, known, &mut schedules) {
            Ok(job) if !duplicate => {
                jobs.push(job);
                locations.push(location.clone());
            }
            Ok(_) => {}
            Err(messages) => messages.into_iter().for_each(&mut problem),
        }
    }
    let ids: HashSet<&str> = seen.keys().map(String::as_str).collect();
    for (index, message) in chain_problems(&jobs, &ids) {
        problems.push(Problem {
            location: locations[index].clone(),
            message,
        });
    }
    if problems.is_empty() {
        Ok(jobs)
    } else {
        Err(fail(problems))
    }
}

/// Cron expressions parsed so far in a file: jobs often share a schedule.
type Schedules = HashMap<String, Result<Arc<CronSchedule>, String>>;

fn validate(
    raw: RawJob,
    known: Option<&KnownPlugins<'_>>,
    schedules: &mut Schedules,
) -> Result<JobDefinition, Vec<String>> {
    let mut errors = Vec::new();
    let name = match raw.id.as_ref().map(|v| (v, scalar_string(v))) {
        None => {
            errors.push("missing `id`: every job needs a unique id (its stable name)".to_string());
            String::new()
        }
        Some((_, Some(id))) if id.trim().is_empty() => {
            errors.push("`id` is empty".to_string());
            String::new()
        }
        Some((_, Some(id))) => {
            if id.chars().count() > MAX_NAME {
                errors.push(format!("`id` is longer than {MAX_NAME} characters"));
            }
            if id.chars().any(char::is_control) {
                errors.push("`id` contains control characters".to_string());
            }
            id
        }
        Some((_, None)) => {
            errors.push("`id` must be a string or a number".to_string());
            String::new()
        }
    };
    let job = match raw.job {
        None => {
            errors.push("missing `job`: the name of the plugin job to run".to_string());
            String::new()
        }
        Some(job) if job.trim().is_empty() => {
            errors.push("`job` is empty".to_string());
            String::new()
        }
        Some(job) => job,
    };
    check_len(&mut errors, "job", Some(&job), MAX_JOB);
    check_len(
        &mut errors,
        "description",
        raw.description.as_deref(),
        MAX_DESCRIPTION,
    );
    check_len(
        &mut errors,
        "preprocessing",
        raw.preprocessing.as_deref(),
        MAX_FUNCTION,
    );
    check_len(
        &mut errors,
        "postprocessing",
        raw.postprocessing.as_deref(),
        MAX_FUNCTION,
    );

    let schedule = match raw.schedule.as_deref() {
        None => None,
        Some(expr) if expr.len() > MAX_SCHEDULE => {
            errors.push(format!(
                "`schedule` is longer than {MAX_SCHEDULE} characters"
            ));
            None
        }
        Some(expr) => match schedules
            .entry(expr.to_string())
            .or_insert_with(|| CronSchedule::parse(expr).map(Arc::new))
        {
            Ok(schedule) => Some(schedule.clone()),
            Err(message) => {
                errors.push(format!("schedule {expr:?}: {message}"));
                None
            }
        },
    };
    let timezone = match raw.timezone.as_deref() {
        None => None,
        Some(zone) => match parse_timezone(zone) {
            Ok(tz) => Some(tz),
            Err(message) => {
                errors.push(format!("timezone: {message}"));
                None
            }
        },
    };
    let timeout = match raw.timeout.as_ref() {
        None => None,
        Some(value) => match parse_duration(value) {
            Ok(duration) => Some(duration),
            Err(message) => {
                errors.push(format!("timeout: {message}"));
                None
            }
        },
    };
    if let Some(queue) = &raw.queue {
        if queue.trim().is_empty() || queue.len() > MAX_QUEUE {
            errors.push(format!(
                "queue {queue:?}: a queue name has 1 to {MAX_QUEUE} bytes"
            ));
        }
    }
    let misfire = match raw.misfire.as_deref() {
        None => Misfire::default(),
        Some(value) => Misfire::parse(value).unwrap_or_else(|| {
            errors.push(format!(
                "misfire {value:?}: use run_once (the default) or skip"
            ));
            Misfire::default()
        }),
    };

    let concurrency = match raw.concurrency.as_deref() {
        None => Concurrency::default(),
        Some(value) => Concurrency::parse(value).unwrap_or_else(|| {
            errors.push(format!(
                "concurrency {value:?}: use allow (the default), forbid or replace"
            ));
            Concurrency::default()
        }),
    };
    let jitter = match raw.jitter.as_ref() {
        None => None,
        Some(value) => match parse_duration(value) {
            Ok(_) if schedule.is_none() && raw.schedule.is_none() => {
                errors.push("jitter: only a job with a `schedule` has slots to spread".to_string());
                None
            }
            Ok(duration) if duration > MAX_JITTER => {
                errors.push(format!(
                    "jitter: at most {}h (a slot's run starts within a day of it)",
                    MAX_JITTER.as_secs() / 3600
                ));
                None
            }
            Ok(duration) => Some(duration),
            Err(message) => {
                errors.push(format!("jitter: {message}"));
                None
            }
        },
    };
    let mut chains = |field: &str, names: Option<Vec<String>>| -> Vec<String> {
        let names = names.unwrap_or_default();
        let mut seen = HashSet::new();
        for chained in &names {
            if chained.trim().is_empty() {
                errors.push(format!("{field}: a job name is empty"));
            } else if !seen.insert(chained.as_str()) {
                errors.push(format!("{field}: {chained:?} is listed twice"));
            }
        }
        names
    };
    let on_success = chains("on_success", raw.on_success);
    let on_failure = chains("on_failure", raw.on_failure);

    if let Some(known) = known.filter(|k| !k.jobs.is_empty()) {
        if !job.is_empty() && !known.jobs.contains_key(&job) {
            errors.push(format!(
                "job {job:?} is not a plugin in the config's `plugins:` section (known: {})",
                known.jobs.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        for (field, function) in [
            ("preprocessing", raw.preprocessing.as_deref()),
            ("postprocessing", raw.postprocessing.as_deref()),
        ] {
            if let Some(function) = function {
                if !known.preprocessing.contains_key(function) && !known.jobs.contains_key(function)
                {
                    errors.push(format!(
                        "{field} {function:?} is in neither the config's `preprocessing:` nor its `plugins:` section"
                    ));
                }
            }
        }
    }

    if errors.is_empty() {
        Ok(JobDefinition {
            name,
            job,
            description: raw.description,
            preprocessing: raw.preprocessing,
            postprocessing: raw.postprocessing,
            arguments: raw.arguments.unwrap_or_default(),
            schedule,
            timezone,
            timeout,
            retries: raw.retries.unwrap_or(0),
            queue: raw.queue,
            misfire,
            concurrency,
            on_success,
            on_failure,
            jitter,
        })
    } else {
        Err(errors)
    }
}

fn check_len(errors: &mut Vec<String>, field: &str, value: Option<&str>, max: usize) {
    if let Some(value) = value {
        if value.chars().count() > max {
            errors.push(format!("`{field}` is longer than {max} characters"));
        }
    }
}

fn scalar_string(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A duration: seconds as a number, or a number with a unit: `90s`, `15m`, `2h`.
pub fn parse_duration(value: &serde_yaml::Value) -> Result<Duration, String> {
    let text = match value {
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::String(s) => s.trim().to_string(),
        _ => {
            return Err(
                "expected seconds (a number) or a duration such as \"90s\", \"15m\", \"2h\"".into(),
            )
        }
    };
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text.as_str(), "s"),
    };
    let amount: f64 = digits.parse().map_err(|_| {
        format!("{text:?} is not a duration: use seconds or a number with s, m or h")
    })?;
    let factor = match unit.trim() {
        "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}: use s, m or h")),
    };
    let seconds = amount * factor;
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("{text:?} must be more than zero"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is too long"))
}

fn yaml_problem(error: &serde_yaml::Error, key: &str) -> Problem {
    let mut message = error.to_string();
    if let Some(cut) = message.find(" at line ") {
        message.truncate(cut);
    }
    Problem {
        location: match error.location() {
            Some(l) => format!("line {} column {}", l.line(), l.column()),
            None => String::new(),
        },
        message: format!("{key}{message}"),
    }
}

/// Finds the line of a job from its id (`- id: foo`, `id: "foo"`), for messages.
struct IdLines<'a> {
    /// Id value as written → the lines it is on.
    lines: HashMap<&'a str, Vec<usize>>,
}

impl<'a> IdLines<'a> {
    fn new(text: &'a str) -> Self {
        let mut lines: HashMap<&'a str, Vec<usize>> = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let rest = line.trim_start().trim_start_matches('-').trim_start();
            if let Some(value) = rest.strip_prefix("id:") {
                let value = value.split(" #").next().unwrap_or(value).trim();
                let value = value.trim_matches(|c| c == '"' || c == '\'');
                lines.entry(value).or_default().push(i + 1);
            }
        }
        IdLines { lines }
    }

    /// The line, when exactly one line carries this id.
    fn line_of(&self, id: &str) -> Option<usize> {
        match self.lines.get(id).map(Vec::as_slice) {
            Some([line]) => Some(*line),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Vec<JobDefinition>, JobFileError> {
        parse(Path::new("jobs.yaml"), text, None)
    }

    /// A file of `count` jobs using what block YAML offers inside an item.
    fn varied_file(count: usize) -> String {
        let mut text = String::from("# the jobs\njobs:\n");
        for i in 0..count {
            text.push_str(&format!(
                "# job {i}\n- id: job-{i}\n  job: command\n  schedule: \"{} 2 * * *\"\n  description: |\n    line one of {i}\n    line two\n\n  arguments:\n    host: host-{i}.lab\n    url: \"https://x/?a=1 & b=2\"\n    list:\n      - 1\n      - two\n    flow: {{a: [1, 2], b: null}}\n    flag: yes\n  retries: {}\n",
                i % 60,
                i % 3
            ));
        }
        text
    }

    #[test]
    fn a_file_read_in_chunks_gives_what_it_gives_read_whole() {
        let text = varied_file(CHUNK_JOBS * 2 + 7);
        let (chunks, total) = job_chunks(&text, CHUNK_JOBS).expect("a usual layout is chunked");
        assert_eq!((chunks.len(), total), (3, CHUNK_JOBS * 2 + 7));
        assert!(parse_valid(&text, None).is_some(), "the fast path reads it");
        let big = (0..3000).fold(String::from("jobs:\n"), |mut t, i| {
            t.push_str(&format!("- id: job-{i}\n  job: command\n  schedule: \"{} {} * * *\"\n  arguments:\n    host: host-{i}.lab\n", i % 60, i % 24));
            t
        });
        assert!(
            parse_valid(&big, None).is_some(),
            "the fast path reads the benchmark's file"
        );
        let chunked = check(&text).unwrap();
        let whole = parse_reporting(Path::new("jobs.yaml"), &text, None).unwrap();
        assert_eq!(format!("{chunked:?}"), format!("{whole:?}"));
        assert_eq!(
            chunked[5].arguments["host"],
            serde_json::json!("host-5.lab")
        );
        assert_eq!(chunked[5].arguments["flag"], serde_json::json!("yes"));
    }

    #[test]
    fn layouts_that_cannot_be_cut_are_read_whole() {
        // An alias to an anchor of another chunk: that chunk fails alone; the file is read
        // whole, where the alias resolves.
        let mut text =
            String::from("jobs:\n- id: first\n  job: command\n  arguments: &common {a: 1}\n");
        for i in 1..CHUNK_JOBS + 5 {
            text.push_str(&format!(
                "- id: job-{i}\n  job: command\n  arguments: *common\n"
            ));
        }
        let jobs = check(&text).unwrap();
        assert_eq!(jobs[CHUNK_JOBS + 2].arguments["a"], serde_json::json!(1));
        // Anchors anywhere, indented items, flow style, other top-level keys, several
        // documents: not cut.
        for text in [
            "jobs:\n- id: a\n  job: command\n  arguments: &x {a: 1}\n- id: b\n  job: command\n  arguments: *x\n",
            "jobs:\n  - id: a\n    job: command\n",
            "jobs: [{id: a, job: command}]\n",
            "jobs:\n- id: a\n  job: command\nother: 1\n",
            "jobs:\n- id: a\n  job: command\n---\njobs: []\n",
        ] {
            assert!(job_chunks(text, CHUNK_JOBS).is_none(), "{text}");
        }
        assert_eq!(
            check("jobs:\n  - id: a\n    job: command\n").unwrap().len(),
            1
        );
        assert_eq!(check("jobs: [{id: a, job: command}]\n").unwrap().len(), 1);
        // A duplicate id across chunks is reported as in a file read whole.
        let mut text = varied_file(CHUNK_JOBS + 1);
        text.push_str("- id: job-3\n  job: command\n");
        let error = check(&text).unwrap_err().to_string();
        assert!(error.contains("duplicate id \"job-3\""), "{error}");
    }

    #[test]
    fn the_fast_path_accepts_nothing_the_whole_reading_refuses() {
        let cases = [
            ("jobs:\n", "a bare jobs key"),
            (
                "jobs:\n# - id: a\n#   job: command\n",
                "every job commented out",
            ),
            ("jobs:\n- id: a\n  job: 123\n", "a number as the plugin job"),
            (
                "jobs:\n- id: a\n  job: command\n  description: 2024\n",
                "a number as description",
            ),
            (
                "jobs:\n- id: a\n  job: command\n  queue: 7\n",
                "a number as queue",
            ),
            (
                "jobs:\n- id: a\n  job: command\n  arguments: {host: a, host: b}\n",
                "a repeated argument",
            ),
            (
                "jobs:\n- id: a\n  job: command\n  arguments: {8080: web}\n",
                "a number as an argument's name",
            ),
            (
                "jobs:#c\n- id: a\n  job: command\n",
                "no space before a comment",
            ),
        ];
        for (text, what) in cases {
            assert!(
                parse_reporting(Path::new("jobs.yaml"), text, None).is_err(),
                "{what}: the whole reading refuses it"
            );
            assert!(check(text).is_err(), "{what}: accepted");
        }
    }

    #[test]
    fn line_breaks_other_than_a_newline_make_the_file_read_whole() {
        // libyaml ends a line at a lone CR and at U+0085, U+2028, U+2029 too: a "comment" line
        // may hide a job that only a whole reading sees.
        for text in [
            "jobs:\n# c\r- {id: a, job: command}\n- id: b\n  job: command\n",
            "jobs:\n# c\u{2028}- {id: a, job: command}\n- id: b\n  job: command\n",
        ] {
            let whole = parse_reporting(Path::new("jobs.yaml"), text, None).map(|j| j.len());
            assert_eq!(check(text).map(|j| j.len()).ok(), whole.ok(), "{text:?}");
        }
        // Anchor names may hold '-'.
        assert!(job_chunks(
            "jobs:\n- id: a\n  job: command\n  arguments: &-a {v: 1}\n",
            CHUNK_JOBS
        )
        .is_none());
    }

    #[test]
    fn the_seed_example_parses() {
        let jobs = check(
            "---\njobs:\n- id: hello world\n  job: hello_world\n  schedule: \"*/1 * * * *\"\n  arguments:\n    hello: world\n\
             - id: backup devices\n  job: simple_config_backup\n  schedule: \"0 1 * * *\"\n  preprocessing: preprocessing_backup\n  arguments:\n    where: name=lab.local\n    sot: True\n    exclude:\n      devices: ['labx.local']\n      pattern: ['.*xx']\n",
        )
        .unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].name, "backup devices");
        assert_eq!(jobs[1].arguments["sot"], serde_json::json!(true));
        assert_eq!(
            jobs[1].preprocessing.as_deref(),
            Some("preprocessing_backup")
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_job() {
        let err = check(
            "jobs:\n- id: a\n  job: x\n  schedule: \"61 * * * *\"\n- job: y\n- id: a\n  job: z\n- id: tz\n  job: t\n  timezone: Europe/Nowhere\n- id: typo\n  job: t\n  shedule: x\n- id: n\n  job: t\n  retries: -1\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 6, "{text}");
        assert!(
            text.contains("job 1 (id \"a\"") && text.contains("61 * * * *"),
            "{text}"
        );
        assert!(
            text.contains("job 2") && text.contains("missing `id`"),
            "{text}"
        );
        assert!(text.contains("duplicate id \"a\""), "{text}");
        assert!(text.contains("Europe/Nowhere"), "{text}");
        assert!(text.contains("shedule"), "{text}");
        assert!(text.contains("retries"), "{text}");
        assert!(text.contains("nothing was imported"), "{text}");
    }

    #[test]
    fn yaml_syntax_errors_have_line_and_column() {
        let err = check("jobs:\n- id: a\n  job: [x\n").unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert!(err.problems[0].location.starts_with("line "), "{err}");
        assert!(check("").is_err());
        assert!(check("other: 1\n")
            .unwrap_err()
            .to_string()
            .contains("other"));
        assert!(check("jobs: {}\n").is_err());
    }

    #[test]
    fn durations_too_long_to_hold_are_refused_not_a_panic() {
        let huge = serde_yaml::Value::String("99999999999999999999h".into());
        assert!(parse_duration(&huge).unwrap_err().contains("too long"));
        let jobs =
            "jobs:\n- id: a\n  job: x\n  schedule: '@daily'\n  timeout: 99999999999999999999h\n";
        let err = check(jobs).unwrap_err().to_string();
        assert!(err.contains("timeout") && err.contains("too long"), "{err}");
    }

    #[test]
    fn optional_settings_validate() {
        let jobs = check("jobs:\n- id: 7\n  job: t\n  timeout: 15m\n  retries: 3\n  misfire: skip\n  queue: slow\n").unwrap();
        assert_eq!(jobs[0].name, "7");
        assert_eq!(jobs[0].timeout, Some(Duration::from_secs(900)));
        assert_eq!(jobs[0].misfire, Misfire::Skip);
        assert!(check("jobs:\n- id: a\n  job: t\n  timeout: soon\n").is_err());
        assert!(check("jobs:\n- id: a\n  job: t\n  misfire: maybe\n").is_err());
        assert!(check(&format!("jobs:\n- id: a\n  job: {}\n", "x".repeat(51))).is_err());
    }

    #[test]
    fn unknown_plugins_are_caught_when_the_config_lists_plugins() {
        let mut jobs_map = BTreeMap::new();
        jobs_map.insert(
            "hello_world".to_string(),
            crate::config::PluginLocation {
                plugin_dir: "plugins".into(),
                plugin: "hello_world".into(),
                runtime: None,
                python: None,
            },
        );
        let empty = BTreeMap::new();
        let known = KnownPlugins {
            jobs: &jobs_map,
            preprocessing: &empty,
        };
        let text = "jobs:\n- id: a\n  job: hello_world\n- id: b\n  job: helo_world\n  preprocessing: nope\n";
        let err = parse(Path::new("j.yaml"), text, Some(&known)).unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.to_string().contains("helo_world"));
    }
}
