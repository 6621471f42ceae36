//! `hello_world`: logs its arguments and returns them (the original's example plugin).

use jobschleuder_plugin::{jobschleuder, Args, JobError, Value};

#[jobschleuder("hello_world")]
fn hello_world(args: Args) -> Result<Value, JobError> {
    jobschleuder_plugin::info!("hello world: {}", Value::Object(args.clone()));
    Ok(Value::Object(args))
}
