//! The command line, configuration and logging, through the real binary.

use crate::util::*;

#[test]
fn a_hook_without_authentication_stops_the_listener_naming_it() {
    let ws = Workspace::new();
    let config = ws.write(
        "listener.yaml",
        "listener:\n  hooks:\n    open-door:\n      job: backup\n",
    );
    let err = failure(
        run(ws.command().arg("--config").arg(&config).arg("listener")),
        1,
    );
    assert!(err.contains("listener.hooks.open-door"), "{err}");
    assert!(err.contains("does not authenticate its sender"), "{err}");
}

#[test]
fn unknown_options_are_usage_errors() {
    let ws = Workspace::new();
    let err = failure(run(ws.command().args(["registry", "-xx"])), 2);
    assert!(err.contains("unexpected argument"), "{err}");
    let err = failure(run(ws.command().arg("registry")), 2);
    assert!(err.contains("nothing to do"), "{err}");
}

#[test]
fn config_errors_name_file_line_and_key() {
    let ws = Workspace::new();
    let config = ws.write("bad.yaml", "database:\n  host: 127.0.0.1\n  prot: 5432\n");
    let err = failure(
        run(ws
            .command()
            .arg("--config")
            .arg(&config)
            .args(["registry", "-sj"])),
        1,
    );
    assert!(
        err.contains("bad.yaml") && err.contains("line 3") && err.contains("prot"),
        "{err}"
    );

    let config = ws.write("type.yaml", "rabbitmq:\n  heartbeat: often\n");
    let err = failure(
        run(ws
            .command()
            .arg("--config")
            .arg(&config)
            .args(["registry", "-sj"])),
        1,
    );
    assert!(
        err.contains("rabbitmq.heartbeat") && err.contains("line 2"),
        "{err}"
    );

    let err = failure(
        run(ws
            .command()
            .args(["--config", "missing.yaml", "registry", "-sj"])),
        1,
    );
    assert!(err.contains("missing.yaml"), "{err}");
}

#[tokio::test]
async fn environment_overrides_the_config_file_and_secrets_stay_secret() {
    crate::needs_postgres!("environment_overrides_the_config_file_and_secrets_stay_secret");
    let db = TestDb::new().await;
    let ws = Workspace::new();
    // The file points at a server that does not exist; the environment wins.
    let config = ws.write(
        "config.yaml",
        "database:\n  host: 127.0.0.1\n  port: 1\n  user: nobody\n  password: hunter2-secret\n  database: nope\n",
    );
    let mut command = ws.command();
    command
        .env("JOBSCHLEUDER_DATABASE_URL", &db.url)
        .arg("--config")
        .arg(&config)
        .args(["registry", "-sj"]);
    success(run(&mut command));

    // Without the override, the error names the server but never the password.
    let mut command = ws.command();
    command
        .arg("--config")
        .arg(&config)
        .args(["--loglevel", "debug", "registry", "-sj"]);
    let out = run(&mut command);
    let err = failure(out, 1);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(!err.contains("hunter2-secret"), "a secret leaked: {err}");
}

#[test]
fn passwords_in_url_query_strings_stay_secret() {
    let ws = Workspace::new();
    // Nothing listens on port 1: the error and the debug log describe both URLs.
    let mut command = ws.command();
    command
        .env(
            "JOBSCHLEUDER_DATABASE_URL",
            "postgres://nobody@127.0.0.1:1/nope?sslmode=disable&password=db-query-secret",
        )
        .env(
            "JOBSCHLEUDER_AMQP_URL",
            "amqp://nobody@127.0.0.1:1/%2f?password=mq-query-secret",
        )
        .args(["--loglevel", "debug", "registry", "-sj"]);
    let err = failure(run(&mut command), 1);
    assert!(
        err.contains("127.0.0.1:1") && err.contains("password=********"),
        "{err}"
    );
    assert!(
        !err.contains("db-query-secret") && !err.contains("mq-query-secret"),
        "a secret leaked: {err}"
    );
}

#[tokio::test]
async fn original_config_sections_load_with_a_warning() {
    crate::needs_postgres!("original_config_sections_load_with_a_warning");
    let db = TestDb::new().await;
    let ws = Workspace::new();
    let config = ws.write(
        "config.yaml",
        "general:\n  logging:\n    loglevel: info\n  miniapp: x\ngit:\n  repo: r\n\
         rabbitmq:\n  host: 127.0.0.1\n  port: 5672\n  queue: jobschleuder\n  user: guest\n  password: guest\n  heartbeat: 30\n\
         sot:\n  nautobot: https://nautobot.lab\n  token: tok\n",
    );
    let mut command = ws.command();
    command
        .env("JOBSCHLEUDER_DATABASE_URL", &db.url)
        .arg("--config")
        .arg(&config)
        .args(["registry", "-sj"]);
    let out = run(&mut command);
    let err = stderr(&out);
    success(out);
    assert_eq!(err.matches("ignoring settings").count(), 1, "{err}");
    assert!(
        err.contains("git") && err.contains("general.miniapp"),
        "{err}"
    );
}

#[tokio::test]
async fn json_logs_carry_the_uuid_and_file_logs_append() {
    crate::needs_postgres!("json_logs_carry_the_uuid_and_file_logs_append");
    let db = TestDb::new().await;
    let ws = Workspace::new();
    let jobs = ws.write("jobs.yaml", SEED_JOBS);
    let out = run(ws
        .jobschleuder(&db)
        .args([
            "--loghandler",
            "json",
            "--uuid",
            "op-42",
            "--loglevel",
            "INFO",
            "registry",
            "-i",
        ])
        .arg(&jobs));
    let err = stderr(&out);
    success(out);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .collect();
    assert!(!lines.is_empty());
    assert!(
        lines
            .iter()
            .all(|l| l["uuid"] == "op-42" && l["level"].is_string()),
        "{err}"
    );
    assert!(
        lines.iter().any(|l| l["message"] == "registry replaced"),
        "{err}"
    );

    let log = ws.path().join("js.log");
    for _ in 0..2 {
        success(run(ws
            .jobschleuder(&db)
            .arg("--loghandler")
            .arg(&log)
            .args(["--uuid", "op-43", "registry", "-i"])
            .arg(&jobs)));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("registry replaced").count(), 2, "{text}");
    assert!(text.lines().all(|l| l.starts_with("uuid=op-43 ")), "{text}");
}

#[test]
fn the_shipped_examples_stay_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let no_env = |_: &str| None;
    let example = jobschleuder::config::Config::load_with_env(
        Some(&root.join("config.example.yaml")),
        &no_env,
    )
    .unwrap();
    assert!(example.warnings.is_empty(), "{:?}", example.warnings);
    let jobs = jobschleuder::jobfile::load(&root.join("jobs.example.yaml"), None).unwrap();
    assert!(jobs
        .iter()
        .any(|j| j.name == "hello world" && j.schedule.is_some()));

    let demo =
        jobschleuder::config::Config::load_with_env(Some(&root.join("demo/config.yaml")), &no_env)
            .unwrap();
    let known = jobschleuder::jobfile::KnownPlugins {
        jobs: &demo.plugins,
        preprocessing: &demo.preprocessing,
    };
    let jobs = jobschleuder::jobfile::load(&root.join("demo/jobs.yaml"), Some(&known)).unwrap();
    assert_eq!(jobs.len(), 5);
    // The demo needs no servers: the embedded store and the table queue.
    assert!(demo.database.sqlite.is_some());
    assert_eq!(demo.queue.kind, jobschleuder::config::QueueKind::Table);
}

#[test]
fn preview_prints_run_times_with_offsets_across_dst() {
    let ws = Workspace::new();
    let out = success(run(ws.command().args([
        "scheduler",
        "--preview",
        "30 2 * * *",
        "--timezone",
        "Europe/Berlin",
        "--from",
        "2026-03-28T12:00:00",
        "--count",
        "3",
    ])));
    assert_eq!(
        out,
        "2026-03-29T03:00:00+02:00\n2026-03-30T02:30:00+02:00\n2026-03-31T02:30:00+02:00\n"
    );
    let out = success(run(ws.command().args([
        "scheduler",
        "--preview",
        "*/30 * * * *",
        "--timezone",
        "America/New_York",
        "--from",
        "2026-11-01T05:00:00Z",
        "--count",
        "3",
    ])));
    assert_eq!(
        out,
        "2026-11-01T01:00:00-04:00\n2026-11-01T01:30:00-04:00\n2026-11-01T01:00:00-05:00\n"
    );
    let err = failure(
        run(ws.command().args(["scheduler", "--preview", "61 * * * *"])),
        2,
    );
    assert!(err.contains("61 * * * *"), "{err}");
}
