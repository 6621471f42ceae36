//! Stopping a worker: waiting for running jobs within the grace period, then interrupting what
//! still runs — killing what it started and recording it before the lease goes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinSet;
use uuid::Uuid;

use super::batch::until_ok;
use super::delivery::retry_delay;
use super::{Context, Stopped};
use crate::shutdown::Shutdown;
use crate::store::{Finish, RunEnd};

/// The longest that interrupting running jobs may take to record them, before the process
/// exits regardless (their deliveries then return to the queue).
const INTERRUPT_RECORD_LIMIT: Duration = Duration::from_secs(10);

/// A run this process claimed and has not handed to the recorder yet.
pub(super) struct InFlight {
    pub(super) attempt: i32,
    pub(super) acker: crate::queue::Acker,
    pub(super) max_retries: i32,
    /// Its plugin call outlived the job's timeout and has not returned.
    pub(super) hung_after: Option<Duration>,
    /// What its plugin calls may know of it, and its cancellation flag.
    pub(super) call: crate::plugin::RunCall,
}

/// Waits for running jobs up to `grace`, or until a second stop signal.
pub(super) async fn drain(
    tasks: &mut JoinSet<()>,
    grace: Duration,
    shutdown: &mut Shutdown,
) -> Stopped {
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
pub(super) async fn interrupt(context: &Context, tasks: &mut JoinSet<()>) {
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
                let _ = run.acker.ack().await;
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
