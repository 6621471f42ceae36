//! The JSON API under `/api`, behind `Authorization: Bearer <listener.api_token>`.

use std::sync::Arc;

use axum::extract::{Path, Query, RawQuery, Request, State as Shared};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::hooks::{is_json, read_body, wait_for, wait_param};
use super::{auth, Refusal, State};
use crate::store::{NewRun, WebhookKey, WebhookRun};

/// Extra arguments of `POST /api/jobs/{name}/run`: at most this many bytes.
const MAX_BODY: usize = 1024 * 1024;
/// How long an `Idempotency-Key` of `POST /api/jobs/{name}/run` is remembered.
const IDEMPOTENCY_HOLD: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
use crate::store::RUN_STATUSES as STATUSES;

fn authorize(state: &State, headers: &HeaderMap) -> Result<(), Refusal> {
    let hooks = state.hooks();
    let Some(token) = &hooks.config.api_token else {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "the API is off: set listener.api_token (or JOBSCHLEUDER_LISTENER_API_TOKEN)",
        ));
    };
    auth::check_bearer(std::slice::from_ref(token), headers)
        .map_err(|e| Refusal::new(StatusCode::UNAUTHORIZED, e))
}

/// `GET /api/jobs`: every job of the registry.
pub async fn jobs(
    Shared(state): Shared<Arc<State>>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    authorize(&state, &headers)?;
    let jobs = state
        .store
        .jobs()
        .await
        .map_err(|e| Refusal::database(&e))?;
    Ok(Json(json!({ "jobs": jobs })).into_response())
}

/// `POST /api/jobs/{name}/run`: a manual run now; the body (optional) is a JSON object of
/// arguments merged over the job's. With `Idempotency-Key`, a repeat within a day answers the
/// first request's run and creates nothing. `?wait=30s` waits for the run as hooks do.
pub async fn run_job(
    Shared(state): Shared<Arc<State>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Response, Refusal> {
    let (parts, body) = request.into_parts();
    authorize(&state, &parts.headers)?;
    let body = read_body(body, &parts.headers, MAX_BODY).await?;
    let extra = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        if !is_json(&parts.headers) {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the arguments as JSON (Content-Type: application/json)",
            ));
        }
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "the body is a JSON object of arguments",
                ))
            }
            Err(e) => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("malformed JSON: {e}"),
                ))
            }
        }
    };
    let wait = wait_param(query.as_deref())?;
    let job = state
        .store
        .find_job(&name)
        .await
        .map_err(|e| Refusal::database(&e))?
        .ok_or_else(|| Refusal::new(StatusCode::NOT_FOUND, format!("no job named {name:?}")))?;
    if !state.broker_ok().await {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "RabbitMQ is unavailable; nothing was created, try again later",
        ));
    }
    let mut run = NewRun::of_job(&job, "manual");
    run.arguments.extend(extra);
    let idempotency = parts
        .headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(|key| WebhookKey {
            key: format!("{}:{key}", run.job_name),
            hold: IDEMPOTENCY_HOLD,
        });
    let outcome = state
        .store
        .create_webhook_runs(
            "/api",
            idempotency.as_ref(),
            &[WebhookRun {
                run,
                debounce: None,
            }],
        )
        .await
        .map_err(|e| Refusal::writing(&e))?;
    let created: Vec<Uuid> = outcome.created.iter().map(|(id, _)| *id).collect();
    state.publish_later(created, tokio::time::Instant::now());
    let id = outcome.run_ids[0];
    tracing::info!(run = %id, job = %name, trigger = "manual", duplicate = outcome.duplicate, "run requested through the API");
    let mut body = json!({
        "run_id": id,
        "run_ids": outcome.run_ids,
        "status_url": format!("/api/runs/{id}"),
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
        if wait_for(&state, &outcome.run_ids, wait, &mut body).await {
            status = StatusCode::OK;
        }
    }
    Ok((status, Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct RunsQuery {
    job: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
}

/// `GET /api/runs?job=&status=&limit=`: recent runs, newest first (limit 1–1000, default 50).
pub async fn runs(
    Shared(state): Shared<Arc<State>>,
    headers: HeaderMap,
    query: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Refusal> {
    authorize(&state, &headers)?;
    let Query(query) = query.map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("{}: use job=NAME, status=STATUS and limit=N", e.body_text()),
        )
    })?;
    if let Some(status) = &query.status {
        if !STATUSES.contains(&status.as_str()) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("status={status:?}: use one of {}", STATUSES.join(", ")),
            ));
        }
    }
    let limit = query.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "limit: between 1 and 1000",
        ));
    }
    let runs = state
        .store
        .runs(query.job.as_deref(), query.status.as_deref(), None, limit)
        .await
        .map_err(|e| Refusal::database(&e))?;
    Ok(Json(json!({ "runs": runs })).into_response())
}

/// `GET /api/runs/{id}`: one run (status, times, attempt, worker, result, error) and its
/// fan-out children.
pub async fn run(
    Shared(state): Shared<Arc<State>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    authorize(&state, &headers)?;
    let id = Uuid::parse_str(id.trim()).map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a run id (a UUID)"),
        )
    })?;
    let run = state
        .store
        .run(id)
        .await
        .map_err(|e| Refusal::database(&e))?
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::NOT_FOUND,
                format!("no run {id} (it may have been pruned)"),
            )
        })?;
    let children = state
        .store
        .children(id)
        .await
        .map_err(|e| Refusal::database(&e))?;
    let mut value = serde_json::to_value(&run).unwrap_or_default();
    value["children"] = serde_json::to_value(&children).unwrap_or_default();
    Ok(Json(value).into_response())
}
