//! Plugins: the real cdylibs built by `cargo build --workspace`, loaded by the host.

use std::path::PathBuf;

use jobschleuder::config::Config;
use jobschleuder::plugin::{Outcome, PluginError, PluginHost};
use serde_json::{json, Value};

use crate::util::*;

/// Where cargo put the plugin libraries: next to the test binary's `deps` folder.
pub fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .to_path_buf();
    assert!(
        dir.join("libtestkit.so").exists(),
        "the plugin libraries are not built in {}: run `cargo build --workspace` before the tests",
        dir.display()
    );
    dir
}

/// A config that maps every test and shipped plugin function to its library.
pub fn plugin_config_text() -> String {
    let dir = plugin_dir();
    let dir = dir.display();
    let mut text = String::from("plugins:\n");
    for (name, library) in [
        ("hello_world", "hello_world"),
        ("command", "command"),
        ("http", "http"),
        ("test_echo", "testkit"),
        ("test_fail", "testkit"),
        ("test_panic", "testkit"),
        ("test_sleep", "testkit"),
        ("test_abort", "testkit"),
        ("test_broken", "testkit"),
        ("test_startup_secret", "testkit"),
        ("test_slow_start", "testkit"),
        ("test_missing_function", "testkit"),
        ("old_abi", "abi_mismatch"),
        ("v1_echo", "abi_v1"),
        ("test_context", "testkit"),
        ("not_a_plugin", "no_symbols"),
        ("not_built", "no_such_library"),
    ] {
        text.push_str(&format!(
            "  {name}:\n    plugin_dir: {dir}\n    plugin: {library}\n"
        ));
    }
    text.push_str("preprocessing:\n");
    for (name, library) in [
        ("expand_hosts", "expand_hosts"),
        ("test_fanout", "testkit"),
        ("test_post", "testkit"),
    ] {
        text.push_str(&format!(
            "  {name}:\n    plugin_dir: {dir}\n    plugin: {library}\n"
        ));
    }
    text.push_str("sot:\n  nautobot: https://nautobot.lab\n  token: sot-secret\n");
    text
}

fn host() -> PluginHost {
    let config = Config::from_str_with_env(
        &PathBuf::from("plugins.yaml"),
        &plugin_config_text(),
        &|_| None,
    )
    .unwrap();
    PluginHost::new(&config)
}

/// The plugin config plus secrets of other sections: a database password, and a broker
/// password in the URL's query string.
fn config_with_secrets_text() -> String {
    format!(
        "{}database:\n  password: db-pass-4242\nrabbitmq:\n  url: amqp://u@127.0.0.1:5672/%2f?password=mq-query-99\n",
        plugin_config_text()
    )
}

fn host_with_secrets() -> PluginHost {
    let config = Config::from_str_with_env(
        &PathBuf::from("plugins.yaml"),
        &config_with_secrets_text(),
        &|_| None,
    )
    .unwrap();
    PluginHost::new(&config)
}

/// The error as every reader sees it: its message and what `worker --exec` prints of it.
fn shown(err: &PluginError) -> String {
    format!("{err} {}", serde_json::to_string(&err.job_error()).unwrap())
}

fn args(value: Value) -> serde_json::Map<String, Value> {
    value.as_object().cloned().unwrap()
}

#[test]
fn a_job_gets_its_arguments_with_on_startup_values_merged_in() {
    let host = host();
    let result = host
        .call_job("test_echo", args(json!({"mine": 1, "shared": "job value"})))
        .unwrap();
    assert_eq!(
        result["args"],
        json!({"mine": 1, "shared": "startup wins", "from_startup": true}),
        "on_startup values are merged in and win on equal keys"
    );
    assert_eq!(
        host.call_job("hello_world", args(json!({"hello": "world"})))
            .unwrap(),
        json!({"hello": "world"})
    );
}

#[test]
fn sot_true_becomes_the_config_section_and_its_token_stays_secret() {
    let host = host();
    let result = host
        .call_job("test_echo", args(json!({"sot": true})))
        .unwrap();
    assert_eq!(result["token_length"], 10, "the plugin got the real token");
    assert_eq!(
        result["args"]["sot"],
        json!({"nautobot": "https://nautobot.lab", "token": "********"}),
        "what the plugin returns never carries the token"
    );
    // Fanned-out jobs ask for the section again instead of carrying the token.
    let jobs = host
        .call_preprocessing(
            "test_fanout",
            "test_echo",
            args(json!({"count": 2, "sot": true})),
        )
        .unwrap();
    assert!(
        jobs.iter().all(|j| j.args["sot"] == json!(true)),
        "{jobs:?}"
    );
}

#[test]
fn preprocessing_fans_out_and_postprocessing_sees_the_outcome() {
    let host = host();
    let jobs = host
        .call_preprocessing(
            "test_fanout",
            "test_echo",
            args(json!({"count": 3, "x": "y"})),
        )
        .unwrap();
    assert_eq!(jobs.len(), 3);
    assert!(
        jobs.iter().all(|j| j.cmd.as_deref() == Some("test_echo")),
        "a job without cmd is the preprocessed job"
    );
    assert_eq!(jobs[2].args, args(json!({"x": "y", "index": 2})));

    let outcome = Outcome {
        result: Some(json!({"ok": 1})),
        error: None,
    };
    let post = host
        .call_postprocessing("test_post", args(json!({"a": 1})), &outcome)
        .unwrap();
    assert_eq!(post["post_saw_result"], json!({"ok": 1}));
    assert_eq!(post["post_saw_args"], json!({"a": 1}));

    let hosts = host
        .call_preprocessing(
            "expand_hosts",
            "command",
            args(json!({"hosts": ["r1", "labx.local", "r2xx"], "exclude": {"devices": ["labx.local"], "pattern": [".*xx"]}})),
        )
        .unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].args["host"], "r1");
}

#[test]
fn errors_carry_retryable_and_details() {
    let err = host()
        .call_job("test_fail", args(json!({"retryable": true})))
        .unwrap_err();
    assert!(err.retryable());
    assert_eq!(err.details().unwrap()["args"]["retryable"], true);
    let err = host().call_job("test_fail", args(json!({}))).unwrap_err();
    assert!(!err.retryable());
    assert!(err.to_string().contains("asked to fail"), "{err}");
}

#[test]
fn a_panic_is_a_failed_call_and_the_process_lives_on() {
    let host = host();
    for _ in 0..2 {
        let err = host.call_job("test_panic", args(json!({}))).unwrap_err();
        assert!(matches!(err, PluginError::Panicked { .. }), "{err:?}");
        assert!(err.to_string().contains("boom from the plugin"), "{err}");
        assert!(err.to_string().contains("libtestkit.so"), "{err}");
    }
    assert!(
        host.call_job("test_echo", args(json!({}))).is_ok(),
        "the library still works after a panic"
    );
}

#[test]
fn abi_mismatch_is_refused_naming_both_versions() {
    let err = host().call_job("old_abi", args(json!({}))).unwrap_err();
    assert!(
        matches!(
            err,
            PluginError::AbiMismatch {
                found: 999,
                expected: 2,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("999")
            && text.contains("versions 1 to 2")
            && text.contains("libabi_mismatch.so"),
        "{text}"
    );
}

#[test]
fn a_plugin_built_for_abi_version_1_still_loads_and_runs() {
    let host = host();
    // Outside a run: its input is what version 1 hosts sent.
    let plain = host.call_job("v1_echo", args(json!({"a": 1}))).unwrap();
    assert_eq!(plain, json!({"args": {"a": 1}}));
    // In a run: the run's context travels in the input (a version 1 plugin ignores it), and
    // the call goes through version 1's entry point, which has no cancellation flag.
    let run = jobschleuder::plugin::RunCall {
        context: json!({"id": "r", "job": "j", "trigger": "manual", "attempt": 1}),
        cancelled: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
    };
    let in_run = jobschleuder::plugin::in_run(Some(run), || {
        host.call_job("v1_echo", args(json!({"a": 2})))
    })
    .unwrap();
    assert_eq!(
        in_run,
        json!({"args": {"a": 2}, "run": {"id": "r", "job": "j", "trigger": "manual", "attempt": 1}})
    );
}

#[test]
fn a_job_function_reads_its_run_and_its_cancellation_flag() {
    let host = host();
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let context = json!({
        "id": "8c3e", "job": "nightly", "trigger": "schedule",
        "scheduled_for": "2026-03-29T03:00:00+02:00", "attempt": 2, "worker": "w1", "parent": null,
    });
    let call = |flag: &std::sync::Arc<std::sync::atomic::AtomicBool>| {
        let run = jobschleuder::plugin::RunCall {
            context: context.clone(),
            cancelled: flag.clone(),
        };
        jobschleuder::plugin::in_run(Some(run), || host.call_job("test_context", args(json!({}))))
            .unwrap()
    };
    let seen = call(&flag);
    assert_eq!(seen["run"], context);
    assert_eq!(seen["cancelled"], false);
    flag.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(call(&flag)["cancelled"], true);
    // Outside a run there is none, and nothing is cancelled; nothing leaks from the last call.
    let outside = host.call_job("test_context", args(json!({}))).unwrap();
    assert_eq!(outside, json!({"run": null, "cancelled": false}));
}

#[test]
fn loading_failures_name_plugin_path_and_job() {
    let host = host();
    let err = host.call_job("not_built", args(json!({}))).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PluginError::Load { .. }), "{err:?}");
    assert!(
        text.contains("no_such_library")
            && text.contains("libno_such_library.so")
            && text.contains("not_built"),
        "{text}"
    );

    let err = host.call_job("not_a_plugin", args(json!({}))).unwrap_err();
    assert!(matches!(err, PluginError::MissingSymbol { .. }), "{err:?}");
    assert!(
        err.to_string().contains("jobschleuder_abi_version"),
        "{err}"
    );

    let err = host
        .call_job("nobody_has_this", args(json!({})))
        .unwrap_err();
    assert!(matches!(err, PluginError::NotConfigured { .. }), "{err:?}");
    assert!(
        err.to_string().contains("nobody_has_this") && err.to_string().contains("plugins"),
        "{err}"
    );

    let err = host
        .call_job("test_missing_function", args(json!({})))
        .unwrap_err();
    assert!(matches!(err, PluginError::NotProvided { .. }), "{err:?}");
    assert!(
        err.to_string().contains("test_echo (job)"),
        "lists what it provides: {err}"
    );

    let err = host.call_job("test_fanout", args(json!({}))).unwrap_err();
    assert!(
        matches!(
            err,
            PluginError::NotConfigured { .. } | PluginError::NotProvided { .. }
        ),
        "{err:?}"
    );
}

#[test]
fn on_startup_failure_is_named_and_retried() {
    let host = host();
    for _ in 0..2 {
        let err = host.call_job("test_broken", args(json!({}))).unwrap_err();
        assert!(matches!(err, PluginError::StartupFailed { .. }), "{err:?}");
        assert!(err.retryable());
        assert!(
            err.to_string().contains("test_broken:on_startup")
                && err.to_string().contains("unreachable"),
            "{err}"
        );
    }
}

#[test]
fn a_hung_on_startup_holds_up_only_its_own_function_and_only_for_its_timeout() {
    let config = Config::from_str_with_env(
        &PathBuf::from("plugins.yaml"),
        &format!("{}worker:\n  startup_timeout: 0.5\n", plugin_config_text()),
        &|_| None,
    )
    .unwrap();
    let host = PluginHost::new(&config);
    let started = std::time::Instant::now();
    let waiting = {
        let host = host.clone();
        std::thread::spawn(move || host.call_job("test_slow_start", args(json!({}))))
    };
    // Other functions of the same library are not held up.
    std::thread::sleep(std::time::Duration::from_millis(100));
    host.call_job("test_echo", args(json!({}))).unwrap();
    assert!(started.elapsed() < std::time::Duration::from_millis(400));
    // Its own calls give up after the timeout, naming it.
    let err = waiting.join().unwrap().unwrap_err();
    assert!(
        matches!(err, PluginError::StartupFailed { .. }) && err.retryable(),
        "{err:?}"
    );
    assert!(err.to_string().contains("startup_timeout"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    // A call with a time limit of its own (the worker's job timeout) waits no longer than that.
    let started = std::time::Instant::now();
    let limited = jobschleuder::plugin::within(Some(std::time::Duration::from_millis(200)), || {
        host.call_job("test_slow_start", args(json!({})))
    });
    assert!(limited.is_err());
    assert!(started.elapsed() < std::time::Duration::from_millis(450));
    // Once it returns, calls get its values.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let result = host.call_job("test_slow_start", args(json!({}))).unwrap();
    assert_eq!(result["started_with"], true);
}

#[test]
fn command_through_the_host_times_out_and_truncates() {
    let host = host();
    let started = std::time::Instant::now();
    let err = host
        .call_job("command", args(json!({"command": "sleep 30 & sleep 30", "shell": true, "timeout": 0.3, "kill_grace": 0.2})))
        .unwrap_err();
    assert!(
        started.elapsed().as_secs() < 20,
        "the timeout did not stop the command"
    );
    assert!(
        err.retryable() && err.details().unwrap()["timed_out"] == true,
        "{err}"
    );

    let result = host
        .call_job(
            "command",
            args(json!({"command": "seq 1 100000", "shell": true})),
        )
        .unwrap();
    let stdout = result["stdout"].as_str().unwrap();
    assert_eq!(stdout.len(), 64 * 1024);
    assert!(stdout.ends_with("99999\n100000\n"));
    assert_eq!(result["stdout_truncated"], true);
}

#[test]
fn worker_exec_runs_preprocessing_jobs_and_postprocessing() {
    let ws = Workspace::new();
    let config = ws.write("config.yaml", &plugin_config_text());
    let out = run(ws.command().arg("--config").arg(&config).args([
        "worker",
        "--exec",
        "test_echo",
        "--preprocessing",
        "test_fanout",
        "--postprocessing",
        "test_post",
        "--args",
        r#"{"count": 2}"#,
    ]));
    let text = success(out);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<&str> = lines.iter().map(|l| l["step"].as_str().unwrap()).collect();
    assert_eq!(
        steps,
        [
            "preprocessing",
            "job",
            "postprocessing",
            "job",
            "postprocessing"
        ]
    );
    assert!(lines.iter().all(|l| l["status"] == "succeeded"));
    assert_eq!(lines[3]["result"]["args"]["index"], 1);
    assert_eq!(lines[4]["result"]["post_saw_result"]["args"]["index"], 1);

    let out =
        run(ws
            .command()
            .arg("--config")
            .arg(&config)
            .args(["worker", "--exec", "test_fail"]));
    let out_text = stdout(&out);
    failure(out, 1);
    let line: Value = serde_json::from_str(out_text.trim()).unwrap();
    assert_eq!(line["status"], "failed");

    let err = failure(
        run(ws.command().arg("--config").arg(&config).args([
            "worker",
            "--exec",
            "test_echo",
            "--args",
            "[1]",
        ])),
        2,
    );
    assert!(err.contains("JSON object"), "{err}");
}

#[test]
fn secrets_given_to_plugins_appear_neither_in_output_nor_in_logs() {
    let ws = Workspace::new();
    let config = ws.write("config.yaml", &plugin_config_text());
    let out = run(ws.command().arg("--config").arg(&config).args([
        "--loglevel",
        "debug",
        "worker",
        "--exec",
        "hello_world",
        "--args",
        r#"{"sot": true}"#,
    ]));
    let (stdout, stderr) = (stdout(&out), stderr(&out));
    success(out);
    assert!(
        stderr.contains("hello world:") && stderr.contains("********"),
        "the plugin's log line:\n{stderr}"
    );
    assert!(
        !stdout.contains("sot-secret") && !stderr.contains("sot-secret"),
        "a secret leaked:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("https://nautobot.lab"),
        "the rest of the section is the plugin's to return: {stdout}"
    );
}

#[test]
fn a_panic_message_never_carries_a_secret() {
    let host = host_with_secrets();
    for (job_args, secret) in [
        (json!({"sot": true}), "sot-secret"),
        (
            json!({"say": "postgres://u:db-pass-4242@h/db"}),
            "db-pass-4242",
        ),
        (json!({"say": "mq-query-99"}), "mq-query-99"),
    ] {
        let err = host.call_job("test_panic", args(job_args)).unwrap_err();
        assert!(matches!(err, PluginError::Panicked { .. }), "{err:?}");
        let text = shown(&err);
        assert!(
            text.contains("boom from the plugin") && text.contains("********"),
            "{text}"
        );
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
}

#[test]
fn on_startup_credentials_are_masked_like_the_sot_token() {
    let host = host();
    let result = host
        .call_job("test_startup_secret", args(json!({})))
        .unwrap();
    let text = result.to_string();
    assert!(
        !text.contains("startup-token-77") && !text.contains("nested-pw-88"),
        "{text}"
    );
    assert_eq!(result["header"], "Bearer ********", "{text}");
    assert_eq!(result["args"]["vault"]["password"], "********", "{text}");
    assert_eq!(
        result["args"]["region"], "eu-north-1",
        "values under other keys are the plugin's to return"
    );
    for then in ["fail", "panic"] {
        let err = host
            .call_job("test_startup_secret", args(json!({"then": then})))
            .unwrap_err();
        let text = shown(&err);
        assert!(text.contains("the api refused ********"), "{text}");
        assert!(!text.contains("startup-token-77"), "{text}");
    }
}

#[test]
fn configured_secrets_are_masked_whatever_key_holds_them() {
    let host = host_with_secrets();
    let result = host
        .call_job(
            "test_echo",
            args(json!({"conn": "postgres://u:db-pass-4242@h/db", "note": "mq-query-99"})),
        )
        .unwrap();
    assert_eq!(result["args"]["conn"], "postgres://u:********@h/db");
    assert_eq!(result["args"]["note"], "********");
    let err = host
        .call_job("test_fail", args(json!({"x": "db-pass-4242"})))
        .unwrap_err();
    assert_eq!(err.details().unwrap()["args"]["x"], "********");
    // The default broker password is public: masking every "guest" would only garble output.
    let result = host
        .call_job("hello_world", args(json!({"user": "guest"})))
        .unwrap();
    assert_eq!(result["user"], "guest");
}

#[test]
fn logs_and_output_hide_configured_startup_and_panic_secrets() {
    let ws = Workspace::new();
    let config = ws.write("config.yaml", &config_with_secrets_text());
    // hello_world logs its arguments; the others log or panic with what they were given.
    for (job, job_args) in [
        (
            "hello_world",
            r#"{"conn": "postgres://u:db-pass-4242@h/db"}"#,
        ),
        ("test_startup_secret", r#"{"then": "panic"}"#),
        ("test_panic", r#"{"sot": true, "say": "mq-query-99"}"#),
    ] {
        let out = run(ws.command().arg("--config").arg(&config).args([
            "--loglevel",
            "debug",
            "worker",
            "--exec",
            job,
            "--args",
            job_args,
        ]));
        let (stdout, stderr) = (stdout(&out), stderr(&out));
        // What the plugin made of it; the arguments echoed back are the caller's own.
        let stdout: String = stdout
            .lines()
            .map(|line| {
                let mut line: Value = serde_json::from_str(line).unwrap();
                line.as_object_mut().unwrap().remove("args");
                line.to_string()
            })
            .collect();
        assert!(
            stdout.contains("********") && stderr.contains("********"),
            "{job} did not run as expected:\n{stdout}\n{stderr}"
        );
        for secret in [
            "db-pass-4242",
            "mq-query-99",
            "startup-token-77",
            "sot-secret",
        ] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{job}: {secret} leaked:\n{stdout}\n{stderr}"
            );
        }
    }
}

#[test]
fn command_quotes_substituted_values_for_the_shell() {
    let ws = Workspace::new();
    let marker = ws.path().join("injected");
    let host_value = format!("sw1;touch {}", marker.display());
    let result = host()
        .call_job(
            "command",
            args(json!({"command": "printf '[%s]' {host}", "shell": true, "host": host_value})),
        )
        .unwrap();
    assert_eq!(
        result["stdout"],
        format!("[{host_value}]"),
        "the value arrives as one argument"
    );
    assert!(!marker.exists(), "the substituted value ran as a command");
}
