//! Functions of every kind, for the host's tests: echo, failure, panic, fan-out, postprocessing,
//! on_startup (working and failing), and a sleeper.

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
fn panic(_args: Args) -> Result<Value, JobError> {
    panic!("boom from the plugin")
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
