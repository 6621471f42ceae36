//! `http`: calls a URL — health checks, triggering other systems.
//!
//! Arguments:
//! - `url` (required); `method` (default GET); `headers` (a mapping).
//! - `body`: a string is sent as it is; any other JSON value is sent as JSON with
//!   `Content-Type: application/json`.
//! - `timeout`: seconds for the whole exchange (default 30).
//! - `expect_status`: a status or a list of them that count as success (default: any 2xx).
//! - `follow_redirects`: default true (up to 5).
//!
//! `{name}` or `{name.field.field}` in `url`, in header values and in the strings of `body` is
//! replaced by that argument (text as it is, numbers and booleans written out, `null` as
//! nothing, objects and lists as JSON), so a job chained after another (`on_failure`) can post
//! `{trigger_run.job}`, `{trigger_run.status}` and `{trigger_run.error}` to a chat webhook.
//! Braces that name no argument stay as written. In `url`, a placeholder at its very start (a
//! base URL) goes in as it is and every other value is percent-encoded; in header values,
//! control characters become spaces.
//!
//! The result has `status`, `body` (the first 64 KiB, text), `body_truncated`, `json` (the body
//! parsed, when it is JSON), `headers` and `duration_ms`. Connection problems, timeouts, 429 and
//! 5xx are retryable failures; other unexpected statuses are not.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

use jobschleuder_plugin::{jobschleuder, json, serde_json, Args, JobError, Value};
use serde::Deserialize;

const BODY_LIMIT: usize = 64 * 1024;

/// `text` percent-encoded as data: every byte but letters, digits and `-._~`.
fn url_encoded(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The URL with its placeholders filled: one at its very start is the base URL and goes in
/// as it is; every other value is data and is percent-encoded (`a&b=c`, `#`, `50%`, spaces
/// and line breaks cannot change the URL's shape).
fn fill_url(url: &str, args: &Args) -> String {
    match url.strip_prefix('{').and_then(|rest| {
        let close = rest.find('}')?;
        lookup(args, &rest[..close])?;
        Some(close + 2)
    }) {
        Some(end) => {
            let base = fill(&url[..end], args, str::to_string);
            base + &fill(&url[end..], args, url_encoded)
        }
        None => fill(url, args, url_encoded),
    }
}

/// `text` with each `{path}` that names an argument replaced by it (passed through `escape`),
/// in one pass.
fn fill(text: &str, args: &Args, escape: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let found = after
            .find('}')
            .and_then(|close| lookup(args, &after[..close]).map(|value| (value, close)));
        match found {
            Some((value, close)) => {
                match value {
                    Value::String(text) => out.push_str(&escape(text)),
                    Value::Null => {}
                    other => out.push_str(&escape(&other.to_string())),
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The argument at a dotted path (`trigger_run.error`), if there is one.
fn lookup<'a>(args: &'a Args, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut value = args.get(parts.next()?.trim())?;
    for part in parts {
        value = value.as_object()?.get(part.trim())?;
    }
    Some(value)
}

/// Every string within `value` filled in (see [`fill`]).
fn fill_strings(value: Value, args: &Args) -> Value {
    match value {
        Value::String(text) => Value::String(fill(&text, args, str::to_string)),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| fill_strings(v, args)).collect())
        }
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k, fill_strings(v, args)))
                .collect(),
        ),
        other => other,
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Expect {
    One(u16),
    Many(Vec<u16>),
}

#[derive(Debug, Deserialize)]
struct Spec {
    url: Option<String>,
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<Value>,
    timeout: Option<f64>,
    expect_status: Option<Expect>,
    follow_redirects: Option<bool>,
}

#[jobschleuder("http")]
fn http(args: Args) -> Result<Value, JobError> {
    let mut spec: Spec = serde_json::from_value(Value::Object(args.clone()))
        .map_err(|e| JobError::fatal(format!("http: bad arguments: {e}")))?;
    spec.url = spec.url.map(|url| fill_url(&url, &args));
    for value in spec.headers.values_mut() {
        *value = fill(value, &args, |text| {
            text.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect()
        });
    }
    spec.body = spec.body.map(|body| fill_strings(body, &args));
    let url = spec.url.as_deref().ok_or("http: missing `url`")?;
    let method = spec.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
    let timeout = Duration::from_secs_f64(spec.timeout.filter(|t| *t > 0.0).unwrap_or(30.0));
    let agent = ureq::AgentBuilder::new()
        .timeout(timeout)
        .redirects(if spec.follow_redirects.unwrap_or(true) {
            5
        } else {
            0
        })
        .build();
    let mut request = agent.request(&method, url);
    for (name, value) in &spec.headers {
        request = request.set(name, value);
    }
    let started = Instant::now();
    let response = match &spec.body {
        None | Some(Value::Null) => request.call(),
        Some(Value::String(text)) => request.send_string(text.as_str()),
        Some(value) => request
            .set("Content-Type", "application/json")
            .send_string(&value.to_string()),
    };
    let response = match response {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(ureq::Error::Transport(transport)) => {
            return Err(JobError::retryable(format!(
                "http: {method} {url} failed: {transport}"
            )));
        }
    };
    let status = response.status();
    let headers: BTreeMap<String, String> = response
        .headers_names()
        .into_iter()
        .filter_map(|name| {
            response
                .header(&name)
                .map(|v| (name.clone(), v.to_string()))
        })
        .collect();
    let mut body = Vec::new();
    let read = response
        .into_reader()
        .take(BODY_LIMIT as u64 + 1)
        .read_to_end(&mut body);
    if let Err(e) = read {
        return Err(JobError::retryable(format!(
            "http: reading the response of {method} {url} failed: {e}"
        )));
    }
    let truncated = body.len() > BODY_LIMIT;
    body.truncate(BODY_LIMIT);
    let text = String::from_utf8_lossy(&body).into_owned();
    let parsed = if truncated {
        None
    } else {
        serde_json::from_str::<Value>(&text).ok()
    };
    let result = json!({
        "method": method,
        "url": url,
        "status": status,
        "headers": headers,
        "body": text,
        "body_truncated": truncated,
        "json": parsed,
        "duration_ms": started.elapsed().as_millis() as u64,
    });
    let expected = match &spec.expect_status {
        None => (200..300).contains(&status),
        Some(Expect::One(code)) => *code == status,
        Some(Expect::Many(codes)) => codes.contains(&status),
    };
    if expected {
        Ok(result)
    } else {
        let message = format!("http: {method} {url} answered {status}");
        let error = if status == 429 || status >= 500 {
            JobError::retryable(message)
        } else {
            JobError::fatal(message)
        };
        Err(error.with_details(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A one-shot HTTP server on loopback answering `status` and `body`; returns the URL and a
    /// handle yielding the request line and body it saw.
    fn serve(
        status: u16,
        body: &'static str,
    ) -> (String, std::thread::JoinHandle<(String, String)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/check", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body_in = vec![0; length];
            reader.read_exact(&mut body_in).unwrap();
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            (request_line, String::from_utf8(body_in).unwrap())
        });
        (url, handle)
    }

    fn call(args: Value) -> Result<Value, JobError> {
        http(args.as_object().cloned().unwrap())
    }

    #[test]
    fn placeholders_fill_url_headers_and_body_strings_from_arguments() {
        let (url, server) = serve(200, "{}");
        let base = url.trim_end_matches("/check").to_string();
        let result = call(json!({
            "url": "{base}/{path}?job={trigger_run.job}&error={trigger_run.error}",
            "base": base,
            "path": "check",
            "method": "POST",
            "headers": {"X-Run": "{trigger_run.id}", "X-Error": "{trigger_run.error}"},
            "body": {
                "text": "{trigger_run.job} ended {trigger_run.status}: {trigger_run.error}{trigger_run.none}",
                "attempts": ["{trigger_run.result.attempts}", "{not_an_argument}", "{}"],
            },
            "trigger_run": {
                "id": "r-1", "job": "backup sw1", "status": "failed",
                "error": "exit 3\nline 2 & a=b#%50", "none": null, "result": {"attempts": 2},
            },
        }))
        .unwrap();
        assert_eq!(result["status"], 200);
        let (line, body) = server.join().unwrap();
        assert!(
            line.starts_with(
                "POST /check?job=backup%20sw1&error=exit%203%0Aline%202%20%26%20a%3Db%23%2550 "
            ),
            "{line}"
        );
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            json!({"text": "backup sw1 ended failed: exit 3\nline 2 & a=b#%50", "attempts": ["2", "{not_an_argument}", "{}"]})
        );
    }

    #[test]
    fn get_parses_json() {
        let (url, server) = serve(200, r#"{"ok":true}"#);
        let result = call(json!({"url": url})).unwrap();
        assert_eq!(result["status"], 200);
        assert_eq!(result["json"]["ok"], true);
        assert!(server.join().unwrap().0.starts_with("GET /check"));
    }

    #[test]
    fn post_sends_json_and_checks_the_status() {
        let (url, server) = serve(201, "{}");
        let result =
            call(json!({"url": url, "method": "post", "body": {"a": 1}, "expect_status": [201]}))
                .unwrap();
        assert_eq!(result["status"], 201);
        let (line, body) = server.join().unwrap();
        assert!(line.starts_with("POST"));
        assert_eq!(body, r#"{"a":1}"#);
    }

    #[test]
    fn unexpected_statuses_fail() {
        let (url, server) = serve(503, "down");
        let err = call(json!({"url": url})).unwrap_err();
        assert!(
            err.retryable && err.message.contains("503"),
            "{}",
            err.message
        );
        server.join().unwrap();
        let (url, server) = serve(404, "gone");
        let err = call(json!({"url": url})).unwrap_err();
        assert!(!err.retryable);
        assert_eq!(err.details.unwrap()["body"], "gone");
        server.join().unwrap();
    }

    #[test]
    fn connection_refused_is_retryable() {
        // A port bound but never listened on: a connection to it is refused, and it stays this
        // test's while the test runs (a port freed again could be taken at once by another
        // test's server, running in parallel, which would then answer).
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&any.into()).unwrap();
        let port = socket.local_addr().unwrap().as_socket().unwrap().port();
        let err =
            call(json!({"url": format!("http://127.0.0.1:{port}/"), "timeout": 2})).unwrap_err();
        assert!(err.retryable, "{}", err.message);
        assert!(call(json!({}))
            .unwrap_err()
            .message
            .contains("missing `url`"));
    }
}
