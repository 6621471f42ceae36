//! Operator control: pausing entries, overlap policies, cancelling runs, backfill, run context,
//! chains and jitter — through the command line and real schedulers and workers, with stepped
//! scheduling passes where the time of day matters.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use jobschleuder::config::Config;
use jobschleuder::scheduler::{create_due_runs, start_of};
use jobschleuder::store::{Claim, Finish, NewRun, RunEnd, Store};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::util::cluster::Cluster;
use crate::util::{failure, run};

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn config(extra: &str) -> Config {
    Config::from_str_with_env(
        &PathBuf::from("config.yaml"),
        &format!("timezone: UTC\n{extra}"),
        &|_| None,
    )
    .unwrap()
}

/// (scheduled_for, status, error) of a job's runs, by slot.
async fn runs_of(
    cluster: &Cluster,
    job: &str,
) -> Vec<(Option<DateTime<Utc>>, String, Option<String>)> {
    let mut runs: Vec<_> = cluster
        .runs()
        .await
        .into_iter()
        .filter(|r| r.job_name == job)
        .collect();
    runs.sort_by_key(|r| (r.scheduled_for.is_none(), r.scheduled_for, r.created_at));
    runs.into_iter()
        .map(|r| (r.scheduled_for, r.status, r.error))
        .collect()
}

async fn run_json(cluster: &Cluster, id: &str) -> Value {
    let text = cluster.run_ok(&["runs", "--show", id, "--json"]);
    serde_json::from_str(&text).unwrap()
}

crate::on_every_backend! {
async fn a_paused_entry_fires_nothing_keeps_its_pause_across_imports_and_resumes_from_now(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "a_paused_entry_fires_nothing_keeps_its_pause_across_imports_and_resumes_from_now",
        "",
    )
    .await
    else {
        return;
    };
    let jobs = "jobs:\n\
        - id: hourly\n  job: hello_world\n  schedule: '0 * * * *'\n\
        - id: other\n  job: hello_world\n  schedule: '0 * * * *'\n";
    cluster.import(jobs);
    let store = cluster.store.clone();
    let config = config("scheduler:\n  misfire_grace: 60\n");
    create_due_runs(&store, &config, Some(utc("2026-06-01T09:30:00Z")))
        .await
        .unwrap();

    let out = cluster.run_ok(&[
        "registry",
        "--pause",
        "hourly",
        "--note",
        "switch maintenance",
    ]);
    assert!(out.contains("Paused 1 registry entry."), "{out}");
    for at in ["2026-06-01T10:00:10Z", "2026-06-01T11:00:10Z"] {
        create_due_runs(&store, &config, Some(utc(at)))
            .await
            .unwrap();
    }
    assert!(runs_of(&cluster, "hourly").await.is_empty());
    assert_eq!(runs_of(&cluster, "other").await.len(), 2);
    // A paused entry's old next run does not wake schedulers: they sleep until the next
    // entry that may fire.
    let wakeup = store.next_wakeup().await.unwrap();
    assert_eq!(wakeup.next_run, Some(utc("2026-06-01T12:00:00Z")));

    // A re-import (by job name) keeps the pause and its note, and every view shows it.
    cluster.import(jobs);
    let registry: Value =
        serde_json::from_str(&cluster.run_ok(&["registry", "-sr", "--json"])).unwrap();
    let hourly = registry
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "hourly")
        .unwrap();
    assert_eq!(hourly["paused"], true);
    assert_eq!(hourly["paused_note"], "switch maintenance");
    for args in [
        &["registry", "-sr"][..],
        &["registry", "-sj"][..],
        &["scheduler", "-aj"][..],
    ] {
        let out = cluster.run_ok(args);
        assert!(
            out.contains("paused: switch maintenance"),
            "{args:?}:\n{out}"
        );
    }
    let jobs_json: Value =
        serde_json::from_str(&cluster.run_ok(&["registry", "-sj", "--json"])).unwrap();
    assert!(jobs_json
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["name"] == "hourly" && j["paused"] == true));
    let all: Value =
        serde_json::from_str(&cluster.run_ok(&["scheduler", "-aj", "--json"])).unwrap();
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["job_name"] == "hourly" && e["paused"] == true));

    // Running a paused job by hand still works.
    let id = cluster.run_now("hourly");
    assert!(Uuid::parse_str(&id).is_ok(), "{id}");

    // Unknown names change nothing and say so; a second pause of the same entry is no change.
    let refused = failure(
        run(cluster
            .command()
            .args(["registry", "--pause", "other", "--pause", "nope"])),
        2,
    );
    assert!(
        refused.contains("\"nope\"") && refused.contains("nothing was changed"),
        "{refused}"
    );
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM registry WHERE paused")
            .await,
        1
    );
    failure(run(cluster.command().args(["registry", "--pause"])), 2);

    // Resumed three hours late with misfire_grace 60 s: the missed slots run once, then the
    // schedule goes on from now.
    let out = cluster.run_ok(&["registry", "--resume", "--all"]);
    assert!(
        out.contains("Resumed 1 registry entry (1 active already)."),
        "{out}"
    );
    create_due_runs(&store, &config, Some(utc("2026-06-01T13:00:30Z")))
        .await
        .unwrap();
    let scheduled: Vec<_> = runs_of(&cluster, "hourly")
        .await
        .into_iter()
        .filter_map(|r| r.0)
        .collect();
    assert_eq!(scheduled, [utc("2026-06-01T10:00:00Z")]);
    create_due_runs(&store, &config, Some(utc("2026-06-01T14:00:10Z")))
        .await
        .unwrap();
    let scheduled: Vec<_> = runs_of(&cluster, "hourly")
        .await
        .into_iter()
        .filter_map(|r| r.0)
        .collect();
    assert_eq!(
        scheduled,
        [utc("2026-06-01T10:00:00Z"), utc("2026-06-01T14:00:00Z")]
    );
}
}

crate::on_every_store! {
async fn forbid_skips_a_slot_while_its_job_runs_and_replace_cancels_the_older_run(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "forbid_skips_a_slot_while_its_job_runs_and_replace_cancels_the_older_run",
        "",
    )
    .await
    else {
        return;
    };
    cluster.import(
        "jobs:\n\
         - id: guarded\n  job: hello_world\n  schedule: '0 * * * *'\n  concurrency: forbid\n\
         - id: replaced\n  job: hello_world\n  schedule: '0 * * * *'\n  concurrency: replace\n\
         - id: free\n  job: hello_world\n  schedule: '0 * * * *'\n\
         - id: bulk\n  job: hello_world\n  schedule: '0 * * * *'\n  concurrency: replace\n",
    );
    let store = cluster.store.clone();
    let config = config("");
    let pass = |at: &'static str| {
        let (store, config) = (&store, &config);
        async move { create_due_runs(store, config, Some(utc(at))).await.unwrap() }
    };
    pass("2026-06-01T09:30:00Z").await;
    // A backfill waiting in the queue is the operator's: neither skipped for nor replaced.
    let out = cluster.run_ok(&[
        "scheduler",
        "--backfill",
        "bulk",
        "--from",
        "2026-05-01T00:00:00Z",
        "--to",
        "2026-05-01T02:00:00Z",
    ]);
    assert!(out.contains("3 runs created"), "{out}");
    pass("2026-06-01T10:00:05Z").await;
    let first_guarded: Uuid = cluster
        .runs()
        .await
        .iter()
        .find(|r| r.job_name == "guarded")
        .expect("the guarded run")
        .id;
    // 11:00: every 10:00 run is still queued.
    pass("2026-06-01T11:00:05Z").await;
    let guarded = runs_of(&cluster, "guarded").await;
    assert_eq!(guarded[0].1, "queued");
    assert_eq!(guarded[1].1, "skipped");
    let reason = guarded[1].2.clone().unwrap();
    assert!(
        reason.contains(&first_guarded.to_string()) && reason.contains("concurrency: forbid"),
        "{reason}"
    );
    let replaced = runs_of(&cluster, "replaced").await;
    assert_eq!(
        replaced.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ["cancelled", "queued"]
    );
    assert!(replaced[0]
        .2
        .as_deref()
        .unwrap()
        .contains("replaced by a newer run"));
    assert_eq!(runs_of(&cluster, "free").await.len(), 2);
    let bulk = runs_of(&cluster, "bulk").await;
    assert_eq!(
        bulk.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ["queued", "queued", "queued", "cancelled", "queued"],
        "{bulk:?}"
    );
    // A skipped slot is recorded as ended, so it never runs and the slot is taken.
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM job_runs WHERE status = 'skipped' AND finished_at IS NULL")
            .await,
        0
    );

    // The guarded run ends; the replaced one is running on some worker.
    let now = cluster.time(Utc::now());
    cluster
        .sql(&format!(
            "UPDATE job_runs SET status = 'succeeded', finished_at = {now} WHERE id = {}",
            cluster.id(first_guarded)
        ))
        .await;
    cluster
        .sql(&format!(
            "UPDATE job_runs SET status = 'running', attempt = 1, claim_token = 7, started_at = {now}
             WHERE job_name = 'replaced' AND status = 'queued'"
        ))
        .await;
    pass("2026-06-01T12:00:05Z").await;
    let guarded = runs_of(&cluster, "guarded").await;
    assert_eq!(
        guarded.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        ["succeeded", "skipped", "queued"]
    );
    // A running run is marked for its worker, which stops it and records it cancelled.
    assert_eq!(
        cluster
            .count(
                "SELECT count(*) FROM job_runs WHERE job_name = 'replaced' AND status = 'running'
                   AND cancel_requested_at IS NOT NULL AND cancel_reason LIKE '%replaced%'"
            )
            .await,
        1
    );
    let replaced = runs_of(&cluster, "replaced").await;
    assert_eq!(replaced.last().unwrap().1, "queued");
}
}

crate::on_every_backend! {
async fn two_schedulers_with_forbid_never_start_a_run_while_another_goes_on(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "two_schedulers_with_forbid_never_start_a_run_while_another_goes_on",
        "scheduler:\n  max_sleep: 60\n  batch_size: 1\n",
    )
    .await
    else {
        return;
    };
    cluster.import(
        "jobs:\n- id: slow\n  job: test_sleep\n  schedule: '*/1 * * * * *'\n  concurrency: forbid\n  arguments:\n    seconds: 2.5\n",
    );
    cluster.run_ok(&["scheduler", "--init"]);
    let _worker = cluster.worker("w1", 4);
    let first = cluster.scheduler();
    let second = cluster.scheduler();
    cluster
        .wait_until(
            "two finished runs and several skipped slots",
            Duration::from_secs(60),
            "SELECT count(*) FILTER (WHERE status = 'succeeded') >= 2
                AND count(*) FILTER (WHERE status = 'skipped') >= 4 FROM job_runs",
        )
        .await;
    for mut scheduler in [first, second] {
        scheduler.signal("TERM");
        assert!(scheduler.wait_exit(Duration::from_secs(30)).is_some());
    }
    // No run was created while another run of the job was queued or running.
    let overlapping = cluster
        .count(
            "SELECT count(*) FROM job_runs a JOIN job_runs b
               ON a.id <> b.id AND a.created_at < b.created_at
                  AND (a.finished_at IS NULL OR a.finished_at > b.created_at)
             WHERE a.status <> 'skipped' AND b.status <> 'skipped'",
        )
        .await;
    assert_eq!(overlapping, 0, "runs overlapped:\n{}", cluster.logs());
    assert_eq!(
        cluster
            .count(
                "SELECT count(*) FROM job_runs WHERE status = 'skipped'
                   AND (error NOT LIKE '%concurrency: forbid%' OR finished_at IS NULL OR started_at IS NOT NULL)"
            )
            .await,
        0
    );
    assert_eq!(
        cluster
            .count("SELECT count(*) - count(DISTINCT scheduled_for) FROM job_runs")
            .await,
        0,
        "a slot was created twice"
    );
}
}

crate::on_every_backend! {
async fn cancel_stops_queued_running_and_fanned_out_runs_on_another_worker_process(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "cancel_stops_queued_running_and_fanned_out_runs_on_another_worker_process",
        "",
    )
    .await
    else {
        return;
    };
    let pid_file = cluster.ws.path().join("long.pid");
    cluster.import(&format!(
        "jobs:\n\
         - id: queued\n  job: test_echo\n\
         - id: long\n  job: command\n  arguments:\n    command: ['/bin/sh', '-c', 'echo $$ > {}; exec sleep 60']\n    kill_grace: 1\n\
         - id: aware\n  job: test_context\n  arguments:\n    wait_cancel: true\n\
         - id: fan\n  job: test_context\n  preprocessing: test_fanout\n  arguments:\n    count: 3\n    wait_cancel: true\n\
         - id: stubborn\n  job: test_sleep\n  arguments:\n    seconds: 4\n",
        pid_file.display()
    ));

    // A queued run: cancelled at once, and never runs.
    let queued = cluster.run_now("queued");
    let out = cluster.run_ok(&["runs", "--cancel", &queued]);
    assert!(out.contains("was queued: recorded cancelled"), "{out}");
    let worker = cluster.worker("w1", 2);
    let long = cluster.run_now("long");
    let aware = cluster.run_now("aware");
    cluster
        .wait_until(
            "both runs running",
            Duration::from_secs(30),
            "SELECT count(*) = 2 FROM job_runs WHERE status = 'running'",
        )
        .await;
    let pid: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(PathBuf::from(format!("/proc/{pid}")).exists());
    for id in [&long, &aware] {
        let out = cluster.run_ok(&["runs", "--cancel", id]);
        assert!(
            out.contains("running on worker w1: it is being stopped"),
            "{out}"
        );
    }
    cluster
        .wait_until(
            "both runs recorded cancelled",
            Duration::from_secs(30),
            "SELECT count(*) = 3 FROM job_runs WHERE status = 'cancelled'",
        )
        .await;
    // The program's process group was killed, not left behind.
    assert!(
        !PathBuf::from(format!("/proc/{pid}")).exists(),
        "the cancelled program still runs"
    );
    let long_run = run_json(&cluster, &long).await;
    let error = long_run["error"].as_str().unwrap();
    assert!(error.starts_with("cancelled by an operator"), "{error}");
    let aware_run = run_json(&cluster, &aware).await;
    assert!(
        aware_run["error"]
            .as_str()
            .unwrap()
            .contains("saw the cancel and stopped early"),
        "{aware_run}"
    );
    let queued_run = run_json(&cluster, &queued).await;
    assert_eq!(queued_run["status"], "cancelled");
    assert!(
        queued_run["started_at"].is_null(),
        "a cancelled queued run ran"
    );
    assert!(worker.log_text().contains("run cancelled"));
    // Cancelling again changes nothing and says so.
    let again = cluster.run_ok(&["runs", "--cancel", &long]);
    assert!(again.contains("has ended already (cancelled)"), "{again}");

    // A fan-out parent cancels its children: two run (one slot each), one waits.
    let fan = cluster.run_now("fan");
    cluster
        .wait_until(
            "two children running",
            Duration::from_secs(30),
            "SELECT count(*) = 2 FROM job_runs WHERE parent_id IS NOT NULL AND status = 'running'",
        )
        .await;
    let out = cluster.run_ok(&["runs", "--cancel", &fan]);
    assert!(
        out.contains("Its fan-out children: 1 cancelled, 2 running and being stopped."),
        "{out}"
    );
    cluster
        .wait_until(
            "every child cancelled",
            Duration::from_secs(30),
            "SELECT count(*) = 3 FROM job_runs WHERE parent_id IS NOT NULL AND status = 'cancelled'",
        )
        .await;
    // A plugin that does not look at the flag runs to its end; a second cancel meanwhile says
    // that the first is under way; the end is recorded cancelled.
    let stubborn = cluster.run_now("stubborn");
    cluster
        .wait_until(
            "the stubborn run running",
            Duration::from_secs(30),
            &format!(
                "SELECT status = 'running' FROM job_runs WHERE id = {}",
                cluster.id(Uuid::parse_str(&stubborn).unwrap())
            ),
        )
        .await;
    let first = cluster.run_ok(&["runs", "--cancel", &stubborn]);
    assert!(first.contains("it is being stopped"), "{first}");
    let second = cluster.run_ok(&["runs", "--cancel", &stubborn]);
    assert!(second.contains("is already being cancelled"), "{second}");
    cluster
        .wait_until(
            "the stubborn run recorded cancelled",
            Duration::from_secs(30),
            &format!(
                "SELECT status = 'cancelled' FROM job_runs WHERE id = {}",
                cluster.id(Uuid::parse_str(&stubborn).unwrap())
            ),
        )
        .await;
    let stubborn_run = run_json(&cluster, &stubborn).await;
    assert!(
        stubborn_run["error"]
            .as_str()
            .unwrap()
            .contains("its job had finished before it could be stopped"),
        "{stubborn_run}"
    );
    assert_eq!(stubborn_run["result"]["slept"], 4.0);
    // Unknown runs are refused.
    let refused = failure(
        run(cluster
            .command()
            .args(["runs", "--cancel", &Uuid::new_v4().to_string()])),
        2,
    );
    assert!(refused.contains("no run"), "{refused}");
}
}

crate::on_every_backend! {
async fn a_backfill_creates_each_missing_slot_once_and_nothing_when_run_again(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "a_backfill_creates_each_missing_slot_once_and_nothing_when_run_again",
        "",
    )
    .await
    else {
        return;
    };
    cluster.import(
        "jobs:\n\
         - id: hourly\n  job: hello_world\n  schedule: '0 * * * *'\n  timezone: Europe/Berlin\n\
         - id: minutely\n  job: hello_world\n  schedule: '* * * * *'\n\
         - id: unscheduled\n  job: hello_world\n",
    );
    // One slot of the range has its run already (backfilled before).
    let job = cluster.store.find_job("hourly").await.unwrap().unwrap();
    let created = cluster
        .store
        .backfill(&job, &[utc("2026-01-01T01:00:00Z")], &mut |_, _| {})
        .await
        .unwrap();
    assert_eq!(created, 1);
    let args = [
        "scheduler",
        "--backfill",
        "hourly",
        "--from",
        "2026-01-01T00:00:00",
        "--to",
        "2026-01-01T05:00:00",
    ];
    let out = cluster.run_ok(&args);
    assert!(
        out.contains("6 slots from 2026-01-01T00:00:00+01:00 to 2026-01-01T05:00:00+01:00 (Europe/Berlin); 5 runs created, 1 slot had a run already."),
        "{out}"
    );
    let mut slots: Vec<DateTime<Utc>> = cluster
        .runs()
        .await
        .into_iter()
        .filter(|r| r.job_name == "hourly" && r.trigger == "backfill")
        .filter_map(|r| r.scheduled_for)
        .filter(|t| *t != utc("2026-01-01T01:00:00Z"))
        .collect();
    slots.sort();
    let expected: Vec<DateTime<Utc>> = [23, 0, 2, 3, 4]
        .iter()
        .map(|h| {
            let day = if *h == 23 { 31 } else { 1 };
            let (year, month) = if *h == 23 { (2025, 12) } else { (2026, 1) };
            Utc.with_ymd_and_hms(year, month, day, *h, 0, 0).unwrap()
        })
        .collect();
    assert_eq!(slots, expected);
    let again = cluster.run_ok(&args);
    assert!(
        again.contains("0 runs created, 6 slots had a run already."),
        "{again}"
    );
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM job_runs WHERE job_name = 'hourly'")
            .await,
        6
    );
    // The runs list filters by the new trigger.
    let listed: Value = serde_json::from_str(&cluster.run_ok(&[
        "runs",
        "--trigger",
        "backfill",
        "--limit",
        "100",
        "--json",
    ]))
    .unwrap();
    // The five of the command line and the one made first.
    assert_eq!(listed.as_array().unwrap().len(), 6);

    // Two days of a per-minute job: more than 1,000 slots need --yes.
    let many = [
        "scheduler",
        "--backfill",
        "minutely",
        "--from",
        "2026-01-01T00:00:00Z",
        "--to",
        "2026-01-03T00:00:00Z",
    ];
    let refused = failure(run(cluster.command().args(many)), 2);
    assert!(
        refused.contains("2881 slots") && refused.contains("--yes"),
        "{refused}"
    );
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM job_runs WHERE job_name = 'minutely'")
            .await,
        0
    );
    let out = cluster.run_ok(&[&many[..], &["--yes"]].concat());
    assert!(out.contains("2881 runs created"), "{out}");

    // The future belongs to the scheduler; a job without a schedule has no slots.
    let future = failure(
        run(cluster.command().args([
            "scheduler",
            "--backfill",
            "hourly",
            "--from",
            "2026-01-01T00:00:00Z",
            "--to",
            "2999-01-01T00:00:00Z",
        ])),
        2,
    );
    assert!(future.contains("in the future"), "{future}");
    let unscheduled = failure(
        run(cluster.command().args([
            "scheduler",
            "--backfill",
            "unscheduled",
            "--from",
            "2026-01-01T00:00:00Z",
            "--to",
            "2026-01-01T01:00:00Z",
        ])),
        2,
    );
    assert!(unscheduled.contains("has no schedule"), "{unscheduled}");
}
}

crate::on_every_backend! {
async fn plugins_and_commands_get_their_run_context(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "plugins_and_commands_get_their_run_context", "").await
    else {
        return;
    };
    let out_file = cluster.ws.path().join("context.txt");
    cluster.import(&format!(
        "jobs:\n\
         - id: ctx\n  job: test_context\n  schedule: '0 3 * * *'\n  timezone: Europe/Berlin\n\
         - id: env\n  job: command\n  arguments:\n    clear_env: true\n    command: ['/bin/sh', '-c', 'echo \"$JOBSCHLEUDER_RUN_ID $JOBSCHLEUDER_JOB $JOBSCHLEUDER_TRIGGER $JOBSCHLEUDER_ATTEMPT $JOBSCHLEUDER_SCHEDULED_FOR\" > {}', 'x']\n    args: ['{{run_id}}', '{{attempt}}', 'backup-{{scheduled_for}}.tar']\n",
        out_file.display()
    ));
    let _worker = cluster.worker("w1", 2);
    let ctx = cluster.run_now("ctx");
    let env = cluster.run_now("env");
    cluster
        .wait_until(
            "both runs done",
            Duration::from_secs(30),
            "SELECT count(*) = 2 FROM job_runs WHERE status = 'succeeded'",
        )
        .await;
    let shown = run_json(&cluster, &ctx).await;
    let run = &shown["result"]["run"];
    assert_eq!(run["id"], ctx.as_str());
    assert_eq!(run["job"], "ctx");
    assert_eq!(run["trigger"], "manual");
    assert_eq!(run["attempt"], 1);
    assert_eq!(run["worker"], "w1");
    assert!(run["parent"].is_null());
    assert_eq!(shown["result"]["cancelled"], false);
    // A manual run's time is its creation, in the job's zone.
    let scheduled = run["scheduled_for"].as_str().unwrap();
    let created = utc(shown["created_at"].as_str().unwrap());
    assert_eq!(utc(scheduled), created, "{scheduled}");
    let berlin: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
    assert_eq!(scheduled, created.with_timezone(&berlin).to_rfc3339());

    let env_run = run_json(&cluster, &env).await;
    let slot = env_run["created_at"].as_str().unwrap().to_string();
    let slot = utc(&slot).to_rfc3339();
    let written = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(written.trim(), format!("{env} env manual 1 {slot}"));
    // Placeholders in the arguments: $0 is 'x', then run id, attempt, and the slot.
    let argv = env_run["result"]["command"].as_array().unwrap();
    assert_eq!(argv[4], env.as_str());
    assert_eq!(argv[5], "1");
    assert_eq!(argv[6], format!("backup-{slot}.tar").as_str());
}
}

/// A one-shot HTTP server; yields the body of the one request it answers (204).
fn chat_server() -> (String, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/chat", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let mut stream = stream;
        stream
            .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            .unwrap();
        String::from_utf8(body).unwrap()
    });
    (url, handle)
}

crate::on_every_backend! {
async fn chains_start_their_jobs_once_when_a_run_ends_and_a_failure_is_posted_to_chat(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "chains_start_their_jobs_once_when_a_run_ends_and_a_failure_is_posted_to_chat",
        "worker:\n  retry_backoff: 0.1\n",
    )
    .await
    else {
        return;
    };
    let (url, chat) = chat_server();
    cluster.import(&format!(
        "jobs:\n\
         - id: first\n  job: test_echo\n  on_success: [second]\n  arguments:\n    n: 1\n\
         - id: second\n  job: test_echo\n  arguments:\n    n: 2\n\
         - id: broken\n  job: test_fail\n  retries: 1\n  on_failure: [notify chat]\n  on_success: [second]\n  arguments:\n    retryable: true\n\
         - id: notify chat\n  job: http\n  arguments:\n    url: {url}\n    method: POST\n    body:\n      text: 'jobschleuder: {{trigger_run.job}} {{trigger_run.status}} (run {{trigger_run.id}}): {{trigger_run.error}}'\n"
    ));
    let _scheduler = cluster.scheduler();
    let _worker = cluster.worker("w1", 2);
    let first = cluster.run_now("first");
    let broken = cluster.run_now("broken");
    cluster
        .wait_until(
            "the chained runs to finish",
            Duration::from_secs(60),
            "SELECT count(*) = 2 FROM job_runs WHERE trigger = 'chain' AND status = 'succeeded'",
        )
        .await;
    let posted = chat.join().unwrap();
    let posted: Value = serde_json::from_str(&posted).unwrap();
    assert_eq!(
        posted,
        json!({"text": format!("jobschleuder: broken failed (run {broken}): job \"test_fail\" failed: asked to fail")})
    );
    let mut chained: Vec<(String, Uuid, Value)> = cluster
        .runs()
        .await
        .into_iter()
        .filter(|r| r.trigger == "chain")
        .map(|r| (r.job_name, r.parent_id.unwrap(), r.arguments))
        .collect();
    chained.sort_by(|a, b| a.0.cmp(&b.0));
    // One link each: the failure chained after the last attempt only, the success once.
    assert_eq!(chained.len(), 2, "{chained:?}");
    let (name, parent, arguments) = &chained[0];
    assert_eq!(name, "notify chat");
    assert_eq!(parent.to_string(), broken);
    assert_eq!(arguments["trigger_run"]["status"], "failed");
    let (name, parent, arguments) = &chained[1];
    assert_eq!(name, "second");
    assert_eq!(parent.to_string(), first);
    assert_eq!(arguments["n"], 2);
    assert_eq!(arguments["trigger_run"]["id"], first.as_str());
    assert_eq!(arguments["trigger_run"]["job"], "first");
    assert_eq!(arguments["trigger_run"]["status"], "succeeded");
    assert_eq!(arguments["trigger_run"]["result"]["args"]["n"], 1);
    assert_eq!(
        cluster
            .count("SELECT CAST(max(attempt) AS bigint) FROM job_runs WHERE job_name = 'broken'")
            .await,
        2
    );
    let shown = cluster.run_ok(&["runs", "--show", &first]);
    assert!(shown.contains("chained after it"), "{shown}");
}
}

crate::on_every_store! {
async fn an_import_refuses_chains_to_unknown_jobs_and_chains_that_loop(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "an_import_refuses_chains_to_unknown_jobs_and_chains_that_loop",
        "",
    )
    .await
    else {
        return;
    };
    cluster.import("jobs:\n- id: kept\n  job: hello_world\n");
    let file = cluster.ws.write(
        "chains.yaml",
        "jobs:\n\
         - id: a\n  job: hello_world\n  on_success: [b]\n\
         - id: b\n  job: hello_world\n  on_failure: [c]\n\
         - id: c\n  job: hello_world\n  on_success: [a, ghost]\n\
         - id: self\n  job: hello_world\n  on_failure: [self]\n\
         - id: odd\n  job: hello_world\n  concurrency: sometimes\n  jitter: 5m\n\
         - id: wide\n  job: hello_world\n  schedule: '@daily'\n  jitter: 25h\n",
    );
    let refused = failure(
        run(cluster.command().args(["registry", "--import"]).arg(&file)),
        1,
    );
    for needle in [
        "on_success: no job has the id \"ghost\"",
        "chain loops: a → b → c → a",
        "chain loops: self → self",
        "concurrency \"sometimes\": use allow (the default), forbid or replace",
        "jitter: only a job with a `schedule` has slots to spread",
        "jitter: at most 24h",
        "nothing was imported",
    ] {
        assert!(
            refused.contains(needle),
            "missing {needle:?} in:\n{refused}"
        );
    }
    assert_eq!(cluster.count("SELECT count(*) FROM jobs").await, 1);
}
}

crate::on_every_store! {
async fn jitter_delays_each_start_by_its_own_share_and_the_views_show_it(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "jitter_delays_each_start_by_its_own_share_and_the_views_show_it",
        "",
    )
    .await
    else {
        return;
    };
    cluster
        .import("jobs:\n- id: spread\n  job: hello_world\n  schedule: '0 3 * * *'\n  jitter: 5m\n");
    let store = cluster.store.clone();
    let config = config("");
    create_due_runs(&store, &config, Some(utc("2026-06-01T02:59:00Z")))
        .await
        .unwrap();
    let slot = utc("2026-06-01T03:00:00Z");
    let start = start_of("spread", slot, Some(300.0));
    assert!(start > slot && start < slot + chrono::Duration::seconds(300));
    let all: Value =
        serde_json::from_str(&cluster.run_ok(&["scheduler", "-aj", "--json"])).unwrap();
    assert_eq!(utc(all[0]["starts_at"].as_str().unwrap()), start);
    let table = cluster.run_ok(&["scheduler", "-aj"]);
    assert!(
        table.contains(&start.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
        "{table}"
    );
    let preview = cluster.run_ok(&[
        "scheduler",
        "--preview",
        "spread",
        "--from",
        "2026-06-01T00:00:00Z",
        "--count",
        "2",
    ]);
    let lines: Vec<&str> = preview.lines().collect();
    assert_eq!(
        lines[0],
        format!("{} starts {}", slot.to_rfc3339(), start.to_rfc3339())
    );
    let next = slot + chrono::Duration::days(1);
    assert_eq!(
        lines[1],
        format!(
            "{} starts {}",
            next.to_rfc3339(),
            start_of("spread", next, Some(300.0)).to_rfc3339()
        )
    );
    // The run keeps its slot and waits for its start.
    create_due_runs(&store, &config, Some(utc("2026-06-01T03:00:01Z")))
        .await
        .unwrap();
    let runs = cluster.runs().await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].scheduled_for, Some(slot));
    assert_eq!(runs[0].not_before, Some(start));
    let refused = failure(
        run(cluster
            .command()
            .args(["scheduler", "--preview", "no such job"])),
        2,
    );
    assert!(
        refused.contains("nor the name of a scheduled job"),
        "{refused}"
    );
}
}

fn new_run(parent: Option<Uuid>) -> NewRun {
    crate::util::new_run(Some(Uuid::new_v4()), parent)
}

async fn status_of(cluster: &Cluster, id: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM job_runs WHERE id = $1")
        .bind(id)
        .fetch_one(&cluster.pool)
        .await
        .unwrap()
}

/// Postgres only: these races are interleaved row locks of concurrent transactions, which
/// SQLite does not have (one writer at a time).
#[tokio::test]
async fn a_cancel_racing_a_result_a_takeover_or_a_fan_out_is_never_lost() {
    crate::needs_servers!("a_cancel_racing_a_result_a_takeover_or_a_fan_out_is_never_lost");
    let cluster = Cluster::new("").await;
    let store = Store::from_pool(cluster.pool.clone()).await.unwrap();
    let lease = store.worker_lease().await.unwrap();
    let claim = |id: Uuid, token: i32, redelivered: bool| {
        let store = store.clone();
        async move {
            store
                .claim_runs("w", token, Uuid::new_v4(), &[(id, redelivered)])
                .await
                .unwrap()
                .remove(0)
        }
    };

    // A cancel that commits while a retryable failure waits to be recorded: the run ends
    // cancelled, not queued for its retry.
    let [racing] = store.insert_runs(&[new_run(None)]).await.unwrap()[..] else {
        panic!()
    };
    let Claim::Claimed { attempt, .. } = claim(racing, lease.token, false).await else {
        panic!("not claimed")
    };
    let mut cancel = cluster.pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE job_runs SET cancel_requested_at = now(), cancel_reason = 'cancelled by an operator'
         WHERE id = $1",
    )
    .bind(racing)
    .execute(&mut *cancel)
    .await
    .unwrap();
    let finish = {
        let store = store.clone();
        let token = lease.token;
        tokio::spawn(async move {
            store
                .finish_runs(&[Finish {
                    id: racing,
                    token,
                    attempt,
                    end: RunEnd::Retry(Duration::ZERO),
                    result: None,
                    error: Some("flaky".into()),
                }])
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.commit().await.unwrap();
    finish.await.unwrap();
    assert_eq!(status_of(&cluster, racing).await, "cancelled");

    // A run being cancelled whose worker died is not taken over by the re-delivery: the orphan
    // sweep records it cancelled.
    let [orphan] = store.insert_runs(&[new_run(None)]).await.unwrap()[..] else {
        panic!()
    };
    let dying = store.worker_lease().await.unwrap();
    assert!(matches!(
        claim(orphan, dying.token, false).await,
        Claim::Claimed { .. }
    ));
    assert!(store.cancel_run(orphan).await.unwrap().unwrap().asked == [orphan]);
    let dead_token = dying.token;
    drop(dying);
    cluster
        .wait_until(
            "the dead worker's lease to end",
            Duration::from_secs(30),
            &format!(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = {dead_token}
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
            ),
        )
        .await;
    assert_eq!(claim(orphan, lease.token, true).await, Claim::Running);
    let suspects = store.orphaned_runs().await.unwrap();
    let handled = store.requeue_orphans(&suspects, 5).await.unwrap();
    assert_eq!(handled, [(orphan, 1, "cancelled".to_string())]);

    // A fan-out child re-queued for its retry while its parent is being cancelled is cancelled
    // as queued, not missed as running.
    let [parent] = store.insert_runs(&[new_run(None)]).await.unwrap()[..] else {
        panic!()
    };
    let [child] = store.insert_runs(&[new_run(Some(parent))]).await.unwrap()[..] else {
        panic!()
    };
    sqlx::query("UPDATE job_runs SET status = 'succeeded', finished_at = now() WHERE id = $1")
        .bind(parent)
        .execute(&cluster.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE job_runs SET status = 'running', attempt = 1 WHERE id = $1")
        .bind(child)
        .execute(&cluster.pool)
        .await
        .unwrap();
    let mut retry = cluster.pool.begin().await.unwrap();
    sqlx::query("UPDATE job_runs SET status = 'queued' WHERE id = $1")
        .bind(child)
        .execute(&mut *retry)
        .await
        .unwrap();
    let cancelling = {
        let store = store.clone();
        tokio::spawn(async move { store.cancel_run(parent).await.unwrap().unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    retry.commit().await.unwrap();
    let done = cancelling.await.unwrap();
    assert_eq!(done.cancelled, [child]);
    assert_eq!(status_of(&cluster, child).await, "cancelled");

    // A parent whose cancel was asked for fans out nothing.
    let [fanning] = store.insert_runs(&[new_run(None)]).await.unwrap()[..] else {
        panic!()
    };
    assert!(matches!(
        claim(fanning, lease.token, false).await,
        Claim::Claimed { .. }
    ));
    store.cancel_run(fanning).await.unwrap();
    let children = store
        .insert_children(fanning, &[new_run(Some(fanning))])
        .await
        .unwrap();
    assert!(children.is_none());
    assert_eq!(
        cluster
            .count(&format!(
                "SELECT count(*) FROM job_runs WHERE parent_id = '{fanning}'"
            ))
            .await,
        0
    );
}

crate::on_every_store! {
async fn pruning_takes_skipped_and_cancelled_runs_and_keeps_runs_chained_after_them(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "pruning_takes_skipped_and_cancelled_runs_and_keeps_runs_chained_after_them",
        "",
    )
    .await
    else {
        return;
    };
    let store = cluster.store.clone();
    let old: Vec<Uuid> = store
        .insert_runs(&[new_run(None), new_run(None), new_run(None)])
        .await
        .unwrap();
    let long_ago = cluster.time(Utc::now() - chrono::Duration::days(10));
    for (id, status) in old.iter().zip(["skipped", "cancelled", "failed"]) {
        cluster
            .sql(&format!(
                "UPDATE job_runs SET status = '{status}', finished_at = {long_ago} WHERE id = {}",
                cluster.id(*id)
            ))
            .await;
    }
    // Chained after the failed run, and still waiting.
    let mut chained = new_run(Some(old[2]));
    chained.trigger = "chain";
    let [chained] = store.insert_runs(&[chained]).await.unwrap()[..] else {
        panic!()
    };
    let pruned = store
        .prune_runs(Duration::from_secs(86_400), 100)
        .await
        .unwrap();
    assert_eq!(pruned, 3);
    let left: Vec<(Uuid, Option<Uuid>, String)> = cluster
        .runs()
        .await
        .into_iter()
        .map(|r| (r.id, r.parent_id, r.status))
        .collect();
    assert_eq!(left, [(chained, None, "queued".to_string())]);
}
}
