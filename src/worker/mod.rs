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

mod batch;
mod calls;
mod delivery;
mod stop;
mod waiting;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::config::Config;
use crate::plugin::PluginHost;
use crate::queue::{Queue, QueueError};
use crate::scheduler::Publisher;
use crate::shutdown::Shutdown;
use crate::store::Store;

use batch::{write_batch, Batcher, Claimer, Write, Written};
pub use delivery::retry_delay;
use delivery::{hand_back, handle, let_go, publish_again, without_slot};
use stop::{drain, interrupt, InFlight};
use waiting::Waiting;

/// What every delivery handler shares.
struct Context {
    store: Store,
    host: PluginHost,
    config: Config,
    worker_id: String,
    /// This process's lease token (see `Store::worker_lease`).
    token: i32,
    queue: String,
    /// Claims and results, written in batches.
    writes: Batcher<Write, Written>,
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
    /// The threads plugin calls run on.
    calls: calls::CallThreads,
    /// Deliveries waiting for a slot (`worker.lookahead`).
    waiting: Waiting,
}

/// How often a worker with running runs asks whether one of them was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(500);

/// Sets the cancellation flag of running runs whose cancel was asked for (`runs --cancel`, a
/// replacing run): plugins that look at it stop (`command` kills its process group), and the
/// run is recorded cancelled when its call returns. Asks the database only while runs run.
async fn watch_cancels(context: Arc<Context>) {
    loop {
        tokio::time::sleep(CANCEL_POLL).await;
        let running: Vec<Uuid> = match context.in_flight.lock() {
            Ok(runs) => runs
                .iter()
                .filter(|(_, run)| !run.call.cancelled.load(Ordering::SeqCst))
                .map(|(id, _)| *id)
                .collect(),
            Err(_) => continue,
        };
        if running.is_empty() {
            continue;
        }
        let cancelled = match context.store.cancel_requested(&running).await {
            Ok(cancelled) => cancelled,
            Err(e) => {
                tracing::debug!(error = %e, "looking for cancelled runs failed; trying again");
                continue;
            }
        };
        if let Ok(runs) = context.in_flight.lock() {
            for id in cancelled {
                if let Some(run) = runs.get(&id) {
                    if !run.call.cancelled.swap(true, Ordering::SeqCst) {
                        tracing::info!(run = %id, attempt = run.attempt, "run cancelled by an operator: stopping it");
                    }
                }
            }
        }
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
) -> Result<Stopped, QueueError> {
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
    let writes = {
        let claimer = Claimer {
            store: store.for_writes(),
            worker: options.id.clone(),
            token: lease.token,
            held: lease.held.clone(),
        };
        Batcher::spawn(move |batch: Vec<Write>| {
            let claimer = claimer.clone();
            async move { write_batch(&claimer, batch).await }
        })
    };
    let context = Arc::new(Context {
        store: store.clone(),
        host,
        config: config.clone(),
        worker_id: options.id.clone(),
        token: lease.token,
        queue: options.queue.clone(),
        writes,
        publisher: Mutex::new(Publisher::new(
            config,
            &store,
            &format!("worker {} fan-out", options.id),
        )),
        in_flight: std::sync::Mutex::new(HashMap::new()),
        recording: Arc::new(AtomicUsize::new(0)),
        hung: AtomicUsize::new(0),
        calls: calls::CallThreads::new(),
        waiting: Waiting::default(),
    });
    let cancel_watch = tokio::spawn(watch_cancels(context.clone()));
    let slots = options.slots.max(1);
    let semaphore = Arc::new(Semaphore::new(slots));
    // Unacknowledged deliveries at most: one per slot, and those waiting for a slot.
    let lookahead = config
        .worker
        .lookahead
        .unwrap_or(u16::try_from(slots).unwrap_or(u16::MAX));
    let prefetch = u16::try_from(slots)
        .unwrap_or(u16::MAX)
        .saturating_add(lookahead);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let tag = format!("jobschleuder-{}-{}", options.id, std::process::id());
    let mut backoff = Duration::from_millis(200);
    let mut broker: Option<Queue> = None;

    let stopped: Result<Stopped, QueueError> = 'session: loop {
        if shutdown.requested() {
            break Ok(drain(&mut tasks, config.worker.grace_period, &mut shutdown).await);
        }
        let role = format!("worker {}", options.id);
        let session = async {
            let broker = Queue::connect(config, &store, &role).await?;
            let consumer = broker.consume(&options.queue, prefetch, &tag).await?;
            Ok::<_, QueueError>((broker, consumer))
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
            Err(e @ QueueError::QueueMismatch { .. }) => {
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
            // A delivery is read for a free slot, or to wait for one while there is room.
            let room = context.waiting.len() < usize::from(lookahead);
            tokio::select! {
                _ = shutdown.wait() => {
                    if let Some(broker) = &broker {
                        if let Err(e) = broker.cancel(&mut consumer, &tag).await {
                            tracing::debug!(error = %e, "cancelling the consumer failed");
                        }
                    }
                    // What waits for a slot goes back to the queue for the next worker,
                    // uncounted (once the consumer is gone: no copy comes back here); the
                    // drain below lets that finish.
                    let waiting = context.waiting.take_all();
                    if !waiting.is_empty() {
                        let context = context.clone();
                        tasks.spawn(async move { hand_back(&context, waiting).await });
                    }
                    break 'session Ok(drain(&mut tasks, config.worker.grace_period, &mut shutdown).await);
                }
                acquired = semaphore.clone().acquire_owned(), if permit.is_none() => {
                    let slot = acquired.expect("the semaphore is never closed");
                    match context.waiting.take() {
                        Some(delivery) => {
                            let context = context.clone();
                            tasks.spawn(async move { handle(&context, delivery, slot).await });
                        }
                        None => permit = Some(slot),
                    }
                }
                next = consumer.next(), if permit.is_some() || room => match next {
                    Some(Ok(delivery)) => match permit.take() {
                        Some(slot) => {
                            // Oldest first.
                            let delivery = match context.waiting.take() {
                                Some(older) => {
                                    context.waiting.push(delivery);
                                    older
                                }
                                None => delivery,
                            };
                            let context = context.clone();
                            tasks.spawn(async move { handle(&context, delivery, slot).await });
                        }
                        None => context.waiting.push(delivery),
                    },
                    Some(Err(e)) => {
                        context.waiting.forget();
                        let text = e.to_string();
                        if e.is_consumer_timeout() {
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
                        // The channel may live on: what waits is given back on it.
                        let waiting = context.waiting.take_all();
                        if !waiting.is_empty() {
                            let context = context.clone();
                            tasks.spawn(async move { hand_back(&context, waiting).await });
                        }
                        tracing::warn!("the broker ended the consumer; reconnecting");
                        break;
                    }
                },
                _ = context.waiting.taken.notified(), if !room && lookahead > 0 => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = hung_check.tick() => {
                    // Deliveries that wait long: their runs go to other workers too.
                    let (copies, others) = context.waiting.to_copy();
                    if !copies.is_empty() {
                        let context = context.clone();
                        tasks.spawn(async move { publish_again(&context, copies).await });
                    }
                    if !others.is_empty() {
                        let context = context.clone();
                        tasks.spawn(async move { without_slot(&context, others).await });
                    }
                    let gone = context.waiting.to_let_go();
                    if !gone.is_empty() {
                        tasks.spawn(let_go(gone));
                    }
                    let hung = context.hung.load(Ordering::SeqCst);
                    if hung >= slots {
                        tracing::error!(slots, "every slot is held by a plugin call that ignores its timeout: stopping so that the service manager restarts the worker (its runs are queued for their next attempt)");
                        // Nothing waiting is started any more.
                        context.waiting.forget();
                        break 'session Ok(Stopped::Stuck);
                    }
                }
            }
        }
    };
    if !tasks.is_empty() {
        interrupt(&context, &mut tasks).await;
    }
    cancel_watch.abort();
    // Let the last acknowledgements reach the queue before the channel closes.
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
