//! The bridge to the original's Python plugins: a `.py` module with `@jobschleuder("name")`
//! functions runs unchanged, out of process, in Python processes of its own.
//!
//! Each process runs the shim (`shim.py`, embedded) with the module: it imports it with a
//! `jobschleuder` decorator that registers functions as the original's did (`from veritas.plugin
//! import jobschleuder` keeps working) and answers calls as JSON lines over stdin/stdout; print
//! and logging output arrive on stderr and go to the worker's log. Processes are kept in a
//! pool per plugin, grown on demand (one per concurrent call, so at most the worker's slots).
//! A process that crashes, or that a call's time limit runs out on, is killed (with its process
//! group) and replaced for the next call; the call fails with the reason.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::plugin::{JobError, Kind, PluginError, Secrets};

/// The shim every Python process runs.
const SHIM: &str = include_str!("shim.py");

/// How long a new process may take to import its module when the call has no limit of its own.
const IMPORT_LIMIT: Duration = Duration::from_secs(60);
/// Longest plugin log line kept (characters).
const MAX_LOG_LINE: usize = 16 * 1024;

/// One plugin module and its processes.
pub struct PythonPlugin {
    /// The config's name of the plugin (its `plugin:`), for messages and logs.
    plugin: String,
    path: PathBuf,
    python: String,
    environment: Vec<(String, String)>,
    secrets: Arc<Secrets>,
    startup_timeout: Duration,
    idle: Mutex<Vec<Interpreter>>,
}

/// A Python process running the shim with the module imported.
struct Interpreter {
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<String>,
    functions: Vec<String>,
    /// Killed and reaped: its pid (and group id) may belong to another process by now.
    reaped: bool,
}

impl Interpreter {
    /// Stops the process and everything it started (its process group), then reaps it.
    fn kill(&mut self) {
        if self.reaped {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on the process group the child leads (started as its leader);
            // not reaped yet, so the group id is still ours.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Interpreter {
    fn drop(&mut self) {
        self.kill();
    }
}

impl PythonPlugin {
    pub(crate) fn new(
        plugin: &str,
        path: PathBuf,
        python: Option<&str>,
        environment: Vec<(String, String)>,
        secrets: Arc<Secrets>,
        startup_timeout: Duration,
    ) -> PythonPlugin {
        PythonPlugin {
            plugin: plugin.to_string(),
            path,
            python: python.unwrap_or("python3").to_string(),
            environment,
            secrets,
            startup_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    /// The config's name of the plugin (its `plugin:`).
    pub fn name(&self) -> &str {
        &self.plugin
    }

    /// Calls `function` with keyword arguments `kwargs`, within `deadline`. `sot` is the
    /// config's section for `sot: true`; `outcome` the job's outcome for postprocessing. When
    /// `cancelled` becomes true (its run was cancelled), the process is stopped, as at a
    /// timeout: Python functions know nothing of cancels.
    #[allow(clippy::too_many_arguments)]
    pub fn call(
        &self,
        function: &str,
        kind: Kind,
        kwargs: &serde_json::Map<String, Value>,
        sot: &serde_json::Map<String, Value>,
        outcome: Option<Value>,
        deadline: Option<Instant>,
        cancelled: Option<&AtomicBool>,
    ) -> Result<Value, PluginError> {
        let mut interpreter = match self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            Some(interpreter) => interpreter,
            None => self.start(function, deadline)?,
        };
        let request = serde_json::json!({
            "name": function,
            "kind": kind.as_str(),
            "kwargs": kwargs,
            "sot": if sot.is_empty() { Value::Null } else { Value::Object(sot.clone()) },
            "outcome": outcome,
        });
        let line = format!("{request}\n");
        if let Err(e) = interpreter
            .stdin
            .write_all(line.as_bytes())
            .and_then(|()| interpreter.stdin.flush())
        {
            return Err(self.ended(&mut interpreter, function, kind, &format!("{e}")));
        }
        // While the function's on_startup runs, it has `startup_timeout` (within the call's
        // own limit); then the call's limit again.
        let mut until = deadline;
        let answer: Value = loop {
            let line = match wait_or_cancel(&interpreter.answers, until, cancelled) {
                Ok(line) => line,
                Err(Waited::Cancelled) => {
                    interpreter.kill();
                    return Err(self.failed(
                        function,
                        kind,
                        "the run was cancelled; its Python process was stopped (the next call starts a new one)".into(),
                        None,
                    ));
                }
                Err(Waited::Over(RecvTimeoutError::Timeout)) => {
                    // The call is over; so is its process (whatever it started goes with it).
                    interpreter.kill();
                    let message = if until == deadline {
                        "timed out; its Python process was stopped (the next call starts a new one)"
                            .to_string()
                    } else {
                        format!(
                            "{function}:on_startup did not return within {}s (worker.startup_timeout); its Python process was stopped",
                            self.startup_timeout.as_secs_f64()
                        )
                    };
                    return Err(self.failed(function, kind, message, None));
                }
                Err(Waited::Over(RecvTimeoutError::Disconnected)) => {
                    return Err(self.ended(&mut interpreter, function, kind, "no answer"));
                }
            };
            let value: Value = serde_json::from_str(&line).map_err(|e| {
                self.failed(
                    function,
                    kind,
                    format!("the Python process answered something unreadable: {e}"),
                    None,
                )
            })?;
            if value.get("starting").is_some() {
                let limit = Instant::now() + self.startup_timeout;
                until = Some(deadline.map_or(limit, |d| d.min(limit)));
            } else if value.get("started").is_some() {
                until = deadline;
            } else {
                break value;
            }
        };
        // Credentials its on_startup handed out are secrets from now on, as for Rust plugins.
        if let Some(Value::Object(values)) = answer.get("startup") {
            self.secrets.add_all(crate::config::secrets_in(values));
        }
        let functions = interpreter.functions.clone();
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(interpreter);
        }
        if let Some(value) = answer.get("ok") {
            let mut value = value.clone();
            if let Some(converted) = answer
                .get("converted")
                .and_then(Value::as_array)
                .filter(|c| !c.is_empty())
            {
                tracing::debug!(plugin = %self.plugin, function, converted = ?converted, "values JSON cannot hold were converted with str()");
                if let Value::Object(map) = &mut value {
                    map.insert("__converted__".into(), Value::Array(converted.clone()));
                }
            }
            return Ok(self.secrets.redact(value));
        }
        if answer.get("missing").is_some() {
            return Err(PluginError::NotProvided {
                plugin: self.plugin.clone(),
                function: function.to_string(),
                kind: kind.as_str(),
                path: self.path.clone(),
                provided: functions.join(", "),
            });
        }
        let error = answer.get("error").cloned().unwrap_or(Value::Null);
        let type_name = error.get("type").and_then(Value::as_str).unwrap_or("Error");
        let message = error.get("message").and_then(Value::as_str).unwrap_or("");
        let details = serde_json::json!({
            "type": type_name,
            "traceback": error.get("traceback").cloned().unwrap_or(Value::Null),
        });
        let failed = self.failed(
            function,
            kind,
            format!("{type_name}: {message}"),
            Some(self.secrets.redact(details)),
        );
        match (answer.get("startup"), failed) {
            // Its on_startup failed: said as for Rust plugins, and tried again next call.
            (Some(Value::Null), PluginError::Failed { error, .. }) => {
                Err(PluginError::StartupFailed {
                    plugin: self.plugin.clone(),
                    function: function.to_string(),
                    path: self.path.clone(),
                    error,
                })
            }
            (_, failed) => Err(failed),
        }
    }

    /// Starts a process and waits for its module to be imported.
    fn start(&self, function: &str, deadline: Option<Instant>) -> Result<Interpreter, PluginError> {
        use std::os::unix::process::CommandExt;
        let load_error = |message: String| PluginError::Load {
            plugin: self.plugin.clone(),
            function: function.to_string(),
            path: self.path.clone(),
            message,
        };
        let mut child = Command::new(&self.python)
            .arg("-u")
            .arg("-c")
            .arg(SHIM)
            .arg(&self.path)
            .envs(self.environment.iter().cloned())
            // Whatever the host's locale: requests and answers are UTF-8, and output that is
            // not cannot stop the log.
            .env("PYTHONIOENCODING", "utf-8:backslashreplace")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: stopping it stops whatever it started.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                load_error(format!(
                    "cannot start the Python interpreter {:?}: {e} (set `python:` in the plugin's config entry)",
                    self.python
                ))
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            // Not a group leader with children yet: the process alone goes.
            let _ = child.kill();
            let _ = child.wait();
            return Err(load_error("cannot talk to the Python process".into()));
        };
        let (sender, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(line) => {
                        if sender.send(line).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let plugin = self.plugin.clone();
        let secrets = self.secrets.clone();
        std::thread::spawn(move || {
            // Read to the end whatever arrives (bytes that are not UTF-8 too): a reader that
            // stopped would make the plugin's next print fail.
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim_end_matches(['\n', '\r']);
                        let text: String = text.chars().take(MAX_LOG_LINE).collect();
                        log_line(&plugin, &secrets.redact_text(&text));
                    }
                }
            }
        });
        let mut interpreter = Interpreter {
            child,
            stdin,
            answers,
            functions: Vec::new(),
            reaped: false,
        };
        let deadline = deadline.unwrap_or_else(|| Instant::now() + IMPORT_LIMIT);
        let ready = match wait(&interpreter.answers, Some(deadline)) {
            Ok(line) => serde_json::from_str::<Value>(&line).unwrap_or(Value::Null),
            Err(_) => {
                let status = interpreter.child.try_wait().ok().flatten();
                return Err(load_error(match status {
                    Some(status) => format!("the Python process ended while importing the module ({status}); see the log"),
                    None => "the Python process did not finish importing the module in time".into(),
                }));
            }
        };
        if let Some(fatal) = ready.get("fatal").and_then(Value::as_str) {
            let hint = if fatal.contains("ModuleNotFoundError") {
                format!(
                    " (the interpreter {:?} lacks a package the plugin imports: install it there, or set the plugin's `python:` to one that has it, e.g. a virtualenv's bin/python)",
                    self.python
                )
            } else {
                String::new()
            };
            return Err(load_error(format!(
                "{}{hint}",
                self.secrets.redact_text(fatal)
            )));
        }
        interpreter.functions = ready
            .get("ready")
            .and_then(Value::as_array)
            .map(|names| {
                names
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        tracing::info!(plugin = %self.plugin, path = %self.path.display(), functions = %interpreter.functions.join(", "), "Python plugin started");
        Ok(interpreter)
    }

    /// The process ended during a call: its exit status is the reason.
    fn ended(
        &self,
        interpreter: &mut Interpreter,
        function: &str,
        kind: Kind,
        what: &str,
    ) -> PluginError {
        // It closed its answers: it is ending or gone. Its group goes too, then its status.
        let status = match interpreter.child.try_wait() {
            Ok(Some(status)) => Some(status),
            _ => {
                std::thread::sleep(Duration::from_millis(50));
                interpreter.child.try_wait().ok().flatten()
            }
        };
        interpreter.kill();
        let status = status.map_or_else(|| "killed".to_string(), |s| s.to_string());
        self.failed(
            function,
            kind,
            format!("its Python process ended during the call ({status}; {what}); the next call starts a new one"),
            None,
        )
    }

    fn failed(
        &self,
        function: &str,
        kind: Kind,
        message: String,
        details: Option<Value>,
    ) -> PluginError {
        PluginError::Failed {
            plugin: self.plugin.clone(),
            function: function.to_string(),
            kind: kind.as_str(),
            path: self.path.clone(),
            error: Box::new(JobError {
                message: self.secrets.redact_text(&message),
                retryable: true,
                details,
            }),
        }
    }
}

/// Why no line came.
enum Waited {
    Over(RecvTimeoutError),
    Cancelled,
}

/// How often a call waiting for its answer looks at its run's cancellation flag.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// The next line, until `deadline` or until `cancelled` is set.
fn wait_or_cancel(
    answers: &Receiver<String>,
    deadline: Option<Instant>,
    cancelled: Option<&AtomicBool>,
) -> Result<String, Waited> {
    let Some(cancelled) = cancelled else {
        return wait(answers, deadline).map_err(Waited::Over);
    };
    loop {
        if cancelled.load(Ordering::SeqCst) {
            return Err(Waited::Cancelled);
        }
        let step = Instant::now() + CANCEL_POLL;
        let until = deadline.map_or(step, |d| d.min(step));
        match wait(answers, Some(until)) {
            Err(RecvTimeoutError::Timeout) if deadline.is_none_or(|d| Instant::now() < d) => {}
            other => return other.map_err(Waited::Over),
        }
    }
}

/// The next line, until `deadline`.
fn wait(answers: &Receiver<String>, deadline: Option<Instant>) -> Result<String, RecvTimeoutError> {
    match deadline {
        Some(deadline) => answers.recv_timeout(deadline.saturating_duration_since(Instant::now())),
        None => answers.recv().map_err(|_| RecvTimeoutError::Disconnected),
    }
}

/// A stderr line of a Python plugin into the log: logging records at their level, anything
/// else (print) at info, all under the target `plugin` like the native plugins' lines.
fn log_line(plugin: &str, line: &str) {
    let (level, message) = match line
        .strip_prefix('\u{1f}')
        .and_then(|l| l.split_once('\u{1f}'))
    {
        Some((level, message)) => (level, message),
        None => ("INFO", line),
    };
    match level {
        "CRITICAL" | "ERROR" => tracing::error!(target: "plugin", plugin, "{message}"),
        "WARNING" | "WARN" => tracing::warn!(target: "plugin", plugin, "{message}"),
        "DEBUG" => tracing::debug!(target: "plugin", plugin, "{message}"),
        "TRACE" => tracing::trace!(target: "plugin", plugin, "{message}"),
        _ => tracing::info!(target: "plugin", plugin, "{message}"),
    }
}

/// What the original's worker exported for veritas plugins (they decrypt device passwords
/// with it): a `.env` file in `dir` (every `KEY=VALUE`), or failing that `salt.yaml`'s
/// `crypto.encryptionkey`, `crypto.salt` and `crypto.iterations` as `ENCRYPTIONKEY`, `SALT`
/// and `ITERATIONS`.
pub fn plugin_environment(dir: &std::path::Path) -> Vec<(String, String)> {
    if let Ok(text) = std::fs::read_to_string(dir.join(".env")) {
        return text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let l = l.strip_prefix("export ").unwrap_or(l);
                let (key, value) = l.split_once('=')?;
                let value = value.trim();
                let value = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                    .unwrap_or(value);
                Some((key.trim().to_string(), value.to_string()))
            })
            .collect();
    }
    let Ok(text) = std::fs::read_to_string(dir.join("salt.yaml")) else {
        return Vec::new();
    };
    let Ok(yaml) = serde_yaml::from_str::<serde_yaml::Value>(&text) else {
        tracing::warn!(file = %dir.join("salt.yaml").display(), "salt.yaml is not valid YAML; Python plugins get no ENCRYPTIONKEY/SALT/ITERATIONS");
        return Vec::new();
    };
    let crypto = &yaml["crypto"];
    [
        ("ENCRYPTIONKEY", "encryptionkey"),
        ("SALT", "salt"),
        ("ITERATIONS", "iterations"),
    ]
    .into_iter()
    .filter_map(|(variable, key)| {
        let value = match &crypto[key] {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            _ => return None,
        };
        Some((variable.to_string(), value))
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_comes_from_dotenv_or_salt_yaml() {
        let dir = tempfile_dir();
        std::fs::write(
            dir.join("salt.yaml"),
            "crypto:\n  encryptionkey: k3y\n  salt: s4lt\n  iterations: 400000\n",
        )
        .unwrap();
        let mut env = plugin_environment(&dir);
        env.sort();
        assert_eq!(
            env,
            [
                ("ENCRYPTIONKEY".to_string(), "k3y".to_string()),
                ("ITERATIONS".to_string(), "400000".to_string()),
                ("SALT".to_string(), "s4lt".to_string())
            ]
        );
        std::fs::write(
            dir.join(".env"),
            "# comment\nexport ENCRYPTIONKEY=\"from env\"\nSALT='x'\n",
        )
        .unwrap();
        assert_eq!(
            plugin_environment(&dir),
            [
                ("ENCRYPTIONKEY".to_string(), "from env".to_string()),
                ("SALT".to_string(), "x".to_string())
            ]
        );
        std::fs::remove_dir_all(dir).ok();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("js-python-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
