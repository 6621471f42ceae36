//! The Postgres store: connecting (creating the database on first use), migrations, and every
//! query, for installations on many hosts. Row locks (`FOR UPDATE SKIP LOCKED`) let schedulers
//! and workers on any number of hosts share the work; a worker's lease is an advisory lock held
//! by its session; notifications travel by LISTEN/NOTIFY.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};

use super::*;
use crate::config::DatabaseConfig;
use crate::jobfile::JobDefinition;

/// Plans each prepared statement once per connection. Every statement here is prepared once
/// and run many times with new values, and Postgres would plan the run path's statements anew
/// at each execution (it estimates their reusable plan higher): 1.6-2.9 ms of planning for a
/// claim that runs in 0.75 ms. A server without the setting (before Postgres 12) plans as it
/// does.
async fn prefer_generic_plans(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    if let Err(e) = conn
        .execute("SET plan_cache_mode = force_generic_plan")
        .await
    {
        tracing::debug!(error = %e, "the server does not take plan_cache_mode; planning as it does");
    }
    Ok(())
}

/// Embedded migrations: every subcommand that uses the database applies them on connect.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The channel scheduler processes listen on; the payload says what changed.
pub const NOTIFY_CHANNEL: &str = "jobschleuder";

/// The Postgres store; cheap to clone (a pool).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Set when the queue is the table queue in this database (see [`PublishOnInsert`]).
    inline: Option<Arc<PublishOnInsert>>,
}

impl PgStore {
    /// Publishes due runs into the table queue as they are created.
    pub(super) fn publish_on_insert(&mut self, inline: Arc<PublishOnInsert>) {
        self.inline = Some(inline);
    }

    /// Connects, creating the database if it does not exist yet, and applies the migrations.
    pub async fn connect(config: &DatabaseConfig) -> Result<PgStore, StoreError> {
        let target = config.describe();
        let options = config.connect_options().map_err(|e| StoreError::Connect {
            target: target.clone(),
            source: sqlx::Error::Configuration(e.to_string().into()),
        })?;
        let pool_options = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(|conn, _| Box::pin(prefer_generic_plans(conn)));
        // One plain connection first: it fails fast (the pool would retry until its timeout)
        // and tells a missing database from an unreachable server.
        match PgConnection::connect_with(&options).await {
            Ok(conn) => drop(conn),
            Err(error) if is_missing_database(&error) => {
                let database = options.get_database().unwrap_or("postgres").to_string();
                create_database(&options, &database)
                    .await
                    .map_err(|source| StoreError::Create {
                        database: database.clone(),
                        target: target.clone(),
                        source,
                    })?;
                tracing::info!(database = %database, "created the database");
            }
            Err(source) => return Err(StoreError::Connect { target, source }),
        }
        let pool =
            pool_options
                .connect_with(options)
                .await
                .map_err(|source| StoreError::Connect {
                    target: target.clone(),
                    source,
                })?;
        let store = PgStore { pool, inline: None };
        store.migrate(&target).await?;
        Ok(store)
    }

    /// Wraps an existing pool and applies the migrations.
    pub async fn from_pool(pool: PgPool) -> Result<PgStore, StoreError> {
        let store = PgStore { pool, inline: None };
        store.migrate("the given pool").await?;
        Ok(store)
    }

    async fn migrate(&self, target: &str) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|source| StoreError::Migrate {
                target: target.to_string(),
                source,
            })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
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
        let mut tx = self.pool.begin().await.context("starting the import")?;
        sqlx::query("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .context("locking the jobs table")?;
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

        tx.execute(
            "CREATE TEMP TABLE import_jobs (
                ord int, name text, job text, description text, preprocessing text,
                postprocessing text, arguments text, timeout_seconds float8, retries int4,
                queue text, schedule text, timezone text, misfire text, concurrency text,
                on_success text, on_failure text, jitter_seconds float8
             ) ON COMMIT DROP",
        )
        .await
        .context("preparing the import")?;
        let mut done = 0;
        for chunk in jobs.chunks(IMPORT_CHUNK) {
            stage_chunk(&mut tx, done, chunk).await?;
            done += chunk.len();
            progress(done, jobs.len());
        }
        for (statement, context) in IMPORT_STATEMENTS {
            tx.execute(*statement).await.context(context)?;
        }
        notify_on(&mut tx, "registry").await?;
        tx.commit().await.context("committing the import")?;
        Ok(summary)
    }

    /// All jobs, by id.
    pub async fn jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs j ORDER BY id"))
            .fetch_all(&self.pool)
            .await
            .context("reading jobs")
    }

    /// All registry entries with their job's name and description, by id.
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
        let mut tx = self.pool.begin().await.context("starting to pause")?;
        // Each key is a job's name, or else its id (a job may be named "4"), as everywhere.
        let entries: Vec<(i32, Option<String>, bool, i32)> = sqlx::query_as(
            "SELECT r.id, j.name, r.paused, j.id
             FROM registry r JOIN jobs j ON j.id = r.job
             WHERE $1::text[] IS NULL OR j.name = ANY($1) OR j.id::text = ANY($1)
             ORDER BY r.id
             FOR UPDATE OF r",
        )
        .bind(names)
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
        let ids: Vec<i32> = targets.iter().map(|t| t.0).collect();
        sqlx::query(
            "UPDATE registry SET paused = $2,
                    paused_note = CASE WHEN $2 THEN COALESCE($3, CASE WHEN paused THEN paused_note END) END,
                    paused_at = CASE WHEN $2 THEN COALESCE(CASE WHEN paused THEN paused_at END, now()) END
             WHERE id = ANY($1)",
        )
        .bind(&ids)
        .bind(paused)
        .bind(note)
        .execute(&mut *tx)
        .await
        .context("pausing registry entries")?;
        notify_on(&mut tx, "registry").await?;
        tx.commit().await.context("committing the pause")?;
        Ok(Ok(targets
            .into_iter()
            .map(|(_, name, was_paused)| PauseChange { name, was_paused })
            .collect()))
    }
}

/// The statements that turn the staged file (`import_jobs`) into the registry, in order.
const IMPORT_STATEMENTS: &[(&str, &str)] = &[
    (
        "ANALYZE import_jobs",
        "preparing the import",
    ),
    (
        // Jobs no longer in the file go, with their registry entry and schedule row (cascade).
        "DELETE FROM jobs j
         WHERE j.name IS NULL OR NOT EXISTS (SELECT 1 FROM import_jobs t WHERE t.name = j.name)",
        "removing jobs that are no longer in the file",
    ),
    (
        // Only rows that differ are written: an unchanged job costs nothing.
        "UPDATE jobs j
         SET job = t.job, description = t.description, preprocessing = t.preprocessing,
             postprocessing = t.postprocessing, arguments = t.arguments::json,
             timeout_seconds = t.timeout_seconds, retries = t.retries, queue = t.queue,
             concurrency = t.concurrency, on_success = t.on_success::jsonb,
             on_failure = t.on_failure::jsonb, jitter_seconds = t.jitter_seconds
         FROM import_jobs t
         WHERE j.name = t.name
           AND (j.job, j.description, j.preprocessing, j.postprocessing, j.arguments::text,
                j.timeout_seconds, j.retries, j.queue, j.concurrency, j.on_success,
                j.on_failure, j.jitter_seconds)
               IS DISTINCT FROM
               (t.job, t.description, t.preprocessing, t.postprocessing, t.arguments,
                t.timeout_seconds, t.retries, t.queue, t.concurrency, t.on_success::jsonb,
                t.on_failure::jsonb, t.jitter_seconds)",
        "updating jobs",
    ),
    (
        "INSERT INTO jobs (name, job, description, preprocessing, postprocessing, arguments,
                           timeout_seconds, retries, queue, concurrency, on_success, on_failure,
                           jitter_seconds)
         SELECT t.name, t.job, t.description, t.preprocessing, t.postprocessing, t.arguments::json,
                t.timeout_seconds, t.retries, t.queue, t.concurrency, t.on_success::jsonb,
                t.on_failure::jsonb, t.jitter_seconds
         FROM import_jobs t
         WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.name = t.name)
         ORDER BY t.ord",
        "inserting jobs",
    ),
    (
        // One registry entry per job (a database of the original may have several); none for
        // a job that has no schedule now.
        "DELETE FROM registry r
         USING jobs j, import_jobs t
         WHERE r.job = j.id AND j.name = t.name
           AND (t.schedule IS NULL
                OR EXISTS (SELECT 1 FROM registry r2 WHERE r2.job = r.job AND r2.id < r.id))",
        "removing registry entries",
    ),
    (
        // A changed schedule or zone gets a new next run (the scheduler computes it from now).
        "DELETE FROM schedule s
         USING registry r, jobs j, import_jobs t
         WHERE s.job = r.id AND r.job = j.id AND j.name = t.name
           AND (r.schedule, r.timezone) IS DISTINCT FROM (t.schedule, t.timezone)",
        "removing the schedule of changed entries",
    ),
    (
        "UPDATE registry r
         SET schedule = t.schedule, timezone = t.timezone, misfire = t.misfire
         FROM jobs j, import_jobs t
         WHERE r.job = j.id AND j.name = t.name
           AND (r.schedule, r.timezone, r.misfire) IS DISTINCT FROM (t.schedule, t.timezone, t.misfire)",
        "updating registry entries",
    ),
    (
        "INSERT INTO registry (job, schedule, timezone, misfire)
         SELECT j.id, t.schedule, t.timezone, t.misfire
         FROM import_jobs t JOIN jobs j ON j.name = t.name
         WHERE t.schedule IS NOT NULL AND NOT EXISTS (SELECT 1 FROM registry r WHERE r.job = j.id)
         ORDER BY t.ord",
        "inserting registry entries",
    ),
];

/// Copies a chunk of the job file into the import's staging table.
async fn stage_chunk(
    tx: &mut PgConnection,
    offset: usize,
    chunk: &[JobDefinition],
) -> Result<(), StoreError> {
    let ord: Vec<i32> = (0..chunk.len())
        .map(|i| i32::try_from(offset + i).unwrap_or(i32::MAX))
        .collect();
    let names: Vec<&str> = chunk.iter().map(|j| j.name.as_str()).collect();
    let job: Vec<&str> = chunk.iter().map(|j| j.job.as_str()).collect();
    let description: Vec<Option<&str>> = chunk.iter().map(|j| j.description.as_deref()).collect();
    let pre: Vec<Option<&str>> = chunk.iter().map(|j| j.preprocessing.as_deref()).collect();
    let post: Vec<Option<&str>> = chunk.iter().map(|j| j.postprocessing.as_deref()).collect();
    let arguments: Vec<String> = chunk
        .iter()
        .map(|j| serde_json::Value::Object(j.arguments.clone()).to_string())
        .collect();
    let timeout: Vec<Option<f64>> = chunk
        .iter()
        .map(|j| j.timeout.map(|t| t.as_secs_f64()))
        .collect();
    let retries: Vec<i32> = chunk
        .iter()
        .map(|j| i32::try_from(j.retries).unwrap_or(i32::MAX))
        .collect();
    let queue: Vec<Option<&str>> = chunk.iter().map(|j| j.queue.as_deref()).collect();
    let schedules: Vec<Option<&str>> = chunk
        .iter()
        .map(|j| j.schedule.as_ref().map(|s| s.expression()))
        .collect();
    let zones: Vec<Option<String>> = chunk
        .iter()
        .map(|j| j.timezone.map(|t| t.name().to_string()))
        .collect();
    let misfire: Vec<&str> = chunk.iter().map(|j| j.misfire.as_str()).collect();
    let concurrency: Vec<&str> = chunk.iter().map(|j| j.concurrency.as_str()).collect();
    let names_json = |names: &Vec<String>| {
        (!names.is_empty()).then(|| serde_json::Value::from(names.clone()).to_string())
    };
    let on_success: Vec<Option<String>> = chunk.iter().map(|j| names_json(&j.on_success)).collect();
    let on_failure: Vec<Option<String>> = chunk.iter().map(|j| names_json(&j.on_failure)).collect();
    let jitter: Vec<Option<f64>> = chunk
        .iter()
        .map(|j| j.jitter.map(|t| t.as_secs_f64()))
        .collect();
    sqlx::query(
        "INSERT INTO import_jobs
         SELECT * FROM UNNEST($1::int4[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                              $7::text[], $8::float8[], $9::int4[], $10::text[], $11::text[],
                              $12::text[], $13::text[], $14::text[], $15::text[], $16::text[],
                              $17::float8[])",
    )
    .bind(&ord)
    .bind(&names)
    .bind(&job)
    .bind(&description)
    .bind(&pre)
    .bind(&post)
    .bind(&arguments)
    .bind(&timeout)
    .bind(&retries)
    .bind(&queue)
    .bind(&schedules)
    .bind(&zones)
    .bind(&misfire)
    .bind(&concurrency)
    .bind(&on_success)
    .bind(&on_failure)
    .bind(&jitter)
    .execute(&mut *tx)
    .await
    .context("staging the job file")?;
    Ok(())
}

/// Notifies listening schedulers on `conn` (within a transaction: at its commit).
async fn notify_on(conn: &mut PgConnection, what: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(what)
        .execute(conn)
        .await
        .context("notifying schedulers")?;
    Ok(())
}

/// A connection holding the lease `token`, or `None` while another session still holds it
/// (this worker's own previous session, until the server has ended it).
async fn lease_connection(
    options: &sqlx::postgres::PgConnectOptions,
    token: i32,
) -> Result<Option<PgConnection>, StoreError> {
    let mut conn = PgConnection::connect_with(options)
        .await
        .context("opening the worker lease connection")?;
    // If the worker's host dies without closing the connection, the server notices within
    // about half a minute (not the system default of two hours) and the lease ends.
    for setting in [
        "SET tcp_keepalives_idle = 10",
        "SET tcp_keepalives_interval = 5",
        "SET tcp_keepalives_count = 3",
    ] {
        sqlx::query(setting)
            .execute(&mut conn)
            .await
            .context("setting keepalives on the worker lease connection")?;
    }
    // Never waits for the lock: a lease keeper blocked here could never notice anything else.
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(LEASE_CLASS)
        .bind(token)
        .fetch_one(&mut conn)
        .await
        .context("taking the worker lease")?;
    Ok(taken.then_some(conn))
}

/// Whether the session of `conn` holds the lease `token`.
async fn holds_lease(conn: &mut PgConnection, token: i32) -> Result<bool, StoreError> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks
                        WHERE pid = pg_backend_pid() AND locktype = 'advisory' AND granted
                          AND classid = $1::oid AND objid = $2::oid AND objsubid = 2)",
    )
    .bind(LEASE_CLASS)
    .bind(token)
    .fetch_one(conn)
    .await
    .context("checking the worker lease")
}

fn is_missing_database(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

async fn create_database(
    options: &sqlx::postgres::PgConnectOptions,
    database: &str,
) -> Result<(), sqlx::Error> {
    let maintenance = options.clone().database("postgres");
    let mut conn = PgConnection::connect_with(&maintenance).await?;
    let quoted = format!("\"{}\"", database.replace('"', "\"\""));
    match conn
        .execute(format!("CREATE DATABASE {quoted}").as_str())
        .await
    {
        Ok(_) => Ok(()),
        // Another process created it meanwhile.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => Ok(()),
        Err(e) => Err(e),
    }
}

// ---- scheduling ----

/// The database's clock: the one clock every host's due checks and retry times use, so hosts
/// with skewed clocks still fire each slot once and on time.
async fn db_now(conn: &mut PgConnection) -> Result<DateTime<Utc>, StoreError> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(conn)
        .await
        .context("reading the database's clock")
}

/// The transaction that holds an outbox batch's rows (`FOR UPDATE SKIP LOCKED`).
pub(super) struct Outbox {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    /// The store's [`PublishOnInsert`], for runs chained to runs recorded dead here.
    inline: Option<Arc<PublishOnInsert>>,
}

impl Outbox {
    /// See [`OutboxBatch::settle`].
    pub(super) async fn settle(
        mut self,
        published: &[Uuid],
        dead: &[(Uuid, String)],
        messages: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        if !messages.is_empty() {
            insert_messages(&mut self.tx, messages).await?;
        }
        if !published.is_empty() {
            // When the broker's confirms were in, not when this transaction began (`now()`):
            // publishing a batch takes the confirms' time, and firing lag is read from here.
            sqlx::query("UPDATE job_runs SET published_at = statement_timestamp() WHERE id = ANY($1) AND published_at IS NULL")
                .bind(published)
                .execute(&mut *self.tx)
                .await
                .context("marking runs published")?;
        }
        if !dead.is_empty() {
            let ids: Vec<Uuid> = dead.iter().map(|d| d.0).collect();
            let errors: Vec<String> = dead.iter().map(|d| text_without_nul(&d.1)).collect();
            let ended: Vec<EndedRun> = sqlx::query_as(&format!(
                "UPDATE job_runs r SET status = 'dead', error = u.error, finished_at = now()
                 FROM UNNEST($1::uuid[], $2::text[]) AS u(id, error)
                 WHERE r.id = u.id AND r.status = 'queued'
                 RETURNING {ENDED}"
            ))
            .bind(&ids)
            .bind(&errors)
            .fetch_all(&mut *self.tx)
            .await
            .context("recording unpublishable runs dead")?;
            if chain_in(&mut self.tx, &ended, self.inline.clone()).await? > 0 {
                notify_on(&mut self.tx, "run").await?;
            }
        }
        self.tx.commit().await.context("committing published runs")
    }
}

const JOB_COLUMNS: &str = "id, name, job, description, preprocessing, postprocessing, arguments,
    timeout_seconds, retries, queue, concurrency, on_success, on_failure, jitter_seconds,
    COALESCE((SELECT bool_or(r.paused) FROM registry r WHERE r.job = j.id), false) AS paused,
    (SELECT max(r.paused_note) FROM registry r WHERE r.job = j.id) AS paused_note";

const RUN_COLUMNS: &str = "id, job_name, job, trigger, status, attempt, max_retries, worker, queue, arguments,
    scheduled_for, not_before, created_at, published_at, started_at, finished_at, result, error, parent_id";

/// The next notification on [`NOTIFY_CHANNEL`].
pub(super) async fn next_notification(
    listener: &mut sqlx::postgres::PgListener,
) -> Result<String, StoreError> {
    listener
        .recv()
        .await
        .map(|n| n.payload().to_string())
        .context("waiting for notifications")
}

/// How long claims written together with results wait for a row lock before their
/// transaction gives up (see `Store::finish_and_claim_runs`).
pub const CLAIM_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// SQL condition that a run is open: queued or running, exactly the runs whose `finished_at`
/// is NULL. Every lookup of open runs that is not by id says it, so that it reads the index
/// of open runs (`job_runs_open_idx`). No index reads a column that publishing or claiming a
/// run changes (`status`, `published_at`, `claim_token`, `claim_nonce`, `attempt`, `worker`,
/// `started_at`), so both are heap-only (HOT) updates.
const OPEN: &str = "finished_at IS NULL";

/// First key of worker leases (`pg_advisory_lock(LEASE_CLASS, token)`).
const LEASE_CLASS: i32 = 0x6a73_776b; // "jswk"

/// SQL condition on `r` (a job_runs row) that no live worker holds the lease it was claimed
/// under; `$1` is `LEASE_CLASS`.
const LEASE_GONE: &str = "NOT EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = $1::oid AND l.objid = r.claim_token::oid AND l.objsubid = 2)";

/// Lock that serializes writers of the `schedule` table (init and filling in new entries).
const SCHEDULE_LOCK: i64 = 0x6a6f_6273_6368_6564; // "jobsched"

impl PgStore {
    /// The database's clock.
    pub async fn now(&self) -> Result<DateTime<Utc>, StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .context("reading the database's clock")?;
        db_now(&mut conn).await
    }

    /// Listens for notifications (what schedulers wake up on).
    pub async fn notifications(&self) -> Result<Notifications, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool)
            .await
            .context("connecting to listen for notifications")?;
        listener
            .listen(NOTIFY_CHANNEL)
            .await
            .context("listening for notifications")?;
        Ok(Notifications {
            inner: NotificationsInner::Postgres(listener),
        })
    }

    /// Sends a notification to listening schedulers (`registry` or `run`).
    pub async fn notify(&self, what: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.context("notifying schedulers")?;
        notify_on(&mut conn, what).await
    }

    /// Replaces the whole schedule: each registry entry's next run, from `next(entry, now)`
    /// with the database's clock as `now`. Returns (entries scheduled, entries without a next
    /// run).
    pub async fn replace_schedule(
        &self,
        next: &NextRun<'_>,
    ) -> Result<(usize, Vec<EntrySchedule>), StoreError> {
        self.write_schedule(true, next).await
    }

    /// Adds schedule rows for registry entries that have none (new after an import).
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
        let mut tx = self
            .pool
            .begin()
            .await
            .context("starting a schedule update")?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEDULE_LOCK)
            .execute(&mut *tx)
            .await
            .context("locking the schedule")?;
        if replace {
            tx.execute("DELETE FROM schedule")
                .await
                .context("clearing the schedule")?;
        }
        let now = db_now(&mut tx).await?;
        let entries: Vec<EntrySchedule> = sqlx::query_as(
            "SELECT r.id AS registry_id, r.schedule, r.timezone FROM registry r
             WHERE NOT EXISTS (SELECT 1 FROM schedule s WHERE s.job = r.id)
             ORDER BY r.id",
        )
        .fetch_all(&mut *tx)
        .await
        .context("reading unscheduled registry entries")?;
        let mut ids = Vec::with_capacity(entries.len());
        let mut times = Vec::with_capacity(entries.len());
        let mut unschedulable = Vec::new();
        for entry in entries {
            match next(&entry, now) {
                Some(time) => {
                    ids.push(entry.registry_id);
                    times.push(time);
                }
                None => unschedulable.push(entry),
            }
        }
        if !ids.is_empty() {
            sqlx::query("INSERT INTO schedule (job, next_run) SELECT * FROM UNNEST($1::int4[], $2::timestamptz[])")
                .bind(&ids)
                .bind(&times)
                .execute(&mut *tx)
                .await
                .context("writing the schedule")?;
        }
        tx.commit().await.context("committing the schedule")?;
        Ok((ids.len(), unschedulable))
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
        let mut tx = self
            .pool
            .begin()
            .await
            .context("starting a scheduling pass")?;
        let now = match at {
            Some(at) => at,
            None => db_now(&mut tx).await?,
        };
        let due: Vec<DueEntry> = sqlx::query_as(
            "SELECT s.id AS schedule_id, r.id AS registry_id, s.next_run, r.schedule, r.timezone, r.misfire,
                    j.id AS job_id, COALESCE(j.name, j.id::text) AS job_name, j.job, j.arguments,
                    j.preprocessing, j.postprocessing, j.timeout_seconds, j.retries, j.queue,
                    j.concurrency, j.jitter_seconds
             FROM schedule s
             JOIN registry r ON r.id = s.job
             JOIN jobs j ON j.id = r.job
             WHERE s.next_run <= $1 AND NOT r.paused
             ORDER BY s.next_run
             LIMIT $2
             FOR UPDATE OF s SKIP LOCKED",
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
        // Runs still queued or running of jobs that do not allow overlapping runs.
        let guarded: Vec<&str> = due
            .iter()
            .zip(&decisions)
            .filter(|(entry, decision)| decision.run_for.is_some() && entry.concurrency != "allow")
            .map(|(entry, _)| entry.job_name.as_str())
            .collect();
        let live: Vec<LiveRun> = if guarded.is_empty() {
            Vec::new()
        } else {
            // Through the index of open runs, so that no index of its own is kept up to date
            // on every run for this lookup (one was: it cost a third of the throughput).
            sqlx::query_as(&format!(
                "SELECT id, job_name, status, scheduled_for, parent_id, trigger FROM job_runs
                 WHERE {OPEN} AND status IN ('queued', 'running')
                   AND job_name = ANY($1) AND trigger <> 'backfill'
                 ORDER BY created_at, id",
            ))
            .bind(&guarded)
            .fetch_all(&mut *tx)
            .await
            .context("looking for runs still going")?
        };
        let mut runs = RunColumns::publishing(self.inline.clone());
        let mut replaced: Vec<Uuid> = Vec::new();
        let mut advance_ids = Vec::new();
        let mut advance_to = Vec::new();
        let mut finished_ids = Vec::new();
        for (entry, decision) in due.iter().zip(decisions) {
            if let Some(run_for) = decision.run_for {
                // The slot's own run (created before) is not another run of the job.
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
                        // A fan-out child is cancelled through its parent (cancels lock a
                        // run before its children, always in that order).
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
                runs.push(
                    &NewRun {
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
                runs.set_last(decision.starts_at.filter(|t| *t > run_for), skipped);
            }
            match decision.next_run {
                Some(next) => {
                    advance_ids.push(entry.schedule_id);
                    advance_to.push(next);
                }
                None => finished_ids.push(entry.schedule_id),
            }
        }
        if !replaced.is_empty() {
            cancel_in(
                &mut tx,
                &replaced,
                "cancelled: replaced by a newer run of its job (concurrency: replace)",
            )
            .await?;
        }
        let created = if runs.ids.is_empty() {
            Vec::new()
        } else {
            runs.insert(&mut tx).await?
        };
        if !advance_ids.is_empty() {
            sqlx::query(
                "UPDATE schedule s SET next_run = u.next_run
                 FROM UNNEST($1::int4[], $2::timestamptz[]) AS u(id, next_run) WHERE s.id = u.id",
            )
            .bind(&advance_ids)
            .bind(&advance_to)
            .execute(&mut *tx)
            .await
            .context("advancing the schedule")?;
        }
        if !finished_ids.is_empty() {
            sqlx::query("DELETE FROM schedule WHERE id = ANY($1)")
                .bind(&finished_ids)
                .execute(&mut *tx)
                .await
                .context("removing finished schedule rows")?;
        }
        tx.commit().await.context("committing a scheduling pass")?;
        Ok((due.len(), created))
    }

    /// Inserts runs (manual, webhook, fan-out children, bare messages); returns their ids in
    /// order. Schedulers are notified so that they publish them.
    pub async fn insert_runs(&self, runs: &[NewRun]) -> Result<Vec<Uuid>, StoreError> {
        Ok(self
            .insert_runs_reporting(runs)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// [`Store::insert_runs`], saying per run whether this call created it (`false`: a run
    /// with its id existed already).
    pub async fn insert_runs_reporting(
        &self,
        runs: &[NewRun],
    ) -> Result<Vec<(Uuid, bool)>, StoreError> {
        let mut columns = RunColumns::publishing(self.inline.clone());
        for run in runs {
            columns.push(run, None);
        }
        let mut tx = self.pool.begin().await.context("starting to insert runs")?;
        let created: HashSet<Uuid> = columns
            .insert(&mut tx)
            .await?
            .into_iter()
            .map(|run| run.id)
            .collect();
        notify_on(&mut tx, "run").await?;
        tx.commit().await.context("committing new runs")?;
        Ok(columns
            .ids
            .into_iter()
            .map(|id| (id, created.contains(&id)))
            .collect())
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
        let mut tx = self.pool.begin().await.context("starting to insert runs")?;
        let cancelled: Option<bool> = sqlx::query_scalar(
            "SELECT cancel_requested_at IS NOT NULL OR status = 'cancelled'
             FROM job_runs WHERE id = $1 FOR SHARE",
        )
        .bind(parent)
        .fetch_optional(&mut *tx)
        .await
        .context("reading the parent run")?;
        if cancelled == Some(true) {
            tx.rollback().await.context("ending an insert")?;
            return Ok(None);
        }
        let mut columns = RunColumns::publishing(self.inline.clone());
        for run in runs {
            columns.push(run, None);
        }
        columns.insert(&mut tx).await?;
        notify_on(&mut tx, "run").await?;
        tx.commit().await.context("committing new runs")?;
        Ok(Some(columns.ids))
    }

    /// Locks up to `limit` queued, unpublished runs whose time has come (only those in `only`
    /// when given), for publishing. Runs another publisher holds are skipped.
    pub async fn outbox(
        &self,
        limit: u32,
        only: Option<&[Uuid]>,
    ) -> Result<OutboxBatch, StoreError> {
        let mut tx = self.pool.begin().await.context("starting to publish")?;
        // Two statements, not one with `$2 IS NULL OR`: plans are generic (see
        // `prefer_generic_plans`), and a generic plan could not look the given runs up by id.
        let only_these = if only.is_some() {
            "AND id = ANY($2)"
        } else {
            ""
        };
        let sql = format!(
            "SELECT id, job_name, job, arguments, preprocessing, postprocessing, timeout_seconds, max_retries,
                    attempt, queue
             FROM job_runs
             WHERE {OPEN} AND status = 'queued' AND published_at IS NULL
               AND (not_before IS NULL OR not_before <= now())
               {only_these}
             ORDER BY created_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED"
        );
        let query = sqlx::query_as(&sql).bind(i64::from(limit));
        let query = match only {
            Some(ids) => query.bind(ids),
            None => query,
        };
        let runs: Vec<OutboxRun> = query
            .fetch_all(&mut *tx)
            .await
            .context("reading runs to publish")?;
        Ok(OutboxBatch {
            runs,
            inner: OutboxInner::Postgres(Outbox {
                tx,
                inline: self.inline.clone(),
            }),
        })
    }

    /// When the scheduler must look next (see [`Wakeup`]).
    pub async fn next_wakeup(&self) -> Result<Wakeup, StoreError> {
        // The open runs in one reading of their index: no index tells their states apart
        // (see `OPEN`).
        sqlx::query_as(&format!(
            "SELECT (SELECT s.next_run FROM schedule s JOIN registry r ON r.id = s.job
                     WHERE NOT r.paused ORDER BY s.next_run LIMIT 1) AS next_run,
                    open.next_publish, open.oldest_unclaimed, open.any_running, now() AS now
             FROM (SELECT min(COALESCE(not_before, created_at))
                              FILTER (WHERE status = 'queued' AND published_at IS NULL) AS next_publish,
                          min(published_at)
                              FILTER (WHERE status = 'queued' AND published_at IS NOT NULL) AS oldest_unclaimed,
                          COALESCE(bool_or(status = 'running'), false) AS any_running
                   FROM job_runs WHERE {OPEN}) open",
        ))
        .fetch_one(&self.pool)
        .await
        .context("finding the next wake-up")
    }

    /// Whether registry entries lack a schedule row (a new import).
    pub async fn has_unscheduled_entries(&self) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM registry r WHERE NOT EXISTS (SELECT 1 FROM schedule s WHERE s.job = r.id))",
        )
        .fetch_one(&self.pool)
        .await
        .context("looking for unscheduled registry entries")
    }

    /// The schedule with its jobs; only rows due by `due_by` when given.
    pub async fn scheduled(
        &self,
        due_by: Option<DateTime<Utc>>,
    ) -> Result<Vec<ScheduledRow>, StoreError> {
        // Without `$1 IS NULL OR`, for the generic plan's sake (see `outbox`).
        let due = if due_by.is_some() {
            "WHERE s.next_run <= $1"
        } else {
            ""
        };
        let query = format!(
            "SELECT r.id AS registry_id, j.id AS job_id, COALESCE(j.name, j.id::text) AS job_name, j.job,
                    r.schedule, r.timezone, s.next_run, j.jitter_seconds, r.paused, r.paused_note
             FROM schedule s JOIN registry r ON r.id = s.job JOIN jobs j ON j.id = r.job
             {due}
             ORDER BY s.next_run, r.id"
        );
        let query = sqlx::query_as(&query);
        let query = match due_by {
            Some(due_by) => query.bind(due_by),
            None => query,
        };
        query
            .fetch_all(&self.pool)
            .await
            .context("reading the schedule")
    }

    /// A job by id (digits) or by name.
    pub async fn find_job(&self, key: &str) -> Result<Option<JobRow>, StoreError> {
        // A name wins over an id: a job may be named "4".
        sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs j WHERE name = $1 OR id = $2 ORDER BY name = $1 DESC LIMIT 1"
        ))
        .bind(key)
        .bind(key.parse::<i32>().ok())
        .fetch_optional(&self.pool)
        .await
        .context("looking up a job")
    }

    // ---- the worker's side ----

    /// Takes a lease for a worker process: a fresh random token locked on a dedicated
    /// connection, checked every few seconds and taken again if the connection was lost.
    pub async fn worker_lease(&self) -> Result<WorkerLease, StoreError> {
        let token = i32::try_from(Uuid::new_v4().as_u128() % (i32::MAX as u128))
            .unwrap_or(1)
            .max(1);
        let options = self.pool.connect_options().as_ref().clone();
        let first = lease_connection(&options, token).await?;
        let Some(first) = first else {
            return Err(StoreError::Query {
                context: "taking the worker lease",
                source: sqlx::Error::Protocol(format!("lease token {token} is in use; try again")),
            });
        };
        let (set_held, held) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            let mut conn = Some(first);
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                // Bounded: after a network partition the probe could otherwise wait minutes for
                // TCP, while the server has ended the session (and the lease) long ago. It asks
                // for the lock itself, not only whether the session answers.
                let held_now = match conn.as_mut() {
                    Some(c) => matches!(
                        tokio::time::timeout(Duration::from_secs(5), holds_lease(c, token)).await,
                        Ok(Ok(true))
                    ),
                    None => false,
                };
                if held_now {
                    continue;
                }
                // The old session goes first: while it lives, it may hold the very lock the
                // new one asks for.
                drop(conn.take());
                let _ = set_held.send(false);
                tracing::warn!("lost the worker lease connection; claiming nothing until the lease is taken again");
                let mut attempts = 0u32;
                loop {
                    attempts += 1;
                    let taken = tokio::time::timeout(
                        Duration::from_secs(10),
                        lease_connection(&options, token),
                    )
                    .await;
                    match taken {
                        Ok(Ok(Some(new))) => {
                            conn = Some(new);
                            let _ = set_held.send(true);
                            tracing::info!("worker lease taken again");
                            break;
                        }
                        Ok(Ok(None)) if attempts == 1 => tracing::warn!("the worker lease is still held by its old session; waiting for the server to end it"),
                        Ok(Ok(None)) => tracing::debug!("the worker lease is still held elsewhere"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "cannot take the worker lease yet"),
                        Err(_) => tracing::warn!("taking the worker lease timed out"),
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        Ok(WorkerLease { token, held, task })
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
        let mut conn = self.pool.acquire().await.context("claiming runs")?;
        claim_in(&mut conn, worker, token, nonce, claims).await
    }

    /// Records how runs ended, in one statement. A retry goes back to the outbox with its
    /// not-before time, and schedulers are told. A result is recorded only for the claim it
    /// belongs to (same lease token and attempt); returns the ids of runs whose result was not
    /// recorded because the run was taken over meanwhile (or already ended).
    ///
    /// Retrying this after a lost reply is harmless: a result recorded the first time no
    /// longer matches a running claim.
    pub async fn finish_runs(&self, finishes: &[Finish]) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self.pool.begin().await.context("starting to record runs")?;
        let not_recorded = finish_in(&mut tx, finishes, self.inline.clone()).await?;
        tx.commit().await.context("committing finished runs")?;
        Ok(not_recorded)
    }

    /// A store for a worker's writer (its claims and results), with a pool of its own: two
    /// connections, kept open and readied (`warm_up_writes`) as soon as they are made. A
    /// burst's writes then wait neither for a connection to be made nor for a new server
    /// process to read the tables, as they did with the shared pool (whose connections close
    /// after ten idle minutes): the first two batches of a burst took 5-7 ms each, the
    /// following ones under 1 ms. Two, because a connection goes back to its pool
    /// asynchronously, and a large batch is written in two transactions at once.
    pub fn for_writes(&self) -> PgStore {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .min_connections(2)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    prefer_generic_plans(conn).await?;
                    warm_up_writes(conn).await;
                    Ok(())
                })
            })
            .connect_lazy_with((*self.pool.connect_options()).clone());
        // Both made now, in the background (held at once, so that there are two).
        let opening = pool.clone();
        tokio::spawn(async move {
            let (one, two) = tokio::join!(opening.acquire(), opening.acquire());
            if let Err(e) = one.and(two) {
                tracing::debug!(error = %e, "opening the writer's connections failed; they open on first use");
            }
        });
        PgStore {
            pool,
            inline: self.inline.clone(),
        }
    }

    /// A store for a scheduler's passes, with a pool of its own of two connections: a pass
    /// creates runs on one while it publishes on the other. A pool hands its idle connections
    /// out in turn, and a connection prepares and plans a statement on its first use of it:
    /// over the shared pool, a pass's statements ran on connections that had not run them yet
    /// for the first passes after a start (about 0.6 ms to parse and as much to bind each).
    /// Opened on first use, with the shared pool's lifetimes: a replaced connection plans from
    /// the statistics of its time.
    pub fn for_passes(&self) -> PgStore {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(|conn, _| Box::pin(prefer_generic_plans(conn)))
            .connect_lazy_with((*self.pool.connect_options()).clone());
        PgStore {
            pool,
            inline: self.inline.clone(),
        }
    }

    /// `finish_runs` and `claim_runs` together, in one statement that commits on its own:
    /// one round trip to the database, where a transaction takes four, and a burst's slots
    /// wait for each. It records the results that end a run (not a retry) of a job that
    /// chains nothing; retries and results whose job chains another need statements after
    /// the update (the chained runs are created in the same transaction, schedulers are
    /// told), so they are left for `finish_runs` (`Together::left`), as are results whose run
    /// it did not find running under their claim.
    pub async fn finish_and_claim_runs(
        &self,
        finishes: &[Finish],
        worker: &str,
        token: i32,
        nonce: Uuid,
        claims: &[(Uuid, bool)],
    ) -> Result<Together, StoreError> {
        let (plain, retries): (Vec<&Finish>, Vec<&Finish>) = finishes
            .iter()
            .partition(|f| !matches!(f.end, RunEnd::Retry(_)));
        if plain.is_empty() && claims.is_empty() {
            return Ok(Together {
                not_recorded: Vec::new(),
                claims: Vec::new(),
                left: finishes.to_vec(),
            });
        }
        let ids: Vec<Uuid> = claims.iter().map(|c| c.0).collect();
        let redelivered: Vec<bool> = claims.iter().map(|c| c.1).collect();
        let columns = FinishColumns::of(plain.iter().copied());
        let sql = together_sql();
        let rows: Vec<TogetherRow> = columns
            .bind(
                sqlx::query_as(&sql)
                    .bind(LEASE_CLASS)
                    .bind(&ids)
                    .bind(&redelivered)
                    .bind(worker)
                    .bind(token)
                    .bind(nonce),
            )
            .bind(CLAIM_LOCK_WAIT.as_millis().to_string())
            .fetch_all(&self.pool)
            .await
            .context("recording and claiming runs")?;
        let mut ended = HashSet::new();
        let mut answers = Vec::with_capacity(ids.len());
        for (claim, id, attempt, status, trigger, held, scheduled_for, parent, timezone) in rows {
            if claim {
                let held = held.unwrap_or(false);
                answers.push((
                    id,
                    attempt,
                    status,
                    trigger,
                    held,
                    scheduled_for,
                    parent,
                    timezone,
                ));
            } else {
                ended.insert(id);
            }
        }
        Ok(Together {
            not_recorded: Vec::new(),
            claims: claims_of(&ids, answers),
            left: retries
                .into_iter()
                .chain(plain.into_iter().filter(|f| !ended.contains(&f.id)))
                .cloned()
                .collect(),
        })
    }

    /// Running runs whose worker's lease is gone (the worker died, or its host did), as
    /// (run, claim token, attempt): a suspect is one claim, not a run id that may have been
    /// claimed again meanwhile.
    pub async fn orphaned_runs(&self) -> Result<Vec<ClaimKey>, StoreError> {
        sqlx::query_as(&format!(
            "SELECT r.id, r.claim_token, r.attempt FROM job_runs r
             WHERE r.{OPEN} AND r.status = 'running' AND r.claim_token IS NOT NULL AND {LEASE_GONE}"
        ))
        .bind(LEASE_CLASS)
        .fetch_all(&self.pool)
        .await
        .context("looking for runs whose worker is gone")
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
        let ids: Vec<Uuid> = suspects.iter().map(|s| s.0).collect();
        let tokens: Vec<i32> = suspects.iter().map(|s| s.1).collect();
        let attempts: Vec<i32> = suspects.iter().map(|s| s.2).collect();
        let mut tx = self
            .pool
            .begin()
            .await
            .context("starting to queue orphaned runs again")?;
        let handled: Vec<OrphanRow> = sqlx::query_as(&format!(
            "UPDATE job_runs r
             SET status = CASE WHEN r.cancel_requested_at IS NOT NULL THEN 'cancelled'
                               WHEN r.attempt >= r.max_retries + $5 THEN 'dead' ELSE 'queued' END,
                 finished_at = CASE WHEN r.cancel_requested_at IS NOT NULL
                                      OR r.attempt >= r.max_retries + $5 THEN now() END,
                 published_at = NULL,
                 not_before = CASE WHEN r.cancel_requested_at IS NOT NULL
                                     OR r.attempt >= r.max_retries + $5 THEN r.not_before END,
                 error = CASE WHEN r.cancel_requested_at IS NOT NULL
                              THEN COALESCE(r.cancel_reason, 'cancelled') || ' (its worker vanished while running it)'
                              WHEN r.attempt >= r.max_retries + $5
                              THEN 'its worker vanished while running it, ' || r.attempt || ' times: given up'
                              ELSE 'its worker vanished while running it; queued again' END
             FROM UNNEST($2::uuid[], $3::int4[], $4::int4[]) AS u(id, token, attempt)
             WHERE r.id = u.id AND r.claim_token = u.token AND r.attempt = u.attempt
               AND r.status = 'running' AND {LEASE_GONE}
             RETURNING r.attempt, {ENDED}"
        ))
        .bind(LEASE_CLASS)
        .bind(&ids)
        .bind(&tokens)
        .bind(&attempts)
        .bind(i32::try_from(crash_limit).unwrap_or(i32::MAX))
        .fetch_all(&mut *tx)
        .await
        .context("queueing orphaned runs again")?;
        let ended: Vec<EndedRun> = handled.iter().map(|o| o.ended.clone()).collect();
        chain_in(&mut tx, &ended, self.inline.clone()).await?;
        notify_on(&mut tx, "run").await?;
        tx.commit().await.context("committing orphaned runs")?;
        Ok(handled
            .into_iter()
            .map(|o| (o.ended.id, o.attempt, o.ended.status))
            .collect())
    }

    /// The queues (`default_queue` for runs without one) that hold runs published `after` ago
    /// or longer and still queued.
    pub async fn stale_queues(
        &self,
        after: Duration,
        default_queue: &str,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(&format!(
            "SELECT DISTINCT COALESCE(queue, $2) FROM job_runs
             WHERE {OPEN} AND status = 'queued' AND published_at IS NOT NULL
               AND published_at < now() - $1 * interval '1 second'",
        ))
        .bind(after.as_secs_f64())
        .bind(default_queue)
        .fetch_all(&self.pool)
        .await
        .context("looking for unclaimed runs")
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
        let mut tx = self
            .pool
            .begin()
            .await
            .context("starting to republish unclaimed runs")?;
        let ids: Vec<Uuid> = sqlx::query_scalar(&format!(
            "UPDATE job_runs SET published_at = NULL
             WHERE {OPEN} AND status = 'queued' AND published_at IS NOT NULL
               AND published_at < now() - $1 * interval '1 second'
               AND COALESCE(queue, $3) = $2
             RETURNING id",
        ))
        .bind(after.as_secs_f64())
        .bind(queue)
        .bind(default_queue)
        .fetch_all(&mut *tx)
        .await
        .context("republishing unclaimed runs")?;
        if !ids.is_empty() {
            notify_on(&mut tx, "run").await?;
        }
        tx.commit().await.context("committing republished runs")?;
        Ok(ids)
    }

    pub async fn republish(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context("putting runs back in the outbox")?;
        let put_back: Vec<Uuid> = sqlx::query_scalar(&format!(
            "UPDATE job_runs SET published_at = NULL
             WHERE id = ANY($1) AND {OPEN} AND status = 'queued' AND published_at IS NOT NULL
             RETURNING id"
        ))
        .bind(ids)
        .fetch_all(&mut *tx)
        .await
        .context("putting runs back in the outbox")?;
        // Should the worker not publish them itself, a scheduler does.
        if !put_back.is_empty() {
            notify_on(&mut tx, "run").await?;
        }
        tx.commit()
            .await
            .context("committing runs put back in the outbox")?;
        Ok(put_back)
    }

    /// Records a queued run dead (its message could not be used). Returns whether it was.
    pub async fn mark_dead(&self, id: Uuid, error: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.context("recording a run dead")?;
        let ended: Vec<EndedRun> = sqlx::query_as(&format!(
            "UPDATE job_runs r SET status = 'dead', error = $2, finished_at = now()
             WHERE id = $1 AND status = 'queued'
             RETURNING {ENDED}"
        ))
        .bind(id)
        .bind(text_without_nul(error))
        .fetch_all(&mut *tx)
        .await
        .context("recording a run dead")?;
        if chain_in(&mut tx, &ended, self.inline.clone()).await? > 0 {
            notify_on(&mut tx, "run").await?;
        }
        tx.commit().await.context("committing a dead run")?;
        Ok(!ended.is_empty())
    }

    /// Creates one run of `job` per slot (trigger `backfill`), in one transaction; a slot that
    /// has a run already (scheduled or backfilled) is left alone. Returns how many were created.
    pub async fn backfill(
        &self,
        job: &JobRow,
        slots: &[DateTime<Utc>],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await.context("starting a backfill")?;
        let registry_id: Option<i32> =
            sqlx::query_scalar("SELECT min(id) FROM registry WHERE job = $1")
                .bind(job.id)
                .fetch_one(&mut *tx)
                .await
                .context("reading the job's registry entry")?;
        let mut created = 0;
        let mut done = 0;
        for chunk in slots.chunks(IMPORT_CHUNK) {
            let mut columns = RunColumns::publishing(self.inline.clone());
            for slot in chunk {
                columns.push(
                    &NewRun::of_job(job, "backfill"),
                    Some((registry_id.unwrap_or_default(), *slot)),
                );
            }
            // The registry id is informational; the slot's identity is name and time.
            if registry_id.is_none() {
                columns.registry_ids.iter_mut().for_each(|r| *r = None);
            }
            created += columns.insert(&mut tx).await?.len();
            done += chunk.len();
            progress(done, slots.len());
        }
        if created > 0 {
            notify_on(&mut tx, "run").await?;
        }
        tx.commit().await.context("committing the backfill")?;
        Ok(created)
    }

    /// Cancels a run and its fan-out children (`runs --cancel`): queued ones are recorded
    /// `cancelled` at once and never run; running ones are marked, and their worker (which
    /// looks every half second) stops them and records them `cancelled`. `None`: no such run.
    pub async fn cancel_run(&self, id: Uuid) -> Result<Option<Cancelled>, StoreError> {
        // A deadlock with a worker's batch (or a lock held while a run is being published)
        // is worth another try or two, not an operator's error.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.try_cancel_run(id).await {
                Err(e) if e.is_transient() && tries < 3 => {
                    tracing::debug!(run = %id, error = %e, "cancel: trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                done => return done,
            }
        }
    }

    async fn try_cancel_run(&self, id: Uuid) -> Result<Option<Cancelled>, StoreError> {
        let mut tx = self.pool.begin().await.context("starting to cancel")?;
        // Rows being published are held until the broker confirms them (at most its
        // timeout): a cancel waits a while for them, not for ever.
        sqlx::query("SET LOCAL lock_timeout = '10s'")
            .execute(&mut *tx)
            .await
            .context("starting to cancel")?;
        let row: Option<(String, Option<String>, bool)> = sqlx::query_as(
            "SELECT status, worker, status = 'running' AND cancel_requested_at IS NOT NULL
             FROM job_runs WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .context("reading the run to cancel")?;
        let Some((status, worker, already_asked)) = row else {
            return Ok(None);
        };
        let (now, later) = cancel_in(&mut tx, &[id], "cancelled by an operator").await?;
        tx.commit().await.context("committing the cancel")?;
        Ok(Some(Cancelled {
            status,
            worker,
            already_asked,
            cancelled: now,
            asked: later,
        }))
    }

    /// Of the running runs `ids`, those whose cancel was asked for.
    pub async fn cancel_requested(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        sqlx::query_scalar(
            "SELECT id FROM job_runs
             WHERE id = ANY($1) AND status = 'running' AND cancel_requested_at IS NOT NULL",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .context("looking for cancelled runs")
    }

    /// Ids of a run's fan-out children.
    pub async fn child_ids(&self, parent: Uuid) -> Result<Vec<Uuid>, StoreError> {
        sqlx::query_scalar("SELECT id FROM job_runs WHERE parent_id = $1 ORDER BY created_at, id")
            .bind(parent)
            .fetch_all(&self.pool)
            .await
            .context("reading a run's children")
    }

    // ---- run history ----

    /// Recent runs, newest first, optionally of one job (name or id), one status and one
    /// trigger.
    pub async fn runs(
        &self,
        job: Option<&str>,
        status: Option<&str>,
        trigger: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunRow>, StoreError> {
        // A job id is turned into its name first, so that the name index serves the query.
        let name: Option<String> = match job {
            None => None,
            Some(key) => Some(
                sqlx::query_scalar(
                    "SELECT COALESCE((SELECT name FROM jobs WHERE name = $1),
                                     (SELECT name FROM jobs WHERE id = $2), $1)",
                )
                .bind(key)
                .bind(key.parse::<i32>().ok())
                .fetch_one(&self.pool)
                .await
                .context("looking up the job of runs")?,
            ),
        };
        // Only the filters given, each a parameter of its own: plans are generic (see
        // `prefer_generic_plans`), and a generic plan of `$1 IS NULL OR job_name = $1` could
        // not use the name index.
        let mut filters = Vec::new();
        let mut values = Vec::new();
        let given = [
            ("job_name", name),
            ("status", status.map(str::to_string)),
            ("trigger", trigger.map(str::to_string)),
        ];
        for (column, value) in given {
            if let Some(value) = value {
                values.push(value);
                // $1 is the limit.
                filters.push(format!("{column} = ${}", values.len() + 1));
            }
        }
        // Open runs are read through their own index, not by walking the whole history.
        if matches!(status, Some("queued" | "running")) {
            filters.push(OPEN.to_string());
        }
        let filters = if filters.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", filters.join(" AND "))
        };
        let query = format!(
            "SELECT {RUN_COLUMNS} FROM job_runs {filters}
             ORDER BY created_at DESC, id
             LIMIT $1"
        );
        let mut query = sqlx::query_as(&query).bind(limit);
        for value in values {
            query = query.bind(value);
        }
        query.fetch_all(&self.pool).await.context("reading runs")
    }

    pub async fn run(&self, id: Uuid) -> Result<Option<RunRow>, StoreError> {
        sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM job_runs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .context("reading a run")
    }

    pub async fn children(&self, id: Uuid) -> Result<Vec<RunRow>, StoreError> {
        sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM job_runs WHERE parent_id = $1 ORDER BY created_at, id"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .context("reading a run's children")
    }

    /// Deletes at most `chunk` finished top-level runs (with their children) that ended more
    /// than `retention` ago on the database's clock; returns how many went. Callers loop, so
    /// that no single statement holds locks or bloats the table for long.
    pub async fn prune_runs(&self, retention: Duration, chunk: u32) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await.context("starting to prune")?;
        let doomed: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM job_runs
             WHERE parent_id IS NULL AND finished_at IS NOT NULL
               AND finished_at < now() - $1 * interval '1 second'
               AND status = ANY($3)
             LIMIT $2
             FOR UPDATE SKIP LOCKED",
        )
        .bind(retention.as_secs_f64())
        .bind(i64::from(chunk))
        .bind(&ENDED_STATUSES[..])
        .fetch_all(&mut *tx)
        .await
        .context("pruning old runs")?;
        if doomed.is_empty() {
            tx.rollback().await.context("pruning old runs")?;
            return Ok(0);
        }
        // Runs chained after a pruned run outlive it (they may still run, and have their own
        // retention): they lose the link instead of going with it.
        sqlx::query(
            "UPDATE job_runs SET parent_id = NULL WHERE parent_id = ANY($1) AND trigger = 'chain'",
        )
        .bind(&doomed)
        .execute(&mut *tx)
        .await
        .context("keeping chained runs of pruned runs")?;
        let deleted = sqlx::query("DELETE FROM job_runs WHERE id = ANY($1)")
            .bind(&doomed)
            .execute(&mut *tx)
            .await
            .context("pruning old runs")?
            .rows_affected();
        tx.commit().await.context("committing pruned runs")?;
        Ok(deleted)
    }
}

// ---- webhooks ----

/// Takes `key` of `hook` for `hold` if it is free or expired (returns `None`), else answers
/// the run ids stored under it. Either way the key's row stays locked until the transaction
/// ends, so that concurrent requests with one key are answered one after the other.
async fn take_key(
    tx: &mut PgConnection,
    hook: &str,
    kind: &str,
    key: &WebhookKey,
    run_ids: &[Uuid],
) -> Result<Option<Vec<Uuid>>, StoreError> {
    let key_text = stored_key(&key.key);
    let taken: Option<Vec<Uuid>> = sqlx::query_scalar(
        "INSERT INTO webhook_keys (hook, kind, key, run_ids, expires_at)
         VALUES ($1, $2, $3, $4, now() + $5 * interval '1 second')
         ON CONFLICT (hook, kind, key) DO UPDATE
             SET run_ids = EXCLUDED.run_ids, created_at = now(), expires_at = EXCLUDED.expires_at
             WHERE webhook_keys.expires_at <= now()
         RETURNING run_ids",
    )
    .bind(hook)
    .bind(kind)
    .bind(&key_text)
    .bind(run_ids)
    .bind(key.hold.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await
    .context("taking a webhook key")?;
    if taken.is_some() {
        return Ok(None);
    }
    // A live key: ON CONFLICT locked its row, so this reads the final run ids.
    let held: Vec<Uuid> = sqlx::query_scalar(
        "SELECT run_ids FROM webhook_keys WHERE hook = $1 AND kind = $2 AND key = $3",
    )
    .bind(hook)
    .bind(kind)
    .bind(&key_text)
    .fetch_one(&mut *tx)
    .await
    .context("reading a webhook key")?;
    Ok(Some(held))
}

impl PgStore {
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
        let mut tx = self
            .pool
            .begin()
            .await
            .context("starting a webhook's runs")?;
        if let Some(key) = dedupe {
            if let Some(run_ids) = take_key(&mut tx, hook, "dedupe", key, &[]).await? {
                tx.commit().await.context("committing a webhook's runs")?;
                return Ok(WebhookOutcome {
                    run_ids,
                    duplicate: true,
                    created: Vec::new(),
                });
            }
        }
        let mut outcome = WebhookOutcome::default();
        let mut delayed: Vec<(Uuid, f64)> = Vec::new();
        // Runs this request creates, and the debounce keys it took (a fan-out may name one
        // key twice: its runs are one run, with the later arguments).
        let mut fresh: Vec<NewRun> = Vec::new();
        let mut taken: HashMap<&str, usize> = HashMap::new();
        let mut ids: Vec<Option<Uuid>> = vec![None; runs.len()];
        // Keys are taken in their order, not the payload's: two requests naming the same
        // devices in another order wait for each other instead of deadlocking.
        let mut order: Vec<usize> = (0..runs.len()).collect();
        order.sort_by(|a, b| {
            let key = |i: &usize| runs[*i].debounce.as_ref().map(|k| k.key.as_str());
            key(a).cmp(&key(b))
        });
        for index in order {
            let wanted = &runs[index];
            let id = wanted.run.id.unwrap_or_else(super::new_run_id);
            if let Some(key) = &wanted.debounce {
                if let Some(&mine) = taken.get(key.key.as_str()) {
                    fresh[mine].arguments = wanted.run.arguments.clone();
                    ids[index] = fresh[mine].id;
                    continue;
                }
                if let Some(held) = take_key(&mut tx, hook, "debounce", key, &[id]).await? {
                    let shared: Option<Uuid> = sqlx::query_scalar(
                        "UPDATE job_runs SET arguments = $2::jsonb
                         WHERE id = $1 AND status = 'queued' AND published_at IS NULL
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
                    // The window's run went out as this request came (its window ended while
                    // this transaction began): this request opens the next window.
                    sqlx::query(
                        "UPDATE webhook_keys
                         SET run_ids = $4, created_at = now(), expires_at = now() + $5 * interval '1 second'
                         WHERE hook = $1 AND kind = $2 AND key = $3",
                    )
                    .bind(hook)
                    .bind("debounce")
                    .bind(stored_key(&key.key))
                    .bind([id])
                    .bind(key.hold.as_secs_f64())
                    .execute(&mut *tx)
                    .await
                    .context("opening a debounce window")?;
                }
                delayed.push((id, key.hold.as_secs_f64()));
                taken.insert(key.key.as_str(), fresh.len());
            }
            let mut run = wanted.run.clone();
            run.id = Some(id);
            fresh.push(run);
            ids[index] = Some(id);
        }
        outcome.run_ids = ids.into_iter().flatten().collect();
        let mut columns = RunColumns::publishing(self.inline.clone());
        for run in &fresh {
            columns.push(run, None);
        }
        // Debounced runs wait for their window to end: they go out through the outbox.
        columns.hold(delayed.iter().map(|d| d.0));
        if !columns.ids.is_empty() {
            let created: HashSet<Uuid> = columns
                .insert(&mut tx)
                .await?
                .into_iter()
                .map(|run| run.id)
                .collect();
            let (ids, delays): (Vec<Uuid>, Vec<f64>) = delayed.iter().copied().unzip();
            let due: HashMap<Uuid, DateTime<Utc>> = sqlx::query_as(
                "UPDATE job_runs r SET not_before = now() + u.delay * interval '1 second'
                 FROM UNNEST($1::uuid[], $2::float8[]) AS u(id, delay)
                 WHERE r.id = u.id
                 RETURNING r.id, r.not_before",
            )
            .bind(&ids)
            .bind(&delays)
            .fetch_all(&mut *tx)
            .await
            .context("delaying debounced runs")?
            .into_iter()
            .collect();
            outcome.created = columns
                .ids
                .iter()
                .filter(|id| created.contains(id))
                .map(|id| (*id, due.get(id).copied()))
                .collect();
            notify_on(&mut tx, "run").await?;
        }
        if let Some(key) = dedupe {
            sqlx::query(
                "UPDATE webhook_keys SET run_ids = $4 WHERE hook = $1 AND kind = $2 AND key = $3",
            )
            .bind(hook)
            .bind("dedupe")
            .bind(stored_key(&key.key))
            .bind(&outcome.run_ids)
            .execute(&mut *tx)
            .await
            .context("storing a webhook's dedupe key")?;
        }
        tx.commit().await.context("committing a webhook's runs")?;
        Ok(outcome)
    }

    /// Deletes up to `chunk` webhook keys that expired; returns how many went.
    pub async fn expire_webhook_keys(&self, chunk: u32) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM webhook_keys WHERE ctid IN (
                SELECT ctid FROM webhook_keys WHERE expires_at < now() LIMIT $1)",
        )
        .bind(i64::from(chunk))
        .execute(&self.pool)
        .await
        .context("deleting expired webhook keys")?
        .rows_affected())
    }

    /// The runs with these ids (those that exist), in no particular order.
    pub async fn runs_by_id(&self, ids: &[Uuid]) -> Result<Vec<RunRow>, StoreError> {
        sqlx::query_as(&format!(
            "SELECT {RUN_COLUMNS} FROM job_runs WHERE id = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .context("reading runs")
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .context("asking the database")?;
        Ok(())
    }

    // ---- metrics: each reads an index range, never the whole history ----

    /// Runs created in (`after`, `until`], counted by trigger.
    pub async fn runs_created_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        sqlx::query_as(
            "SELECT trigger, count(*) FROM job_runs
             WHERE created_at > $1 AND created_at <= $2 GROUP BY trigger",
        )
        .bind(after)
        .bind(until)
        .fetch_all(&self.pool)
        .await
        .context("counting created runs")
    }

    /// Runs that finished in (`after`, `until`], oldest first, at most `limit`.
    pub async fn runs_finished_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<FinishedRun>, StoreError> {
        sqlx::query_as(
            "SELECT job_name, status, finished_at,
                    EXTRACT(EPOCH FROM finished_at - started_at)::float8 AS duration,
                    EXTRACT(EPOCH FROM published_at - COALESCE(not_before, scheduled_for, created_at))::float8 AS lag
             FROM job_runs
             WHERE finished_at > $1 AND finished_at <= $2
             ORDER BY finished_at
             LIMIT $3",
        )
        .bind(after)
        .bind(until)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .context("reading finished runs")
    }

    /// How long the oldest run whose time has come has been waiting, queued (not yet
    /// published, or published and not yet claimed), in seconds; `None`: none waits.
    pub async fn oldest_queued_age(&self) -> Result<Option<f64>, StoreError> {
        sqlx::query_scalar(&format!(
            "SELECT EXTRACT(EPOCH FROM now() - (
                 SELECT min(COALESCE(not_before, created_at)) FROM job_runs
                 WHERE {OPEN} AND status = 'queued' AND (not_before IS NULL OR not_before <= now()))
             )::float8",
        ))
        .fetch_one(&self.pool)
        .await
        .context("finding the oldest queued run")
    }

    /// The queues jobs name besides the default one.
    pub async fn job_queues(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT DISTINCT queue FROM jobs WHERE queue IS NOT NULL ORDER BY queue")
            .fetch_all(&self.pool)
            .await
            .context("reading the jobs' queues")
    }

    /// See [`Store::queues_in_use`](super::Store::queues_in_use).
    pub async fn queues_in_use(&self, default: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT DISTINCT COALESCE(queue, $1) AS q FROM jobs ORDER BY q")
            .bind(default)
            .fetch_all(&self.pool)
            .await
            .context("reading the jobs' queues")
    }
}

/// The claim of `PgStore::claim_runs`, on `conn` (in a transaction or not).
async fn claim_in(
    conn: &mut PgConnection,
    worker: &str,
    token: i32,
    nonce: Uuid,
    claims: &[(Uuid, bool)],
) -> Result<Vec<Claim>, StoreError> {
    let ids: Vec<Uuid> = claims.iter().map(|c| c.0).collect();
    let redelivered: Vec<bool> = claims.iter().map(|c| c.1).collect();
    let rows: Vec<ClaimRow> = sqlx::query_as(&format!(
        "WITH lease AS (SELECT {LEASE_HELD} AS held), {} {CLAIM_ANSWERS}",
        claimed_ctes()
    ))
    .bind(LEASE_CLASS)
    .bind(&ids)
    .bind(&redelivered)
    .bind(worker)
    .bind(token)
    .bind(nonce)
    .fetch_all(&mut *conn)
    .await
    .context("claiming runs")?;
    Ok(claims_of(&ids, rows))
}

/// A row of `together_sql`'s answer: whether it answers a claim, then a `ClaimRow` (for a
/// recorded result only its id).
type TogetherRow = (
    bool,
    Uuid,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<bool>,
    Option<DateTime<Utc>>,
    Option<Uuid>,
    Option<String>,
);

/// The statement of `PgStore::finish_and_claim_runs`: the claims as `claim_in` makes them
/// (`$1` to `$6`), the results as `finish_in` records them (`FinishColumns`, `$7` to `$13`),
/// except those of jobs that chain another, and `$14` the lock timeout in milliseconds.
///
/// The claims wait for a locked row only so long: the timeout is set for this statement's own
/// transaction by `lease`, which both updates read before they take a row.
fn together_sql() -> String {
    format!(
        "WITH lease AS (
             SELECT set_config('lock_timeout', $14, true) AS lock_timeout, {LEASE_HELD} AS held),
         ended AS (
             {}
               AND (SELECT lock_timeout FROM lease) IS NOT NULL
               AND NOT EXISTS (
                   SELECT 1 FROM jobs j WHERE j.name = r.job_name
                     AND (j.on_success IS NOT NULL OR j.on_failure IS NOT NULL))
             RETURNING r.id),
         {}
         SELECT true, answers.* FROM ({CLAIM_ANSWERS}) answers
         UNION ALL
         SELECT false, id, NULL::int4, NULL::text, NULL::text, NULL::bool,
                NULL::timestamptz, NULL::uuid, NULL::text
         FROM ended",
        finish_update(7),
        claimed_ctes()
    )
}

/// Readies a new connection of a writer's pool (`PgStore::for_writes`): prepares and plans
/// the writer's statement by running it once with nothing to write, so that a burst's first
/// claims do not wait for that (about 4 ms on an idle server: 2 to parse, 2 to plan).
///
/// The plan is made now and kept until an `ANALYZE` of the tables makes Postgres plan it
/// anew, whatever the table holds now (nothing, on a new installation). So the connection does without sequential scans
/// (`enable_seqscan = off`, set here first): every row that this statement and the writer's
/// other statements read or write is found by a key (a run by its id, a job by its name, its
/// registry entries by the job), which an index scan does at any table size; made on an empty
/// `job_runs` with sequential scans allowed, the plan read the whole table for each batch once
/// it had grown.
async fn warm_up_writes(conn: &mut PgConnection) {
    if let Err(e) = conn.execute("SET enable_seqscan = off").await {
        tracing::debug!(error = %e, "readying a writer's connection failed; it is readied on first use");
        return;
    }
    let none = FinishColumns::of(std::iter::empty());
    let sql = together_sql();
    let warmed: Result<Vec<TogetherRow>, sqlx::Error> = none
        .bind(
            sqlx::query_as(&sql)
                .bind(LEASE_CLASS)
                .bind(Vec::<Uuid>::new())
                .bind(Vec::<bool>::new())
                .bind("")
                .bind(0_i32)
                .bind(Uuid::nil()),
        )
        .bind(CLAIM_LOCK_WAIT.as_millis().to_string())
        .fetch_all(&mut *conn)
        .await;
    if let Err(e) = warmed {
        tracing::debug!(error = %e, "readying a writer's connection failed; it is readied on first use");
    }
}

/// Whether the lease `$5` is held (by the claiming worker's session), in a claim statement
/// whose `$1` is `LEASE_CLASS`.
const LEASE_HELD: &str = "EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = $1::oid AND l.objid = $5::oid AND l.objsubid = 2)";

/// The claim's common table expressions after `lease`: the delivered runs (`$2`, `$3`) and
/// those of them claimed for worker `$4` under lease `$5` with nonce `$6`.
fn claimed_ctes() -> String {
    format!(
        "input AS (SELECT * FROM UNNEST($2::uuid[], $3::bool[]) AS u(id, redelivered)),
     claimed AS (
        UPDATE job_runs r
        SET status = 'running', attempt = r.attempt + 1, worker = $4, claim_token = $5,
            claim_nonce = $6, started_at = statement_timestamp(), finished_at = NULL,
            -- The broker had the message by the time a worker claims it: a run claimed while
            -- its outbox pass still waited for the rest of its batch's confirms is not
            -- recorded published after it started.
            published_at = LEAST(r.published_at, now())
        FROM (SELECT id, bool_or(redelivered) AS redelivered FROM input GROUP BY id) i
        WHERE r.id = i.id
          AND (SELECT held FROM lease)
          AND r.cancel_requested_at IS NULL
          AND ((r.status = 'queued' AND (r.not_before IS NULL OR r.not_before <= now()))
               OR (r.status = 'running' AND i.redelivered
                   AND r.claim_token IS DISTINCT FROM $5 AND {LEASE_GONE}))
        RETURNING r.id, r.attempt, r.status, r.trigger, r.scheduled_for, r.created_at,
                  r.parent_id, r.job_name)"
    )
}

/// The claim's answer: a `ClaimRow` per delivered run, the claimed ones from what their
/// update returned, the others as they were before it (a duplicate of a claimed run in the
/// same batch is answered once: `claims_of` answers its copies).
///
/// Not a join of the input with `claimed`: with a generic plan, which expects a handful of rows
/// from UNNEST, Postgres joined them as a nested loop, reading the claimed runs once per
/// delivered run. 500 claims and results in one statement took 37-58 ms that way, 15 ms this
/// way (EXPLAIN ANALYZE, 100,000 runs in the table); the `NOT IN` is a hashed subplan.
const CLAIM_ANSWERS: &str = "SELECT c.id, c.attempt, c.status, c.trigger, (SELECT held FROM lease),
        COALESCE(c.scheduled_for, c.created_at), c.parent_id,
        (SELECT g.timezone FROM jobs j JOIN registry g ON g.job = j.id
         WHERE j.name = c.job_name LIMIT 1)
    FROM claimed c
    UNION ALL
    SELECT i.id,
        CASE WHEN r.status = 'running' AND r.claim_nonce = $6 THEN r.attempt END,
        r.status,
        CASE WHEN r.status = 'running' AND r.claim_nonce = $6 THEN r.trigger END,
        (SELECT held FROM lease),
        COALESCE(r.scheduled_for, r.created_at),
        r.parent_id,
        (SELECT g.timezone FROM jobs j JOIN registry g ON g.job = j.id
         WHERE j.name = r.job_name LIMIT 1)
    FROM input i LEFT JOIN job_runs r ON r.id = i.id
    WHERE i.id NOT IN (SELECT id FROM claimed)";

/// The answer to each claim of `ids`, from the claim statement's rows.
fn claims_of(ids: &[Uuid], rows: Vec<ClaimRow>) -> Vec<Claim> {
    // Fenced in the statement itself: without the lease held by this worker's session,
    // nothing is claimed, and the deliveries go back to be claimed later.
    if rows.iter().any(|row| !row.4) {
        tracing::warn!("this worker does not hold its lease: claiming nothing");
        return vec![Claim::Unavailable; ids.len()];
    }
    let mut by_id: HashMap<Uuid, ClaimState> = HashMap::new();
    for (id, attempt, status, trigger, _, scheduled_for, parent, timezone) in rows {
        let run = ClaimedRun {
            scheduled_for,
            parent,
            timezone,
        };
        by_id.insert(id, (attempt, status, trigger, run));
    }
    // The same run twice in one batch: the first claims it, the second is a duplicate.
    let mut seen = HashSet::new();
    ids.iter()
        .map(|id| {
            if !seen.insert(*id) {
                return Claim::Running;
            }
            match by_id.get(id) {
                Some((Some(attempt), _, trigger, run)) => Claim::Claimed {
                    attempt: *attempt,
                    trigger: trigger.clone().unwrap_or_else(|| "manual".into()),
                    run: run.clone(),
                },
                Some((None, Some(status), _, _)) if status == "running" || status == "queued" => {
                    Claim::Running
                }
                Some((None, Some(status), _, _)) => Claim::Finished(status.clone()),
                _ => Claim::Unknown,
            }
        })
        .collect()
}

/// Results as arrays for UNNEST, in id order (as cancels lock runs: fewer deadlocks between a
/// batch and a cancel).
struct FinishColumns {
    ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    results: Vec<Option<String>>,
    errors: Vec<Option<String>>,
    delays: Vec<Option<f64>>,
    tokens: Vec<i32>,
    attempts: Vec<i32>,
}

impl FinishColumns {
    fn of<'a>(finishes: impl Iterator<Item = &'a Finish>) -> FinishColumns {
        let mut sorted: Vec<&Finish> = finishes.collect();
        sorted.sort_by_key(|f| f.id);
        FinishColumns {
            ids: sorted.iter().map(|f| f.id).collect(),
            statuses: sorted
                .iter()
                .map(|f| match f.end {
                    RunEnd::Succeeded => "succeeded",
                    RunEnd::Failed => "failed",
                    RunEnd::Dead => "dead",
                    RunEnd::Cancelled => "cancelled",
                    RunEnd::Retry(_) => "queued",
                })
                .collect(),
            results: sorted
                .iter()
                .map(|f| f.result.as_ref().map(jsonb_text))
                .collect(),
            errors: sorted
                .iter()
                .map(|f| f.error.as_deref().map(text_without_nul))
                .collect(),
            delays: sorted
                .iter()
                .map(|f| match f.end {
                    RunEnd::Retry(delay) => Some(delay.as_secs_f64()),
                    _ => None,
                })
                .collect(),
            tokens: sorted.iter().map(|f| f.token).collect(),
            attempts: sorted.iter().map(|f| f.attempt).collect(),
        }
    }

    /// Binds the seven arrays, in the order `finish_update` reads them.
    fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.statuses)
            .bind(&self.results)
            .bind(&self.errors)
            .bind(&self.delays)
            .bind(&self.tokens)
            .bind(&self.attempts)
    }
}

/// The update that records results, reading `FinishColumns`' arrays from parameter `$first`
/// on. A result is recorded only for the claim it belongs to (lease token and attempt).
fn finish_update(first: usize) -> String {
    // A run whose cancel was asked for ends cancelled, however its call ended (a plugin
    // that ignores the flag may have finished its work: its result is kept, and its
    // success chains nothing): it is not tried again. Decided from `r` in SET, which is
    // the row as it is when the update takes it (a cancel committed while this waited for
    // the row counts).
    let status = "CASE WHEN r.cancel_requested_at IS NOT NULL THEN 'cancelled' ELSE u.status END";
    let p: Vec<String> = (first..first + 7).map(|n| format!("${n}")).collect();
    format!(
        "UPDATE job_runs r
         SET status = {status},
             finished_at = CASE WHEN {status} = 'queued' THEN NULL ELSE now() END,
             published_at = CASE WHEN {status} = 'queued' THEN NULL ELSE r.published_at END,
             result = u.result::jsonb,
             error = CASE WHEN r.cancel_requested_at IS NOT NULL
                          THEN COALESCE(r.cancel_reason, 'cancelled')
                               || COALESCE(' (' || u.error || ')',
                                           CASE WHEN u.status = 'succeeded'
                                                THEN ' (its job had finished before it could be stopped)' END,
                                           '')
                          ELSE u.error END,
             -- Kept when the run ends: when it was meant to start (its jitter, its retry).
             not_before = CASE WHEN {status} = 'queued'
                               THEN now() + u.delay * interval '1 second' ELSE r.not_before END
         FROM UNNEST({}::uuid[], {}::text[], {}::text[], {}::text[], {}::float8[], {}::int4[], {}::int4[])
           AS u(id, status, result, error, delay, token, attempt)
         WHERE r.id = u.id AND r.status = 'running' AND r.claim_token = u.token AND r.attempt = u.attempt",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6]
    )
}

/// The update of `PgStore::finish_runs`, in `tx`; the ids of runs not recorded.
async fn finish_in(
    tx: &mut PgConnection,
    finishes: &[Finish],
    inline: Option<Arc<PublishOnInsert>>,
) -> Result<Vec<Uuid>, StoreError> {
    let columns = FinishColumns::of(finishes.iter());
    let recorded: Vec<EndedRun> = columns
        .bind(sqlx::query_as(&format!(
            "{} RETURNING {ENDED}",
            finish_update(1)
        )))
        .fetch_all(&mut *tx)
        .await
        .context("recording finished runs")?;
    let ids = columns.ids;
    let chained = chain_in(tx, &recorded, inline).await?;
    if chained > 0 || finishes.iter().any(|f| matches!(f.end, RunEnd::Retry(_))) {
        notify_on(&mut *tx, "run").await?;
    }
    let recorded: HashSet<Uuid> = recorded.into_iter().map(|r| r.id).collect();
    Ok(ids
        .into_iter()
        .filter(|id| !recorded.contains(id))
        .collect())
}

/// Creates, within the transaction that recorded `ended`, the runs their jobs chain (trigger
/// `chain`, parent = the ended run, the ended run under `trigger_run` in the arguments).
/// Returns how many were created.
async fn chain_in(
    tx: &mut PgConnection,
    ended: &[EndedRun],
    inline: Option<Arc<PublishOnInsert>>,
) -> Result<usize, StoreError> {
    let names = chained_names(ended);
    if names.is_empty() {
        return Ok(0);
    }
    let jobs: Vec<JobRow> = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs j WHERE name = ANY($1)"
    ))
    .bind(&names)
    .fetch_all(&mut *tx)
    .await
    .context("reading chained jobs")?;
    let planned = plan_chain(ended, &jobs);
    if planned.is_empty() {
        return Ok(0);
    }
    let mut columns = RunColumns::publishing(inline);
    for run in &planned {
        columns.push(run, None);
    }
    let created = columns.insert(tx).await?;
    log_chained(&planned, created.iter().map(|run| run.id));
    Ok(created.len())
}

/// Cancels runs (and their fan-out children) within `tx`: queued ones are recorded
/// `cancelled` with `reason` at once; running ones are marked for their worker, which stops
/// them and records them `cancelled`. Returns (cancelled now, marked for their worker).
async fn cancel_in(
    tx: &mut PgConnection,
    ids: &[Uuid],
    reason: &str,
) -> Result<(Vec<Uuid>, Vec<Uuid>), StoreError> {
    // The runs first: a fan-out inserting children holds its parent's row until they are
    // committed (see `insert_children`), so once these are locked every child is visible.
    sqlx::query("SELECT id FROM job_runs WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(ids)
        .fetch_all(&mut *tx)
        .await
        .context("locking the runs to cancel")?;
    let tree: Vec<Uuid> = sqlx::query_scalar(
        "WITH RECURSIVE tree AS (
             SELECT id FROM job_runs WHERE id = ANY($1)
             UNION
             SELECT c.id FROM job_runs c JOIN tree t ON c.parent_id = t.id WHERE c.trigger <> 'chain')
         SELECT r.id FROM job_runs r JOIN tree t ON t.id = r.id
         WHERE r.status IN ('queued', 'running')
         ORDER BY r.id FOR UPDATE OF r",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await
    .context("locking the runs to cancel")?;
    // A statement of its own, after the locks: it sees each run as it is now (a run a worker
    // has just queued for a retry is cancelled as queued).
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "WITH queued AS (
             UPDATE job_runs SET status = 'cancelled', finished_at = now(), error = $2
             WHERE id = ANY($1) AND status = 'queued'
             RETURNING id),
         running AS (
             UPDATE job_runs SET cancel_requested_at = now(), cancel_reason = $2
             WHERE id = ANY($1) AND status = 'running' AND cancel_requested_at IS NULL
             RETURNING id)
         SELECT id, 'cancelled' FROM queued UNION ALL SELECT id, 'requested' FROM running",
    )
    .bind(&tree)
    .bind(reason)
    .fetch_all(&mut *tx)
    .await
    .context("cancelling runs")?;
    let (now, later): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.1 == "cancelled");
    Ok((
        now.into_iter().map(|r| r.0).collect(),
        later.into_iter().map(|r| r.0).collect(),
    ))
}

/// A claim's answer row: run id, attempt if claimed, status (before the claim, for a run not
/// claimed), trigger if claimed, whether the worker's lease is held, and what the run's plugin
/// may know (slot or creation, parent, the job's zone).
type ClaimRow = (
    Uuid,
    Option<i32>,
    Option<String>,
    Option<String>,
    bool,
    Option<DateTime<Utc>>,
    Option<Uuid>,
    Option<String>,
);
/// Attempt if claimed, status (before the claim, for a run not claimed), trigger if claimed, the
/// run's context.
type ClaimState = (Option<i32>, Option<String>, Option<String>, ClaimedRun);

/// An inserted run: id, job name, slot, status, error.
type CreatedRow = (Uuid, String, Option<DateTime<Utc>>, String, Option<String>);

/// Columns of runs to insert, as arrays for UNNEST.
#[derive(Default)]
struct RunColumns {
    ids: Vec<Uuid>,
    job_names: Vec<String>,
    jobs: Vec<String>,
    job_ids: Vec<Option<i32>>,
    registry_ids: Vec<Option<i32>>,
    triggers: Vec<&'static str>,
    queues: Vec<Option<String>>,
    arguments: Vec<String>,
    pre: Vec<Option<String>>,
    post: Vec<Option<String>>,
    timeouts: Vec<Option<f64>>,
    retries: Vec<i32>,
    scheduled_for: Vec<Option<DateTime<Utc>>>,
    parents: Vec<Option<Uuid>>,
    published: Vec<bool>,
    not_before: Vec<Option<DateTime<Utc>>>,
    /// `queued`, or `skipped` (recorded at once, with its reason in `errors`).
    statuses: Vec<&'static str>,
    errors: Vec<Option<String>>,
    /// Publishes due runs as they are inserted (see [`PublishOnInsert`]).
    inline: Option<Arc<PublishOnInsert>>,
    /// Runs left to the outbox even so.
    held: HashSet<Uuid>,
    /// Each run's message (queue, body), with `inline`.
    messages: Vec<Option<(String, Vec<u8>)>>,
}

impl RunColumns {
    /// Columns of runs to insert; `inline`: publish those that are due in the same statement.
    fn publishing(inline: Option<Arc<PublishOnInsert>>) -> RunColumns {
        RunColumns {
            inline,
            ..RunColumns::default()
        }
    }

    /// Leaves runs to the outbox (they get a start time after the insert).
    fn hold(&mut self, ids: impl Iterator<Item = Uuid>) {
        self.held.extend(ids);
    }

    /// Sets the start time and the skip reason of the run pushed last.
    fn set_last(&mut self, not_before: Option<DateTime<Utc>>, skipped: Option<String>) {
        if let (Some(slot), Some(status), Some(error)) = (
            self.not_before.last_mut(),
            self.statuses.last_mut(),
            self.errors.last_mut(),
        ) {
            *slot = not_before;
            if skipped.is_some() {
                *status = "skipped";
                *error = skipped;
            }
        }
    }

    fn push(&mut self, run: &NewRun, slot: Option<(i32, DateTime<Utc>)>) {
        self.not_before.push(None);
        self.statuses.push("queued");
        self.errors.push(None);
        self.ids.push(run.id.unwrap_or_else(super::new_run_id));
        self.job_names.push(text_without_nul(&run.job_name));
        self.jobs.push(text_without_nul(&run.job));
        self.job_ids.push(run.job_id);
        self.registry_ids.push(slot.map(|s| s.0));
        self.triggers.push(run.trigger);
        self.queues.push(run.queue.clone());
        self.arguments.push(jsonb_text(&run.arguments));
        self.pre.push(run.preprocessing.clone());
        self.post.push(run.postprocessing.clone());
        self.timeouts.push(run.timeout_seconds);
        self.retries.push(run.max_retries);
        self.scheduled_for.push(slot.map(|s| s.1));
        self.parents.push(run.parent_id);
        self.published.push(run.published);
        let id = self.ids[self.ids.len() - 1];
        self.messages.push(
            self.inline
                .as_ref()
                .and_then(|inline| inline.message(id, run)),
        );
    }

    /// Inserts the runs; a run whose identity exists already is left out: a scheduled slot
    /// (job name and scheduled time) that has its run, or a run id inserted before (ids of
    /// fan-out children and bare messages are derived from what they come from, so a retried
    /// insert creates nothing new). Returns the runs inserted.
    ///
    /// With the table queue in this database, the due ones among them are published in the
    /// same statement: their messages are queued and they are marked published, so that a run
    /// is published exactly when it exists, with no outbox write after it.
    async fn insert(&self, tx: &mut PgConnection) -> Result<Vec<CreatedRun>, StoreError> {
        let mut published = self.published.clone();
        let (mut message_ids, mut queues, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
        for (i, message) in self.messages.iter().enumerate() {
            let due = self.statuses[i] == "queued" && self.not_before[i].is_none();
            if let (Some((queue, body)), true) = (message, due && !self.held.contains(&self.ids[i]))
            {
                published[i] = true;
                message_ids.push(self.ids[i]);
                queues.push(queue.as_str());
                bodies.push(body.as_slice());
            }
        }
        let rows: Vec<CreatedRow> = sqlx::query_as(
            "WITH created AS (
             INSERT INTO job_runs (id, job_name, job, job_id, registry_id, trigger, queue, arguments, preprocessing,
                                   postprocessing, timeout_seconds, max_retries, scheduled_for, parent_id, published_at,
                                   not_before, status, error, finished_at)
             SELECT u.id, u.job_name, u.job, u.job_id, u.registry_id, u.trigger, u.queue, u.arguments::jsonb, u.pre,
                    u.post, u.timeout, u.retries, u.scheduled_for, u.parent_id, CASE WHEN u.published THEN now() END,
                    u.not_before, u.status, u.error, CASE WHEN u.status <> 'queued' THEN now() END
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int4[], $5::int4[], $6::text[], $7::text[],
                         $8::text[], $9::text[], $10::text[], $11::float8[], $12::int4[], $13::timestamptz[],
                         $14::uuid[], $15::bool[], $16::timestamptz[], $17::text[], $18::text[])
               AS u(id, job_name, job, job_id, registry_id, trigger, queue, arguments, pre, post, timeout, retries,
                    scheduled_for, parent_id, published, not_before, status, error)
             ON CONFLICT DO NOTHING
             RETURNING id, job_name, scheduled_for, status, error),
             queued AS (
                INSERT INTO queue_messages (queue, body)
                SELECT m.queue, m.body
                FROM UNNEST($19::uuid[], $20::text[], $21::bytea[]) WITH ORDINALITY AS m(id, queue, body, n)
                WHERE m.id IN (SELECT id FROM created)
                ORDER BY m.n)
             SELECT * FROM created",
        )
        .bind(&self.ids)
        .bind(&self.job_names)
        .bind(&self.jobs)
        .bind(&self.job_ids)
        .bind(&self.registry_ids)
        .bind(&self.triggers)
        .bind(&self.queues)
        .bind(&self.arguments)
        .bind(&self.pre)
        .bind(&self.post)
        .bind(&self.timeouts)
        .bind(&self.retries)
        .bind(&self.scheduled_for)
        .bind(&self.parents)
        .bind(&published)
        .bind(&self.not_before)
        .bind(&self.statuses)
        .bind(&self.errors)
        .bind(&message_ids)
        .bind(&queues)
        .bind(&bodies)
        .fetch_all(&mut *tx)
        .await
        .context("inserting runs")?;
        if !queues.is_empty() {
            wake_consumers(tx, queues).await?;
        }
        Ok(rows
            .into_iter()
            .map(|(id, job_name, scheduled_for, status, error)| CreatedRun {
                id,
                job_name,
                scheduled_for,
                skipped: (status == "skipped").then(|| error.unwrap_or_default()),
            })
            .collect())
    }
}

/// The channel table-queue consumers listen on; the payload is the queue's name.
const QUEUE_CHANNEL: &str = "jobschleuder_queue";

// ---- the table queue (see `queue::table`) ----

/// Inserts table-queue messages (queue, body) within `tx`, and wakes their consumers in other
/// processes at its commit.
async fn insert_messages(
    tx: &mut PgConnection,
    messages: &[(String, Vec<u8>)],
) -> Result<(), StoreError> {
    let queues: Vec<&str> = messages.iter().map(|m| m.0.as_str()).collect();
    let bodies: Vec<&[u8]> = messages.iter().map(|m| m.1.as_slice()).collect();
    sqlx::query(
        "INSERT INTO queue_messages (queue, body)
         SELECT * FROM UNNEST($1::text[], $2::bytea[])",
    )
    .bind(&queues)
    .bind(&bodies)
    .execute(&mut *tx)
    .await
    .context("publishing to the table queue")?;
    wake_consumers(tx, queues).await
}

/// Wakes the consumers of `queues` (in every process) when `tx` commits.
async fn wake_consumers<Q: AsRef<str>>(
    tx: &mut PgConnection,
    queues: Vec<Q>,
) -> Result<(), StoreError> {
    let mut distinct: Vec<&str> = queues.iter().map(|q| q.as_ref()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    sqlx::query("SELECT pg_notify($1, q) FROM UNNEST($2::text[]) AS q")
        .bind(QUEUE_CHANNEL)
        .bind(&distinct)
        .execute(&mut *tx)
        .await
        .context("waking table-queue consumers")?;
    Ok(())
}

/// Lets the current transaction commit without waiting for its WAL flush. Only for writes
/// whose loss in a server crash changes nothing that a flushed write depends on: a take is
/// flushed by the claim that follows it (a take whose run was not claimed yet is handed out
/// again, and the claim decides which copy runs); a lost renewal, release or acknowledgement
/// leaves the message with its consumer until its lease runs out (consumers renew only what
/// they still hold), and the copy then handed out is skipped by its run's claim. Publishes,
/// claims and results never use it.
async fn without_flush_wait(tx: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await
        .context("setting up a queue transaction")?;
    Ok(())
}

impl PgStore {
    pub async fn queue_publish(&self, messages: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context("publishing to the table queue")?;
        insert_messages(&mut tx, messages).await?;
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
        let mut tx = self.pool.begin().await.context("taking queued messages")?;
        without_flush_wait(&mut tx).await?;
        let taken: Vec<QueueMessage> = sqlx::query_as(
            "UPDATE queue_messages m
             SET deliveries = m.deliveries + 1, consumer = $3,
                 visible_at = now() + $4 * interval '1 second'
             FROM (SELECT id FROM queue_messages
                   WHERE queue = $1 AND visible_at <= now()
                   ORDER BY id LIMIT $2
                   FOR UPDATE SKIP LOCKED) picked
             WHERE m.id = picked.id
             RETURNING m.id, m.body, m.message_id, m.deliveries",
        )
        .bind(queue)
        .bind(i64::from(limit))
        .bind(consumer)
        .bind(lease.as_secs_f64())
        .fetch_all(&mut *tx)
        .await
        .context("taking queued messages")?;
        // Handed out more often than allowed (workers died on it): dead-lettered instead.
        let limit = i32::try_from(delivery_limit.max(1)).unwrap_or(i32::MAX);
        let (mut taken, exhausted): (Vec<QueueMessage>, Vec<QueueMessage>) =
            taken.into_iter().partition(|m| m.deliveries <= limit);
        if !exhausted.is_empty() {
            let ids: Vec<i64> = exhausted.iter().map(|m| m.id).collect();
            sqlx::query(
                "WITH dead AS (DELETE FROM queue_messages WHERE id = ANY($1) RETURNING *)
                 INSERT INTO queue_dead_letters (id, queue, body, message_id, deliveries, reason, created_at)
                 SELECT id, queue, body, message_id, deliveries,
                        'handed out ' || (deliveries - 1) || ' times without being acknowledged', created_at
                 FROM dead
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .context("dead-lettering exhausted messages")?;
        }
        tx.commit().await.context("taking queued messages")?;
        taken.sort_by_key(|m| m.id);
        Ok(taken)
    }

    pub async fn queue_ack(&self, ids: &[i64]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.context("acknowledging messages")?;
        without_flush_wait(&mut tx).await?;
        sqlx::query("DELETE FROM queue_messages WHERE id = ANY($1)")
            .bind(ids)
            .execute(&mut *tx)
            .await
            .context("acknowledging messages")?;
        tx.commit().await.context("acknowledging messages")
    }

    pub async fn queue_release(&self, ids: &[i64]) -> Result<(), StoreError> {
        self.release(Some(ids), None).await
    }

    pub async fn queue_release_consumer(&self, consumer: &str) -> Result<(), StoreError> {
        self.release(None, Some(consumer)).await
    }

    /// Makes messages ready again at once (by id, or all a consumer holds).
    async fn release(&self, ids: Option<&[i64]>, consumer: Option<&str>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.context("returning messages")?;
        without_flush_wait(&mut tx).await?;
        let queues: Vec<String> = sqlx::query_scalar(
            "UPDATE queue_messages SET visible_at = now(), consumer = NULL
             WHERE id = ANY($1) OR consumer = $2
             RETURNING queue",
        )
        .bind(ids)
        .bind(consumer)
        .fetch_all(&mut *tx)
        .await
        .context("returning messages to the queue")?;
        let mut distinct = queues;
        distinct.sort_unstable();
        distinct.dedup();
        sqlx::query("SELECT pg_notify($1, q) FROM UNNEST($2::text[]) AS q")
            .bind(QUEUE_CHANNEL)
            .bind(&distinct)
            .execute(&mut *tx)
            .await
            .context("waking table-queue consumers")?;
        tx.commit().await.context("returning messages to the queue")
    }

    pub async fn queue_dead_letter(&self, ids: &[i64], reason: &str) -> Result<(), StoreError> {
        sqlx::query(
            "WITH dead AS (DELETE FROM queue_messages WHERE id = ANY($1) RETURNING *)
             INSERT INTO queue_dead_letters (id, queue, body, message_id, deliveries, reason, created_at)
             SELECT id, queue, body, message_id, deliveries, $2, created_at FROM dead
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(ids)
        .bind(reason)
        .execute(&self.pool)
        .await
        .context("dead-lettering messages")?;
        Ok(())
    }

    pub async fn queue_extend(
        &self,
        consumer: &str,
        ids: &[i64],
        lease: Duration,
    ) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context("renewing the lease of held messages")?;
        without_flush_wait(&mut tx).await?;
        sqlx::query(
            "UPDATE queue_messages SET visible_at = now() + $2 * interval '1 second'
             WHERE consumer = $1 AND id = ANY($3)",
        )
        .bind(consumer)
        .bind(lease.as_secs_f64())
        .bind(ids)
        .execute(&mut *tx)
        .await
        .context("renewing the lease of held messages")?;
        tx.commit()
            .await
            .context("renewing the lease of held messages")
    }

    pub async fn queue_depth(&self, queue: &str) -> Result<u32, StoreError> {
        let depth: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM queue_messages WHERE queue = $1 AND visible_at <= now()",
        )
        .bind(queue)
        .fetch_one(&self.pool)
        .await
        .context("counting queued messages")?;
        Ok(u32::try_from(depth).unwrap_or(u32::MAX))
    }

    pub async fn queue_next_visible(&self, queue: &str) -> Result<Option<Duration>, StoreError> {
        let seconds: Option<f64> = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM min(visible_at) - now())::float8
             FROM queue_messages WHERE queue = $1 AND visible_at > now()",
        )
        .bind(queue)
        .fetch_one(&self.pool)
        .await
        .context("looking for held messages")?;
        Ok(seconds.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }

    pub async fn queue_dead_letters(&self, limit: i64) -> Result<Vec<DeadLetter>, StoreError> {
        sqlx::query_as(
            "SELECT id, queue, body, message_id, deliveries, reason, created_at, dead_at
             FROM queue_dead_letters ORDER BY dead_at DESC, id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .context("reading dead letters")
    }

    pub async fn queue_wakeups(&self, _poll: Duration) -> Result<QueueWakeups, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool)
            .await
            .context("connecting to listen for queued messages")?;
        listener
            .listen(QUEUE_CHANNEL)
            .await
            .context("listening for queued messages")?;
        Ok(QueueWakeups {
            inner: WakeupsInner::Postgres(listener),
        })
    }
}

/// The next wake-up for `queue` from a table-queue listener.
pub(super) async fn next_queue_wakeup(
    listener: &mut sqlx::postgres::PgListener,
    queue: &str,
) -> Result<(), StoreError> {
    loop {
        let notification = listener
            .recv()
            .await
            .context("waiting for queued messages")?;
        if notification.payload() == queue {
            return Ok(());
        }
    }
}
