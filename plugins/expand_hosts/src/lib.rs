//! `expand_hosts`: a preprocessing plugin that fans a job out to one run per host — the shape of
//! the original's backup preprocessing, without Nautobot.
//!
//! Arguments (of the job it preprocesses):
//! - `hosts`: a list of host names, and/or `hosts_file`: a file with one host per line (blank
//!   lines and `#` comments are skipped).
//! - `exclude.devices`: host names to leave out; `exclude.pattern`: regular expressions; a host
//!   is left out when a pattern matches anywhere in its name (anchor with `^...$`).
//! - `fanout_job`: the job each host runs (default: the job being preprocessed).
//!
//! Each host's job gets the same arguments, without those above, plus `host: <name>`. Duplicate
//! hosts run once.

use std::collections::BTreeSet;

use jobschleuder_plugin::{jobschleuder, json, Args, Job, JobError, Value};
use regex::Regex;

const OWN_KEYS: [&str; 4] = ["hosts", "hosts_file", "exclude", "fanout_job"];

fn strings(value: Option<&Value>, what: &str) -> Result<Vec<String>, JobError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(JobError::fatal(format!(
                    "expand_hosts: `{what}` has a non-string entry: {other}"
                ))),
            })
            .collect(),
        Some(other) => Err(JobError::fatal(format!(
            "expand_hosts: `{what}` must be a list of strings, not {other}"
        ))),
    }
}

#[jobschleuder("expand_hosts", preprocessing)]
fn expand_hosts(args: Args) -> Result<Vec<Job>, JobError> {
    let mut hosts = strings(args.get("hosts"), "hosts")?;
    if let Some(path) = args.get("hosts_file") {
        let path = path
            .as_str()
            .ok_or("expand_hosts: `hosts_file` must be a path")?;
        let text = std::fs::read_to_string(path).map_err(|e| {
            JobError::fatal(format!(
                "expand_hosts: cannot read hosts_file {path:?}: {e}"
            ))
        })?;
        hosts.extend(
            text.lines()
                .map(|line| line.split('#').next().unwrap_or("").trim())
                .filter(|line| !line.is_empty())
                .map(str::to_string),
        );
    }
    if args.get("hosts").is_none() && args.get("hosts_file").is_none() {
        return Err(JobError::fatal(
            "expand_hosts: give `hosts` (a list) or `hosts_file` (a path)",
        ));
    }
    let exclude = args.get("exclude");
    let excluded: BTreeSet<String> =
        strings(exclude.and_then(|e| e.get("devices")), "exclude.devices")?
            .into_iter()
            .collect();
    let patterns = strings(exclude.and_then(|e| e.get("pattern")), "exclude.pattern")?
        .iter()
        .map(|p| {
            Regex::new(p).map_err(|e| {
                JobError::fatal(format!("expand_hosts: bad exclude.pattern {p:?}: {e}"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cmd = args
        .get("fanout_job")
        .and_then(Value::as_str)
        .map(str::to_string);

    let mut base = args.clone();
    for key in OWN_KEYS {
        base.remove(key);
    }
    let mut seen = BTreeSet::new();
    let mut jobs = Vec::new();
    for host in hosts {
        if excluded.contains(&host)
            || patterns.iter().any(|p| p.is_match(&host))
            || !seen.insert(host.clone())
        {
            continue;
        }
        let mut child = base.clone();
        child.insert("host".into(), json!(host));
        jobs.push(match &cmd {
            Some(cmd) => Job::new(cmd.clone(), child),
            None => Job::same(child),
        });
    }
    jobschleuder_plugin::info!("expand_hosts: {} hosts after exclusions", jobs.len());
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts_of(args: Value) -> Vec<String> {
        expand_hosts(args.as_object().cloned().unwrap())
            .unwrap()
            .into_iter()
            .map(|j| j.args["host"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn excludes_devices_and_patterns() {
        let hosts = hosts_of(json!({
            "hosts": ["lab1.local", "labx.local", "lab2.local", "labxx.local", "lab1.local"],
            "exclude": {"devices": ["labx.local"], "pattern": [".*xx"]},
        }));
        assert_eq!(hosts, ["lab1.local", "lab2.local"]);
    }

    #[test]
    fn reads_a_hosts_file_and_keeps_other_arguments() {
        let path = std::env::temp_dir().join(format!("expand-hosts-{}", std::process::id()));
        std::fs::write(&path, "# routers\nr1\n\nr2  # core\n").unwrap();
        let jobs = expand_hosts(
            json!({"hosts_file": path, "fanout_job": "command", "command": "backup {host}"})
                .as_object()
                .cloned()
                .unwrap(),
        )
        .unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].cmd.as_deref(), Some("command"));
        assert_eq!(jobs[1].args["host"], "r2");
        assert_eq!(jobs[1].args["command"], "backup {host}");
        assert!(!jobs[1].args.contains_key("hosts_file"));
    }

    #[test]
    fn bad_input_is_named() {
        let err = expand_hosts(Args::new()).unwrap_err();
        assert!(err.message.contains("hosts"));
        let err = expand_hosts(
            json!({"hosts": ["a"], "exclude": {"pattern": ["("]}})
                .as_object()
                .cloned()
                .unwrap(),
        )
        .unwrap_err();
        assert!(err.message.contains("exclude.pattern"), "{}", err.message);
    }
}
