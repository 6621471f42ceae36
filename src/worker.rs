//! The worker: deliveries become plugin calls; results are recorded, then acknowledged.
//!
//! Per delivery (ARCHITECTURE.md, invariants 2 to 7):
//! 1. Parse. An unparsable body is dead-lettered and logged once. A bare `{cmd, args}` message
//!    of the original becomes a run row in the outbox and is acknowledged; the run then travels
//!    like any other.
//! 2. Claim the run (running, attempt + 1, this worker). A run that already finished, or that
//!    another worker runs, is acknowledged and skipped: re-deliveries never run a job twice.
//! 3. A message the broker handed out too often (workers died on it) is recorded dead and
//!    dead-lettered instead of run again.
//! 4. Preprocessing (fan-out: child runs are inserted and published like any run), the job,
//!    postprocessing — on blocking threads, with the job's timeout.
//! 5. Record succeeded, failed, dead, or queued again for a retry with a not-before time; only
//!    then acknowledge. A worker killed before that leaves the delivery unacknowledged, and the
//!    broker hands it to another worker.
//!
//! Claims and results of many concurrent runs are written in batches (one statement for many
//! runs), which is what makes thousands of runs per second possible.
//!
//! Stopping: on SIGTERM the worker takes no more deliveries and lets running jobs finish
//! within `worker.grace_period`. Whatever still runs then (or at a second signal) is
//! interrupted: the processes the worker started are killed, the runs are recorded queued
//! for their next attempt and their deliveries acknowledged — all before the lease is
//! released, so no other worker starts a run while this one still runs it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::broker::{self, Broker, BrokerError, Delivery, JobMessage};
use crate::config::Config;
use crate::plugin::{Args, Outcome, PluginError, PluginHost};
use crate::scheduler::{publish_queued, Publisher};
use crate::shutdown::Shutdown;
use crate::store::{Claim, Finish, NewRun, RunEnd, Store, StoreError};

/// Most requests written in one statement.
const BATCH_MAX: usize = 512;
/// Batches of one kind written at the same time (each on its own pooled connection).
const BATCHES_IN_FLIGHT: usize = 3;
/// How long a timed-out plugin call may take to return before its slot counts as hung.
const HUNG_AFTER: Duration = Duration::from_secs(10);
/// The longest that interrupting running jobs may take to record them, before the process
/// exits regardless (their deliveries then return to the queue).
const INTERRUPT_RECORD_LIMIT: Duration = Duration::from_secs(10);
/// Namespace of the run ids derived for fan-out children and bare messages.
const RUN_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a6f_6273_6368_6c65_7564_6572_2d72_756e);
/// The longest child `cmd` a run row holds (the original's varchar(50)).
use crate::jobfile::{MAX_JOB, MAX_NAME};

/// Collects requests from many tasks and serves them in batches; each caller gets its own
/// answer. The batch function retries until the database answers: state changes are never
/// dropped.
struct Batcher<Req, Resp> {
    sender: mpsc::Sender<(Req, oneshot::Sender<Resp>)>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    fn spawn<F, Fut>(serve: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Vec<Resp>> + Send + 'static,
    {
        let (sender, mut receiver) = mpsc::channel::<(Req, oneshot::Sender<Resp>)>(BATCH_MAX * 4);
        let serve = Arc::new(serve);
        // A few batches in flight at once: while one waits for its commit, the next fills.
        let in_flight = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        tokio::spawn(async move {
            while let Some(first) = receiver.recv().await {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let mut requests = vec![first];
                while requests.len() < BATCH_MAX {
                    match receiver.try_recv() {
                        Ok(next) => requests.push(next),
                        Err(_) => break,
                    }
                }
                let (inputs, replies): (Vec<Req>, Vec<oneshot::Sender<Resp>>) =
                    requests.into_iter().unzip();
                let serve = serve.clone();
                tokio::spawn(async move {
                    let answers = serve(inputs).await;
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(answer);
                    }
                    drop(permit);
                });
            }
        });
        Batcher { sender }
    }

    async fn call(&self, request: Req) -> Option<Resp> {
        self.enqueue(request).await?.await.ok()
    }

    /// Hands `request` over; once this returns, the request is the batcher's (it is served
    /// even if the caller goes away), and the receiver gets its answer.
    async fn enqueue(&self, request: Req) -> Option<oneshot::Receiver<Resp>> {
        let (reply, answer) = oneshot::channel();
        self.sender.send((request, reply)).await.ok()?;
        Some(answer)
    }
}

/// Retries a database write with backoff while the failure is transient (connection lost,
/// server restarting); a permanent failure (bad data) is returned.
async fn until_ok<T, F, Fut>(what: &'static str, mut attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "{what} failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Records finished runs; returns, per run, whether its delivery may be acknowledged. A batch
/// that fails for good is recorded run by run, and a run whose result cannot be stored is
/// recorded failed with the reason, so a worker never stalls on one. A run that cannot be
/// recorded at all is not acknowledged: its delivery returns to the queue. A result that
/// arrives for a run taken over meanwhile is logged.
async fn record_batch(store: &Store, batch: &[Finish]) -> Vec<bool> {
    match until_ok("recording runs", || store.finish_runs(batch)).await {
        Ok(not_recorded) => {
            log_not_recorded(batch, &not_recorded);
            return vec![true; batch.len()];
        }
        Err(e) => {
            tracing::error!(error = %e, runs = batch.len(), "recording a batch failed; recording its runs one by one")
        }
    }
    let mut settled = Vec::with_capacity(batch.len());
    for finish in batch {
        let one = std::slice::from_ref(finish);
        let e = match until_ok("recording a run", || store.finish_runs(one)).await {
            Ok(not_recorded) => {
                log_not_recorded(one, &not_recorded);
                settled.push(true);
                continue;
            }
            Err(e) => e,
        };
        let fallback = Finish {
            error: Some(format!("the run's result could not be recorded: {e}")),
            result: None,
            end: RunEnd::Failed,
            ..finish.clone()
        };
        match until_ok("recording a run", || {
            store.finish_runs(std::slice::from_ref(&fallback))
        })
        .await
        {
            Ok(_) => settled.push(true),
            Err(e) => {
                tracing::error!(run = %finish.id, error = %e, "the run cannot be recorded at all; its delivery is not acknowledged");
                settled.push(false);
            }
        }
    }
    settled
}

fn log_not_recorded(batch: &[Finish], not_recorded: &[Uuid]) {
    for finish in batch.iter().filter(|f| not_recorded.contains(&f.id)) {
        tracing::warn!(run = %finish.id, attempt = finish.attempt, "a late result was not recorded: the run was taken over by another worker (or interrupted) meanwhile");
    }
}

/// What every delivery handler shares.
struct Context {
    store: Store,
    host: PluginHost,
    config: Config,
    worker_id: String,
    /// This process's lease token (see `Store::worker_lease`).
    token: i32,
    queue: String,
    claims: Batcher<(Uuid, bool), Claim>,
    finishes: Batcher<(Finish, Recording), bool>,
    /// Publishes fan-out children; one publisher (and channel) for the whole worker.
    publisher: Mutex<Publisher>,
    /// Runs this process has claimed and not yet recorded, with what is needed to record them
    /// interrupted when the worker stops: their attempt and their delivery's acker.
    in_flight: std::sync::Mutex<HashMap<Uuid, InFlight>>,
    /// Results handed to the recorder and not yet committed; a stopping worker waits for them
    /// before it records what it interrupts.
    recording: Arc<AtomicUsize>,
    /// Slots held by plugin calls that outlived their timeout and do not return.
    hung: AtomicUsize,
}

/// A run this process claimed and has not handed to the recorder yet.
struct InFlight {
    attempt: i32,
    acker: broker::Acker,
    max_retries: i32,
    /// Its plugin call outlived the job's timeout and has not returned.
    hung_after: Option<Duration>,
}

/// Counts a result on its way to the database. It travels with the result into the recorder
/// and is dropped once the batch holding it was written.
struct Recording(Arc<AtomicUsize>);

impl Recording {
    fn new(counter: &Arc<AtomicUsize>) -> Recording {
        counter.fetch_add(1, Ordering::SeqCst);
        Recording(counter.clone())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How the worker stopped, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// A stop signal; running jobs finished (or were interrupted after the grace period).
    Gracefully,
    /// A second stop signal: running jobs were interrupted at once.
    Forced,
    /// Every slot was held by a plugin call that ignores its timeout: the worker could take no
    /// more work, so it stopped (its runs recorded for their next attempt) to be restarted.
    Stuck,
}

/// Worker settings from the command line.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub id: String,
    pub slots: usize,
    pub queue: String,
}

/// Consumes the queue until `shutdown`; reconnects to the broker (and the database) by itself.
pub async fn run(
    store: Store,
    config: &Config,
    options: WorkerOptions,
    mut shutdown: Shutdown,
) -> Result<Stopped, BrokerError> {
    let host = PluginHost::new(config);
    {
        let host = host.clone();
        let problems = tokio::task::spawn_blocking(move || host.check_all())
            .await
            .unwrap_or_default();
        for problem in problems {
            tracing::warn!("plugin problem: {problem}");
        }
    }
    let lease = loop {
        match store.worker_lease().await {
            Ok(lease) => break lease,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the worker lease; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.wait() => return Ok(Stopped::Gracefully),
                }
            }
        }
    };
    let claims = {
        let store = store.clone();
        let worker = options.id.clone();
        let token = lease.token;
        let held = lease.held.clone();
        Batcher::spawn(move |batch: Vec<(Uuid, bool)>| {
            let store = store.clone();
            let worker = worker.clone();
            let mut held = held.clone();
            async move {
                // Fenced: while the lease is lost, a sweeper may hand this worker's runs to
                // others, so nothing new is claimed until it is held again.
                if held.wait_for(|held| *held).await.is_err() {
                    return vec![Claim::Unavailable; batch.len()];
                }
                // One nonce per statement: a retry after a lost reply recognizes its own claims.
                let nonce = Uuid::new_v4();
                match until_ok("claiming runs", || {
                    store.claim_runs(&worker, token, nonce, &batch)
                })
                .await
                {
                    Ok(claims) => claims,
                    Err(e) if batch.len() == 1 => {
                        tracing::error!(error = %e, "claiming a run failed");
                        vec![Claim::Refused(e.to_string())]
                    }
                    Err(e) => {
                        // One run's problem must not refuse the others: each on its own.
                        tracing::error!(error = %e, runs = batch.len(), "claiming a batch failed; claiming its runs one by one");
                        let mut answers = Vec::with_capacity(batch.len());
                        for one in batch.chunks(1) {
                            let nonce = Uuid::new_v4();
                            let claimed = until_ok("claiming a run", || {
                                store.claim_runs(&worker, token, nonce, one)
                            })
                            .await;
                            answers.push(match claimed {
                                Ok(mut claims) => claims.pop().unwrap_or(Claim::Unavailable),
                                Err(e) => Claim::Refused(e.to_string()),
                            });
                        }
                        answers
                    }
                }
            }
        })
    };
    let finishes = {
        let store = store.clone();
        Batcher::spawn(move |batch: Vec<(Finish, Recording)>| {
            let store = store.clone();
            async move {
                // The guards go when the batch is committed, not before.
                let (finishes, recording): (Vec<Finish>, Vec<Recording>) =
                    batch.into_iter().unzip();
                let answers = record_batch(&store, &finishes).await;
                drop(recording);
                answers
            }
        })
    };
    let context = Arc::new(Context {
        store,
        host,
        config: config.clone(),
        worker_id: options.id.clone(),
        token: lease.token,
        queue: options.queue.clone(),
        claims,
        finishes,
        publisher: Mutex::new(Publisher::new(
            config,
            &format!("worker {} fan-out", options.id),
        )),
        in_flight: std::sync::Mutex::new(HashMap::new()),
        recording: Arc::new(AtomicUsize::new(0)),
        hung: AtomicUsize::new(0),
    });
    let slots = options.slots.max(1);
    let semaphore = Arc::new(Semaphore::new(slots));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let tag = format!("jobschleuder-{}-{}", options.id, std::process::id());
    let mut backoff = Duration::from_millis(200);
    let mut broker: Option<Broker> = None;

    let stopped: Result<Stopped, BrokerError> = 'session: loop {
        if shutdown.requested() {
            break Ok(drain(&mut tasks, config.worker.grace_period, &mut shutdown).await);
        }
        let role = format!("worker {}", options.id);
        let session = async {
            let broker = Broker::connect(&config.rabbitmq, &role).await?;
            let consumer = broker
                .consume(
                    &options.queue,
                    u16::try_from(slots).unwrap_or(u16::MAX),
                    &tag,
                )
                .await?;
            Ok::<_, BrokerError>((broker, consumer))
        };
        // Jobs may be running meanwhile (the connection was lost under them): a stop signal
        // while connecting gives them their grace period too.
        let connected = tokio::select! {
            connected = session => connected,
            _ = shutdown.wait() => {
                break 'session Ok(drain(&mut tasks, config.worker.grace_period, &mut shutdown).await);
            }
        };
        let mut consumer = match connected {
            Ok((connected, consumer)) => {
                broker = Some(connected);
                consumer
            }
            Err(e @ BrokerError::QueueMismatch { .. }) => {
                // It cannot consume as configured; what runs finishes first.
                match drain(&mut tasks, config.worker.grace_period, &mut shutdown).await {
                    Stopped::Forced => break 'session Ok(Stopped::Forced),
                    _ => break 'session Err(e),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot consume; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait() => {
                        break 'session Ok(drain(&mut tasks, config.worker.grace_period, &mut shutdown).await);
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        tracing::info!(worker = %options.id, queue = %options.queue, slots, "worker consuming");
        // A slot is taken before the next delivery is read, inside the select: a signal is
        // seen even while every slot is busy.
        let mut permit: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let mut hung_check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.wait() => {
                    if let Some(broker) = &broker {
                        if let Err(e) = broker.cancel(&tag).await {
                            tracing::debug!(error = %e, "cancelling the consumer failed");
                        }
                    }
                    break 'session Ok(drain(&mut tasks, config.worker.grace_period, &mut shutdown).await);
                }
                acquired = semaphore.clone().acquire_owned(), if permit.is_none() => {
                    permit = Some(acquired.expect("the semaphore is never closed"));
                }
                next = consumer.next(), if permit.is_some() => match next {
                    Some(Ok(delivery)) => {
                        let permit = permit.take();
                        let context = context.clone();
                        tasks.spawn(async move {
                            handle(&context, delivery).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        let text = e.to_string();
                        if broker::is_consumer_timeout(&e) {
                            // RabbitMQ closes a channel whose delivery stays unacknowledged longer
                            // than its consumer_timeout (30 min by default). The running job goes
                            // on and records its result; its re-delivered message is skipped.
                            tracing::error!(error = %text, "a job ran longer than RabbitMQ's consumer_timeout, which closed the channel: raise consumer_timeout in rabbitmq.conf above the longest job (see README, Operations); reconnecting");
                        } else {
                            tracing::warn!(error = %text, "lost the broker connection; reconnecting (unacknowledged deliveries return to the queue)");
                        }
                        break;
                    }
                    None => {
                        tracing::warn!("the broker ended the consumer; reconnecting");
                        break;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = hung_check.tick() => {
                    let hung = context.hung.load(Ordering::SeqCst);
                    if hung >= slots {
                        tracing::error!(slots, "every slot is held by a plugin call that ignores its timeout: stopping so that the service manager restarts the worker (its runs are queued for their next attempt)");
                        break 'session Ok(Stopped::Stuck);
                    }
                }
            }
        }
    };
    if !tasks.is_empty() {
        interrupt(&context, &mut tasks).await;
    }
    // Let the last acknowledgements reach the broker before the channel closes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Everything this process ran is recorded: the lease may go. Deliveries that return to
    // the queue with the channel are then taken over by the next worker at once.
    drop(lease);
    if let Some(broker) = broker {
        broker.close().await;
    }
    context.publisher.lock().await.close().await;
    tracing::info!(worker = %options.id, "worker stopped");
    stopped
}

/// Waits for running jobs up to `grace`, or until a second stop signal.
async fn drain(tasks: &mut JoinSet<()>, grace: Duration, shutdown: &mut Shutdown) -> Stopped {
    if tasks.is_empty() {
        return Stopped::Gracefully;
    }
    tracing::info!(running = tasks.len(), grace = ?grace, "waiting for running jobs to finish");
    tokio::select! {
        finished = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }) => {
            if finished.is_err() {
                tracing::warn!(running = tasks.len(), "grace period over: interrupting running jobs");
            }
            Stopped::Gracefully
        }
        _ = shutdown.forced() => {
            tracing::warn!(running = tasks.len(), "second stop signal: interrupting running jobs");
            Stopped::Forced
        }
    }
}

/// Stops what still runs: the handlers end, every process the worker started is killed (with
/// its process group), results already on their way to the database are let through, and the
/// unfinished runs are recorded and their deliveries acknowledged (the outbox publishes them
/// again). An interrupted run is queued for its next attempt; one whose plugin call had
/// outlived its timeout fails as timed out (retried if its retries allow). Either way its
/// attempt counts, and a run that reached its retries plus `rabbitmq.delivery_limit` attempts
/// is recorded dead: a job that keeps taking its worker down does not loop. If the database
/// cannot be reached in time, the deliveries stay unacknowledged and return to the queue.
async fn interrupt(context: &Context, tasks: &mut JoinSet<()>) {
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let killed = crate::process::kill_children();
    if killed > 0 {
        tracing::info!(
            processes = killed,
            "killed the processes of interrupted jobs"
        );
    }
    let deadline = tokio::time::Instant::now() + INTERRUPT_RECORD_LIMIT;
    while context.recording.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let in_flight: Vec<(Uuid, InFlight)> = context
        .in_flight
        .lock()
        .map(|mut runs| runs.drain().collect())
        .unwrap_or_default();
    if in_flight.is_empty() {
        return;
    }
    let crash_limit = i32::try_from(context.config.rabbitmq.delivery_limit).unwrap_or(i32::MAX);
    let finishes: Vec<Finish> = in_flight
        .iter()
        .map(|(id, run)| {
            let (end, error) = match run.hung_after {
                Some(limit) => (
                    if run.attempt <= run.max_retries {
                        RunEnd::Retry(retry_delay(&context.config.worker, run.attempt))
                    } else {
                        RunEnd::Failed
                    },
                    format!(
                        "timed out after {}s; the plugin did not stop, and worker {} stopped",
                        limit.as_secs_f64(),
                        context.worker_id
                    ),
                ),
                None if run.attempt >= run.max_retries.saturating_add(crash_limit) => (
                    RunEnd::Dead,
                    format!(
                        "interrupted: worker {} stopped while it ran, at attempt {}: given up",
                        context.worker_id, run.attempt
                    ),
                ),
                None => (
                    RunEnd::Retry(Duration::ZERO),
                    format!(
                        "interrupted: worker {} stopped while it ran; queued for its next attempt",
                        context.worker_id
                    ),
                ),
            };
            Finish {
                id: *id,
                token: context.token,
                attempt: run.attempt,
                end,
                result: None,
                error: Some(error),
            }
        })
        .collect();
    let recorded = tokio::time::timeout_at(
        deadline,
        until_ok("recording interrupted runs", || {
            context.store.finish_runs(&finishes)
        }),
    )
    .await;
    match recorded {
        Ok(Ok(_)) => {
            for ((id, run), finish) in in_flight.iter().zip(&finishes) {
                tracing::info!(run = %id, attempt = run.attempt, "run interrupted: {}", finish.error.as_deref().unwrap_or_default());
                let _ = broker::acknowledge(&run.acker).await;
            }
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "recording interrupted runs failed; their deliveries return to the queue")
        }
        Err(_) => {
            tracing::error!(
                "recording interrupted runs took too long; their deliveries return to the queue"
            )
        }
    }
}

/// Why a run did not succeed.
enum Failure {
    /// No plugin provides the job: it can never run here.
    UnknownJob(PluginError),
    Plugin(PluginError),
    TimedOut(Duration),
    Crashed(String),
    Post(String),
}

impl Failure {
    fn retryable(&self) -> bool {
        match self {
            Failure::UnknownJob(_) | Failure::Crashed(_) | Failure::Post(_) => false,
            Failure::Plugin(e) => e.retryable(),
            Failure::TimedOut(_) => true,
        }
    }

    fn message(&self) -> String {
        match self {
            Failure::UnknownJob(e) | Failure::Plugin(e) => e.to_string(),
            Failure::TimedOut(limit) => format!("timed out after {}s", limit.as_secs_f64()),
            Failure::Crashed(message) | Failure::Post(message) => message.clone(),
        }
    }

    fn details(&self) -> Option<Value> {
        match self {
            Failure::Plugin(e) => e.details().cloned(),
            _ => None,
        }
    }

    /// As postprocessing sees it.
    fn job_error(&self) -> crate::plugin::JobError {
        crate::plugin::JobError {
            message: self.message(),
            retryable: self.retryable(),
            details: self.details(),
        }
    }
}

/// Runs blocking plugin code on the blocking pool, within `limit`.
///
/// A call that outlives its limit has failed, but its attempt is not over while its code
/// still runs: this waits for the thread to return (plugins that honour their `timeout`
/// argument, like `command`, return at once), so that a retry never overlaps it. A call that
/// does not return within `HUNG_AFTER` counts as hung; it keeps its slot (and its run stays
/// running) until it returns or the worker stops.
async fn blocking<T: Send + 'static>(
    context: &Context,
    (run_id, attempt): (Uuid, i32),
    limit: Option<Duration>,
    call: impl FnOnce() -> Result<T, PluginError> + Send + 'static,
) -> Result<T, Failure> {
    let mut handle = tokio::task::spawn_blocking(move || crate::plugin::within(limit, call));
    let joined = match limit {
        Some(limit) => match tokio::time::timeout(limit, &mut handle).await {
            Ok(joined) => joined,
            Err(_) => {
                if tokio::time::timeout(HUNG_AFTER, &mut handle).await.is_err() {
                    context.hung.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut in_flight) = context.in_flight.lock() {
                        if let Some(run) = in_flight.get_mut(&run_id) {
                            if run.attempt == attempt {
                                run.hung_after = Some(limit);
                            }
                        }
                    }
                    tracing::warn!(run = %run_id, limit = ?limit, "a plugin call ignores its timeout: its slot stays taken until it returns");
                    let _ = (&mut handle).await;
                    context.hung.fetch_sub(1, Ordering::SeqCst);
                }
                return Err(Failure::TimedOut(limit));
            }
        },
        None => handle.await,
    };
    match joined {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e @ (PluginError::NotConfigured { .. } | PluginError::NotProvided { .. }))) => {
            Err(Failure::UnknownJob(e))
        }
        Ok(Err(e)) => Err(Failure::Plugin(e)),
        Err(e) => Err(Failure::Crashed(format!("the job's thread failed: {e}"))),
    }
}

async fn handle(context: &Context, delivery: Delivery) {
    let message = match JobMessage::parse(&delivery.data) {
        Ok(message) => message,
        Err(error) => {
            let preview: String = String::from_utf8_lossy(&delivery.data)
                .chars()
                .take(200)
                .collect();
            // The body may hold anything (secrets too): only debug logs show it.
            tracing::error!(error = %error, "unparsable message: dead-lettered");
            tracing::debug!(body = %preview, "the unparsable message");
            // A message that names its run is recorded on that run (if it still waits).
            let run_id = serde_json::from_slice::<Value>(&delivery.data)
                .ok()
                .and_then(|v| {
                    v.get("run_id")
                        .and_then(Value::as_str)
                        .and_then(|id| Uuid::parse_str(id).ok())
                });
            if let Some(run_id) = run_id {
                let reason = format!("unusable message: {error}");
                match until_ok("recording an unusable message", || {
                    context.store.mark_dead(run_id, &reason)
                })
                .await
                {
                    Ok(true) => tracing::info!(run = %run_id, "run dead: {reason}"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(run = %run_id, error = %e, "recording an unusable message failed")
                    }
                }
            }
            if let Err(e) = broker::dead_letter(&delivery).await {
                tracing::warn!(error = %e, "dead-lettering failed; the message returns to the queue");
            }
            return;
        }
    };
    let Some(run_id) = message.run_id else {
        adopt_bare_message(context, &delivery, &message).await;
        return;
    };
    let previous = broker::previous_deliveries(&delivery);
    let limit = u64::from(
        context
            .config
            .rabbitmq
            .delivery_limit
            .saturating_sub(1)
            .max(1),
    );
    // Without its lease the worker keeps the delivery and tries again (returning it would
    // count a delivery against the message each time, and an outage would use them up).
    let mut claim = context.claims.call((run_id, delivery.redelivered)).await;
    while claim == Some(Claim::Unavailable) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        claim = context.claims.call((run_id, delivery.redelivered)).await;
    }
    let (attempt, trigger) = match claim {
        Some(Claim::Claimed { attempt, trigger }) => (attempt, trigger),
        Some(Claim::Finished(status)) => {
            tracing::debug!(run = %run_id, status = %status, "delivery of a finished run: skipped");
            let _ = broker::ack(&delivery).await;
            return;
        }
        Some(Claim::Running) => {
            tracing::debug!(run = %run_id, "duplicate delivery of a running run: skipped");
            let _ = broker::ack(&delivery).await;
            return;
        }
        Some(Claim::Refused(error)) => {
            // It can never be claimed: recorded with the reason, so that it does not sit
            // queued forever.
            let reason = format!("no worker can claim it: {error}");
            match context.store.mark_dead(run_id, &reason).await {
                Ok(true) => tracing::error!(run = %run_id, "run dead: {reason}"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(run = %run_id, error = %e, "recording an unclaimable run failed")
                }
            }
            let _ = broker::dead_letter(&delivery).await;
            return;
        }
        Some(Claim::Unavailable) => return, // not reached: waited for above
        Some(Claim::Unknown) => {
            tracing::error!(run = %run_id, job = %message.cmd, "message for a run that does not exist: dead-lettered");
            let _ = broker::dead_letter(&delivery).await;
            return;
        }
        None => return, // shutting down
    };
    if let Ok(mut in_flight) = context.in_flight.lock() {
        in_flight.insert(
            run_id,
            InFlight {
                attempt,
                acker: delivery.acker.clone(),
                max_retries: i32::try_from(message.retries.unwrap_or(0)).unwrap_or(i32::MAX),
                hung_after: None,
            },
        );
    }
    run_claimed(
        context, &delivery, &message, run_id, attempt, &trigger, previous, limit,
    )
    .await;
    settled(context, run_id, attempt);
}

/// The run's attempt is no longer this worker's to interrupt: its result is with the recorder.
fn settled(context: &Context, run_id: Uuid, attempt: i32) {
    if let Ok(mut in_flight) = context.in_flight.lock() {
        // Only this attempt: a later attempt of the same run may be in flight here too.
        if in_flight
            .get(&run_id)
            .is_some_and(|run| run.attempt == attempt)
        {
            in_flight.remove(&run_id);
        }
    }
}

/// The original's bare `{cmd, args}` message: it becomes a run row in the outbox (published
/// at once, or by the scheduler), and the bare delivery is acknowledged. The run then travels
/// like any other, so a crash at any point leaves a row that the outbox or a re-delivery
/// completes. A message with an AMQP `message_id` gets a run id derived from it, so its
/// re-delivery creates nothing new; without one, a worker that dies between recording the run
/// and acknowledging the delivery leaves a second run to be created from the re-delivery.
async fn adopt_bare_message(context: &Context, delivery: &Delivery, message: &JobMessage) {
    let message_id = broker::message_id(delivery);
    // Fixed before the first try: an insert retried after a lost reply creates nothing new.
    let id = match &message_id {
        Some(m) => derived_run_id(format!("{}:{m}", context.queue).as_bytes()),
        None => Uuid::new_v4(),
    };
    let new = NewRun {
        id: Some(id),
        job_name: message
            .job_name
            .clone()
            .unwrap_or_else(|| message.cmd.clone())
            .chars()
            .take(MAX_NAME)
            .collect(),
        job: message.cmd.chars().take(MAX_JOB).collect(),
        job_id: None,
        trigger: "manual",
        queue: Some(context.queue.clone()),
        arguments: message.args.clone(),
        preprocessing: message.preprocessing.clone(),
        postprocessing: message.postprocessing.clone(),
        timeout_seconds: message.timeout,
        max_retries: 0,
        parent_id: None,
        published: false,
    };
    let inserted = match until_ok("recording a bare message as a run", || {
        context
            .store
            .insert_runs_reporting(std::slice::from_ref(&new))
    })
    .await
    {
        Ok(inserted) => inserted,
        Err(e) => {
            tracing::error!(error = %e, job = %message.cmd, "a message cannot be recorded as a run: dead-lettered");
            let _ = broker::dead_letter(delivery).await;
            return;
        }
    };
    match (inserted.first(), &message_id) {
        (Some((_, true)), _) => {
            tracing::info!(run = %id, job = %new.job_name, "run queued from a bare message");
            publish_runs(context, id, &[id]).await;
        }
        (_, Some(message_id)) => {
            // A re-delivery, or a sender that reuses its message ids: said once, not run again.
            tracing::warn!(run = %id, message_id = %message_id, job = %new.job_name, "a bare message with this message_id was recorded before (as this run): not run again");
        }
        (_, None) => {}
    }
    let _ = broker::ack(delivery).await;
}

/// A run id derived from what the run comes from (a parent and an index, a message id).
fn derived_run_id(source: &[u8]) -> Uuid {
    Uuid::new_v5(&RUN_ID_NAMESPACE, source)
}

/// Runs a claimed run, records it, then settles its delivery.
#[allow(clippy::too_many_arguments)]
async fn run_claimed(
    context: &Context,
    delivery: &Delivery,
    message: &JobMessage,
    run_id: Uuid,
    attempt: i32,
    trigger: &str,
    previous: u64,
    limit: u64,
) {
    let job_name = message
        .job_name
        .clone()
        .unwrap_or_else(|| message.cmd.clone());
    let finish = |end: RunEnd, result: Option<Value>, error: Option<String>| Finish {
        id: run_id,
        token: context.token,
        attempt,
        end,
        result,
        error,
    };
    if previous >= limit {
        let error = format!(
            "gave up after {previous} deliveries without a result: the job killed its workers or lost their connection each time"
        );
        tracing::info!(run = %run_id, job = %job_name, attempt, "run dead: {error}");
        if record(context, finish(RunEnd::Dead, None, Some(error))).await {
            let _ = broker::dead_letter(delivery).await;
        }
        return;
    }

    tracing::info!(run = %run_id, job = %job_name, cmd = %message.cmd, attempt, worker = %context.worker_id, "run started");
    let started = Instant::now();
    let outcome = execute(context, message, run_id, attempt, &job_name, trigger).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let max_retries = i32::try_from(message.retries.unwrap_or(0)).unwrap_or(i32::MAX);
    let finished = match outcome {
        Ok(result) => {
            tracing::info!(run = %run_id, job = %job_name, attempt, elapsed_ms, "run succeeded");
            finish(RunEnd::Succeeded, Some(result), None)
        }
        Err(failure @ Failure::UnknownJob(_)) => {
            let error = failure.message();
            tracing::info!(run = %run_id, job = %job_name, attempt, "run dead: unknown job: {error}");
            finish(RunEnd::Dead, None, Some(error))
        }
        Err(failure) => {
            let error = failure.message();
            if failure.retryable() && attempt <= max_retries {
                let delay = retry_delay(&context.config.worker, attempt);
                tracing::info!(run = %run_id, job = %job_name, attempt, elapsed_ms, retry_in = ?delay, "run failed; retry scheduled: {error}");
                finish(RunEnd::Retry(delay), failure.details(), Some(error))
            } else {
                tracing::info!(run = %run_id, job = %job_name, attempt, elapsed_ms, "run failed: {error}");
                finish(RunEnd::Failed, failure.details(), Some(error))
            }
        }
    };
    let dead = finished.end == RunEnd::Dead;
    if !record(context, finished).await {
        // Not recorded: the delivery stays unacknowledged (returning it now would only bring
        // it back as a duplicate of a running run). It returns to the queue when this worker's
        // channel closes, and the next worker takes the run over.
        return;
    }
    let settled = if dead {
        broker::dead_letter(delivery).await
    } else {
        broker::ack(delivery).await
    };
    if let Err(e) = settled {
        // Recorded already: a re-delivery will be skipped as finished.
        tracing::debug!(run = %run_id, error = %e, "acknowledging failed after the run was recorded");
    }
}

/// Records a run's end; whether its delivery may be settled. From here on the recorder owns
/// the result: a stopping worker waits for it instead of recording the run as interrupted.
async fn record(context: &Context, finish: Finish) -> bool {
    let (id, attempt) = (finish.id, finish.attempt);
    let recording = Recording::new(&context.recording);
    let answer = context.finishes.enqueue((finish, recording)).await;
    if answer.is_some() {
        // The recorder has it (and commits it even if this task is aborted): no longer this
        // worker's to interrupt.
        settled(context, id, attempt);
    }
    match answer {
        Some(answer) => answer.await.unwrap_or(false),
        None => {
            tracing::warn!(
                "the recorder stopped before a run was recorded; its delivery returns to the queue"
            );
            false
        }
    }
}

/// The retry delay after `attempt` failed: `worker.retry_backoff × 2^(attempt - 1)`, at most
/// `worker.retry_backoff_max`.
pub fn retry_delay(config: &crate::config::WorkerConfig, attempt: i32) -> Duration {
    let factor = 2u32.saturating_pow(u32::try_from(attempt.max(1) - 1).unwrap_or(0).min(20));
    config
        .retry_backoff
        .saturating_mul(factor)
        .min(config.retry_backoff_max)
}

/// Preprocessing (fan-out), the job, postprocessing.
async fn execute(
    context: &Context,
    message: &JobMessage,
    run_id: Uuid,
    attempt: i32,
    job_name: &str,
    trigger: &str,
) -> Result<Value, Failure> {
    let limit = message
        .timeout
        .and_then(|t| Duration::try_from_secs_f64(t).ok())
        .filter(|t| !t.is_zero());
    let host = context.host.clone();
    if let Some(pre) = message.preprocessing.clone() {
        // An earlier attempt fanned out already (its worker died before recording the
        // parent): publish what it created instead of creating every child again.
        let existing = if attempt <= 1 {
            Ok(Vec::new())
        } else {
            until_ok("reading fanned-out runs", || {
                context.store.child_ids(run_id)
            })
            .await
        }
        .map_err(|e| Failure::Crashed(format!("the fanned-out runs cannot be read: {e}")))?;
        if !existing.is_empty() {
            publish_runs(context, run_id, &existing).await;
            tracing::info!(run = %run_id, job = %job_name, children = existing.len(), "run fanned out (by an earlier attempt)");
            return Ok(json!({ "fanned_out": existing.len(), "children": existing }));
        }
        let cmd = message.cmd.clone();
        let args = message.args.clone();
        let planned = blocking(context, (run_id, attempt), limit, move || {
            host.call_preprocessing(&pre, &cmd, args)
        })
        .await?;
        return fan_out(context, message, run_id, job_name, trigger, planned).await;
    }

    let mut args: Args = message.args.clone();
    // Plugins that take a `timeout` argument (command, http) stop their own work in time: the
    // job's timeout is the most they get, so a timed-out attempt has ended before its retry.
    if let Some(timeout) = message.timeout {
        let own = args.get("timeout").and_then(Value::as_f64);
        let bounded = own.filter(|t| *t > 0.0 && *t <= timeout).unwrap_or(timeout);
        args.insert("timeout".into(), json!(bounded));
    }
    let cmd = message.cmd.clone();
    let job_args = args.clone();
    let result = blocking(context, (run_id, attempt), limit, move || {
        host.call_job(&cmd, job_args)
    })
    .await;
    let Some(post) = message.postprocessing.clone() else {
        return result;
    };
    let outcome = match &result {
        Ok(value) => Outcome {
            result: Some(value.clone()),
            error: None,
        },
        Err(failure) => Outcome {
            result: failure.details(),
            error: Some(failure.job_error()),
        },
    };
    let host = context.host.clone();
    let post_name = post.clone();
    match blocking(context, (run_id, attempt), limit, move || {
        host.call_postprocessing(&post_name, args, &outcome)
    })
    .await
    {
        Ok(post_result) => {
            tracing::debug!(run = %run_id, postprocessing = %post, result = %post_result, "postprocessing done");
            result
        }
        Err(failure) => {
            let message = format!("postprocessing {post:?} failed: {}", failure.message());
            match result {
                Ok(_) => Err(Failure::Post(message)),
                Err(job_failure) => {
                    tracing::warn!(run = %run_id, "{message}");
                    Err(job_failure)
                }
            }
        }
    }
}

/// Inserts the fanned-out jobs as child runs and publishes them; the parent's result lists them.
async fn fan_out(
    context: &Context,
    message: &JobMessage,
    run_id: Uuid,
    job_name: &str,
    trigger: &str,
    planned: Vec<crate::plugin::PlannedJob>,
) -> Result<Value, Failure> {
    let trigger: &'static str = match trigger {
        "schedule" => "schedule",
        "webhook" => "webhook",
        _ => "manual",
    };
    let mut children = Vec::with_capacity(planned.len());
    for (index, job) in planned.into_iter().enumerate() {
        let cmd = job.cmd.unwrap_or_else(|| message.cmd.clone());
        if cmd.chars().count() > MAX_JOB {
            return Err(Failure::Crashed(format!(
                "preprocessing returned a job name longer than {MAX_JOB} characters: {cmd:?}"
            )));
        }
        let mut source = run_id.as_bytes().to_vec();
        source.extend_from_slice(&(index as u64).to_be_bytes());
        children.push(NewRun {
            // The parent and the index: a retried insert creates no second set of children.
            id: Some(derived_run_id(&source)),
            job_name: job_name.to_string(),
            job: cmd,
            job_id: None,
            trigger,
            queue: Some(context.queue.clone()),
            arguments: job.args,
            preprocessing: None,
            postprocessing: message.postprocessing.clone(),
            timeout_seconds: message.timeout,
            max_retries: i32::try_from(message.retries.unwrap_or(0)).unwrap_or(i32::MAX),
            parent_id: Some(run_id),
            published: false,
        });
    }
    let ids = if children.is_empty() {
        Vec::new()
    } else {
        until_ok("inserting fanned-out runs", || {
            context.store.insert_runs(&children)
        })
        .await
        .map_err(|e| Failure::Crashed(format!("the fanned-out runs cannot be recorded: {e}")))?
    };
    publish_runs(context, run_id, &ids).await;
    tracing::info!(run = %run_id, job = %job_name, children = ids.len(), "run fanned out");
    Ok(json!({ "fanned_out": ids.len(), "children": ids }))
}

/// Publishes runs this worker created (fan-out children, bare messages) at once; those that
/// fail stay in the outbox for the scheduler.
async fn publish_runs(context: &Context, run_id: Uuid, ids: &[Uuid]) {
    if ids.is_empty() {
        return;
    }
    let mut publisher = context.publisher.lock().await;
    if let Err(e) = publish_queued(&context.store, &mut publisher, &context.queue, Some(ids)).await
    {
        tracing::warn!(run = %run_id, error = %e, "publishing runs failed; the scheduler publishes them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_from_the_backoff_up_to_the_cap() {
        let config = crate::config::WorkerConfig {
            grace_period: Duration::from_secs(60),
            retry_backoff: Duration::from_secs(10),
            retry_backoff_max: Duration::from_secs(60),
            startup_timeout: Duration::from_secs(60),
        };
        let delays: Vec<u64> = (1..=6).map(|n| retry_delay(&config, n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 60, 60, 60]);
        assert_eq!(retry_delay(&config, 1000).as_secs(), 60, "no overflow");
    }

    #[test]
    fn derived_run_ids_are_stable_and_distinct() {
        assert_eq!(derived_run_id(b"a"), derived_run_id(b"a"));
        assert_ne!(derived_run_id(b"a"), derived_run_id(b"b"));
    }
}
