//! Shared test helpers: a fresh Postgres database per test, and running the real binary.

pub mod backend;
pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::postgres::PgPool;
use sqlx::{Connection, Executor, PgConnection};

/// The server tests create their databases on. Override with JOBSCHLEUDER_TEST_DATABASE_URL
/// (a URL to an existing database of a user allowed to create databases).
pub fn admin_url() -> String {
    std::env::var("JOBSCHLEUDER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A name for a test's database or queue: `js_test_<pid>_<random>`. The pid of the test
/// process lets a later run remove what a killed run left behind, without touching what a
/// running one uses (`.ci/run` does).
pub fn scratch_name() -> String {
    format!(
        "js_test_{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A database of its own for one test, dropped when the test ends (pass or fail).
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let admin = admin_url();
        let name = scratch_name();
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("tests need Postgres at {admin}: {e}"));
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        let mut url = url::Url::parse(&admin).expect("admin URL");
        url.set_path(&format!("/{name}"));
        TestDb {
            name,
            url: url.to_string(),
        }
    }

    /// No database (a SQLite test): dropping it drops nothing.
    pub fn none() -> TestDb {
        TestDb {
            name: String::new(),
            url: String::new(),
        }
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let name = self.name.clone();
        // Drop runs outside async context; a thread with its own runtime does the cleanup.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&admin_url()).await.ok()?;
                conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// A scratch folder with a config file, for running the binary without touching the user's.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write file");
        path
    }

    /// The binary, run in this folder, with no config found by default lookup and no inherited
    /// JOBSCHLEUDER_* variables.
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_jobschleuder"));
        command
            .current_dir(self.dir.path())
            .env("XDG_CONFIG_HOME", self.dir.path().join("xdg"))
            .env("HOME", self.dir.path())
            .env("TZ", "UTC");
        for (key, _) in std::env::vars() {
            if key.starts_with("JOBSCHLEUDER_") {
                command.env_remove(key);
            }
        }
        command
    }

    /// The binary against `db`, with an empty config file.
    pub fn jobschleuder(&self, db: &TestDb) -> Command {
        let config = self.write("empty-config.yaml", "# defaults\n");
        let mut command = self.command();
        command
            .env("JOBSCHLEUDER_DATABASE_URL", &db.url)
            .arg("--config")
            .arg(config);
        command
    }
}

/// Runs a command and returns its output; stdout and stderr are printed on failure of a check.
pub fn run(command: &mut Command) -> Output {
    command.output().expect("run jobschleuder")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn success(output: Output) -> String {
    assert!(
        output.status.success(),
        "expected success, got {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

/// Asserts failure with this exit code and returns stderr.
#[track_caller]
pub fn failure(output: Output, code: i32) -> String {
    assert_eq!(
        output.status.code(),
        Some(code),
        "expected exit code {code}\nstdout:\n{}\nstderr:\n{}",
        stdout(&output),
        stderr(&output)
    );
    stderr(&output)
}

/// A manual run of job `j` (`hello_world`, no arguments) to insert straight into the store.
pub fn new_run(id: Option<uuid::Uuid>, parent: Option<uuid::Uuid>) -> jobschleuder::store::NewRun {
    jobschleuder::store::NewRun {
        id,
        job_name: "j".into(),
        job: "hello_world".into(),
        job_id: None,
        trigger: "manual",
        queue: None,
        arguments: serde_json::Map::new(),
        preprocessing: None,
        postprocessing: None,
        timeout_seconds: None,
        max_retries: 0,
        parent_id: parent,
        published: false,
    }
}

pub const SEED_JOBS: &str = r#"---
jobs:
- id: hello world
  job: hello_world
  schedule: "*/1 * * * *"
  arguments:
    hello: world
- id: backup devices
  job: simple_config_backup
  schedule: "0 1 * * *"
  preprocessing: preprocessing_backup
  arguments:
    where: name=lab.local
    sot: True
    exclude:
      devices: ['labx.local']
      pattern: ['.*xx']
- id: retry failed backups
  job: simple_config_backup
  schedule: "0 1 * * *"
  preprocessing: get_failed_backups
  arguments:
    sot: True
"#;
