//! The embedded default: `standalone` with nothing configured, and a SQLite file that is
//! locked, read-only or full.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::util::backend::Backend;
use crate::util::cluster::Cluster;
use crate::util::{failure, run, stdout, success, Workspace};

/// A config with the test plugins and the SQLite file at `db`.
fn config_at(ws: &Workspace, db: &Path) -> std::path::PathBuf {
    ws.write(
        "config.yaml",
        &format!(
            "timezone: UTC\ndatabase:\n  path: {}\n{}",
            db.display(),
            crate::plugins::plugin_config_text()
        ),
    )
}

const JOBS: &str = "jobs:\n- id: hello\n  job: hello_world\n- id: echo\n  job: test_echo\n";
const OTHER_JOBS: &str = "jobs:\n- id: other\n  job: hello_world\n";

fn registry_names(ws: &Workspace, config: &Path) -> String {
    success(run(ws.command().arg("--config").arg(config).args([
        "registry",
        "--show-jobs",
        "--json",
    ])))
}

#[test]
fn standalone_with_nothing_configured_runs_jobs_and_another_shell_sees_them() {
    let ws = Workspace::new();
    // No database and no broker configured; HOME is the workspace here.
    let jobs = ws.write("jobs.yaml", "jobs:\n- id: tick\n  job: command\n  schedule: '*/1 * * * * *'\n  arguments: {command: [\"true\"]}\n");
    let log = std::fs::File::create(ws.path().join("standalone.log")).unwrap();
    // A config elsewhere than the working directory: the data goes to the XDG data folder.
    std::fs::create_dir_all(ws.path().join("conf")).unwrap();
    let config = ws.write("conf/plugins.yaml", &crate::plugins::plugin_config_text());
    let mut standalone = ws
        .command()
        .env_remove("XDG_DATA_HOME")
        .arg("--config")
        .arg(&config)
        .args(["standalone", "--import"])
        .arg(&jobs)
        .args(["--workers", "2", "--bind", "127.0.0.1:0"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let data = ws.path().join(".local/share/jobschleuder/jobschleuder.db");
    let deadline = Instant::now() + Duration::from_secs(30);
    let succeeded = loop {
        let listed = run(ws.command().arg("--config").arg(&config).args([
            "runs",
            "--status",
            "succeeded",
            "--json",
        ]));
        let runs: serde_json::Value =
            serde_json::from_str(&stdout(&listed)).unwrap_or(serde_json::Value::Null);
        let count = runs.as_array().map_or(0, Vec::len);
        if count >= 3 {
            break count;
        }
        assert!(
            Instant::now() < deadline,
            "no runs within 30 s:\n{}",
            std::fs::read_to_string(ws.path().join("standalone.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(succeeded >= 3);
    // From another shell: a manual run, seen and run by the standalone process.
    let id = success(run(ws.command().arg("--config").arg(&config).args([
        "scheduler",
        "--run-now",
        "tick",
    ])));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let shown = stdout(&run(ws.command().arg("--config").arg(&config).args([
            "runs",
            "--show",
            id.trim(),
        ])));
        if shown.contains("succeeded") {
            assert!(shown.contains("manual"), "{shown}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the manual run did not run: {shown}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // It said where its data lives and that it is one host's; Ctrl-C stops it cleanly.
    Command::new("kill")
        .args(["-INT", &standalone.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = standalone.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "standalone did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(ws.path().join("standalone.log")).unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        log.contains(&format!("sqlite://{}", data.display())) && log.contains("single-host"),
        "{log}"
    );
    assert!(data.exists());
}

#[tokio::test]
async fn a_locked_database_file_gives_a_clear_error_and_loses_nothing() {
    let ws = Workspace::new();
    let db = ws.path().join("jobs.db");
    let config = config_at(&ws, &db);
    let jobs = ws.write("jobs.yaml", JOBS);
    let other = ws.write("other.yaml", OTHER_JOBS);
    success(run(ws
        .command()
        .arg("--config")
        .arg(&config)
        .args(["registry", "--import"])
        .arg(&jobs)));
    // Another program takes the write lock and keeps it.
    let mut holder = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE; INSERT INTO jobs (name, job) VALUES ('holder', 'x');")
        .execute(&mut holder)
        .await
        .unwrap();
    let started = Instant::now();
    let stderr = failure(
        run(ws
            .command()
            .arg("--config")
            .arg(&config)
            .args(["registry", "--import"])
            .arg(&other)),
        1,
    );
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "it waited for the lock first"
    );
    assert!(
        stderr.contains("locked")
            && stderr.contains("fuser")
            && stderr.contains("Nothing was written"),
        "{stderr}"
    );
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    drop(holder);
    // The registry is the first file's, whole; the same import now works.
    let names = registry_names(&ws, &config);
    assert!(
        names.contains("\"hello\"") && names.contains("\"echo\"") && !names.contains("\"other\""),
        "{names}"
    );
    success(run(ws
        .command()
        .arg("--config")
        .arg(&config)
        .args(["registry", "--import"])
        .arg(&other)));
    assert!(registry_names(&ws, &config).contains("\"other\""));
}

#[tokio::test]
async fn a_lock_held_longer_than_the_busy_timeout_delays_runs_and_loses_none() {
    let Some(cluster) = Cluster::on(
        Backend::SqliteTable,
        "a_lock_held_longer_than_the_busy_timeout_delays_runs_and_loses_none",
        "worker:\n  retry_backoff: 0.1\n",
    )
    .await
    else {
        return;
    };
    cluster.import("jobs:\n- id: tick\n  job: hello_world\n  schedule: '*/1 * * * * *'\n");
    let _scheduler = cluster.scheduler();
    let _worker = cluster.worker("w1", 2);
    cluster
        .wait_for("a few runs", Duration::from_secs(30), |runs| {
            runs.iter().filter(|r| r.status == "succeeded").count() >= 3
        })
        .await;
    let mut holder = sqlx::SqliteConnection::connect(&format!(
        "sqlite://{}",
        cluster.ws.path().join("jobschleuder.db").display()
    ))
    .await
    .unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE; INSERT INTO jobs (name, job) VALUES ('holder', 'x');")
        .execute(&mut holder)
        .await
        .unwrap();
    std::thread::sleep(Duration::from_secs(12));
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    drop(holder);
    let released = chrono::Utc::now();
    cluster
        .wait_for(
            "runs after the lock, and no run left behind",
            Duration::from_secs(60),
            |runs| {
                runs.iter().any(|r| {
                    r.status == "succeeded" && r.scheduled_for.is_some_and(|t| t > released)
                }) && runs
                    .iter()
                    .all(|r| r.status == "succeeded" || r.created_at > released)
            },
        )
        .await;
    let runs = cluster.runs().await;
    let mut slots: Vec<i64> = runs
        .iter()
        .map(|r| r.scheduled_for.unwrap().timestamp())
        .collect();
    slots.sort();
    let before = slots.len();
    slots.dedup();
    assert_eq!(slots.len(), before, "a slot ran twice: {slots:?}");
    assert!(
        cluster.logs().contains("locked"),
        "the wait was logged with its reason:\n{}",
        cluster.logs()
    );
}

/// A small file system of its own (tmpfs), for read-only and full disks; `None` where this
/// user may not mount (the test then says it is skipped).
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(ws: &Workspace, test: &str) -> Option<SmallDisk> {
        let dir = ws.path().join("disk");
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(&dir)
            .output();
        if !mounted.is_ok_and(|o| o.status.success()) {
            if std::env::var("JOBSCHLEUDER_TEST_REQUIRE_SERVERS").as_deref() == Ok("1") {
                panic!("{test}: cannot mount a small tmpfs (needs root)");
            }
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED {test}: cannot mount a small tmpfs here (needs root)"
            );
            return None;
        }
        Some(SmallDisk { dir })
    }

    fn remount(&self, mode: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn a_read_only_or_full_database_gives_a_clear_error_and_loses_nothing() {
    let test = "a_read_only_or_full_database_gives_a_clear_error_and_loses_nothing";
    let ws = Workspace::new();
    let Some(disk) = SmallDisk::mount(&ws, test) else {
        return;
    };
    let config = config_at(&ws, &disk.dir.join("jobs.db"));
    let jobs = ws.write("jobs.yaml", JOBS);
    let other = ws.write("other.yaml", OTHER_JOBS);
    let import = |file: &Path| {
        run(ws
            .command()
            .arg("--config")
            .arg(&config)
            .args(["registry", "--import"])
            .arg(file))
    };
    success(import(&jobs));

    disk.remount("ro");
    let stderr = failure(import(&other), 1);
    assert!(
        stderr.contains("read-write") || stderr.contains("read-only"),
        "{stderr}"
    );
    disk.remount("rw");
    let names = registry_names(&ws, &config);
    assert!(
        names.contains("\"hello\"") && !names.contains("\"other\""),
        "{names}"
    );

    // Fill the disk to the last byte.
    let filler = disk.dir.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=10000"])
        .arg(format!("of={}", filler.display()))
        .output();
    let stderr = failure(import(&other), 1);
    assert!(stderr.contains("full") || stderr.contains("df"), "{stderr}");
    std::fs::remove_file(&filler).unwrap();
    let names = registry_names(&ws, &config);
    assert!(
        names.contains("\"hello\"") && !names.contains("\"other\""),
        "{names}"
    );
    success(import(&other));
    assert!(registry_names(&ws, &config).contains("\"other\""));
}

#[test]
fn standalone_stops_with_the_reason_when_the_listeners_port_is_taken() {
    let ws = Workspace::new();
    let config = config_at(&ws, &ws.path().join("jobs.db"));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut standalone = ws
        .command()
        .arg("--config")
        .arg(&config)
        .args(["standalone", "--bind", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = standalone.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "standalone kept running without its listener"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    use std::io::Read;
    standalone
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}
