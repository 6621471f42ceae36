//! `command`: runs an executable — backups, dumps, scripts.
//!
//! Arguments:
//! - `command` (required): the program, or a list `[program, arg, ...]`; with `shell: true`, a
//!   shell command line run by `/bin/sh -c`.
//! - `args`: more arguments (a list of strings).
//! - `shell`: run through `/bin/sh -c` (default false: no shell, no quoting problems).
//! - `env`: variables to set (a mapping); `clear_env: true` starts from an empty environment.
//! - `cwd`: the working directory.
//! - `timeout`: seconds; when it passes, the whole process group gets SIGTERM, then SIGKILL
//!   after `kill_grace` seconds (default 5). A timeout is a retryable failure, and so is a
//!   non-zero exit (the job's `retries` decide whether it is tried again).
//! - `stdin`: text written to the program's standard input (default: none, /dev/null).
//! - `success_codes`: exit statuses that count as success (default `[0]`).
//!
//! `{name}` in `command` and `args` is replaced by the argument `name` when it is a string or a
//! number, so a fanned-out job can say `ssh {host} ...`. The run gives three more (unless an
//! argument has the name): `{run_id}`, `{scheduled_for}` (the slot, RFC 3339 in the job's zone;
//! for runs without a slot, when the run was created) and `{attempt}`, so a backup can be named
//! by its slot. In a `shell: true` command line the
//! value is quoted for the shell: it stays one word and runs nothing, whatever it contains (so
//! do not put placeholders inside quotes of your own). Substituted values are not searched for
//! placeholders again.
//!
//! The program's environment has `JOBSCHLEUDER_RUN_ID`, `JOBSCHLEUDER_JOB`,
//! `JOBSCHLEUDER_TRIGGER`, `JOBSCHLEUDER_SCHEDULED_FOR` and `JOBSCHLEUDER_ATTEMPT` (set after
//! `env`, also with `clear_env`).
//!
//! A cancelled run (`runs --cancel`) stops like a timed-out one: its process group gets SIGTERM,
//! then SIGKILL after `kill_grace`, within about a second of the cancel.
//!
//! The result has `exit_code` (or `signal`), `stdout` and `stderr` (their last 64 KiB),
//! `stdout_truncated`/`stderr_truncated`, `duration_ms` and `timed_out`. A failed run carries the
//! same result in its error details.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use jobschleuder_plugin::{jobschleuder, json, serde_json, Args, JobError, Value};
use serde::Deserialize;

/// Output kept per stream: the end of the output, where errors usually are.
pub const OUTPUT_LIMIT: usize = 64 * 1024;
/// How long to wait for output to close after the program exits, before its leftover children
/// are killed.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Program {
    Line(String),
    Argv(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct Spec {
    command: Option<Program>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    shell: bool,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    clear_env: bool,
    cwd: Option<PathBuf>,
    timeout: Option<f64>,
    kill_grace: Option<f64>,
    stdin: Option<String>,
    success_codes: Option<Vec<i32>>,
}

#[jobschleuder("command")]
fn command(args: Args) -> Result<Value, JobError> {
    let spec: Spec = serde_json::from_value(Value::Object(args.clone()))
        .map_err(|e| JobError::fatal(format!("command: bad arguments: {e}")))?;
    let run = jobschleuder_plugin::current_run();
    let mut values = args.clone();
    if let Some(run) = &run {
        for (name, value) in [
            ("run_id", json!(run.id)),
            ("scheduled_for", json!(run.scheduled_for)),
            ("attempt", json!(run.attempt)),
        ] {
            if !value.is_null() {
                values.entry(name).or_insert(value);
            }
        }
    }
    run_program(&spec, &values, run.as_ref())
}

/// The run's variables for the program's environment.
fn run_environment(run: &jobschleuder_plugin::Run) -> Vec<(&'static str, String)> {
    let mut vars = vec![
        ("JOBSCHLEUDER_RUN_ID", run.id.clone()),
        ("JOBSCHLEUDER_JOB", run.job.clone()),
        ("JOBSCHLEUDER_TRIGGER", run.trigger.clone()),
        ("JOBSCHLEUDER_ATTEMPT", run.attempt.to_string()),
    ];
    if let Some(slot) = &run.scheduled_for {
        vars.push(("JOBSCHLEUDER_SCHEDULED_FOR", slot.clone()));
    }
    vars
}

/// `text` with each `{name}` replaced by the argument `name` (a string or a number), in one pass:
/// a substituted value is never searched for placeholders. With `quote`, values are quoted for a
/// POSIX shell, so a host name like `sw1;rm -rf ~` stays one word.
fn substitute(text: &str, args: &Args, quote: bool) -> Result<String, JobError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let value = after.find('}').and_then(|close| {
            let name = &after[..close];
            let value = match args.get(name)? {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((name, value, close))
        });
        match value {
            Some((name, value, close)) => {
                if quote {
                    let quoted = shlex::try_quote(&value).map_err(|e| {
                        JobError::fatal(format!("command: the value of {{{name}}}: {e}"))
                    })?;
                    out.push_str(&quoted);
                } else {
                    out.push_str(&value);
                }
                rest = &after[close + 1..];
            }
            // Not a placeholder of ours (shell braces, `${VAR}`): kept as written.
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn build(
    spec: &Spec,
    args: &Args,
    run: Option<&jobschleuder_plugin::Run>,
) -> Result<(Command, Vec<String>), JobError> {
    let mut argv: Vec<String> = match &spec.command {
        None => {
            return Err(JobError::fatal(
                "command: missing `command` (the program to run)",
            ))
        }
        Some(Program::Line(line)) if spec.shell => {
            vec!["/bin/sh".into(), "-c".into(), line.clone()]
        }
        Some(Program::Line(program)) => vec![program.clone()],
        Some(Program::Argv(argv)) if spec.shell => {
            vec!["/bin/sh".into(), "-c".into(), argv.join(" ")]
        }
        Some(Program::Argv(argv)) => argv.clone(),
    };
    if argv.first().is_none_or(|p| p.trim().is_empty()) {
        return Err(JobError::fatal("command: `command` is empty"));
    }
    // Only the shell's command line is parsed by the shell; every other word is passed as is.
    let line = if spec.shell { Some(2) } else { None };
    argv.extend(spec.args.iter().cloned());
    let argv = argv
        .iter()
        .enumerate()
        .map(|(index, word)| substitute(word, args, line == Some(index)))
        .collect::<Result<Vec<String>, JobError>>()?;
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    if spec.clear_env {
        command.env_clear();
    }
    command.envs(&spec.env);
    if let Some(run) = run {
        command.envs(run_environment(run));
    }
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    command
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills the program and everything it started.
        .process_group(0);
    Ok((command, argv))
}

/// The tail of a stream: the last `OUTPUT_LIMIT` bytes, and whether anything was cut.
struct Tail {
    bytes: Vec<u8>,
    total: usize,
}

fn read_tail(mut reader: impl Read) -> Tail {
    let mut bytes = Vec::new();
    let mut total = 0;
    let mut chunk = [0u8; 8192];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                bytes.extend_from_slice(&chunk[..n]);
                if bytes.len() > 2 * OUTPUT_LIMIT {
                    bytes.drain(..bytes.len() - OUTPUT_LIMIT);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if bytes.len() > OUTPUT_LIMIT {
        bytes.drain(..bytes.len() - OUTPUT_LIMIT);
    }
    Tail { bytes, total }
}

fn signal_group(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group we created for the child.
    unsafe {
        libc::kill(-(pid as i32), signal);
    }
}

/// Why a program was stopped before it ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stopped {
    TimedOut,
    Cancelled,
}

/// How often a running program's run is checked for a cancel.
const CANCEL_POLL: Duration = Duration::from_millis(100);

fn run_program(
    spec: &Spec,
    args: &Args,
    run: Option<&jobschleuder_plugin::Run>,
) -> Result<Value, JobError> {
    let (mut command, argv) = build(spec, args, run)?;
    let started = Instant::now();
    let mut child = command.spawn().map_err(|e| {
        let retryable = e.kind() != std::io::ErrorKind::NotFound
            && e.kind() != std::io::ErrorKind::PermissionDenied;
        let error = format!("command: cannot start {:?}: {e}", argv[0]);
        if retryable {
            JobError::retryable(error)
        } else {
            JobError::fatal(error)
        }
    })?;
    let pid = child.id();
    jobschleuder_plugin::debug!("command: started {:?} as pid {pid}", argv);

    if let (Some(text), Some(mut stdin)) = (spec.stdin.clone(), child.stdin.take()) {
        thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        });
    }
    let (tail_tx, tail_rx) = mpsc::channel();
    for (index, stream) in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .enumerate()
    {
        let tx = tail_tx.clone();
        if let Some(stream) = stream {
            thread::spawn(move || {
                let _ = tx.send((index, read_tail(stream)));
            });
        }
    }
    drop(tail_tx);

    let (status_tx, status_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = status_tx.send(child.wait());
    });
    let timeout = spec
        .timeout
        .filter(|t| *t > 0.0)
        .map(Duration::from_secs_f64);
    let grace = Duration::from_secs_f64(spec.kill_grace.unwrap_or(5.0).max(0.0));
    let deadline = timeout.map(|limit| started + limit);
    let lost = || Err(std::io::Error::other("lost the child"));
    let mut stopped = None;
    let status = loop {
        let wait = deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(CANCEL_POLL)
            .min(CANCEL_POLL);
        match status_rx.recv_timeout(wait) {
            Ok(status) => break status,
            Err(mpsc::RecvTimeoutError::Disconnected) => break lost(),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let why = if jobschleuder_plugin::cancelled() {
                    Stopped::Cancelled
                } else if deadline.is_some_and(|d| Instant::now() >= d) {
                    Stopped::TimedOut
                } else {
                    continue;
                };
                stopped = Some(why);
                match why {
                    Stopped::Cancelled => jobschleuder_plugin::warn!(
                        "command: the run of {:?} was cancelled; stopping its process group",
                        argv[0]
                    ),
                    Stopped::TimedOut => jobschleuder_plugin::warn!(
                        "command: {:?} timed out after {:?}; stopping its process group",
                        argv[0],
                        timeout.unwrap_or_default()
                    ),
                }
                signal_group(pid, libc::SIGTERM);
                break match status_rx.recv_timeout(grace) {
                    Ok(status) => status,
                    Err(_) => {
                        signal_group(pid, libc::SIGKILL);
                        status_rx.recv().unwrap_or_else(|_| lost())
                    }
                };
            }
        }
    };
    let status = status.map_err(|e| {
        JobError::retryable(format!("command: waiting for {:?} failed: {e}", argv[0]))
    })?;
    let timed_out = stopped == Some(Stopped::TimedOut);
    if stopped.is_some() {
        // Children that ignored SIGTERM while the leader exited still go.
        signal_group(pid, libc::SIGKILL);
    }

    // Output closes when every process holding it exits; leftovers of the group are killed.
    let mut tails: [Option<Tail>; 2] = [None, None];
    let deadline = Instant::now() + DRAIN_GRACE;
    let mut killed_leftovers = false;
    while tails.iter().any(Option::is_none) {
        let wait = deadline.saturating_duration_since(Instant::now());
        match tail_rx.recv_timeout(wait) {
            Ok((index, tail)) => tails[index] = Some(tail),
            Err(mpsc::RecvTimeoutError::Timeout) if !killed_leftovers => {
                killed_leftovers = true;
                signal_group(pid, libc::SIGKILL);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // After SIGKILL, EOF comes at once; wait for it without a deadline.
                match tail_rx.recv() {
                    Ok((index, tail)) => tails[index] = Some(tail),
                    Err(_) => break,
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let [stdout, stderr] = tails.map(|t| {
        t.unwrap_or(Tail {
            bytes: Vec::new(),
            total: 0,
        })
    });

    let duration_ms = started.elapsed().as_millis() as u64;
    let result = json!({
        "command": argv,
        "exit_code": status.code(),
        "signal": status.signal(),
        "stdout": String::from_utf8_lossy(&stdout.bytes),
        "stderr": String::from_utf8_lossy(&stderr.bytes),
        "stdout_truncated": stdout.total > stdout.bytes.len(),
        "stderr_truncated": stderr.total > stderr.bytes.len(),
        "duration_ms": duration_ms,
        "timed_out": timed_out,
        "killed_leftover_processes": killed_leftovers,
    });
    let success_codes = spec.success_codes.clone().unwrap_or_else(|| vec![0]);
    if stopped == Some(Stopped::Cancelled) {
        return Err(JobError::fatal(format!(
            "command: the run was cancelled; {:?} and its process group were stopped",
            argv[0]
        ))
        .with_details(result));
    }
    if timed_out {
        let limit = timeout.map(|t| t.as_secs_f64()).unwrap_or_default();
        return Err(JobError::retryable(format!(
            "command: {:?} timed out after {limit}s; its process group was killed",
            argv[0]
        ))
        .with_details(result));
    }
    match (status.code(), status.signal()) {
        (Some(code), _) if success_codes.contains(&code) => Ok(result),
        // A non-zero exit may pass on another try (a device unreachable); the job's
        // `retries` decides.
        (Some(code), _) => Err(JobError::retryable(format!(
            "command: {:?} exited with status {code}",
            argv[0]
        ))
        .with_details(result)),
        (None, Some(signal)) => Err(JobError::retryable(format!(
            "command: {:?} was killed by signal {signal}",
            argv[0]
        ))
        .with_details(result)),
        (None, None) => Err(JobError::fatal(format!(
            "command: {:?} ended without a status",
            argv[0]
        ))
        .with_details(result)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(args: Value) -> Result<Value, JobError> {
        command(args.as_object().cloned().unwrap())
    }

    #[test]
    fn runs_without_a_shell_and_captures_output() {
        let result =
            call(json!({"command": ["printf", "%s|%s"], "args": ["a b", "$HOME"]})).unwrap();
        assert_eq!(result["stdout"], "a b|$HOME");
        assert_eq!(result["exit_code"], 0);
    }

    #[test]
    fn shell_env_cwd_stdin_and_placeholders() {
        let result = call(json!({
            "command": "echo \"$GREETING {host}\" && pwd && cat",
            "shell": true,
            "env": {"GREETING": "hi"},
            "cwd": "/tmp",
            "stdin": "from stdin",
            "host": "sw1.lab"
        }))
        .unwrap();
        assert_eq!(result["stdout"], "hi sw1.lab\n/tmp\nfrom stdin");
    }

    #[test]
    fn shell_placeholders_are_quoted_and_run_nothing() {
        let dir = std::env::temp_dir().join(format!("command-quote-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("injected");
        let host = format!("sw1 ;touch {}", marker.display());
        let result = call(json!({
            "command": "printf '[%s]' {host} {port}",
            "shell": true,
            "host": host,
            "port": 22,
        }))
        .unwrap();
        assert_eq!(result["stdout"], format!("[{host}][22]"));
        assert!(!marker.exists(), "the value ran as a command");

        // A value is never searched for placeholders again: `{b}` inside `a` stays text.
        let result = call(json!({
            "command": "printf '[%s]' {a} {b}",
            "shell": true,
            "a": "{b}",
            "b": format!("x;touch {}", marker.display()),
        }))
        .unwrap();
        assert_eq!(
            result["stdout"],
            format!("[{{b}}][x;touch {}]", marker.display())
        );
        assert!(!marker.exists(), "the value ran as a command");

        // Without a shell, values are plain arguments, as before.
        let result =
            call(json!({"command": ["printf", "[%s]", "{host}"], "host": "a b;c"})).unwrap();
        assert_eq!(result["stdout"], "[a b;c]");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn non_zero_exit_fails_with_the_output() {
        let err = call(json!({"command": "echo bad >&2; exit 3", "shell": true})).unwrap_err();
        assert!(err.retryable, "the job's retries decide");
        assert!(err.message.contains("status 3"), "{}", err.message);
        let details = err.details.unwrap();
        assert_eq!(details["exit_code"], 3);
        assert_eq!(details["stderr"], "bad\n");
        assert!(call(json!({"command": "exit 3", "shell": true, "success_codes": [0, 3]})).is_ok());
    }

    #[test]
    fn missing_program_is_a_clear_fatal_error() {
        let err = call(json!({"command": "/no/such/program"})).unwrap_err();
        assert!(
            !err.retryable && err.message.contains("/no/such/program"),
            "{}",
            err.message
        );
        let err = call(json!({"args": ["x"]})).unwrap_err();
        assert!(err.message.contains("missing `command`"), "{}", err.message);
    }

    #[test]
    fn output_keeps_the_last_64_kib() {
        let result = call(
            json!({"command": "head -c 200000 /dev/zero | tr '\\0' a; echo END", "shell": true}),
        )
        .unwrap();
        let stdout = result["stdout"].as_str().unwrap();
        assert_eq!(stdout.len(), OUTPUT_LIMIT);
        assert!(stdout.ends_with("aEND\n"));
        assert_eq!(result["stdout_truncated"], true);
        assert_eq!(result["stderr_truncated"], false);
    }

    /// Whether a process is gone (or a zombie waiting for a reaper, which is as good as gone).
    fn gone(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        }
    }

    fn wait_gone(pid: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if gone(pid) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn timeout_kills_the_child_and_its_children() {
        let dir = std::env::temp_dir().join(format!("command-timeout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("pid");
        let started = Instant::now();
        let err = call(json!({
            // The background child does not share the output pipes, and the foreground program
            // replaces the shell: only the timeout's kill of the process group can end the
            // background child (the cleanup of leftovers that keep the output open would not
            // see it).
            "command": format!(
                "sleep 60 > /dev/null 2>&1 < /dev/null & echo $! > {}; exec sleep 60",
                pidfile.display()
            ),
            "shell": true,
            "timeout": 0.5,
            "kill_grace": 0.5,
        }))
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the timeout did not stop the run"
        );
        assert!(
            err.retryable && err.message.contains("timed out"),
            "{}",
            err.message
        );
        assert_eq!(err.details.as_ref().unwrap()["timed_out"], true);
        let grandchild = std::fs::read_to_string(&pidfile).unwrap();
        assert!(
            wait_gone(grandchild.trim()),
            "the background child {grandchild} survived"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn leftover_background_processes_do_not_hang_the_run() {
        let dir = std::env::temp_dir().join(format!("command-leftover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("pid");
        let result = call(json!({
            "command": format!("sleep 60 & echo $! > {}; echo done", pidfile.display()),
            "shell": true,
        }))
        .unwrap();
        assert_eq!(result["stdout"], "done\n");
        assert_eq!(result["killed_leftover_processes"], true);
        let leftover = std::fs::read_to_string(&pidfile).unwrap();
        assert!(
            wait_gone(leftover.trim()),
            "the leftover {leftover} survived"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
