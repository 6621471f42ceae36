//! Configuration: one YAML file (a file written for the original loads unchanged), overlaid by
//! environment variables. Secrets live in [`Secret`], which never prints.
//!
//! Lookup without `--config`: `./jobschleuder.yaml`, `$XDG_CONFIG_HOME/jobschleuder/config.yaml`
//! (`~/.config/...`), `/etc/jobschleuder/config.yaml`; no file at all means the local defaults.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use serde::Deserialize;

pub mod listener;

pub use listener::ListenerConfig;

/// Environment variables that override the file.
pub const ENV_DATABASE_URL: &str = "JOBSCHLEUDER_DATABASE_URL";
pub const ENV_DATABASE_PASSWORD: &str = "JOBSCHLEUDER_DATABASE_PASSWORD";
pub const ENV_AMQP_URL: &str = "JOBSCHLEUDER_AMQP_URL";
pub const ENV_RABBITMQ_PASSWORD: &str = "JOBSCHLEUDER_RABBITMQ_PASSWORD";
pub const ENV_QUEUE: &str = "JOBSCHLEUDER_QUEUE";
pub const ENV_SOT_TOKEN: &str = "JOBSCHLEUDER_SOT_TOKEN";

/// A value that must never reach output or logs: database and broker passwords, tokens.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; call only where it is handed to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(********)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

/// Why a configuration could not be loaded. Each names the file and, where it can, line and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}{}: {key}{message}", location(*line, *column))]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        /// The dotted key path, with a trailing ": " when known.
        key: String,
        message: String,
    },
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// The file, or the environment variable, the bad value came from.
        origin: String,
        key: String,
        message: String,
    },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(", line {line} column {column}"),
        (Some(line), None) => format!(", line {line}"),
        _ => String::new(),
    }
}

/// The loaded configuration, with defaults filled in and environment overrides applied.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from; `None` means built-in defaults.
    pub path: Option<PathBuf>,
    pub database: DatabaseConfig,
    pub rabbitmq: RabbitmqConfig,
    /// Which queue runs travel through, and the table queue's settings.
    pub queue: QueueConfig,
    /// Job name → the library that provides it (`plugins:` in the file).
    pub plugins: BTreeMap<String, PluginLocation>,
    /// Preprocessing function name → library (`preprocessing:` in the file).
    pub preprocessing: BTreeMap<String, PluginLocation>,
    /// `general.logging.loglevel`, used when `--loglevel` is not given.
    pub loglevel: Option<String>,
    /// The source-of-truth section, handed to plugins in place of `sot: true`.
    pub sot: SotConfig,
    /// The zone cron schedules are read in unless a job names its own: `timezone:`, else UTC —
    /// never the host's zone, which may differ between the hosts of one installation.
    pub timezone: Tz,
    pub scheduler: SchedulerConfig,
    pub worker: WorkerConfig,
    pub runs: RunsConfig,
    /// The `listener:` section: its address, API token and hooks.
    pub listener: ListenerConfig,
    /// Things worth one warning once logging is up (ignored sections of an original config).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// The SQLite file, when the store is SQLite (`database.path`, a `sqlite:` URL, or the
    /// default when the config names no database and no broker); `None`: Postgres.
    pub sqlite: Option<PathBuf>,
    /// A full URL (file `database.url` or `JOBSCHLEUDER_DATABASE_URL`); wins over the parts.
    pub url: Option<Secret>,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub database: String,
    pub max_connections: u32,
    /// How often a SQLite store looks for other processes' writes (`queue.poll_interval`).
    pub poll_interval: Duration,
    /// How long a worker's lease lasts on SQLite without a heartbeat: half of `queue.lease`,
    /// so that a dead worker's lease has run out before its deliveries are handed out again.
    pub worker_lease: Duration,
}

#[derive(Debug, Clone)]
pub struct RabbitmqConfig {
    /// A full URL (file `rabbitmq.url` or `JOBSCHLEUDER_AMQP_URL`); wins over the parts.
    pub url: Option<Secret>,
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: Option<Secret>,
    pub vhost: String,
    pub queue: String,
    pub heartbeat: u16,
    /// `quorum` (default) or `classic`.
    pub queue_type: QueueType,
    /// Deliveries of one message before it is dead-lettered (quorum queues only): a job that
    /// keeps killing its workers ends there instead of looping.
    pub delivery_limit: u32,
    /// Largest message body published; a run whose message is larger is recorded dead instead
    /// of closing the channel for the whole batch. Keep it at or below the broker's own
    /// `max_message_size` (128 MiB by default).
    pub max_message_size: usize,
}

/// Which queue runs travel through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    RabbitMq,
    /// The table queue in the store's own database.
    Table,
}

/// `queue:` settings.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub kind: QueueKind,
    /// How often a table-queue consumer on SQLite looks for messages other processes
    /// published (within one process it is woken at once).
    pub poll_interval: Duration,
    /// How long a table-queue delivery stays hidden from other consumers without a renewal:
    /// how soon a dead worker's deliveries are handed out again.
    pub lease: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Quorum,
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// `scheduler:` settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The longest the scheduler sleeps without looking (it is woken early by NOTIFY).
    pub max_sleep: Duration,
    /// A due run older than this counts as missed (for `misfire: skip`).
    pub misfire_grace: Duration,
    /// Registry entries handled per transaction.
    pub batch_size: u32,
    /// How often running runs are checked for a vanished worker (two checks in a row make an
    /// orphan) and long-unclaimed runs are published again.
    pub sweep_every: Duration,
    /// A run still queued this long after it was published (no worker claimed it: its message
    /// was lost, or dead-lettered by the broker) is published again; the claim makes the
    /// duplicate harmless.
    pub republish_after: Duration,
}

/// `worker:` settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// On SIGTERM/SIGINT, how long running jobs may take to finish.
    pub grace_period: Duration,
    /// First retry delay; doubles per attempt up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// How long calls wait for a plugin's `on_startup` before they fail (it may hang).
    pub startup_timeout: Duration,
    /// Deliveries a worker process may hold beyond its slots, waiting for a slot to free;
    /// `None`: as many as it has slots.
    pub lookahead: Option<u16>,
}

/// `runs:` settings.
#[derive(Debug, Clone)]
pub struct RunsConfig {
    /// Finished runs older than this are pruned by the scheduler; `None` keeps them.
    pub retention: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLocation {
    /// Absolute, or relative to the config file's folder once loaded.
    pub plugin_dir: PathBuf,
    /// The library's stem: `hello_world` → `libhello_world.so` (or `hello_world.py`).
    pub plugin: String,
    /// What runs it; `None`: a library if there is one, else a `.py` file if there is one.
    pub runtime: Option<Runtime>,
    /// The interpreter of a Python plugin (a path or a name on PATH); default `python3`.
    pub python: Option<String>,
}

/// How a plugin runs: a library in the worker's process, or a module of the original's in a
/// Python process of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Native,
    Python,
}

impl PluginLocation {
    /// The Python module of the original's kind: `plugin_dir/<plugin>.py`.
    pub fn python_path(&self) -> PathBuf {
        self.plugin_dir.join(format!("{}.py", self.plugin))
    }

    /// Whether this is a Python plugin: said so, or (when not said) no library but a `.py`.
    pub fn is_python(&self) -> bool {
        match self.runtime {
            Some(runtime) => runtime == Runtime::Python,
            None => !self.library_path().exists() && self.python_path().exists(),
        }
    }

    pub fn library_path(&self) -> PathBuf {
        self.plugin_dir.join(format!(
            "{}{}{}",
            std::env::consts::DLL_PREFIX,
            self.plugin,
            std::env::consts::DLL_SUFFIX
        ))
    }
}

/// The `sot:` section, kept as it is for plugins. `token` is a secret.
#[derive(Clone, Default)]
pub struct SotConfig {
    pub values: serde_json::Map<String, serde_json::Value>,
}

impl Config {
    /// Every secret value of the configuration: passwords (given alone or in a URL), the
    /// source-of-truth token and other secret keys of `sot:`.
    pub fn secret_values(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        for password in [&self.database.password, &self.rabbitmq.password]
            .into_iter()
            .flatten()
        {
            secrets.push(password.expose().to_string());
        }
        for url in [&self.database.url, &self.rabbitmq.url]
            .into_iter()
            .flatten()
        {
            secrets.extend(url_secrets(url.expose()));
        }
        secrets.extend(secrets_in(&self.sot.values));
        secrets.extend(self.listener.secret_values());
        secrets.sort();
        secrets.dedup();
        secrets
    }
}

impl fmt::Debug for SotConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<&String> = self.values.keys().collect();
        f.debug_struct("SotConfig").field("keys", &keys).finish()
    }
}

impl DatabaseConfig {
    /// Connection options for sqlx, from the URL or the parts.
    pub fn connect_options(&self) -> Result<sqlx::postgres::PgConnectOptions, ConfigError> {
        use std::str::FromStr;
        match &self.url {
            Some(url) => sqlx::postgres::PgConnectOptions::from_str(url.expose()).map_err(|e| {
                ConfigError::Invalid {
                    origin: "database".into(),
                    key: "database.url".into(),
                    message: format!(
                        "not a valid Postgres URL: {}",
                        redact_message(&e.to_string(), url)
                    ),
                }
            }),
            None => {
                let mut options = sqlx::postgres::PgConnectOptions::new()
                    .host(&self.host)
                    .port(self.port)
                    .username(&self.user)
                    .database(&self.database);
                if let Some(password) = &self.password {
                    options = options.password(password.expose());
                }
                Ok(options)
            }
        }
    }

    /// Where it connects, for messages: never the password.
    pub fn describe(&self) -> String {
        if let Some(path) = &self.sqlite {
            return format!("sqlite://{}", path.display());
        }
        match &self.url {
            Some(url) => redact_url(url.expose()),
            None => format!(
                "postgres://{}@{}:{}/{}",
                self.user, self.host, self.port, self.database
            ),
        }
    }
}

impl RabbitmqConfig {
    /// The AMQP URL, with the password in it: hand it only to the client library.
    pub fn amqp_url(&self) -> Secret {
        if let Some(url) = &self.url {
            return url.clone();
        }
        let mut url = url::Url::parse("amqp://localhost/").expect("static URL parses");
        let _ = url.set_host(Some(&self.host));
        let _ = url.set_port(Some(self.port));
        let _ = url.set_username(&self.username);
        let _ = url.set_password(self.password.as_ref().map(Secret::expose));
        let vhost: String = url::form_urlencoded::byte_serialize(self.vhost.as_bytes()).collect();
        url.set_path(&format!("/{vhost}"));
        url.set_query(Some(&format!("heartbeat={}", self.heartbeat)));
        Secret(url.to_string())
    }

    /// Where it connects, for messages: never the password.
    pub fn describe(&self) -> String {
        redact_url(self.amqp_url().expose())
    }
}

/// `url` with `password` in it (the environment's password wins over the one in a URL). A URL
/// that does not parse is left for validation to report.
fn with_password(url: Secret, password: &str) -> Secret {
    let Ok(mut parsed) = url::Url::parse(url.expose()) else {
        return url;
    };
    match parsed.set_password(Some(password)) {
        Ok(()) => Secret(parsed.to_string()),
        Err(()) => url,
    }
}

/// Parts of a key's name that make its value a secret (compared without case): `password`,
/// `sslpassword`, `api_key`, `auth_token`, `client_secret`, ...
pub const SECRET_KEY_PARTS: [&str; 6] =
    ["token", "password", "passwd", "secret", "key", "credential"];

/// Whether a value under `key` (a config key, a URL query key, a plugin's argument) is a secret.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEY_PARTS.iter().any(|part| key.contains(part))
}

/// A URL with its password, and the values of secret query keys (`?password=`, `?token=`, ...),
/// replaced by `********`; the rest stays as written.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("********"));
            }
            if let Some(query) = url.query() {
                let query = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((key, _)) if is_secret_key(&decode_query_part(key)) => {
                            format!("{key}=********")
                        }
                        _ => pair.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("&");
                url.set_query(Some(&query));
            }
            url.to_string()
        }
        Err(_) => "<unparsable URL>".to_string(),
    }
}

/// The secrets a URL carries, as written and decoded: its password and the values of its secret
/// query keys. Nothing for a string that is not a URL.
pub fn url_secrets(raw: &str) -> Vec<String> {
    let Ok(url) = url::Url::parse(raw) else {
        return Vec::new();
    };
    let mut secrets = Vec::new();
    if let Some(password) = url.password() {
        secrets.push(password.to_string());
        // Percent-decoded; a `+` in user info is a plus, not a space.
        secrets.push(decode_query_part(&password.replace('+', "%2B")));
    }
    for pair in url.query().unwrap_or_default().split('&') {
        if let Some((key, value)) = pair.split_once('=') {
            if is_secret_key(&decode_query_part(key)) {
                secrets.push(value.to_string());
                secrets.push(decode_query_part(value));
            }
        }
    }
    secrets.sort();
    secrets.dedup();
    secrets.retain(|s| !s.is_empty());
    secrets
}

fn decode_query_part(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

/// Every string under a secret key of `values`, at any depth, and the secrets of every URL in
/// them: what must never come back out of a plugin that was given (or produced) them.
pub fn secrets_in(values: &serde_json::Map<String, serde_json::Value>) -> Vec<String> {
    fn strings(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
            serde_json::Value::Object(map) => map.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    fn walk(key: Option<&str>, value: &serde_json::Value, out: &mut Vec<String>) {
        if key.is_some_and(is_secret_key) {
            strings(value, out);
            return;
        }
        match value {
            serde_json::Value::String(s) if s.contains("://") => out.extend(url_secrets(s)),
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(None, v, out)),
            serde_json::Value::Object(map) => map.iter().for_each(|(k, v)| walk(Some(k), v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (key, value) in values {
        walk(Some(key), value, &mut out);
    }
    out
}

/// `message` without the URL `secret`, nor the passwords in it.
fn redact_message(message: &str, secret: &Secret) -> String {
    let mut message = message.to_string();
    let mut parts = url_secrets(secret.expose());
    parts.push(secret.expose().to_string());
    // Longest first, so that the whole URL goes before a password inside it.
    parts.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for part in parts.iter().filter(|p| !p.is_empty()) {
        message = message.replace(part.as_str(), "********");
    }
    message
}

// ---- the file as written ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database: Option<RawDatabase>,
    rabbitmq: Option<RawRabbitmq>,
    plugins: Option<BTreeMap<String, RawPlugin>>,
    preprocessing: Option<BTreeMap<String, RawPlugin>>,
    general: Option<RawGeneral>,
    sot: Option<serde_json::Map<String, serde_json::Value>>,
    /// The original's git section: nothing here uses it.
    git: Option<serde_yaml::Value>,
    timezone: Option<String>,
    scheduler: Option<RawScheduler>,
    worker: Option<RawWorker>,
    runs: Option<RawRuns>,
    listener: Option<listener::RawListener>,
    queue: Option<RawQueue>,
}

/// `queue: rabbitmq | postgres | sqlite | table`, or a mapping with `type` and settings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawQueue {
    Kind(String),
    Settings(RawQueueSettings),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueueSettings {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: Option<String>,
    delivery_limit: Option<u32>,
    poll_interval: Option<f64>,
    lease: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduler {
    max_sleep: Option<f64>,
    misfire_grace: Option<f64>,
    batch_size: Option<u32>,
    sweep_every: Option<f64>,
    republish_after: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    grace_period: Option<f64>,
    retry_backoff: Option<f64>,
    retry_backoff_max: Option<f64>,
    startup_timeout: Option<f64>,
    lookahead: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuns {
    retention_days: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    /// A SQLite file (relative paths: to the working directory).
    path: Option<PathBuf>,
    url: Option<Secret>,
    host: Option<String>,
    port: Option<u16>,
    #[serde(alias = "username")]
    user: Option<String>,
    password: Option<Secret>,
    database: Option<String>,
    max_connections: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRabbitmq {
    url: Option<Secret>,
    host: Option<String>,
    port: Option<u16>,
    #[serde(alias = "user")]
    username: Option<String>,
    password: Option<Secret>,
    vhost: Option<String>,
    queue: Option<String>,
    heartbeat: Option<u16>,
    queue_type: Option<String>,
    delivery_limit: Option<u32>,
    max_message_size: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    plugin_dir: Option<PathBuf>,
    plugin: String,
    runtime: Option<String>,
    python: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawGeneral {
    logging: Option<RawLogging>,
    /// The original's other general settings: accepted, warned about, unused.
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
struct RawLogging {
    loglevel: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

/// The default places to look for a config file, in order.
pub fn default_locations(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("jobschleuder.yaml")];
    let config_home = env("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".config")));
    if let Some(dir) = config_home {
        paths.push(dir.join("jobschleuder").join("config.yaml"));
    }
    paths.push(PathBuf::from("/etc/jobschleuder/config.yaml"));
    paths
}

impl Config {
    /// Loads the configuration from the process environment.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(explicit, &|key| std::env::var(key).ok())
    }

    /// Loads the configuration with `env` standing in for the environment.
    pub fn load_with_env(
        explicit: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let path = match explicit {
            Some(path) => Some(path.to_path_buf()),
            None => default_locations(env).into_iter().find(|p| p.is_file()),
        };
        let (raw, path) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                (parse_raw(&path, &text)?, Some(path))
            }
            None => (RawConfig::default(), None),
        };
        build(raw, path, env)
    }

    /// Parses configuration text as if read from `path` (for tests and `--config -` style use).
    pub fn from_str_with_env(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        build(parse_raw(path, text)?, Some(path.to_path_buf()), env)
    }

    /// Where the config came from, for messages.
    pub fn origin(&self) -> String {
        match &self.path {
            Some(path) => format!("config file {}", path.display()),
            None => "built-in defaults (no config file found)".to_string(),
        }
    }
}

fn parse_raw(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    // An empty file (or one of comments only) is an empty configuration.
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| yaml_error(path, String::new(), e))?;
    if value.is_null() {
        return Ok(RawConfig::default());
    }
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." {
            String::new()
        } else {
            format!("{key}: ")
        };
        yaml_error(path, key, e.into_inner())
    })
}

fn yaml_error(path: &Path, key: String, error: serde_yaml::Error) -> ConfigError {
    let location = error.location();
    // serde_yaml appends " at line L column C"; we print the location ourselves.
    let mut message = error.to_string();
    if let Some(cut) = message.find(" at line ") {
        message.truncate(cut);
    }
    ConfigError::Parse {
        path: path.to_path_buf(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        key,
        message,
    }
}

fn build(
    raw: RawConfig,
    path: Option<PathBuf>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let origin = match &path {
        Some(p) => format!("config file {}", p.display()),
        None => "defaults".to_string(),
    };
    // Plugin folders are relative to the config file, wherever the process was started.
    let base_dir = path
        .as_ref()
        .and_then(|p| std::path::absolute(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut warnings = Vec::new();

    let mut ignored = Vec::new();
    if raw.git.is_some() {
        ignored.push("git".to_string());
    }
    let mut loglevel = None;
    if let Some(general) = raw.general {
        ignored.extend(general.other.keys().map(|k| format!("general.{k}")));
        if let Some(logging) = general.logging {
            ignored.extend(logging.other.keys().map(|k| format!("general.logging.{k}")));
            loglevel = logging.loglevel;
        }
    }
    if !ignored.is_empty() {
        warnings.push(format!(
            "{origin}: ignoring settings of the original jobschleuder that are not used here: {}",
            ignored.join(", ")
        ));
    }

    let has_rabbitmq = raw.rabbitmq.is_some();
    let set = |key: &str| env(key).is_some_and(|v| !v.is_empty());
    // A server named by the file or the environment (a URL, or a server's password: a config
    // of the original that relies on the local servers' defaults).
    let names_a_server = raw.database.is_some()
        || raw.rabbitmq.is_some()
        || set(ENV_DATABASE_URL)
        || set(ENV_AMQP_URL)
        || set(ENV_DATABASE_PASSWORD)
        || set(ENV_RABBITMQ_PASSWORD);
    let amqp_in_env = set(ENV_AMQP_URL) || set(ENV_RABBITMQ_PASSWORD);
    let db = raw.database;
    let mut database = DatabaseConfig {
        sqlite: db.as_ref().and_then(|d| d.path.clone()),
        url: db.as_ref().and_then(|d| d.url.clone()),
        host: db
            .as_ref()
            .and_then(|d| d.host.clone())
            .unwrap_or_else(|| "127.0.0.1".into()),
        port: db.as_ref().and_then(|d| d.port).unwrap_or(5432),
        user: db
            .as_ref()
            .and_then(|d| d.user.clone())
            .unwrap_or_else(|| "postgres".into()),
        password: db.as_ref().and_then(|d| d.password.clone()),
        database: db
            .as_ref()
            .and_then(|d| d.database.clone())
            .unwrap_or_else(|| "jobschleuder".into()),
        max_connections: db.as_ref().and_then(|d| d.max_connections).unwrap_or(8),
        poll_interval: Duration::from_millis(250),
        worker_lease: Duration::from_secs(30),
    };
    if database.max_connections == 0 {
        return Err(ConfigError::Invalid {
            origin,
            key: "database.max_connections".into(),
            message: "must be at least 1".into(),
        });
    }
    if let Some(url) = env(ENV_DATABASE_URL).filter(|v| !v.is_empty()) {
        database.url = Some(Secret(url));
    }
    if let Some(password) = env(ENV_DATABASE_PASSWORD) {
        // A SQLite file has no password: a `sqlite:` URL is left as it is.
        database.url = database.url.map(|url| {
            if sqlite_path(url.expose()).is_some() {
                url
            } else {
                with_password(url, &password)
            }
        });
        database.password = Some(Secret(password));
    }
    if let Some(path) = database.url.as_ref().and_then(|u| sqlite_path(u.expose())) {
        database.sqlite = Some(path);
    } else if database.url.is_some() {
        // A Postgres URL (from the environment) wins over a file's `database.path`.
        database.sqlite = None;
    }
    if database.sqlite.is_none() && !names_a_server {
        database.sqlite = Some(default_sqlite_path(path.as_deref(), env));
    }
    // Validate the URL now so that a typo is reported at start, not at first use.
    if database.sqlite.is_none() {
        database.connect_options().map_err(|e| match e {
            ConfigError::Invalid { message, .. } => ConfigError::Invalid {
                origin: if env(ENV_DATABASE_URL).is_some() {
                    ENV_DATABASE_URL.into()
                } else {
                    origin.clone()
                },
                key: "database.url".into(),
                message,
            },
            other => other,
        })?;
    }

    let mq = raw.rabbitmq;
    let mut rabbitmq = RabbitmqConfig {
        url: mq.as_ref().and_then(|m| m.url.clone()),
        host: mq
            .as_ref()
            .and_then(|m| m.host.clone())
            .unwrap_or_else(|| "127.0.0.1".into()),
        port: mq.as_ref().and_then(|m| m.port).unwrap_or(5672),
        username: mq
            .as_ref()
            .and_then(|m| m.username.clone())
            .unwrap_or_else(|| "guest".into()),
        password: mq
            .as_ref()
            .and_then(|m| m.password.clone())
            .or_else(|| Some(Secret("guest".into()))),
        vhost: mq
            .as_ref()
            .and_then(|m| m.vhost.clone())
            .unwrap_or_else(|| "/".into()),
        queue: mq
            .as_ref()
            .and_then(|m| m.queue.clone())
            .unwrap_or_else(|| "jobschleuder".into()),
        heartbeat: mq.as_ref().and_then(|m| m.heartbeat).unwrap_or(60),
        queue_type: match mq.as_ref().and_then(|m| m.queue_type.as_deref()) {
            None | Some("quorum") => QueueType::Quorum,
            Some("classic") => QueueType::Classic,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    origin,
                    key: "rabbitmq.queue_type".into(),
                    message: format!("{other:?}: use quorum (the default) or classic"),
                })
            }
        },
        delivery_limit: mq
            .as_ref()
            .and_then(|m| m.delivery_limit)
            .unwrap_or(5)
            .max(1),
        max_message_size: mq
            .as_ref()
            .and_then(|m| m.max_message_size)
            .unwrap_or(128 * 1024 * 1024)
            .max(1024),
    };
    if let Some(url) = env(ENV_AMQP_URL).filter(|v| !v.is_empty()) {
        rabbitmq.url = Some(Secret(url));
    }
    if let Some(password) = env(ENV_RABBITMQ_PASSWORD) {
        rabbitmq.url = rabbitmq.url.map(|url| with_password(url, &password));
        rabbitmq.password = Some(Secret(password));
    }
    if let Some(queue) = env(ENV_QUEUE).filter(|v| !v.is_empty()) {
        rabbitmq.queue = queue;
    }
    if let Some(url) = &rabbitmq.url {
        let parsed = url::Url::parse(url.expose())
            .ok()
            .filter(|u| matches!(u.scheme(), "amqp" | "amqps"));
        if parsed.is_none() {
            return Err(ConfigError::Invalid {
                origin: if env(ENV_AMQP_URL).is_some() {
                    ENV_AMQP_URL.into()
                } else {
                    origin.clone()
                },
                key: "rabbitmq.url".into(),
                message: "not a valid amqp:// or amqps:// URL".into(),
            });
        }
    }
    if rabbitmq.queue.len() > 255 {
        return Err(ConfigError::Invalid {
            origin,
            key: "rabbitmq.queue".into(),
            message: "a queue name has at most 255 bytes".into(),
        });
    }

    let resolve = |section: &str,
                   map: Option<BTreeMap<String, RawPlugin>>|
     -> Result<BTreeMap<String, PluginLocation>, ConfigError> {
        map.unwrap_or_default()
            .into_iter()
            .map(|(name, p)| {
                let dir = p.plugin_dir.unwrap_or_else(|| PathBuf::from("plugins"));
                let dir = if dir.is_absolute() {
                    dir
                } else {
                    base_dir.join(dir)
                };
                let runtime = match p.runtime.as_deref() {
                    None => None,
                    Some("python") => Some(Runtime::Python),
                    Some("native") => Some(Runtime::Native),
                    Some(other) => {
                        return Err(ConfigError::Invalid {
                            origin: origin.clone(),
                            key: format!("{section}.{name}.runtime"),
                            message: format!(
                                "{other:?}: use python (a .py module of the original's kind) or native (a library)"
                            ),
                        })
                    }
                };
                Ok((
                    name,
                    PluginLocation {
                        plugin_dir: dir,
                        plugin: p.plugin,
                        runtime,
                        python: p.python,
                    },
                ))
            })
            .collect()
    };
    let plugins = resolve("plugins", raw.plugins)?;
    let preprocessing = resolve("preprocessing", raw.preprocessing)?;

    let mut sot = SotConfig {
        values: raw.sot.unwrap_or_default(),
    };
    if let Some(token) = env(ENV_SOT_TOKEN) {
        sot.values
            .insert("token".into(), serde_json::Value::String(token));
    }

    let timezone = match raw.timezone {
        Some(name) => parse_timezone(&name).map_err(|message| ConfigError::Invalid {
            origin: origin.clone(),
            key: "timezone".into(),
            message,
        })?,
        None => Tz::UTC,
    };

    let seconds = |value: Option<f64>, default: f64, key: &str| -> Result<Duration, ConfigError> {
        let value = value.unwrap_or(default);
        if value.is_finite() && value >= 0.0 {
            Ok(Duration::from_secs_f64(value))
        } else {
            Err(ConfigError::Invalid {
                origin: origin.clone(),
                key: key.into(),
                message: format!("{value} is not a number of seconds"),
            })
        }
    };
    let sch = raw.scheduler;
    let scheduler = SchedulerConfig {
        max_sleep: seconds(
            sch.as_ref().and_then(|s| s.max_sleep),
            60.0,
            "scheduler.max_sleep",
        )?
        .max(Duration::from_millis(10)),
        misfire_grace: seconds(
            sch.as_ref().and_then(|s| s.misfire_grace),
            60.0,
            "scheduler.misfire_grace",
        )?,
        batch_size: sch
            .as_ref()
            .and_then(|s| s.batch_size)
            .unwrap_or(1000)
            .max(1),
        sweep_every: seconds(
            sch.as_ref().and_then(|s| s.sweep_every),
            10.0,
            "scheduler.sweep_every",
        )?
        .max(Duration::from_millis(100)),
        republish_after: seconds(
            sch.as_ref().and_then(|s| s.republish_after),
            900.0,
            "scheduler.republish_after",
        )?
        .max(Duration::from_secs(1)),
    };
    let wrk = raw.worker;
    let worker = WorkerConfig {
        grace_period: seconds(
            wrk.as_ref().and_then(|w| w.grace_period),
            60.0,
            "worker.grace_period",
        )?,
        retry_backoff: seconds(
            wrk.as_ref().and_then(|w| w.retry_backoff),
            10.0,
            "worker.retry_backoff",
        )?,
        retry_backoff_max: seconds(
            wrk.as_ref().and_then(|w| w.retry_backoff_max),
            3600.0,
            "worker.retry_backoff_max",
        )?,
        startup_timeout: seconds(
            wrk.as_ref().and_then(|w| w.startup_timeout),
            60.0,
            "worker.startup_timeout",
        )?,
        lookahead: wrk.as_ref().and_then(|w| w.lookahead),
    };
    let runs = RunsConfig {
        retention: match raw.runs.and_then(|r| r.retention_days) {
            Some(days) if days <= 0.0 => None,
            days => Some(seconds(
                days.map(|d| d * 86400.0),
                30.0 * 86400.0,
                "runs.retention_days",
            )?),
        },
    };

    let listener = listener::build(raw.listener, &origin, &base_dir, env)?;

    let settings = match raw.queue {
        None => RawQueueSettings::default(),
        Some(RawQueue::Kind(kind)) => RawQueueSettings {
            kind: Some(kind),
            ..RawQueueSettings::default()
        },
        Some(RawQueue::Settings(settings)) => settings,
    };
    let store_kind = if database.sqlite.is_some() {
        "sqlite"
    } else {
        "postgres"
    };
    let kind = match settings.kind.as_deref() {
        // The embedded default: a store in a SQLite file takes its queue along; a config that
        // names a Postgres database keeps RabbitMQ, as the original did.
        None if database.sqlite.is_some() && !has_rabbitmq && !amqp_in_env => {
            QueueKind::Table
        }
        None | Some("rabbitmq") => QueueKind::RabbitMq,
        Some("table") => QueueKind::Table,
        Some(named @ ("postgres" | "sqlite")) if named == store_kind => QueueKind::Table,
        Some(named @ ("postgres" | "sqlite")) => {
            return Err(ConfigError::Invalid {
                origin,
                key: "queue".into(),
                message: format!(
                    "{named:?} puts the queue in the {named} database, but the database is {} ({}): name a {named} database in `database:`, or use `queue: table` (the queue in whichever database is configured)",
                    store_kind,
                    database.describe()
                ),
            })
        }
        Some(other) => {
            return Err(ConfigError::Invalid {
                origin,
                key: "queue".into(),
                message: format!(
                    "{other:?}: use rabbitmq, postgres (a table queue in the Postgres database), sqlite (a table queue in the SQLite file) or table (in whichever database is configured)"
                ),
            })
        }
    };
    if kind == QueueKind::RabbitMq && database.sqlite.is_some() {
        return Err(ConfigError::Invalid {
            origin,
            key: "queue".into(),
            message: format!(
                "the database is a SQLite file ({}), which serves one host, while RabbitMQ is for workers on many hosts: use `queue: sqlite` (the table queue in the same file), or name a Postgres database in `database:` to use RabbitMQ",
                database.describe()
            ),
        });
    }
    // The environment wins over the file, as everywhere.
    if let Some(name) = settings.name.filter(|_| !set(ENV_QUEUE)) {
        rabbitmq.queue = name;
    }
    let queue_poll = seconds(settings.poll_interval, 0.25, "queue.poll_interval")?
        .max(Duration::from_millis(10));
    let queue_lease = seconds(settings.lease, 60.0, "queue.lease")?.max(Duration::from_secs(2));
    if let Some(limit) = settings.delivery_limit {
        rabbitmq.delivery_limit = limit.max(1);
    }
    database.poll_interval = queue_poll;
    database.worker_lease = (queue_lease / 2).max(Duration::from_secs(1));
    let queue = QueueConfig {
        kind,
        poll_interval: queue_poll,
        lease: queue_lease,
    };

    Ok(Config {
        path,
        database,
        rabbitmq,
        queue,
        plugins,
        preprocessing,
        loglevel,
        sot,
        timezone,
        scheduler,
        worker,
        runs,
        listener,
        warnings,
    })
}

/// The SQLite file a `sqlite:` URL names (`sqlite://jobs.db`, `sqlite:///var/lib/jobs.db`,
/// `sqlite:jobs.db`); `None` for other URLs.
pub fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let rest = rest.split('?').next().unwrap_or(rest);
    Some(PathBuf::from(rest))
}

/// Where the store lives when the config names no database and no broker: `jobschleuder.db`
/// in the working directory when the config file in use sits there (a project folder), else
/// `$XDG_DATA_HOME/jobschleuder/jobschleuder.db` (`~/.local/share/jobschleuder/` when
/// XDG_DATA_HOME is not set).
pub fn default_sqlite_path(config: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let local = PathBuf::from("jobschleuder.db");
    let in_working_directory = config
        .and_then(|p| std::path::absolute(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .zip(std::env::current_dir().ok())
        .is_some_and(|(dir, cwd)| dir == cwd);
    if in_working_directory {
        return local;
    }
    let data_home = env("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".local").join("share")));
    match data_home {
        Some(dir) => dir.join("jobschleuder").join("jobschleuder.db"),
        None => local,
    }
}

/// Parses an IANA zone name, with a message that says what to write instead.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| {
        format!("unknown time zone {name:?}: use an IANA name such as \"Europe/Berlin\", \"America/New_York\" or \"UTC\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_str_with_env(Path::new("/etc/js/config.yaml"), text, &no_env)
    }

    #[test]
    fn an_original_config_loads_with_one_warning() {
        let config = load(
            "general:\n  logging:\n    loglevel: debug\n  something: 1\ngit:\n  repo: x\n\
             database:\n  host: db.lab\n  port: 5433\n  user: js\n  password: s3cret\n  database: jobs\n\
             rabbitmq:\n  host: mq.lab\n  port: 5672\n  queue: q1\n  user: bunny\n  password: pw\n  heartbeat: 30\n\
             plugins:\n  hello_world:\n    plugin_dir: plugins\n    plugin: hello_world\n\
             preprocessing:\n  expand:\n    plugin_dir: /opt/p\n    plugin: expand_hosts\n\
             sot:\n  nautobot: https://nautobot.lab\n  token: abc\n  ssl_verify: false\n",
        )
        .unwrap();
        assert_eq!(config.loglevel.as_deref(), Some("debug"));
        assert_eq!(config.warnings.len(), 1);
        assert!(
            config.warnings[0].contains("git") && config.warnings[0].contains("general.something")
        );
        assert_eq!(config.database.describe(), "postgres://js@db.lab:5433/jobs");
        assert_eq!(config.rabbitmq.username, "bunny");
        assert_eq!(config.rabbitmq.queue, "q1");
        assert_eq!(
            config.plugins["hello_world"].library_path(),
            PathBuf::from("/etc/js/plugins/libhello_world.so")
        );
        assert_eq!(
            config.preprocessing["expand"].plugin_dir,
            PathBuf::from("/opt/p")
        );
        assert_eq!(config.sot.values["ssl_verify"], serde_json::json!(false));
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_line_and_key() {
        let err = load("database:\n  host: x\n  prot: 5432\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(
            err.contains("database.prot") || err.contains("prot"),
            "{err}"
        );
        assert!(err.contains("/etc/js/config.yaml"), "{err}");

        let err = load("rabbitmq:\n  port: not-a-number\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rabbitmq.port") && err.contains("line 2"),
            "{err}"
        );

        let err = load("databse:\n  host: x\n").unwrap_err().to_string();
        assert!(err.contains("databse"), "{err}");

        let err = load("worker:\n  lookahead: -1\n").unwrap_err().to_string();
        assert!(
            err.contains("worker.lookahead") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn lookahead_is_one_per_slot_unless_set() {
        assert_eq!(load("# nothing\n").unwrap().worker.lookahead, None);
        let config = load("worker:\n  lookahead: 8\n").unwrap();
        assert_eq!(config.worker.lookahead, Some(8));
        let config = load("worker:\n  lookahead: 0\n").unwrap();
        assert_eq!(config.worker.lookahead, Some(0));
    }

    #[test]
    fn secrets_never_print() {
        let config =
            load("database:\n  url: postgres://u:hunter2@h/db\nrabbitmq:\n  password: bunny-pw\n")
                .unwrap();
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("bunny-pw"),
            "{debug}"
        );
        assert!(!config.database.describe().contains("hunter2"));
        assert!(!config.rabbitmq.describe().contains("bunny-pw"));
        assert!(config.rabbitmq.amqp_url().expose().contains("bunny-pw"));
    }

    #[test]
    fn passwords_in_url_queries_are_masked() {
        for (url, secret) in [
            ("postgres://u@h/db?password=q-secret1", "q-secret1"),
            (
                "postgres://u@h/db?sslmode=require&sslpassword=q-secret2",
                "q-secret2",
            ),
            (
                "amqp://u@h:5672/%2f?heartbeat=30&password=q-secret3",
                "q-secret3",
            ),
            ("amqps://h/%2f?auth_token=q-secret4&x=1", "q-secret4"),
            ("postgres://h/db?API_KEY=q-secret5", "q-secret5"),
            ("postgres://h/db?client_secret=q%2Dsecret6", "q%2Dsecret6"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} shows as {shown}");
            assert!(shown.contains("********"), "{shown}");
        }
        // Everything else stays as written.
        assert_eq!(
            redact_url("amqp://u:pw@h:5672/%2f?heartbeat=30&password=x&channel_max=7"),
            "amqp://u:********@h:5672/%2f?heartbeat=30&password=********&channel_max=7"
        );
        assert_eq!(
            redact_url("postgres://h/db?sslmode=require"),
            "postgres://h/db?sslmode=require"
        );

        let env = |key: &str| match key {
            ENV_DATABASE_URL => Some("postgres://u@h/db?password=db-query-pw".to_string()),
            ENV_AMQP_URL => Some("amqp://u@h/%2f?password=mq-query-pw".to_string()),
            _ => None,
        };
        let config = Config::from_str_with_env(Path::new("c.yaml"), "", &env).unwrap();
        assert!(!config.database.describe().contains("db-query-pw"));
        assert!(!config.rabbitmq.describe().contains("mq-query-pw"));
    }

    #[test]
    fn secret_values_come_from_every_section() {
        assert_eq!(
            url_secrets("postgres://u:p%40ss+1@h/db?sslpassword=a%2Bb&x=1"),
            ["a%2Bb", "a+b", "p%40ss+1", "p@ss+1"]
        );
        assert!(url_secrets("not a url").is_empty());
        let config = load(
            "database:\n  password: db-pw\nrabbitmq:\n  url: amqp://u@h/%2f?password=mq-pw\n\
             sot:\n  nautobot: https://user:sot-url-pw@nautobot.lab\n  token: tok-1\n  \
             inventory:\n    api_key: [key-1]\n    name: not-secret\n",
        )
        .unwrap();
        assert_eq!(
            config.secret_values(),
            ["db-pw", "guest", "key-1", "mq-pw", "sot-url-pw", "tok-1"]
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = |key: &str| match key {
            ENV_DATABASE_URL => Some("postgres://other@10.0.0.1/otherdb".to_string()),
            ENV_QUEUE => Some("from-env".to_string()),
            ENV_SOT_TOKEN => Some("env-token".to_string()),
            _ => None,
        };
        let config = Config::from_str_with_env(
            Path::new("c.yaml"),
            "database:\n  host: db.lab\nrabbitmq:\n  queue: file-queue\nsot:\n  token: file-token\n",
            &env,
        )
        .unwrap();
        assert_eq!(
            config.database.describe(),
            "postgres://other@10.0.0.1/otherdb"
        );
        assert_eq!(config.rabbitmq.queue, "from-env");
        assert_eq!(config.sot.values["token"], "env-token");
    }

    #[test]
    fn password_variables_override_passwords_in_urls() {
        let env = |key: &str| match key {
            ENV_DATABASE_PASSWORD => Some("db-env-pw".to_string()),
            ENV_RABBITMQ_PASSWORD => Some("mq-env-pw".to_string()),
            _ => None,
        };
        let config = Config::from_str_with_env(
            Path::new("c.yaml"),
            "database:\n  url: postgres://u:file-pw@h/db\nrabbitmq:\n  url: amqp://u:file-pw@h:5672/%2f\n",
            &env,
        )
        .unwrap();
        assert_eq!(
            config.database.connect_options().unwrap().get_username(),
            "u"
        );
        assert!(config
            .database
            .url
            .as_ref()
            .unwrap()
            .expose()
            .contains("db-env-pw"));
        assert!(config.rabbitmq.amqp_url().expose().contains("mq-env-pw"));
        assert!(!config.rabbitmq.amqp_url().expose().contains("file-pw"));
    }

    #[test]
    fn bad_values_are_named() {
        let err = load("timezone: Mars/Olympus\n").unwrap_err().to_string();
        assert!(
            err.contains("timezone") && err.contains("Mars/Olympus"),
            "{err}"
        );
        let err = load("rabbitmq:\n  url: http://x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rabbitmq.url"), "{err}");
        let err = load("database: [1, 2\n").unwrap_err().to_string();
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn which_store_and_queue_the_file_and_the_environment_choose() {
        let with = |text: &str, vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Config::from_str_with_env(Path::new("/etc/js/config.yaml"), text, &move |key| {
                vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
            })
            .unwrap()
        };
        // A SQLite URL takes no password, even when one is in the environment.
        let config = with(
            "",
            &[
                (ENV_DATABASE_URL, "sqlite:///var/lib/js/jobs.db"),
                (ENV_DATABASE_PASSWORD, "pw"),
            ],
        );
        assert_eq!(
            config.database.sqlite,
            Some(PathBuf::from("/var/lib/js/jobs.db"))
        );
        assert_eq!(config.database.describe(), "sqlite:///var/lib/js/jobs.db");
        // A server's password in the environment names that server: the original's defaults.
        let config = with("", &[(ENV_DATABASE_PASSWORD, "pw")]);
        assert_eq!(config.database.sqlite, None);
        assert_eq!(config.queue.kind, QueueKind::RabbitMq);
        // The environment's queue name wins over the file's, as everywhere.
        let config = with(
            "queue:\n  type: sqlite\n  name: from-file\n",
            &[(ENV_QUEUE, "from-env")],
        );
        assert_eq!(config.rabbitmq.queue, "from-env");
        assert_eq!(config.queue.kind, QueueKind::Table);
        // Nothing named: a file under the XDG data folder (the config is not in the working
        // directory), and the table queue.
        let config = with("", &[("HOME", "/home/ops")]);
        assert_eq!(
            config.database.sqlite,
            Some(PathBuf::from(
                "/home/ops/.local/share/jobschleuder/jobschleuder.db"
            ))
        );
        assert_eq!(config.queue.kind, QueueKind::Table);
        assert_eq!(config.database.worker_lease, config.queue.lease / 2);
        // SQLite with RabbitMQ is refused, saying what to do.
        let error = Config::from_str_with_env(
            Path::new("c.yaml"),
            "database:\n  path: jobs.db\nrabbitmq:\n  host: mq\n",
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("queue: sqlite"), "{error}");
    }

    #[test]
    fn empty_file_means_defaults() {
        // No database and no broker: the embedded store and the table queue in it.
        let config = load("# nothing here\n").unwrap();
        assert!(config.database.sqlite.is_some());
        assert_eq!(config.queue.kind, QueueKind::Table);
        assert_eq!(config.rabbitmq.queue, "jobschleuder");
        // A database section keeps Postgres and RabbitMQ, as the original's configs expect.
        let config = load("database:\n  host: 127.0.0.1\n").unwrap();
        assert_eq!(
            config.database.describe(),
            "postgres://postgres@127.0.0.1:5432/jobschleuder"
        );
        assert_eq!(config.queue.kind, QueueKind::RabbitMq);
        assert!(config
            .rabbitmq
            .amqp_url()
            .expose()
            .starts_with("amqp://guest:guest@127.0.0.1:5672/%2F"));
    }
}
