//! Logging: level filter, where lines go (`--loghandler`), and the `--uuid` tag on every line.

use std::fmt;
use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Where log lines are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogHandler {
    Stderr,
    Stdout,
    /// One JSON object per line, on stderr.
    Json,
    /// Appended to this file.
    File(PathBuf),
}

impl LogHandler {
    pub fn parse(value: &str) -> LogHandler {
        match value {
            "stderr" | "" => LogHandler::Stderr,
            "stdout" => LogHandler::Stdout,
            "json" => LogHandler::Json,
            path => LogHandler::File(PathBuf::from(path)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log level {0:?}: use error, warn, info, debug, trace or a tracing filter such as \"info,jobschleuder=debug\"")]
    Level(String),
    #[error("cannot open log file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Builds the filter from a level name (any case) or a full filter; plugin debug logs on request.
pub fn filter(level: &str, debug_plugins: bool) -> Result<EnvFilter, LoggingError> {
    let lower = level.trim().to_ascii_lowercase();
    let mut directives = match lower.as_str() {
        "error" | "warn" | "info" | "debug" | "trace" | "off" => lower.clone(),
        "warning" => "warn".to_string(),
        "critical" | "fatal" => "error".to_string(),
        _ => level.trim().to_string(),
    };
    if directives.is_empty() {
        return Err(LoggingError::Level(level.to_string()));
    }
    // sqlx logs every statement at info; that is noise unless asked for by name.
    if !directives.contains("sqlx") && matches!(lower.as_str(), "info" | "warn" | "warning") {
        directives.push_str(",sqlx=warn");
    }
    if debug_plugins {
        directives.push_str(",plugin=debug,jobschleuder::plugin=debug");
    }
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|_| LoggingError::Level(level.to_string()))
}

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(
    level: &str,
    handler: &LogHandler,
    uuid: Option<String>,
    debug_plugins: bool,
) -> Result<(), LoggingError> {
    let filter = filter(level, debug_plugins)?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match handler {
        LogHandler::Stderr => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .event_format(Tagged::new(uuid))
            .try_init(),
        LogHandler::Stdout => builder
            .with_ansi(std::io::stdout().is_terminal())
            .with_writer(std::io::stdout)
            .event_format(Tagged::new(uuid))
            .try_init(),
        LogHandler::Json => builder
            .with_writer(std::io::stderr)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLine { uuid })
            .try_init(),
        LogHandler::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LoggingError::File {
                    path: path.clone(),
                    source,
                })?;
            builder
                .with_ansi(false)
                .with_writer(Mutex::new(file))
                .event_format(Tagged::new(uuid))
                .try_init()
        }
    };
    // A subscriber already installed (tests) is fine.
    let _ = result;
    Ok(())
}

/// The default text format with `uuid=<id>` in front of every line.
struct Tagged {
    uuid: Option<String>,
    inner: tracing_subscriber::fmt::format::Format,
}

impl Tagged {
    fn new(uuid: Option<String>) -> Self {
        Tagged {
            uuid,
            inner: tracing_subscriber::fmt::format::Format::default(),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Tagged
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if let Some(uuid) = &self.uuid {
            write!(writer, "uuid={uuid} ")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// One JSON object per line: timestamp, level, target, uuid, the event's fields, and its spans'.
struct JsonLine {
    uuid: Option<String>,
}

impl<S> FormatEvent<S, JsonFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into(),
        );
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        if let Some(uuid) = &self.uuid {
            line.insert("uuid".into(), uuid.clone().into());
        }
        if let Some(scope) = ctx.event_scope() {
            let mut spans = Vec::new();
            for span in scope.from_root() {
                let mut entry = serde_json::Map::new();
                entry.insert("name".into(), span.name().into());
                if let Some(fields) = span.extensions().get::<FormattedFields<JsonFields>>() {
                    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(fields) {
                        entry.extend(map);
                    }
                }
                spans.push(serde_json::Value::Object(entry));
            }
            if !spans.is_empty() {
                line.insert("spans".into(), spans.into());
            }
        }
        let mut visitor = JsonVisitor(&mut line);
        event.record(&mut visitor);
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_in_any_case_and_full_filters() {
        assert!(filter("DEBUG", false).is_ok());
        assert!(filter("Warning", false).is_ok());
        assert!(filter("info,jobschleuder::store=trace", true).is_ok());
        assert!(filter("", false).is_err());
        assert!(filter("lots=of=equals", false).is_err());
    }

    #[test]
    fn handlers() {
        assert_eq!(LogHandler::parse("json"), LogHandler::Json);
        assert_eq!(
            LogHandler::parse("/var/log/js.log"),
            LogHandler::File("/var/log/js.log".into())
        );
    }
}
