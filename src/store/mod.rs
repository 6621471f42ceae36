//! The store: every table, behind one interface with two implementations, chosen from the
//! config at start-up — Postgres ([`postgres`], for many hosts) and SQLite ([`sqlite`], one
//! file, for one host). Commands, scheduler, worker and listener use [`Store`] and never know
//! which one they have; each implementation gives the same answers and keeps the same
//! guarantees (ARCHITECTURE.md). No other module writes SQL.
//!
//! # Transactions, locks, and timeouts
//! A registry import is one transaction: it deletes the old registry and inserts the new one, so a
//! concurrent reader sees either the old registry or the new one, never a mix, and a failure
//! leaves the old one in place. Waiting for a connection (Postgres) or for the write lock
//! (SQLite) times out after 10 seconds with an error that names the database.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::config::{Config, DatabaseConfig, QueueKind};
use crate::jobfile::JobDefinition;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// The store the config names; cheap to clone (a pool).
#[derive(Debug, Clone)]
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

/// Calls the same method on whichever store this is.
macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Store::Postgres($store) => $call,
            Store::Sqlite($store) => $call,
        }
    };
}

/// Runs locked for publishing. Other schedulers skip them until this batch is settled or
/// dropped.
pub struct OutboxBatch {
    pub runs: Vec<OutboxRun>,
    inner: OutboxInner,
}

enum OutboxInner {
    Postgres(postgres::Outbox),
    Sqlite(sqlite::Outbox),
}

impl OutboxBatch {
    /// Marks the runs the queue took as published and records the runs that can never be
    /// published dead (with the reason), and releases the batch.
    pub async fn settle(
        self,
        published: &[Uuid],
        dead: &[(Uuid, String)],
    ) -> Result<(), StoreError> {
        self.settle_into_table(published, dead, &[]).await
    }

    /// [`OutboxBatch::settle`], publishing `messages` (queue, body) into the table queue in
    /// the same transaction: a run is marked published exactly when its message is queued.
    pub async fn settle_into_table(
        self,
        published: &[Uuid],
        dead: &[(Uuid, String)],
        messages: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        match self.inner {
            OutboxInner::Postgres(outbox) => outbox.settle(published, dead, messages).await,
            OutboxInner::Sqlite(outbox) => outbox.settle(published, dead, messages).await,
        }
    }
}

/// Notifications: registry changes and new runs (what schedulers wake up on).
pub struct Notifications {
    inner: NotificationsInner,
}

enum NotificationsInner {
    Postgres(sqlx::postgres::PgListener),
    Sqlite(sqlite::Watch),
}

impl Notifications {
    /// The next notification's payload. After a lost connection this errs once; the next call
    /// connects again.
    pub async fn next(&mut self) -> Result<String, StoreError> {
        match &mut self.inner {
            NotificationsInner::Postgres(listener) => postgres::next_notification(listener).await,
            NotificationsInner::Sqlite(watch) => watch.next().await,
        }
    }
}

/// A message of the table queue, as a consumer takes it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueueMessage {
    pub id: i64,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    /// Times it was handed out, this time included.
    pub deliveries: i32,
}

/// A dead-lettered message of the table queue (`runs --dead-letters`).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub queue: String,
    #[serde(skip)]
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub deliveries: i32,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    pub dead_at: DateTime<Utc>,
}

/// Wake-ups of table-queue consumers from other processes.
pub struct QueueWakeups {
    inner: WakeupsInner,
}

enum WakeupsInner {
    Postgres(sqlx::postgres::PgListener),
    Sqlite(sqlite::Watch),
}

impl QueueWakeups {
    /// Returns when `queue` may have messages that another process published or returned.
    pub async fn next(&mut self, queue: &str) -> Result<(), StoreError> {
        match &mut self.inner {
            WakeupsInner::Postgres(listener) => postgres::next_queue_wakeup(listener, queue).await,
            WakeupsInner::Sqlite(watch) => watch.next().await.map(|_| ()),
        }
    }
}

impl Store {
    /// Connects to the database `config` names, for a command that creates runs: with the
    /// table queue (which lives in this database) runs are published as they are created (see
    /// [`PublishOnInsert`]).
    pub async fn open(config: &Config) -> Result<Store, StoreError> {
        let mut store = Store::connect(&config.database).await?;
        if config.queue.kind == QueueKind::Table {
            let inline = Arc::new(PublishOnInsert {
                default_queue: config.rabbitmq.queue.clone(),
                max_message_size: config.rabbitmq.max_message_size,
            });
            match &mut store {
                Store::Postgres(s) => s.publish_on_insert(inline),
                Store::Sqlite(s) => s.publish_on_insert(inline),
            }
        }
        Ok(store)
    }

    /// Connects to the configured database (creating it on first use) and applies the
    /// migrations.
    pub async fn connect(config: &DatabaseConfig) -> Result<Store, StoreError> {
        if config.sqlite.is_some() {
            return Ok(Store::Sqlite(SqliteStore::connect(config).await?));
        }
        Ok(Store::Postgres(PgStore::connect(config).await?))
    }

    /// The store a worker's writer uses for its claims and results: on Postgres a pool of
    /// its own, whose connections are open and ready before the writes come (see
    /// `PgStore::for_writes`); SQLite's writes share one connection anyway.
    pub fn for_writes(&self) -> Store {
        match self {
            Store::Postgres(store) => Store::Postgres(store.for_writes()),
            Store::Sqlite(store) => Store::Sqlite(store.clone()),
        }
    }

    /// The store a scheduler's passes use: on Postgres a pool of two connections of its own,
    /// so that the pass's statements stay prepared (see `PgStore::for_passes`).
    pub fn for_passes(&self) -> Store {
        match self {
            Store::Postgres(store) => Store::Postgres(store.for_passes()),
            Store::Sqlite(store) => Store::Sqlite(store.clone()),
        }
    }

    /// Which database this is: `postgres` or `sqlite`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// The Postgres pool, when the store is Postgres (tools that read the tables directly).
    pub fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        match self {
            Store::Postgres(store) => Some(store.pool()),
            Store::Sqlite(_) => None,
        }
    }

    /// A Postgres store on an existing pool, with the migrations applied.
    pub async fn from_pool(pool: sqlx::PgPool) -> Result<Store, StoreError> {
        Ok(Store::Postgres(PgStore::from_pool(pool).await?))
    }

    /// Replaces all jobs and registry entries with `jobs`, in one transaction: either the whole
    /// file is in the registry afterwards, or nothing changed. The run history stays.
    /// `progress(done, total)` is called per chunk.
    ///
    /// Jobs are matched by name: a job that stays keeps its row (and id), and a registry entry
    /// whose schedule and time zone are unchanged keeps its schedule row untouched — its next
    /// run, and a missed run still waiting for catch-up, survive the import, and schedulers go
    /// on firing it while the import runs. Only entries that are new or whose schedule or zone
    /// changed get a new next run (computed by the scheduler, from now).
    ///
    /// # Transactions, locks, and timeouts
    /// One importer at a time (`LOCK TABLE jobs`). Schedulers are not blocked: their passes lock
    /// schedule rows, which the import deletes only for entries that changed or went.
    pub async fn replace_registry(
        &self,
        jobs: &[JobDefinition],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<ImportSummary, StoreError> {
        dispatch!(self, s => s.replace_registry(jobs, progress).await)
    }

    /// All jobs, by id.
    pub async fn jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        dispatch!(self, s => s.jobs().await)
    }

    /// All registry entries with their job's name and description, by id.
    pub async fn registry(&self) -> Result<Vec<RegistryRow>, StoreError> {
        dispatch!(self, s => s.registry().await)
    }

    /// Pauses (`paused`) or resumes the registry entries of the jobs `names` (by name or id;
    /// `None`: every entry), in one transaction, with `note` on a pause. Changes nothing when a
    /// name has no entry, and returns those names instead. Schedulers are told, so a resumed
    /// entry that is due runs at once (its missed slots follow its `misfire` policy).
    pub async fn set_paused(
        &self,
        names: Option<&[String]>,
        paused: bool,
        note: Option<&str>,
    ) -> Result<Result<Vec<PauseChange>, Vec<String>>, StoreError> {
        dispatch!(self, s => s.set_paused(names, paused, note).await)
    }

    /// The database's clock.
    pub async fn now(&self) -> Result<DateTime<Utc>, StoreError> {
        dispatch!(self, s => s.now().await)
    }

    /// Listens for notifications (what schedulers wake up on).
    pub async fn notifications(&self) -> Result<Notifications, StoreError> {
        dispatch!(self, s => s.notifications().await)
    }

    /// Sends a notification to listening schedulers (`registry` or `run`).
    pub async fn notify(&self, what: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.notify(what).await)
    }

    /// Replaces the whole schedule: each registry entry's next run, from `next(entry, now)`
    /// with the database's clock as `now`. Returns (entries scheduled, entries without a next
    /// run).
    pub async fn replace_schedule(
        &self,
        next: &NextRun<'_>,
    ) -> Result<(usize, Vec<EntrySchedule>), StoreError> {
        dispatch!(self, s => s.replace_schedule(next).await)
    }

    /// Adds schedule rows for registry entries that have none (new after an import).
    pub async fn fill_missing_schedule(
        &self,
        next: &NextRun<'_>,
    ) -> Result<(usize, Vec<EntrySchedule>), StoreError> {
        dispatch!(self, s => s.fill_missing_schedule(next).await)
    }

    /// In ONE transaction: locks up to `limit` due schedule rows (skipping rows another
    /// scheduler holds), creates their runs as `decide` says, and advances their next run. A
    /// slot that already has a run (unique on registry entry and time) is not created twice.
    ///
    /// # Transactions, locks, and timeouts
    /// Rows are locked `FOR UPDATE SKIP LOCKED`, so schedulers running at once share the work
    /// without waiting on each other; the run rows and the new `next_run` commit together.
    ///
    /// "Now" is the database's clock (one clock for every host), unless `at` says otherwise
    /// (tests stepping through time).
    pub async fn schedule_due(
        &self,
        at: Option<DateTime<Utc>>,
        limit: u32,
        decide: &dyn Fn(&DueEntry, DateTime<Utc>) -> Decision,
    ) -> Result<(usize, Vec<CreatedRun>), StoreError> {
        dispatch!(self, s => s.schedule_due(at, limit, decide).await)
    }

    /// Inserts runs (manual, webhook, fan-out children, bare messages); returns their ids in
    /// order. Schedulers are notified so that they publish them.
    pub async fn insert_runs(&self, runs: &[NewRun]) -> Result<Vec<Uuid>, StoreError> {
        dispatch!(self, s => s.insert_runs(runs).await)
    }

    /// [`Store::insert_runs`], saying per run whether this call created it (`false`: a run
    /// with its id existed already).
    pub async fn insert_runs_reporting(
        &self,
        runs: &[NewRun],
    ) -> Result<Vec<(Uuid, bool)>, StoreError> {
        dispatch!(self, s => s.insert_runs_reporting(runs).await)
    }

    /// Inserts the fan-out children of `parent` (see [`Store::insert_runs`]) unless a cancel
    /// of the parent was asked for: then nothing is inserted and `None` returned. The parent's
    /// row is held until the children are committed, so a cancel of the parent either comes
    /// first (and no child is created) or finds every child.
    pub async fn insert_children(
        &self,
        parent: Uuid,
        runs: &[NewRun],
    ) -> Result<Option<Vec<Uuid>>, StoreError> {
        dispatch!(self, s => s.insert_children(parent, runs).await)
    }

    /// Locks up to `limit` queued, unpublished runs whose time has come (only those in `only`
    /// when given), for publishing. Runs another publisher holds are skipped.
    pub async fn outbox(
        &self,
        limit: u32,
        only: Option<&[Uuid]>,
    ) -> Result<OutboxBatch, StoreError> {
        dispatch!(self, s => s.outbox(limit, only).await)
    }

    /// When the scheduler must look next (see [`Wakeup`]).
    pub async fn next_wakeup(&self) -> Result<Wakeup, StoreError> {
        dispatch!(self, s => s.next_wakeup().await)
    }

    /// Whether registry entries lack a schedule row (a new import).
    pub async fn has_unscheduled_entries(&self) -> Result<bool, StoreError> {
        dispatch!(self, s => s.has_unscheduled_entries().await)
    }

    /// The schedule with its jobs; only rows due by `due_by` when given.
    pub async fn scheduled(
        &self,
        due_by: Option<DateTime<Utc>>,
    ) -> Result<Vec<ScheduledRow>, StoreError> {
        dispatch!(self, s => s.scheduled(due_by).await)
    }

    /// A job by id (digits) or by name.
    pub async fn find_job(&self, key: &str) -> Result<Option<JobRow>, StoreError> {
        dispatch!(self, s => s.find_job(key).await)
    }

    /// Takes a lease for a worker process: a fresh random token locked on a dedicated
    /// connection, checked every few seconds and taken again if the connection was lost.
    pub async fn worker_lease(&self) -> Result<WorkerLease, StoreError> {
        dispatch!(self, s => s.worker_lease().await)
    }

    /// Claims delivered runs for `worker`: a queued run (or a running one whose message came
    /// back because its worker vanished) becomes running with attempt + 1.
    ///
    /// A running run is taken over only when its message was re-delivered *and* the worker
    /// process that claimed it no longer holds its lease (it died): a live worker that merely
    /// lost its broker channel finishes and records the run itself.
    ///
    /// `nonce` identifies this claim statement: the same call retried after a lost reply finds
    /// the runs its first try claimed (running, with this nonce) and gets them as claimed,
    /// instead of skipping them as another worker's.
    pub async fn claim_runs(
        &self,
        worker: &str,
        token: i32,
        nonce: Uuid,
        claims: &[(Uuid, bool)],
    ) -> Result<Vec<Claim>, StoreError> {
        dispatch!(self, s => s.claim_runs(worker, token, nonce, claims).await)
    }

    /// Records how runs ended, in one statement. A retry goes back to the outbox with its
    /// not-before time, and schedulers are told. A result is recorded only for the claim it
    /// belongs to (same lease token and attempt); returns the ids of runs whose result was not
    /// recorded because the run was taken over meanwhile (or already ended).
    ///
    /// Retrying this after a lost reply is harmless: a result recorded the first time no
    /// longer matches a running claim.
    pub async fn finish_runs(&self, finishes: &[Finish]) -> Result<Vec<Uuid>, StoreError> {
        dispatch!(self, s => s.finish_runs(finishes).await)
    }

    /// Claims and results written with one commit (on Postgres in one statement; see
    /// `PgStore::finish_and_claim_runs`). The results it does not write are in
    /// [`Together::left`], for the caller to write with `finish_runs` next.
    ///
    /// On Postgres the claims wait at most `CLAIM_LOCK_WAIT` for a row that another
    /// transaction holds (an outbox pass waiting for its confirms): then the statement fails
    /// with a lock timeout (`StoreError::is_lock_timeout`) and nothing of it is written.
    pub async fn finish_and_claim_runs(
        &self,
        finishes: &[Finish],
        worker: &str,
        token: i32,
        nonce: Uuid,
        claims: &[(Uuid, bool)],
    ) -> Result<Together, StoreError> {
        dispatch!(self, s => s.finish_and_claim_runs(finishes, worker, token, nonce, claims).await)
    }

    /// Running runs whose worker's lease is gone (the worker died, or its host did), as
    /// (run, claim token, attempt): a suspect is one claim, not a run id that may have been
    /// claimed again meanwhile.
    pub async fn orphaned_runs(&self) -> Result<Vec<ClaimKey>, StoreError> {
        dispatch!(self, s => s.orphaned_runs().await)
    }

    /// Queues the claims `suspects` again if they are still running without a lease: their
    /// worker died after its delivery was settled elsewhere, so no message would bring them
    /// back. The vanished attempt counts: a run whose attempts reach its retries plus
    /// `crash_limit` is recorded dead instead (a job that keeps taking its worker down never
    /// loops). Returns the runs queued again and the runs given up, with their attempt.
    pub async fn requeue_orphans(
        &self,
        suspects: &[ClaimKey],
        crash_limit: u32,
    ) -> Result<Vec<(Uuid, i32, String)>, StoreError> {
        dispatch!(self, s => s.requeue_orphans(suspects, crash_limit).await)
    }

    /// The queues (`default_queue` for runs without one) that hold runs published `after` ago
    /// or longer and still queued.
    pub async fn stale_queues(
        &self,
        after: Duration,
        default_queue: &str,
    ) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.stale_queues(after, default_queue).await)
    }

    /// Puts runs of `queue` back in the outbox that were published `after` ago or longer and
    /// are still queued: no worker claimed them, and (the caller checked) their queue is
    /// empty, so their message was lost or dead-lettered by the broker. Publishing one twice
    /// is harmless: only one delivery can claim it.
    pub async fn republish_stale(
        &self,
        after: Duration,
        queue: &str,
        default_queue: &str,
    ) -> Result<Vec<Uuid>, StoreError> {
        dispatch!(self, s => s.republish_stale(after, queue, default_queue).await)
    }

    /// Puts the runs of `ids` that are still queued (unclaimed) back in the outbox: a worker
    /// gives their deliveries back unstarted, and a new message is published for each. Returns
    /// the runs put back; a run that is claimed, finished, or in the outbox already is not.
    pub async fn republish(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        dispatch!(self, s => s.republish(ids).await)
    }

    /// Records a queued run dead (its message could not be used). Returns whether it was.
    pub async fn mark_dead(&self, id: Uuid, error: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.mark_dead(id, error).await)
    }

    /// Creates one run of `job` per slot (trigger `backfill`), in one transaction; a slot that
    /// has a run already (scheduled or backfilled) is left alone. Returns how many were created.
    pub async fn backfill(
        &self,
        job: &JobRow,
        slots: &[DateTime<Utc>],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<usize, StoreError> {
        dispatch!(self, s => s.backfill(job, slots, progress).await)
    }

    /// Cancels a run and its fan-out children (`runs --cancel`): queued ones are recorded
    /// `cancelled` at once and never run; running ones are marked, and their worker (which
    /// looks every half second) stops them and records them `cancelled`. `None`: no such run.
    pub async fn cancel_run(&self, id: Uuid) -> Result<Option<Cancelled>, StoreError> {
        dispatch!(self, s => s.cancel_run(id).await)
    }

    /// Of the running runs `ids`, those whose cancel was asked for.
    pub async fn cancel_requested(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        dispatch!(self, s => s.cancel_requested(ids).await)
    }

    /// Ids of a run's fan-out children.
    pub async fn child_ids(&self, parent: Uuid) -> Result<Vec<Uuid>, StoreError> {
        dispatch!(self, s => s.child_ids(parent).await)
    }

    /// Recent runs, newest first, optionally of one job (name or id), one status and one
    /// trigger.
    pub async fn runs(
        &self,
        job: Option<&str>,
        status: Option<&str>,
        trigger: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunRow>, StoreError> {
        dispatch!(self, s => s.runs(job, status, trigger, limit).await)
    }

    pub async fn run(&self, id: Uuid) -> Result<Option<RunRow>, StoreError> {
        dispatch!(self, s => s.run(id).await)
    }

    pub async fn children(&self, id: Uuid) -> Result<Vec<RunRow>, StoreError> {
        dispatch!(self, s => s.children(id).await)
    }

    /// Deletes at most `chunk` finished top-level runs (with their children) that ended more
    /// than `retention` ago on the database's clock; returns how many went. Callers loop, so
    /// that no single statement holds locks or bloats the table for long.
    pub async fn prune_runs(&self, retention: Duration, chunk: u32) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_runs(retention, chunk).await)
    }

    /// Creates a webhook's runs in one transaction (rows first: publishing follows). With a
    /// dedupe key seen within its hold, creates nothing and answers the first request's runs;
    /// a debounced run whose key is live is shared (and takes this request's arguments while
    /// it waits), else it is created to start when its window ends.
    pub async fn create_webhook_runs(
        &self,
        hook: &str,
        dedupe: Option<&WebhookKey>,
        runs: &[WebhookRun],
    ) -> Result<WebhookOutcome, StoreError> {
        dispatch!(self, s => s.create_webhook_runs(hook, dedupe, runs).await)
    }

    /// Deletes up to `chunk` webhook keys that expired; returns how many went.
    pub async fn expire_webhook_keys(&self, chunk: u32) -> Result<u64, StoreError> {
        dispatch!(self, s => s.expire_webhook_keys(chunk).await)
    }

    /// The runs with these ids (those that exist), in no particular order.
    pub async fn runs_by_id(&self, ids: &[Uuid]) -> Result<Vec<RunRow>, StoreError> {
        dispatch!(self, s => s.runs_by_id(ids).await)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping().await)
    }

    /// Runs created in (`after`, `until`], counted by trigger.
    pub async fn runs_created_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        dispatch!(self, s => s.runs_created_between(after, until).await)
    }

    /// Runs that finished in (`after`, `until`], oldest first, at most `limit`.
    pub async fn runs_finished_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<FinishedRun>, StoreError> {
        dispatch!(self, s => s.runs_finished_between(after, until, limit).await)
    }

    /// How long the oldest run whose time has come has been waiting, queued (not yet
    /// published, or published and not yet claimed), in seconds; `None`: none waits.
    pub async fn oldest_queued_age(&self) -> Result<Option<f64>, StoreError> {
        dispatch!(self, s => s.oldest_queued_age().await)
    }

    /// The queues jobs name besides the default one.
    pub async fn job_queues(&self) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.job_queues().await)
    }

    /// The queues the jobs' runs go to, `default` for jobs that name none; sorted.
    pub async fn queues_in_use(&self, default: &str) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.queues_in_use(default).await)
    }
}

/// Rows written per statement during an import: large enough to be fast, small enough to report
/// progress on big files.
pub(crate) const IMPORT_CHUNK: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the database at {target}: {source}{hint}", hint = hint(.source))]
    Connect { target: String, source: sqlx::Error },
    #[error("database {database:?} does not exist at {target} and could not be created: {source} (create it with `createdb {database}` or set database.database)")]
    Create {
        database: String,
        target: String,
        source: sqlx::Error,
    },
    #[error("cannot migrate the database at {target}: {source}")]
    Migrate {
        target: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("database error while {context}: {source}{hint}", hint = hint(.source))]
    Query {
        context: &'static str,
        source: sqlx::Error,
    },
}

/// What to do about a SQLite file that cannot be written, said after the error.
fn hint(error: &sqlx::Error) -> &'static str {
    match sqlite::primary_code(error) {
        Some(5 | 6) => " (the database file is locked: another program held its write lock for longer than 10 seconds; find it with `fuser <file>`, and let it finish or stop it. Nothing was written by this step, and running parts try again)",
        Some(8) => " (the database file is read-only: give the user running jobschleuder write access to the file and its folder, and make sure the file system is mounted read-write. Nothing was written by this step)",
        Some(10) => " (a disk I/O error: the disk holding the database file may be full or failing; check its free space with `df`. Nothing was written by this step, and what was committed before is intact)",
        Some(13) => " (the disk holding the database file is full: free space on it. Nothing was written by this step, and what was committed before is intact)",
        Some(14) => " (the database file cannot be opened: check that its folder exists, that this user may read and write there, and that its file system is mounted read-write)",
        _ => "",
    }
}

impl StoreError {
    /// Whether the same statement may succeed later: the connection broke, the server is
    /// restarting, a lock conflict. Anything else (bad data) fails again the same way.
    pub fn is_transient(&self) -> bool {
        let source = match self {
            StoreError::Query { source, .. } => source,
            StoreError::Connect { .. } => return true,
            _ => return false,
        };
        match source {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // A locked, read-only or full SQLite file: the statement works once that passes.
            sqlx::Error::Database(_) if sqlite::is_passing(source) => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                // 08: connection exception; 57P0x: server shutting down or sessions terminated;
                // 53: insufficient resources; 40001/40P01: serialization failure, deadlock.
                code.starts_with("08")
                    || code.starts_with("57P")
                    || code == "57014"
                    || code == "55P03"
                    || code == "25006"
                    || code.starts_with("53")
                    || code == "40001"
                    || code == "40P01"
            }),
            _ => false,
        }
    }

    /// Whether a row lock could not be had in time (Postgres's `lock_timeout`, or `NOWAIT`).
    pub fn is_lock_timeout(&self) -> bool {
        matches!(self, StoreError::Query { source: sqlx::Error::Database(db), .. }
            if db.code().as_deref() == Some("55P03"))
    }
}

/// A new run's id: a UUID of version 7, whose first 48 bits are the time it was made, so
/// that new runs go to the right-hand end of the primary key's index instead of a random leaf
/// of it. With random ids, every insert after a checkpoint wrote a whole index page to the
/// WAL: 30,000 inserts into a table of 2,000,000 runs wrote 62 MB of WAL with random ids
/// and 10 MB with these. Ids derived from their source (chains, bare messages with a
/// `message_id`) stay version 5.
pub fn new_run_id() -> Uuid {
    Uuid::now_v7()
}

/// JSON text for a jsonb column: serialized once; rebuilt without NUL characters only when the
/// text shows one (`\u0000`), which is rare.
pub(crate) fn jsonb_text(value: &impl Serialize) -> String {
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
    if !text.contains("\\u0000") {
        return text;
    }
    serde_json::to_value(value)
        .map(|v| without_nul(&v).to_string())
        .unwrap_or(text)
}

/// Postgres text and jsonb cannot hold NUL characters; plugin output can. They become U+FFFD.
pub(crate) fn without_nul(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::String(s) if s.contains('\0') => {
            serde_json::Value::String(s.replace('\0', "\u{fffd}"))
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(without_nul).collect())
        }
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.iter()
                .map(|(k, v)| (k.replace('\0', "\u{fffd}"), without_nul(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

pub(crate) fn text_without_nul(text: &str) -> String {
    text.replace('\0', "\u{fffd}")
}

pub(crate) trait Context<T> {
    fn context(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn context(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Query { context, source })
    }
}

/// A row of `jobs`, as shown by `registry --show-jobs`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub id: i32,
    /// `None` for rows made by the original, which had no names.
    pub name: Option<String>,
    pub job: String,
    pub description: Option<String>,
    pub preprocessing: Option<String>,
    pub postprocessing: Option<String>,
    pub arguments: Option<serde_json::Value>,
    pub timeout_seconds: Option<f64>,
    pub retries: i32,
    pub queue: Option<String>,
    pub concurrency: String,
    /// JSON lists of job names (NULL: none).
    pub on_success: Option<serde_json::Value>,
    pub on_failure: Option<serde_json::Value>,
    pub jitter_seconds: Option<f64>,
    /// Whether its registry entry is paused (`false` without one).
    pub paused: bool,
    pub paused_note: Option<String>,
}

/// A row of `registry` with its job, as shown by `registry --show-registry`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RegistryRow {
    pub id: i32,
    /// The `jobs.id` this entry schedules.
    pub job: i32,
    pub name: Option<String>,
    pub description: Option<String>,
    pub schedule: String,
    pub timezone: Option<String>,
    pub misfire: String,
    pub concurrency: Option<String>,
    pub jitter_seconds: Option<f64>,
    pub paused: bool,
    pub paused_note: Option<String>,
    pub paused_at: Option<DateTime<Utc>>,
}

/// What pausing or resuming did to one registry entry.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PauseChange {
    pub name: String,
    /// Its state before.
    pub was_paused: bool,
}

/// What an import changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportSummary {
    /// Jobs in the file, now the whole registry.
    pub imported: usize,
    /// Of those, names that were not there before.
    pub added: usize,
    /// Of those, names that were there before (their rows are replaced).
    pub replaced: usize,
    /// Jobs that were there before and are not in the file: removed.
    pub removed: usize,
    /// Of the imported jobs, those with a schedule (registry entries).
    pub scheduled: usize,
}

/// A schedule row that is due, with its registry entry and job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueEntry {
    pub schedule_id: i32,
    pub registry_id: i32,
    pub next_run: DateTime<Utc>,
    pub schedule: String,
    pub timezone: Option<String>,
    pub misfire: String,
    pub job_id: i32,
    pub job_name: String,
    pub job: String,
    pub arguments: Option<serde_json::Value>,
    pub preprocessing: Option<String>,
    pub postprocessing: Option<String>,
    pub timeout_seconds: Option<f64>,
    pub retries: i32,
    pub queue: Option<String>,
    pub concurrency: String,
    pub jitter_seconds: Option<f64>,
}

/// What to do with a due entry: the run to create (its scheduled time), and the entry's next run
/// (`None`: it never runs again, and its schedule row goes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub run_for: Option<DateTime<Utc>>,
    /// When that run may start, if later than its slot (the job's jitter).
    pub starts_at: Option<DateTime<Utc>>,
    pub next_run: Option<DateTime<Utc>>,
}

/// A run created by the scheduler, for its log line.
#[derive(Debug, Clone)]
pub struct CreatedRun {
    pub id: Uuid,
    pub job_name: String,
    pub scheduled_for: Option<DateTime<Utc>>,
    /// Recorded `skipped` at once (`concurrency: forbid`), with the reason.
    pub skipped: Option<String>,
}

/// Computes a registry entry's next run after `now` (the database's clock).
pub type NextRun<'a> = dyn Fn(&EntrySchedule, DateTime<Utc>) -> Option<DateTime<Utc>> + 'a;

/// A registry entry's schedule, for computing its next run.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EntrySchedule {
    pub registry_id: i32,
    pub schedule: String,
    pub timezone: Option<String>,
}

/// A row of `schedule` with its job, as `scheduler --show-*` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ScheduledRow {
    pub registry_id: i32,
    pub job_id: i32,
    pub job_name: String,
    pub job: String,
    pub schedule: String,
    pub timezone: Option<String>,
    pub next_run: DateTime<Utc>,
    pub jitter_seconds: Option<f64>,
    /// When the next run starts: its slot plus the job's jitter offset (filled in by the
    /// scheduler's rule, not by the query).
    #[sqlx(skip)]
    pub starts_at: Option<DateTime<Utc>>,
    pub paused: bool,
    pub paused_note: Option<String>,
}

/// Runs published as they are created. With the table queue in the store's own database, the
/// transaction that creates a run can queue its message too: a run that is due at once (queued,
/// with no later start) is inserted already published, together with its message, instead of
/// being published by a scheduler's outbox pass in a second transaction. The outbox keeps
/// every other case: runs that wait for a later start, retries, messages larger than
/// `rabbitmq.max_message_size` (recorded dead there, with the reason), and runs put back after
/// staying unclaimed.
#[derive(Debug)]
pub struct PublishOnInsert {
    default_queue: String,
    max_message_size: usize,
}

impl PublishOnInsert {
    /// The message (queue, body) of a new run with id `id`, as the outbox would publish it;
    /// `None` for a run that is on a queue already (a bare message) or whose message is too
    /// large.
    pub(crate) fn message(&self, id: Uuid, run: &NewRun) -> Option<(String, Vec<u8>)> {
        if run.published {
            return None;
        }
        let message = crate::queue::JobMessage::of_new_run(id, run);
        let mut body = message.to_bytes();
        // The stored run cannot hold NUL characters; its message is built from what is stored.
        if body.windows(6).any(|w| w == b"\\u0000") {
            body = serde_json::to_value(&message)
                .map(|v| without_nul(&v).to_string().into_bytes())
                .unwrap_or(body);
        }
        (body.len() <= self.max_message_size).then(|| {
            let queue = run.queue.as_ref().unwrap_or(&self.default_queue);
            (queue.clone(), body)
        })
    }
}

/// A run to insert (manual, webhook, fan-out child, or a bare message of the original).
#[derive(Debug, Clone)]
pub struct NewRun {
    /// A deterministic id (fan-out children, bare messages with a message id), so that an
    /// insert retried after a lost reply creates no second run; `None`: a fresh one.
    pub id: Option<Uuid>,
    pub job_name: String,
    pub job: String,
    pub job_id: Option<i32>,
    pub trigger: &'static str,
    pub queue: Option<String>,
    pub arguments: serde_json::Map<String, serde_json::Value>,
    pub preprocessing: Option<String>,
    pub postprocessing: Option<String>,
    pub timeout_seconds: Option<f64>,
    pub max_retries: i32,
    pub parent_id: Option<Uuid>,
    /// Already on the broker (a bare message a worker received): never published again.
    pub published: bool,
}

impl NewRun {
    /// A run of `job` (manual or webhook) with the job's arguments and settings.
    pub fn of_job(job: &JobRow, trigger: &'static str) -> NewRun {
        NewRun {
            id: None,
            job_name: job.name.clone().unwrap_or_else(|| job.id.to_string()),
            job: job.job.clone(),
            job_id: Some(job.id),
            trigger,
            queue: job.queue.clone(),
            arguments: object_or_empty(job.arguments.as_ref()),
            preprocessing: job.preprocessing.clone(),
            postprocessing: job.postprocessing.clone(),
            timeout_seconds: job.timeout_seconds,
            max_retries: job.retries,
            parent_id: None,
            published: false,
        }
    }
}

/// A JSON object's entries; anything else (NULL arguments of the original, a stray value) is
/// no arguments.
pub fn object_or_empty(
    value: Option<&serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    match value {
        Some(serde_json::Value::Object(map)) => map.clone(),
        _ => serde_json::Map::new(),
    }
}

/// A queued run not yet confirmed by the broker: all that is needed to publish it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRun {
    pub id: Uuid,
    pub job_name: String,
    pub job: String,
    pub arguments: serde_json::Value,
    pub preprocessing: Option<String>,
    pub postprocessing: Option<String>,
    pub timeout_seconds: Option<f64>,
    pub max_retries: i32,
    pub attempt: i32,
    pub queue: Option<String>,
}

/// Every status a run can have (`job_runs.status`).
pub const RUN_STATUSES: [&str; 7] = [
    "queued",
    "running",
    "succeeded",
    "failed",
    "dead",
    "skipped",
    "cancelled",
];

/// The statuses of a run that has ended for good.
pub const ENDED_STATUSES: [&str; 5] = ["succeeded", "failed", "dead", "skipped", "cancelled"];

/// Every trigger a run can have (`job_runs.trigger`).
pub const RUN_TRIGGERS: [&str; 5] = ["schedule", "manual", "webhook", "chain", "backfill"];

/// The outcome of claiming a delivered run for execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker runs it now; `attempt` counts from 1.
    Claimed {
        attempt: i32,
        trigger: String,
        run: ClaimedRun,
    },
    /// It already finished (a re-delivered or re-published message): skip it.
    Finished(String),
    /// Another worker runs it (a duplicate message): skip it.
    Running,
    /// No such run.
    Unknown,
    /// Not now: the worker does not hold its lease. Try again once it does.
    Unavailable,
    /// The database refused the claim for good (the error): the run cannot be claimed.
    Refused(String),
}

/// What a claimed run's plugin may know of it besides its arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimedRun {
    /// Its slot (scheduled and backfilled runs), else when it was created.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// The run that fanned it out or whose end chained it.
    pub parent: Option<Uuid>,
    /// Its job's zone, when the job has its own.
    pub timezone: Option<String>,
}

/// How a run ended, for recording.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    Succeeded,
    Failed,
    Dead,
    /// Stopped because an operator cancelled it (or a newer run replaced it).
    Cancelled,
    /// Failed (or was interrupted), and is queued again, to be published after this delay —
    /// counted on the database's clock.
    Retry(Duration),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub id: Uuid,
    /// The claim this result belongs to: a worker whose run was taken over meanwhile (its
    /// lease was lost) does not overwrite the new attempt.
    pub token: i32,
    pub attempt: i32,
    pub end: RunEnd,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// What `Store::finish_and_claim_runs` wrote.
#[derive(Debug)]
pub struct Together {
    /// Results not recorded because their run no longer ran under their claim (taken over,
    /// or ended already), as `finish_runs` reports them.
    pub not_recorded: Vec<Uuid>,
    /// One answer per claim, in their order.
    pub claims: Vec<Claim>,
    /// Results left for `finish_runs`, which the caller writes next (on Postgres: retries,
    /// results of jobs that chain another, and results whose run the statement did not find
    /// running under their claim, which `finish_runs` then reports). Whatever becomes of
    /// them, the claims are committed.
    pub left: Vec<Finish>,
}

/// What `runs --cancel` did.
#[derive(Debug, Clone, Serialize)]
pub struct Cancelled {
    /// The run's status when it was asked.
    pub status: String,
    /// Its worker, if it was claimed.
    pub worker: Option<String>,
    /// A cancel was asked for before (it is running, and being stopped).
    pub already_asked: bool,
    /// Recorded `cancelled` now (the run, if it was queued, and its queued children).
    pub cancelled: Vec<Uuid>,
    /// Running: their workers stop them and record them `cancelled`.
    pub asked: Vec<Uuid>,
}

/// One row of `runs`, for listing.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RunRow {
    pub id: Uuid,
    pub job_name: String,
    pub job: String,
    pub trigger: String,
    pub status: String,
    pub attempt: i32,
    pub max_retries: i32,
    pub worker: Option<String>,
    pub queue: Option<String>,
    pub arguments: serde_json::Value,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub not_before: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub parent_id: Option<Uuid>,
}

/// A worker process's lease, for as long as the process lives: on Postgres an advisory lock
/// held on a connection of its own, on SQLite a row whose heartbeat this process keeps fresh.
/// Dropping it (or the process dying) releases it.
pub struct WorkerLease {
    pub token: i32,
    /// Whether the lock is held right now: false from a lost lease connection until the lock
    /// is taken again. A worker claims nothing meanwhile (a sweeper may already be handing its
    /// runs to others).
    pub held: tokio::sync::watch::Receiver<bool>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl Drop for WorkerLease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A key that makes a webhook's repeats or bursts one run: the hook's rendered key and how
/// long it holds.
#[derive(Debug, Clone)]
pub struct WebhookKey {
    pub key: String,
    pub hold: Duration,
}

/// One run a webhook asks for; with a debounce key, a burst of such requests within the
/// window shares one run, which starts when the window ends.
#[derive(Debug, Clone)]
pub struct WebhookRun {
    pub run: NewRun,
    pub debounce: Option<WebhookKey>,
}

/// What a webhook's runs came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookOutcome {
    /// One id per run asked for (a debounced run's id is shared by its burst), or the ids
    /// the first request with the same dedupe key got.
    pub run_ids: Vec<Uuid>,
    /// The dedupe key was seen before: nothing was created.
    pub duplicate: bool,
    /// Runs this request created, and the time they may be published (`None`: now).
    pub created: Vec<(Uuid, Option<DateTime<Utc>>)>,
}

/// Database keys can be long templates' output (a whole payload): long ones are stored as
/// their SHA-256.
pub(crate) fn stored_key(key: &str) -> String {
    use sha2::Digest;
    if key.len() <= 200 {
        key.to_string()
    } else {
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(key.as_bytes()))
        )
    }
}

/// A finished run, for metrics: its duration and how late it was published (seconds).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FinishedRun {
    pub job_name: String,
    pub status: String,
    pub finished_at: DateTime<Utc>,
    pub duration: Option<f64>,
    pub lag: Option<f64>,
}

/// What the scheduler's sleep depends on, all read in one statement: the earliest next run;
/// the earliest time a queued run becomes publishable (now, for runs waiting to be
/// published); when the oldest published, still unclaimed run was published; whether any run
/// is running (the orphan sweep has something to watch); and the database's clock to measure
/// them against.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Wakeup {
    pub next_run: Option<DateTime<Utc>>,
    pub next_publish: Option<DateTime<Utc>>,
    pub oldest_unclaimed: Option<DateTime<Utc>>,
    pub any_running: bool,
    pub now: DateTime<Utc>,
}

/// One claim of a run: (run, claim token, attempt).
pub type ClaimKey = (Uuid, i32, i32);

/// The table queue's statements (see `queue::table`).
impl Store {
    /// Inserts messages (queue, body) in one transaction and wakes consumers.
    pub async fn queue_publish(&self, messages: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        dispatch!(self, s => s.queue_publish(messages).await)
    }

    /// Hands up to `limit` ready messages of `queue` to `consumer`, hidden from others for
    /// `lease`; messages handed out `delivery_limit` times already are dead-lettered instead.
    pub async fn queue_take(
        &self,
        queue: &str,
        consumer: &str,
        limit: u32,
        lease: Duration,
        delivery_limit: u32,
    ) -> Result<Vec<QueueMessage>, StoreError> {
        dispatch!(self, s => s.queue_take(queue, consumer, limit, lease, delivery_limit).await)
    }

    /// Deletes acknowledged messages.
    pub async fn queue_ack(&self, ids: &[i64]) -> Result<(), StoreError> {
        dispatch!(self, s => s.queue_ack(ids).await)
    }

    /// Makes messages ready again at once.
    pub async fn queue_release(&self, ids: &[i64]) -> Result<(), StoreError> {
        dispatch!(self, s => s.queue_release(ids).await)
    }

    /// Makes every message `consumer` holds ready again at once (it closed).
    pub async fn queue_release_consumer(&self, consumer: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.queue_release_consumer(consumer).await)
    }

    /// Moves messages to the dead letters with `reason`.
    pub async fn queue_dead_letter(&self, ids: &[i64], reason: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.queue_dead_letter(ids, reason).await)
    }

    /// Renews the lease of the messages `ids` that `consumer` still holds. A message whose
    /// settlement was lost is not among them: it returns when its lease runs out.
    pub async fn queue_extend(
        &self,
        consumer: &str,
        ids: &[i64],
        lease: Duration,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.queue_extend(consumer, ids, lease).await)
    }

    /// Messages ready in `queue`.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, StoreError> {
        dispatch!(self, s => s.queue_depth(queue).await)
    }

    /// How long until the first held message of `queue` is ready again (its lease runs out).
    pub async fn queue_next_visible(&self, queue: &str) -> Result<Option<Duration>, StoreError> {
        dispatch!(self, s => s.queue_next_visible(queue).await)
    }

    /// The newest dead letters, at most `limit`.
    pub async fn queue_dead_letters(&self, limit: i64) -> Result<Vec<DeadLetter>, StoreError> {
        dispatch!(self, s => s.queue_dead_letters(limit).await)
    }

    /// Wake-ups from other processes (`poll`: how often SQLite looks for their writes).
    pub async fn queue_wakeups(&self, poll: Duration) -> Result<QueueWakeups, StoreError> {
        dispatch!(self, s => s.queue_wakeups(poll).await)
    }
}

/// The columns a statement that ends runs returns (`job_runs` as `r`): what a chain needs.
/// `chain` holds the job names to start: the job's `on_success` for a success, its
/// `on_failure` for a failure or a dead run — for top-level and chained runs only (fan-out
/// children end as part of their parent).
pub(crate) const ENDED: &str = "r.id, r.status, r.job_name, r.error, r.result,
    CASE WHEN r.parent_id IS NULL OR r.trigger = 'chain' THEN
        CASE WHEN r.status = 'succeeded' THEN (SELECT j.on_success FROM jobs j WHERE j.name = r.job_name)
             WHEN r.status IN ('failed', 'dead') THEN (SELECT j.on_failure FROM jobs j WHERE j.name = r.job_name)
        END
    END AS chain";

/// A run a statement ended (see [`ENDED`]).
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct EndedRun {
    pub(crate) id: Uuid,
    pub(crate) status: String,
    pub(crate) job_name: String,
    pub(crate) error: Option<String>,
    pub(crate) result: Option<serde_json::Value>,
    pub(crate) chain: Option<serde_json::Value>,
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct OrphanRow {
    pub(crate) attempt: i32,
    #[sqlx(flatten)]
    pub(crate) ended: EndedRun,
}

/// Namespace of chained runs' ids: a run's id and the chained job's name give the id, so the
/// chain link is created once whatever retries the statement.
pub(crate) const CHAIN_NAMESPACE: Uuid = Uuid::from_u128(0x6a73_6368_6169_6e2d_6c69_6e6b_2d69_6400);

/// A run still queued or running, for a job's overlap policy.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct LiveRun {
    pub(crate) id: Uuid,
    pub(crate) job_name: String,
    pub(crate) status: String,
    pub(crate) scheduled_for: Option<DateTime<Utc>>,
    pub(crate) parent_id: Option<Uuid>,
    pub(crate) trigger: String,
}

/// The job names the ended runs chain (see [`ENDED`]).
pub(crate) fn chained_names(ended: &[EndedRun]) -> Vec<String> {
    ended
        .iter()
        .flat_map(|run| match &run.chain {
            Some(serde_json::Value::Array(names)) => names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// The runs the ended runs chain (trigger `chain`, parent = the ended run, the ended run under
/// `trigger_run` in the arguments), with ids derived from the ended run and the chained job's
/// name, so a retried statement creates nothing twice. `jobs` holds the chained jobs.
pub(crate) fn plan_chain(ended: &[EndedRun], jobs: &[JobRow]) -> Vec<NewRun> {
    let mut planned = Vec::new();
    for run in ended {
        let Some(serde_json::Value::Array(names)) = &run.chain else {
            continue;
        };
        for name in names.iter().filter_map(|n| n.as_str()) {
            let Some(job) = jobs.iter().find(|j| j.name.as_deref() == Some(name)) else {
                tracing::warn!(run = %run.id, job = %run.job_name, chained = %name, "a chained job is no longer in the registry: not started");
                continue;
            };
            let mut new = NewRun::of_job(job, "chain");
            let mut source = run.id.as_bytes().to_vec();
            source.extend_from_slice(name.as_bytes());
            new.id = Some(Uuid::new_v5(&CHAIN_NAMESPACE, &source));
            new.parent_id = Some(run.id);
            new.arguments.insert(
                "trigger_run".into(),
                serde_json::json!({
                    "id": run.id,
                    "job": run.job_name,
                    "status": run.status,
                    "error": run.error,
                    "result": run.result,
                }),
            );
            planned.push(new);
        }
    }
    planned
}

/// Logs the chained runs that were created.
pub(crate) fn log_chained(planned: &[NewRun], created: impl Iterator<Item = Uuid>) {
    for id in created {
        if let Some(run) = planned.iter().find(|r| r.id == Some(id)) {
            let after = run.parent_id.map(|p| p.to_string()).unwrap_or_default();
            tracing::info!(run = %id, job = %run.job_name, trigger = "chain", after = %after, "run queued");
        }
    }
}

/// Which registry entries a pause names — each key is a job's name, or else its id (a job may
/// be named "4"); `entries` are (entry, job name, paused, job id). The keys without an entry,
/// when there are any.
pub(crate) fn pause_targets(
    entries: &[(i32, Option<String>, bool, i32)],
    names: Option<&[String]>,
) -> Result<Vec<(i32, String, bool)>, Vec<String>> {
    let Some(names) = names else {
        return Ok(entries
            .iter()
            .map(|(entry, name, paused, id)| {
                (
                    *entry,
                    name.clone().unwrap_or_else(|| id.to_string()),
                    *paused,
                )
            })
            .collect());
    };
    let mut targets: Vec<(i32, String, bool)> = Vec::new();
    let mut missing = Vec::new();
    for key in names {
        let by_name: Vec<_> = entries
            .iter()
            .filter(|e| e.1.as_deref() == Some(key.as_str()))
            .collect();
        let found: Vec<_> = if by_name.is_empty() {
            entries.iter().filter(|e| e.3.to_string() == *key).collect()
        } else {
            by_name
        };
        if found.is_empty() {
            missing.push(key.clone());
        }
        for (entry, name, paused, id) in found {
            if !targets.iter().any(|t| t.0 == *entry) {
                targets.push((
                    *entry,
                    name.clone().unwrap_or_else(|| id.to_string()),
                    *paused,
                ));
            }
        }
    }
    if missing.is_empty() {
        Ok(targets)
    } else {
        Err(missing)
    }
}
