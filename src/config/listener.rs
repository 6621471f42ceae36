//! The `listener:` section: where it listens, the API token, and the hooks that turn webhooks
//! into runs. Everything is checked when the file loads (templates, filters, regular
//! expressions, addresses, that every hook authenticates its sender), so that a bad hook stops
//! the listener at start-up, or is refused by a reload, with its name in the message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::{ConfigError, Secret};

/// Overrides `listener.api_token`.
pub const ENV_LISTENER_API_TOKEN: &str = "JOBSCHLEUDER_LISTENER_API_TOKEN";

pub const DEFAULT_BIND: &str = "127.0.0.1:8080";
const DEFAULT_MAX_BODY: usize = 1024 * 1024;
const DEFAULT_DEDUPE_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub bind: SocketAddr,
    /// The bearer token of `/api`; `None`: the API answers 401 to everyone.
    pub api_token: Option<Secret>,
    /// Peers whose `X-Forwarded-For` is believed (the reverse proxy).
    pub trusted_proxies: Vec<IpNet>,
    pub hooks: BTreeMap<String, Hook>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            bind: DEFAULT_BIND.parse().expect("a valid address"),
            api_token: None,
            trusted_proxies: Vec::new(),
            hooks: BTreeMap::new(),
        }
    }
}

impl ListenerConfig {
    /// Every secret of the section, for redaction.
    pub fn secret_values(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .api_token
            .iter()
            .map(|s| s.expose().to_string())
            .collect();
        for hook in self.hooks.values() {
            out.extend(hook.secrets.iter().map(|s| s.expose().to_string()));
            out.extend(hook.tokens.iter().map(|s| s.expose().to_string()));
        }
        out
    }
}

/// One hook: `POST /hooks/<name>`.
#[derive(Debug, Clone)]
pub struct Hook {
    pub name: String,
    /// The job's name (its `id` in the job file).
    pub job: String,
    /// HMAC keys; any one of them may have signed (rotation).
    pub secrets: Vec<Secret>,
    pub signature: Option<Signature>,
    /// Bearer tokens; any one of them is accepted.
    pub tokens: Vec<Secret>,
    pub allow: Vec<IpNet>,
    /// Merged over the job's own arguments; strings are templates.
    pub arguments: serde_json::Map<String, serde_json::Value>,
    pub filter: Option<Filter>,
    pub for_each: Option<Template>,
    pub dedupe: Option<Dedupe>,
    pub dedupe_ttl: Duration,
    pub debounce: Option<Duration>,
    /// The debounce key; `None`: the rendered arguments.
    pub debounce_key: Option<Template>,
    pub max_body: usize,
    pub rate: Option<Rate>,
}

/// How a sender signs its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The scheme's name as configured (`nautobot`, `netbox`, `github`, `generic`).
    pub scheme: String,
    pub header: String,
    pub algorithm: Algorithm,
    /// Text before the digest in the header (`sha256=` for GitHub).
    pub prefix: String,
    pub encoding: Encoding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Hex,
    Base64,
}

#[derive(Debug, Clone)]
pub enum Dedupe {
    /// The value of this request header (`X-GitHub-Delivery`).
    Header(String),
    /// A template over the request.
    Key(Template),
}

/// At most `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// Which webhooks a hook takes.
#[derive(Debug, Clone)]
pub enum Filter {
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Condition { path: FieldPath, test: Test },
}

#[derive(Debug, Clone)]
pub enum Test {
    Equals(serde_json::Value),
    In(Vec<serde_json::Value>),
    Matches(regex::Regex),
    Exists(bool),
}

/// A dotted path into the request: `data.name`, `headers.x-github-event`, `data.tags.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(pub Vec<String>);

impl FieldPath {
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("an empty field path".into());
        }
        let parts: Vec<String> = text.split('.').map(str::to_string).collect();
        if parts
            .iter()
            .any(|p| p.is_empty() || p.contains(char::is_whitespace))
        {
            return Err(format!(
                "{text:?} is not a field path (names joined by dots, such as data.name)"
            ));
        }
        Ok(FieldPath(parts))
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// Text with `{{ path }}` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(pub Vec<Part>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Field(FieldPath),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| format!("{text:?}: a \"{{{{\" without its \"}}}}\""))?;
            parts.push(Part::Field(
                FieldPath::parse(&after[..end]).map_err(|e| format!("{text:?}: {e}"))?,
            ));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template(parts))
    }

    /// The one field when the template is exactly `{{ field }}` (its value keeps its type).
    pub fn single_field(&self) -> Option<&FieldPath> {
        match self.0.as_slice() {
            [Part::Field(path)] => Some(path),
            _ => None,
        }
    }
}

// ---- the section as written ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    bind: Option<String>,
    api_token: Option<SecretSource>,
    trusted_proxies: Option<Vec<String>>,
    hooks: Option<BTreeMap<String, RawHook>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    job: String,
    secret: Option<SecretSource>,
    secrets: Option<Vec<SecretSource>>,
    signature: Option<RawSignature>,
    token: Option<SecretSource>,
    tokens: Option<Vec<SecretSource>>,
    allow: Option<Vec<String>>,
    arguments: Option<serde_json::Map<String, serde_json::Value>>,
    filter: Option<serde_json::Value>,
    for_each: Option<String>,
    dedupe: Option<RawDedupe>,
    dedupe_ttl: Option<RawDuration>,
    debounce: Option<RawDuration>,
    debounce_key: Option<String>,
    max_body: Option<RawSize>,
    rate: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSignature {
    Named(String),
    Generic(RawGenericSignature),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGenericSignature {
    header: String,
    algorithm: Option<String>,
    prefix: Option<String>,
    encoding: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDedupe {
    header: Option<String>,
    key: Option<String>,
}

/// A secret written in the file, or where to find it: `{env: NAME}` or `{file: PATH}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SecretSource {
    Value(Secret),
    Reference(SecretReference),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretReference {
    env: Option<String>,
    file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Seconds(f64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

/// Builds the section; `origin` names the file for messages, `base_dir` resolves secret files.
pub(super) fn build(
    raw: Option<RawListener>,
    origin: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ListenerConfig, ConfigError> {
    let raw = raw.unwrap_or_default();
    let invalid = |key: String, message: String| ConfigError::Invalid {
        origin: origin.to_string(),
        key,
        message,
    };
    let secret = |key: String, source: SecretSource| -> Result<Secret, ConfigError> {
        resolve_secret(source, base_dir, env).map_err(|message| invalid(key, message))
    };
    let bind_text = raw.bind.unwrap_or_else(|| DEFAULT_BIND.to_string());
    let bind = bind_text.parse().map_err(|_| {
        invalid(
            "listener.bind".into(),
            format!(
                "{bind_text:?} is not an address and port, such as 127.0.0.1:8080 or [::]:8080"
            ),
        )
    })?;
    let mut api_token = match raw.api_token {
        Some(source) => Some(secret("listener.api_token".into(), source)?),
        None => None,
    };
    if let Some(token) = env(ENV_LISTENER_API_TOKEN).filter(|t| !t.is_empty()) {
        api_token = Some(Secret::new(token));
    }
    let trusted_proxies = networks(raw.trusted_proxies.unwrap_or_default())
        .map_err(|m| invalid("listener.trusted_proxies".into(), m))?;

    let mut hooks = BTreeMap::new();
    for (name, hook) in raw.hooks.unwrap_or_default() {
        let key = |field: &str| format!("listener.hooks.{name}.{field}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                format!("listener.hooks.{name}"),
                "a hook's name is its URL path (/hooks/<name>): use letters, digits, '-', '_' and '.'".into(),
            ));
        }
        let mut secrets = Vec::new();
        if let Some(source) = hook.secret {
            secrets.push(secret(key("secret"), source)?);
        }
        for (i, source) in hook.secrets.unwrap_or_default().into_iter().enumerate() {
            secrets.push(secret(format!("{}[{i}]", key("secrets")), source)?);
        }
        let mut tokens = Vec::new();
        if let Some(source) = hook.token {
            tokens.push(secret(key("token"), source)?);
        }
        for (i, source) in hook.tokens.unwrap_or_default().into_iter().enumerate() {
            tokens.push(secret(format!("{}[{i}]", key("tokens")), source)?);
        }
        let signature = match (hook.signature, secrets.is_empty()) {
            (Some(_), true) => {
                return Err(invalid(
                    key("signature"),
                    "a signature needs the key it is made with: set `secret` (or `secrets` to rotate)".into(),
                ))
            }
            (None, true) => None,
            (None, false) => Some(named_signature("nautobot").expect("a known scheme")),
            (Some(RawSignature::Named(scheme)), false) => {
                Some(named_signature(&scheme).ok_or_else(|| {
                    invalid(
                        key("signature"),
                        format!("{scheme:?}: use nautobot, netbox, github, or generic settings ({{header, algorithm, prefix, encoding}})"),
                    )
                })?)
            }
            (Some(RawSignature::Generic(generic)), false) => Some(
                generic_signature(generic).map_err(|m| invalid(key("signature"), m))?,
            ),
        };
        if secrets.is_empty() && tokens.is_empty() {
            return Err(invalid(
                format!("listener.hooks.{name}"),
                "the hook does not authenticate its sender: set `secret` (a signing key) or `token` (a bearer token)".into(),
            ));
        }
        let allow =
            networks(hook.allow.unwrap_or_default()).map_err(|m| invalid(key("allow"), m))?;
        let arguments = hook.arguments.unwrap_or_default();
        check_templates(&serde_json::Value::Object(arguments.clone()))
            .map_err(|m| invalid(key("arguments"), m))?;
        let filter = match hook.filter {
            Some(value) => Some(parse_filter(&value).map_err(|m| invalid(key("filter"), m))?),
            None => None,
        };
        let for_each = match hook.for_each {
            Some(text) => Some(Template(vec![Part::Field(
                FieldPath::parse(&text).map_err(|m| invalid(key("for_each"), m))?,
            )])),
            None => None,
        };
        let dedupe = match hook.dedupe {
            None => None,
            Some(RawDedupe {
                header: Some(header),
                key: None,
            }) => Some(Dedupe::Header(header.to_ascii_lowercase())),
            Some(RawDedupe {
                header: None,
                key: Some(text),
            }) => Some(Dedupe::Key(
                Template::parse(&text).map_err(|m| invalid(key("dedupe.key"), m))?,
            )),
            Some(_) => {
                return Err(invalid(
                    key("dedupe"),
                    "give either `header` (a request header such as X-GitHub-Delivery) or `key` (a template)".into(),
                ))
            }
        };
        let dedupe_ttl = match hook.dedupe_ttl {
            Some(raw) => duration(raw).map_err(|m| invalid(key("dedupe_ttl"), m))?,
            None => DEFAULT_DEDUPE_TTL,
        };
        let debounce = match hook.debounce {
            Some(raw) => Some(duration(raw).map_err(|m| invalid(key("debounce"), m))?),
            None => None,
        };
        let debounce_key = match hook.debounce_key {
            Some(text) if debounce.is_some() => {
                Some(Template::parse(&text).map_err(|m| invalid(key("debounce_key"), m))?)
            }
            Some(_) => {
                return Err(invalid(
                    key("debounce_key"),
                    "has no effect without `debounce` (a window such as 30s)".into(),
                ))
            }
            None => None,
        };
        let max_body = match hook.max_body {
            Some(raw) => size(raw).map_err(|m| invalid(key("max_body"), m))?,
            None => DEFAULT_MAX_BODY,
        };
        let rate = match hook.rate {
            Some(text) => Some(parse_rate(&text).map_err(|m| invalid(key("rate"), m))?),
            None => None,
        };
        hooks.insert(
            name.clone(),
            Hook {
                name,
                job: hook.job,
                secrets,
                signature,
                tokens,
                allow,
                arguments,
                filter,
                for_each,
                dedupe,
                dedupe_ttl,
                debounce,
                debounce_key,
                max_body,
                rate,
            },
        );
    }
    Ok(ListenerConfig {
        bind,
        api_token,
        trusted_proxies,
        hooks,
    })
}

fn resolve_secret(
    source: SecretSource,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, String> {
    let secret = match source {
        SecretSource::Value(secret) => secret,
        SecretSource::Reference(SecretReference {
            env: Some(name),
            file: None,
        }) => Secret::new(env(&name).ok_or_else(|| {
            format!("the environment variable {name} is not set (the secret is read from it)")
        })?),
        SecretSource::Reference(SecretReference {
            env: None,
            file: Some(path),
        }) => {
            let path = if path.is_absolute() {
                path
            } else {
                base_dir.join(path)
            };
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read the secret from {}: {e}", path.display()))?;
            Secret::new(text.trim_end_matches(['\n', '\r']))
        }
        SecretSource::Reference(_) => {
            return Err("write the secret itself, {env: VARIABLE} or {file: PATH}".into())
        }
    };
    if secret.expose().is_empty() {
        return Err("is empty".into());
    }
    Ok(secret)
}

fn named_signature(scheme: &str) -> Option<Signature> {
    let (header, algorithm, prefix) = match scheme {
        // Both send the hex HMAC-SHA512 of the body.
        "nautobot" | "netbox" => ("x-hook-signature", Algorithm::Sha512, ""),
        "github" => ("x-hub-signature-256", Algorithm::Sha256, "sha256="),
        _ => return None,
    };
    Some(Signature {
        scheme: scheme.to_string(),
        header: header.to_string(),
        algorithm,
        prefix: prefix.to_string(),
        encoding: Encoding::Hex,
    })
}

fn generic_signature(raw: RawGenericSignature) -> Result<Signature, String> {
    let algorithm = match raw.algorithm.as_deref() {
        None | Some("sha256") => Algorithm::Sha256,
        Some("sha512") => Algorithm::Sha512,
        Some(other) => return Err(format!("algorithm {other:?}: use sha256 or sha512")),
    };
    let encoding = match raw.encoding.as_deref() {
        None | Some("hex") => Encoding::Hex,
        Some("base64") => Encoding::Base64,
        Some(other) => return Err(format!("encoding {other:?}: use hex or base64")),
    };
    if raw.header.trim().is_empty() {
        return Err("header: name the header that carries the signature".into());
    }
    Ok(Signature {
        scheme: "generic".into(),
        header: raw.header.trim().to_ascii_lowercase(),
        algorithm,
        prefix: raw.prefix.unwrap_or_default(),
        encoding,
    })
}

fn networks(items: Vec<String>) -> Result<Vec<IpNet>, String> {
    items
        .into_iter()
        .map(|text| {
            let text = text.trim();
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!(
                        "{text:?} is not an address or network (such as 10.0.0.0/8 or 192.0.2.7)"
                    )
                })
        })
        .collect()
}

/// Checks every string in `value` is a valid template.
fn check_templates(value: &serde_json::Value) -> Result<(), String> {
    match value {
        serde_json::Value::String(text) => Template::parse(text).map(|_| ()),
        serde_json::Value::Array(items) => items.iter().try_for_each(check_templates),
        serde_json::Value::Object(map) => map.values().try_for_each(check_templates),
        _ => Ok(()),
    }
}

fn parse_filter(value: &serde_json::Value) -> Result<Filter, String> {
    let serde_json::Value::Object(map) = value else {
        return Err(format!(
            "{value}: a filter is {{all: [...]}}, {{any: [...]}} or a condition {{path, equals | in | matches | exists}}"
        ));
    };
    for group in ["all", "any"] {
        if let Some(items) = map.get(group) {
            if map.len() != 1 {
                return Err(format!("`{group}` stands alone in its filter"));
            }
            let serde_json::Value::Array(items) = items else {
                return Err(format!("`{group}` takes a list of conditions"));
            };
            let parsed = items
                .iter()
                .map(parse_filter)
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(if group == "all" {
                Filter::All(parsed)
            } else {
                Filter::Any(parsed)
            });
        }
    }
    let path = match map.get("path") {
        Some(serde_json::Value::String(path)) => FieldPath::parse(path)?,
        _ => return Err(format!("{value}: a condition names its field with `path`")),
    };
    let tests: Vec<&String> = map.keys().filter(|k| k.as_str() != "path").collect();
    let [test] = tests.as_slice() else {
        return Err(format!(
            "condition on {path}: give exactly one of equals, in, matches, exists"
        ));
    };
    let argument = &map[test.as_str()];
    let test = match test.as_str() {
        "equals" => Test::Equals(argument.clone()),
        "in" => match argument {
            serde_json::Value::Array(items) => Test::In(items.clone()),
            _ => return Err(format!("condition on {path}: `in` takes a list")),
        },
        "matches" => match argument {
            serde_json::Value::String(pattern) => Test::Matches(
                regex::Regex::new(pattern)
                    .map_err(|e| format!("condition on {path}: `matches`: {e}"))?,
            ),
            _ => {
                return Err(format!(
                    "condition on {path}: `matches` takes a regular expression"
                ))
            }
        },
        "exists" => match argument {
            serde_json::Value::Bool(exists) => Test::Exists(*exists),
            _ => return Err(format!("condition on {path}: `exists` takes true or false")),
        },
        other => {
            return Err(format!(
                "condition on {path}: {other:?} is not a test: use equals, in, matches or exists"
            ))
        }
    };
    Ok(Filter::Condition { path, test })
}

fn duration(raw: RawDuration) -> Result<Duration, String> {
    match raw {
        RawDuration::Seconds(s) if s.is_finite() && s >= 0.0 => Ok(Duration::from_secs_f64(s)),
        RawDuration::Seconds(s) => Err(format!("{s} is not a number of seconds")),
        RawDuration::Text(text) => humantime::parse_duration(text.trim())
            .map_err(|e| format!("{text:?}: {e} (write a duration such as 30s, 10m or 24h)")),
    }
}

fn size(raw: RawSize) -> Result<usize, String> {
    let bytes = match raw {
        RawSize::Bytes(n) => n,
        RawSize::Text(text) => {
            let t = text.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (number, unit) = t.split_at(split);
            let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
                "" | "b" => 1,
                "k" | "kb" => 1000,
                "kib" => 1024,
                "m" | "mb" => 1_000_000,
                "mib" => 1024 * 1024,
                _ => {
                    return Err(format!(
                        "{text:?}: write bytes, or a size such as 512KiB or 4MiB"
                    ))
                }
            };
            number
                .parse::<u64>()
                .map_err(|_| format!("{text:?}: write bytes, or a size such as 512KiB or 4MiB"))?
                * factor
        }
    };
    if bytes == 0 {
        return Err("must be at least 1 byte".into());
    }
    usize::try_from(bytes).map_err(|_| "too large".to_string())
}

fn parse_rate(text: &str) -> Result<Rate, String> {
    let usage = || format!("{text:?}: write requests per time, such as 60/min, 5/s or 1000/h");
    let (count, unit) = text.split_once('/').ok_or_else(usage)?;
    let count: u32 = count.trim().parse().map_err(|_| usage())?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "min" | "minute" | "m" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(usage()),
    };
    if count == 0 {
        return Err(format!("{text:?}: at least 1 request"));
    }
    Ok(Rate { count, per })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_str_with_env(Path::new("/etc/js/config.yaml"), text, &|key| {
            (key == "HOOK_SECRET").then(|| "from-env".to_string())
        })
    }

    fn error(text: &str) -> String {
        load(text).expect_err("refused").to_string()
    }

    #[test]
    fn hooks_load_with_their_defaults() {
        let config = load(
            "listener:
  api_token: {env: HOOK_SECRET}
  trusted_proxies: [127.0.0.1, 10.0.0.0/8]
  hooks:
    nautobot:
      job: backup
      secret: s3cret
      arguments: {device: '{{ data.name }}'}
      filter: {all: [{path: event, in: [created, updated]}, {any: [{path: data.name, matches: '^sw'}]}]}
      debounce: 30s
    github:
      job: backup
      secrets: [old, {env: HOOK_SECRET}]
      signature: github
      dedupe: {header: X-GitHub-Delivery}
      dedupe_ttl: 2h
      rate: 60/min
      max_body: 64KiB
",
        )
        .unwrap();
        let listener = &config.listener;
        assert_eq!(listener.bind.to_string(), DEFAULT_BIND);
        assert_eq!(listener.api_token.as_ref().unwrap().expose(), "from-env");
        assert_eq!(listener.trusted_proxies.len(), 2);
        let nautobot = &listener.hooks["nautobot"];
        let signature = nautobot.signature.as_ref().unwrap();
        assert_eq!(
            (signature.header.as_str(), signature.algorithm),
            ("x-hook-signature", Algorithm::Sha512)
        );
        assert_eq!(nautobot.debounce, Some(Duration::from_secs(30)));
        assert_eq!(nautobot.dedupe_ttl, DEFAULT_DEDUPE_TTL);
        assert_eq!(nautobot.max_body, DEFAULT_MAX_BODY);
        let github = &listener.hooks["github"];
        assert_eq!(github.secrets[1].expose(), "from-env");
        assert_eq!(github.signature.as_ref().unwrap().prefix, "sha256=");
        assert!(matches!(&github.dedupe, Some(Dedupe::Header(h)) if h == "x-github-delivery"));
        assert_eq!(github.dedupe_ttl, Duration::from_secs(7200));
        assert_eq!(
            github.rate,
            Some(Rate {
                count: 60,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(github.max_body, 64 * 1024);
        assert!(config.secret_values().contains(&"s3cret".to_string()));
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn bad_hooks_are_refused_naming_the_key() {
        let hook = |body: &str| format!("listener:\n  hooks:\n    h1:\n      job: backup\n{body}");
        for (text, key, words) in [
            (hook(""), "listener.hooks.h1", "does not authenticate"),
            (
                hook("      signature: github\n"),
                "listener.hooks.h1.signature",
                "needs the key",
            ),
            (
                hook("      secret: s\n      signature: gitlab\n"),
                "listener.hooks.h1.signature",
                "\"gitlab\"",
            ),
            (
                hook("      secret: {env: NOPE}\n"),
                "listener.hooks.h1.secret",
                "NOPE is not set",
            ),
            (
                hook("      secret: {file: missing.secret}\n"),
                "listener.hooks.h1.secret",
                "/etc/js/missing.secret",
            ),
            (
                hook("      token: t\n      filter: {path: model, matches: '('}\n"),
                "listener.hooks.h1.filter",
                "matches",
            ),
            (
                hook("      token: t\n      filter: {path: model, like: x}\n"),
                "listener.hooks.h1.filter",
                "\"like\"",
            ),
            (
                hook("      token: t\n      arguments: {device: '{{ data.name'}\n"),
                "listener.hooks.h1.arguments",
                "without",
            ),
            (
                hook("      token: t\n      rate: lots\n"),
                "listener.hooks.h1.rate",
                "60/min",
            ),
            (
                hook("      token: t\n      debounce: soon\n"),
                "listener.hooks.h1.debounce",
                "30s",
            ),
            (
                hook("      token: t\n      dedupe: {header: a, key: b}\n"),
                "listener.hooks.h1.dedupe",
                "either",
            ),
            (
                hook("      token: t\n      allow: [10.0.0.0/33]\n"),
                "listener.hooks.h1.allow",
                "10.0.0.0/33",
            ),
            (
                hook("      token: t\n      max_body: 2 bushels\n"),
                "listener.hooks.h1.max_body",
                "512KiB",
            ),
            (
                "listener:\n  bind: localhost\n".to_string(),
                "listener.bind",
                "127.0.0.1:8080",
            ),
            (
                "listener:\n  hooks:\n    'a b':\n      job: x\n      token: t\n".to_string(),
                "listener.hooks.a b",
                "URL path",
            ),
        ] {
            let message = error(&text);
            assert!(message.contains(key), "{key}: {message}");
            assert!(message.contains(words), "{words}: {message}");
        }
    }
}
