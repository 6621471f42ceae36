//! The listener: an HTTP server that turns verified webhooks into runs (`/hooks/<name>`),
//! answers a small JSON API behind a bearer token (`/api/...`), and serves `/healthz` and
//! `/metrics`.
//!
//! A webhook's runs are created like the scheduler creates runs: the rows are committed first
//! (trigger `webhook`), the answer goes out, and only then are they published — by this
//! process at once (or when their debounce window ends), and by any scheduler's outbox pass
//! should this process fail to (ARCHITECTURE.md, invariant 1). Dedupe keys and debounce
//! windows live in the database, so that several listeners and a restarted one agree.
//!
//! - `hooks`: the webhook pipeline (authentication, limits, filters, templates, runs).
//! - `api`: the JSON API.
//! - `auth`: signatures, bearer tokens, client addresses.
//! - `template`: how templates and filters read a request.
//! - `metrics`: the Prometheus registry and its collector.

pub mod api;
pub mod auth;
pub mod hooks;
pub mod metrics;
pub mod template;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::config::{Config, ListenerConfig};
use crate::error::{Error, Result};
use crate::scheduler::{self as sched, Publisher};
use crate::shutdown::Shutdown;
use crate::store::Store;

use metrics::{Collector, Metrics};

/// How often the collector reads the database and the broker for `/metrics` and `/healthz`.
const COLLECT_EVERY: Duration = Duration::from_secs(10);
/// How often expired dedupe and debounce keys are deleted.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// The longest `?wait=` a request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// How long a health check or a broker probe may take before it counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Publishing attempts per run before it is left to the schedulers' outbox passes.
const PUBLISH_TRIES: u32 = 10;

/// The hooks in force, with their rate limiters; replaced whole by a reload.
pub struct Hooks {
    pub config: ListenerConfig,
    limiters: HashMap<String, DefaultDirectRateLimiter>,
}

impl Hooks {
    pub fn new(config: ListenerConfig) -> Hooks {
        let limiters = config
            .hooks
            .values()
            .filter_map(|hook| {
                let rate = hook.rate?;
                let count = NonZeroU32::new(rate.count)?;
                let quota = Quota::with_period(rate.per / rate.count)?.allow_burst(count);
                Some((hook.name.clone(), RateLimiter::direct(quota)))
            })
            .collect();
        Hooks { config, limiters }
    }

    /// `Err(wait)` when `hook` is over its rate.
    pub fn check_rate(&self, hook: &str) -> std::result::Result<(), Duration> {
        use governor::clock::{Clock, DefaultClock};
        match self.limiters.get(hook) {
            Some(limiter) => limiter
                .check()
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
            None => Ok(()),
        }
    }
}

/// Runs to publish, at a time.
struct Pending {
    ids: Vec<Uuid>,
    at: tokio::time::Instant,
    tries: u32,
}

/// What every handler shares.
pub struct State {
    pub store: Store,
    config_path: Option<PathBuf>,
    default_queue: String,
    hooks: RwLock<Arc<Hooks>>,
    publisher: tokio::sync::Mutex<Publisher>,
    broker_up: AtomicBool,
    publish: mpsc::UnboundedSender<Pending>,
    pub metrics: Metrics,
    collector: tokio::sync::Mutex<Option<Collector>>,
    shutdown: Shutdown,
}

impl State {
    /// The hooks in force now.
    pub fn hooks(&self) -> Arc<Hooks> {
        self.hooks.read().expect("hooks lock").clone()
    }

    /// Puts `config`'s hooks (and API token and trusted proxies) in force for the requests
    /// that start from now on.
    pub fn reload(&self, config: ListenerConfig) {
        let hooks = Arc::new(Hooks::new(config));
        *self.hooks.write().expect("hooks lock") = hooks;
    }

    /// Publishes these runs now (or at `at`), leaving them to the schedulers' outbox passes
    /// if that keeps failing.
    fn publish_later(&self, ids: Vec<Uuid>, at: tokio::time::Instant) {
        if !ids.is_empty() {
            let _ = self.publish.send(Pending { ids, at, tries: 0 });
        }
    }

    /// Whether RabbitMQ answers: what the last publication or probe found; when that was a
    /// failure, a new probe (unless the last connection attempt failed a moment ago).
    pub async fn broker_ok(&self) -> bool {
        if self.broker_up.load(Ordering::SeqCst) {
            return true;
        }
        let probe = async {
            let mut publisher = self.publisher.lock().await;
            if publisher
                .retry_at()
                .is_some_and(|at| at > tokio::time::Instant::now())
            {
                return false;
            }
            self.probe_broker(&mut publisher).await
        };
        tokio::time::timeout(CHECK_TIMEOUT, probe)
            .await
            .unwrap_or(false)
    }

    /// Asks the broker about the default queue (declaring it first, as publishing would).
    async fn probe_broker(&self, publisher: &mut Publisher) -> bool {
        let queue = self.default_queue.as_str();
        let asked = async {
            publisher.declare(queue).await?;
            publisher.queue_depth(queue).await
        };
        let up = match tokio::time::timeout(CHECK_TIMEOUT, asked).await {
            Ok(Ok(depth)) => {
                self.metrics
                    .queue_depth
                    .with_label_values(&[queue])
                    .set(i64::from(depth));
                true
            }
            // The broker answered, and refused: it is up (the log says what it refused).
            Ok(Err(e)) if e.is_refusal() => {
                tracing::warn!(queue, error = %e, "the broker refuses the default queue");
                true
            }
            _ => false,
        };
        self.set_broker_up(up);
        up
    }

    fn set_broker_up(&self, up: bool) {
        self.broker_up.store(up, Ordering::SeqCst);
        self.metrics.broker_up.set(i64::from(up));
    }

    /// Whether the database answers, within a moment.
    pub async fn database_ok(&self) -> bool {
        let up = matches!(
            tokio::time::timeout(CHECK_TIMEOUT, self.store.ping()).await,
            Ok(Ok(()))
        );
        self.metrics.database_up.set(i64::from(up));
        up
    }

    /// One look of the metrics collector: the broker's queues, the database's runs.
    pub async fn collect_metrics(&self) {
        {
            let mut publisher = self.publisher.lock().await;
            if self.probe_broker(&mut publisher).await {
                let queues = self.store.job_queues().await.unwrap_or_default();
                for queue in queues.iter().filter(|q| **q != self.default_queue) {
                    // Queues nobody declared yet have no depth to show.
                    if let Ok(Ok(depth)) =
                        tokio::time::timeout(CHECK_TIMEOUT, publisher.queue_depth(queue)).await
                    {
                        self.metrics
                            .queue_depth
                            .with_label_values(&[queue.as_str()])
                            .set(i64::from(depth));
                    }
                }
            }
        }
        if !self.database_ok().await {
            return;
        }
        let mut collector = self.collector.lock().await;
        if collector.is_none() {
            match Collector::start(&self.store).await {
                Ok(started) => *collector = Some(started),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: cannot read the database");
                    return;
                }
            }
        }
        if let Some(collector) = collector.as_mut() {
            if let Err(e) = collector.collect(&self.store, &self.metrics).await {
                tracing::warn!(error = %e, "metrics: cannot read the database");
            }
        }
    }
}

/// A refusal or a failure, answered as `{"error": ...}` with its status.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub error: String,
    /// Seconds to wait (429).
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Refusal {
        Refusal {
            status,
            error: error.into(),
            retry_after: None,
        }
    }

    /// The database failed: 503 when it is down (try again later), else 500.
    pub fn database(error: &crate::store::StoreError) -> Refusal {
        if error.is_transient() {
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unavailable; nothing was created, try again later",
            )
        } else {
            tracing::error!(error = %error, "database error");
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "a database error; nothing was created (see the listener's log)",
            )
        }
    }
}

impl Refusal {
    /// Writing the runs failed: whether their transaction committed is not known (a lost
    /// reply to the commit), so the answer does not claim that nothing was created.
    pub fn writing(error: &crate::store::StoreError) -> Refusal {
        tracing::error!(error = %error, "writing runs failed");
        Refusal::new(
            if error.is_transient() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            },
            "the database failed while the runs were written: they may exist (see GET /api/runs); \
             a repeat with the same dedupe key creates nothing new",
        )
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.error }))).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                seconds.to_string().parse().expect("digits"),
            );
        }
        response
    }
}

/// Starts the listener's state and its background tasks (publishing, metrics, key expiry),
/// which end with `shutdown`.
pub async fn start(config: &Config, store: Store, shutdown: Shutdown) -> Arc<State> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let publisher = Publisher::new(config, &store, "listener");
    let state = Arc::new(State {
        store,
        config_path: config.path.clone(),
        default_queue: config.rabbitmq.queue.clone(),
        hooks: RwLock::new(Arc::new(Hooks::new(config.listener.clone()))),
        publisher: tokio::sync::Mutex::new(publisher),
        broker_up: AtomicBool::new(false),
        publish: sender,
        metrics: Metrics::new(),
        collector: tokio::sync::Mutex::new(None),
        shutdown,
    });
    tokio::spawn(publishing(state.clone(), receiver));
    tokio::spawn(housekeeping(state.clone()));
    state
}

/// The routes, as (method, path) — the list the OpenAPI document must describe.
pub fn routes() -> Vec<(Method, &'static str)> {
    build().1
}

/// The HTTP application over `state`.
pub fn router(state: Arc<State>) -> Router {
    build().0.with_state(state)
}

fn build() -> (Router<Arc<State>>, Vec<(Method, &'static str)>) {
    let table: Vec<(Method, &'static str, MethodRouter<Arc<State>>)> = vec![
        (Method::POST, "/hooks/{name}", post(hooks::hook)),
        (Method::GET, "/healthz", get(healthz)),
        (Method::GET, "/metrics", get(scrape)),
        (Method::GET, "/api/jobs", get(api::jobs)),
        (Method::POST, "/api/jobs/{name}/run", post(api::run_job)),
        (Method::GET, "/api/runs", get(api::runs)),
        (Method::GET, "/api/runs/{id}", get(api::run)),
    ];
    let mut router = Router::new();
    let mut routes = Vec::new();
    for (method, path, handler) in table {
        router = router.route(path, handler.fallback(method_not_allowed));
        routes.push((method, path));
    }
    (router.fallback(not_found), routes)
}

async fn not_found() -> Refusal {
    Refusal::new(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed(method: Method) -> Refusal {
    Refusal::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed here"),
    )
}

/// `GET /healthz`: 200 when the database and RabbitMQ answer, else 503 naming which does not.
async fn healthz(axum::extract::State(state): axum::extract::State<Arc<State>>) -> Response {
    let (database, broker) = tokio::join!(state.database_ok(), state.broker_ok());
    let word = |up: bool| if up { "ok" } else { "unavailable" };
    let body = json!({"database": word(database), "rabbitmq": word(broker)});
    if database && broker {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        let down: Vec<&str> = [(!database, "the database"), (!broker, "RabbitMQ")]
            .into_iter()
            .filter_map(|(down, name)| down.then_some(name))
            .collect();
        let mut body = body;
        let verb = if down.len() > 1 { "do" } else { "does" };
        body["error"] = json!(format!("{} {verb} not answer", down.join(" and ")));
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// `GET /metrics`: what the collector gathered, in Prometheus text format.
async fn scrape(axum::extract::State(state): axum::extract::State<Arc<State>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            prometheus::TEXT_FORMAT.to_string(),
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Publishes what the handlers created, when its time comes; retries with a growing pause.
async fn publishing(state: Arc<State>, mut receiver: mpsc::UnboundedReceiver<Pending>) {
    let mut shutdown = state.shutdown.clone();
    let mut waiting: Vec<Pending> = Vec::new();
    loop {
        let next = waiting.iter().map(|p| p.at).min();
        tokio::select! {
            received = receiver.recv() => match received {
                Some(pending) => waiting.push(pending),
                None => return,
            },
            _ = sleep_until(next) => {}
            _ = shutdown.wait() => {
                // What requests created up to now goes out once more before the process ends;
                // anything left (a debounce window still open) is a scheduler's to publish.
                while let Ok(pending) = receiver.try_recv() {
                    waiting.push(pending);
                }
                let now = tokio::time::Instant::now();
                let ids: Vec<Uuid> = waiting
                    .iter()
                    .filter(|p| p.at <= now)
                    .flat_map(|p| p.ids.iter().copied())
                    .collect();
                if !ids.is_empty() {
                    let mut publisher = state.publisher.lock().await;
                    let _ = sched::publish_queued(&state.store, &mut publisher, &state.default_queue, Some(&ids)).await;
                }
                return;
            }
        }
        while let Ok(pending) = receiver.try_recv() {
            waiting.push(pending);
        }
        let now = tokio::time::Instant::now();
        let (due, later): (Vec<Pending>, Vec<Pending>) =
            waiting.drain(..).partition(|p| p.at <= now);
        waiting = later;
        if due.is_empty() {
            continue;
        }
        let ids: Vec<Uuid> = due.iter().flat_map(|p| p.ids.iter().copied()).collect();
        let outcome = {
            let mut publisher = state.publisher.lock().await;
            sched::publish_queued(
                &state.store,
                &mut publisher,
                &state.default_queue,
                Some(&ids),
            )
            .await
        };
        let published = match outcome {
            Ok(count) => {
                state.set_broker_up(true);
                count
            }
            Err(e) => {
                if matches!(e, sched::PassError::Queue(_)) {
                    state.set_broker_up(false);
                }
                tracing::warn!(runs = ids.len(), error = %e, "publishing webhook runs failed; trying again");
                0
            }
        };
        if published >= ids.len() {
            continue;
        }
        // Some were not published: the broker failed, or a scheduler published them first,
        // or a debounced run is not due yet on the database's clock. Runs that no longer wait
        // (published elsewhere, or ended) are done; the rest are tried again, which is
        // harmless: the outbox publishes each run once.
        let still_waiting: Option<std::collections::HashSet<Uuid>> =
            state.store.runs_by_id(&ids).await.ok().map(|runs| {
                runs.into_iter()
                    .filter(|r| r.status == "queued" && r.published_at.is_none())
                    .map(|r| r.id)
                    .collect()
            });
        for mut pending in due {
            if let Some(waiting_ids) = &still_waiting {
                pending.ids.retain(|id| waiting_ids.contains(id));
                if pending.ids.is_empty() {
                    continue;
                }
            }
            pending.tries += 1;
            if pending.tries >= PUBLISH_TRIES {
                tracing::warn!(runs = ?pending.ids, "runs left unpublished; a running scheduler publishes them");
                continue;
            }
            let pause = Duration::from_millis(250) * 2u32.pow(pending.tries.min(7));
            pending.at = tokio::time::Instant::now() + pause;
            waiting.push(pending);
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Collects metrics and deletes expired webhook keys, until shutdown.
async fn housekeeping(state: Arc<State>) {
    let mut shutdown = state.shutdown.clone();
    let mut last_expiry = tokio::time::Instant::now();
    loop {
        state.collect_metrics().await;
        if last_expiry.elapsed() >= EXPIRE_EVERY {
            last_expiry = tokio::time::Instant::now();
            loop {
                match state.store.expire_webhook_keys(1000).await {
                    Ok(1000) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot delete expired webhook keys");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(COLLECT_EVERY) => {}
            _ = shutdown.wait() => return,
        }
    }
}

/// Serves on `bind` until `shutdown`: then stops accepting, lets requests in flight finish,
/// and returns. SIGHUP reloads the hooks from the configuration file.
pub async fn serve(
    config: &Config,
    store: Store,
    bind: SocketAddr,
    shutdown: Shutdown,
) -> Result<()> {
    // Before anything else: until a handler is installed, SIGHUP would end the process.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let state = start(config, store, shutdown.clone()).await;
    for hook in state.hooks().config.hooks.values() {
        match state.store.find_job(&hook.job).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::warn!(hook = %hook.name, job = %hook.job, "hook names a job that is not in the registry (yet): its webhooks are refused until it is imported")
            }
            Err(e) => tracing::warn!(error = %e, "cannot check the hooks' jobs"),
        }
    }
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| Error::Runtime(format!("listener: cannot listen on {bind}: {e}")))?;
    let address = listener.local_addr().unwrap_or(bind);
    tracing::info!(address = %address, hooks = state.hooks().config.hooks.len(), "listener ready");
    match hangups {
        Ok(hangups) => {
            tokio::spawn(reloading(state.clone(), hangups));
        }
        Err(e) => tracing::warn!(error = %e, "cannot watch SIGHUP: reloading is off"),
    }
    let mut stop = shutdown.clone();
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.wait().await })
    .await
    .map_err(|e| Error::Runtime(format!("listener: {e}")))?;
    tracing::info!("listener stopped");
    Ok(())
}

/// Reloads the hooks on SIGHUP; a configuration that does not load keeps the hooks in force.
async fn reloading(state: Arc<State>, mut hangups: tokio::signal::unix::Signal) {
    let mut shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            received = hangups.recv() => if received.is_none() { return },
            _ = shutdown.wait() => return,
        }
        match Config::load(state.config_path.as_deref()) {
            Ok(config) => {
                let count = config.listener.hooks.len();
                if config.listener.bind != state.hooks().config.bind {
                    tracing::warn!(bind = %config.listener.bind, "listener.bind changed: a restart takes it up");
                }
                state.reload(config.listener);
                tracing::info!(hooks = count, "hooks reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused: the configuration does not load; the hooks in force stay")
            }
        }
    }
}
