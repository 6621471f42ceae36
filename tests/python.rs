//! The original's Python plugins, run unchanged through a real worker with a real `python3`.

use std::time::Duration;

use serde_json::Value;

use crate::util::cluster::Cluster;

/// The Python test plugins (`plugins/testing/python`): the original's hello world, and a
/// plugin in its style with on_startup, preprocessing and every kind of failure.
fn python_plugins() -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/testing/python");
    let entry = |name: &str, module: &str| {
        format!("  {name}:\n    plugin_dir: {dir}\n    plugin: {module}\n")
    };
    let mut text = String::from("plugins:\n");
    text.push_str(&entry("hello_world", "hello_world"));
    for job in ["config_backup", "broken", "hang", "crash", "inventory"] {
        text.push_str(&entry(job, "backup"));
    }
    text.push_str("preprocessing:\n");
    text.push_str(&entry("get_devices", "backup"));
    text.push_str(&entry("summarize", "backup"));
    text.push_str("sot:\n  nautobot: https://nautobot.lab\n  token: sot-token-for-the-test-77\n");
    text
}

async fn run(cluster: &Cluster, job: &str) -> String {
    cluster.run_now(job)
}

/// The run's (status, error, result) once it has ended.
async fn ended(cluster: &Cluster, id: &str) -> (String, Option<String>, Option<Value>) {
    let id = uuid::Uuid::parse_str(id.trim()).expect("a run id");
    cluster
        .wait_for(
            &format!("run {id} to end"),
            Duration::from_secs(60),
            |runs| {
                runs.iter().any(|r| {
                    r.id == id && ["succeeded", "failed", "dead"].contains(&r.status.as_str())
                })
            },
        )
        .await;
    let run = cluster.run(&id.to_string()).await;
    (run.status, run.error, run.result)
}

crate::on_every_backend! {
async fn the_originals_python_plugins_run_through_a_real_worker(backend: Backend) {
    let Some(cluster) = Cluster::on_with_plugins(
        backend,
        "the_originals_python_plugins_run_through_a_real_worker",
        &python_plugins(),
        "worker:\n  retry_backoff: 0.1\n",
    )
    .await
    else {
        return;
    };
    // What the original's worker exported to veritas plugins: a .env beside the config.
    cluster
        .ws
        .write(".env", "ENCRYPTIONKEY=k3y-for-the-test-0042\n");
    cluster.import(
        "jobs:\n\
         - id: hello\n  job: hello_world\n  arguments: {hello: world}\n\
         - id: backup\n  job: config_backup\n  preprocessing: get_devices\n\
         - id: broken\n  job: broken\n\
         - id: hang\n  job: hang\n  timeout: 2\n\
         - id: crash\n  job: crash\n\
         - id: inventory\n  job: inventory\n  arguments: {sot: true, where: 'name=lab.local'}\n",
    );
    let _scheduler = cluster.scheduler();
    let worker = cluster.worker("w1", 2);

    let (status, _, result) = ended(&cluster, &run(&cluster, "hello").await).await;
    assert_eq!((status.as_str(), result), ("succeeded", Some(Value::Null)));

    // A crash of the interpreter fails only that run; the next call gets a new process.
    let (status, error, _) = ended(&cluster, &run(&cluster, "crash").await).await;
    let error = error.unwrap_or_default();
    assert_eq!(status, "failed", "{error}");
    assert!(
        error.contains("ended during the call") && error.contains("exit status: 3"),
        "{error}"
    );

    // A hang past the job's timeout: the process is stopped, the run fails as timed out.
    let (status, error, _) = ended(&cluster, &run(&cluster, "hang").await).await;
    assert_eq!(status, "failed");
    assert!(error.unwrap_or_default().contains("timed out"));

    // An exception: its type, message and the last frames of the traceback.
    let (status, error, details) = ended(&cluster, &run(&cluster, "broken").await).await;
    assert_eq!(status, "failed");
    assert_eq!(
        error.as_deref(),
        Some("job \"broken\" failed: ValueError: the device said no")
    );
    let details = details.unwrap_or_default();
    assert_eq!(details["type"], "ValueError");
    assert!(
        details["traceback"]
            .as_str()
            .unwrap_or_default()
            .contains("raise ValueError"),
        "{details}"
    );

    // `sot: true` needs the real veritas library (not installed here): a clear failure.
    let (status, error, _) = ended(&cluster, &run(&cluster, "inventory").await).await;
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    assert!(error.contains("needs the `veritas` library"), "{error}");
    assert!(!error.contains("sot-token-for-the-test-77"));

    // Preprocessing fans out to three devices; each job gets the on_startup values.
    let parent = run(&cluster, "backup").await;
    let (status, _, result) = ended(&cluster, &parent).await;
    assert_eq!(status, "succeeded");
    assert_eq!(result.unwrap_or_default()["fanned_out"], 3);
    let parent = uuid::Uuid::parse_str(parent.trim()).unwrap();
    let children = |runs: &[jobschleuder::store::RunRow]| -> Vec<Value> {
        runs.iter()
            .filter(|r| r.parent_id == Some(parent) && r.status == "succeeded")
            .filter_map(|r| r.result.clone())
            .collect()
    };
    cluster
        .wait_for("the three backups", Duration::from_secs(60), |runs| {
            children(runs).len() == 3
        })
        .await;
    let mut results = children(&cluster.runs().await);
    results.sort_by_key(|r| r["device"].as_str().unwrap_or_default().to_string());
    let devices: Vec<&str> = results
        .iter()
        .map(|r| r["device"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(devices, ["sw1", "sw2", "sw3"]);
    for result in &results {
        assert_eq!(
            result["profile"], "netops",
            "on_startup values are merged in"
        );
        assert_eq!(
            result["key"], "********",
            "the environment's key reaches the plugin, not the history"
        );
        assert_eq!(
            result["when"],
            serde_json::json!({"__str__": "2026-01-01 03:00:00", "__type__": "datetime"})
        );
        assert_eq!(result["__converted__"], serde_json::json!(["when"]));
    }

    // print() and logging reach the worker's log, at their levels.
    let log = worker.log_text();
    assert!(log.contains("backing up sw1"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("backup: using profile netops")),
        "{log}"
    );
    assert!(
        !log.contains("k3y-for-the-test-0042"),
        "a secret reached the log"
    );
}
}

/// Runs one function of `edge.py` with `worker --exec`; its JSON line and the log.
fn exec_edge(cluster: &Cluster, function: &str) -> (Value, String) {
    let output = cluster
        .command()
        .args(["worker", "--exec", function])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = serde_json::from_str(stdout.lines().next().unwrap_or("null")).unwrap_or(Value::Null);
    (line, String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test]
async fn python_plugins_that_misbehave_by_accident_are_handled() {
    crate::needs_servers!("python_plugins_that_misbehave_by_accident_are_handled");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/plugins/testing/python");
    let mut plugins = String::from("plugins:\n");
    for function in [
        "secretive",
        "unready",
        "not_a_number",
        "mixed_output",
        "reads_stdin",
    ] {
        plugins.push_str(&format!(
            "  {function}:\n    plugin_dir: {dir}\n    plugin: edge\n"
        ));
    }
    let cluster = Cluster::with_config("", &plugins, "").await;

    // Credentials from on_startup are masked like the sot token.
    let (line, log) = exec_edge(&cluster, "secretive");
    assert_eq!(line["status"], "succeeded", "{line} {log}");
    assert_eq!(line["result"]["token_was"], "********");
    assert_eq!(line["result"]["said"], "the token is ********");
    assert!(!log.contains("startup-token-5150"));

    // A failing on_startup is named as such.
    let (line, _) = exec_edge(&cluster, "unready");
    let message = line["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("unready:on_startup") && message.contains("unreachable"),
        "{line}"
    );

    // NaN is not JSON: converted and marked, not an unreadable answer.
    let (line, _) = exec_edge(&cluster, "not_a_number");
    assert_eq!(line["status"], "succeeded", "{line}");
    assert_eq!(line["result"]["ratio"]["__type__"], "float");

    // Bytes that are not UTF-8 neither break the answers nor stop the log.
    let (line, log) = exec_edge(&cluster, "mixed_output");
    assert_eq!(line["result"], "ok", "{line} {log}");
    assert!(log.contains("still logging after that"), "{log}");
    assert!(
        log.contains("on stdout") && log.contains("on stderr"),
        "{log}"
    );

    // stdin is not the request pipe.
    let (line, _) = exec_edge(&cluster, "reads_stdin");
    assert_eq!(line["result"]["stdin"], "", "{line}");
}

#[tokio::test]
async fn worker_exec_runs_a_python_plugin_by_hand() {
    crate::needs_servers!("worker_exec_runs_a_python_plugin_by_hand");
    let cluster = Cluster::with_config("", &python_plugins(), "").await;
    let out = cluster.run_ok(&[
        "worker",
        "--exec",
        "config_backup",
        "--preprocessing",
        "get_devices",
        "--postprocessing",
        "summarize",
    ]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7, "{out}");
    assert_eq!(lines[0]["step"], "preprocessing");
    let jobs: Vec<&Value> = lines.iter().filter(|l| l["step"] == "job").collect();
    assert!(jobs
        .iter()
        .all(|l| l["status"] == "succeeded" && l["result"]["profile"] == "netops"));
    // Postprocessing gets the job's outcome as the keyword argument `outcome`.
    let post: Vec<&Value> = lines
        .iter()
        .filter(|l| l["step"] == "postprocessing")
        .collect();
    assert_eq!(post.len(), 3);
    assert!(post
        .iter()
        .all(|l| l["status"] == "succeeded" && l["result"]["saw"] == l["result"]["device"]));

    let missing = cluster
        .command()
        .args(["worker", "--exec", "nope"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
}

#[tokio::test]
async fn a_cancelled_python_job_has_its_process_stopped() {
    crate::needs_servers!("a_cancelled_python_job_has_its_process_stopped");
    let cluster = Cluster::with_config("", &python_plugins(), "").await;
    cluster.import("jobs:\n- id: hang\n  job: hang\n");
    let _worker = cluster.worker("w1", 1);
    let id = run(&cluster, "hang").await;
    cluster
        .wait_until(
            "the run running",
            Duration::from_secs(60),
            &format!("SELECT status = 'running' FROM job_runs WHERE id = '{id}'"),
        )
        .await;
    let out = cluster.run_ok(&["runs", "--cancel", &id]);
    assert!(out.contains("it is being stopped"), "{out}");
    cluster
        .wait_until(
            "the run cancelled",
            Duration::from_secs(30),
            &format!("SELECT status = 'cancelled' FROM job_runs WHERE id = '{id}'"),
        )
        .await;
    let (_, error, _): (String, Option<String>, Option<Value>) = sqlx::query_as(&format!(
        "SELECT status, error, result FROM job_runs WHERE id = '{id}'"
    ))
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    let error = error.unwrap_or_default();
    assert!(
        error.starts_with("cancelled by an operator")
            && error.contains("its Python process was stopped"),
        "{error}"
    );
}
