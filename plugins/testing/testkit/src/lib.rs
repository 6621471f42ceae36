//! Functions of every kind, for the host's tests: echo, failure, panic, fan-out, postprocessing,
//! on_startup (working, failing, and handing out a credential), and a sleeper.

use std::time::Duration;

use jobschleuder_plugin::{jobschleuder, json, Args, Job, JobError, Outcome, Value};

#[jobschleuder("test_echo")]
fn echo(args: Args) -> Result<Value, JobError> {
    jobschleuder_plugin::debug!("test_echo called with {} arguments", args.len());
    // Proof that the plugin saw the real token, without returning it.
    let token_length = args
        .get("sot")
        .and_then(|sot| sot.get("token"))
        .and_then(Value::as_str)
        .map(str::len);
    Ok(json!({ "args": args, "token_length": token_length }))
}

#[jobschleuder("test_echo:on_startup")]
fn echo_startup() -> Result<Args, JobError> {
    let mut args = Args::new();
    args.insert("from_startup".into(), json!(true));
    args.insert("shared".into(), json!("startup wins"));
    Ok(args)
}

#[jobschleuder("test_fail")]
fn fail(args: Args) -> Result<Value, JobError> {
    let retryable = args
        .get("retryable")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let error = if retryable {
        JobError::retryable("asked to fail")
    } else {
        JobError::fatal("asked to fail")
    };
    Err(error.with_details(json!({ "args": args })))
}

#[jobschleuder("test_panic")]
fn panic(args: Args) -> Result<Value, JobError> {
    // Panic messages that carry what the plugin was given: the token, or any argument.
    let token = args
        .get("sot")
        .and_then(|sot| sot.get("token"))
        .and_then(Value::as_str)
        .map(|token| format!(" with token {token}"))
        .unwrap_or_default();
    let said = args
        .get("say")
        .and_then(Value::as_str)
        .map(|say| format!(" saying {say}"))
        .unwrap_or_default();
    panic!("boom from the plugin{token}{said}")
}

/// Uses a credential its on_startup fetched, and shows it everywhere it can: result, error,
/// panic and log line.
#[jobschleuder("test_startup_secret")]
fn startup_secret(args: Args) -> Result<Value, JobError> {
    let token = args
        .get("api_token")
        .and_then(Value::as_str)
        .unwrap_or("none")
        .to_string();
    jobschleuder_plugin::info!("calling the api with {token}");
    match args.get("then").and_then(Value::as_str) {
        Some("fail") => Err(JobError::fatal(format!("the api refused {token}"))
            .with_details(json!({ "header": format!("Bearer {token}") }))),
        Some("panic") => panic!("the api refused {token}"),
        _ => Ok(json!({ "args": args, "header": format!("Bearer {token}") })),
    }
}

#[jobschleuder("test_startup_secret:on_startup")]
fn startup_secret_startup() -> Result<Args, JobError> {
    let mut args = Args::new();
    args.insert("api_token".into(), json!("startup-token-77"));
    args.insert("vault".into(), json!({ "password": "nested-pw-88" }));
    args.insert("region".into(), json!("eu-north-1"));
    Ok(args)
}

#[jobschleuder("test_sleep")]
fn sleep(args: Args) -> Result<Value, JobError> {
    let seconds = args.get("seconds").and_then(Value::as_f64).unwrap_or(1.0);
    std::thread::sleep(Duration::from_secs_f64(seconds));
    Ok(json!({ "slept": seconds }))
}

#[jobschleuder("test_fanout", preprocessing)]
fn fanout(args: Args) -> Result<Vec<Job>, JobError> {
    let count = args
        .get("count")
        .and_then(Value::as_u64)
        .ok_or("test_fanout needs `count`")?;
    Ok((0..count)
        .map(|i| {
            let mut child = args.clone();
            child.remove("count");
            child.insert("index".into(), json!(i));
            match args.get("cmd").and_then(Value::as_str) {
                Some(cmd) => Job::new(cmd, child),
                None => Job::same(child),
            }
        })
        .collect())
}

#[jobschleuder("test_post", postprocessing)]
fn post(args: Args, outcome: Outcome) -> Result<Value, JobError> {
    Ok(json!({
        "post_saw_args": args,
        "post_saw_result": outcome.result,
        "post_saw_error": outcome.error.map(|e| e.message),
    }))
}

#[jobschleuder("test_broken")]
fn broken(_args: Args) -> Result<Value, JobError> {
    Ok(json!("unreachable: on_startup fails"))
}

#[jobschleuder("test_broken:on_startup")]
fn broken_startup() -> Result<Args, JobError> {
    Err(JobError::retryable("the source of truth is unreachable"))
}

/// Kills the whole worker process, as a crashing native library would.
#[jobschleuder("test_abort")]
fn abort(_args: Args) -> Result<Value, JobError> {
    std::process::abort()
}

#[jobschleuder("test_slow_start")]
fn slow_start(args: Args) -> Result<Value, JobError> {
    Ok(json!({ "started_with": args.get("ready") }))
}

/// An on_startup that takes three seconds, as one waiting on an unreachable server would.
#[jobschleuder("test_slow_start:on_startup")]
fn slow_start_startup() -> Result<Args, JobError> {
    std::thread::sleep(Duration::from_secs(3));
    let mut values = Args::new();
    values.insert("ready".into(), json!(true));
    Ok(values)
}

/// What a job function can read of its run, and whether it was cancelled; with `wait_cancel`
/// it waits (up to a minute) for the cancel and returns when it sees it.
#[jobschleuder("test_context")]
fn context(args: Args) -> Result<Value, JobError> {
    if args.get("wait_cancel").and_then(Value::as_bool) == Some(true) {
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while !jobschleuder_plugin::cancelled() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        if jobschleuder_plugin::cancelled() {
            return Err(JobError::fatal("saw the cancel and stopped early"));
        }
    }
    Ok(json!({
        "run": jobschleuder_plugin::current_run(),
        "cancelled": jobschleuder_plugin::cancelled(),
    }))
}
