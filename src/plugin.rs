//! The plugin host: finds, loads and calls plugin libraries (cdylibs built with the
//! `jobschleuder-plugin` SDK) across their versioned C ABI.
//!
//! - A function name resolves through the config: jobs through `plugins:`, preprocessing and
//!   postprocessing through `preprocessing:` and then `plugins:`.
//! - A library's ABI version is checked before any other call; a mismatch is refused naming both.
//! - Libraries are never unloaded (code and data they handed out stay valid for the process).
//! - `"<function>:on_startup"`, when the library has it, is called once before the function's
//!   first call; the object it returns is merged into every call's arguments, its values winning
//!   on equal keys (as in the original). A failed on_startup is tried again on the next call.
//! - `sot: true` in a call's arguments is replaced by the config's `sot:` section.
//! - Secrets never come back out: the config's (passwords, also inside URLs; the `sot:` token)
//!   and credentials on_startup hands out are masked in results, errors, panic messages and
//!   plugin log lines, whatever key holds them.
//! - Calls are blocking: run them on threads of their own (a worker's call threads,
//!   `tokio::task::spawn_blocking` elsewhere), never on the async runtime's. A panic in plugin code is caught (by the SDK, inside the library, where
//!   unwinding can be stopped) and becomes a failed call; the host guards its side as well.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use jobschleuder_plugin::abi;
pub use jobschleuder_plugin::{Args, Job as PlannedJob, JobError, Kind, Outcome};
use serde_json::Value;

use crate::config::{secrets_in, Config, PluginLocation};
use crate::python::PythonPlugin;

/// Why a plugin call did not produce a result. Every variant names the function, the plugin
/// and the library path tried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    #[error("no plugin provides {kind} {function:?}: add it to the `{section}:` section of the config ({origin})")]
    NotConfigured {
        kind: &'static str,
        function: String,
        section: &'static str,
        origin: String,
    },
    #[error("plugin {plugin:?} for {function:?}: cannot load {}: {message}", path.display())]
    Load {
        plugin: String,
        function: String,
        path: PathBuf,
        message: String,
    },
    #[error("plugin {plugin:?} for {function:?}: {} is not a jobschleuder plugin: symbol `{symbol}` is missing", path.display())]
    MissingSymbol {
        plugin: String,
        function: String,
        path: PathBuf,
        symbol: String,
    },
    #[error("plugin {plugin:?} for {function:?}: {} was built for plugin ABI version {found}, but this jobschleuder loads versions {} to {expected}: rebuild the plugin against the matching jobschleuder-plugin SDK", path.display(), abi::OLDEST_ABI_VERSION)]
    AbiMismatch {
        plugin: String,
        function: String,
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("plugin {plugin:?} ({}) does not provide {kind} {function:?}; it provides: {provided}", path.display())]
    NotProvided {
        plugin: String,
        function: String,
        kind: &'static str,
        path: PathBuf,
        provided: String,
    },
    #[error("{function}:on_startup of plugin {plugin:?} ({}) failed: {}", path.display(), error.message)]
    StartupFailed {
        plugin: String,
        function: String,
        path: PathBuf,
        error: Box<JobError>,
    },
    #[error("{kind} {function:?} of plugin {plugin:?} ({}) panicked: {message}", path.display())]
    Panicked {
        plugin: String,
        function: String,
        kind: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{kind} {function:?} failed: {}", error.message)]
    Failed {
        plugin: String,
        function: String,
        kind: &'static str,
        path: PathBuf,
        error: Box<JobError>,
    },
    #[error("{kind} {function:?} of plugin {plugin:?} ({}) returned something unusable: {message}", path.display())]
    BadOutput {
        plugin: String,
        function: String,
        kind: &'static str,
        path: PathBuf,
        message: String,
    },
}

impl PluginError {
    /// Whether trying the same call again later may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            PluginError::Failed { error, .. } | PluginError::StartupFailed { error, .. } => {
                error.retryable
            }
            // A library may be deployed meanwhile.
            PluginError::Load { .. } => true,
            _ => false,
        }
    }

    /// The error as postprocessing and `worker --exec` show it.
    pub fn job_error(&self) -> JobError {
        JobError {
            message: self.to_string(),
            retryable: self.retryable(),
            details: self.details().cloned(),
        }
    }

    /// What the plugin attached to its error (exit status, output), if anything.
    pub fn details(&self) -> Option<&Value> {
        match self {
            PluginError::Failed { error, .. } | PluginError::StartupFailed { error, .. } => {
                error.details.as_ref()
            }
            _ => None,
        }
    }
}

/// A loaded library. Never dropped: it lives as long as the process.
struct Library {
    plugin: String,
    path: PathBuf,
    /// Version 1's part of the descriptor, which every version has.
    descriptor: &'static abi::PluginDescriptorV1,
    /// Version 2 and later: the call that takes the run's cancellation flag.
    call_in_run: Option<abi::CallInRunFn>,
    functions: BTreeMap<String, Kind>,
}

// SAFETY: the descriptor points into a library that is never unloaded; its entry points are
// thread-safe by the ABI's contract (plugin functions are plain `fn`s over owned data).
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

/// Loads plugins on first use and calls them. Cheap to clone.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: BTreeMap<String, PluginLocation>,
    preprocessing: BTreeMap<String, PluginLocation>,
    sot: serde_json::Map<String, Value>,
    /// Replaced by `********` in whatever a plugin returns, so they never reach the run
    /// history, messages, output or logs. Shared with the log sinks of loaded libraries.
    secrets: Arc<Secrets>,
    origin: String,
    libraries: Mutex<HashMap<PathBuf, Arc<Library>>>,
    /// Per function: the state of its on_startup. One slot per function makes on_startup run
    /// once even when the first calls come in concurrently, and a hung on_startup holds up
    /// only the calls of its own function — for at most `startup_timeout`.
    startup: Mutex<HashMap<String, Arc<StartupSlot>>>,
    startup_timeout: Duration,
    /// Python plugins (`.py` modules of the original's kind), by file and interpreter.
    python: Mutex<HashMap<PythonKey, Arc<PythonPlugin>>>,
    /// What the original's worker exported to its plugins (`.env` or `salt.yaml`).
    python_environment: Vec<(String, String)>,
}

thread_local! {
    /// When the plugin call running on this thread must be over (see [`within`]).
    static CALL_DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The run the plugin calls on this thread belong to (see [`in_run`]).
    static CALL_RUN: std::cell::RefCell<Option<RunCall>> = const { std::cell::RefCell::new(None) };
}

/// The run a plugin call belongs to: what its function may read (`run` in its input, see the
/// SDK's `Run`) and the flag the worker sets when the run is cancelled.
#[derive(Debug, Clone)]
pub struct RunCall {
    pub context: Value,
    pub cancelled: Arc<std::sync::atomic::AtomicBool>,
}

/// Runs `call` — plugin calls on this thread — as part of `run`.
pub fn in_run<T>(run: Option<RunCall>, call: impl FnOnce() -> T) -> T {
    /// Clears the run however the call ends.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CALL_RUN.with(|r| r.borrow_mut().take());
        }
    }
    CALL_RUN.with(|r| *r.borrow_mut() = run);
    let _reset = Reset;
    call()
}

/// Runs `call` — plugin calls on this thread — within `limit`: waiting for an `on_startup` never
/// takes longer, and the `timeout` argument handed to the function is what is left of it.
pub fn within<T>(limit: Option<Duration>, call: impl FnOnce() -> T) -> T {
    /// Clears the deadline however the call ends.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CALL_DEADLINE.with(|d| d.set(None));
        }
    }
    CALL_DEADLINE.with(|d| d.set(limit.map(|limit| Instant::now() + limit)));
    let _reset = Reset;
    call()
}

/// A Python plugin's module file and its interpreter (`python:`), which together make a pool.
type PythonKey = (PathBuf, Option<String>);

/// Where a function's on_startup stands.
#[derive(Default)]
enum Startup {
    /// Not called yet, or its last call failed (the next call tries again).
    #[default]
    Idle,
    /// Running on a thread of its own; callers wait for it.
    Running,
    Ready(Args),
    /// The last call failed; the callers that waited for it get this error.
    Failed(PluginError),
}

#[derive(Default)]
struct StartupSlot {
    state: Mutex<Startup>,
    changed: Condvar,
}

impl PluginHost {
    pub fn new(config: &Config) -> PluginHost {
        let python_environment = config
            .path
            .as_ref()
            .and_then(|p| std::path::absolute(p).ok())
            .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
            .map(|dir| crate::python::plugin_environment(&dir))
            .unwrap_or_default();
        let secrets = Secrets::new(config.secret_values());
        // The key and salt that decrypt device passwords are secrets too (and whatever else
        // the file holds under a secret-looking name).
        secrets.add_all(
            python_environment
                .iter()
                .filter(|(k, _)| {
                    k == "ENCRYPTIONKEY" || k == "SALT" || crate::config::is_secret_key(k)
                })
                .map(|(_, v)| v.clone())
                .collect(),
        );
        PluginHost {
            inner: Arc::new(Inner {
                jobs: config.plugins.clone(),
                preprocessing: config.preprocessing.clone(),
                sot: config.sot.values.clone(),
                secrets: Arc::new(secrets),
                origin: config.origin(),
                libraries: Mutex::new(HashMap::new()),
                startup: Mutex::new(HashMap::new()),
                startup_timeout: config.worker.startup_timeout,
                python: Mutex::new(HashMap::new()),
                python_environment,
            }),
        }
    }

    /// Runs job `job` with `args`. Blocking.
    pub fn call_job(&self, job: &str, args: Args) -> Result<Value, PluginError> {
        if let Some(python) = self.python_for(job, Kind::Job)? {
            return self.call_python(&python, job, Kind::Job, &args, None);
        }
        let library = self.library_for(job, Kind::Job)?;
        let args = self.prepare(&library, job, args)?;
        self.invoke(
            &library,
            job,
            Kind::Job,
            &serde_json::json!({ "args": args }),
        )
    }

    /// Runs preprocessing `function` for job `job`: the jobs to run instead. A returned job
    /// without `cmd` is `job` itself. Blocking.
    pub fn call_preprocessing(
        &self,
        function: &str,
        job: &str,
        args: Args,
    ) -> Result<Vec<PlannedJob>, PluginError> {
        let asked_for_sot = args.get("sot") == Some(&Value::Bool(true));
        let (output, plugin, path) = match self.python_for(function, Kind::Preprocessing)? {
            Some(python) => {
                let output =
                    self.call_python(&python, function, Kind::Preprocessing, &args, None)?;
                (output, python.name().to_string(), python.path().clone())
            }
            None => {
                let library = self.library_for(function, Kind::Preprocessing)?;
                let args = self.prepare(&library, function, args)?;
                let output = self.invoke(
                    &library,
                    function,
                    Kind::Preprocessing,
                    &serde_json::json!({ "args": args }),
                )?;
                (output, library.plugin.clone(), library.path.clone())
            }
        };
        let mut jobs: Vec<PlannedJob> =
            serde_json::from_value(output).map_err(|e| PluginError::BadOutput {
                plugin,
                function: function.to_string(),
                kind: Kind::Preprocessing.as_str(),
                path,
                message: format!("expected a list of {{cmd, args}} jobs: {e}"),
            })?;
        for planned in &mut jobs {
            if planned.cmd.as_deref().is_none_or(str::is_empty) {
                planned.cmd = Some(job.to_string());
            }
            // Children that copied the source-of-truth section ask for it again instead of
            // carrying it (and its token) into the run history and the queue.
            if asked_for_sot && planned.args.get("sot").is_some_and(Value::is_object) {
                planned.args.insert("sot".into(), Value::Bool(true));
            }
        }
        Ok(jobs)
    }

    /// Runs postprocessing `function` with a job's arguments and outcome. Blocking.
    pub fn call_postprocessing(
        &self,
        function: &str,
        args: Args,
        outcome: &Outcome,
    ) -> Result<Value, PluginError> {
        if let Some(python) = self.python_for(function, Kind::Postprocessing)? {
            let outcome = serde_json::to_value(outcome).unwrap_or(Value::Null);
            return self.call_python(
                &python,
                function,
                Kind::Postprocessing,
                &args,
                Some(outcome),
            );
        }
        let library = self.library_for(function, Kind::Postprocessing)?;
        let args = self.prepare(&library, function, args)?;
        self.invoke(
            &library,
            function,
            Kind::Postprocessing,
            &serde_json::json!({ "args": args, "outcome": outcome }),
        )
    }

    /// Loads every configured library and checks that it provides what the config says, so a
    /// worker can report all plugin problems when it starts.
    pub fn check_all(&self) -> Vec<PluginError> {
        let mut problems = Vec::new();
        for (kind, names) in [
            (Kind::Job, &self.inner.jobs),
            (Kind::Preprocessing, &self.inner.preprocessing),
        ] {
            for (name, location) in names {
                // A Python plugin's process starts on first use; its file must be there.
                let checked = if location.is_python() {
                    match location.python_path().exists() {
                        true => Ok(()),
                        false => Err(PluginError::Load {
                            plugin: location.plugin.clone(),
                            function: name.clone(),
                            path: location.python_path(),
                            message: "no such file (is plugin_dir right?)".into(),
                        }),
                    }
                } else {
                    self.library_for(name, kind).map(|_| ())
                };
                if let Err(e) = checked {
                    problems.push(e);
                }
            }
        }
        problems
    }

    /// The configured location of `function`.
    fn location_for(&self, function: &str, kind: Kind) -> Result<&PluginLocation, PluginError> {
        match kind {
            Kind::Job => self.inner.jobs.get(function),
            _ => self
                .inner
                .preprocessing
                .get(function)
                .or_else(|| self.inner.jobs.get(function)),
        }
        .ok_or_else(|| PluginError::NotConfigured {
            kind: kind.as_str(),
            function: function.to_string(),
            section: if kind == Kind::Job {
                "plugins"
            } else {
                "preprocessing"
            },
            origin: self.inner.origin.clone(),
        })
    }

    /// The Python plugin of `function`, if a Python plugin provides it.
    fn python_for(
        &self,
        function: &str,
        kind: Kind,
    ) -> Result<Option<Arc<PythonPlugin>>, PluginError> {
        let location = self.location_for(function, kind)?;
        // A library loaded for this location is what its calls use: no look at the file
        // system on every call (a `stat` per run, a few percent of a worker's CPU).
        if location.runtime.is_none() && self.loaded(location) {
            return Ok(None);
        }
        if !location.is_python() {
            return Ok(None);
        }
        let path = location.python_path();
        let mut plugins = self.inner.python.lock().unwrap_or_else(|p| p.into_inner());
        let key = (path.clone(), location.python.clone());
        let plugin = plugins.entry(key).or_insert_with(|| {
            Arc::new(PythonPlugin::new(
                &location.plugin,
                path,
                location.python.as_deref(),
                self.inner.python_environment.clone(),
                self.inner.secrets.clone(),
                self.inner.startup_timeout,
            ))
        });
        Ok(Some(plugin.clone()))
    }

    /// A call of a Python plugin, within this thread's deadline (see [`within`]).
    fn call_python(
        &self,
        python: &PythonPlugin,
        function: &str,
        kind: Kind,
        args: &Args,
        outcome: Option<Value>,
    ) -> Result<Value, PluginError> {
        let deadline = CALL_DEADLINE.with(Cell::get);
        let cancelled = CALL_RUN.with(|r| r.borrow().as_ref().map(|run| run.cancelled.clone()));
        python.call(
            function,
            kind,
            args,
            &self.inner.sot,
            outcome,
            deadline,
            cancelled.as_deref(),
        )
    }

    fn library_for(&self, function: &str, kind: Kind) -> Result<Arc<Library>, PluginError> {
        let location = self.location_for(function, kind)?;
        let library = self.load(location, function)?;
        match library.functions.get(function) {
            Some(found) if *found == kind => Ok(library),
            // Postprocessing may name any function registered as postprocessing; the original
            // had one decorator for everything, so a job function is not accepted silently.
            _ => Err(PluginError::NotProvided {
                plugin: library.plugin.clone(),
                function: function.to_string(),
                kind: kind.as_str(),
                path: library.path.clone(),
                provided: describe_functions(&library.functions),
            }),
        }
    }

    /// Whether the library of `location` is loaded already.
    fn loaded(&self, location: &PluginLocation) -> bool {
        self.inner
            .libraries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&location.library_path())
    }

    fn load(&self, location: &PluginLocation, function: &str) -> Result<Arc<Library>, PluginError> {
        let path = location.library_path();
        let mut libraries = self
            .inner
            .libraries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(library) = libraries.get(&path) {
            return Ok(library.clone());
        }
        let library = Arc::new(open(
            &location.plugin,
            &path,
            function,
            self.inner.secrets.clone(),
        )?);
        tracing::info!(
            plugin = %library.plugin,
            path = %library.path.display(),
            functions = %describe_functions(&library.functions),
            "plugin loaded"
        );
        libraries.insert(path, library.clone());
        Ok(library)
    }

    /// The call's arguments: on_startup values merged in (they win), `sot: true` replaced.
    fn prepare(
        &self,
        library: &Arc<Library>,
        function: &str,
        mut args: Args,
    ) -> Result<Args, PluginError> {
        let startup_name = format!("{function}:on_startup");
        if library.functions.get(&startup_name) == Some(&Kind::OnStartup) {
            // A call never waits longer than its own time limit (the worker would count it as
            // hung otherwise), and what the wait took comes off the `timeout` it hands on.
            let deadline = CALL_DEADLINE.with(Cell::get);
            let own_limit = args
                .get("timeout")
                .and_then(Value::as_f64)
                .and_then(|t| Duration::try_from_secs_f64(t).ok());
            let wait = [
                Some(self.inner.startup_timeout),
                own_limit,
                deadline.map(|d| d.saturating_duration_since(Instant::now())),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.inner.startup_timeout);
            let values = self.startup_values(library, function, &startup_name, wait)?;
            for (key, value) in values {
                args.insert(key, value);
            }
            if let (Some(deadline), Some(own)) =
                (deadline, args.get("timeout").and_then(Value::as_f64))
            {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64()
                    .max(0.001);
                if left < own {
                    args.insert("timeout".into(), serde_json::json!(left));
                }
            }
        }
        if args.get("sot") == Some(&Value::Bool(true)) && !self.inner.sot.is_empty() {
            args.insert("sot".into(), Value::Object(self.inner.sot.clone()));
        }
        Ok(args)
    }

    /// The on_startup values of `function`: called once on a thread of its own, then kept. A
    /// caller waits for a running on_startup at most `wait`; a failed one is tried again by
    /// the next call.
    fn startup_values(
        &self,
        library: &Arc<Library>,
        function: &str,
        startup_name: &str,
        wait: Duration,
    ) -> Result<Args, PluginError> {
        let slot = {
            let mut startup = self.inner.startup.lock().unwrap_or_else(|p| p.into_inner());
            startup.entry(startup_name.to_string()).or_default().clone()
        };
        let deadline = Instant::now() + wait;
        let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
        // Whether this call started or waited for the current try: its failure is ours then;
        // a failure found on arrival is an earlier call's, and this call tries again.
        let mut involved = false;
        loop {
            match &*state {
                Startup::Ready(values) => return Ok(values.clone()),
                Startup::Failed(error) if involved => return Err(error.clone()),
                Startup::Idle | Startup::Failed(_) => {
                    *state = Startup::Running;
                    involved = true;
                    let host = self.clone();
                    let lib = library.clone();
                    let func = function.to_string();
                    let name = startup_name.to_string();
                    let shared = slot.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("on_startup {function}"))
                        .spawn(move || {
                            let outcome = host.run_startup(&lib, &func, &name);
                            let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
                            *state = match outcome {
                                Ok(values) => Startup::Ready(values),
                                Err(error) => Startup::Failed(error),
                            };
                            shared.changed.notify_all();
                        });
                    if let Err(e) = spawned {
                        *state = Startup::Idle;
                        return Err(self.startup_error(
                            library,
                            function,
                            format!("cannot start a thread for it: {e}"),
                        ));
                    }
                }
                Startup::Running => {
                    involved = true;
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(self.startup_error(
                            library,
                            function,
                            format!(
                                "it did not return within {}s (worker.startup_timeout, or the call's own timeout); calls of this function fail until it does",
                                wait.as_secs_f64()
                            ),
                        ));
                    }
                    state = slot
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Calls on_startup and checks what it returns.
    fn run_startup(
        &self,
        library: &Library,
        function: &str,
        startup_name: &str,
    ) -> Result<Args, PluginError> {
        // Not redacted: these values go to the plugin, not to a reader.
        let output = self
            .invoke_unredacted(
                library,
                startup_name,
                Kind::OnStartup,
                &serde_json::json!({}),
            )
            .map_err(|e| match e {
                PluginError::Failed { error, .. } => PluginError::StartupFailed {
                    plugin: library.plugin.clone(),
                    function: function.to_string(),
                    path: library.path.clone(),
                    error,
                },
                other => other,
            })?;
        match output {
            Value::Object(map) => {
                // Credentials it fetched are secrets from now on, like the `sot:` token.
                self.inner.secrets.add_all(secrets_in(&map));
                Ok(map)
            }
            other => Err(PluginError::BadOutput {
                plugin: library.plugin.clone(),
                function: startup_name.to_string(),
                kind: Kind::OnStartup.as_str(),
                path: library.path.clone(),
                message: format!(
                    "on_startup must return a JSON object, not {}",
                    self.inner.secrets.redact(other)
                ),
            }),
        }
    }

    fn startup_error(&self, library: &Library, function: &str, message: String) -> PluginError {
        PluginError::StartupFailed {
            plugin: library.plugin.clone(),
            function: function.to_string(),
            path: library.path.clone(),
            error: Box::new(JobError {
                message,
                retryable: true,
                details: None,
            }),
        }
    }

    /// Calls `function`; what it returns has every secret masked.
    fn invoke(
        &self,
        library: &Library,
        function: &str,
        kind: Kind,
        input: &Value,
    ) -> Result<Value, PluginError> {
        self.invoke_unredacted(library, function, kind, input)
            .map(|value| self.inner.secrets.redact(value))
    }

    /// Calls `function`; its errors have every secret masked, its output does not.
    fn invoke_unredacted(
        &self,
        library: &Library,
        function: &str,
        kind: Kind,
        input: &Value,
    ) -> Result<Value, PluginError> {
        let run = CALL_RUN.with(|r| r.borrow().clone());
        let input = match (&run, input) {
            (Some(run), Value::Object(fields)) => {
                let mut fields = fields.clone();
                fields.insert("run".into(), run.context.clone());
                serde_json::to_vec(&fields)
            }
            _ => serde_json::to_vec(input),
        }
        .unwrap_or_default();
        let descriptor = library.descriptor;
        let call_in_run = library.call_in_run;
        let called = catch_unwind(AssertUnwindSafe(|| {
            let mut buffer = abi::Buffer {
                ptr: std::ptr::null_mut(),
                len: 0,
                cap: 0,
            };
            // SAFETY: pointers and lengths describe live buffers for the duration of the call;
            // the library checked out at load (ABI version, descriptor).
            let status = match (call_in_run, &run) {
                (Some(call_in_run), Some(run)) => {
                    let handle = abi::RunHandle {
                        cancelled: run.cancelled.as_ptr().cast_const().cast::<u8>(),
                    };
                    // SAFETY: as above; `handle` and the flag it points to (held by `run`)
                    // outlive the call.
                    unsafe {
                        call_in_run(
                            function.as_ptr(),
                            function.len(),
                            input.as_ptr(),
                            input.len(),
                            &handle,
                            &mut buffer,
                        )
                    }
                }
                // SAFETY: as above.
                _ => unsafe {
                    (descriptor.call)(
                        function.as_ptr(),
                        function.len(),
                        input.as_ptr(),
                        input.len(),
                        &mut buffer,
                    )
                },
            };
            let bytes = if buffer.ptr.is_null() {
                Vec::new()
            } else {
                // SAFETY: the plugin filled `buffer` with `len` initialized bytes.
                unsafe { std::slice::from_raw_parts(buffer.ptr, buffer.len) }.to_vec()
            };
            // SAFETY: handing the buffer back to the side that allocated it, once.
            unsafe { (descriptor.free)(buffer) };
            (status, bytes)
        }));
        let panicked = |message: String| PluginError::Panicked {
            plugin: library.plugin.clone(),
            function: function.to_string(),
            kind: kind.as_str(),
            path: library.path.clone(),
            message,
        };
        let bad = |message: String| PluginError::BadOutput {
            plugin: library.plugin.clone(),
            function: function.to_string(),
            kind: kind.as_str(),
            path: library.path.clone(),
            message,
        };
        let (status, bytes) =
            called.map_err(|_| panicked("the host side of the call panicked".into()))?;
        match status {
            abi::STATUS_OK => {
                serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))
            }
            abi::STATUS_ERROR => {
                let mut error: JobError = serde_json::from_slice(&bytes)
                    .map_err(|e| bad(format!("an unreadable error: {e}")))?;
                error.message = self.inner.secrets.redact_text(&error.message);
                error.details = error.details.map(|d| self.inner.secrets.redact(d));
                Err(PluginError::Failed {
                    plugin: library.plugin.clone(),
                    function: function.to_string(),
                    kind: kind.as_str(),
                    path: library.path.clone(),
                    error: Box::new(error),
                })
            }
            abi::STATUS_PANIC => Err(panicked(
                self.inner
                    .secrets
                    .redact_text(&String::from_utf8_lossy(&bytes)),
            )),
            abi::STATUS_UNKNOWN_FUNCTION => Err(PluginError::NotProvided {
                plugin: library.plugin.clone(),
                function: function.to_string(),
                kind: kind.as_str(),
                path: library.path.clone(),
                provided: describe_functions(&library.functions),
            }),
            other => Err(bad(format!("unknown status {other}"))),
        }
    }
}

/// Well-known default passwords: public already, and masking every "guest" in plugin output
/// would garble it without hiding anything.
const PUBLIC_DEFAULTS: [&str; 2] = ["guest", "postgres"];

/// Values shorter than this are not masked: they would match inside ordinary words and numbers,
/// and hiding them there says little about the secret anyway.
const MIN_SECRET_LEN: usize = 4;

/// The values to mask in whatever comes back from plugins. It grows when an on_startup
/// function hands out credentials.
pub(crate) struct Secrets {
    /// Longest first, so that a secret containing another is masked whole.
    values: RwLock<Vec<String>>,
}

impl Secrets {
    pub(crate) fn new(values: Vec<String>) -> Secrets {
        let secrets = Secrets {
            values: RwLock::new(Vec::new()),
        };
        secrets.add_all(values);
        secrets
    }

    pub(crate) fn add_all(&self, values: Vec<String>) {
        let mut known = self.values.write().unwrap_or_else(|p| p.into_inner());
        for value in values {
            if value.chars().count() >= MIN_SECRET_LEN
                && !PUBLIC_DEFAULTS.contains(&value.as_str())
                && !known.contains(&value)
            {
                known.push(value);
            }
        }
        known.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }

    pub(crate) fn redact_text(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in self.values.read().unwrap_or_else(|p| p.into_inner()).iter() {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "********");
            }
        }
        text
    }

    /// `value` with every secret replaced by `********`, in keys as well as values.
    pub(crate) fn redact(&self, value: Value) -> Value {
        match value {
            Value::String(s) => Value::String(self.redact_text(&s)),
            Value::Array(items) => {
                Value::Array(items.into_iter().map(|v| self.redact(v)).collect())
            }
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| (self.redact_text(&k), self.redact(v)))
                    .collect(),
            ),
            other => other,
        }
    }
}

fn describe_functions(functions: &BTreeMap<String, Kind>) -> String {
    if functions.is_empty() {
        return "nothing".into();
    }
    functions
        .iter()
        .map(|(name, kind)| format!("{name} ({})", kind.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn open(
    plugin: &str,
    path: &std::path::Path,
    function: &str,
    secrets: Arc<Secrets>,
) -> Result<Library, PluginError> {
    let load_error = |message: String| PluginError::Load {
        plugin: plugin.to_string(),
        function: function.to_string(),
        path: path.to_path_buf(),
        message,
    };
    if !path.exists() {
        return Err(load_error(
            "no such file (is plugin_dir right, and the plugin built?)".into(),
        ));
    }
    // SAFETY: loading runs the library's initializers; plugins are code the operator chose to
    // run, as configured.
    let library =
        unsafe { libloading::Library::new(path) }.map_err(|e| load_error(e.to_string()))?;
    // Never unloaded: everything it hands out stays valid.
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    let missing = |symbol: &[u8]| PluginError::MissingSymbol {
        plugin: plugin.to_string(),
        function: function.to_string(),
        path: path.to_path_buf(),
        symbol: String::from_utf8_lossy(symbol).into_owned(),
    };
    // SAFETY: the symbol's type is fixed by the ABI, version 1 and later alike.
    let version: libloading::Symbol<unsafe extern "C" fn() -> u32> =
        unsafe { library.get(abi::VERSION_SYMBOL) }.map_err(|_| missing(abi::VERSION_SYMBOL))?;
    // SAFETY: as above.
    let found = unsafe { version() };
    if !(abi::OLDEST_ABI_VERSION..=abi::ABI_VERSION).contains(&found) {
        return Err(PluginError::AbiMismatch {
            plugin: plugin.to_string(),
            function: function.to_string(),
            path: path.to_path_buf(),
            found,
            expected: abi::ABI_VERSION,
        });
    }
    // SAFETY: every supported version's descriptor begins with version 1's.
    let descriptor: libloading::Symbol<unsafe extern "C" fn() -> *const abi::PluginDescriptorV1> =
        unsafe { library.get(abi::DESCRIPTOR_SYMBOL) }
            .map_err(|_| missing(abi::DESCRIPTOR_SYMBOL))?;
    // SAFETY: as above; the descriptor is static data of a library that is never unloaded.
    let descriptor_ptr = unsafe { descriptor() };
    // SAFETY: as above.
    let descriptor: &'static abi::PluginDescriptorV1 = match unsafe { descriptor_ptr.as_ref() } {
        Some(d) => d,
        None => return Err(load_error("the plugin descriptor is null".into())),
    };
    if descriptor.abi_version != found {
        return Err(PluginError::AbiMismatch {
            plugin: plugin.to_string(),
            function: function.to_string(),
            path: path.to_path_buf(),
            found: descriptor.abi_version,
            expected: abi::ABI_VERSION,
        });
    }
    let call_in_run = (found >= 2).then(|| {
        // SAFETY: a version 2 plugin's descriptor has version 2's layout.
        unsafe { &*descriptor_ptr.cast::<abi::PluginDescriptor>() }.call_in_run
    });
    let mut functions = BTreeMap::new();
    for i in 0..descriptor.function_count {
        // SAFETY: `functions` points to `function_count` entries with valid UTF-8 names.
        let entry = unsafe { &*descriptor.functions.add(i) };
        let name = String::from_utf8_lossy(unsafe {
            std::slice::from_raw_parts(entry.name, entry.name_len)
        })
        .into_owned();
        let Some(kind) = Kind::from_u32(entry.kind) else {
            return Err(load_error(format!(
                "function {name:?} has an unknown kind {}",
                entry.kind
            )));
        };
        if functions.insert(name.clone(), kind).is_some() {
            return Err(load_error(format!("function {name:?} is registered twice")));
        }
    }
    let context: &'static LogContext = Box::leak(Box::new(LogContext {
        plugin: plugin.to_string(),
        secrets,
    }));
    // SAFETY: `host_log` and the leaked context live for the whole process.
    unsafe {
        (descriptor.set_logger)(
            host_log,
            context as *const LogContext as *const c_void,
            max_plugin_level(),
        )
    };
    Ok(Library {
        plugin: plugin.to_string(),
        path: path.to_path_buf(),
        descriptor,
        call_in_run,
        functions,
    })
}

/// The most verbose level the log filter lets through for plugin code.
fn max_plugin_level() -> u32 {
    use tracing::Level;
    if tracing::enabled!(target: "plugin", Level::TRACE) {
        abi::LEVEL_TRACE
    } else if tracing::enabled!(target: "plugin", Level::DEBUG) {
        abi::LEVEL_DEBUG
    } else {
        abi::LEVEL_INFO
    }
}

/// What the log sink knows of the plugin that logs: its name, and the secrets to hide.
struct LogContext {
    plugin: String,
    secrets: Arc<Secrets>,
}

/// Where plugin log lines arrive: target `plugin`, with the plugin's name; every known secret
/// is replaced by `********`.
unsafe extern "C" fn host_log(context: *const c_void, level: u32, message: *const u8, len: usize) {
    let _ = catch_unwind(|| {
        // SAFETY: `context` is the leaked LogContext given in `set_logger`; the message
        // pointer and length describe the plugin's buffer for this call.
        let context = unsafe { &*(context as *const LogContext) };
        let plugin = &context.plugin;
        let text = context
            .secrets
            .redact_text(&String::from_utf8_lossy(unsafe {
                std::slice::from_raw_parts(message, len)
            }));
        match level {
            abi::LEVEL_ERROR => tracing::error!(target: "plugin", plugin = %plugin, "{text}"),
            abi::LEVEL_WARN => tracing::warn!(target: "plugin", plugin = %plugin, "{text}"),
            abi::LEVEL_INFO => tracing::info!(target: "plugin", plugin = %plugin, "{text}"),
            abi::LEVEL_DEBUG => tracing::debug!(target: "plugin", plugin = %plugin, "{text}"),
            _ => tracing::trace!(target: "plugin", plugin = %plugin, "{text}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_whole_and_short_or_public_values_are_not() {
        let secrets = Secrets::new(vec![
            "abcd".into(),
            "abcdefgh".into(),
            "abc".into(),
            "guest".into(),
        ]);
        assert_eq!(
            secrets.redact_text("x abcdefgh y abcd abc guest"),
            "x ******** y ******** abc guest"
        );
        secrets.add_all(vec!["later-token".into()]);
        assert_eq!(
            secrets.redact(serde_json::json!({"later-token": ["later-token", 5]})),
            serde_json::json!({"********": ["********", 5]})
        );
    }
}
