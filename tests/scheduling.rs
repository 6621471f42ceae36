//! The scheduler and the workers, as processes, on every backend combination (the tests in
//! `on_every_backend!`) or on Postgres and RabbitMQ (outages of those servers).

use std::time::Duration;

use jobschleuder::store::RunRow;

use crate::on_every_backend;
use crate::util::cluster::Cluster;

/// How many of `runs` match.
fn count(runs: &[RunRow], matches: impl Fn(&RunRow) -> bool) -> usize {
    runs.iter().filter(|r| matches(r)).count()
}

/// The run with this id (as `scheduler --run-now` prints it), if it exists.
fn find<'a>(runs: &'a [RunRow], id: &str) -> Option<&'a RunRow> {
    runs.iter().find(|r| r.id.to_string() == id.trim())
}

/// Short waits: retries, and the orphan sweep (two sweeps make an orphan).
const FAST: &str = "worker:\n  retry_backoff: 0.1\n  grace_period: 20\nscheduler:\n  max_sleep: 60\n  sweep_every: 0.5\n";

on_every_backend! {
    async fn import_init_schedule_and_workers_record_runs(backend: Backend) {
        let Some(cluster) = Cluster::on(backend, "import_init_schedule_and_workers_record_runs", FAST).await else {
            return;
        };
        // The scheduler starts on an empty registry; the import wakes it, no restart.
        let _scheduler = cluster.scheduler();
        let _worker = cluster.worker("w1", 2);
        cluster.import(
            "jobs:\n\
             - id: hello\n  job: hello_world\n  schedule: '*/1 * * * * *'\n  arguments: {hello: world}\n\
             - id: shell\n  job: command\n  schedule: '*/1 * * * * *'\n  arguments: {command: 'echo hi from {hello}', shell: true, hello: cron}\n",
        );
        cluster
            .wait_for("two succeeded runs of each job", Duration::from_secs(30), |runs| {
                count(runs, |r| r.job_name == "hello" && r.status == "succeeded") >= 2
                    && count(runs, |r| r.job_name == "shell" && r.status == "succeeded") >= 2
            })
            .await;
        let runs = cluster.runs().await;
        let shell = runs
            .iter()
            .find(|r| r.job_name == "shell" && r.status == "succeeded")
            .unwrap();
        let stdout = shell.result.as_ref().and_then(|r| r["stdout"].as_str()).unwrap_or_default();
        assert_eq!(
            (stdout, shell.trigger.as_str(), shell.attempt),
            ("hi from cron\n", "schedule", 1)
        );

        // `scheduler -i` twice duplicates nothing.
        for _ in 0..2 {
            let out = cluster.run_ok(&["scheduler", "-i"]);
            assert!(out.contains("2 registry entries scheduled"), "{out}");
        }
        assert_eq!(cluster.store.scheduled(None).await.unwrap().len(), 2);

        let listed: serde_json::Value = serde_json::from_str(&cluster.run_ok(&[
            "runs",
            "--job",
            "shell",
            "--status",
            "succeeded",
            "--json",
        ]))
        .unwrap();
        assert!(listed.as_array().unwrap().len() >= 2);
        assert!(listed
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["job_name"] == "shell" && r["worker"] == "w1"));
        let id = listed[0]["id"].as_str().unwrap();
        let shown = cluster.run_ok(&["runs", "--show", id]);
        assert!(
            shown.contains("hi from cron") && shown.contains("succeeded"),
            "{shown}"
        );
        let all = cluster.run_ok(&["scheduler", "-aj"]);
        assert!(
            all.contains("hello") && all.contains("*/1 * * * * *") && all.contains("UTC"),
            "{all}"
        );
    }
}

on_every_backend! {
    async fn two_schedulers_run_every_slot_exactly_once(backend: Backend) {
        // One entry per transaction, so that both schedulers get work.
        let Some(cluster) = Cluster::on(
            backend,
            "two_schedulers_run_every_slot_exactly_once",
            "worker:\n  retry_backoff: 0.1\nscheduler:\n  max_sleep: 60\n  batch_size: 1\n",
        )
        .await
        else {
            return;
        };
        let jobs: String = (0..5)
            .map(|i| format!("- id: tick{i}\n  job: hello_world\n  schedule: '*/1 * * * * *'\n"))
            .collect();
        cluster.import(&format!("jobs:\n{jobs}"));
        cluster.run_ok(&["scheduler", "--init"]);
        let first = cluster.scheduler();
        let second = cluster.scheduler();
        cluster
            .wait_for("six scheduled slots of each job", Duration::from_secs(30), |runs| {
                runs.len() >= 30
            })
            .await;
        let mut logs = Vec::new();
        for mut scheduler in [first, second] {
            scheduler.signal("TERM");
            assert!(scheduler
                .wait_exit(Duration::from_secs(30))
                .is_some_and(|s| s.success()));
            logs.push(scheduler.log_text());
        }
        assert!(
            logs.iter().all(|log| log.contains("run queued")),
            "one scheduler did all the work (they must share it):\n{}",
            cluster.logs()
        );
        let runs = cluster.runs().await;
        let mut slots: Vec<(String, i64)> = runs
            .iter()
            .map(|r| (r.job_name.clone(), r.scheduled_for.unwrap().timestamp()))
            .collect();
        slots.sort();
        let before = slots.len();
        slots.dedup();
        assert_eq!(slots.len(), before, "a slot ran twice: {slots:?}");
        assert!(
            slots
                .windows(2)
                .all(|w| w[1].0 != w[0].0 || w[1].1 == w[0].1 + 1),
            "a slot was lost: {slots:?}"
        );
        // Nothing was published twice: each run is in the queue at most once, and every run
        // marked published is there. (A stopping scheduler finishes its pass, so no run is in
        // the queue without being marked published.)
        let published: Vec<uuid::Uuid> = runs
            .iter()
            .filter(|r| r.published_at.is_some())
            .map(|r| r.id)
            .collect();
        assert!(published.len() >= 25, "{published:?}");
        let mut queued: Vec<uuid::Uuid> = cluster
            .drain_queue()
            .await
            .iter()
            .map(|body| {
                let message: serde_json::Value = serde_json::from_slice(body).unwrap();
                uuid::Uuid::parse_str(message["run_id"].as_str().unwrap()).unwrap()
            })
            .collect();
        let queued_count = queued.len();
        queued.sort();
        queued.dedup();
        assert_eq!(queued.len(), queued_count, "a run was published twice");
        assert!(
            published.iter().all(|id| queued.contains(id)),
            "a published run is missing from the queue"
        );
    }
}

on_every_backend! {
    async fn a_run_whose_worker_is_killed_completes_on_another_worker(backend: Backend) {
        let Some(cluster) = Cluster::on(backend, "a_run_whose_worker_is_killed_completes_on_another_worker", FAST).await else {
            return;
        };
        cluster.import("jobs:\n- id: slow\n  job: test_sleep\n  arguments: {seconds: 2}\n");
        let mut doomed = cluster.worker("doomed", 1);
        let run = cluster.run_now("slow");
        cluster
            .wait_for("the run to be running on the doomed worker", Duration::from_secs(30), |runs| {
                find(runs, &run).is_some_and(|r| r.status == "running" && r.worker.as_deref() == Some("doomed"))
            })
            .await;
        doomed.signal("KILL");
        doomed
            .wait_exit(Duration::from_secs(10))
            .expect("the worker died");
        let _rescuer = cluster.worker("rescuer", 1);
        cluster
            .wait_for("the run to succeed on the other worker", Duration::from_secs(45), |runs| {
                find(runs, &run).is_some_and(|r| {
                    r.status == "succeeded" && r.worker.as_deref() == Some("rescuer") && r.attempt == 2
                })
            })
            .await;
    }
}

on_every_backend! {
    async fn a_scheduler_killed_mid_burst_loses_and_doubles_no_slot(backend: Backend) {
        let Some(cluster) = Cluster::on(
            backend,
            "a_scheduler_killed_mid_burst_loses_and_doubles_no_slot",
            "worker:\n  retry_backoff: 0.1\nscheduler:\n  max_sleep: 60\n  batch_size: 5\n",
        )
        .await
        else {
            return;
        };
        let jobs: String = (0..20)
            .map(|i| format!("- id: tick{i}\n  job: hello_world\n  schedule: '*/1 * * * * *'\n"))
            .collect();
        cluster.import(&format!("jobs:\n{jobs}"));
        cluster.run_ok(&["scheduler", "--init"]);
        let _worker = cluster.worker("w1", 4);
        let mut doomed = cluster.scheduler();
        cluster
            .wait_for("runs of a few slots", Duration::from_secs(30), |runs| runs.len() >= 40)
            .await;
        // Killed in the middle of its passes (batches of 5 entries): runs it committed and did
        // not publish yet are the next scheduler's to publish.
        doomed.signal("KILL");
        doomed.wait_exit(Duration::from_secs(10)).expect("the scheduler died");
        let killed_at = chrono::Utc::now();
        let _next = cluster.scheduler();
        cluster
            .wait_for(
                "every run created so far to succeed, and each job to run after the kill",
                Duration::from_secs(60),
                |runs| {
                    runs.iter().all(|r| r.status == "succeeded" || r.created_at > killed_at)
                        && (0..20).all(|i| {
                            runs.iter().any(|r| {
                                r.job_name == format!("tick{i}")
                                    && r.status == "succeeded"
                                    && r.scheduled_for.is_some_and(|t| t > killed_at)
                            })
                        })
                },
            )
            .await;
        // No slot twice; a slot the dead scheduler missed is caught up once (misfire
        // run_once), so each job's slots go on without a gap of more than the restart.
        let runs = cluster.runs().await;
        for i in 0..20 {
            let name = format!("tick{i}");
            let mut slots: Vec<i64> = runs
                .iter()
                .filter(|r| r.job_name == name)
                .map(|r| r.scheduled_for.unwrap().timestamp())
                .collect();
            slots.sort();
            let before = slots.len();
            slots.dedup();
            assert_eq!(slots.len(), before, "{name}: a slot ran twice: {slots:?}");
            assert!(
                slots.windows(2).all(|w| w[1] - w[0] <= 5),
                "{name}: slots were lost around the kill: {slots:?}\n{}",
                cluster.logs()
            );
        }
    }
}

#[tokio::test]
async fn broker_and_database_outages_during_a_burst_lose_and_double_nothing() {
    crate::needs_servers!("broker_and_database_outages_during_a_burst_lose_and_double_nothing");
    let cluster = Cluster::new(FAST).await;
    let out = cluster.ws.path().join("executions.txt");
    cluster.import("jobs:\n- id: burst\n  job: command\n");
    let _scheduler = cluster.scheduler();
    let w1 = cluster.worker("w1", 4);
    let w2 = cluster.worker("w2", 4);
    const RUNS: i64 = 300;
    const DURING_OUTAGE: i64 = 100;
    // Runs `from..=to`: each appends its number to the executions file.
    let insert = |from: i64, to: i64| {
        format!(
            "INSERT INTO job_runs (id, job_name, job, trigger, arguments)
             SELECT gen_random_uuid(), 'burst', 'command', 'manual',
                    jsonb_build_object('command', 'sleep 0.2; echo ' || n || ' >> {}', 'shell', true)
             FROM generate_series({from}, {to}) n;
             SELECT pg_notify('jobschleuder', 'run');",
            out.display()
        )
    };
    sqlx::raw_sql(&insert(1, RUNS))
        .execute(&cluster.pool)
        .await
        .unwrap();
    cluster
        .wait_until(
            "the burst to start",
            Duration::from_secs(30),
            "SELECT count(*) >= 20 FROM job_runs WHERE status = 'succeeded'",
        )
        .await;
    let unfinished = |cluster: &Cluster| {
        let pool = cluster.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM job_runs WHERE status IN ('queued', 'running')",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let in_flight = unfinished(&cluster).await;
    let closed = cluster.close_broker_connections();
    assert!(closed >= 3, "closed {closed} broker connections");
    assert!(
        in_flight >= 100,
        "the broker cut must land mid-burst: only {in_flight} runs were unfinished"
    );
    // More runs while everyone reconnects: they are published once the broker is back.
    sqlx::raw_sql(&insert(RUNS + 1, RUNS + DURING_OUTAGE))
        .execute(&cluster.pool)
        .await
        .unwrap();
    let done_after_broker = cluster
        .count("SELECT count(*) FROM job_runs WHERE status = 'succeeded'")
        .await;
    cluster
        .wait_until(
            "runs to succeed again after the broker cut",
            Duration::from_secs(60),
            &format!(
                "SELECT count(*) >= {} + 20 FROM job_runs WHERE status = 'succeeded'",
                done_after_broker
            ),
        )
        .await;
    let in_flight = unfinished(&cluster).await;
    let terminated = cluster.terminate_database_sessions().await;
    assert!(terminated >= 3, "terminated {terminated} database sessions");
    assert!(
        in_flight >= 50,
        "the database cut must land mid-burst: only {in_flight} runs were unfinished"
    );
    // The workers' own sessions were among those cut (their leases), not only the scheduler's.
    for worker in [&w1, &w2] {
        cluster.wait_for_log(worker, "lost the worker lease connection");
    }
    let total = RUNS + DURING_OUTAGE;
    cluster
        .wait_until(
            "every run to succeed",
            Duration::from_secs(180),
            &format!("SELECT count(*) = {total} FROM job_runs WHERE status = 'succeeded'"),
        )
        .await;
    let text = std::fs::read_to_string(&out).unwrap();
    let mut seen: Vec<i64> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
    seen.sort();
    let expected: Vec<i64> = (1..=total).collect();
    assert_eq!(seen, expected, "every run executed exactly once");
}

on_every_backend! {
    async fn poison_messages_and_unknown_jobs_are_dead_lettered_and_recorded(backend: Backend) {
        let Some(cluster) = Cluster::on(backend, "poison_messages_and_unknown_jobs_are_dead_lettered_and_recorded", FAST).await else {
            return;
        };
        cluster.import("jobs:\n- id: hello\n  job: hello_world\n");
        let _worker = cluster.worker("w1", 2);
        cluster.send_raw(b"this is not json").await;
        cluster.send_raw(br#"{"cmd": "no_such_job", "args": {}}"#).await;
        // A timeout no clock can hold is as unusable as garbage; the run it names is recorded
        // dead.
        let named = uuid::Uuid::parse_str("00000000-0000-4000-8000-000000000009").unwrap();
        let mut run = crate::util::new_run(Some(named), None);
        run.job_name = "hello".into();
        cluster.store.insert_runs(&[run]).await.unwrap();
        cluster
            .send_raw(
                br#"{"cmd": "hello_world", "args": {}, "timeout": 1e300, "run_id": "00000000-0000-4000-8000-000000000009"}"#,
            )
            .await;
        // The original's bare message of a known job runs and is recorded.
        cluster
            .send_raw(br#"{"cmd": "hello_world", "args": {"from": "the original"}}"#)
            .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while cluster.dead_letters().await < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the dead letters did not get the three messages\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster
            .wait_for(
                "the unknown job recorded dead and the bare message succeeded",
                Duration::from_secs(30),
                |runs| {
                    count(runs, |r| {
                        r.job == "no_such_job"
                            && r.status == "dead"
                            && r.error.as_deref().is_some_and(|e| e.contains("no_such_job"))
                    }) == 1
                        && count(runs, |r| {
                            r.id == named
                                && r.status == "dead"
                                && r.error.as_deref().is_some_and(|e| {
                                    e.starts_with("unusable message") && e.contains("timeout")
                                })
                        }) == 1
                        && count(runs, |r| {
                            r.job == "hello_world"
                                && r.status == "succeeded"
                                && r.result.as_ref().is_some_and(|v| v["from"] == "the original")
                        }) == 1
                },
            )
            .await;
        // The worker lives on.
        let run = cluster.run_now("hello");
        cluster
            .wait_for("a normal run after the poison", Duration::from_secs(30), |runs| {
                find(runs, &run).is_some_and(|r| r.status == "succeeded")
            })
            .await;
        assert_eq!(cluster.dead_letters().await, 3, "{}", cluster.logs());
        if !backend.rabbitmq() {
            // `runs --dead-letters` shows the table queue's, with why each went there.
            let listed: serde_json::Value =
                serde_json::from_str(&cluster.run_ok(&["runs", "--dead-letters", "--json"])).unwrap();
            let reasons: Vec<&str> = listed
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|l| l["reason"].as_str())
                .collect();
            assert_eq!(reasons, ["rejected by its worker"; 3], "{listed}");
            let table = cluster.run_ok(&["runs", "--dead-letters"]);
            assert!(table.contains("no_such_job") && table.contains("Dead letters"), "{table}");
        }
    }
}

on_every_backend! {
    async fn a_job_that_keeps_killing_workers_ends_dead(backend: Backend) {
        let Some(cluster) = Cluster::on(backend, "a_job_that_keeps_killing_workers_ends_dead", FAST).await else {
            return;
        };
        cluster.import("jobs:\n- id: crasher\n  job: test_abort\n");
        let run = cluster.run_now("crasher");
        // delivery_limit is 3: two deliveries crash a worker each, the third is given up.
        // Workers stay alive until the end: the last one dead-letters the message after
        // recording.
        let mut workers = Vec::new();
        for round in 0..4 {
            workers.push(cluster.worker(&format!("w{round}"), 1));
            let worker = workers.last_mut().expect("just pushed");
            if cluster.run(&run).await.status == "dead" {
                break;
            }
            // Either the job kills this worker, or the worker records the run dead.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let dead = cluster.run(&run).await.status == "dead";
                if dead || worker.wait_exit(Duration::from_millis(50)).is_some() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: nothing happened\n{}",
                    cluster.logs()
                );
            }
        }
        let ended = cluster.run(&run).await;
        let error = ended.error.unwrap_or_default();
        assert_eq!(ended.status, "dead", "{error}\n{}", cluster.logs());
        assert!(error.contains("deliveries"), "{error}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cluster.dead_letters().await < 1 {
            assert!(std::time::Instant::now() < deadline, "not dead-lettered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

on_every_backend! {
    async fn timeouts_fail_runs_and_retries_back_off_then_stop(backend: Backend) {
        let Some(cluster) = Cluster::on(backend, "timeouts_fail_runs_and_retries_back_off_then_stop", FAST).await else {
            return;
        };
        cluster.import(
            "jobs:\n\
             - id: slow\n  job: test_sleep\n  timeout: 0.5\n  arguments: {seconds: 30}\n\
             - id: flaky\n  job: test_fail\n  retries: 2\n  arguments: {retryable: true}\n\
             - id: hopeless\n  job: test_fail\n  retries: 2\n  arguments: {retryable: false}\n",
        );
        let _scheduler = cluster.scheduler();
        let worker = cluster.worker("w1", 3);
        let slow = cluster.run_now("slow");
        let flaky = cluster.run_now("flaky");
        let hopeless = cluster.run_now("hopeless");
        cluster
            .wait_for("all three runs to end", Duration::from_secs(60), |runs| {
                [&slow, &flaky, &hopeless]
                    .iter()
                    .all(|id| find(runs, id).is_some_and(|r| r.status == "failed"))
            })
            .await;
        let slow = cluster.run(&slow).await;
        // A timeout is retryable, but `slow` has no retries.
        assert_eq!(slow.attempt, 1);
        let error = slow.error.unwrap_or_default();
        assert!(error.contains("timed out after 0.5s"), "{error}");
        let flaky = cluster.run(&flaky).await;
        assert_eq!(flaky.attempt, 3, "one try and two retries");
        let error = flaky.error.unwrap_or_default();
        assert!(error.contains("asked to fail"), "{error}");
        let hopeless = cluster.run(&hopeless).await;
        assert_eq!(hopeless.attempt, 1, "a non-retryable failure is not retried");
        // The retries of `flaky` waited retry_backoff (0.1 s), then twice that.
        let log = worker.log_text();
        assert!(
            log.contains("retry_in=100ms") && log.contains("retry_in=200ms"),
            "{log}"
        );
    }
}

on_every_backend! {
    async fn sigterm_lets_the_running_job_finish_then_exits_cleanly(backend: Backend) {
        let Some(cluster) = Cluster::on(backend, "sigterm_lets_the_running_job_finish_then_exits_cleanly", FAST).await else {
            return;
        };
        cluster.import("jobs:\n- id: slow\n  job: test_sleep\n  arguments: {seconds: 1.5}\n");
        let mut worker = cluster.worker("w1", 1);
        let run = cluster.run_now("slow");
        cluster
            .wait_for("the run to start", Duration::from_secs(30), |runs| {
                find(runs, &run).is_some_and(|r| r.status == "running")
            })
            .await;
        worker.signal("TERM");
        let status = worker
            .wait_exit(Duration::from_secs(30))
            .expect("the worker exits");
        assert!(
            status.success(),
            "exit status {status:?}\n{}",
            worker.log_text()
        );
        let ended = cluster.run(&run).await;
        assert_eq!((ended.status.as_str(), ended.attempt), ("succeeded", 1));
        assert_eq!(cluster.depth().await, 0, "the delivery was acknowledged");
    }
}

on_every_backend! {
    async fn output_with_nul_bytes_and_bare_messages_with_long_names_are_recorded(backend: Backend) {
        let Some(cluster) = Cluster::on(backend, "output_with_nul_bytes_and_bare_messages_with_long_names_are_recorded", FAST).await else {
            return;
        };
        cluster.import("jobs:\n- id: binary\n  job: command\n  arguments: {command: \"printf 'a\\\\000b'\", shell: true}\n");
        let _worker = cluster.worker("w1", 2);
        let run = cluster.run_now("binary");
        cluster
            .wait_for("the run with NUL output to be recorded", Duration::from_secs(30), |runs| {
                find(runs, &run).is_some_and(|r| r.status == "succeeded")
            })
            .await;
        let ended = cluster.run(&run).await;
        let stdout = ended.result.as_ref().and_then(|r| r["stdout"].as_str()).unwrap_or_default();
        assert_eq!(stdout, "a\u{fffd}b");

        let long = "x".repeat(300);
        cluster
            .send_raw(format!(r#"{{"cmd": "{long}", "args": {{}}}}"#).as_bytes())
            .await;
        cluster
            .wait_for(
                "the bare message of an unknown, long-named job to be recorded dead",
                Duration::from_secs(30),
                |runs| count(runs, |r| r.status == "dead" && r.job_name.chars().count() == 200) == 1,
            )
            .await;
    }
}

#[tokio::test]
async fn a_run_left_running_by_a_vanished_worker_is_queued_again() {
    crate::needs_servers!("a_run_left_running_by_a_vanished_worker_is_queued_again");
    let cluster = Cluster::new(FAST).await;
    cluster.import("jobs:\n- id: hello\n  job: hello_world\n");
    // A worker (lease token 4242, long gone) claimed this run, and its message was settled.
    sqlx::raw_sql(
        "INSERT INTO job_runs (id, job_name, job, trigger, status, attempt, worker, claim_token, started_at, published_at)
         VALUES ('00000000-0000-4000-8000-000000000001', 'hello', 'hello_world', 'manual', 'running', 1, 'gone', 4242,
                 now() - interval '1 minute', now() - interval '1 minute')",
    )
    .execute(&cluster.pool)
    .await
    .unwrap();
    let _scheduler = cluster.scheduler();
    let _worker = cluster.worker("w1", 1);
    // Two sweeps 0.5 s apart, not 2 × 10 s.
    cluster
        .wait_until(
            "the orphaned run to run again and succeed",
            Duration::from_secs(15),
            "SELECT status = 'succeeded' AND attempt = 2 AND worker = 'w1'
             FROM job_runs WHERE id = '00000000-0000-4000-8000-000000000001'",
        )
        .await;
}

on_every_backend! {
    async fn a_fan_out_is_not_repeated_when_its_parent_runs_again(backend: Backend) {
        let Some(cluster) = Cluster::on(backend, "a_fan_out_is_not_repeated_when_its_parent_runs_again", FAST).await else {
            return;
        };
        cluster.import("jobs:\n- id: fan\n  job: test_echo\n  preprocessing: test_fanout\n  arguments: {count: 3}\n");
        // An earlier attempt created one child and died before recording the parent (its
        // attempt stays counted).
        let parent = uuid::Uuid::parse_str("00000000-0000-4000-8000-000000000002").unwrap();
        let child = uuid::Uuid::parse_str("00000000-0000-4000-8000-000000000003").unwrap();
        let mut first = crate::util::new_run(Some(parent), None);
        first.job_name = "fan".into();
        first.job = "test_echo".into();
        first.preprocessing = Some("test_fanout".into());
        first.arguments = serde_json::from_str(r#"{"count": 3}"#).unwrap();
        let mut fanned = crate::util::new_run(Some(child), Some(parent));
        fanned.job_name = "fan".into();
        fanned.job = "test_echo".into();
        fanned.arguments = serde_json::from_str(r#"{"index": 0}"#).unwrap();
        cluster.store.insert_runs(&[first, fanned]).await.unwrap();
        cluster
            .sql(&format!("UPDATE job_runs SET attempt = 1 WHERE id = {}", cluster.id(parent)))
            .await;
        let _scheduler = cluster.scheduler();
        let _worker = cluster.worker("w1", 2);
        cluster
            .wait_for("the parent and its one child to succeed", Duration::from_secs(30), |runs| {
                count(runs, |r| r.status == "succeeded") == 2
                    && runs.iter().any(|r| r.id == parent && r.status == "succeeded")
            })
            .await;
        let runs = cluster.runs().await;
        let parent = runs.iter().find(|r| r.id == parent).unwrap();
        let fanned_out = parent.result.as_ref().and_then(|r| r["fanned_out"].as_i64());
        assert_eq!(
            (fanned_out, runs.len()),
            (Some(1), 2),
            "no second fan-out\n{}",
            cluster.logs()
        );
    }
}

on_every_backend! {
    async fn a_message_larger_than_a_frame_is_delivered_whole(backend: Backend) {
        // RabbitMQ connections ask for 32 KiB frames: a larger message travels in several.
        let Some(cluster) = Cluster::on(backend, "a_message_larger_than_a_frame_is_delivered_whole", "").await else {
            return;
        };
        let big = "x".repeat(300 * 1024);
        cluster.import(&format!(
            "jobs:\n- id: big\n  job: test_echo\n  arguments:\n    payload: {big}\n"
        ));
        let _worker = cluster.worker("w1", 1);
        let run = cluster.run_now("big");
        cluster
            .wait_for("the big run is recorded", Duration::from_secs(30), |runs| {
                find(runs, &run).is_some_and(|r| r.status == "succeeded")
            })
            .await;
        let ended = cluster.run(&run).await;
        let echoed = ended
            .result
            .as_ref()
            .and_then(|r| r["args"]["payload"].as_str())
            .map(str::len);
        assert_eq!(echoed, Some(300 * 1024));
    }
}

#[tokio::test]
async fn a_scheduler_connects_to_the_broker_before_anything_is_due() {
    crate::needs_servers!("a_scheduler_connects_to_the_broker_before_anything_is_due");
    let cluster = Cluster::new(FAST).await;
    // Nothing is due, nothing is published: only a scheduler that connects as it starts has a
    // connection now, and the first due runs do not wait for its handshake.
    let scheduler = cluster.scheduler();
    cluster.wait_for_log(&scheduler, "connected to RabbitMQ");
    // The queue is declared right after the connection: a passive declaration finds it.
    wait_for_queue(&cluster.queue, "the scheduler did not declare its queue").await;
}

/// Whether the broker has a queue named `name` (a passive declaration).
async fn queue_exists(name: &str) -> Result<(), lapin::Error> {
    let connection = lapin::Connection::connect(
        &crate::util::cluster::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let declared = connection
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            lapin::types::ShortString::from(name),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    let _ = connection
        .close(200, lapin::types::ShortString::from("bye"))
        .await;
    declared.map(|_| ())
}

/// Waits up to 10 s for the broker to have queue `name`; fails with `failure` otherwise.
async fn wait_for_queue(name: &str, failure: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match queue_exists(name).await {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() > deadline => panic!("{failure}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn a_scheduler_declares_the_queues_its_jobs_use_at_start_and_no_unused_default() {
    crate::needs_servers!(
        "a_scheduler_declares_the_queues_its_jobs_use_at_start_and_no_unused_default"
    );
    let cluster = Cluster::new(FAST).await;
    // Every job names another queue: the default queue would be declared for nothing (and
    // show up on the broker, with its dead-letter pair, on an installation that never uses it).
    let other = format!("{}_other", cluster.queue);
    cluster.import(&format!(
        "jobs:\n- id: elsewhere\n  job: hello_world\n  queue: {other}\n  schedule: '0 0 1 1 *'\n"
    ));
    let scheduler = cluster.scheduler();
    cluster.wait_for_log(&scheduler, "connected to RabbitMQ");
    wait_for_queue(
        &other,
        "the scheduler did not declare its job's queue at start",
    )
    .await;
    // Its first pass (which schedules the new entry) comes after the declarations at start.
    cluster.wait_for_log(&scheduler, "scheduled new registry entries");
    assert!(
        queue_exists(&cluster.queue).await.is_err(),
        "the default queue, which no job uses, was declared:\n{}",
        scheduler.log_text()
    );
}

#[tokio::test]
async fn a_scheduler_that_cannot_reach_the_broker_at_start_says_so_and_creates_due_runs() {
    crate::needs_servers!(
        "a_scheduler_that_cannot_reach_the_broker_at_start_says_so_and_creates_due_runs"
    );
    let cluster = Cluster::new(FAST).await;
    cluster.import("jobs:\n- id: tick\n  job: hello_world\n  schedule: '*/1 * * * * *'\n");
    // Nothing listens on port 1.
    let scheduler = cluster.spawn_with_env(
        "scheduler",
        &["scheduler", "--schedule"],
        &[(
            "JOBSCHLEUDER_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:1/%2f",
        )],
    );
    cluster.wait_for_log(&scheduler, "cannot reach the broker yet");
    cluster
        .wait_until(
            "due runs to be created and wait in the outbox",
            Duration::from_secs(15),
            "SELECT count(*) >= 2 FROM job_runs WHERE status = 'queued' AND published_at IS NULL",
        )
        .await;
}

#[tokio::test]
async fn a_scheduler_whose_queue_is_refused_says_so_at_start() {
    crate::needs_servers!("a_scheduler_whose_queue_is_refused_says_so_at_start");
    let cluster = Cluster::new(FAST).await;
    // The queue exists with other arguments than ours: declaring it is refused for good,
    // which is not a broker out of reach.
    cluster
        .declare_queue_with_other_arguments(&cluster.queue)
        .await;
    let scheduler = cluster.scheduler();
    says_refused_not_out_of_reach(&cluster, &scheduler);
}

/// Waits for `scheduler` to log a queue refused at start, and checks that it did not call
/// that a broker out of reach.
fn says_refused_not_out_of_reach(cluster: &Cluster, scheduler: &crate::util::cluster::Process) {
    cluster.wait_for_log(scheduler, "cannot be used as configured");
    assert!(
        !scheduler.log_text().contains("cannot reach the broker"),
        "{}",
        scheduler.log_text()
    );
}

#[tokio::test]
async fn a_scheduler_declares_its_other_queues_when_one_is_refused_at_start() {
    crate::needs_servers!("a_scheduler_declares_its_other_queues_when_one_is_refused_at_start");
    let cluster = Cluster::new(FAST).await;
    // The default queue (declared first: it sorts first) is refused; a job's own queue is
    // declared all the same.
    cluster
        .declare_queue_with_other_arguments(&cluster.queue)
        .await;
    let other = format!("{}_other", cluster.queue);
    cluster.import(&format!(
        "jobs:\n\
         - id: here\n  job: hello_world\n  schedule: '0 0 1 1 *'\n\
         - id: elsewhere\n  job: hello_world\n  queue: {other}\n  schedule: '0 0 1 1 *'\n"
    ));
    let scheduler = cluster.scheduler();
    says_refused_not_out_of_reach(&cluster, &scheduler);
    wait_for_queue(
        &other,
        "the queue after a refused one was not declared at start",
    )
    .await;
}

/// A Postgres store with one run in an outbox batch being published (its row held by the
/// batch's transaction until it is settled).
async fn one_run_being_published() -> (
    crate::util::TestDb,
    sqlx::PgPool,
    jobschleuder::store::Store,
    uuid::Uuid,
    jobschleuder::store::OutboxBatch,
) {
    let db = crate::util::TestDb::new().await;
    let pool = db.pool().await;
    let store = jobschleuder::store::Store::from_pool(pool.clone())
        .await
        .unwrap();
    let id = uuid::Uuid::new_v4();
    store
        .insert_runs(&[crate::util::new_run(Some(id), None)])
        .await
        .unwrap();
    let batch = store.outbox(10, Some(&[id])).await.unwrap();
    assert_eq!(batch.runs.len(), 1, "the run is in the outbox");
    (db, pool, store, id, batch)
}

/// `published_at` says when the broker had the message (its confirms were in), not when the
/// outbox pass began: firing lag (`bench lag`, `/metrics`) is read from it, and publishing a
/// large batch takes its time.
#[tokio::test]
async fn a_run_is_stamped_published_when_its_publish_is_done_not_when_the_pass_began() {
    crate::needs_postgres!(
        "a_run_is_stamped_published_when_its_publish_is_done_not_when_the_pass_began"
    );
    let (_db, pool, store, id, batch) = one_run_being_published().await;
    // The broker takes its time to confirm.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let confirmed = store.now().await.unwrap();
    batch.settle(&[id], &[]).await.unwrap();
    let published: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT published_at FROM job_runs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        published >= confirmed,
        "published_at {published} is before the confirms were in ({confirmed})"
    );
}

/// A worker gets a message once the broker has it, which can be before the outbox pass has the
/// confirms of the rest of its batch; the claim then waits for the pass's mark. The run is not
/// recorded published after it started.
#[tokio::test]
async fn a_run_claimed_while_its_batch_is_confirmed_is_not_published_after_it_started() {
    crate::needs_postgres!(
        "a_run_claimed_while_its_batch_is_confirmed_is_not_published_after_it_started"
    );
    let (_db, pool, store, id, batch) = one_run_being_published().await;
    let claiming = {
        let store = store.clone();
        tokio::spawn(async move {
            let lease = store.worker_lease().await.unwrap();
            let claimed = store
                .claim_runs("w1", lease.token, uuid::Uuid::new_v4(), &[(id, false)])
                .await
                .unwrap();
            (lease, claimed)
        })
    };
    // The claim waits for the pass's lock on the run while the rest of the batch is confirmed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the claim never waited for the outbox's lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    batch.settle(&[id], &[]).await.unwrap();
    let (_lease, claimed) = claiming.await.unwrap();
    assert!(
        matches!(claimed[0], jobschleuder::store::Claim::Claimed { .. }),
        "{claimed:?}"
    );
    let (published, started): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT published_at, started_at FROM job_runs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        published <= started,
        "published at {published}, after it started at {started}"
    );
}
