//! Benchmark: the run path end to end — runs in Postgres, published with confirms, consumed by a
//! worker that calls a plugin, recorded in batches, acknowledged.
//!
//! `cargo build --release --workspace && cargo run --release --example bench_runs -- [RUNS] [SLOTS]`
//! (default 20000 runs, 64 slots). Uses the local Postgres and RabbitMQ (override with
//! JOBSCHLEUDER_TEST_DATABASE_URL and JOBSCHLEUDER_TEST_AMQP_URL) with a scratch database and
//! queue, both removed afterwards. Logging is off, as the figures are about the path itself.

use std::path::Path;
use std::time::{Duration, Instant};

use jobschleuder::config::Config;
use jobschleuder::scheduler::{publish_queued, Publisher};
use jobschleuder::shutdown::Shutdown;
use jobschleuder::store::{NewRun, Store};
use jobschleuder::worker::{self, WorkerOptions};
use sqlx::{Connection, Executor, PgConnection};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let slots: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(64);
    let admin = std::env::var("JOBSCHLEUDER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let amqp = std::env::var("JOBSCHLEUDER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let name = format!("js_bench_runs_{}", std::process::id());
    let mut db_url = url::Url::parse(&admin)?;
    db_url.set_path(&format!("/{name}"));
    let plugins = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .ok_or("no target folder")?
        .to_path_buf();
    if !plugins.join("libhello_world.so").exists() {
        return Err(format!(
            "build the plugins first: cargo build --release --workspace ({})",
            plugins.display()
        )
        .into());
    }
    let text = format!(
        "database:\n  url: {db_url}\n  max_connections: 8\nrabbitmq:\n  url: {amqp}\n  queue: {name}\n\
         plugins:\n  hello_world:\n    plugin_dir: {}\n    plugin: hello_world\n",
        plugins.display()
    );
    let config = Config::from_str_with_env(Path::new("bench.yaml"), &text, &|_| None)?;
    let store = Store::connect(&config.database).await?;
    println!("{runs} runs of hello_world, worker with {slots} slots, queue {name}");

    let started = Instant::now();
    for chunk in (0..runs).collect::<Vec<_>>().chunks(10_000) {
        let batch: Vec<NewRun> = chunk
            .iter()
            .map(|i| NewRun {
                id: None,
                job_name: "bench".into(),
                job: "hello_world".into(),
                job_id: None,
                trigger: "manual",
                queue: None,
                arguments: serde_json::json!({ "i": i })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                preprocessing: None,
                postprocessing: None,
                timeout_seconds: None,
                max_retries: 0,
                parent_id: None,
                published: false,
            })
            .collect();
        store.insert_runs(&batch).await?;
    }
    let inserted = started.elapsed();
    println!(
        "insert:  {:>8.0} runs/s ({:.2}s)",
        runs as f64 / inserted.as_secs_f64(),
        inserted.as_secs_f64()
    );

    let (stop, shutdown) = Shutdown::manual();
    let options = WorkerOptions {
        id: "bench".into(),
        slots,
        queue: name.clone(),
    };
    let worker_store = store.clone();
    let worker_config = config.clone();
    let worker =
        tokio::spawn(
            async move { worker::run(worker_store, &worker_config, options, shutdown).await },
        );

    let started = Instant::now();
    let mut publisher = Publisher::new(&config, "bench");
    let published = publish_queued(&store, &mut publisher, &name, None).await?;
    let publish_time = started.elapsed();
    println!(
        "publish: {:>8.0} runs/s ({published} with confirms in {:.2}s, while the worker consumes)",
        published as f64 / publish_time.as_secs_f64(),
        publish_time.as_secs_f64()
    );
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM job_runs WHERE status = 'succeeded'")
                .fetch_one(store.pool())
                .await?;
        if done as usize >= runs {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("only {done} of {runs} runs recorded after 10 minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = started.elapsed();
    println!(
        "end to end (published → run → recorded → acked): {:>8.0} recorded runs/s ({:.2}s)",
        runs as f64 / total.as_secs_f64(),
        total.as_secs_f64()
    );

    stop.stop();
    let _ = worker.await;
    publisher.close().await;
    store.pool().close().await;
    let connection =
        lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    for queue in [name.clone(), format!("{name}.dead")] {
        let _ = channel
            .queue_delete(
                queue.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let mut conn = PgConnection::connect(&admin).await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    Ok(())
}
