//! Benchmark: the scheduler's periodic work on top of a big run history.
//!
//! `cargo run --release --example bench_history -- [ROWS]` (default 10000000) fills `job_runs`
//! of a scratch database with ROWS finished runs of 1,000 jobs over 60 days (plus a few running
//! and queued ones), then prints, one figure per line (`name value unit`):
//! - `fill`: how long the history took to write (not a figure of ours; for orientation),
//! - `pass`: one scheduling pass creating the runs of 100 due entries, and the wake-up query,
//! - `sweep`: the orphan sweep and the republishing of unclaimed runs,
//! - `prune_rate`: runs per second pruned (retention 30 days, in the scheduler's chunks),
//! - `runs_job`: `runs --job NAME` (the 20 newest runs of one job).
//!
//! The server comes from JOBSCHLEUDER_TEST_DATABASE_URL (default
//! postgres://postgres@127.0.0.1:5432/postgres); a database of its own is created and dropped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jobschleuder::config::{Config, DatabaseConfig, Secret};
use jobschleuder::jobfile;
use jobschleuder::scheduler;
use jobschleuder::store::{EntrySchedule, Store};
use sqlx::{Connection, Executor, PgConnection};

/// Rows written per statement while filling.
const FILL_CHUNK: i64 = 1_000_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: i64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000_000);
    let admin = std::env::var("JOBSCHLEUDER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let name = format!("js_bench_history_{}", std::process::id());
    let mut url = url::Url::parse(&admin)?;
    url.set_path(&format!("/{name}"));
    let result = run(rows, &url, &name).await;
    let mut conn = PgConnection::connect(&admin).await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    result
}

async fn run(rows: i64, url: &url::Url, name: &str) -> Result<(), Box<dyn std::error::Error>> {
    let database = DatabaseConfig {
        sqlite: None,
        poll_interval: std::time::Duration::from_millis(250),
        worker_lease: std::time::Duration::from_secs(15),
        url: Some(Secret::new(url.to_string())),
        host: String::new(),
        port: 0,
        user: String::new(),
        password: None,
        database: name.to_string(),
        max_connections: 4,
    };
    let store = Store::connect(&database).await?;
    let config =
        Config::from_str_with_env(&PathBuf::from("bench.yaml"), "timezone: UTC\n", &|_| None)?;

    let started = Instant::now();
    let mut written = 0;
    while written < rows {
        let count = FILL_CHUNK.min(rows - written);
        sqlx::query(
            "INSERT INTO job_runs (id, job_name, job, trigger, status, attempt, worker, arguments,
                                   scheduled_for, created_at, published_at, started_at, finished_at, result)
             SELECT gen_random_uuid(), 'job ' || (i % 1000), 'command', 'schedule', 'succeeded', 1, 'w1',
                    '{\"host\": \"sw1\"}', t, t, t, t, t + interval '2 seconds', '{\"exit_code\": 0}'
             FROM generate_series($1::int8, $2::int8) AS i,
                  LATERAL (SELECT now() - (i::float8 / $3 * 5184000) * interval '1 second' AS t) s",
        )
        .bind(written)
        .bind(written + count - 1)
        .bind(rows as f64)
        .execute(store.pg_pool().expect("a Postgres store"))
        .await?;
        written += count;
        eprintln!("filling: {written}/{rows} runs");
    }
    // A few runs in flight, as in a live installation: running (their workers alive or not)
    // and queued.
    sqlx::query(
        "INSERT INTO job_runs (id, job_name, job, trigger, status, attempt, claim_token, created_at, published_at)
         SELECT gen_random_uuid(), 'job ' || i, 'command', 'manual',
                CASE WHEN i % 2 = 0 THEN 'running' ELSE 'queued' END, 1, 4242, now(), now()
         FROM generate_series(1, 200) AS i",
    )
    .execute(store.pg_pool().expect("a Postgres store"))
    .await?;
    sqlx::raw_sql("VACUUM ANALYZE job_runs")
        .execute(store.pg_pool().expect("a Postgres store"))
        .await?;
    figure("fill", started.elapsed().as_secs_f64(), "s");

    // 100 registry entries, all due now.
    let mut text = String::from("jobs:\n");
    for i in 0..100 {
        text.push_str(&format!(
            "- id: job {i}\n  job: command\n  schedule: '0 3 * * *'\n"
        ));
    }
    let jobs = jobfile::parse(Path::new("bench.yaml"), &text, None)?;
    store.replace_registry(&jobs, &mut |_, _| {}).await?;
    store
        .replace_schedule(&|e: &EntrySchedule, now| {
            scheduler::next_run(&e.schedule, e.timezone.as_deref(), config.timezone, now)
        })
        .await?;
    sqlx::query("UPDATE schedule SET next_run = now() - interval '1 second'")
        .execute(store.pg_pool().expect("a Postgres store"))
        .await?;
    let started = Instant::now();
    let summary = scheduler::create_due_runs(&store, &config, None).await?;
    store.next_wakeup().await?;
    assert_eq!(summary.runs_created, 100);
    figure("pass", started.elapsed().as_secs_f64() * 1000.0, "ms");

    let started = Instant::now();
    store.orphaned_runs().await?;
    store
        .stale_queues(Duration::from_secs(900), "jobschleuder")
        .await?;
    store
        .republish_stale(Duration::from_secs(900), "jobschleuder", "jobschleuder")
        .await?;
    figure("sweep", started.elapsed().as_secs_f64() * 1000.0, "ms");

    let started = Instant::now();
    let mut pruned = 0;
    for _ in 0..20 {
        pruned += store
            .prune_runs(Duration::from_secs(30 * 86400), 5000)
            .await?;
    }
    figure(
        "prune_rate",
        pruned as f64 / started.elapsed().as_secs_f64(),
        "runs/s",
    );

    let started = Instant::now();
    let runs = store.runs(Some("job 7"), None, None, 20).await?;
    assert_eq!(runs.len(), 20);
    figure("runs_job", started.elapsed().as_secs_f64() * 1000.0, "ms");
    Ok(())
}

fn figure(name: &str, value: f64, unit: &str) {
    println!("{name} {value:.1} {unit}");
}
