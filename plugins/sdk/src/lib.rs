//! Write jobschleuder plugins.
//!
//! A plugin is a `cdylib` crate that depends on this one and marks its functions, as the
//! original's `@jobschleuder("name")` decorator did:
//!
//! ```ignore
//! use jobschleuder_plugin::{jobschleuder, Args, JobError, Value};
//!
//! #[jobschleuder("hello_world")]
//! fn hello_world(args: Args) -> Result<Value, JobError> {
//!     jobschleuder_plugin::info!("hello {:?}", args.get("hello"));
//!     Ok(Value::Object(args))
//! }
//!
//! // Called once, before the first call of `hello_world`; the object it returns is merged into
//! // every call's arguments. On equal keys the startup value wins, as in the original.
//! #[jobschleuder("hello_world:on_startup")]
//! fn init() -> Result<Args, JobError> {
//!     Ok(Args::new())
//! }
//! ```
//!
//! Kinds: a job (the default) returns any serializable value; `preprocessing` returns the jobs
//! to run instead (`Vec<Job>`: fan-out, e.g. one backup per device); `postprocessing` gets the
//! job's arguments and its [`Outcome`]; `"<job>:on_startup"` returns an object of arguments.
//! An error says whether trying again makes sense ([`JobError::retryable`]).
//!
//! A function may read the run it belongs to with [`current_run`] (id, job, trigger, slot,
//! attempt, worker, parent) and ask [`cancelled`] now and then during long work, to stop early
//! when an operator cancels the run.
//!
//! A panic in a plugin function is caught at the boundary and becomes a failed call carrying the
//! panic message; build plugins with the default `panic = "unwind"` for that to work.
//!
//! # The boundary
//! Only C types cross it: the library exports `jobschleuder_abi_version()` and
//! `jobschleuder_plugin_descriptor()`; data is JSON bytes; memory is freed by the side that
//! allocated it (the host hands every output buffer back to the plugin's `free`). So a plugin
//! built by another compiler version still loads. Version 2 of the ABI added `call_in_run` (the
//! run's cancellation flag); hosts still load version 1 plugins, and refuse any other version.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

pub use jobschleuder_plugin_macros::jobschleuder;
pub use serde_json::{self, json, Map, Value};

/// A call's arguments: a JSON object.
pub type Args = Map<String, Value>;

/// A job to run, as returned by a preprocessing function: `{"cmd": ..., "args": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The job to run; `None` means the job that was preprocessed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(default)]
    pub args: Args,
}

impl Job {
    pub fn new(cmd: impl Into<String>, args: Args) -> Job {
        Job {
            cmd: Some(cmd.into()),
            args,
        }
    }

    /// The preprocessed job itself, with these arguments.
    pub fn same(args: Args) -> Job {
        Job { cmd: None, args }
    }
}

/// What a job did, as handed to postprocessing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<JobError>,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }
}

/// Why a call failed, and whether trying again makes sense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub message: String,
    /// `true`: a transient failure (a host unreachable, a timeout); the scheduler may retry.
    #[serde(default)]
    pub retryable: bool,
    /// Anything worth keeping with the failed run (exit status, output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl JobError {
    /// A failure that will fail again: bad arguments, a missing file.
    pub fn fatal(message: impl Into<String>) -> JobError {
        JobError {
            message: message.into(),
            retryable: false,
            details: None,
        }
    }

    /// A failure that may pass on another try.
    pub fn retryable(message: impl Into<String>) -> JobError {
        JobError {
            message: message.into(),
            retryable: true,
            details: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> JobError {
        self.details = Some(details);
        self
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobError {}

impl From<String> for JobError {
    fn from(message: String) -> Self {
        JobError::fatal(message)
    }
}

impl From<&str> for JobError {
    fn from(message: &str) -> Self {
        JobError::fatal(message)
    }
}

impl From<std::io::Error> for JobError {
    /// I/O errors are often transient (a host unreachable, a disk full for a moment).
    fn from(error: std::io::Error) -> Self {
        JobError::retryable(error.to_string())
    }
}

impl From<serde_json::Error> for JobError {
    fn from(error: serde_json::Error) -> Self {
        JobError::fatal(error.to_string())
    }
}

/// The kind of a registered function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    Job = 1,
    Preprocessing = 2,
    Postprocessing = 3,
    OnStartup = 4,
}

impl Kind {
    pub fn from_u32(value: u32) -> Option<Kind> {
        match value {
            1 => Some(Kind::Job),
            2 => Some(Kind::Preprocessing),
            3 => Some(Kind::Postprocessing),
            4 => Some(Kind::OnStartup),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Job => "job",
            Kind::Preprocessing => "preprocessing",
            Kind::Postprocessing => "postprocessing",
            Kind::OnStartup => "on_startup",
        }
    }
}

/// The C ABI shared by host and plugins. Change anything here and [`abi::ABI_VERSION`] goes up.
pub mod abi {
    use std::ffi::c_void;

    /// The version of this boundary. Version 2 added [`PluginDescriptor::call_in_run`] (the
    /// run's cancellation flag); a host loads plugins of versions [`OLDEST_ABI_VERSION`] to
    /// this one, and refuses any other.
    pub const ABI_VERSION: u32 = 2;
    /// The oldest version a host still loads: version 1 plugins run unchanged; they get the
    /// run's context in their input (which they ignore) but no cancellation flag.
    pub const OLDEST_ABI_VERSION: u32 = 1;

    /// Symbol: `extern "C" fn() -> u32`, the plugin's ABI version. Read before anything else.
    pub const VERSION_SYMBOL: &[u8] = b"jobschleuder_abi_version";
    /// Symbol: `extern "C" fn() -> *const PluginDescriptor`.
    pub const DESCRIPTOR_SYMBOL: &[u8] = b"jobschleuder_plugin_descriptor";

    /// Call statuses.
    pub const STATUS_OK: i32 = 0;
    /// The output is a JSON `JobError`.
    pub const STATUS_ERROR: i32 = 1;
    /// The function panicked; the output is the panic message (UTF-8).
    pub const STATUS_PANIC: i32 = 2;
    /// No function of that name; the output is a message.
    pub const STATUS_UNKNOWN_FUNCTION: i32 = 3;

    /// Log levels for [`LogFn`].
    pub const LEVEL_ERROR: u32 = 1;
    pub const LEVEL_WARN: u32 = 2;
    pub const LEVEL_INFO: u32 = 3;
    pub const LEVEL_DEBUG: u32 = 4;
    pub const LEVEL_TRACE: u32 = 5;

    /// Bytes allocated by the plugin; handed back to its `free`.
    #[repr(C)]
    pub struct Buffer {
        pub ptr: *mut u8,
        pub len: usize,
        pub cap: usize,
    }

    #[repr(C)]
    pub struct FunctionEntry {
        pub name: *const u8,
        pub name_len: usize,
        /// A [`crate::Kind`] as `u32`.
        pub kind: u32,
    }

    /// The host's log sink: `(context, level, message, message_len)`.
    pub type LogFn = unsafe extern "C" fn(*const c_void, u32, *const u8, usize);

    /// The run a call belongs to, as far as it is not JSON: its cancellation flag.
    #[repr(C)]
    pub struct RunHandle {
        /// A `bool` (one byte, 0 or 1) the host sets when the run is cancelled; it stays
        /// valid for the call and is read atomically (it is an `AtomicBool`).
        pub cancelled: *const u8,
    }

    /// A call with the run it belongs to: `(name, name_len, input, input_len, run, output)
    /// -> status`; `run` may be null.
    pub type CallInRunFn = unsafe extern "C" fn(
        *const u8,
        usize,
        *const u8,
        usize,
        *const RunHandle,
        *mut Buffer,
    ) -> i32;

    /// Version 1's descriptor, which version 2's begins with: a host reads the common part of
    /// every plugin's descriptor as this.
    #[repr(C)]
    pub struct PluginDescriptorV1 {
        pub abi_version: u32,
        /// The SDK's version, for messages.
        pub sdk_version: *const u8,
        pub sdk_version_len: usize,
        pub functions: *const FunctionEntry,
        pub function_count: usize,
        /// `(name, name_len, input, input_len, output) -> status`; input is JSON.
        pub call: unsafe extern "C" fn(*const u8, usize, *const u8, usize, *mut Buffer) -> i32,
        pub free: unsafe extern "C" fn(Buffer),
        /// `(log, context, max_level)`: where the plugin's log lines go, and the most verbose
        /// level the host wants.
        pub set_logger: unsafe extern "C" fn(LogFn, *const c_void, u32),
    }

    /// Version 2's descriptor: version 1's, then `call_in_run`.
    #[repr(C)]
    pub struct PluginDescriptor {
        pub v1: PluginDescriptorV1,
        /// `call`, with the run the call belongs to.
        pub call_in_run: CallInRunFn,
    }
}

/// The run a call belongs to: what a job function may read of it (see [`current_run`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The run's id (a UUID).
    pub id: String,
    /// The job's name (the job file's `id`).
    pub job: String,
    /// `schedule`, `manual`, `webhook`, `chain` or `backfill`.
    pub trigger: String,
    /// The slot it was scheduled for (RFC 3339 in the job's zone); for runs without a slot,
    /// when it was created.
    #[serde(default)]
    pub scheduled_for: Option<String>,
    /// Counts from 1.
    pub attempt: u32,
    /// The worker running it.
    #[serde(default)]
    pub worker: Option<String>,
    /// The run that fanned it out or whose end chained it.
    #[serde(default)]
    pub parent: Option<String>,
}

mod current {
    use std::cell::{Cell, RefCell};
    use std::sync::atomic::{AtomicBool, Ordering};

    thread_local! {
        pub(crate) static RUN: RefCell<Option<super::Run>> = const { RefCell::new(None) };
        pub(crate) static CANCELLED: Cell<*const AtomicBool> = const { Cell::new(std::ptr::null()) };
    }

    pub(crate) fn cancelled() -> bool {
        CANCELLED.with(|flag| {
            let flag = flag.get();
            // SAFETY: the host keeps the flag alive for the whole call, and it is cleared
            // (set to null) before the call returns.
            !flag.is_null() && unsafe { &*flag }.load(Ordering::Acquire)
        })
    }

    /// Clears what the call set, however it ends.
    pub(crate) struct Reset;

    impl Drop for Reset {
        fn drop(&mut self) {
            RUN.with(|run| run.borrow_mut().take());
            CANCELLED.with(|flag| flag.set(std::ptr::null()));
        }
    }
}

/// The run the current call belongs to, inside a plugin function (on the thread the host
/// called it on); `None` outside a run (`worker --exec`, `on_startup`) or on other threads.
pub fn current_run() -> Option<Run> {
    current::RUN.with(|run| run.borrow().clone())
}

/// Whether the run of the current call was cancelled (`runs --cancel`, or replaced by a newer
/// run): a long job may check it now and then and stop early. Always `false` outside a run and
/// on other threads; a function that ignores it runs to its end, and its run is recorded
/// cancelled all the same.
pub fn cancelled() -> bool {
    current::cancelled()
}

/// Logging from plugin code into the host's log (target `plugin`; `--debug-veritas` shows debug).
pub mod log {
    use super::*;

    pub(crate) struct Logger {
        pub(crate) log: abi::LogFn,
        pub(crate) context: usize,
        pub(crate) max_level: u32,
    }

    pub(crate) static LOGGER: OnceLock<Logger> = OnceLock::new();

    /// Whether the host wants lines of this level (`abi::LEVEL_*`).
    pub fn enabled(level: u32) -> bool {
        LOGGER.get().is_some_and(|l| level <= l.max_level)
    }

    /// Writes one line at `level` (`abi::LEVEL_*`). Without a host (unit tests) it goes nowhere.
    pub fn write(level: u32, message: &str) {
        if let Some(logger) = LOGGER.get() {
            if level <= logger.max_level {
                // SAFETY: the host gave us this function and context and keeps them alive for
                // as long as the library is loaded (it is never unloaded).
                unsafe {
                    (logger.log)(
                        logger.context as *const c_void,
                        level,
                        message.as_ptr(),
                        message.len(),
                    )
                }
            }
        }
    }
}

#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log::write($crate::abi::LEVEL_ERROR, &format!($($arg)*)) } }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log::write($crate::abi::LEVEL_WARN, &format!($($arg)*)) } }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log::write($crate::abi::LEVEL_INFO, &format!($($arg)*)) } }
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::enabled($crate::abi::LEVEL_DEBUG) {
            $crate::log::write($crate::abi::LEVEL_DEBUG, &format!($($arg)*))
        }
    }
}
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::log::enabled($crate::abi::LEVEL_TRACE) {
            $crate::log::write($crate::abi::LEVEL_TRACE, &format!($($arg)*))
        }
    }
}

/// Used by the `#[jobschleuder]` attribute; not part of the API.
#[doc(hidden)]
pub mod __private {
    use super::*;
    pub use inventory;

    /// Output bytes, or a JSON `JobError`.
    pub type CallResult = Result<Vec<u8>, Vec<u8>>;

    pub struct Registration {
        pub name: &'static str,
        pub kind: Kind,
        pub call: fn(&[u8]) -> CallResult,
    }

    inventory::collect!(Registration);

    #[derive(Deserialize)]
    struct Input {
        #[serde(default)]
        args: Args,
        #[serde(default)]
        outcome: Outcome,
        #[serde(default)]
        run: Option<Run>,
    }

    fn input(bytes: &[u8]) -> Result<Input, Vec<u8>> {
        let mut input: Input = serde_json::from_slice(bytes).map_err(|e| {
            error_bytes(JobError::fatal(format!(
                "the host sent unreadable input: {e}"
            )))
        })?;
        let run = input.run.take();
        super::current::RUN.with(|current| *current.borrow_mut() = run);
        Ok(input)
    }

    fn error_bytes(error: JobError) -> Vec<u8> {
        serde_json::to_vec(&error)
            .unwrap_or_else(|_| br#"{"message":"unserializable error"}"#.to_vec())
    }

    fn output<T: Serialize>(value: &T) -> CallResult {
        serde_json::to_vec(value).map_err(|e| {
            error_bytes(JobError::fatal(format!(
                "the result is not serializable: {e}"
            )))
        })
    }

    pub fn call_job<F, T, E>(f: F, bytes: &[u8]) -> CallResult
    where
        F: Fn(Args) -> Result<T, E>,
        T: Serialize,
        E: Into<JobError>,
    {
        let input = input(bytes)?;
        match f(input.args) {
            Ok(value) => output(&value),
            Err(e) => Err(error_bytes(e.into())),
        }
    }

    pub fn call_preprocessing<F, E>(f: F, bytes: &[u8]) -> CallResult
    where
        F: Fn(Args) -> Result<Vec<Job>, E>,
        E: Into<JobError>,
    {
        let input = input(bytes)?;
        match f(input.args) {
            Ok(jobs) => output(&jobs),
            Err(e) => Err(error_bytes(e.into())),
        }
    }

    pub fn call_postprocessing<F, T, E>(f: F, bytes: &[u8]) -> CallResult
    where
        F: Fn(Args, Outcome) -> Result<T, E>,
        T: Serialize,
        E: Into<JobError>,
    {
        let input = input(bytes)?;
        match f(input.args, input.outcome) {
            Ok(value) => output(&value),
            Err(e) => Err(error_bytes(e.into())),
        }
    }

    pub fn call_on_startup<F, E>(f: F, _bytes: &[u8]) -> CallResult
    where
        F: Fn() -> Result<Args, E>,
        E: Into<JobError>,
    {
        match f() {
            Ok(args) => output(&args),
            Err(e) => Err(error_bytes(e.into())),
        }
    }
}

// ---- the exported boundary ----

struct Descriptor {
    descriptor: abi::PluginDescriptor,
    _functions: Vec<abi::FunctionEntry>,
}

// SAFETY: the descriptor's pointers refer to 'static data (names from registrations, the
// functions vector owned alongside) that is never mutated after construction.
unsafe impl Send for Descriptor {}
unsafe impl Sync for Descriptor {}

static DESCRIPTOR: OnceLock<Descriptor> = OnceLock::new();
const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

fn descriptor() -> &'static Descriptor {
    DESCRIPTOR.get_or_init(|| {
        let functions: Vec<abi::FunctionEntry> = inventory::iter::<__private::Registration>
            .into_iter()
            .map(|r| abi::FunctionEntry {
                name: r.name.as_ptr(),
                name_len: r.name.len(),
                kind: r.kind as u32,
            })
            .collect();
        Descriptor {
            descriptor: abi::PluginDescriptor {
                v1: abi::PluginDescriptorV1 {
                    abi_version: abi::ABI_VERSION,
                    sdk_version: SDK_VERSION.as_ptr(),
                    sdk_version_len: SDK_VERSION.len(),
                    functions: functions.as_ptr(),
                    function_count: functions.len(),
                    call: boundary_call,
                    free: boundary_free,
                    set_logger: boundary_set_logger,
                },
                call_in_run: boundary_call_in_run,
            },
            _functions: functions,
        }
    })
}

/// The plugin's ABI version; the host reads it before any other symbol.
#[no_mangle]
pub extern "C" fn jobschleuder_abi_version() -> u32 {
    abi::ABI_VERSION
}

/// The plugin's functions and entry points.
#[no_mangle]
pub extern "C" fn jobschleuder_plugin_descriptor() -> *const abi::PluginDescriptor {
    &descriptor().descriptor
}

fn into_buffer(mut bytes: Vec<u8>) -> abi::Buffer {
    let buffer = abi::Buffer {
        ptr: bytes.as_mut_ptr(),
        len: bytes.len(),
        cap: bytes.capacity(),
    };
    std::mem::forget(bytes);
    buffer
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// # Safety
/// `name` and `input` must point to `name_len` and `input_len` readable bytes, and `output` to
/// a writable `Buffer`, for the duration of the call.
unsafe extern "C" fn boundary_call(
    name: *const u8,
    name_len: usize,
    input: *const u8,
    input_len: usize,
    output: *mut abi::Buffer,
) -> i32 {
    // The run's context is set from the input during the call, and cleared after it.
    let _reset = current::Reset;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: guaranteed by the caller, see above.
        let name = unsafe { std::slice::from_raw_parts(name, name_len) };
        let input = if input_len == 0 {
            &[][..]
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(input, input_len) }
        };
        let name = String::from_utf8_lossy(name);
        match inventory::iter::<__private::Registration>
            .into_iter()
            .find(|r| r.name == name)
        {
            Some(registration) => match (registration.call)(input) {
                Ok(bytes) => (abi::STATUS_OK, bytes),
                Err(bytes) => (abi::STATUS_ERROR, bytes),
            },
            None => (
                abi::STATUS_UNKNOWN_FUNCTION,
                format!("this plugin has no function {name:?}").into_bytes(),
            ),
        }
    }));
    let (status, bytes) = match outcome {
        Ok(result) => result,
        Err(payload) => (
            abi::STATUS_PANIC,
            panic_message(payload.as_ref()).into_bytes(),
        ),
    };
    // SAFETY: guaranteed by the caller.
    unsafe { output.write(into_buffer(bytes)) };
    status
}

/// # Safety
/// As [`boundary_call`]; `run` is null or points to a `RunHandle` whose flag stays valid for
/// the duration of the call.
unsafe extern "C" fn boundary_call_in_run(
    name: *const u8,
    name_len: usize,
    input: *const u8,
    input_len: usize,
    run: *const abi::RunHandle,
    output: *mut abi::Buffer,
) -> i32 {
    // SAFETY: guaranteed by the caller.
    let flag = unsafe { run.as_ref() }
        .map(|run| run.cancelled.cast::<std::sync::atomic::AtomicBool>())
        .unwrap_or(std::ptr::null());
    current::CANCELLED.with(|cancelled| cancelled.set(flag));
    let _reset = current::Reset;
    // SAFETY: guaranteed by the caller.
    unsafe { boundary_call(name, name_len, input, input_len, output) }
}

/// # Safety
/// `buffer` must be one returned by `boundary_call` of this library, freed once.
unsafe extern "C" fn boundary_free(buffer: abi::Buffer) {
    if !buffer.ptr.is_null() {
        // SAFETY: the buffer came from `into_buffer` in this library.
        drop(unsafe { Vec::from_raw_parts(buffer.ptr, buffer.len, buffer.cap) });
    }
}

unsafe extern "C" fn boundary_set_logger(log: abi::LogFn, context: *const c_void, max_level: u32) {
    let _ = log::LOGGER.set(log::Logger {
        log,
        context: context as usize,
        max_level,
    });
    // This library has its own copy of std, and so its own panic hook: route the panic's
    // message and place into the host's log instead of raw stderr. The call still fails with
    // the message (caught in `boundary_call`).
    std::panic::set_hook(Box::new(|info| {
        log::write(abi::LEVEL_ERROR, &format!("plugin code panicked: {info}"));
    }));
}
