//! Benchmark: validate and import a large job file into a scratch database, then re-import it.
//!
//! `cargo run --release --example bench_import -- [JOBS]` (default 100000). The server comes from
//! JOBSCHLEUDER_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres); a
//! database of its own is created and dropped.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use jobschleuder::config::DatabaseConfig;
use jobschleuder::config::Secret;
use jobschleuder::jobfile;
use jobschleuder::store::Store;
use sqlx::{Connection, Executor, PgConnection};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let admin = std::env::var("JOBSCHLEUDER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let name = format!("js_bench_{}", std::process::id());
    let mut url = url::Url::parse(&admin)?;
    url.set_path(&format!("/{name}"));

    let mut text = String::with_capacity(count * 120);
    text.push_str("jobs:\n");
    for i in 0..count {
        let _ = write!(
            text,
            "- id: job-{i}\n  job: command\n  schedule: \"{} {} * * *\"\n  arguments:\n    host: host-{i}.lab\n",
            i % 60,
            i % 24
        );
    }
    println!(
        "job file: {count} jobs, {:.1} MiB",
        text.len() as f64 / 1048576.0
    );

    let started = Instant::now();
    let jobs = jobfile::parse(Path::new("bench.yaml"), &text, None)?;
    let validate = started.elapsed();
    println!(
        "validate: {:.2}s ({:.0} jobs/s)",
        validate.as_secs_f64(),
        count as f64 / validate.as_secs_f64()
    );

    let config = DatabaseConfig {
        url: Some(Secret::new(url.to_string())),
        host: String::new(),
        port: 0,
        user: String::new(),
        password: None,
        database: name.clone(),
        max_connections: 4,
    };
    let store = Store::connect(&config).await?;
    for round in ["import", "re-import"] {
        let started = Instant::now();
        let summary = store.replace_registry(&jobs, &mut |_, _| {}).await?;
        let elapsed = started.elapsed();
        println!(
            "{round}: {:.2}s ({:.0} jobs/s; {} new, {} replaced)",
            elapsed.as_secs_f64(),
            count as f64 / elapsed.as_secs_f64(),
            summary.added,
            summary.replaced
        );
    }
    store.pool().close().await;
    let mut conn = PgConnection::connect(&admin).await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    Ok(())
}
