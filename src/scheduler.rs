//! The scheduler's work: turning due schedule rows into runs, and publishing queued runs.
//!
//! One pass (ARCHITECTURE.md, invariants 1, 2, 9, 10 and 11):
//! 1. Registry entries without a schedule row (new after an import) get their next run.
//! 2. In one transaction per batch: lock due schedule rows (`FOR UPDATE SKIP LOCKED`), insert
//!    their runs (unique per registry entry and scheduled time), advance `next_run`.
//! 3. Publish queued runs the broker has not confirmed yet (publisher confirms, persistent
//!    messages), then mark them published. Runs left unpublished by a crash, a broker outage or
//!    a lost confirm are published by the next pass.
//!
//! Between passes the scheduler sleeps until the earliest next run or retry (capped by
//! `scheduler.max_sleep`), woken early by Postgres NOTIFY.

use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::config::Config;
use crate::cron::CronSchedule;
use crate::jobfile::{Misfire, MAX_JITTER};
use crate::queue::{JobMessage, Outgoing, Published, Queue, QueueError};
use crate::shutdown::Shutdown;
use crate::store::{ClaimKey, Decision, DueEntry, EntrySchedule, Store, StoreError};
use std::collections::HashSet;

/// Runs published per batch (one transaction, confirms awaited together).
const PUBLISH_BATCH: u32 = 1000;
/// How long a starting scheduler waits for the broker before its first pass.
const EAGER_CONNECT: Duration = Duration::from_secs(5);
/// The longest a batch may wait for the broker's confirms.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Finished runs deleted per statement when pruning, and the pause between statements: a big
/// backlog is pruned in the background without holding locks or the pass.
const PRUNE_CHUNK: u32 = 5000;
const PRUNE_PAUSE: Duration = Duration::from_millis(50);
/// How often the pruner looks for runs past their retention.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The zone of an entry: its own, else the configured one.
pub fn entry_zone(timezone: Option<&str>, default: Tz) -> Tz {
    timezone
        .and_then(|name| name.parse::<Tz>().ok())
        .unwrap_or(default)
}

/// The next run of a registry entry strictly after `after`; `None` if its schedule does not
/// parse (a row written by the original) or never matches again.
pub fn next_run(
    schedule: &str,
    timezone: Option<&str>,
    default: Tz,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    CronSchedule::parse(schedule)
        .ok()?
        .next_after(after, entry_zone(timezone, default))
}

/// What to do with a due entry at `now`. A slot that is merely late (by less than
/// `misfire_grace`: a slow pass, a busy database, an import) runs, and the next slot follows
/// it, so no slot is lost to a late pass. A missed slot (later than that: no scheduler ran)
/// runs once — or not at all with `misfire: skip` — and the schedule goes on from now, so a
/// scheduler that was down runs a missed job once, not once per missed slot.
pub fn decide(
    entry: &DueEntry,
    now: DateTime<Utc>,
    default: Tz,
    misfire_grace: Duration,
) -> Decision {
    let missed = now - entry.next_run
        > chrono::Duration::from_std(misfire_grace).unwrap_or(chrono::Duration::MAX);
    let skip = missed && Misfire::parse(&entry.misfire) == Some(Misfire::Skip);
    let from = if missed { now } else { entry.next_run };
    let run_for = (!skip).then_some(entry.next_run);
    Decision {
        run_for,
        starts_at: run_for.map(|slot| start_of(&entry.job_name, slot, entry.jitter_seconds)),
        next_run: next_run(&entry.schedule, entry.timezone.as_deref(), default, from),
    }
}

/// When the run of `slot` starts: the slot plus a share of the job's jitter that depends only
/// on the job's name and the slot, so every scheduler (and `-aj`, and `--preview`) computes
/// the same time, and the jobs of one slot spread evenly over `[slot, slot + jitter)`.
pub fn start_of(job_name: &str, slot: DateTime<Utc>, jitter_seconds: Option<f64>) -> DateTime<Utc> {
    let Some(jitter) = jitter_seconds.filter(|j| *j > 0.0 && j.is_finite()) else {
        return slot;
    };
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    hash.update(job_name.as_bytes());
    hash.update([0]);
    hash.update(slot.timestamp_millis().to_be_bytes());
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // A uniform share in [0, 1), to the millisecond.
    let share = (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64;
    let millis = (share * jitter.min(MAX_JITTER.as_secs_f64()) * 1000.0).floor() as i64;
    slot.checked_add_signed(chrono::Duration::milliseconds(millis))
        .unwrap_or(slot)
}

/// Keeps one queue connection for publishing, reconnecting with backoff when it is lost.
pub struct Publisher {
    config: Config,
    store: Store,
    role: String,
    broker: Option<Queue>,
    /// No new connection attempt before this (backoff after a failure).
    retry_at: Option<tokio::time::Instant>,
    backoff: Duration,
}

impl Publisher {
    pub fn new(config: &Config, store: &Store, role: &str) -> Publisher {
        Publisher {
            config: config.clone(),
            store: store.clone(),
            role: role.to_string(),
            broker: None,
            retry_at: None,
            backoff: Duration::from_millis(200),
        }
    }

    /// Whether runs go to the table queue (in the store's own database).
    pub fn is_table(&self) -> bool {
        self.config.queue.kind == crate::config::QueueKind::Table
    }

    /// The largest message body published.
    pub fn max_message_size(&self) -> usize {
        self.config.rabbitmq.max_message_size
    }

    /// When the next connection attempt is allowed, if one failed recently.
    pub fn retry_at(&self) -> Option<tokio::time::Instant> {
        self.retry_at
    }

    async fn broker(&mut self) -> Result<&Queue, QueueError> {
        if self.broker.as_ref().is_some_and(|b| !b.is_connected()) {
            self.broker = None;
        }
        if self.broker.is_none() {
            match Queue::connect(&self.config, &self.store, &self.role).await {
                Ok(broker) => {
                    if let Queue::RabbitMq(_) = broker {
                        tracing::info!(broker = %self.config.rabbitmq.describe(), "connected to RabbitMQ");
                    }
                    self.broker = Some(broker);
                    self.retry_at = None;
                    self.backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    self.failed();
                    return Err(e);
                }
            }
        }
        Ok(self.broker.as_ref().expect("connected above"))
    }

    /// The connection is broken: drop it and wait before the next attempt.
    fn failed(&mut self) {
        self.broker = None;
        self.back_off();
    }

    /// No publishing before a pause that doubles with each setback.
    fn back_off(&mut self) {
        self.retry_at = Some(tokio::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
    }

    /// Publishes `batch`; on a broker error the connection is dropped and retried later.
    pub async fn publish(&mut self, batch: &[Outgoing]) -> Result<Vec<Published>, QueueError> {
        let result = match self.broker().await {
            // A broker that stops confirming (a resource alarm) must not hold the outbox.
            Ok(broker) => {
                match tokio::time::timeout(PUBLISH_TIMEOUT, broker.publish(batch)).await {
                    Ok(result) => result,
                    Err(_) => Err(QueueError::Timeout(PUBLISH_TIMEOUT)),
                }
            }
            Err(e) => return Err(e),
        };
        match &result {
            Err(_) => self.failed(),
            // Refused messages are tried again after a pause, not at once.
            Ok(outcomes) if outcomes.contains(&Published::Nacked) => self.back_off(),
            Ok(_) => {}
        }
        result
    }

    /// Messages ready in `queue`, asked within a few seconds. Only a broken connection counts
    /// against publishing (a queue that cannot be inspected does not).
    pub async fn queue_depth(&mut self, queue: &str) -> Result<u32, QueueError> {
        const LIMIT: Duration = Duration::from_secs(5);
        let broker = self.broker().await?;
        let result = match tokio::time::timeout(LIMIT, broker.queue_depth(queue)).await {
            Ok(result) => result,
            Err(_) => Err(QueueError::Timeout(LIMIT)),
        };
        if result.is_err() && !broker.is_connected() {
            self.failed();
        }
        result
    }

    /// Declares `queue` (once per connection), as publishing to it would.
    pub async fn declare(&mut self, queue: &str) -> Result<(), QueueError> {
        let broker = self.broker().await?;
        let result = broker.declare(queue).await;
        if result.is_err() && !broker.is_connected() {
            self.failed();
        }
        result
    }

    pub async fn close(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.close().await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassSummary {
    pub newly_scheduled: usize,
    pub runs_created: usize,
    pub runs_published: usize,
    /// The "now" the pass worked with (the database's clock): entries due by then and still
    /// due afterwards are held by another scheduler or an import.
    pub now: Option<DateTime<Utc>>,
}

/// Steps 1 and 2 of a pass: schedule new entries, create due runs. "Now" is the database's
/// clock, or `at` when given (tests stepping through time).
pub async fn create_due_runs(
    store: &Store,
    config: &Config,
    at: Option<DateTime<Utc>>,
) -> Result<PassSummary, StoreError> {
    create_due_runs_telling(store, config, at, None).await
}

/// [`create_due_runs`], telling `committed` after each batch of runs is committed.
async fn create_due_runs_telling(
    store: &Store,
    config: &Config,
    at: Option<DateTime<Utc>>,
    committed: Option<&tokio::sync::Notify>,
) -> Result<PassSummary, StoreError> {
    let mut summary = PassSummary::default();
    let default_tz = config.timezone;
    // One "now" for the whole pass: a pass catching up slot by slot ends with the slots due
    // when it began, however long it takes.
    let now = match at {
        Some(at) => at,
        None => store.now().await?,
    };
    summary.now = Some(now);
    if store.has_unscheduled_entries().await? {
        let (count, unschedulable) = store
            .fill_missing_schedule(&|e: &EntrySchedule, _| {
                next_run(&e.schedule, e.timezone.as_deref(), default_tz, now)
            })
            .await?;
        summary.newly_scheduled = count;
        for entry in unschedulable {
            tracing::warn!(registry_id = entry.registry_id, schedule = %entry.schedule, "registry entry has no next run (invalid or never-matching schedule); it is not scheduled");
        }
        if count > 0 {
            tracing::info!(entries = count, "scheduled new registry entries");
        }
    }
    let grace = config.scheduler.misfire_grace;
    loop {
        // Whether an entry is due again at once (a late pass catching up slot by slot).
        let again = std::cell::Cell::new(false);
        let (handled, created) = store
            .schedule_due(Some(now), config.scheduler.batch_size, &|entry, now| {
                let decision = decide(entry, now, default_tz, grace);
                if decision.next_run.is_some_and(|next| next <= now) {
                    again.set(true);
                }
                decision
            })
            .await?;
        for run in &created {
            let slot = run
                .scheduled_for
                .map(|t| t.to_rfc3339())
                .unwrap_or_default();
            match &run.skipped {
                Some(reason) => {
                    tracing::info!(run = %run.id, job = %run.job_name, scheduled_for = %slot, "run {reason}")
                }
                None => {
                    tracing::info!(run = %run.id, job = %run.job_name, scheduled_for = %slot, "run queued")
                }
            }
        }
        summary.runs_created += created.len();
        if let (Some(committed), false) = (committed, created.is_empty()) {
            committed.notify_one();
        }
        if handled < config.scheduler.batch_size as usize && !again.get() {
            break;
        }
    }
    Ok(summary)
}

/// Steps 2 and 3 of a pass, overlapped: each batch of due runs is published while the next is
/// created (a pass of many due entries then takes about as long as creating them). Publishing
/// is skipped when `publish` is false (the broker is backing off); it stops at its first error,
/// and creation goes on. What is not published now stays in the outbox for the next pass.
pub async fn create_and_publish(
    store: &Store,
    config: &Config,
    publisher: &mut Publisher,
    publish: bool,
) -> (Result<PassSummary, StoreError>, Result<usize, PassError>) {
    let committed = tokio::sync::Notify::new();
    let created = std::cell::Cell::new(false);
    let creating = async {
        let result = create_due_runs_telling(store, config, None, Some(&committed)).await;
        created.set(true);
        committed.notify_one();
        result
    };
    let publishing = async {
        let mut total = 0;
        if !publish {
            return Ok(total);
        }
        loop {
            let last = created.get();
            total += publish_queued(store, publisher, &config.rabbitmq.queue, None).await?;
            if last {
                return Ok(total);
            }
            committed.notified().await;
        }
    };
    tokio::join!(creating, publishing)
}

/// The queues a scheduler declares as it starts: those its jobs' runs go to (`default` for
/// jobs that name none), so that an installation whose jobs all name other queues gets no
/// unused default queue; the default queue alone while there are no jobs (or they cannot be
/// read by `deadline`), so that a queue the broker refuses is still said at start.
async fn queues_to_declare(
    store: &Store,
    default: &str,
    deadline: tokio::time::Instant,
) -> Vec<String> {
    match tokio::time::timeout_at(deadline, store.queues_in_use(default)).await {
        Ok(Ok(queues)) if !queues.is_empty() => queues,
        Ok(Ok(_)) => vec![default.to_string()],
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the jobs' queues; declaring the default queue only");
            vec![default.to_string()]
        }
        Err(_) => {
            tracing::warn!(
                "cannot read the jobs' queues in time; declaring the default queue only"
            );
            vec![default.to_string()]
        }
    }
}

/// Connects and declares `queues`, counting in `declared` those done (refused ones too). A
/// queue the broker refuses is logged as an error (its runs will be recorded dead) and the
/// others are declared still, unless the refusal took the connection with it; any other
/// failure ends it.
async fn declare_at_start(
    publisher: &mut Publisher,
    queues: &[String],
    declared: &mut usize,
) -> Result<(), QueueError> {
    for queue in queues {
        match publisher.declare(queue).await {
            Ok(()) => {}
            Err(e) if e.is_refusal() => {
                tracing::error!(error = %e, queue = %queue, "the queue cannot be used as configured: runs for it cannot be published (they are recorded dead with the reason)");
                if publisher.retry_at().is_some() {
                    // The broker closed the connection: the passes reconnect after a pause.
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
        *declared += 1;
    }
    Ok(())
}

/// Step 3 of a pass: publish every queued run whose time has come (only those in `only`, when
/// given: a worker's fan-out, a manual run).
pub async fn publish_queued(
    store: &Store,
    publisher: &mut Publisher,
    default_queue: &str,
    only: Option<&[uuid::Uuid]>,
) -> Result<usize, PassError> {
    let mut published = 0;
    loop {
        let batch = store.outbox(PUBLISH_BATCH, only).await?;
        if batch.runs.is_empty() {
            batch.settle(&[], &[]).await?;
            return Ok(published);
        }
        let outgoing: Vec<Outgoing> = batch
            .runs
            .iter()
            .map(|run| Outgoing {
                queue: run
                    .queue
                    .clone()
                    .unwrap_or_else(|| default_queue.to_string()),
                message: JobMessage::of_run(run),
            })
            .collect();
        if publisher.is_table() {
            // The table queue is in the same database: messages go in with the runs' marks,
            // in the batch's own transaction.
            let full = batch.runs.len() == PUBLISH_BATCH as usize;
            let (ids, dead, messages) =
                crate::queue::table::prepare(&batch.runs, &outgoing, publisher.max_message_size());
            for (id, error) in &dead {
                tracing::error!(run = %id, "run dead: {error}");
            }
            batch.settle_into_table(&ids, &dead, &messages).await?;
            crate::queue::table::wake(messages.iter().map(|m| m.0.as_str()));
            published += ids.len();
            if !full {
                return Ok(published);
            }
            continue;
        }
        // On a broker error the batch is dropped unmarked (its transaction rolls back): the
        // runs stay in the outbox for the next pass.
        let outcomes = publisher.publish(&outgoing).await?;
        let mut ids = Vec::with_capacity(batch.runs.len());
        let mut dead = Vec::new();
        let mut nacked = 0;
        for (run, outcome) in batch.runs.iter().zip(outcomes) {
            match outcome {
                Published::Acked => {
                    tracing::debug!(run = %run.id, job = %run.job_name, "run published");
                    ids.push(run.id);
                }
                Published::Nacked => nacked += 1,
                Published::Refused(reason) => {
                    let error = format!("cannot be published: {reason}");
                    tracing::error!(run = %run.id, job = %run.job_name, "run dead: {error}");
                    dead.push((run.id, error));
                }
            }
        }
        let full = batch.runs.len() == PUBLISH_BATCH as usize;
        batch.settle(&ids, &dead).await?;
        published += ids.len();
        if nacked > 0 {
            return Err(QueueError::Nacked(nacked).into());
        }
        if !full {
            return Ok(published);
        }
    }
}

/// Finds runs left `running` by a worker that is gone (its lease ended) after their message
/// was settled, and queues them again; and puts runs that stayed queued long after they were
/// published (no worker claimed them) back in the outbox. A claim counts as orphaned only
/// when it was seen without a lease on two sweeps in a row, so a worker that lost its lease
/// connection for a moment (a database restart) has time to take its lease back.
struct Sweeper {
    every: Duration,
    republish_after: Duration,
    crash_limit: u32,
    last: Option<tokio::time::Instant>,
    suspects: HashSet<ClaimKey>,
}

impl Sweeper {
    fn new(config: &Config) -> Sweeper {
        Sweeper {
            every: config.scheduler.sweep_every,
            republish_after: config.scheduler.republish_after,
            crash_limit: config.rabbitmq.delivery_limit,
            last: None,
            suspects: HashSet::new(),
        }
    }

    async fn sweep(&mut self, store: &Store, publisher: &mut Publisher, default_queue: &str) {
        if self.last.is_some_and(|at| at.elapsed() < self.every) {
            return;
        }
        self.last = Some(tokio::time::Instant::now());
        self.republish(store, publisher, default_queue).await;
        let now: HashSet<ClaimKey> = match store.orphaned_runs().await {
            Ok(claims) => claims.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "looking for orphaned runs failed");
                return;
            }
        };
        let confirmed: Vec<ClaimKey> = now.intersection(&self.suspects).copied().collect();
        self.suspects = now;
        if confirmed.is_empty() {
            return;
        }
        match store.requeue_orphans(&confirmed, self.crash_limit).await {
            Ok(handled) => {
                for (id, attempt, status) in &handled {
                    if status == "dead" {
                        tracing::warn!(run = %id, attempt, "run dead: its worker vanished while running it too often");
                    } else if status == "cancelled" {
                        tracing::info!(run = %id, attempt, "run cancelled: its worker vanished while it was being stopped");
                    } else {
                        tracing::warn!(run = %id, attempt, "run queued again: its worker vanished while running it");
                    }
                }
                self.suspects
                    .retain(|claim| !handled.iter().any(|(id, _, _)| *id == claim.0));
            }
            Err(e) => tracing::warn!(error = %e, "queueing orphaned runs again failed"),
        }
    }
}

impl Sweeper {
    /// Runs published long ago and still unclaimed are published again — only once their
    /// queue is empty: a run waiting behind a backlog is not lost, one whose queue drained
    /// without it is.
    async fn republish(&mut self, store: &Store, publisher: &mut Publisher, default_queue: &str) {
        // While the broker is away nothing can be told about its queues.
        if publisher
            .retry_at()
            .is_some_and(|at| at > tokio::time::Instant::now())
        {
            return;
        }
        let queues = match store
            .stale_queues(self.republish_after, default_queue)
            .await
        {
            Ok(queues) => queues,
            Err(e) => {
                tracing::warn!(error = %e, "looking for unclaimed runs failed");
                return;
            }
        };
        for queue in queues {
            match publisher.queue_depth(&queue).await {
                Ok(0) => {}
                Ok(depth) => {
                    tracing::debug!(queue = %queue, depth, "unclaimed runs wait behind a backlog");
                    continue;
                }
                Err(e) => {
                    tracing::debug!(queue = %queue, error = %e, "cannot inspect a queue; trying again at the next sweep");
                    break;
                }
            }
            match store
                .republish_stale(self.republish_after, &queue, default_queue)
                .await
            {
                Ok(ids) => {
                    for id in ids {
                        tracing::warn!(run = %id, queue = %queue, "run published again: its queue is empty and no worker claimed it within scheduler.republish_after");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "republishing unclaimed runs failed"),
            }
        }
    }
}

/// Deletes finished runs past `runs.retention_days`, in bounded chunks with pauses, on a task
/// of its own: a big backlog never holds up a scheduling pass.
fn spawn_pruner(store: &Store, retention: Duration) -> tokio::task::JoinHandle<()> {
    let store = store.clone();
    tokio::spawn(async move {
        loop {
            let mut total = 0u64;
            loop {
                match store.prune_runs(retention, PRUNE_CHUNK).await {
                    Ok(count) => {
                        total += count;
                        if count < u64::from(PRUNE_CHUNK) {
                            break;
                        }
                        tokio::time::sleep(PRUNE_PAUSE).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "pruning old runs failed");
                        break;
                    }
                }
            }
            if total > 0 {
                tracing::info!(
                    runs = total,
                    "pruned finished runs older than the retention period"
                );
            }
            tokio::time::sleep(PRUNE_EVERY).await;
        }
    })
}

/// The scheduler loop, until `shutdown` (or after one pass with `once`).
pub async fn run(
    store: &Store,
    config: &Config,
    once: bool,
    mut shutdown: Shutdown,
) -> Result<PassSummary, PassError> {
    let mut publisher = Publisher::new(config, store, "scheduler");
    // The passes on connections of their own, so that their statements stay prepared.
    let passes = &store.for_passes();
    let mut listener = match store.notifications().await {
        Ok(listener) => {
            tracing::info!("listening for registry changes and new runs");
            Some(listener)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot LISTEN for registry changes; relying on the wake-up timer");
            None
        }
    };
    let mut total = PassSummary::default();
    let mut db_backoff = Duration::from_millis(200);
    let mut sweeper = Sweeper::new(config);
    // Aborted when the loop ends (a dropped JoinHandle would leave it running).
    let pruner = match (once, config.runs.retention) {
        (false, Some(retention)) => Some(AbortOnDrop(spawn_pruner(store, retention))),
        _ => None,
    };
    // Connected, and the queues its jobs use declared, before anything is due: the first due
    // runs do not wait for the broker's handshake (a burst's first runs started about 5 ms
    // sooner), and a broker out of reach or a queue it refuses is said at start. Not for long:
    // due runs are created (and wait in the outbox) whether the broker answers or not.
    if !once && !publisher.is_table() {
        // One deadline for reading the jobs' queues and declaring them.
        let deadline = tokio::time::Instant::now() + EAGER_CONNECT;
        let mut declared = 0;
        let mut wanted = 0;
        let started = async {
            let queues = queues_to_declare(store, &config.rabbitmq.queue, deadline).await;
            wanted = queues.len();
            tokio::time::timeout_at(
                deadline,
                declare_at_start(&mut publisher, &queues, &mut declared),
            )
            .await
        };
        tokio::select! {
            ready = started => {
                match ready {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot reach the broker yet; due runs wait in the outbox until it answers"),
                    Err(_) if declared == 0 => tracing::warn!("cannot reach the broker yet: no answer within {EAGER_CONNECT:?}; due runs wait in the outbox until it answers"),
                    Err(_) => tracing::warn!("declared {declared} of {wanted} queues within {EAGER_CONNECT:?}; the others are declared when runs are first published to them"),
                }
            }
            _ = shutdown.wait() => {
                drop(pruner);
                publisher.close().await;
                return Ok(total);
            }
        }
    }
    loop {
        let pass = async {
            let mut db_failed = false;
            let mut published = 0;
            let mut pass_now = None;
            let broker_ready = publisher
                .retry_at()
                .is_none_or(|at| at <= tokio::time::Instant::now());
            let (created, publishing) =
                create_and_publish(passes, config, &mut publisher, broker_ready).await;
            match created {
                Ok(summary) => {
                    total.newly_scheduled += summary.newly_scheduled;
                    total.runs_created += summary.runs_created;
                    pass_now = summary.now;
                }
                Err(e) => {
                    db_failed = true;
                    tracing::warn!(error = %e, "scheduling pass failed; retrying");
                    if once {
                        return Err(PassError::from(e));
                    }
                }
            }
            if broker_ready {
                match publishing {
                    Ok(count) => published = count,
                    Err(e) => {
                        tracing::warn!(error = %e, "publishing queued runs failed; they stay queued and are published later");
                        if once {
                            return Err(e);
                        }
                        if matches!(e, PassError::Store(_)) {
                            db_failed = true;
                        }
                    }
                }
            }
            total.runs_published += published;
            if !db_failed {
                sweeper
                    .sweep(passes, &mut publisher, &config.rabbitmq.queue)
                    .await;
            }
            Ok((db_failed, published, pass_now))
        };
        // A stop signal lets the pass end (passes are short): a pass cut between the broker's
        // confirms and the commit that marks its runs published would leave those runs to be
        // published a second time. A second signal exits at once — also from a pass waiting on
        // a server that does not answer — and then that can happen (workers skip duplicates).
        let (db_failed, published, pass_now) = match pass.await {
            Ok(outcome) => outcome,
            Err(e) => {
                publisher.close().await;
                return Err(e);
            }
        };
        if once || shutdown.requested() {
            break;
        }

        // Sleep until the earliest next run or publishable run, or the cap. Publishing waits
        // for the broker's reconnect time, and for a moment when the last pass could publish
        // nothing (rows held by another scheduler), so that nothing spins.
        let now = tokio::time::Instant::now();
        let mut wake = now + config.scheduler.max_sleep;
        if !sweeper.suspects.is_empty() {
            wake = wake.min(now + sweeper.every);
        }
        if db_failed {
            wake = now + db_backoff;
            db_backoff = (db_backoff * 2).min(Duration::from_secs(10));
        } else {
            db_backoff = Duration::from_millis(200);
            match passes.next_wakeup().await {
                Ok(next) => {
                    // Measured on the database's clock, like the due check itself.
                    let until = |at: DateTime<Utc>| {
                        now + (at - next.now).to_std().unwrap_or(Duration::ZERO)
                    };
                    if let Some(at) = next.next_run {
                        // Due before this pass and still there: another scheduler or an import
                        // holds it. Look again in a moment, without spinning.
                        let held = pass_now.is_some_and(|pass| at <= pass);
                        let floor = if held {
                            Duration::from_millis(250)
                        } else {
                            Duration::ZERO
                        };
                        wake = wake.min(until(at).max(now + floor));
                    }
                    if let Some(at) = next.next_publish {
                        let mut publish_at = until(at);
                        if let Some(retry) = publisher.retry_at() {
                            publish_at = publish_at.max(retry);
                        }
                        if published == 0 {
                            publish_at = publish_at.max(now + Duration::from_millis(250));
                        }
                        wake = wake.min(publish_at);
                    }
                    // The sweep looks at running runs, and at published runs nobody claimed.
                    if next.any_running {
                        wake = wake.min(now + sweeper.every);
                    }
                    if let Some(at) = next.oldest_unclaimed {
                        let due = until(at) + sweeper.republish_after;
                        wake = wake.min(due.max(now + sweeper.every));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the next wake-up time");
                    wake = now + Duration::from_secs(1);
                }
            }
        }
        let notified = async {
            match listener.as_mut() {
                Some(listener) => match listener.next().await {
                    Ok(payload) => tracing::debug!(payload = %payload, "woken by a notification"),
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the notification connection; it reconnects");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = notified => {}
            _ = shutdown.wait() => break,
        }
    }
    drop(pruner);
    publisher.close().await;
    Ok(total)
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn entry(next_run: DateTime<Utc>, schedule: &str, misfire: &str) -> DueEntry {
        DueEntry {
            schedule_id: 1,
            registry_id: 1,
            next_run,
            schedule: schedule.into(),
            timezone: None,
            misfire: misfire.into(),
            job_id: 1,
            job_name: "j".into(),
            job: "hello_world".into(),
            arguments: None,
            preprocessing: None,
            postprocessing: None,
            timeout_seconds: None,
            retries: 0,
            queue: None,
            concurrency: "allow".into(),
            jitter_seconds: None,
        }
    }

    fn utc(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 6, 1, h, m, s).unwrap()
    }

    const GRACE: Duration = Duration::from_secs(60);

    #[test]
    fn jitter_spreads_starts_within_the_window_the_same_way_everywhere() {
        let slot = utc(3, 0, 0);
        assert_eq!(start_of("backup-sw1", slot, None), slot);
        assert_eq!(start_of("backup-sw1", slot, Some(0.0)), slot);
        let window = chrono::Duration::seconds(300);
        let starts: Vec<DateTime<Utc>> = (0..1000)
            .map(|i| start_of(&format!("backup-sw{i}"), slot, Some(300.0)))
            .collect();
        assert!(starts.iter().all(|t| *t >= slot && *t < slot + window));
        // Deterministic: the same job and slot start at the same time on every host.
        assert_eq!(starts[7], start_of("backup-sw7", slot, Some(300.0)));
        // Spread: 1,000 jobs land in every minute of the five, not in one second.
        for minute in 0..5 {
            let from = slot + chrono::Duration::seconds(60 * minute);
            let count = starts
                .iter()
                .filter(|t| **t >= from && **t < from + chrono::Duration::seconds(60))
                .count();
            assert!((120..=280).contains(&count), "minute {minute}: {count}");
        }
        let distinct: std::collections::HashSet<_> = starts.iter().collect();
        assert!(
            distinct.len() > 900,
            "{} distinct start times",
            distinct.len()
        );
        // Another slot of the same job gets another offset.
        let next = utc(4, 0, 0);
        assert_ne!(
            start_of("backup-sw1", next, Some(300.0)) - next,
            start_of("backup-sw1", slot, Some(300.0)) - slot
        );
    }

    #[test]
    fn on_time_runs_the_slot_and_advances_one_step() {
        let d = decide(
            &entry(utc(10, 0, 0), "*/5 * * * *", "run_once"),
            utc(10, 0, 0),
            Tz::UTC,
            GRACE,
        );
        assert_eq!(d.run_for, Some(utc(10, 0, 0)));
        assert_eq!(d.next_run, Some(utc(10, 5, 0)));
    }

    #[test]
    fn after_downtime_runs_once_then_goes_on_from_now() {
        let d = decide(
            &entry(utc(6, 0, 0), "*/5 * * * *", "run_once"),
            utc(10, 2, 0),
            Tz::UTC,
            GRACE,
        );
        assert_eq!(d.run_for, Some(utc(6, 0, 0)), "the missed slot runs once");
        assert_eq!(
            d.next_run,
            Some(utc(10, 5, 0)),
            "no catch-up of every missed slot"
        );
    }

    #[test]
    fn misfire_skip_drops_missed_runs_but_not_late_ticks() {
        let d = decide(
            &entry(utc(6, 0, 0), "*/5 * * * *", "skip"),
            utc(10, 2, 0),
            Tz::UTC,
            GRACE,
        );
        assert_eq!(d.run_for, None);
        assert_eq!(d.next_run, Some(utc(10, 5, 0)));
        let d = decide(
            &entry(utc(10, 0, 0), "*/5 * * * *", "skip"),
            utc(10, 0, 2),
            Tz::UTC,
            GRACE,
        );
        assert_eq!(
            d.run_for,
            Some(utc(10, 0, 0)),
            "two seconds late is not missed"
        );
    }

    #[test]
    fn an_unparsable_schedule_has_no_next_run() {
        let d = decide(
            &entry(utc(10, 0, 0), "every full moon", "run_once"),
            utc(10, 0, 0),
            Tz::UTC,
            GRACE,
        );
        assert_eq!(d.run_for, Some(utc(10, 0, 0)));
        assert_eq!(d.next_run, None);
    }
}
