//! The database: connecting (creating the database on first use), migrations, and every query.
//! No other module writes SQL.
//!
//! # Transactions, locks, and timeouts
//! A registry import is one transaction: it deletes the old registry and inserts the new one, so a
//! concurrent reader sees either the old registry or the new one, never a mix, and a failure
//! leaves the old one in place. Pool acquisition times out after 10 seconds with an error that
//! names the server.

use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};

use crate::config::DatabaseConfig;
use crate::jobfile::JobDefinition;

/// Embedded migrations: every subcommand that uses the database applies them on connect.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The channel scheduler processes listen on; the payload says what changed.
pub const NOTIFY_CHANNEL: &str = "jobschleuder";

/// Rows written per statement during an import: large enough to be fast, small enough to report
/// progress on big files.
const IMPORT_CHUNK: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the database at {target}: {source}")]
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
    #[error("database error while {context}: {source}")]
    Query {
        context: &'static str,
        source: sqlx::Error,
    },
}

trait Context<T> {
    fn context(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    fn context(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Query { context, source })
    }
}

/// The Postgres store; cheap to clone (a pool).
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
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

impl Store {
    /// Connects, creating the database if it does not exist yet, and applies the migrations.
    pub async fn connect(config: &DatabaseConfig) -> Result<Store, StoreError> {
        let target = config.describe();
        let options = config.connect_options().map_err(|e| StoreError::Connect {
            target: target.clone(),
            source: sqlx::Error::Configuration(e.to_string().into()),
        })?;
        let pool_options = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(10));
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
        let store = Store { pool };
        store.migrate(&target).await?;
        Ok(store)
    }

    /// Wraps an existing pool and applies the migrations.
    pub async fn from_pool(pool: PgPool) -> Result<Store, StoreError> {
        let store = Store { pool };
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
    /// file is in the registry afterwards, or nothing changed. The schedule of removed entries
    /// goes with them; the run history stays. `progress(done, total)` is called per chunk.
    pub async fn replace_registry(
        &self,
        jobs: &[JobDefinition],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<ImportSummary, StoreError> {
        let mut tx = self.pool.begin().await.context("starting the import")?;
        // One importer at a time; a second waits rather than interleaving.
        sqlx::query("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .context("locking the jobs table")?;
        let before: Vec<Option<String>> = sqlx::query_scalar("SELECT name FROM jobs")
            .fetch_all(&mut *tx)
            .await
            .context("reading the current jobs")?;
        let new_names: std::collections::HashSet<&str> =
            jobs.iter().map(|j| j.name.as_str()).collect();
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

        for statement in [
            "DELETE FROM schedule",
            "DELETE FROM registry",
            "DELETE FROM jobs",
        ] {
            tx.execute(statement)
                .await
                .context("removing the old registry")?;
        }

        let mut done = 0;
        for chunk in jobs.chunks(IMPORT_CHUNK) {
            insert_chunk(&mut tx, chunk).await?;
            done += chunk.len();
            progress(done, jobs.len());
        }
        sqlx::query("SELECT pg_notify($1, 'registry')")
            .bind(NOTIFY_CHANNEL)
            .execute(&mut *tx)
            .await
            .context("notifying schedulers")?;
        tx.commit().await.context("committing the import")?;
        Ok(summary)
    }

    /// All jobs, by id.
    pub async fn jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        sqlx::query_as(
            "SELECT id, name, job, description, preprocessing, postprocessing, arguments,
                    timeout_seconds, retries, queue
             FROM jobs ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .context("reading jobs")
    }

    /// All registry entries with their job's name and description, by id.
    pub async fn registry(&self) -> Result<Vec<RegistryRow>, StoreError> {
        sqlx::query_as(
            "SELECT r.id, r.job, j.name, j.description, r.schedule, r.timezone, r.misfire
             FROM registry r LEFT JOIN jobs j ON j.id = r.job
             ORDER BY r.id",
        )
        .fetch_all(&self.pool)
        .await
        .context("reading the registry")
    }
}

async fn insert_chunk(tx: &mut PgConnection, chunk: &[JobDefinition]) -> Result<(), StoreError> {
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
    sqlx::query(
        "INSERT INTO jobs (name, job, description, preprocessing, postprocessing, arguments,
                           timeout_seconds, retries, queue)
         SELECT name, job, description, preprocessing, postprocessing, arguments::json,
                timeout_seconds, retries, queue
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::float8[], $8::int4[], $9::text[])
           AS t(name, job, description, preprocessing, postprocessing, arguments,
                timeout_seconds, retries, queue)",
    )
    .bind(&names)
    .bind(&job)
    .bind(&description)
    .bind(&pre)
    .bind(&post)
    .bind(&arguments)
    .bind(&timeout)
    .bind(&retries)
    .bind(&queue)
    .execute(&mut *tx)
    .await
    .context("inserting jobs")?;

    let scheduled: Vec<&JobDefinition> = chunk.iter().filter(|j| j.schedule.is_some()).collect();
    let names: Vec<&str> = scheduled.iter().map(|j| j.name.as_str()).collect();
    let schedules: Vec<&str> = scheduled
        .iter()
        .filter_map(|j| j.schedule.as_ref().map(|s| s.expression()))
        .collect();
    let zones: Vec<Option<String>> = scheduled
        .iter()
        .map(|j| j.timezone.map(|t| t.name().to_string()))
        .collect();
    let misfire: Vec<&str> = scheduled.iter().map(|j| j.misfire.as_str()).collect();
    sqlx::query(
        "INSERT INTO registry (job, schedule, timezone, misfire)
         SELECT j.id, t.schedule, t.timezone, t.misfire
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS t(name, schedule, timezone, misfire)
         JOIN jobs j ON j.name = t.name",
    )
    .bind(&names)
    .bind(&schedules)
    .bind(&zones)
    .bind(&misfire)
    .execute(&mut *tx)
    .await
    .context("inserting registry entries")?;
    Ok(())
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
