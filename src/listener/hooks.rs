//! `POST /hooks/<name>`: a webhook becomes runs.
//!
//! Checks run in this order, each answering `{"error": ...}` and changing nothing: unknown
//! hook 404, address not allowed 403, body over `max_body` 413, signature or token 401, not
//! JSON by media type 415, malformed JSON 400, over `rate` 429. Then the filter (no match:
//! 200 `{"matched": false}`), the templates (a missing field: 422 naming it), the job and the
//! servers (503 when the database or RabbitMQ is down), and the runs: 202 with their ids once
//! their rows are committed; 200 with the first request's ids for a repeated dedupe key.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, RawQuery, Request, State as Shared};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::template::Request as View;
use super::{auth, Refusal, State, MAX_WAIT};
use crate::config::listener::{Dedupe, Hook};
use crate::store::{NewRun, WebhookKey, WebhookRun};

/// `X-Jobschleuder-Dry-Run: 1`: answer what would be created, create nothing.
pub const DRY_RUN_HEADER: &str = "x-jobschleuder-dry-run";

/// The answer, and what the log line says about it.
struct Answer {
    status: StatusCode,
    body: Value,
    outcome: &'static str,
    run_ids: Vec<Uuid>,
}

pub async fn hook(
    Shared(state): Shared<Arc<State>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    let started = Instant::now();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let hooks = state.hooks();
    let known = hooks.config.hooks.contains_key(&name);
    let result = handle(&state, &name, query.as_deref(), peer, request).await;
    let (response, status, outcome, reason, run_ids) = match result {
        Ok(answer) => {
            let response = (answer.status, Json(answer.body)).into_response();
            (
                response,
                answer.status,
                answer.outcome,
                String::new(),
                answer.run_ids,
            )
        }
        Err(refusal) => {
            let status = refusal.status;
            let reason = refusal.error.clone();
            (
                refusal.into_response(),
                status,
                "refused",
                reason,
                Vec::new(),
            )
        }
    };
    state
        .metrics
        .webhook_requests
        .with_label_values(&[
            if known { name.as_str() } else { "unknown" },
            status.as_str(),
        ])
        .inc();
    let ids: Vec<String> = run_ids.iter().map(Uuid::to_string).collect();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    if status.is_client_error() || status.is_server_error() {
        tracing::warn!(hook = %name, code = status.as_u16(), outcome, reason = %reason, elapsed_ms, "webhook refused");
    } else {
        tracing::info!(hook = %name, code = status.as_u16(), outcome, runs = %ids.join(","), elapsed_ms, "webhook");
    }
    response
}

async fn handle(
    state: &State,
    name: &str,
    query: Option<&str>,
    peer: Option<IpAddr>,
    request: Request,
) -> Result<Answer, Refusal> {
    let hooks = state.hooks();
    let hook =
        hooks.config.hooks.get(name).ok_or_else(|| {
            Refusal::new(StatusCode::NOT_FOUND, format!("no hook named {name:?}"))
        })?;
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;

    if !hook.allow.is_empty() {
        let client =
            peer.map(|peer| auth::client_address(peer, headers, &hooks.config.trusted_proxies));
        if !client.is_some_and(|ip| hook.allow.iter().any(|net| net.contains(&ip))) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "address {} is not allowed to call this hook",
                    client
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "(unknown)".into())
                ),
            ));
        }
    }
    let body = read_body(body, headers, hook.max_body).await?;
    if let Some(signature) = &hook.signature {
        auth::check_signature(signature, &hook.secrets, headers, &body)
            .map_err(|e| Refusal::new(StatusCode::UNAUTHORIZED, e))?;
    }
    if !hook.tokens.is_empty() {
        auth::check_bearer(&hook.tokens, headers)
            .map_err(|e| Refusal::new(StatusCode::UNAUTHORIZED, e))?;
    }
    if !is_json(headers) {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the payload as JSON (Content-Type: application/json)",
        ));
    }
    let payload: Value = serde_json::from_slice(&body)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    if let Err(wait) = hooks.check_rate(name) {
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut refusal = Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("over this hook's rate; try again in {seconds} s"),
        );
        refusal.retry_after = Some(seconds);
        return Err(refusal);
    }
    tracing::debug!(hook = %name, payload = %payload, "webhook payload");

    let wait = wait_param(query)?;
    let header_values = headers_value(headers, hook);
    let query_value = query_value(query);
    let view = View {
        body: &payload,
        headers: &header_values,
        query: &query_value,
        item: None,
    };
    if let Some(filter) = &hook.filter {
        if !view.passes(filter) {
            return Ok(Answer {
                status: StatusCode::OK,
                body: json!({"matched": false}),
                outcome: "not matched",
                run_ids: Vec::new(),
            });
        }
    }
    let items: Vec<Option<&Value>> = match &hook.for_each {
        None => vec![None],
        Some(template) => {
            let path = template.single_field().expect("for_each is one field");
            match view.lookup(path) {
                Some(Value::Array(items)) => items.iter().map(Some).collect(),
                Some(_) => {
                    return Err(Refusal::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("for_each: field {path} is not a list"),
                    ))
                }
                None => return Err(missing(&path.to_string())),
            }
        }
    };
    let dedupe = match &hook.dedupe {
        None => None,
        Some(Dedupe::Header(header)) => Some(
            headers
                .get(header.as_str())
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    Refusal::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("the dedupe header {header} is missing"),
                    )
                })?
                .to_string(),
        ),
        Some(Dedupe::Key(template)) => {
            Some(key_text(view.render(template).map_err(|f| missing(&f))?))
        }
    }
    .map(|key| WebhookKey {
        key,
        hold: hook.dedupe_ttl,
    });

    let job = match state.store.find_job(&hook.job).await {
        Ok(Some(job)) => job,
        Ok(None) => {
            return Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                "hook {name:?} names job {:?}, which is not in the registry; nothing was created",
                hook.job
            ),
            ))
        }
        Err(e) => return Err(Refusal::database(&e)),
    };
    let mut runs = Vec::with_capacity(items.len());
    for item in items {
        let view = View {
            item,
            ..view.clone()
        };
        let rendered = view
            .render_value(&Value::Object(hook.arguments.clone()))
            .map_err(|f| missing(&f))?;
        let debounce = match hook.debounce {
            None => None,
            Some(window) => Some(WebhookKey {
                key: match &hook.debounce_key {
                    Some(template) => key_text(view.render(template).map_err(|f| missing(&f))?),
                    None => format!("{}:{rendered}", hook.job),
                },
                hold: window,
            }),
        };
        let mut run = NewRun::of_job(&job, "webhook");
        if let Value::Object(rendered) = rendered {
            run.arguments.extend(rendered);
        }
        runs.push(WebhookRun { run, debounce });
    }

    if is_dry_run(headers) {
        return Ok(Answer {
            status: StatusCode::OK,
            body: dry_run(hook, &runs, dedupe.as_ref()),
            outcome: "dry run",
            run_ids: Vec::new(),
        });
    }
    if runs.is_empty() {
        return Ok(Answer {
            status: StatusCode::OK,
            body: json!({"run_ids": []}),
            outcome: "no runs (empty for_each list)",
            run_ids: Vec::new(),
        });
    }
    if !state.broker_ok().await {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "RabbitMQ is unavailable; nothing was created, try again later",
        ));
    }
    let outcome = state
        .store
        .create_webhook_runs(name, dedupe.as_ref(), &runs)
        .await
        .map_err(|e| Refusal::writing(&e))?;
    let now: Vec<Uuid> = outcome
        .created
        .iter()
        .filter(|(_, due)| due.is_none())
        .map(|(id, _)| *id)
        .collect();
    let delayed: Vec<Uuid> = outcome
        .created
        .iter()
        .filter(|(_, due)| due.is_some())
        .map(|(id, _)| *id)
        .collect();
    state.publish_later(now, tokio::time::Instant::now());
    if let Some(window) = hook.debounce {
        state.publish_later(
            delayed,
            tokio::time::Instant::now() + window + Duration::from_millis(50),
        );
    }
    let mut body = json!({
        "run_ids": outcome.run_ids,
        "status_url": format!("/api/runs/{}", outcome.run_ids[0]),
    });
    if outcome.duplicate {
        body["duplicate"] = json!(true);
    }
    let mut status = if outcome.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    if let Some(wait) = wait {
        if wait_for(state, &outcome.run_ids, wait, &mut body).await {
            status = StatusCode::OK;
        }
    }
    Ok(Answer {
        status,
        body,
        outcome: if outcome.duplicate {
            "duplicate"
        } else {
            "runs created"
        },
        run_ids: outcome.run_ids,
    })
}

fn missing(field: &str) -> Refusal {
    Refusal::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!("the request has no field {field} (which the hook's templates use)"),
    )
}

/// A rendered key as text: strings as they are, anything else as JSON.
fn key_text(value: Value) -> String {
    match value {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// The body, refused with 413 when it is larger than `limit`.
pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Vec<u8>, Refusal> {
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(e) => {
            let is_limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if is_limit {
                Err(too_large())
            } else {
                Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {e}"),
                ))
            }
        }
    }
}

/// Whether the media type is JSON (`application/json`, or any `+json` type).
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| {
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        })
}

fn is_dry_run(headers: &HeaderMap) -> bool {
    headers
        .get(DRY_RUN_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

fn dry_run(hook: &Hook, runs: &[WebhookRun], dedupe: Option<&WebhookKey>) -> Value {
    json!({
        "dry_run": true,
        "job": hook.job,
        "runs": runs.iter().map(|r| {
            let mut run = json!({"job": r.run.job_name, "arguments": r.run.arguments});
            if let (Some(key), Some(window)) = (&r.debounce, hook.debounce) {
                run["debounce"] = json!({"key": key.key, "window_seconds": window.as_secs_f64()});
            }
            run
        }).collect::<Vec<_>>(),
        "dedupe_key": dedupe.map(|k| k.key.clone()),
    })
}

/// Request headers for templates: lower-case names; repeated headers joined by ", ". Headers
/// that carry credentials (and the hook's signature) are left out, so that no template can
/// copy them into a run's arguments.
fn headers_value(headers: &HeaderMap, hook: &Hook) -> Value {
    let mut map = Map::new();
    for (name, value) in headers {
        let hidden = matches!(
            name.as_str(),
            "authorization" | "proxy-authorization" | "cookie"
        ) || hook
            .signature
            .as_ref()
            .is_some_and(|s| s.header == name.as_str());
        if hidden {
            continue;
        }
        let Ok(value) = value.to_str() else { continue };
        match map.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(value);
            }
            _ => {
                map.insert(name.as_str().to_string(), Value::String(value.to_string()));
            }
        }
    }
    Value::Object(map)
}

fn query_value(query: Option<&str>) -> Value {
    let map: Map<String, Value> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect();
    Value::Object(map)
}

/// `?wait=30s` (or seconds), at most [`MAX_WAIT`].
pub fn wait_param(query: Option<&str>) -> Result<Option<Duration>, Refusal> {
    let Some(text) = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "wait")
        .map(|(_, v)| v.into_owned())
    else {
        return Ok(None);
    };
    let wait = text
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .or_else(|| humantime::parse_duration(text.trim()).ok())
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("wait={text:?}: write a duration such as 30s"),
            )
        })?;
    Ok(Some(wait.min(MAX_WAIT)))
}

/// Waits until every run finished, `wait` passed, or the listener stops; adds the runs'
/// states to `body`. Returns whether all finished. The runs exist already: a database that
/// fails meanwhile ends the wait (the answer says so), never refuses the request.
pub async fn wait_for(state: &State, ids: &[Uuid], wait: Duration, body: &mut Value) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(50);
    let mut shutdown = state.shutdown.clone();
    loop {
        let runs = match state.store.runs_by_id(ids).await {
            Ok(runs) => runs,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the runs a request waits for");
                body["finished"] = json!(false);
                body["note"] = json!("the database did not answer while waiting; the runs were created (see status_url)");
                return false;
            }
        };
        let done = runs.len() == ids.len()
            && runs
                .iter()
                .all(|r| crate::store::ENDED_STATUSES.contains(&r.status.as_str()));
        let now = tokio::time::Instant::now();
        if done || now >= deadline || shutdown.requested() {
            let by_id: std::collections::HashMap<Uuid, &crate::store::RunRow> =
                runs.iter().map(|r| (r.id, r)).collect();
            let states: Vec<Value> = ids
                .iter()
                .map(|id| match by_id.get(id) {
                    Some(run) => json!({
                        "id": run.id, "status": run.status, "attempt": run.attempt,
                        "result": run.result, "error": run.error,
                    }),
                    None => json!({"id": id, "status": "unknown"}),
                })
                .collect();
            if let [only] = states.as_slice() {
                body["status"] = only["status"].clone();
                body["result"] = only["result"].clone();
                body["error"] = only["error"].clone();
            }
            body["runs"] = Value::Array(states);
            body["finished"] = json!(done);
            return done;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause.min(deadline - now)) => {}
            _ = shutdown.wait() => {}
        }
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}
