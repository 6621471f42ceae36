//! One delivery: parse, claim, run preprocessing, the job and postprocessing on blocking
//! threads, record, then settle the delivery.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};

use serde_json::{json, Value};
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use uuid::Uuid;

use super::batch::{until_ok, Recording, Write, Written};
use super::{Context, InFlight};
use crate::jobfile::{MAX_JOB, MAX_NAME};
use crate::plugin::{Args, Outcome, PluginError, RunCall};
use crate::queue::{Delivery, JobMessage};
use crate::scheduler::publish_queued;
use crate::store::{Claim, ClaimedRun, Finish, NewRun, RunEnd};

/// How long a timed-out plugin call may take to return before its slot counts as hung.
const HUNG_AFTER: Duration = Duration::from_secs(10);
/// Namespace of the run ids derived for fan-out children and bare messages.
const RUN_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a6f_6273_6368_6c65_7564_6572_2d72_756e);

/// Why a run did not succeed.
pub(super) enum Failure {
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

/// Runs blocking plugin code on the worker's call threads, within `limit`.
///
/// A call that outlives its limit has failed, but its attempt is not over while its code
/// still runs: this waits for the thread to return (plugins that honour their `timeout`
/// argument, like `command`, return at once), so that a retry never overlaps it. A call that
/// does not return within `HUNG_AFTER` counts as hung; it keeps its slot (and its run stays
/// running) until it returns or the worker stops.
pub(super) async fn blocking<T: Send + 'static>(
    context: &Context,
    (run_id, attempt): (Uuid, i32),
    limit: Option<Duration>,
    call: impl FnOnce() -> Result<T, PluginError> + Send + 'static,
) -> Result<T, Failure> {
    let run = context.in_flight.lock().ok().and_then(|runs| {
        runs.get(&run_id)
            .filter(|run| run.attempt == attempt)
            .map(|run| run.call.clone())
    });
    let mut handle = context
        .calls
        .run(move || crate::plugin::in_run(run, || crate::plugin::within(limit, call)));
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
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(e @ (PluginError::NotConfigured { .. } | PluginError::NotProvided { .. })))) => {
            Err(Failure::UnknownJob(e))
        }
        Ok(Ok(Err(e))) => Err(Failure::Plugin(e)),
        Ok(Err(panic)) => Err(Failure::Crashed(format!(
            "the job's thread failed: it panicked: {panic}"
        ))),
        Err(_) => Err(Failure::Crashed(
            "the job's thread failed: no thread could be started for it".into(),
        )),
    }
}

/// Gives back the deliveries waiting for a slot when the worker stops (or its consumer ends),
/// so that the next worker takes their runs: the runs still queued are put back in the
/// outbox and published again at once (by the scheduler's outbox should that fail), then
/// every delivery of a run is acknowledged (one whose run is not queued any more is a
/// duplicate). A new message is a first delivery: the wait never counts against
/// `rabbitmq.delivery_limit`. Deliveries that name no run are done with as a slot would. Should
/// the database not answer, the deliveries return to the queue with the channel.
pub(super) async fn hand_back(context: &Context, deliveries: Vec<Delivery>) {
    let mut runs: Vec<(Uuid, Delivery)> = Vec::new();
    for delivery in deliveries {
        if let Some((_, run_id)) = run_message(context, &delivery).await {
            runs.push((run_id, delivery));
        }
    }
    if runs.is_empty() {
        return;
    }
    let ids: Vec<Uuid> = runs.iter().map(|(id, _)| *id).collect();
    let put_back = match context.store.republish(&ids).await {
        Ok(put_back) => put_back,
        Err(e) => {
            tracing::warn!(error = %e, runs = ids.len(), "runs waiting for a slot could not be handed back; their deliveries return to the queue with the channel");
            return;
        }
    };
    for (run_id, delivery) in &runs {
        if let Err(e) = delivery.acker.ack().await {
            tracing::debug!(run = %run_id, error = %e, "acknowledging a handed-back delivery failed; it returns to the queue (the run is published again as well)");
        }
    }
    tracing::debug!(
        runs = put_back.len(),
        deliveries = runs.len(),
        "deliveries that waited for a slot handed back to the queue"
    );
    if let Some(first) = put_back.first() {
        publish_runs(context, *first, &put_back).await;
    }
}

/// Publishes the runs of deliveries that waited long for a slot again, for workers with a free
/// slot (`waiting::COPY_AFTER`); their deliveries stay in the worker until let go.
pub(super) async fn publish_again(context: &Context, copies: Vec<super::waiting::Copy>) {
    let ids: Vec<Uuid> = copies.iter().map(|(id, _)| *id).collect();
    let put_back = match context.store.republish(&ids).await {
        Ok(put_back) => put_back,
        Err(e) => {
            tracing::warn!(error = %e, runs = ids.len(), "runs waiting for a slot could not be published again; trying again shortly");
            for (_, copy) in &copies {
                copy.failed();
            }
            return;
        }
    };
    // A run not put back needs no copy: it runs or ran elsewhere, or the outbox has it.
    for (_, copy) in &copies {
        copy.out();
    }
    if let Some(first) = put_back.first() {
        tracing::debug!(
            runs = put_back.len(),
            "runs waiting for a slot published again for other workers"
        );
        publish_runs(context, *first, &put_back).await;
    }
}

/// Lets deliveries go that waited `waiting::LET_GO_AFTER` for a slot, their runs out again:
/// acknowledged.
pub(super) async fn let_go(gone: Vec<Delivery>) {
    tracing::debug!(
        deliveries = gone.len(),
        "deliveries that waited long for a slot let go (their runs are published again)"
    );
    for delivery in gone {
        if let Err(e) = delivery.acker.ack().await {
            tracing::debug!(error = %e, "letting a waiting delivery go failed; it returns to the queue with its channel");
        }
    }
}

/// Deliveries that waited for a slot and name no run: done with without one.
pub(super) async fn without_slot(context: &Context, deliveries: Vec<Delivery>) {
    for delivery in deliveries {
        let _ = run_message(context, &delivery).await;
    }
}

/// A delivery to handle in a slot. `claimed`: the message, its run and the answer to the run's
/// claim, which is already with the writer (handed over with the result of the job that had
/// the slot before).
pub(super) struct Start {
    delivery: Delivery,
    slot: OwnedSemaphorePermit,
    claimed: Option<(JobMessage, Uuid, oneshot::Receiver<Written>)>,
}

/// Settles a recorded run's delivery once its result is committed.
type Settle = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Handles one delivery in the slot `slot`. When its job ends, the slot goes to a delivery
/// waiting in this worker for one (`worker.lookahead`), if any: that run's claim is handed to
/// the writer together with the ended job's result, so both are in one batch (one commit), and
/// the next job starts without waiting for the broker or a second batch. Otherwise the slot
/// goes back to the worker. Either way, the ended run's delivery is settled once its result is
/// committed, while the slot's next job runs.
pub(super) async fn handle(context: &Context, delivery: Delivery, slot: OwnedSemaphorePermit) {
    let mut settling = FuturesUnordered::<Settle>::new();
    let mut next = Some(Start {
        delivery,
        slot,
        claimed: None,
    });
    while let Some(start) = next.take() {
        let one = handle_one(context, start);
        tokio::pin!(one);
        let (settle, following) = loop {
            tokio::select! {
                done = &mut one => break done,
                Some(()) = settling.next(), if !settling.is_empty() => {}
            }
        };
        settling.extend(settle);
        next = following;
    }
    while settling.next().await.is_some() {}
}

/// One delivery in its slot; how to settle it when that waits for its result's commit, and
/// the delivery its slot goes to next.
async fn handle_one(context: &Context, start: Start) -> (Option<Settle>, Option<Start>) {
    let Start {
        delivery,
        slot,
        claimed,
    } = start;
    if let Some((message, run_id, answer)) = claimed {
        let claim = match answer.await {
            Ok(Written::Claim(claim)) => Some(claim),
            _ => None,
        };
        return claimed_run(context, delivery, message, run_id, claim, slot).await;
    }
    let Some((message, run_id)) = run_message(context, &delivery).await else {
        return (None, None);
    };
    let claim = claim_run(context, run_id, delivery.redelivered).await;
    claimed_run(context, delivery, message, run_id, claim, slot).await
}

/// The message of a delivery and the run it names. A delivery that names no run needs no
/// slot and is done with here: an unusable one is dead-lettered (and recorded on its run, if
/// it names one), the original's bare message becomes a run of its own.
async fn run_message(context: &Context, delivery: &Delivery) -> Option<(JobMessage, Uuid)> {
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
            if let Err(e) = delivery.acker.dead_letter().await {
                tracing::warn!(error = %e, "dead-lettering failed; the message returns to the queue");
            }
            return None;
        }
    };
    let Some(run_id) = message.run_id else {
        adopt_bare_message(context, delivery, &message).await;
        return None;
    };
    Some((message, run_id))
}

/// A delivery of a run, after the first answer to its claim.
async fn claimed_run(
    context: &Context,
    delivery: Delivery,
    message: JobMessage,
    run_id: Uuid,
    mut claim: Option<Claim>,
    slot: OwnedSemaphorePermit,
) -> (Option<Settle>, Option<Start>) {
    let previous = delivery.previous_deliveries;
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
    while claim == Some(Claim::Unavailable) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        claim = claim_run(context, run_id, delivery.redelivered).await;
    }
    let (attempt, trigger, run) = match claim {
        Some(Claim::Claimed {
            attempt,
            trigger,
            run,
        }) => (attempt, trigger, run),
        Some(Claim::Finished(status)) => {
            tracing::debug!(run = %run_id, status = %status, "delivery of a finished run: skipped");
            let _ = delivery.acker.ack().await;
            return (None, None);
        }
        Some(Claim::Running) => {
            tracing::debug!(run = %run_id, "duplicate delivery of a running run: skipped");
            let _ = delivery.acker.ack().await;
            return (None, None);
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
            let _ = delivery.acker.dead_letter().await;
            return (None, None);
        }
        Some(Claim::Unavailable) => return (None, None), // not reached: waited for above
        Some(Claim::Unknown) => {
            tracing::error!(run = %run_id, job = %message.cmd, "message for a run that does not exist: dead-lettered");
            let _ = delivery.acker.dead_letter().await;
            return (None, None);
        }
        None => return (None, None), // shutting down
    };
    let call = run_call(context, &message, run_id, attempt, &trigger, &run);
    if let Ok(mut in_flight) = context.in_flight.lock() {
        in_flight.insert(
            run_id,
            InFlight {
                attempt,
                acker: delivery.acker.clone(),
                max_retries: i32::try_from(message.retries.unwrap_or(0)).unwrap_or(i32::MAX),
                hung_after: None,
                call,
            },
        );
    }
    let ended = run_claimed(
        context, &delivery, &message, run_id, attempt, &trigger, previous, limit, slot,
    )
    .await;
    settled(context, run_id, attempt);
    ended
}

/// Claims the run through the worker's writer; `None` when the writer is gone.
async fn claim_run(context: &Context, run_id: Uuid, redelivered: bool) -> Option<Claim> {
    match context
        .writes
        .call(Write::Claim(run_id, redelivered))
        .await?
    {
        Written::Claim(claim) => Some(claim),
        Written::Finish(_) => None,
    }
}

/// What a claimed run's plugin calls may know of it (the SDK's `Run`), and a fresh
/// cancellation flag.
fn run_call(
    context: &Context,
    message: &JobMessage,
    run_id: Uuid,
    attempt: i32,
    trigger: &str,
    run: &ClaimedRun,
) -> RunCall {
    let zone = crate::scheduler::entry_zone(run.timezone.as_deref(), context.config.timezone);
    RunCall {
        context: json!({
            "id": run_id,
            "job": message.job_name.clone().unwrap_or_else(|| message.cmd.clone()),
            "trigger": trigger,
            "scheduled_for": run.scheduled_for.map(|t| t.with_timezone(&zone).to_rfc3339()),
            "attempt": attempt,
            "worker": context.worker_id,
            "parent": run.parent,
        }),
        cancelled: Arc::new(AtomicBool::new(false)),
    }
}

/// Whether the run's cancel was seen by this worker.
fn cancel_seen(context: &Context, run_id: Uuid, attempt: i32) -> bool {
    context.in_flight.lock().is_ok_and(|runs| {
        runs.get(&run_id)
            .is_some_and(|run| run.attempt == attempt && run.call.cancelled.load(Ordering::SeqCst))
    })
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
    let message_id = delivery.message_id.clone();
    // Fixed before the first try: an insert retried after a lost reply creates nothing new.
    let id = match &message_id {
        Some(m) => derived_run_id(format!("{}:{m}", context.queue).as_bytes()),
        None => crate::store::new_run_id(),
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
            let _ = delivery.acker.dead_letter().await;
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
    let _ = delivery.acker.ack().await;
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
    slot: OwnedSemaphorePermit,
) -> (Option<Settle>, Option<Start>) {
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
            let _ = delivery.acker.dead_letter().await;
        }
        return (None, None);
    }

    tracing::info!(run = %run_id, job = %job_name, cmd = %message.cmd, attempt, worker = %context.worker_id, "run started");
    let started = Instant::now();
    let outcome = execute(context, message, run_id, attempt, &job_name, trigger).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let max_retries = i32::try_from(message.retries.unwrap_or(0)).unwrap_or(i32::MAX);
    let finished = match outcome {
        Err(failure) if cancel_seen(context, run_id, attempt) => {
            let error = failure.message();
            tracing::info!(run = %run_id, job = %job_name, attempt, elapsed_ms, "run cancelled: {error}");
            finish(RunEnd::Cancelled, failure.details(), Some(error))
        }
        Ok(result) if cancel_seen(context, run_id, attempt) => {
            // Recorded as its call ended; the store records it cancelled, saying so.
            tracing::info!(run = %run_id, job = %job_name, attempt, elapsed_ms, "run cancelled (its job had finished before it could be stopped)");
            finish(RunEnd::Succeeded, Some(result), None)
        }
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
    // The job is over: its slot takes the next delivery while this one is recorded.
    let (recorded, next) = record_passing_slot(context, finished, slot).await;
    let Some(recorded) = recorded else {
        return (None, next);
    };
    let acker = delivery.acker.clone();
    let settle: Settle = Box::pin(async move {
        if !matches!(recorded.await, Ok(Written::Finish(true))) {
            // Not recorded: the delivery stays unacknowledged (returning it now would only
            // bring it back as a duplicate of a running run). It returns to the queue when
            // this worker's channel closes, and the next worker takes the run over.
            return;
        }
        let settled = if dead {
            acker.dead_letter().await
        } else {
            acker.ack().await
        };
        if let Err(e) = settled {
            // Recorded already: a re-delivery will be skipped as finished.
            tracing::debug!(run = %run_id, error = %e, "acknowledging failed after the run was recorded");
        }
    });
    (Some(settle), next)
}

/// Hands an ended run's result to the recorder, and its slot to the next delivery waiting in
/// this worker for one, if any: when that delivery names its run, the run's claim goes to the
/// writer with the result, in the same batch. Returns the result's answer (`None`: the
/// recorder is gone) and what the slot runs next; without a waiting delivery the slot goes
/// back to the worker.
async fn record_passing_slot(
    context: &Context,
    finish: Finish,
    slot: OwnedSemaphorePermit,
) -> (Option<oneshot::Receiver<Written>>, Option<Start>) {
    let (id, attempt) = (finish.id, finish.attempt);
    let mut writes = vec![Write::Finish(finish, Recording::new(&context.recording))];
    let mut next = None;
    let mut claiming = None;
    match context.waiting.take() {
        None => drop(slot),
        Some(delivery) => match JobMessage::parse(&delivery.data) {
            Ok(message) if message.run_id.is_some() => {
                let run_id = message.run_id.unwrap_or_default();
                writes.push(Write::Claim(run_id, delivery.redelivered));
                claiming = Some((delivery, message, run_id, slot));
            }
            // Handled as any delivery: its own message says what becomes of it.
            _ => {
                next = Some(Start {
                    delivery,
                    slot,
                    claimed: None,
                })
            }
        },
    }
    let Some(mut answers) = context.writes.enqueue_together(writes).await else {
        tracing::warn!(
            "the recorder stopped before a run was recorded; its delivery returns to the queue"
        );
        return (None, None);
    };
    // The recorder has it (and commits it even if this task is aborted): no longer this
    // worker's to interrupt.
    settled(context, id, attempt);
    if let Some((delivery, message, run_id, slot)) = claiming {
        next = answers.pop().map(|claim| Start {
            delivery,
            slot,
            claimed: Some((message, run_id, claim)),
        });
    }
    (answers.pop(), next)
}

/// Records a run's end; whether its delivery may be settled. From here on the recorder owns
/// the result: a stopping worker waits for it instead of recording the run as interrupted.
async fn record(context: &Context, finish: Finish) -> bool {
    let (id, attempt) = (finish.id, finish.attempt);
    let recording = Recording::new(&context.recording);
    let answer = context
        .writes
        .enqueue(Write::Finish(finish, recording))
        .await;
    if answer.is_some() {
        // The recorder has it (and commits it even if this task is aborted): no longer this
        // worker's to interrupt.
        settled(context, id, attempt);
    }
    match answer {
        Some(answer) => matches!(answer.await, Ok(Written::Finish(true))),
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
    // Children keep their parent's trigger, except `chain`: a chain starts from the run that
    // was chained, not from each of its children.
    let trigger: &'static str = match trigger {
        "schedule" => "schedule",
        "webhook" => "webhook",
        "backfill" => "backfill",
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
        let inserted = until_ok("inserting fanned-out runs", || {
            context.store.insert_children(run_id, &children)
        })
        .await
        .map_err(|e| Failure::Crashed(format!("the fanned-out runs cannot be recorded: {e}")))?;
        match inserted {
            Some(ids) => ids,
            // Recorded cancelled (its cancel was asked for): nothing fans out.
            None => {
                return Err(Failure::Crashed(
                    "cancelled before it fanned out: no run was created".into(),
                ))
            }
        }
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
            lookahead: None,
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
