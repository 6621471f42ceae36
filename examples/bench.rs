//! The benchmark command: figures of the run path measured against the broker's own ceiling.
//!
//! ```sh
//! cargo build --release --workspace
//! cargo run --release --example bench -- <scenario> [--json]
//! ```
//!
//! Scenarios: `throughput`, `burst`, `lag`, `due`, `import`, `init`, `idle`, `all`. Each prints
//! one line per figure, `name value unit`; `--json` prints one JSON object instead. Uses the
//! local Postgres and RabbitMQ (override with JOBSCHLEUDER_TEST_DATABASE_URL and
//! JOBSCHLEUDER_TEST_AMQP_URL) with a scratch database and queue per scenario, removed
//! afterwards. `import`, `init` and `idle` run the release binary, as operators do.
//!
//! - `throughput`: in one process, on the same queue type, (a) a minimal lapin loop — persistent
//!   200-byte messages published with confirms, consumed by 4 consumers with manual acks — and
//!   (b) the full path: runs inserted in Postgres, published with confirms, consumed by the
//!   worker calling `hello_world`, recorded, acknowledged. Prints both rates and their ratio;
//!   and the lapin loop again with its publishes handed over 1,000 at a time, as the outbox
//!   does (`throughput_raw_broker_pipelined`, `throughput_ratio_pipelined`).
//! - `burst`: 100 entries due in the same second, one worker with 8 slots: scheduled → started;
//!   then again with `worker.lookahead: 16` (`burst_lookahead_16_...`) and with
//!   `worker.lookahead: 0` (`burst_no_lookahead_...`).
//! - `lag`: 100 entries due every second for 10 seconds: scheduled → published.
//! - `due`: 10,000 entries due in the same second: one scheduler pass (create, then publish).
//! - `import` / `init`: `registry --import` of 100,000 jobs, then `scheduler --init`: wall time
//!   and peak RSS of the process.
//! - `idle`: a scheduler and a worker with nothing to do: RSS and CPU over 5 seconds.
//! - `embedded`: the embedded backends: the throughput path on SQLite with the table queue and
//!   on Postgres with the table queue; firing lag (scheduled → started, idle workers) of
//!   scheduler and worker in one process on SQLite, 20 entries every second for 10 seconds;
//!   `standalone` with nothing to do: RSS and CPU over 5 seconds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, Utc};
use futures_util::StreamExt;
use jobschleuder::config::Config;
use jobschleuder::jobfile;
use jobschleuder::scheduler::{self, publish_queued, Publisher};
use jobschleuder::shutdown::Shutdown;
use jobschleuder::store::{EntrySchedule, NewRun, Store};
use jobschleuder::worker::{self, WorkerOptions};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sqlx::{Connection as _, Executor, PgConnection};

type Error = Box<dyn std::error::Error + Send + Sync>;

const SCENARIOS: [&str; 8] = [
    "throughput",
    "burst",
    "lag",
    "due",
    "import",
    "init",
    "idle",
    "embedded",
];
/// Runs of the throughput scenario (both loops).
const THROUGHPUT_RUNS: usize = 30_000;
const THROUGHPUT_SLOTS: usize = 256;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let scenario = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_default();
    let wanted: Vec<&str> = match scenario.as_str() {
        "all" => SCENARIOS.to_vec(),
        s if SCENARIOS.contains(&s) => vec![s],
        _ => {
            eprintln!("usage: bench <{}|all> [--json]", SCENARIOS.join("|"));
            std::process::exit(2);
        }
    };
    let bench = Bench::new(json)?;
    let mut report = Report {
        json,
        figures: Vec::new(),
    };
    report.add(
        "cores",
        std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
        "cores",
    );
    for scenario in wanted {
        let mut scratch = Scratch::new(&bench, scenario).await?;
        let result = match scenario {
            "throughput" => throughput(&bench, &scratch, &mut report).await,
            "burst" => burst(&mut scratch, &mut report).await,
            "lag" => lag(&scratch, &mut report).await,
            "due" => due(&scratch, &mut report).await,
            "import" => import_and_init(&bench, &scratch, &mut report, false).await,
            "init" => import_and_init(&bench, &scratch, &mut report, true).await,
            "idle" => idle(&bench, &scratch, &mut report).await,
            "embedded" => embedded(&bench, &mut report).await,
            _ => unreachable!(),
        };
        scratch.remove(&bench).await;
        result.map_err(|e| format!("{scenario}: {e}"))?;
    }
    if json {
        let figures: serde_json::Map<String, serde_json::Value> = report
            .figures
            .iter()
            .map(|(name, value, unit)| {
                (
                    name.clone(),
                    serde_json::json!({"value": value, "unit": unit}),
                )
            })
            .collect();
        println!("{}", serde_json::Value::Object(figures));
    }
    Ok(())
}

struct Report {
    json: bool,
    figures: Vec<(String, f64, &'static str)>,
}

impl Report {
    fn add(&mut self, name: &str, value: f64, unit: &'static str) {
        if !self.json {
            let shown = if value.abs() >= 100.0 {
                format!("{value:.0}")
            } else {
                format!("{value:.3}")
            };
            println!("{name} {shown} {unit}");
        }
        self.figures.push((name.to_string(), value, unit));
    }
}

/// Where the servers and the built binaries are.
struct Bench {
    admin: String,
    amqp: String,
    /// `target/release`: the plugins and the binary.
    target: PathBuf,
}

impl Bench {
    fn new(quiet: bool) -> Result<Bench, Error> {
        let target = std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .ok_or("no target folder")?
            .to_path_buf();
        for needed in ["libhello_world.so", "jobschleuder"] {
            if !target.join(needed).exists() {
                return Err(format!(
                    "{} is missing: cargo build --release --workspace first",
                    target.join(needed).display()
                )
                .into());
            }
        }
        if !quiet && cfg!(debug_assertions) {
            eprintln!("warning: a debug build; figures mean little (use --release)");
        }
        Ok(Bench {
            admin: std::env::var("JOBSCHLEUDER_TEST_DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string()),
            amqp: std::env::var("JOBSCHLEUDER_TEST_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string()),
            target,
        })
    }
}

/// A scenario's database, queue, config and folder.
struct Scratch {
    name: String,
    config: Config,
    config_path: PathBuf,
    dir: PathBuf,
    store: Store,
    /// The SQLite file's pool, for the figures' queries, when the store is SQLite.
    sqlite: Option<sqlx::SqlitePool>,
}

impl Scratch {
    async fn new(bench: &Bench, scenario: &str) -> Result<Scratch, Error> {
        let name = format!("js_bench_{}_{scenario}", std::process::id());
        let mut db_url = url::Url::parse(&bench.admin)?;
        db_url.set_path(&format!("/{name}"));
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let text = format!(
            "database:\n  url: {db_url}\n  max_connections: 8\nrabbitmq:\n  url: {}\n  queue: {name}\n\
             plugins:\n  hello_world:\n    plugin_dir: {}\n    plugin: hello_world\n  command:\n    plugin_dir: {}\n    plugin: command\n\
             runs:\n  retention_days: 0\n",
            bench.amqp,
            bench.target.display(),
            bench.target.display()
        );
        let config_path = dir.join("config.yaml");
        std::fs::write(&config_path, &text)?;
        let config = Config::from_str_with_env(&config_path, &text, &|_| None)?;
        let store = Store::open(&config).await?;
        Ok(Scratch {
            name,
            config,
            config_path,
            dir,
            store,
            sqlite: None,
        })
    }

    /// A scratch store with the table queue: in a SQLite file (`sqlite`), or in a Postgres
    /// database of its own.
    async fn embedded(bench: &Bench, scenario: &str, sqlite: bool) -> Result<Scratch, Error> {
        let name = format!("js_bench_{}_{scenario}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let database = if sqlite {
            format!(
                "database:\n  path: {}\nqueue:\n  type: sqlite\n  name: {name}\n",
                dir.join("bench.db").display()
            )
        } else {
            let mut db_url = url::Url::parse(&bench.admin)?;
            db_url.set_path(&format!("/{name}"));
            format!("database:\n  url: {db_url}\n  max_connections: 8\nqueue:\n  type: postgres\n  name: {name}\n")
        };
        let text = format!(
            "{database}plugins:\n  hello_world:\n    plugin_dir: {}\n    plugin: hello_world\n\
             runs:\n  retention_days: 0\nlistener:\n  bind: 127.0.0.1:0\n",
            bench.target.display()
        );
        let config_path = dir.join("config.yaml");
        std::fs::write(&config_path, &text)?;
        let config = Config::from_str_with_env(&config_path, &text, &|_| None)?;
        let store = Store::open(&config).await?;
        let pool = if sqlite {
            Some(
                sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.join("bench.db").display()))
                    .await?,
            )
        } else {
            None
        };
        Ok(Scratch {
            name,
            config,
            config_path,
            dir,
            store,
            sqlite: pool,
        })
    }

    async fn remove(self, bench: &Bench) {
        if let Some(pool) = self.store.pg_pool() {
            pool.close().await;
        }
        if let Some(pool) = &self.sqlite {
            pool.close().await;
        }
        if let Ok(connection) =
            Connection::connect(&bench.amqp, ConnectionProperties::default()).await
        {
            if let Ok(channel) = connection.create_channel().await {
                for queue in [
                    self.name.clone(),
                    format!("{}.dead", self.name),
                    format!("{}.raw", self.name),
                    format!("{}.rawp", self.name),
                ] {
                    let _ = channel
                        .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
                        .await;
                }
            }
            let _ = connection.close(200, ShortString::from("done")).await;
        }
        if let Ok(mut conn) = PgConnection::connect(&bench.admin).await {
            let _ = conn
                .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
                .await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Imports `count` jobs of `job` with `schedule`.
    async fn import(&self, count: usize, job: &str, schedule: &str) -> Result<(), Error> {
        let mut text = String::from("jobs:\n");
        for i in 0..count {
            let _ = write!(
                text,
                "- id: job-{i}\n  job: {job}\n  schedule: \"{schedule}\"\n"
            );
        }
        let jobs = jobfile::parse(Path::new("bench.yaml"), &text, None)?;
        self.store.replace_registry(&jobs, &mut |_, _| {}).await?;
        Ok(())
    }

    /// Starts the scheduler (on a thread of its own: its pass is not `Send`) and a worker with
    /// `slots` slots in this process; `stop` ends both.
    fn start(&self, slots: usize) -> Running {
        let (stop, shutdown) = Shutdown::manual();
        let (config, down) = (self.config.clone(), shutdown.clone());
        let scheduler = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            // A pool of its own: connections live on the runtime that opened them.
            runtime.block_on(async move {
                let store = Store::open(&config).await.expect("the database");
                let _ = scheduler::run(&store, &config, false, down).await;
            });
        });
        let (config, queue) = (self.config.clone(), self.name.clone());
        let worker = tokio::spawn(async move {
            // Its own pool, as a worker process has.
            let store = Store::open(&config).await.expect("the database");
            let options = WorkerOptions {
                id: "bench".into(),
                slots,
                queue,
            };
            let _ = worker::run(store, &config, options, shutdown).await;
        });
        Running {
            stop,
            scheduler,
            worker,
        }
    }

    async fn count(&self, query: &str) -> Result<i64, Error> {
        if let Some(pool) = &self.sqlite {
            return Ok(sqlx::query_scalar(query).fetch_one(pool).await?);
        }
        Ok(sqlx::query_scalar(query)
            .fetch_one(self.store.pg_pool().expect("a Postgres store"))
            .await?)
    }

    /// When the last run was recorded (its `finished_at`).
    async fn last_finished(&self) -> Result<chrono::DateTime<chrono::Utc>, Error> {
        let query = "SELECT max(finished_at) FROM job_runs";
        let last = if let Some(pool) = &self.sqlite {
            let text: Option<String> = sqlx::query_scalar(query).fetch_one(pool).await?;
            text.map(|t| chrono::DateTime::parse_from_rfc3339(&t).map(|t| t.to_utc()))
                .transpose()?
        } else {
            sqlx::query_scalar(query)
                .fetch_one(self.store.pg_pool().expect("a Postgres store"))
                .await?
        };
        last.ok_or_else(|| "no run was recorded".into())
    }

    /// Waits until `query` (a count) reaches `target`, at most `limit`. It looks every 200 ms:
    /// a count of a large table, run often, takes the CPU the measured path needs.
    async fn wait_count(&self, query: &str, target: i64, limit: Duration) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            let n = self.count(query).await?;
            if n >= target {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(format!("{n} of {target} after {limit:?}: {query}").into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Percentiles (seconds → milliseconds) of `query`'s one float column.
    async fn percentiles(&self, query: &str) -> Result<(f64, f64, usize), Error> {
        let mut values: Vec<f64> = sqlx::query_scalar(query)
            .fetch_all(self.store.pg_pool().expect("a Postgres store"))
            .await?;
        if values.is_empty() {
            return Err(format!("no values: {query}").into());
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() as f64 - 1.0) * q).round() as usize] * 1000.0;
        Ok((at(0.5), at(0.99), values.len()))
    }
}

/// A scheduler and a worker running in this process.
struct Running {
    stop: jobschleuder::shutdown::ManualStop,
    scheduler: std::thread::JoinHandle<()>,
    worker: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.stop.stop();
        let _ = self.worker.await;
        let _ = tokio::task::spawn_blocking(move || self.scheduler.join()).await;
    }
}

// ---- throughput ----

async fn throughput(bench: &Bench, scratch: &Scratch, report: &mut Report) -> Result<(), Error> {
    let runs = THROUGHPUT_RUNS;
    let before = CpuShares::now();
    let raw = raw_broker_loop(bench, &format!("{}.raw", scratch.name), runs, false).await?;
    let raw_cpu = CpuShares::now().since(&before);
    report.add("throughput_raw_broker", raw, "msgs/s");
    let pipelined = raw_broker_loop(bench, &format!("{}.rawp", scratch.name), runs, true).await?;
    report.add("throughput_raw_broker_pipelined", pipelined, "msgs/s");
    let (published, ours, ours_cpu) = full_path(scratch, runs).await?;
    report.add("throughput_published_runs", published, "runs/s");
    report.add("throughput_recorded_runs", ours, "runs/s");
    report.add("throughput_ratio", ours / raw, "ours/raw");
    report.add(
        "throughput_ratio_pipelined",
        ours / pipelined,
        "ours/raw_pipelined",
    );
    // CPU time per message, by process: steadier than the rates on a busy machine, and it
    // shows where the gap between the two loops lies. (Postgres's own background work during
    // the raw loop is not reported.)
    let mut cpu = |name: &str, window: &CpuShares, ticks: Option<u64>, unit| match ticks {
        Some(ticks) => report.add(name, window.per_message(ticks, runs), unit),
        None => eprintln!("{name}: no such process visible in /proc, not measured"),
    };
    cpu(
        "throughput_raw_cpu_client",
        &raw_cpu,
        Some(raw_cpu.this),
        "us/msg",
    );
    cpu(
        "throughput_raw_cpu_broker",
        &raw_cpu,
        raw_cpu.broker,
        "us/msg",
    );
    // Ours: creating the rows, publishing them and the worker, all in this process (with the
    // benchmark's look at the count of finished runs every 200 ms).
    cpu(
        "throughput_cpu_ours",
        &ours_cpu,
        Some(ours_cpu.this),
        "us/run",
    );
    cpu(
        "throughput_cpu_postgres",
        &ours_cpu,
        ours_cpu.postgres,
        "us/run",
    );
    cpu(
        "throughput_cpu_broker",
        &ours_cpu,
        ours_cpu.broker,
        "us/run",
    );
    Ok(())
}

/// CPU time used so far (clock ticks) by this process, by Postgres's processes and by the
/// broker's, read from `/proc`; `None` where no such process is visible (a server in another
/// container or on another host).
#[derive(Clone, Copy)]
struct CpuShares {
    this: u64,
    postgres: Option<u64>,
    broker: Option<u64>,
    ticks_per_second: f64,
}

impl CpuShares {
    fn now() -> CpuShares {
        let (mut postgres, mut broker) = (None, None);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            // With the time of their ended children: a connection or an autovacuum worker
            // that ends within a measurement counts through the postmaster, which reaps it.
            let sum = match comm.trim() {
                "postgres" => &mut postgres,
                "beam.smp" => &mut broker,
                _ => continue,
            };
            *sum = Some(sum.unwrap_or(0) + cpu_ticks_with_children(pid));
        }
        CpuShares {
            this: cpu_ticks(std::process::id()),
            postgres,
            broker,
            // SAFETY: sysconf has no preconditions.
            ticks_per_second: unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64,
        }
    }

    /// The time used between `earlier` and `self`.
    fn since(&self, earlier: &CpuShares) -> CpuShares {
        let between = |now: Option<u64>, then: Option<u64>| Some(now?.saturating_sub(then?));
        CpuShares {
            this: self.this.saturating_sub(earlier.this),
            postgres: between(self.postgres, earlier.postgres),
            broker: between(self.broker, earlier.broker),
            ticks_per_second: self.ticks_per_second,
        }
    }

    /// Microseconds per message of `ticks` over `messages`.
    fn per_message(&self, ticks: u64, messages: usize) -> f64 {
        ticks as f64 / self.ticks_per_second / messages as f64 * 1e6
    }
}

/// The full path for `runs` runs: rows inserted, published, consumed by the worker calling
/// `hello_world`, recorded, acknowledged. (Publish rate, recorded rate) in runs per second,
/// and the CPU time it took.
async fn full_path(scratch: &Scratch, runs: usize) -> Result<(f64, f64, CpuShares), Error> {
    let cpu = CpuShares::now();
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let (stop, tasks) = {
        let (stop, shutdown) = Shutdown::manual();
        let (config, queue) = (scratch.config.clone(), scratch.name.clone());
        let worker = tokio::spawn(async move {
            // Its own pool, as a worker process has.
            let store = Store::open(&config).await.expect("the database");
            let options = WorkerOptions {
                id: "bench".into(),
                slots: THROUGHPUT_SLOTS,
                queue,
            };
            let _ = worker::run(store, &config, options, shutdown).await;
        });
        (stop, vec![worker])
    };
    // Rows first (as a scheduler pass creates them), then published with confirms, while the
    // worker consumes, runs the plugin, records and acknowledges.
    let mut publisher = Publisher::new(&scratch.config, &scratch.store, "bench");
    for chunk in (0..runs).collect::<Vec<_>>().chunks(5_000) {
        let batch: Vec<NewRun> = chunk.iter().map(|i| bench_run(*i)).collect();
        scratch.store.insert_runs(&batch).await?;
        publish_queued(&scratch.store, &mut publisher, &scratch.name, None).await?;
    }
    let published = started.elapsed();
    scratch
        .wait_count(
            "SELECT count(*) FROM job_runs WHERE status = 'succeeded'",
            runs as i64,
            Duration::from_secs(300),
        )
        .await?;
    // Up to the last run's record, not to when the wait above looked.
    let took = (scratch.last_finished().await? - started_at)
        .to_std()
        .unwrap_or_else(|_| started.elapsed());
    let ours = runs as f64 / took.as_secs_f64();
    // Before the worker stops: its connections' backends end with it.
    let cpu = CpuShares::now().since(&cpu);
    stop.stop();
    for task in tasks {
        let _ = task.await;
    }
    publisher.close().await;
    Ok((runs as f64 / published.as_secs_f64(), ours, cpu))
}

// ---- the embedded backends ----

async fn embedded(bench: &Bench, report: &mut Report) -> Result<(), Error> {
    for (sqlite, name) in [(true, "sqlite"), (false, "postgres_table")] {
        let scratch = Scratch::embedded(bench, &format!("embedded_{name}"), sqlite).await?;
        let measured = full_path(&scratch, THROUGHPUT_RUNS).await;
        scratch.remove(bench).await;
        let (published, recorded, _) = measured?;
        report.add(
            &format!("embedded_{name}_published_runs"),
            published,
            "runs/s",
        );
        report.add(
            &format!("embedded_{name}_recorded_runs"),
            recorded,
            "runs/s",
        );
    }

    // Firing lag in one process on SQLite: 20 entries every second for 10 seconds, 8 slots.
    let scratch = Scratch::embedded(bench, "embedded_lag", true).await?;
    let measured = async {
        scratch.import(20, "hello_world", "* * * * * *").await?;
        let running = scratch.start(8);
        let first = slot_ahead(&scratch.store, 2).await?;
        let last = first + chrono::TimeDelta::seconds(9);
        scratch
            .wait_count(
                &format!(
                    "SELECT count(*) FROM job_runs WHERE status = 'succeeded' AND scheduled_for >= '{}' AND scheduled_for <= '{}'",
                    first.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
                    last.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
                ),
                200,
                Duration::from_secs(60),
            )
            .await?;
        running.stop().await;
        let mut lags: Vec<f64> = scratch
            .store
            .runs(None, Some("succeeded"), None, 100_000)
            .await?
            .iter()
            .filter(|r| r.scheduled_for.is_some_and(|t| t >= first && t <= last))
            .filter_map(|r| Some((r.started_at? - r.scheduled_for?).num_microseconds()? as f64 / 1000.0))
            .collect();
        lags.sort_by(f64::total_cmp);
        let at = |q: f64| lags[((lags.len() as f64 - 1.0) * q).round() as usize];
        Ok::<_, Error>((at(0.5), at(0.99)))
    }
    .await;
    scratch.remove(bench).await;
    let (p50, p99) = measured?;
    report.add("standalone_scheduled_to_started_p50", p50, "ms");
    report.add("standalone_scheduled_to_started_p99", p99, "ms");

    // `standalone` with nothing to do.
    let scratch = Scratch::embedded(bench, "embedded_idle", true).await?;
    scratch.import(10, "hello_world", "0 0 1 1 *").await?;
    let mut child = std::process::Command::new(bench.target.join("jobschleuder"))
        .arg("--config")
        .arg(&scratch.config_path)
        .args(["--loglevel", "warn", "standalone", "--workers", "8"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = cpu_ticks(child.id());
    let measured = Duration::from_secs(5);
    tokio::time::sleep(measured).await;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu =
        (cpu_ticks(child.id()) - before) as f64 / ticks_per_second / measured.as_secs_f64() * 100.0;
    let rss = rss_mib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    scratch.remove(bench).await;
    report.add("idle_standalone_rss", rss, "MiB");
    report.add("idle_standalone_cpu", cpu, "%");
    Ok(())
}

fn bench_run(i: usize) -> NewRun {
    NewRun {
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
    }
}

/// The broker's ceiling here: `count` persistent 200-byte messages published with confirms
/// (1,000 confirms awaited at a time) to a quorum queue, consumed by 4 consumers with manual
/// acks. Messages per second, from the first publish to the last ack. Each publish is handed
/// to the connection and waited for on its own, or, `pipelined`, 1,000 at once (as the outbox
/// publishes), which lets the connection write them together.
async fn raw_broker_loop(
    bench: &Bench,
    queue: &str,
    count: usize,
    pipelined: bool,
) -> Result<f64, Error> {
    let connection = Connection::connect(&bench.amqp, ConnectionProperties::default()).await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    let setup = connection.create_channel().await?;
    setup
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut consumers = Vec::new();
    for n in 0..4 {
        let channel = connection.create_channel().await?;
        channel.basic_qos(256, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(format!("raw-{n}")),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let done = done_tx.clone();
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                if delivery.ack(BasicAckOptions::default()).await.is_err() {
                    break;
                }
                if done.send(()).is_err() {
                    break;
                }
            }
            drop(channel);
        }));
    }
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = vec![b'x'; 200];
    let started = Instant::now();
    let publish = || {
        publisher.basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_delivery_mode(2),
        )
    };
    let mut left = count;
    while left > 0 {
        let chunk = left.min(1000);
        left -= chunk;
        let mut confirms = Vec::with_capacity(chunk);
        if pipelined {
            for sent in futures_util::future::join_all((0..chunk).map(|_| publish())).await {
                confirms.push(sent?);
            }
        } else {
            for _ in 0..chunk {
                confirms.push(publish().await?);
            }
        }
        for confirm in confirms {
            confirm.await?;
        }
    }
    for _ in 0..count {
        done_rx.recv().await.ok_or("consumers ended early")?;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    for consumer in consumers {
        consumer.abort();
    }
    let _ = connection.close(200, ShortString::from("done")).await;
    Ok(rate)
}

// ---- scheduling latency ----

/// The database's clock, rounded up to a whole second `ahead` seconds from now.
async fn slot_ahead(store: &Store, ahead: i64) -> Result<DateTime<Utc>, Error> {
    let now = store.now().await?;
    Ok((now + chrono::TimeDelta::seconds(ahead)).duration_trunc(chrono::TimeDelta::seconds(1))?)
}

async fn burst(scratch: &mut Scratch, report: &mut Report) -> Result<(), Error> {
    scratch.import(100, "hello_world", "0 0 1 1 *").await?;
    burst_round(scratch, report, "burst").await?;
    // Again with two deliveries waiting per slot (`worker.lookahead: 16`), and without any
    // (`worker.lookahead: 0`).
    for (lookahead, prefix) in [(16, "burst_lookahead_16"), (0, "burst_no_lookahead")] {
        if let Some(pool) = scratch.store.pg_pool() {
            sqlx::query("DELETE FROM job_runs").execute(pool).await?;
        }
        scratch.config.worker.lookahead = Some(lookahead);
        burst_round(scratch, report, prefix).await?;
    }
    scratch.config.worker.lookahead = None;
    Ok(())
}

/// 100 entries due in the same second, one worker with 8 slots; figures named `prefix_...`.
async fn burst_round(scratch: &Scratch, report: &mut Report, prefix: &str) -> Result<(), Error> {
    let slot = slot_ahead(&scratch.store, 3).await?;
    scratch
        .store
        .replace_schedule(&|_: &EntrySchedule, _| Some(slot))
        .await?;
    let running = scratch.start(8);
    scratch
        .wait_count(
            "SELECT count(*) FROM job_runs WHERE status = 'succeeded'",
            100,
            Duration::from_secs(60),
        )
        .await?;
    running.stop().await;
    for (figure, column) in [
        ("started", "started_at"),
        ("published", "published_at"),
        ("created", "created_at"),
    ] {
        let (p50, p99, _) = scratch
            .percentiles(&format!(
                "SELECT EXTRACT(EPOCH FROM {column} - scheduled_for)::float8 FROM job_runs WHERE scheduled_for IS NOT NULL"
            ))
            .await?;
        report.add(&format!("{prefix}_scheduled_to_{figure}_p50"), p50, "ms");
        report.add(&format!("{prefix}_scheduled_to_{figure}_p99"), p99, "ms");
    }
    Ok(())
}

async fn lag(scratch: &Scratch, report: &mut Report) -> Result<(), Error> {
    scratch.import(100, "hello_world", "* * * * * *").await?;
    let running = scratch.start(32);
    let first = slot_ahead(&scratch.store, 2).await?;
    let last = first + chrono::TimeDelta::seconds(9);
    scratch
        .wait_count(
            &format!(
                "SELECT count(*) FROM job_runs WHERE status = 'succeeded' AND scheduled_for = '{}'",
                last.to_rfc3339()
            ),
            100,
            Duration::from_secs(60),
        )
        .await?;
    running.stop().await;
    let window = format!(
        "scheduled_for BETWEEN '{}' AND '{}'",
        first.to_rfc3339(),
        last.to_rfc3339()
    );
    let (p50, p99, n) = scratch
        .percentiles(&format!(
            "SELECT EXTRACT(EPOCH FROM published_at - scheduled_for)::float8 FROM job_runs WHERE {window}"
        ))
        .await?;
    if n < 1000 {
        return Err(format!("{n} runs in 10 seconds of 100 jobs").into());
    }
    report.add("lag_scheduled_to_published_p50", p50, "ms");
    report.add("lag_scheduled_to_published_p99", p99, "ms");
    let (p50, p99, _) = scratch
        .percentiles(&format!(
            "SELECT EXTRACT(EPOCH FROM started_at - scheduled_for)::float8 FROM job_runs WHERE {window}"
        ))
        .await?;
    report.add("lag_scheduled_to_started_p50", p50, "ms");
    report.add("lag_scheduled_to_started_p99", p99, "ms");
    Ok(())
}

async fn due(scratch: &Scratch, report: &mut Report) -> Result<(), Error> {
    const ENTRIES: usize = 10_000;
    scratch.import(ENTRIES, "hello_world", "0 0 1 1 *").await?;
    let slot = slot_ahead(&scratch.store, 0).await? - chrono::TimeDelta::seconds(1);
    scratch
        .store
        .replace_schedule(&|_: &EntrySchedule, _| Some(slot))
        .await?;
    // First the creation alone (in a copy of the schedule's state), then a whole pass as the
    // scheduler runs it: creation and publishing overlapped.
    let started = Instant::now();
    let summary = scheduler::create_due_runs(&scratch.store, &scratch.config, None).await?;
    let created = started.elapsed();
    if summary.runs_created != ENTRIES {
        return Err(format!("created {} of {ENTRIES}", summary.runs_created).into());
    }
    scratch
        .store
        .pg_pool()
        .expect("a Postgres store")
        .execute("DELETE FROM job_runs")
        .await?;
    scratch
        .store
        .replace_schedule(&|_: &EntrySchedule, _| Some(slot))
        .await?;
    let mut publisher = Publisher::new(&scratch.config, &scratch.store, "bench");
    let started = Instant::now();
    let (summary, published) =
        scheduler::create_and_publish(&scratch.store, &scratch.config, &mut publisher, true).await;
    let total = started.elapsed();
    publisher.close().await;
    let (summary, published) = (summary?, published?);
    if summary.runs_created != ENTRIES || published != ENTRIES {
        return Err(format!(
            "created {} and published {published} of {ENTRIES}",
            summary.runs_created
        )
        .into());
    }
    report.add("due_10k_pass_create", created.as_secs_f64(), "s");
    report.add("due_10k_pass_total", total.as_secs_f64(), "s");
    Ok(())
}

// ---- the binary: import, init, idle ----

/// Runs the release binary with `args`; its wall time and peak RSS (MiB).
fn run_binary(bench: &Bench, scratch: &Scratch, args: &[&str]) -> Result<(f64, f64), Error> {
    let started = Instant::now();
    let child = std::process::Command::new(bench.target.join("jobschleuder"))
        .arg("--config")
        .arg(&scratch.config_path)
        .args(["--loglevel", "warn"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(scratch.dir.join("stderr.log"))?)
        .spawn()?;
    let (status, rusage) = wait_with_rusage(child.id() as libc::pid_t)?;
    let wall = started.elapsed().as_secs_f64();
    if status != 0 {
        let log = std::fs::read_to_string(scratch.dir.join("stderr.log")).unwrap_or_default();
        return Err(format!(
            "jobschleuder {} exited with {status}:\n{log}",
            args.join(" ")
        )
        .into());
    }
    Ok((wall, rusage.ru_maxrss as f64 / 1024.0))
}

fn wait_with_rusage(pid: libc::pid_t) -> Result<(i32, libc::rusage), Error> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for the child it reaps.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child; the pointers are to live locals.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
    if reaped != pid {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok((libc::WEXITSTATUS(status), rusage))
}

async fn import_and_init(
    bench: &Bench,
    scratch: &Scratch,
    report: &mut Report,
    init: bool,
) -> Result<(), Error> {
    const JOBS: usize = 100_000;
    let mut text = String::with_capacity(JOBS * 120);
    text.push_str("jobs:\n");
    for i in 0..JOBS {
        let _ = write!(
            text,
            "- id: job-{i}\n  job: command\n  schedule: \"{} {} * * *\"\n  arguments:\n    host: host-{i}.lab\n",
            i % 60,
            i % 24
        );
    }
    let file = scratch.dir.join("jobs.yaml");
    std::fs::write(&file, text)?;
    let file = file.display().to_string();
    let (wall, rss) = run_binary(bench, scratch, &["registry", "--import", &file])?;
    if !init {
        report.add("import_100k_wall", wall, "s");
        report.add("import_100k_peak_rss", rss, "MiB");
        return Ok(());
    }
    let (wall, rss) = run_binary(bench, scratch, &["scheduler", "--init"])?;
    report.add("init_100k_wall", wall, "s");
    report.add("init_100k_peak_rss", rss, "MiB");
    Ok(())
}

async fn idle(bench: &Bench, scratch: &Scratch, report: &mut Report) -> Result<(), Error> {
    scratch.import(10, "hello_world", "0 0 1 1 *").await?;
    let spawn = |args: &[&str]| {
        std::process::Command::new(bench.target.join("jobschleuder"))
            .arg("--config")
            .arg(&scratch.config_path)
            .args(["--loglevel", "warn"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    };
    let mut processes = BTreeMap::new();
    processes.insert("scheduler", spawn(&["scheduler", "--schedule"])?);
    processes.insert("worker", spawn(&["worker", "--id", "1", "--worker", "8"])?);
    // Settled: connected, declared, asleep.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before: BTreeMap<&str, u64> = processes
        .iter()
        .map(|(name, child)| (*name, cpu_ticks(child.id())))
        .collect();
    let measured = Duration::from_secs(5);
    tokio::time::sleep(measured).await;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for (name, child) in processes.iter_mut() {
        let ticks = cpu_ticks(child.id()) - before[name];
        let cpu = ticks as f64 / ticks_per_second / measured.as_secs_f64() * 100.0;
        let rss = rss_mib(child.id());
        let _ = child.kill();
        let _ = child.wait();
        report.add(&format!("idle_{name}_rss"), rss, "MiB");
        report.add(&format!("idle_{name}_cpu"), cpu, "%");
    }
    Ok(())
}

/// User plus system CPU ticks of a process.
fn cpu_ticks(pid: u32) -> u64 {
    stat_ticks(pid, &[11, 12])
}

/// `cpu_ticks` plus those of its ended children that it has waited for.
fn cpu_ticks_with_children(pid: u32) -> u64 {
    stat_ticks(pid, &[11, 12, 13, 14])
}

/// The sum of the given fields of `/proc/<pid>/stat`, counted from the one after the
/// command's closing parenthesis (utime and stime are 11 and 12, cutime and cstime 13 and 14).
fn stat_ticks(pid: u32, at: &[usize]) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    at.iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
        .sum()
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| {
            v.split_whitespace()
                .next()
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
