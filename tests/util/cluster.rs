//! A scheduler/worker setup for one test: its own database, its own queues, its own processes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jobschleuder::config::Config;
use jobschleuder::store::{RunRow, Store};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sqlx::PgPool;

use super::backend::Backend;
use super::{TestDb, Workspace};

pub fn amqp_url() -> String {
    std::env::var("JOBSCHLEUDER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// A process of the binary; killed (SIGKILL) when dropped if still running.
pub struct Process {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "kill -{signal} {} failed",
            self.name
        );
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub backend: Backend,
    /// The Postgres database (Postgres backends); a SQLite cluster's file is in `ws`.
    pub db: TestDb,
    pub ws: Workspace,
    pub queue: String,
    pub config: PathBuf,
    /// Postgres backends only: on SQLite it refuses to connect (such a test is Postgres-only).
    pub pool: PgPool,
    /// The test's store, whichever it is: what backend-neutral checks read.
    pub store: Store,
    spawned: std::sync::atomic::AtomicUsize,
}

impl Cluster {
    /// `extra` is appended to the generated config (scheduler:/worker: sections and such).
    pub async fn new(extra: &str) -> Cluster {
        Self::with_rabbitmq("", extra).await
    }

    /// Like [`Cluster::new`], with `rabbitmq` added to the `rabbitmq:` section (indented
    /// lines).
    pub async fn with_rabbitmq(rabbitmq: &str, extra: &str) -> Cluster {
        Self::with_config(rabbitmq, &crate::plugins::plugin_config_text(), extra).await
    }

    /// With `plugins` (the `plugins:`/`preprocessing:`/`sot:` sections) instead of the test
    /// plugins.
    pub async fn with_config(rabbitmq: &str, plugins: &str, extra: &str) -> Cluster {
        Self::build(Backend::PostgresRabbitmq, rabbitmq, plugins, extra).await
    }

    /// A cluster on `backend` with the test plugins and `extra` config; `None` (after a notice)
    /// when this machine lacks a server the backend needs.
    pub async fn on(backend: Backend, test: &str, extra: &str) -> Option<Cluster> {
        if backend.unavailable(test).is_some() {
            return None;
        }
        Some(Self::build(backend, "", &crate::plugins::plugin_config_text(), extra).await)
    }

    /// Like [`Cluster::on`], with `plugins` (the `plugins:` sections, or none) instead of the
    /// test plugins.
    pub async fn on_with_plugins(
        backend: Backend,
        test: &str,
        plugins: &str,
        extra: &str,
    ) -> Option<Cluster> {
        if backend.unavailable(test).is_some() {
            return None;
        }
        Some(Self::build(backend, "", plugins, extra).await)
    }

    async fn build(backend: Backend, rabbitmq: &str, plugins: &str, extra: &str) -> Cluster {
        let ws = Workspace::new();
        let queue = super::scratch_name();
        let db = if backend.postgres() {
            TestDb::new().await
        } else {
            TestDb::none()
        };
        let sections = match backend {
            Backend::PostgresRabbitmq => format!(
                "rabbitmq:\n  url: {}\n  queue: {queue}\n  delivery_limit: 3\n{rabbitmq}",
                amqp_url()
            ),
            Backend::PostgresTable => format!(
                "queue:\n  type: postgres\n  name: {queue}\n  delivery_limit: 3\n  lease: 3\n"
            ),
            Backend::SqliteTable => format!(
                "database:\n  path: {}\nqueue:\n  type: sqlite\n  name: {queue}\n  delivery_limit: 3\n  lease: 3\n  poll_interval: 0.05\n",
                ws.path().join("jobschleuder.db").display()
            ),
        };
        let text = format!("timezone: UTC\n{sections}{plugins}{extra}");
        let config = ws.write("config.yaml", &text);
        let pool = if backend.postgres() {
            db.pool().await
        } else {
            sqlx::postgres::PgPoolOptions::new()
                .connect_lazy("postgres://this-cluster-is-sqlite.invalid/none")
                .expect("a lazy pool")
        };
        let url = db.url.clone();
        let parsed = Config::from_str_with_env(&config, &text, &|key| {
            (key == "JOBSCHLEUDER_DATABASE_URL" && backend.postgres()).then(|| url.clone())
        })
        .expect("the test config");
        let store = Store::connect(&parsed.database)
            .await
            .expect("the test store");
        Cluster {
            backend,
            db,
            ws,
            queue,
            config,
            pool,
            store,
            spawned: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn command(&self) -> Command {
        let mut command = self.ws.command();
        if self.backend.postgres() {
            command.env("JOBSCHLEUDER_DATABASE_URL", &self.db.url);
        }
        command.arg("--config").arg(&self.config);
        command
    }

    /// Runs one SQL statement on the test's database, whichever it is (write it in the SQL both
    /// speak; [`Cluster::id`] writes a run id).
    pub async fn sql(&self, statement: &str) {
        if self.backend.postgres() {
            sqlx::raw_sql(statement)
                .execute(&self.pool)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        } else {
            let url = format!(
                "sqlite://{}",
                self.ws.path().join("jobschleuder.db").display()
            );
            let pool = sqlx::SqlitePool::connect(&url)
                .await
                .expect("the test's SQLite file");
            sqlx::raw_sql(statement)
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
            pool.close().await;
        }
    }

    /// A run id as a SQL literal of the test's database.
    pub fn id(&self, id: uuid::Uuid) -> String {
        if self.backend.postgres() {
            format!("'{id}'")
        } else {
            format!("X'{}'", id.simple())
        }
    }

    /// A time as a SQL literal of the test's database (as the store writes times).
    pub fn time(&self, at: chrono::DateTime<chrono::Utc>) -> String {
        format!(
            "'{}'",
            at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
        )
    }

    /// Every run, oldest first (at most 100,000), from the store the test runs on.
    pub async fn runs(&self) -> Vec<RunRow> {
        let mut runs = self
            .store
            .runs(None, None, None, 100_000)
            .await
            .expect("reading runs");
        runs.reverse();
        runs
    }

    /// One run by id.
    pub async fn run(&self, id: &str) -> RunRow {
        let id = uuid::Uuid::parse_str(id.trim()).expect("a run id");
        self.store
            .run(id)
            .await
            .expect("reading a run")
            .unwrap_or_else(|| panic!("no run {id}"))
    }

    /// Polls `done` over every run until it holds, at most `limit` (backend-neutral
    /// [`Cluster::wait_until`]).
    pub async fn wait_for(&self, what: &str, limit: Duration, done: impl Fn(&[RunRow]) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let runs = self.runs().await;
            if done(&runs) {
                return;
            }
            if Instant::now() > deadline {
                self.timed_out(what, limit, &runs);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the binary to completion and returns stdout; panics with its output on failure.
    pub fn run_ok(&self, args: &[&str]) -> String {
        super::success(super::run(self.command().args(args)))
    }

    /// `scheduler --run-now JOB`: the new run's id.
    pub fn run_now(&self, job: &str) -> String {
        self.run_ok(&["scheduler", "--run-now", job])
            .trim()
            .to_string()
    }

    pub fn import(&self, jobs: &str) {
        let file = self.ws.write("jobs.yaml", jobs);
        super::success(super::run(
            self.command().arg("registry").arg("--import").arg(file),
        ));
    }

    /// Starts the binary in the background; its output goes to a log file.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Process {
        self.spawn_with_env(name, args, &[])
    }

    /// [`Cluster::spawn`] with extra environment variables.
    pub fn spawn_with_env(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        let n = self
            .spawned
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = self.ws.path().join(format!("{name}-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = self
            .command()
            .envs(env.iter().copied())
            .args(["--loglevel", "info,jobschleuder=debug"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("spawn jobschleuder");
        Process {
            name: format!("{name}-{n}"),
            child,
            log,
        }
    }

    pub fn scheduler(&self) -> Process {
        let process = self.spawn("scheduler", &["scheduler", "--schedule"]);
        self.wait_for_log(&process, "listening for registry changes");
        process
    }

    pub fn worker(&self, id: &str, slots: usize) -> Process {
        let process = self.spawn(
            &format!("worker-{id}"),
            &["worker", "--id", id, "--worker", &slots.to_string()],
        );
        self.wait_for_log(&process, "worker consuming");
        process
    }

    /// Waits until `process` logged `needle`.
    pub fn wait_for_log(&self, process: &Process, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if process.log_text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} did not log {needle:?} within 30 s:\n{}",
            process.name,
            process.log_text()
        );
    }

    /// Fails the test that waited `limit` for `what`, with the runs and the processes' logs.
    fn timed_out(&self, what: &str, limit: Duration, runs: &[RunRow]) -> ! {
        let lines: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "{} {} attempt={} worker={:?} error={:?}",
                    r.job_name, r.status, r.attempt, r.worker, r.error
                )
            })
            .collect();
        panic!(
            "[{}] timed out after {limit:?} waiting for {what}\nruns: {lines:#?}\nlogs:\n{}",
            self.backend.name(),
            self.logs()
        );
    }

    /// The test's SQLite file, as a pool (SQLite backends).
    async fn sqlite(&self) -> sqlx::SqlitePool {
        let url = format!(
            "sqlite://{}",
            self.ws.path().join("jobschleuder.db").display()
        );
        sqlx::SqlitePool::connect(&url)
            .await
            .expect("the test's SQLite file")
    }

    /// Every row of `table` as one JSON text, in a stable order, whichever database it is in:
    /// what checks that a table did not change compare.
    pub async fn table_text(&self, table: &str) -> Vec<String> {
        if self.backend.postgres() {
            return sqlx::query_scalar(&format!(
                "SELECT row_to_json(t)::text FROM {table} t ORDER BY 1"
            ))
            .fetch_all(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("reading {table}: {e}"));
        }
        let pool = self.sqlite().await;
        let columns: Vec<String> =
            sqlx::query_scalar(&format!("SELECT name FROM pragma_table_info('{table}')"))
                .fetch_all(&pool)
                .await
                .unwrap_or_else(|e| panic!("reading {table}'s columns: {e}"));
        let object = columns
            .iter()
            .map(|c| format!("'{c}', {c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query_scalar(&format!(
            "SELECT json_object({object}) FROM {table} ORDER BY 1"
        ))
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|e| panic!("reading {table}: {e}"));
        pool.close().await;
        rows
    }

    /// Polls `query` (a SQL returning one boolean, in the SQL both databases speak) until it is
    /// true, at most `limit`.
    pub async fn wait_until(&self, what: &str, limit: Duration, query: &str) {
        let deadline = Instant::now() + limit;
        let sqlite = if self.backend.postgres() {
            None
        } else {
            Some(self.sqlite().await)
        };
        loop {
            let done: Result<bool, _> = match &sqlite {
                Some(pool) => sqlx::query_scalar(query).fetch_one(pool).await,
                None => sqlx::query_scalar(query).fetch_one(&self.pool).await,
            };
            match done {
                Ok(true) => return,
                Ok(false) => {}
                // A query that cannot work fails the test at once, saying why.
                Err(e) => panic!("waiting for {what}: the query failed: {e}\n{query}"),
            }
            if Instant::now() > deadline {
                self.timed_out(what, limit, &self.runs().await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A count (in the SQL both databases speak).
    pub async fn count(&self, query: &str) -> i64 {
        if !self.backend.postgres() {
            let pool = self.sqlite().await;
            let count = sqlx::query_scalar(query)
                .fetch_one(&pool)
                .await
                .expect("count query");
            pool.close().await;
            return count;
        }
        sqlx::query_scalar(query)
            .fetch_one(&self.pool)
            .await
            .expect("count query")
    }

    /// Every process log of this test, for failure messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.ws.path()) {
            let mut paths: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for path in paths
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
            {
                let body = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = body.lines().rev().take(40).collect();
                text.push_str(&format!("--- {}\n", path.display()));
                for line in tail.into_iter().rev() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    }

    /// Messages dead-lettered from the test queue, whichever queue it is.
    pub async fn dead_letters(&self) -> usize {
        if self.backend.rabbitmq() {
            return self.queue_depth(&format!("{}.dead", self.queue)).await as usize;
        }
        self.store
            .queue_dead_letters(100_000)
            .await
            .expect("reading dead letters")
            .iter()
            .filter(|d| d.queue == self.queue)
            .count()
    }

    /// Messages waiting in the test queue, whichever queue it is.
    pub async fn depth(&self) -> u32 {
        if self.backend.rabbitmq() {
            return self.queue_depth(&self.queue).await;
        }
        self.store
            .queue_depth(&self.queue)
            .await
            .expect("reading the queue's depth")
    }

    /// Messages of the test queue handed to a consumer and not yet acknowledged, whichever
    /// queue it is.
    pub async fn held(&self) -> u64 {
        if self.backend.rabbitmq() {
            return self.unacknowledged(&self.queue);
        }
        self.count(&format!(
            "SELECT count(*) FROM queue_messages WHERE queue = '{}' AND consumer IS NOT NULL",
            self.queue
        ))
        .await as u64
    }

    /// Takes every message out of the test queue, whichever queue it is; their bodies.
    pub async fn drain_queue(&self) -> Vec<Vec<u8>> {
        if self.backend.rabbitmq() {
            return self.drain(&self.queue).await;
        }
        let taken = self
            .store
            .queue_take(
                &self.queue,
                "test-drain",
                1_000_000,
                Duration::from_secs(60),
                1_000,
            )
            .await
            .expect("draining the queue");
        let ids: Vec<i64> = taken.iter().map(|m| m.id).collect();
        self.store
            .queue_ack(&ids)
            .await
            .expect("draining the queue");
        taken.into_iter().map(|m| m.body).collect()
    }

    /// Puts raw bytes in the test queue, as another client could, whichever queue it is.
    pub async fn send_raw(&self, body: &[u8]) {
        if self.backend.rabbitmq() {
            return self.publish_raw(body).await;
        }
        self.store
            .queue_publish(&[(self.queue.clone(), body.to_vec())])
            .await
            .expect("publishing to the table queue");
    }

    /// Declares `queue` (durable) with an argument ours do not have (`x-max-length`), so that
    /// declaring it as configured is refused for good. The test's queue and `<queue>_other`
    /// are deleted with the cluster.
    pub async fn declare_queue_with_other_arguments(&self, queue: &str) {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("amqp");
        let channel = connection.create_channel().await.expect("channel");
        let mut arguments = FieldTable::default();
        arguments.insert(
            ShortString::from("x-max-length"),
            lapin::types::AMQPValue::LongInt(10),
        );
        channel
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions::durable(),
                arguments,
            )
            .await
            .expect("declaring a queue with other arguments");
        let _ = connection.close(200, ShortString::from("bye")).await;
    }

    /// Messages waiting in `queue` (RabbitMQ).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("amqp");
        let channel = connection.create_channel().await.expect("channel");
        let declared = channel
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = connection.close(200, ShortString::from("bye")).await;
        declared
            .map(|q| q.message_count())
            .unwrap_or_else(|e| panic!("cannot read the depth of queue {queue}: {e}"))
    }

    /// Takes every message out of `queue` and returns their bodies.
    pub async fn drain(&self, queue: &str) -> Vec<Vec<u8>> {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("amqp");
        let channel = connection.create_channel().await.expect("channel");
        let mut bodies = Vec::new();
        while let Some(message) = channel
            .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            bodies.push(message.delivery.data.clone());
        }
        let _ = connection.close(200, ShortString::from("bye")).await;
        bodies
    }

    /// Publishes raw bytes to the test queue, as any other client could.
    pub async fn publish_raw(&self, body: &[u8]) {
        self.publish_message(body, None).await
    }

    /// Publishes raw bytes to the test queue, with an AMQP `message_id` when given.
    pub async fn publish_message(&self, body: &[u8], message_id: Option<&str>) {
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = message_id {
            properties = properties.with_message_id(ShortString::from(id));
        }
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("amqp");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(self.queue.as_str()),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        let _ = connection.close(200, ShortString::from("bye")).await;
    }

    /// Closes this test's broker connections (those named with its queue), as a broker restart
    /// or a network cut would.
    pub fn close_broker_connections(&self) -> usize {
        let output = Command::new("rabbitmqctl")
            .args(["list_connections", "pid", "client_properties", "--silent"])
            .output()
            .expect("rabbitmqctl");
        let text = String::from_utf8_lossy(&output.stdout);
        let mut closed = 0;
        for line in text.lines().filter(|l| l.contains(&self.queue)) {
            let Some(pid) = line.split_whitespace().next() else {
                continue;
            };
            let status = Command::new("rabbitmqctl")
                .args(["close_connection", pid, "test: closing connections"])
                .output();
            if status.is_ok_and(|s| s.status.success()) {
                closed += 1;
            }
        }
        closed
    }

    /// Deliveries of `queue` handed to a consumer and not acknowledged yet.
    pub fn unacknowledged(&self, queue: &str) -> u64 {
        let output = Command::new("rabbitmqctl")
            .args(["list_queues", "name", "messages_unacknowledged", "--silent"])
            .output()
            .expect("rabbitmqctl");
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(queue)).then(|| fields.next()?.parse().ok())?
            })
            .next()
            .unwrap_or_else(|| panic!("queue {queue} not listed by rabbitmqctl:\n{text}"))
    }

    /// Ends every other session on this test's database, as a Postgres restart would.
    pub async fn terminate_database_sessions(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
        )
        .fetch_one(&self.pool)
        .await
        .expect("terminate sessions")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.backend.rabbitmq() {
            return;
        }
        // The test queue, and a second one (`<queue>_other`) that some tests use.
        let other = format!("{}_other", self.queue);
        let queues = [
            self.queue.clone(),
            format!("{}.dead", self.queue),
            format!("{other}.dead"),
            other.clone(),
        ];
        let exchanges = [
            format!("{}.dead-letter", self.queue),
            format!("{other}.dead-letter"),
        ];
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
                    .await
                    .ok()?;
                let channel = connection.create_channel().await.ok()?;
                for queue in queues {
                    let _ = channel
                        .queue_delete(
                            ShortString::from(queue.as_str()),
                            QueueDeleteOptions::default(),
                        )
                        .await;
                }
                for exchange in exchanges {
                    let _ = channel
                        .exchange_delete(
                            ShortString::from(exchange.as_str()),
                            ExchangeDeleteOptions::default(),
                        )
                        .await;
                }
                let _ = connection.close(200, ShortString::from("bye")).await;
                Some(())
            })
        })
        .join();
    }
}
