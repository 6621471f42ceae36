//! Benchmark: the cost of a Python plugin call (out of process, JSON lines) next to a Rust
//! plugin call (in process, C ABI), both warm.
//!
//! `cargo build --release --workspace && cargo run --release --example bench_python -- [CALLS]`
//! (default 2000). Prints, one per line: `rust_calls_per_s`, `rust_p50_us`,
//! `python_calls_per_s`, `python_p50_us`. Needs `python3` on PATH.

use std::path::PathBuf;
use std::time::Instant;

use jobschleuder::config::Config;
use jobschleuder::plugin::PluginHost;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let calls: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let native = root.join("target/release");
    let python = root.join("plugins/testing/python");
    let text = format!(
        "plugins:\n  hello_world:\n    plugin_dir: {}\n    plugin: hello_world\n  py_echo:\n    plugin_dir: {}\n    plugin: echo\n",
        native.display(),
        python.display()
    );
    let config = Config::from_str_with_env(&root.join("bench.yaml"), &text, &|_| None)?;
    let host = PluginHost::new(&config);
    // Both return their arguments.
    for (name, function) in [("rust", "hello_world"), ("python", "py_echo")] {
        let call = |i: usize| {
            let mut args = serde_json::Map::new();
            args.insert("n".into(), i.into());
            host.call_job(function, args)
        };
        // Warm: the library loaded, the Python process started and its module imported.
        call(0).map_err(|e| format!("{name}: {e}"))?;
        let mut took = Vec::with_capacity(calls);
        let started = Instant::now();
        for i in 0..calls {
            let one = Instant::now();
            call(i).map_err(|e| format!("{name}: {e}"))?;
            took.push(one.elapsed());
        }
        let total = started.elapsed();
        took.sort();
        println!(
            "{name}_calls_per_s {:.0}",
            calls as f64 / total.as_secs_f64()
        );
        println!(
            "{name}_p50_us {:.0}",
            took[took.len() / 2].as_secs_f64() * 1e6
        );
    }
    Ok(())
}
