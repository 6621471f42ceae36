//! The SQLite store: one file in WAL mode, for one host — the embedded default, with nothing
//! to install. It gives the same answers and keeps the same guarantees as the Postgres store,
//! by other means:
//!
//! - **One writer at a time.** Every write transaction starts with `BEGIN IMMEDIATE`, so it
//!   holds the file's write lock from its first statement: schedulers, workers and the
//!   listener, in any number of processes on the host, take turns instead of skipping each
//!   other's locked rows. A writer waits up to 10 seconds for the lock (`busy_timeout`), then
//!   fails with an error that says the file is locked.
//! - **Leases are rows.** A worker process's lease is a row of `worker_leases` whose expiry it
//!   pushes forward five times per lease (half of `queue.lease`: a dead worker's lease has run
//!   out before its deliveries are handed out again); a run claimed under an expired lease is
//!   taken over, as on Postgres when the advisory lock's session ends.
//! - **One clock.** "Now" is the host's clock: there is only one host.
//! - **Wake-ups.** Within one process, notifications are passed in memory; other processes'
//!   writes are noticed by polling the file's change counter (`PRAGMA data_version`).
//!
//! Durability: `synchronous = FULL`, so a committed transaction survives a power loss.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::broadcast;
use uuid::Uuid;

use super::*;
use crate::config::DatabaseConfig;
use crate::jobfile::JobDefinition;

/// Embedded migrations of the SQLite schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a writer waits for the file's write lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const JOB_COLUMNS: &str = "id, name, job, description, preprocessing, postprocessing, arguments,
    timeout_seconds, retries, queue, concurrency, on_success, on_failure, jitter_seconds,
    COALESCE((SELECT max(r.paused) FROM registry r WHERE r.job = j.id), 0) AS paused,
    (SELECT max(r.paused_note) FROM registry r WHERE r.job = j.id) AS paused_note";

const RUN_COLUMNS: &str = "id, job_name, job, trigger, status, attempt, max_retries, worker, queue, arguments,
    scheduled_for, not_before, created_at, published_at, started_at, finished_at, result, error, parent_id";

/// [`ENDED`] as SQLite's RETURNING takes it: columns of the changed row, unqualified.
fn ended_columns() -> String {
    ENDED.replace("r.", "")
}

/// Values bound per statement at most when a list goes into `IN (...)` (SQLite allows 32,766).
const LIST_CHUNK: usize = 500;

/// `?, ?, ?` for `n` values.
fn marks(n: usize) -> String {
    vec!["?"; n.max(1)].join(", ")
}

/// Binds every value of `values` to `query` in order.
macro_rules! bind_all {
    ($query:expr, $values:expr) => {
        $values
            .into_iter()
            .fold($query, |query, value| query.bind(value))
    };
}

/// This process's turn at one file's write lock. SQLite lets one writer in at a time; writers of
/// one process queue here, woken the moment the lock is free, instead of sleeping in SQLite's
/// busy handler (which backs off up to 100 ms between looks). Other processes still meet the
/// busy handler.
fn turns(path: &Path) -> Arc<tokio::sync::Mutex<()>> {
    static TURNS: OnceLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let turns = TURNS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut turns = turns.lock().unwrap_or_else(|e| e.into_inner());
    turns.entry(path.to_path_buf()).or_default().clone()
}

/// A write transaction (`BEGIN IMMEDIATE`), holding this process's turn at the write lock.
pub(super) struct WriteTx {
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    _turn: tokio::sync::OwnedMutexGuard<()>,
    /// The store's [`PublishOnInsert`], for runs this transaction creates.
    inline: Option<Arc<PublishOnInsert>>,
    /// Table queues this transaction queued messages in: their consumers in this process are
    /// woken when it commits.
    queued: Vec<String>,
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

impl WriteTx {
    async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await?;
        crate::queue::table::wake(self.queued.iter().map(String::as_str));
        Ok(())
    }

    async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

/// In-process notifications of one database file: what schedulers in this process wake on.
fn local_channel(path: &Path) -> broadcast::Sender<String> {
    static CHANNELS: OnceLock<Mutex<HashMap<PathBuf, broadcast::Sender<String>>>> = OnceLock::new();
    let channels = CHANNELS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut channels = channels.lock().unwrap_or_else(|e| e.into_inner());
    channels
        .entry(path.to_path_buf())
        .or_insert_with(|| broadcast::channel(64).0)
        .clone()
}

/// The SQLite store; cheap to clone (a pool).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
    /// This process's turn at the file's write lock (see [`turns`]).
    turn: Arc<tokio::sync::Mutex<()>>,
    /// How often waiters look for other processes' writes.
    poll: Duration,
    /// How long a worker's lease lasts without a heartbeat (five heartbeats).
    lease: Duration,
    /// Set when the queue is the table queue in this file (see [`PublishOnInsert`]).
    inline: Option<Arc<PublishOnInsert>>,
}

/// SQLite's primary result code of `error` (the low byte of its extended code), if it is a
/// SQLite error.
pub(super) fn primary_code(error: &sqlx::Error) -> Option<u32> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    db.try_downcast_ref::<sqlx::sqlite::SqliteError>()?;
    db.code()
        .and_then(|c| c.parse::<u32>().ok())
        .map(|c| c & 0xff)
}

/// Whether `error` is a condition of the file that passes or that an operator fixes, after
/// which the same statement succeeds: locked by another writer (5, 6), read-only (8), an I/O
/// error such as a full disk while growing a file (10), a full disk (13).
pub(super) fn is_passing(error: &sqlx::Error) -> bool {
    matches!(primary_code(error), Some(5 | 6 | 8 | 10 | 13))
}

impl SqliteStore {
    /// Opens (creating it and its folder on first use) the file and applies the migrations.
    pub async fn connect(config: &DatabaseConfig) -> Result<SqliteStore, StoreError> {
        let path = config
            .sqlite
            .clone()
            .unwrap_or_else(|| PathBuf::from("jobschleuder.db"));
        let target = config.describe();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Connect {
                target: target.clone(),
                source: sqlx::Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot create the folder {}: {e}", dir.display()),
                )),
            })?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|source| StoreError::Connect {
                target: target.clone(),
                source,
            })?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        // Opening sets the file's journal mode, which needs the file to itself for a moment:
        // two processes opening a new file at once (a standalone and a `runs` in another
        // shell) can find it busy before the busy timeout applies. That passes; look again.
        let mut tries = 0;
        let pool = loop {
            tries += 1;
            let opened = SqlitePoolOptions::new()
                .max_connections(config.max_connections.max(2))
                .acquire_timeout(BUSY_TIMEOUT)
                .connect_with(options.clone())
                .await;
            match opened {
                Ok(pool) => break pool,
                Err(e) if is_passing(&e) && tries < 50 => {
                    tracing::debug!(error = %e, "the database file is busy while opening; looking again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(source) => {
                    return Err(StoreError::Connect {
                        target: target.clone(),
                        source,
                    })
                }
            }
        };
        // SQLite's migrations take no lock: processes that open a new file at once (a
        // standalone and a `runs` in another shell) race to record the same version, and the
        // loser finds it recorded when it looks again.
        let mut tries = 0;
        loop {
            tries += 1;
            match MIGRATOR.run(&pool).await {
                Ok(()) => break,
                Err(
                    sqlx::migrate::MigrateError::Execute(e)
                    | sqlx::migrate::MigrateError::ExecuteMigration(e, _),
                ) if tries < 5 => {
                    tracing::debug!(error = %e, "migrating raced another process; looking again");
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                Err(source) => {
                    return Err(StoreError::Migrate {
                        target: target.clone(),
                        source,
                    })
                }
            }
        }
        let path = std::path::absolute(&path).unwrap_or(path);
        Ok(SqliteStore {
            pool,
            turn: turns(&path),
            path,
            poll: config.poll_interval,
            lease: config.worker_lease,
            inline: None,
        })
    }

    /// Publishes due runs into the table queue as they are created.
    pub(super) fn publish_on_insert(&mut self, inline: Arc<PublishOnInsert>) {
        self.inline = Some(inline);
    }

    /// A write transaction that holds the file's write lock from its start.
    async fn write(&self, context: &'static str) -> Result<WriteTx, StoreError> {
        let turn = self.turn.clone().lock_owned().await;
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .context(context)?;
        Ok(WriteTx {
            tx,
            _turn: turn,
            inline: self.inline.clone(),
            queued: Vec::new(),
        })
    }

    fn tell(&self, what: &str) {
        let _ = local_channel(&self.path).send(what.to_string());
    }

    pub async fn replace_registry(
        &self,
        jobs: &[JobDefinition],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<ImportSummary, StoreError> {
        let mut tx = self.write("starting the import").await?;
        let before: Vec<Option<String>> = sqlx::query_scalar("SELECT name FROM jobs")
            .fetch_all(&mut *tx)
            .await
            .context("reading the current jobs")?;
        let new_names: HashSet<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        let kept = before
            .iter()
            .filter(|n| n.as_deref().is_some_and(|n| new_names.contains(n)))
            .count();
        let summary = ImportSummary {
            imported: jobs.len(),
            added: jobs.len() - kept,
            replaced: kept,
            removed: before.len() - kept,
            scheduled: jobs.iter().filter(|j| j.schedule.is_some()).count(),
        };
        // Jobs no longer in the file go, with their registry entries and schedule rows.
        sqlx::query("DELETE FROM jobs WHERE name IS NULL")
            .execute(&mut *tx)
            .await
            .context("removing jobs that are no longer in the file")?;
        for name in before.iter().flatten() {
            if !new_names.contains(name.as_str()) {
                sqlx::query("DELETE FROM jobs WHERE name = ?")
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .context("removing jobs that are no longer in the file")?;
            }
        }
        let mut done = 0;
        for chunk in jobs.chunks(IMPORT_CHUNK) {
            for job in chunk {
                import_job(&mut tx, job).await?;
            }
            done += chunk.len();
            progress(done, jobs.len());
        }
        tx.commit().await.context("committing the import")?;
        self.tell("registry");
        Ok(summary)
    }

    pub async fn jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs j ORDER BY id"))
            .fetch_all(&self.pool)
            .await
            .context("reading jobs")
    }

    pub async fn registry(&self) -> Result<Vec<RegistryRow>, StoreError> {
        sqlx::query_as(
            "SELECT r.id, r.job, j.name, j.description, r.schedule, r.timezone, r.misfire,
                    j.concurrency, j.jitter_seconds, r.paused, r.paused_note, r.paused_at
             FROM registry r LEFT JOIN jobs j ON j.id = r.job
             ORDER BY r.id",
        )
        .fetch_all(&self.pool)
        .await
        .context("reading the registry")
    }

    pub async fn set_paused(
        &self,
        names: Option<&[String]>,
        paused: bool,
        note: Option<&str>,
    ) -> Result<Result<Vec<PauseChange>, Vec<String>>, StoreError> {
        let mut tx = self.write("starting to pause").await?;
        let entries: Vec<(i32, Option<String>, bool, i32)> = sqlx::query_as(
            "SELECT r.id, j.name, r.paused, j.id FROM registry r JOIN jobs j ON j.id = r.job
             ORDER BY r.id",
        )
        .fetch_all(&mut *tx)
        .await
        .context("reading the entries to pause")?;
        let targets = match pause_targets(&entries, names) {
            Ok(targets) => targets,
            Err(missing) => {
                tx.rollback().await.context("ending the pause")?;
                return Ok(Err(missing));
            }
        };
        let now = Utc::now();
        for (entry, _, _) in &targets {
            sqlx::query(
                "UPDATE registry SET paused = ?2,
                        paused_note = CASE WHEN ?2 THEN COALESCE(?3, CASE WHEN paused THEN paused_note END) END,
                        paused_at = CASE WHEN ?2 THEN COALESCE(CASE WHEN paused THEN paused_at END, ?4) END
                 WHERE id = ?1",
            )
            .bind(entry)
            .bind(paused)
            .bind(note)
            .bind(now)
            .execute(&mut *tx)
            .await
            .context("pausing registry entries")?;
        }
        tx.commit().await.context("committing the pause")?;
        self.tell("registry");
        Ok(Ok(targets
            .into_iter()
            .map(|(_, name, was_paused)| PauseChange { name, was_paused })
            .collect()))
    }

    pub async fn now(&self) -> Result<DateTime<Utc>, StoreError> {
        Ok(Utc::now())
    }

    pub async fn notifications(&self) -> Result<Notifications, StoreError> {
        Ok(Notifications {
            inner: NotificationsInner::Sqlite(Watch::new(self).await?),
        })
    }

    pub async fn notify(&self, what: &str) -> Result<(), StoreError> {
        self.tell(what);
        Ok(())
    }

    pub async fn replace_schedule(
        &self,
        next: &NextRun<'_>,
    ) -> Result<(usize, Vec<EntrySchedule>), StoreError> {
        self.write_schedule(true, next).await
    }

    pub async fn fill_missing_schedule(
        &self,
        next: &NextRun<'_>,
    ) -> Result<(usize, Vec<EntrySchedule>), StoreError> {
        self.write_schedule(false, next).await
    }

    async fn write_schedule(
        &self,
        replace: bool,
        next: &NextRun<'_>,
    ) -> Result<(usize, Vec<EntrySchedule>), StoreError> {
        let mut tx = self.write("starting a schedule update").await?;
        if replace {
            sqlx::query("DELETE FROM schedule")
                .execute(&mut *tx)
                .await
                .context("clearing the schedule")?;
        }
        let now = Utc::now();
        let entries: Vec<EntrySchedule> = sqlx::query_as(
            "SELECT r.id AS registry_id, r.schedule, r.timezone FROM registry r
             WHERE NOT EXISTS (SELECT 1 FROM schedule s WHERE s.job = r.id)
             ORDER BY r.id",
        )
        .fetch_all(&mut *tx)
        .await
        .context("reading unscheduled registry entries")?;
        let mut scheduled = 0;
        let mut unschedulable = Vec::new();
        for entry in entries {
            match next(&entry, now) {
                Some(time) => {
                    sqlx::query("INSERT INTO schedule (job, next_run) VALUES (?, ?)")
                        .bind(entry.registry_id)
                        .bind(time)
                        .execute(&mut *tx)
                        .await
                        .context("writing the schedule")?;
                    scheduled += 1;
                }
                None => unschedulable.push(entry),
            }
        }
        tx.commit().await.context("committing the schedule")?;
        Ok((scheduled, unschedulable))
    }

    pub async fn schedule_due(
        &self,
        at: Option<DateTime<Utc>>,
        limit: u32,
        decide: &dyn Fn(&DueEntry, DateTime<Utc>) -> Decision,
    ) -> Result<(usize, Vec<CreatedRun>), StoreError> {
        let mut tx = self.write("starting a scheduling pass").await?;
        let now = at.unwrap_or_else(Utc::now);
        let due: Vec<DueEntry> = sqlx::query_as(
            "SELECT s.id AS schedule_id, r.id AS registry_id, s.next_run, r.schedule, r.timezone, r.misfire,
                    j.id AS job_id, COALESCE(j.name, CAST(j.id AS text)) AS job_name, j.job, j.arguments,
                    j.preprocessing, j.postprocessing, j.timeout_seconds, j.retries, j.queue,
                    j.concurrency, j.jitter_seconds
             FROM schedule s
             JOIN registry r ON r.id = s.job
             JOIN jobs j ON j.id = r.job
             WHERE s.next_run <= ? AND NOT r.paused
             ORDER BY s.next_run
             LIMIT ?",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .context("reading due schedule rows")?;
        if due.is_empty() {
            tx.rollback()
                .await
                .context("ending an empty scheduling pass")?;
            return Ok((0, Vec::new()));
        }
        let decisions: Vec<Decision> = due.iter().map(|entry| decide(entry, now)).collect();
        let guarded: Vec<&str> = due
            .iter()
            .zip(&decisions)
            .filter(|(entry, decision)| decision.run_for.is_some() && entry.concurrency != "allow")
            .map(|(entry, _)| entry.job_name.as_str())
            .collect();
        let live: Vec<LiveRun> = if guarded.is_empty() {
            Vec::new()
        } else {
            bind_all!(
                sqlx::query_as::<_, LiveRun>(&format!(
                    "SELECT id, job_name, status, scheduled_for, parent_id, trigger FROM job_runs
                     WHERE status IN ('queued', 'running') AND trigger <> 'backfill'
                       AND job_name IN ({})
                     ORDER BY created_at, id",
                    marks(guarded.len())
                )),
                guarded.iter()
            )
            .fetch_all(&mut *tx)
            .await
            .context("looking for runs still going")?
        };
        let mut runs: Vec<Planned> = Vec::new();
        let mut replaced: Vec<Uuid> = Vec::new();
        for (entry, decision) in due.iter().zip(&decisions) {
            if let Some(run_for) = decision.run_for {
                let others: Vec<&LiveRun> = live
                    .iter()
                    .filter(|r| r.job_name == entry.job_name && r.scheduled_for != Some(run_for))
                    .collect();
                let skipped = match (entry.concurrency.as_str(), others.first()) {
                    ("forbid", Some(other)) => Some(format!(
                        "skipped: run {} of this job is still {} (concurrency: forbid)",
                        other.id, other.status
                    )),
                    ("replace", Some(_)) => {
                        replaced.extend(others.iter().map(|r| {
                            match (r.parent_id, r.trigger.as_str()) {
                                (Some(parent), trigger) if trigger != "chain" => parent,
                                _ => r.id,
                            }
                        }));
                        None
                    }
                    _ => None,
                };
                let mut planned = Planned::new(
                    NewRun {
                        id: None,
                        job_name: entry.job_name.clone(),
                        job: entry.job.clone(),
                        job_id: Some(entry.job_id),
                        trigger: "schedule",
                        queue: entry.queue.clone(),
                        arguments: object_or_empty(entry.arguments.as_ref()),
                        preprocessing: entry.preprocessing.clone(),
                        postprocessing: entry.postprocessing.clone(),
                        timeout_seconds: entry.timeout_seconds,
                        max_retries: entry.retries,
                        parent_id: None,
                        published: false,
                    },
                    Some((entry.registry_id, run_for)),
                );
                planned.not_before = decision.starts_at.filter(|t| *t > run_for);
                if let Some(reason) = skipped {
                    planned.status = "skipped";
                    planned.error = Some(reason);
                }
                runs.push(planned);
            }
        }
        if !replaced.is_empty() {
            cancel_in(
                &mut tx,
                &replaced,
                "cancelled: replaced by a newer run of its job (concurrency: replace)",
                now,
            )
            .await?;
        }
        let created = insert_planned(&mut tx, &runs, now).await?;
        for (entry, decision) in due.iter().zip(&decisions) {
            match decision.next_run {
                Some(next) => sqlx::query("UPDATE schedule SET next_run = ? WHERE id = ?")
                    .bind(next)
                    .bind(entry.schedule_id)
                    .execute(&mut *tx)
                    .await
                    .context("advancing the schedule")?,
                None => sqlx::query("DELETE FROM schedule WHERE id = ?")
                    .bind(entry.schedule_id)
                    .execute(&mut *tx)
                    .await
                    .context("removing finished schedule rows")?,
            };
        }
        tx.commit().await.context("committing a scheduling pass")?;
        Ok((due.len(), created))
    }

    pub async fn insert_runs(&self, runs: &[NewRun]) -> Result<Vec<Uuid>, StoreError> {
        Ok(self
            .insert_runs_reporting(runs)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    pub async fn insert_runs_reporting(
        &self,
        runs: &[NewRun],
    ) -> Result<Vec<(Uuid, bool)>, StoreError> {
        let planned: Vec<Planned> = runs.iter().map(|r| Planned::new(r.clone(), None)).collect();
        let mut tx = self.write("starting to insert runs").await?;
        let created: HashSet<Uuid> = insert_planned(&mut tx, &planned, Utc::now())
            .await?
            .into_iter()
            .map(|run| run.id)
            .collect();
        tx.commit().await.context("committing new runs")?;
        self.tell("run");
        Ok(planned
            .iter()
            .map(|p| (p.id, created.contains(&p.id)))
            .collect())
    }

    pub async fn insert_children(
        &self,
        parent: Uuid,
        runs: &[NewRun],
    ) -> Result<Option<Vec<Uuid>>, StoreError> {
        let mut tx = self.write("starting to insert runs").await?;
        let cancelled: Option<bool> = sqlx::query_scalar(
            "SELECT cancel_requested_at IS NOT NULL OR status = 'cancelled' FROM job_runs WHERE id = ?",
        )
        .bind(parent)
        .fetch_optional(&mut *tx)
        .await
        .context("reading the parent run")?;
        if cancelled == Some(true) {
            tx.rollback().await.context("ending an insert")?;
            return Ok(None);
        }
        let planned: Vec<Planned> = runs.iter().map(|r| Planned::new(r.clone(), None)).collect();
        insert_planned(&mut tx, &planned, Utc::now()).await?;
        tx.commit().await.context("committing new runs")?;
        self.tell("run");
        Ok(Some(planned.iter().map(|p| p.id).collect()))
    }

    /// Holds the write lock until the batch is settled: SQLite has no row locks to skip, so
    /// publishers take turns; publishing into the table queue happens in this transaction.
    pub async fn outbox(
        &self,
        limit: u32,
        only: Option<&[Uuid]>,
    ) -> Result<OutboxBatch, StoreError> {
        let mut tx = self.write("starting to publish").await?;
        let now = Utc::now();
        let columns = "id, job_name, job, arguments, preprocessing, postprocessing, timeout_seconds, max_retries, attempt, queue";
        let runs: Vec<OutboxRun> = match only {
            None => sqlx::query_as(&format!(
                "SELECT {columns} FROM job_runs
                 WHERE status = 'queued' AND published_at IS NULL AND (not_before IS NULL OR not_before <= ?)
                 ORDER BY created_at LIMIT ?"
            ))
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await,
            Some(ids) => bind_all!(
                sqlx::query_as(&format!(
                    "SELECT {columns} FROM job_runs
                     WHERE status = 'queued' AND published_at IS NULL AND (not_before IS NULL OR not_before <= ?)
                       AND id IN ({})
                     ORDER BY created_at LIMIT ?",
                    marks(ids.len())
                ))
                .bind(now),
                ids.iter()
            )
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await,
        }
        .context("reading runs to publish")?;
        Ok(OutboxBatch {
            runs,
            inner: OutboxInner::Sqlite(Outbox {
                tx,
                store: self.clone(),
            }),
        })
    }

    pub async fn next_wakeup(&self) -> Result<Wakeup, StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT s.next_run FROM schedule s JOIN registry r ON r.id = s.job
                     WHERE NOT r.paused ORDER BY s.next_run LIMIT 1),
                    (SELECT min(COALESCE(not_before, created_at)) FROM job_runs
                     WHERE status = 'queued' AND published_at IS NULL),
                    (SELECT min(published_at) FROM job_runs
                     WHERE status = 'queued' AND published_at IS NOT NULL),
                    EXISTS (SELECT 1 FROM job_runs WHERE status = 'running')",
        )
        .fetch_one(&self.pool)
        .await
        .context("finding the next wake-up")?;
        Ok(Wakeup {
            next_run: row.try_get(0).context("finding the next wake-up")?,
            next_publish: row.try_get(1).context("finding the next wake-up")?,
            oldest_unclaimed: row.try_get(2).context("finding the next wake-up")?,
            any_running: row.try_get(3).context("finding the next wake-up")?,
            now: Utc::now(),
        })
    }

    pub async fn has_unscheduled_entries(&self) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM registry r WHERE NOT EXISTS (SELECT 1 FROM schedule s WHERE s.job = r.id))",
        )
        .fetch_one(&self.pool)
        .await
        .context("looking for unscheduled registry entries")
    }

    pub async fn scheduled(
        &self,
        due_by: Option<DateTime<Utc>>,
    ) -> Result<Vec<ScheduledRow>, StoreError> {
        sqlx::query_as(
            "SELECT r.id AS registry_id, j.id AS job_id, COALESCE(j.name, CAST(j.id AS text)) AS job_name, j.job,
                    r.schedule, r.timezone, s.next_run, j.jitter_seconds, r.paused, r.paused_note
             FROM schedule s JOIN registry r ON r.id = s.job JOIN jobs j ON j.id = r.job
             WHERE ?1 IS NULL OR s.next_run <= ?1
             ORDER BY s.next_run, r.id",
        )
        .bind(due_by)
        .fetch_all(&self.pool)
        .await
        .context("reading the schedule")
    }

    pub async fn find_job(&self, key: &str) -> Result<Option<JobRow>, StoreError> {
        sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs j WHERE name = ?1 OR id = ?2 ORDER BY name = ?1 DESC LIMIT 1"
        ))
        .bind(key)
        .bind(key.parse::<i32>().ok())
        .fetch_optional(&self.pool)
        .await
        .context("looking up a job")
    }

    // ---- the worker's side ----

    /// A lease row with a fresh random token, renewed five times per lease; lost (and taken
    /// again) when a renewal finds it expired or gone.
    pub async fn worker_lease(&self) -> Result<WorkerLease, StoreError> {
        let lease = self.lease;
        let heartbeat = lease / 5;
        let token = i32::try_from(Uuid::new_v4().as_u128() % (i32::MAX as u128))
            .unwrap_or(1)
            .max(1);
        let worker = format!(
            "{} pid {}",
            gethostname::gethostname().to_string_lossy(),
            std::process::id()
        );
        let turn = self.turn.lock().await;
        let inserted = sqlx::query(
            "INSERT INTO worker_leases (token, worker, expires_at) VALUES (?, ?, ?)
             ON CONFLICT (token) DO NOTHING",
        )
        .bind(token)
        .bind(&worker)
        .bind(Utc::now() + lease)
        .execute(&self.pool)
        .await
        .context("taking the worker lease")?;
        drop(turn);
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Query {
                context: "taking the worker lease",
                source: sqlx::Error::Protocol(format!("lease token {token} is in use; try again")),
            });
        }
        let (set_held, held) = tokio::sync::watch::channel(true);
        let pool = self.pool.clone();
        let turn = self.turn.clone();
        let task = tokio::spawn(async move {
            let mut held_now = true;
            loop {
                tokio::time::sleep(heartbeat).await;
                let _turn = turn.lock().await;
                // Within the write lock, and "now" read once it is held: a renewal that waited
                // for the lock must not revive a lease that ran out meanwhile (a sweeper may
                // have handed its runs to others).
                let renewed = async {
                    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                    let now = Utc::now();
                    let done = sqlx::query(
                        "UPDATE worker_leases SET expires_at = ? WHERE token = ? AND expires_at > ?",
                    )
                    .bind(now + lease)
                    .bind(token)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok::<_, sqlx::Error>(done)
                }
                .await;
                let now = Utc::now();
                match renewed {
                    Ok(done) if done.rows_affected() == 1 => {
                        if !held_now {
                            held_now = true;
                            let _ = set_held.send(true);
                            tracing::info!("worker lease taken again");
                        }
                        continue;
                    }
                    Ok(_) => {
                        if held_now {
                            held_now = false;
                            let _ = set_held.send(false);
                            tracing::warn!("the worker lease ran out; claiming nothing until it is taken again");
                        }
                        // Taken again once no run is left under the old claim.
                        let taken = sqlx::query(
                            "INSERT INTO worker_leases (token, worker, expires_at) VALUES (?1, ?2, ?3)
                             ON CONFLICT (token) DO UPDATE SET expires_at = ?3
                             WHERE NOT EXISTS (SELECT 1 FROM job_runs
                                               WHERE status = 'running' AND claim_token = ?1)",
                        )
                        .bind(token)
                        .bind(&worker)
                        .bind(now + lease)
                        .execute(&pool)
                        .await;
                        if let Err(e) = taken {
                            tracing::warn!(error = %e, "cannot take the worker lease yet");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing the worker lease failed; trying again");
                    }
                }
            }
        });
        Ok(WorkerLease { token, held, task })
    }

    pub async fn claim_runs(
        &self,
        worker: &str,
        token: i32,
        nonce: Uuid,
        claims: &[(Uuid, bool)],
    ) -> Result<Vec<Claim>, StoreError> {
        let mut tx = self.write("claiming runs").await?;
        let claimed = claim_in(&mut tx, worker, token, nonce, claims).await?;
        tx.commit().await.context("claiming runs")?;
        Ok(claimed)
    }

    pub async fn finish_runs(&self, finishes: &[Finish]) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self.write("starting to record runs").await?;
        let (not_recorded, tell) = finish_in(&mut tx, finishes).await?;
        tx.commit().await.context("committing finished runs")?;
        if tell {
            self.tell("run");
        }
        Ok(not_recorded)
    }

    pub async fn finish_and_claim_runs(
        &self,
        finishes: &[Finish],
        worker: &str,
        token: i32,
        nonce: Uuid,
        claims: &[(Uuid, bool)],
    ) -> Result<Together, StoreError> {
        let mut tx = self.write("starting to record and claim runs").await?;
        let (not_recorded, tell) = finish_in(&mut tx, finishes).await?;
        let claimed = if claims.is_empty() {
            Vec::new()
        } else {
            claim_in(&mut tx, worker, token, nonce, claims).await?
        };
        tx.commit()
            .await
            .context("committing recorded and claimed runs")?;
        if tell {
            self.tell("run");
        }
        Ok(Together {
            not_recorded,
            claims: claimed,
            left: Vec::new(),
        })
    }

    pub async fn orphaned_runs(&self) -> Result<Vec<ClaimKey>, StoreError> {
        sqlx::query_as(
            "SELECT r.id, r.claim_token, r.attempt FROM job_runs r
             WHERE r.status = 'running' AND r.claim_token IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM worker_leases l
                               WHERE l.token = r.claim_token AND l.expires_at > ?)",
        )
        .bind(Utc::now())
        .fetch_all(&self.pool)
        .await
        .context("looking for runs whose worker is gone")
    }

    pub async fn requeue_orphans(
        &self,
        suspects: &[ClaimKey],
        crash_limit: u32,
    ) -> Result<Vec<(Uuid, i32, String)>, StoreError> {
        let mut tx = self.write("starting to queue orphaned runs again").await?;
        let now = Utc::now();
        let limit = i32::try_from(crash_limit).unwrap_or(i32::MAX);
        let mut handled: Vec<OrphanRow> = Vec::new();
        for (id, token, attempt) in suspects {
            let row: Option<OrphanRow> = sqlx::query_as(&format!(
                "UPDATE job_runs AS r
                 SET status = CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                                   WHEN attempt >= max_retries + ?5 THEN 'dead' ELSE 'queued' END,
                     finished_at = CASE WHEN cancel_requested_at IS NOT NULL
                                          OR attempt >= max_retries + ?5 THEN ?4 END,
                     published_at = NULL,
                     not_before = CASE WHEN cancel_requested_at IS NOT NULL
                                         OR attempt >= max_retries + ?5 THEN not_before END,
                     error = CASE WHEN cancel_requested_at IS NOT NULL
                                  THEN COALESCE(cancel_reason, 'cancelled') || ' (its worker vanished while running it)'
                                  WHEN attempt >= max_retries + ?5
                                  THEN 'its worker vanished while running it, ' || attempt || ' times: given up'
                                  ELSE 'its worker vanished while running it; queued again' END
                 WHERE id = ?1 AND claim_token = ?2 AND attempt = ?3 AND status = 'running'
                   AND NOT EXISTS (SELECT 1 FROM worker_leases l
                                   WHERE l.token = r.claim_token AND l.expires_at > ?4)
                 RETURNING attempt, {}", ended_columns()
            ))
            .bind(id)
            .bind(token)
            .bind(attempt)
            .bind(now)
            .bind(limit)
            .fetch_optional(&mut *tx)
            .await
            .context("queueing orphaned runs again")?;
            handled.extend(row);
        }
        let ended: Vec<EndedRun> = handled.iter().map(|o| o.ended.clone()).collect();
        chain_in(&mut tx, &ended, now).await?;
        tx.commit().await.context("committing orphaned runs")?;
        self.tell("run");
        Ok(handled
            .into_iter()
            .map(|o| (o.ended.id, o.attempt, o.ended.status))
            .collect())
    }

    pub async fn stale_queues(
        &self,
        after: Duration,
        default_queue: &str,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT DISTINCT COALESCE(queue, ?2) FROM job_runs
             WHERE status = 'queued' AND published_at IS NOT NULL AND published_at < ?1",
        )
        .bind(Utc::now() - after)
        .bind(default_queue)
        .fetch_all(&self.pool)
        .await
        .context("looking for unclaimed runs")
    }

    pub async fn republish_stale(
        &self,
        after: Duration,
        queue: &str,
        default_queue: &str,
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self.write("starting to republish unclaimed runs").await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE job_runs SET published_at = NULL
             WHERE status = 'queued' AND published_at IS NOT NULL AND published_at < ?1
               AND COALESCE(queue, ?3) = ?2
             RETURNING id",
        )
        .bind(Utc::now() - after)
        .bind(queue)
        .bind(default_queue)
        .fetch_all(&mut *tx)
        .await
        .context("republishing unclaimed runs")?;
        tx.commit().await.context("committing republished runs")?;
        if !ids.is_empty() {
            self.tell("run");
        }
        Ok(ids)
    }

    pub async fn republish(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self.write("putting runs back in the outbox").await?;
        let mut put_back = Vec::with_capacity(ids.len());
        for id in ids {
            let done = sqlx::query(
                "UPDATE job_runs SET published_at = NULL
                 WHERE id = ? AND status = 'queued' AND published_at IS NOT NULL",
            )
            .bind(id)
            .execute(&mut *tx)
            .await
            .context("putting runs back in the outbox")?;
            if done.rows_affected() > 0 {
                put_back.push(*id);
            }
        }
        tx.commit()
            .await
            .context("committing runs put back in the outbox")?;
        if !put_back.is_empty() {
            self.tell("run");
        }
        Ok(put_back)
    }

    pub async fn mark_dead(&self, id: Uuid, error: &str) -> Result<bool, StoreError> {
        let mut tx = self.write("recording a run dead").await?;
        let now = Utc::now();
        let ended = mark_dead_in(&mut tx, &[(id, error.to_string())], now).await?;
        let chained = chain_in(&mut tx, &ended, now).await?;
        tx.commit().await.context("committing a dead run")?;
        if chained > 0 {
            self.tell("run");
        }
        Ok(!ended.is_empty())
    }

    pub async fn backfill(
        &self,
        job: &JobRow,
        slots: &[DateTime<Utc>],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<usize, StoreError> {
        let mut tx = self.write("starting a backfill").await?;
        let registry_id: Option<i32> =
            sqlx::query_scalar("SELECT min(id) FROM registry WHERE job = ?")
                .bind(job.id)
                .fetch_one(&mut *tx)
                .await
                .context("reading the job's registry entry")?;
        let now = Utc::now();
        let mut created = 0;
        let mut done = 0;
        for chunk in slots.chunks(IMPORT_CHUNK) {
            let planned: Vec<Planned> = chunk
                .iter()
                .map(|slot| {
                    let mut planned = Planned::new(
                        NewRun::of_job(job, "backfill"),
                        Some((registry_id.unwrap_or_default(), *slot)),
                    );
                    if registry_id.is_none() {
                        planned.registry_id = None;
                    }
                    planned
                })
                .collect();
            created += insert_planned(&mut tx, &planned, now).await?.len();
            done += chunk.len();
            progress(done, slots.len());
        }
        tx.commit().await.context("committing the backfill")?;
        if created > 0 {
            self.tell("run");
        }
        Ok(created)
    }

    pub async fn cancel_run(&self, id: Uuid) -> Result<Option<Cancelled>, StoreError> {
        let mut tx = self.write("starting to cancel").await?;
        let row: Option<(String, Option<String>, bool)> = sqlx::query_as(
            "SELECT status, worker, status = 'running' AND cancel_requested_at IS NOT NULL
             FROM job_runs WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .context("reading the run to cancel")?;
        let Some((status, worker, already_asked)) = row else {
            return Ok(None);
        };
        let (now, later) =
            cancel_in(&mut tx, &[id], "cancelled by an operator", Utc::now()).await?;
        tx.commit().await.context("committing the cancel")?;
        Ok(Some(Cancelled {
            status,
            worker,
            already_asked,
            cancelled: now,
            asked: later,
        }))
    }

    pub async fn cancel_requested(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        bind_all!(
            sqlx::query_scalar(&format!(
                "SELECT id FROM job_runs
                 WHERE id IN ({}) AND status = 'running' AND cancel_requested_at IS NOT NULL",
                marks(ids.len())
            )),
            ids.iter()
        )
        .fetch_all(&self.pool)
        .await
        .context("looking for cancelled runs")
    }

    pub async fn child_ids(&self, parent: Uuid) -> Result<Vec<Uuid>, StoreError> {
        sqlx::query_scalar("SELECT id FROM job_runs WHERE parent_id = ? ORDER BY created_at, id")
            .bind(parent)
            .fetch_all(&self.pool)
            .await
            .context("reading a run's children")
    }

    // ---- run history ----

    pub async fn runs(
        &self,
        job: Option<&str>,
        status: Option<&str>,
        trigger: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunRow>, StoreError> {
        let name: Option<String> = match job {
            None => None,
            Some(key) => Some(
                sqlx::query_scalar(
                    "SELECT COALESCE((SELECT name FROM jobs WHERE name = ?1),
                                     (SELECT name FROM jobs WHERE id = ?2), ?1)",
                )
                .bind(key)
                .bind(key.parse::<i32>().ok())
                .fetch_one(&self.pool)
                .await
                .context("looking up the job of runs")?,
            ),
        };
        sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM job_runs
             WHERE (?1 IS NULL OR job_name = ?1) AND (?2 IS NULL OR status = ?2)
               AND (?4 IS NULL OR trigger = ?4)
             ORDER BY created_at DESC, id
             LIMIT ?3"
        ))
        .bind(name)
        .bind(status)
        .bind(limit)
        .bind(trigger)
        .fetch_all(&self.pool)
        .await
        .context("reading runs")
    }

    pub async fn run(&self, id: Uuid) -> Result<Option<RunRow>, StoreError> {
        sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM job_runs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .context("reading a run")
    }

    pub async fn children(&self, id: Uuid) -> Result<Vec<RunRow>, StoreError> {
        sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM job_runs WHERE parent_id = ? ORDER BY created_at, id"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .context("reading a run's children")
    }

    pub async fn prune_runs(&self, retention: Duration, chunk: u32) -> Result<u64, StoreError> {
        let mut tx = self.write("starting to prune").await?;
        let doomed: Vec<Uuid> = bind_all!(
            sqlx::query_scalar(&format!(
                "SELECT id FROM job_runs
                 WHERE parent_id IS NULL AND finished_at IS NOT NULL AND finished_at < ?
                   AND status IN ({})
                 LIMIT ?",
                marks(ENDED_STATUSES.len())
            ))
            .bind(Utc::now() - retention),
            ENDED_STATUSES.iter()
        )
        .bind(i64::from(chunk))
        .fetch_all(&mut *tx)
        .await
        .context("pruning old runs")?;
        if doomed.is_empty() {
            tx.rollback().await.context("pruning old runs")?;
            return Ok(0);
        }
        let mut deleted = 0;
        for id in &doomed {
            sqlx::query(
                "UPDATE job_runs SET parent_id = NULL WHERE parent_id = ? AND trigger = 'chain'",
            )
            .bind(id)
            .execute(&mut *tx)
            .await
            .context("keeping chained runs of pruned runs")?;
            deleted += sqlx::query("DELETE FROM job_runs WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await
                .context("pruning old runs")?
                .rows_affected();
        }
        tx.commit().await.context("committing pruned runs")?;
        Ok(deleted)
    }

    // ---- webhooks ----

    pub async fn create_webhook_runs(
        &self,
        hook: &str,
        dedupe: Option<&WebhookKey>,
        runs: &[WebhookRun],
    ) -> Result<WebhookOutcome, StoreError> {
        let mut tx = self.write("starting a webhook's runs").await?;
        let now = Utc::now();
        if let Some(key) = dedupe {
            if let Some(run_ids) = take_key(&mut tx, hook, "dedupe", key, &[], now).await? {
                tx.commit().await.context("committing a webhook's runs")?;
                return Ok(WebhookOutcome {
                    run_ids,
                    duplicate: true,
                    created: Vec::new(),
                });
            }
        }
        let mut outcome = WebhookOutcome::default();
        let mut delayed: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
        let mut fresh: Vec<NewRun> = Vec::new();
        let mut taken: HashMap<&str, usize> = HashMap::new();
        let mut ids: Vec<Option<Uuid>> = vec![None; runs.len()];
        for (index, wanted) in runs.iter().enumerate() {
            let id = wanted.run.id.unwrap_or_else(super::new_run_id);
            if let Some(key) = &wanted.debounce {
                if let Some(&mine) = taken.get(key.key.as_str()) {
                    fresh[mine].arguments = wanted.run.arguments.clone();
                    ids[index] = fresh[mine].id;
                    continue;
                }
                if let Some(held) = take_key(&mut tx, hook, "debounce", key, &[id], now).await? {
                    let shared: Option<Uuid> = sqlx::query_scalar(
                        "UPDATE job_runs SET arguments = ?2
                         WHERE id = ?1 AND status = 'queued' AND published_at IS NULL
                         RETURNING id",
                    )
                    .bind(held.first().copied().unwrap_or(id))
                    .bind(jsonb_text(&wanted.run.arguments))
                    .fetch_optional(&mut *tx)
                    .await
                    .context("updating a debounced run")?;
                    if let Some(shared) = shared {
                        ids[index] = Some(shared);
                        continue;
                    }
                    sqlx::query(
                        "UPDATE webhook_keys SET run_ids = ?4, created_at = ?5, expires_at = ?6
                         WHERE hook = ?1 AND kind = ?2 AND key = ?3",
                    )
                    .bind(hook)
                    .bind("debounce")
                    .bind(stored_key(&key.key))
                    .bind(ids_text(&[id]))
                    .bind(now)
                    .bind(now + key.hold)
                    .execute(&mut *tx)
                    .await
                    .context("opening a debounce window")?;
                }
                delayed.insert(id, now + key.hold);
                taken.insert(key.key.as_str(), fresh.len());
            }
            let mut run = wanted.run.clone();
            run.id = Some(id);
            fresh.push(run);
            ids[index] = Some(id);
        }
        outcome.run_ids = ids.into_iter().flatten().collect();
        if !fresh.is_empty() {
            let planned: Vec<Planned> = fresh
                .iter()
                .map(|run| {
                    let mut planned = Planned::new(run.clone(), None);
                    planned.not_before = delayed.get(&planned.id).copied();
                    planned
                })
                .collect();
            let created: HashSet<Uuid> = insert_planned(&mut tx, &planned, now)
                .await?
                .into_iter()
                .map(|run| run.id)
                .collect();
            outcome.created = planned
                .iter()
                .filter(|p| created.contains(&p.id))
                .map(|p| (p.id, p.not_before))
                .collect();
        }
        if let Some(key) = dedupe {
            sqlx::query(
                "UPDATE webhook_keys SET run_ids = ?4 WHERE hook = ?1 AND kind = ?2 AND key = ?3",
            )
            .bind(hook)
            .bind("dedupe")
            .bind(stored_key(&key.key))
            .bind(ids_text(&outcome.run_ids))
            .execute(&mut *tx)
            .await
            .context("storing a webhook's dedupe key")?;
        }
        tx.commit().await.context("committing a webhook's runs")?;
        if !fresh.is_empty() {
            self.tell("run");
        }
        Ok(outcome)
    }

    pub async fn expire_webhook_keys(&self, chunk: u32) -> Result<u64, StoreError> {
        let _turn = self.turn.lock().await;
        Ok(sqlx::query(
            "DELETE FROM webhook_keys WHERE rowid IN (
                SELECT rowid FROM webhook_keys WHERE expires_at < ? LIMIT ?)",
        )
        .bind(Utc::now())
        .bind(i64::from(chunk))
        .execute(&self.pool)
        .await
        .context("deleting expired webhook keys")?
        .rows_affected())
    }

    pub async fn runs_by_id(&self, ids: &[Uuid]) -> Result<Vec<RunRow>, StoreError> {
        bind_all!(
            sqlx::query_as(&format!(
                "SELECT {RUN_COLUMNS} FROM job_runs WHERE id IN ({})",
                marks(ids.len())
            )),
            ids.iter()
        )
        .fetch_all(&self.pool)
        .await
        .context("reading runs")
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .context("asking the database")?;
        Ok(())
    }

    pub async fn runs_created_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        sqlx::query_as(
            "SELECT trigger, count(*) FROM job_runs
             WHERE created_at > ? AND created_at <= ? GROUP BY trigger",
        )
        .bind(after)
        .bind(until)
        .fetch_all(&self.pool)
        .await
        .context("counting created runs")
    }

    pub async fn runs_finished_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<FinishedRun>, StoreError> {
        type Row = (
            String,
            String,
            DateTime<Utc>,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT job_name, status, finished_at, started_at, published_at,
                    COALESCE(not_before, scheduled_for, created_at)
             FROM job_runs
             WHERE finished_at > ? AND finished_at <= ?
             ORDER BY finished_at
             LIMIT ?",
        )
        .bind(after)
        .bind(until)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .context("reading finished runs")?;
        let seconds = |a: DateTime<Utc>, b: DateTime<Utc>| {
            (a - b).num_microseconds().map(|us| us as f64 / 1e6)
        };
        Ok(rows
            .into_iter()
            .map(
                |(job_name, status, finished_at, started, published, due)| FinishedRun {
                    job_name,
                    status,
                    finished_at,
                    duration: started.and_then(|s| seconds(finished_at, s)),
                    lag: published.zip(due).and_then(|(p, d)| seconds(p, d)),
                },
            )
            .collect())
    }

    pub async fn oldest_queued_age(&self) -> Result<Option<f64>, StoreError> {
        let now = Utc::now();
        let oldest: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT min(t) FROM (
                 SELECT min(COALESCE(not_before, created_at)) AS t FROM job_runs
                 WHERE status = 'queued' AND published_at IS NULL
                   AND (not_before IS NULL OR not_before <= ?1)
                 UNION ALL
                 SELECT min(COALESCE(not_before, created_at)) FROM job_runs
                 WHERE status = 'queued' AND published_at IS NOT NULL)",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .context("finding the oldest queued run")?;
        Ok(oldest.and_then(|t| (now - t).num_microseconds().map(|us| us as f64 / 1e6)))
    }

    pub async fn job_queues(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT DISTINCT queue FROM jobs WHERE queue IS NOT NULL ORDER BY queue")
            .fetch_all(&self.pool)
            .await
            .context("reading the jobs' queues")
    }

    /// See [`Store::queues_in_use`](super::Store::queues_in_use).
    pub async fn queues_in_use(&self, default: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT DISTINCT COALESCE(queue, ?1) AS q FROM jobs ORDER BY q")
            .bind(default)
            .fetch_all(&self.pool)
            .await
            .context("reading the jobs' queues")
    }

    // ---- the table queue ----

    pub async fn queue_publish(&self, messages: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let mut tx = self.write("publishing to the table queue").await?;
        insert_messages(&mut tx, messages, Utc::now()).await?;
        tx.commit().await.context("publishing to the table queue")
    }

    pub async fn queue_take(
        &self,
        queue: &str,
        consumer: &str,
        limit: u32,
        lease: Duration,
        delivery_limit: u32,
    ) -> Result<Vec<QueueMessage>, StoreError> {
        let now = Utc::now();
        // Nothing ready: no write lock taken (an idle consumer never blocks writers).
        let ready: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM queue_messages WHERE queue = ? AND visible_at <= ?)",
        )
        .bind(queue)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .context("looking for queued messages")?;
        if !ready {
            return Ok(Vec::new());
        }
        let mut tx = self.write("taking queued messages").await?;
        let now = Utc::now();
        let taken: Vec<QueueMessage> = sqlx::query_as(
            "UPDATE queue_messages
             SET deliveries = deliveries + 1, consumer = ?3, visible_at = ?4
             WHERE id IN (SELECT id FROM queue_messages
                          WHERE queue = ?1 AND visible_at <= ?5
                          ORDER BY id LIMIT ?2)
             RETURNING id, body, message_id, deliveries",
        )
        .bind(queue)
        .bind(i64::from(limit))
        .bind(consumer)
        .bind(now + lease)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .context("taking queued messages")?;
        // Handed out more often than allowed (workers died on it): dead-lettered instead.
        let limit = i32::try_from(delivery_limit.max(1)).unwrap_or(i32::MAX);
        let (mut taken, exhausted): (Vec<QueueMessage>, Vec<QueueMessage>) =
            taken.into_iter().partition(|m| m.deliveries <= limit);
        for message in &exhausted {
            dead_letter_in(&mut tx, message.id, None, now).await?;
        }
        tx.commit().await.context("taking queued messages")?;
        taken.sort_by_key(|m| m.id);
        Ok(taken)
    }

    pub async fn queue_ack(&self, ids: &[i64]) -> Result<(), StoreError> {
        let mut tx = self.write("acknowledging messages").await?;
        for chunk in ids.chunks(LIST_CHUNK) {
            bind_all!(
                sqlx::query(&format!(
                    "DELETE FROM queue_messages WHERE id IN ({})",
                    marks(chunk.len())
                )),
                chunk.iter()
            )
            .execute(&mut *tx)
            .await
            .context("acknowledging messages")?;
        }
        tx.commit().await.context("acknowledging messages")
    }

    pub async fn queue_release(&self, ids: &[i64]) -> Result<(), StoreError> {
        let mut tx = self.write("returning messages").await?;
        let now = Utc::now();
        for chunk in ids.chunks(LIST_CHUNK) {
            bind_all!(
                sqlx::query(&format!(
                    "UPDATE queue_messages SET visible_at = ?, consumer = NULL WHERE id IN ({})",
                    marks(chunk.len())
                ))
                .bind(now),
                chunk.iter()
            )
            .execute(&mut *tx)
            .await
            .context("returning messages to the queue")?;
        }
        tx.commit().await.context("returning messages to the queue")
    }

    pub async fn queue_release_consumer(&self, consumer: &str) -> Result<(), StoreError> {
        let _turn = self.turn.lock().await;
        sqlx::query("UPDATE queue_messages SET visible_at = ?, consumer = NULL WHERE consumer = ?")
            .bind(Utc::now())
            .bind(consumer)
            .execute(&self.pool)
            .await
            .context("returning messages to the queue")?;
        Ok(())
    }

    pub async fn queue_dead_letter(&self, ids: &[i64], reason: &str) -> Result<(), StoreError> {
        let mut tx = self.write("dead-lettering messages").await?;
        let now = Utc::now();
        for id in ids {
            dead_letter_in(&mut tx, *id, Some(reason), now).await?;
        }
        tx.commit().await.context("dead-lettering messages")
    }

    pub async fn queue_extend(
        &self,
        consumer: &str,
        ids: &[i64],
        lease: Duration,
    ) -> Result<(), StoreError> {
        let mut tx = self.write("renewing the lease of held messages").await?;
        let until = Utc::now() + lease;
        for chunk in ids.chunks(LIST_CHUNK) {
            bind_all!(
                sqlx::query(&format!(
                    "UPDATE queue_messages SET visible_at = ? WHERE consumer = ? AND id IN ({})",
                    marks(chunk.len())
                ))
                .bind(until)
                .bind(consumer),
                chunk.iter()
            )
            .execute(&mut *tx)
            .await
            .context("renewing the lease of held messages")?;
        }
        tx.commit()
            .await
            .context("renewing the lease of held messages")
    }

    pub async fn queue_depth(&self, queue: &str) -> Result<u32, StoreError> {
        let depth: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM queue_messages WHERE queue = ? AND visible_at <= ?",
        )
        .bind(queue)
        .bind(Utc::now())
        .fetch_one(&self.pool)
        .await
        .context("counting queued messages")?;
        Ok(u32::try_from(depth).unwrap_or(u32::MAX))
    }

    pub async fn queue_next_visible(&self, queue: &str) -> Result<Option<Duration>, StoreError> {
        let now = Utc::now();
        let next: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT min(visible_at) FROM queue_messages WHERE queue = ? AND visible_at > ?",
        )
        .bind(queue)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .context("looking for held messages")?;
        Ok(next.map(|t| (t - now).to_std().unwrap_or_default()))
    }

    pub async fn queue_dead_letters(&self, limit: i64) -> Result<Vec<DeadLetter>, StoreError> {
        sqlx::query_as(
            "SELECT id, queue, body, message_id, deliveries, reason, created_at, dead_at
             FROM queue_dead_letters ORDER BY dead_at DESC, id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .context("reading dead letters")
    }

    /// The poll is the store's own (`queue.poll_interval`), shared by every watcher.
    pub async fn queue_wakeups(&self, _poll: Duration) -> Result<QueueWakeups, StoreError> {
        let watch = Watch::new(self).await?;
        Ok(QueueWakeups {
            inner: WakeupsInner::Sqlite(watch),
        })
    }
}

/// Imports one job of the file (within the import's transaction): its row by name, and its
/// registry entry, whose schedule row is kept unless its schedule or zone changed.
async fn import_job(tx: &mut SqliteConnection, job: &JobDefinition) -> Result<(), StoreError> {
    let names_json = |names: &Vec<String>| {
        (!names.is_empty()).then(|| serde_json::Value::from(names.clone()).to_string())
    };
    let id: i32 = sqlx::query_scalar(
        "INSERT INTO jobs (name, job, description, preprocessing, postprocessing, arguments,
                           timeout_seconds, retries, queue, concurrency, on_success, on_failure,
                           jitter_seconds)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
         ON CONFLICT (name) DO UPDATE SET
             job = excluded.job, description = excluded.description,
             preprocessing = excluded.preprocessing, postprocessing = excluded.postprocessing,
             arguments = excluded.arguments, timeout_seconds = excluded.timeout_seconds,
             retries = excluded.retries, queue = excluded.queue,
             concurrency = excluded.concurrency, on_success = excluded.on_success,
             on_failure = excluded.on_failure, jitter_seconds = excluded.jitter_seconds
         RETURNING id",
    )
    .bind(&job.name)
    .bind(&job.job)
    .bind(job.description.as_deref())
    .bind(job.preprocessing.as_deref())
    .bind(job.postprocessing.as_deref())
    .bind(serde_json::Value::Object(job.arguments.clone()).to_string())
    .bind(job.timeout.map(|t| t.as_secs_f64()))
    .bind(i32::try_from(job.retries).unwrap_or(i32::MAX))
    .bind(job.queue.as_deref())
    .bind(job.concurrency.as_str())
    .bind(names_json(&job.on_success))
    .bind(names_json(&job.on_failure))
    .bind(job.jitter.map(|t| t.as_secs_f64()))
    .fetch_one(&mut *tx)
    .await
    .context("writing jobs")?;
    let entries: Vec<(i32, String, Option<String>)> =
        sqlx::query_as("SELECT id, schedule, timezone FROM registry WHERE job = ? ORDER BY id")
            .bind(id)
            .fetch_all(&mut *tx)
            .await
            .context("reading registry entries")?;
    let Some(schedule) = &job.schedule else {
        sqlx::query("DELETE FROM registry WHERE job = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .context("removing registry entries")?;
        return Ok(());
    };
    let zone = job.timezone.map(|t| t.name().to_string());
    let Some((entry, old_schedule, old_zone)) = entries.first() else {
        sqlx::query("INSERT INTO registry (job, schedule, timezone, misfire) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(schedule.expression())
            .bind(&zone)
            .bind(job.misfire.as_str())
            .execute(&mut *tx)
            .await
            .context("inserting registry entries")?;
        return Ok(());
    };
    // One registry entry per job (a database of the original may have several).
    for (extra, _, _) in entries.iter().skip(1) {
        sqlx::query("DELETE FROM registry WHERE id = ?")
            .bind(extra)
            .execute(&mut *tx)
            .await
            .context("removing registry entries")?;
    }
    if old_schedule != schedule.expression() || *old_zone != zone {
        sqlx::query("DELETE FROM schedule WHERE job = ?")
            .bind(entry)
            .execute(&mut *tx)
            .await
            .context("removing the schedule of changed entries")?;
    }
    sqlx::query("UPDATE registry SET schedule = ?, timezone = ?, misfire = ? WHERE id = ?")
        .bind(schedule.expression())
        .bind(&zone)
        .bind(job.misfire.as_str())
        .bind(entry)
        .execute(&mut *tx)
        .await
        .context("updating registry entries")?;
    Ok(())
}

/// What a claim reads of a run.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    status: String,
    attempt: i32,
    trigger: String,
    claim_nonce: Option<Uuid>,
    not_before: Option<DateTime<Utc>>,
    cancel_requested: bool,
    lease_gone: bool,
    slot: Option<DateTime<Utc>>,
    parent_id: Option<Uuid>,
    timezone: Option<String>,
}

/// A run to insert, with its slot, start time and initial status.
struct Planned {
    id: Uuid,
    run: NewRun,
    registry_id: Option<i32>,
    scheduled_for: Option<DateTime<Utc>>,
    not_before: Option<DateTime<Utc>>,
    status: &'static str,
    error: Option<String>,
}

impl Planned {
    fn new(run: NewRun, slot: Option<(i32, DateTime<Utc>)>) -> Planned {
        Planned {
            id: run.id.unwrap_or_else(super::new_run_id),
            run,
            registry_id: slot.map(|s| s.0),
            scheduled_for: slot.map(|s| s.1),
            not_before: None,
            status: "queued",
            error: None,
        }
    }
}

/// Inserts runs; one whose identity exists already (slot, or id) is left out. Returns the runs
/// inserted. With the table queue in this file, the due ones are published in the same
/// transaction (see [`PublishOnInsert`]).
async fn insert_planned(
    tx: &mut WriteTx,
    runs: &[Planned],
    now: DateTime<Utc>,
) -> Result<Vec<CreatedRun>, StoreError> {
    let mut created = Vec::new();
    let mut messages = Vec::new();
    for planned in runs {
        let run = &planned.run;
        let message = match &tx.inline {
            Some(inline) if planned.status == "queued" && planned.not_before.is_none() => {
                inline.message(planned.id, run)
            }
            _ => None,
        };
        let inserted = sqlx::query(
            "INSERT INTO job_runs (id, job_name, job, job_id, registry_id, trigger, queue, arguments,
                                   preprocessing, postprocessing, timeout_seconds, max_retries,
                                   scheduled_for, parent_id, published_at, not_before, status, error,
                                   finished_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14,
                     CASE WHEN ?15 THEN ?19 END, ?16, ?17, ?18,
                     CASE WHEN ?17 <> 'queued' THEN ?19 END, ?19)
             ON CONFLICT DO NOTHING",
        )
        .bind(planned.id)
        .bind(text_without_nul(&run.job_name))
        .bind(text_without_nul(&run.job))
        .bind(run.job_id)
        .bind(planned.registry_id)
        .bind(run.trigger)
        .bind(run.queue.as_deref())
        .bind(jsonb_text(&run.arguments))
        .bind(run.preprocessing.as_deref())
        .bind(run.postprocessing.as_deref())
        .bind(run.timeout_seconds)
        .bind(run.max_retries)
        .bind(planned.scheduled_for)
        .bind(run.parent_id)
        .bind(run.published || message.is_some())
        .bind(planned.not_before)
        .bind(planned.status)
        .bind(planned.error.as_deref())
        .bind(now)
        .execute(&mut **tx)
        .await
        .context("inserting runs")?;
        if inserted.rows_affected() == 1 {
            messages.extend(message);
            created.push(CreatedRun {
                id: planned.id,
                job_name: run.job_name.clone(),
                scheduled_for: planned.scheduled_for,
                skipped: (planned.status == "skipped")
                    .then(|| planned.error.clone().unwrap_or_default()),
            });
        }
    }
    if !messages.is_empty() {
        insert_messages(tx, &messages, now).await?;
        tx.queued
            .extend(messages.into_iter().map(|(queue, _)| queue));
        tx.queued.sort_unstable();
        tx.queued.dedup();
    }
    Ok(created)
}

/// The claim of `SqliteStore::claim_runs`, in `tx`.
async fn claim_in(
    tx: &mut WriteTx,
    worker: &str,
    token: i32,
    nonce: Uuid,
    claims: &[(Uuid, bool)],
) -> Result<Vec<Claim>, StoreError> {
    let now = Utc::now();
    let held: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM worker_leases WHERE token = ? AND expires_at > ?)",
    )
    .bind(token)
    .bind(now)
    .fetch_one(&mut **tx)
    .await
    .context("checking the worker lease")?;
    if !held {
        tracing::warn!("this worker does not hold its lease: claiming nothing");
        return Ok(vec![Claim::Unavailable; claims.len()]);
    }
    let mut redelivered: HashMap<Uuid, bool> = HashMap::new();
    for (id, again) in claims {
        *redelivered.entry(*id).or_default() |= *again;
    }
    let mut answers: HashMap<Uuid, Claim> = HashMap::new();
    for (id, again) in &redelivered {
        let row: Option<ClaimedRow> = sqlx::query_as(
            "SELECT r.status, r.attempt, r.trigger, r.claim_nonce, r.not_before,
                    r.cancel_requested_at IS NOT NULL AS cancel_requested,
                    r.status = 'running' AND NOT EXISTS (
                        SELECT 1 FROM worker_leases l WHERE l.token = r.claim_token AND l.expires_at > ?2)
                      AS lease_gone,
                    COALESCE(r.scheduled_for, r.created_at) AS slot, r.parent_id,
                    (SELECT g.timezone FROM jobs j JOIN registry g ON g.job = j.id
                     WHERE j.name = r.job_name LIMIT 1) AS timezone
             FROM job_runs r WHERE r.id = ?1",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&mut **tx)
        .await
        .context("claiming runs")?;
        let Some(row) = row else {
            answers.insert(*id, Claim::Unknown);
            continue;
        };
        let run = ClaimedRun {
            scheduled_for: row.slot,
            parent: row.parent_id,
            timezone: row.timezone.clone(),
        };
        let claimable = !row.cancel_requested
            && ((row.status == "queued" && row.not_before.is_none_or(|t| t <= now))
                || (row.status == "running" && *again && row.lease_gone));
        let answer = if claimable {
            sqlx::query(
                "UPDATE job_runs
                 SET status = 'running', attempt = attempt + 1, worker = ?, claim_token = ?,
                     claim_nonce = ?, started_at = ?, finished_at = NULL,
                     published_at = COALESCE(published_at, ?)
                 WHERE id = ?",
            )
            .bind(worker)
            .bind(token)
            .bind(nonce)
            .bind(now)
            .bind(now)
            .bind(id)
            .execute(&mut **tx)
            .await
            .context("claiming runs")?;
            Claim::Claimed {
                attempt: row.attempt + 1,
                trigger: row.trigger,
                run,
            }
        } else if row.status == "running" && row.claim_nonce == Some(nonce) {
            // This statement's own first try, whose reply was lost.
            Claim::Claimed {
                attempt: row.attempt,
                trigger: row.trigger,
                run,
            }
        } else if row.status == "running" || row.status == "queued" {
            Claim::Running
        } else {
            Claim::Finished(row.status)
        };
        answers.insert(*id, answer);
    }
    let mut seen = HashSet::new();
    Ok(claims
        .iter()
        .map(|(id, _)| {
            if !seen.insert(*id) {
                return Claim::Running;
            }
            answers.get(id).cloned().unwrap_or(Claim::Unknown)
        })
        .collect())
}

/// The updates of `SqliteStore::finish_runs`, in `tx`: the ids of runs not recorded, and
/// whether schedulers are to be told.
async fn finish_in(tx: &mut WriteTx, finishes: &[Finish]) -> Result<(Vec<Uuid>, bool), StoreError> {
    let mut sorted: Vec<&Finish> = finishes.iter().collect();
    sorted.sort_by_key(|f| f.id);
    let now = Utc::now();
    let mut recorded: Vec<EndedRun> = Vec::new();
    for finish in &sorted {
        let (status, delay) = match finish.end {
            RunEnd::Succeeded => ("succeeded", None),
            RunEnd::Failed => ("failed", None),
            RunEnd::Dead => ("dead", None),
            RunEnd::Cancelled => ("cancelled", None),
            RunEnd::Retry(delay) => ("queued", Some(delay)),
        };
        let retry_at = delay.map(|d| now + d);
        // A run whose cancel was asked for ends cancelled, however its call ended.
        let status_sql = "CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled' ELSE ?1 END";
        let ended: Option<EndedRun> = sqlx::query_as(&format!(
            "UPDATE job_runs AS r
             SET status = {status_sql},
                 finished_at = CASE WHEN {status_sql} = 'queued' THEN NULL ELSE ?2 END,
                 published_at = CASE WHEN {status_sql} = 'queued' THEN NULL ELSE published_at END,
                 result = ?3,
                 error = CASE WHEN cancel_requested_at IS NOT NULL
                              THEN COALESCE(cancel_reason, 'cancelled')
                                   || COALESCE(' (' || ?4 || ')',
                                               CASE WHEN ?1 = 'succeeded'
                                                    THEN ' (its job had finished before it could be stopped)' END,
                                               '')
                              ELSE ?4 END,
                 not_before = CASE WHEN {status_sql} = 'queued' THEN ?5 ELSE not_before END
             WHERE id = ?6 AND status = 'running' AND claim_token = ?7 AND attempt = ?8
             RETURNING {}", ended_columns()
        ))
        .bind(status)
        .bind(now)
        .bind(finish.result.as_ref().map(jsonb_text))
        .bind(finish.error.as_deref())
        .bind(retry_at)
        .bind(finish.id)
        .bind(finish.token)
        .bind(finish.attempt)
        .fetch_optional(&mut **tx)
        .await
        .context("recording finished runs")?;
        recorded.extend(ended);
    }
    let chained = chain_in(tx, &recorded, now).await?;
    let tell = chained > 0 || finishes.iter().any(|f| matches!(f.end, RunEnd::Retry(_)));
    let recorded: HashSet<Uuid> = recorded.into_iter().map(|r| r.id).collect();
    let not_recorded = sorted
        .iter()
        .map(|f| f.id)
        .filter(|id| !recorded.contains(id))
        .collect();
    Ok((not_recorded, tell))
}

/// Creates, within `tx`, the runs that the ended runs chain; how many.
async fn chain_in(
    tx: &mut WriteTx,
    ended: &[EndedRun],
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let names = chained_names(ended);
    if names.is_empty() {
        return Ok(0);
    }
    let jobs: Vec<JobRow> = bind_all!(
        sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs j WHERE name IN ({})",
            marks(names.len())
        )),
        names.iter()
    )
    .fetch_all(&mut **tx)
    .await
    .context("reading chained jobs")?;
    let planned = plan_chain(ended, &jobs);
    let rows: Vec<Planned> = planned
        .iter()
        .map(|run| Planned::new(run.clone(), None))
        .collect();
    let created = insert_planned(tx, &rows, now).await?;
    log_chained(&planned, created.iter().map(|run| run.id));
    Ok(created.len())
}

/// Records queued runs dead with their reasons; returns them as ended.
async fn mark_dead_in(
    tx: &mut SqliteConnection,
    dead: &[(Uuid, String)],
    now: DateTime<Utc>,
) -> Result<Vec<EndedRun>, StoreError> {
    let mut ended = Vec::new();
    for (id, error) in dead {
        let row: Option<EndedRun> = sqlx::query_as(&format!(
            "UPDATE job_runs AS r SET status = 'dead', error = ?2, finished_at = ?3
             WHERE id = ?1 AND status = 'queued'
             RETURNING {}",
            ended_columns()
        ))
        .bind(id)
        .bind(text_without_nul(error))
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .context("recording a run dead")?;
        ended.extend(row);
    }
    Ok(ended)
}

/// Cancels runs (and their fan-out children) within `tx`; see the Postgres store.
async fn cancel_in(
    tx: &mut SqliteConnection,
    ids: &[Uuid],
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(Vec<Uuid>, Vec<Uuid>), StoreError> {
    let tree: Vec<(Uuid, String)> = bind_all!(
        sqlx::query_as(&format!(
            "WITH RECURSIVE tree(id) AS (
                 SELECT id FROM job_runs WHERE id IN ({})
                 UNION
                 SELECT c.id FROM job_runs c JOIN tree t ON c.parent_id = t.id WHERE c.trigger <> 'chain')
             SELECT r.id, r.status FROM job_runs r JOIN tree t ON t.id = r.id
             WHERE r.status IN ('queued', 'running')
             ORDER BY r.id",
            marks(ids.len())
        )),
        ids.iter()
    )
    .fetch_all(&mut *tx)
    .await
    .context("finding the runs to cancel")?;
    let mut cancelled = Vec::new();
    let mut asked = Vec::new();
    for (id, status) in tree {
        if status == "queued" {
            sqlx::query(
                "UPDATE job_runs SET status = 'cancelled', finished_at = ?, error = ? WHERE id = ?",
            )
            .bind(now)
            .bind(reason)
            .bind(id)
            .execute(&mut *tx)
            .await
            .context("cancelling runs")?;
            cancelled.push(id);
        } else {
            let marked = sqlx::query(
                "UPDATE job_runs SET cancel_requested_at = ?, cancel_reason = ?
                 WHERE id = ? AND cancel_requested_at IS NULL",
            )
            .bind(now)
            .bind(reason)
            .bind(id)
            .execute(&mut *tx)
            .await
            .context("cancelling runs")?;
            if marked.rows_affected() == 1 {
                asked.push(id);
            }
        }
    }
    Ok((cancelled, asked))
}

/// Takes a webhook key (see the Postgres store); `None` when it was free or expired.
async fn take_key(
    tx: &mut SqliteConnection,
    hook: &str,
    kind: &str,
    key: &WebhookKey,
    run_ids: &[Uuid],
    now: DateTime<Utc>,
) -> Result<Option<Vec<Uuid>>, StoreError> {
    let key_text = stored_key(&key.key);
    let taken: Option<String> = sqlx::query_scalar(
        "INSERT INTO webhook_keys (hook, kind, key, run_ids, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (hook, kind, key) DO UPDATE
             SET run_ids = excluded.run_ids, created_at = excluded.created_at,
                 expires_at = excluded.expires_at
             WHERE webhook_keys.expires_at <= ?5
         RETURNING run_ids",
    )
    .bind(hook)
    .bind(kind)
    .bind(&key_text)
    .bind(ids_text(run_ids))
    .bind(now)
    .bind(now + key.hold)
    .fetch_optional(&mut *tx)
    .await
    .context("taking a webhook key")?;
    if taken.is_some() {
        return Ok(None);
    }
    let held: String = sqlx::query_scalar(
        "SELECT run_ids FROM webhook_keys WHERE hook = ? AND kind = ? AND key = ?",
    )
    .bind(hook)
    .bind(kind)
    .bind(&key_text)
    .fetch_one(&mut *tx)
    .await
    .context("reading a webhook key")?;
    Ok(Some(serde_json::from_str(&held).unwrap_or_default()))
}

/// A JSON list of run ids.
fn ids_text(ids: &[Uuid]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".into())
}

/// Inserts table-queue messages within `tx`.
async fn insert_messages(
    tx: &mut SqliteConnection,
    messages: &[(String, Vec<u8>)],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    // Many rows per statement: with SQLite in the process, a statement is the unit of work.
    for chunk in messages.chunks(LIST_CHUNK / 4) {
        let rows = vec!["(?, ?, ?, ?)"; chunk.len()].join(", ");
        let statement = format!(
            "INSERT INTO queue_messages (queue, body, visible_at, created_at) VALUES {rows}"
        );
        let mut insert = sqlx::query(&statement);
        for (queue, body) in chunk {
            insert = insert.bind(queue).bind(body).bind(now).bind(now);
        }
        insert
            .execute(&mut *tx)
            .await
            .context("publishing to the table queue")?;
    }
    Ok(())
}

/// Moves one message to the dead letters within `tx` (`reason`: `None` for one handed out too
/// often).
async fn dead_letter_in(
    tx: &mut SqliteConnection,
    id: i64,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT OR IGNORE INTO queue_dead_letters
             (id, queue, body, message_id, deliveries, reason, created_at, dead_at)
         SELECT id, queue, body, message_id, deliveries,
                COALESCE(?2, 'handed out ' || (deliveries - 1) || ' times without being acknowledged'),
                created_at, ?3
         FROM queue_messages WHERE id = ?1",
    )
    .bind(id)
    .bind(reason)
    .bind(now)
    .execute(&mut *tx)
    .await
    .context("dead-lettering messages")?;
    sqlx::query("DELETE FROM queue_messages WHERE id = ?")
        .bind(id)
        .execute(&mut *tx)
        .await
        .context("dead-lettering messages")?;
    Ok(())
}

/// An outbox batch: the write transaction that read it.
pub(super) struct Outbox {
    tx: WriteTx,
    store: SqliteStore,
}

impl Outbox {
    /// See [`OutboxBatch::settle`].
    pub(super) async fn settle(
        mut self,
        published: &[Uuid],
        dead: &[(Uuid, String)],
        messages: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let now = Utc::now();
        insert_messages(&mut self.tx, messages, now).await?;
        for chunk in published.chunks(LIST_CHUNK) {
            bind_all!(
                sqlx::query(&format!(
                    "UPDATE job_runs SET published_at = ? WHERE published_at IS NULL AND id IN ({})",
                    marks(chunk.len())
                ))
                .bind(now),
                chunk.iter()
            )
            .execute(&mut *self.tx)
            .await
            .context("marking runs published")?;
        }
        let ended = mark_dead_in(&mut self.tx, dead, now).await?;
        let chained = chain_in(&mut self.tx, &ended, now).await?;
        self.tx
            .commit()
            .await
            .context("committing published runs")?;
        if chained > 0 {
            self.store.tell("run");
        }
        Ok(())
    }
}

/// Notices what other connections and processes wrote: in-process notifications at once, and
/// other processes' writes by the file's change counter, which one task per process and file
/// reads every `queue.poll_interval` for every watcher (see [`changes`]).
pub(super) struct Watch {
    local: broadcast::Receiver<String>,
    changes: broadcast::Receiver<()>,
}

/// Other processes' writes to the file of `store`: one poll of its change counter per process
/// and file, shared by every watcher (the scheduler's and each consumer's), and idle while
/// nobody watches.
fn changes(store: &SqliteStore) -> broadcast::Receiver<()> {
    type Pollers = HashMap<PathBuf, (broadcast::Sender<()>, tokio::task::JoinHandle<()>)>;
    static POLLERS: OnceLock<Mutex<Pollers>> = OnceLock::new();
    let pollers = POLLERS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut pollers = pollers.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((sender, task)) = pollers.get(&store.path) {
        // A poller lives on the runtime that started it; one whose runtime ended is replaced.
        if !task.is_finished() {
            return sender.subscribe();
        }
    }
    let (sender, receiver) = broadcast::channel(16);
    let options = store.pool.connect_options();
    let (poll, watched) = (store.poll, sender.clone());
    let task = tokio::spawn(async move {
        let mut conn: Option<SqliteConnection> = None;
        let mut version: Option<i64> = None;
        loop {
            tokio::time::sleep(poll).await;
            if watched.receiver_count() == 0 {
                continue;
            }
            if conn.is_none() {
                conn = SqliteConnection::connect_with(&options).await.ok();
            }
            let Some(open) = conn.as_mut() else {
                continue;
            };
            match sqlx::query_scalar::<_, i64>("PRAGMA data_version")
                .fetch_one(open)
                .await
            {
                Ok(now) => {
                    if version.is_some_and(|before| before != now) {
                        let _ = watched.send(());
                    }
                    version = Some(now);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading the database's change counter failed; opening it again");
                    conn = None;
                }
            }
        }
    });
    pollers.insert(store.path.clone(), (sender, task));
    receiver
}

impl Watch {
    async fn new(store: &SqliteStore) -> Result<Watch, StoreError> {
        Ok(Watch {
            local: local_channel(&store.path).subscribe(),
            changes: changes(store),
        })
    }

    /// The next notification: an in-process one's payload, or `changed` for another
    /// process's write.
    pub(super) async fn next(&mut self) -> Result<String, StoreError> {
        loop {
            tokio::select! {
                received = self.local.recv() => match received {
                    Ok(payload) => return Ok(payload),
                    Err(broadcast::error::RecvError::Lagged(_)) => return Ok("run".into()),
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                },
                changed = self.changes.recv() => match changed {
                    Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => return Ok("changed".into()),
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                },
            }
        }
    }
}
