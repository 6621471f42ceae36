//! The scheduler and the workers, as processes against the real Postgres and RabbitMQ.

use std::time::Duration;

use crate::util::cluster::Cluster;

/// Short waits: retries, and the orphan sweep (two sweeps make an orphan).
const FAST: &str = "worker:\n  retry_backoff: 0.1\n  grace_period: 20\nscheduler:\n  max_sleep: 60\n  sweep_every: 0.5\n";

#[tokio::test]
async fn import_init_schedule_and_workers_record_runs() {
    let cluster = Cluster::new(FAST).await;
    // The scheduler starts on an empty registry; the import wakes it (NOTIFY), no restart.
    let _scheduler = cluster.scheduler();
    let _worker = cluster.worker("w1", 2);
    cluster.import(
        "jobs:\n\
         - id: hello\n  job: hello_world\n  schedule: '*/1 * * * * *'\n  arguments: {hello: world}\n\
         - id: shell\n  job: command\n  schedule: '*/1 * * * * *'\n  arguments: {command: 'echo hi from {hello}', shell: true, hello: cron}\n",
    );
    cluster
        .wait_until(
            "two succeeded runs of each job",
            Duration::from_secs(30),
            "SELECT count(*) FILTER (WHERE job_name = 'hello') >= 2 AND count(*) FILTER (WHERE job_name = 'shell') >= 2
             FROM job_runs WHERE status = 'succeeded'",
        )
        .await;
    let (stdout, trigger, attempt): (String, String, i32) = sqlx::query_as(
        "SELECT result->>'stdout', trigger, attempt FROM job_runs WHERE job_name = 'shell' AND status = 'succeeded' LIMIT 1",
    )
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(
        (stdout.as_str(), trigger.as_str(), attempt),
        ("hi from cron\n", "schedule", 1)
    );

    // `scheduler -i` twice duplicates nothing.
    for _ in 0..2 {
        let out = cluster.run_ok(&["scheduler", "-i"]);
        assert!(out.contains("2 registry entries scheduled"), "{out}");
    }
    assert_eq!(cluster.count("SELECT count(*) FROM schedule").await, 2);

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

#[tokio::test]
async fn two_schedulers_run_every_slot_exactly_once() {
    // One entry per transaction, so that both schedulers get work.
    let cluster = Cluster::new(
        "worker:\n  retry_backoff: 0.1\nscheduler:\n  max_sleep: 60\n  batch_size: 1\n",
    )
    .await;
    let jobs: String = (0..5)
        .map(|i| format!("- id: tick{i}\n  job: hello_world\n  schedule: '*/1 * * * * *'\n"))
        .collect();
    cluster.import(&format!("jobs:\n{jobs}"));
    cluster.run_ok(&["scheduler", "--init"]);
    let first = cluster.scheduler();
    let second = cluster.scheduler();
    cluster
        .wait_until(
            "six scheduled slots of each job",
            Duration::from_secs(30),
            "SELECT count(*) >= 30 FROM job_runs",
        )
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
        "one scheduler did all the work (SKIP LOCKED shares it):\n{}",
        cluster.logs()
    );
    let slots: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT job_name, extract(epoch FROM scheduled_for)::bigint, count(*) FROM job_runs
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&cluster.pool)
    .await
    .unwrap();
    assert!(
        slots.iter().all(|(_, _, n)| *n == 1),
        "a slot ran twice: {slots:?}"
    );
    assert!(
        slots
            .windows(2)
            .all(|w| w[1].0 != w[0].0 || w[1].1 == w[0].1 + 1),
        "a slot was lost: {slots:?}"
    );
    // Nothing was published twice: each run is in the queue at most once, and every run marked
    // published is there. (A stopping scheduler finishes its pass, so no run is confirmed by
    // the broker without being marked published.)
    let published: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM job_runs WHERE published_at IS NOT NULL")
            .fetch_all(&cluster.pool)
            .await
            .unwrap();
    assert!(published.len() >= 25, "{published:?}");
    let mut queued: Vec<uuid::Uuid> = cluster
        .drain(&cluster.queue)
        .await
        .iter()
        .map(|body| {
            let message: serde_json::Value = serde_json::from_slice(body).unwrap();
            uuid::Uuid::parse_str(message["run_id"].as_str().unwrap()).unwrap()
        })
        .collect();
    let count = queued.len();
    queued.sort();
    queued.dedup();
    assert_eq!(queued.len(), count, "a run was published twice");
    assert!(
        published.iter().all(|id| queued.contains(id)),
        "a published run is missing from the queue"
    );
}

#[tokio::test]
async fn a_run_whose_worker_is_killed_completes_on_another_worker() {
    let cluster = Cluster::new(FAST).await;
    cluster.import("jobs:\n- id: slow\n  job: test_sleep\n  arguments: {seconds: 2}\n");
    let mut doomed = cluster.worker("doomed", 1);
    let run = cluster.run_ok(&["scheduler", "--run-now", "slow"]);
    let run = run.trim();
    cluster
        .wait_until(
            "the run to be running on the doomed worker",
            Duration::from_secs(30),
            &format!(
                "SELECT status = 'running' AND worker = 'doomed' FROM job_runs WHERE id = '{run}'"
            ),
        )
        .await;
    doomed.signal("KILL");
    doomed
        .wait_exit(Duration::from_secs(10))
        .expect("the worker died");
    let _rescuer = cluster.worker("rescuer", 1);
    cluster
        .wait_until(
            "the run to succeed on the other worker",
            Duration::from_secs(30),
            &format!("SELECT status = 'succeeded' AND worker = 'rescuer' AND attempt = 2 FROM job_runs WHERE id = '{run}'"),
        )
        .await;
}

#[tokio::test]
async fn broker_and_database_outages_during_a_burst_lose_and_double_nothing() {
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

#[tokio::test]
async fn poison_messages_and_unknown_jobs_are_dead_lettered_and_recorded() {
    let cluster = Cluster::new(FAST).await;
    cluster.import("jobs:\n- id: hello\n  job: hello_world\n");
    let _worker = cluster.worker("w1", 2);
    cluster.publish_raw(b"this is not json").await;
    cluster
        .publish_raw(br#"{"cmd": "no_such_job", "args": {}}"#)
        .await;
    // A timeout no clock can hold is as unusable as garbage; the run it names is recorded dead.
    sqlx::raw_sql(
        "INSERT INTO job_runs (id, job_name, job, trigger) VALUES
         ('00000000-0000-4000-8000-000000000009', 'hello', 'hello_world', 'manual')",
    )
    .execute(&cluster.pool)
    .await
    .unwrap();
    cluster
        .publish_raw(
            br#"{"cmd": "hello_world", "args": {}, "timeout": 1e300, "run_id": "00000000-0000-4000-8000-000000000009"}"#,
        )
        .await;
    // The original's bare message of a known job runs and is recorded.
    cluster
        .publish_raw(br#"{"cmd": "hello_world", "args": {"from": "the original"}}"#)
        .await;
    let dead_queue = format!("{}.dead", cluster.queue);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cluster.queue_depth(&dead_queue).await < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead-letter queue did not get the three messages\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster
        .wait_until(
            "the unknown job recorded dead and the bare message succeeded",
            Duration::from_secs(30),
            "SELECT count(*) FILTER (WHERE job = 'no_such_job' AND status = 'dead' AND error LIKE '%no_such_job%') = 1
                AND count(*) FILTER (WHERE id = '00000000-0000-4000-8000-000000000009' AND status = 'dead'
                                     AND error LIKE 'unusable message%timeout%') = 1
                AND count(*) FILTER (WHERE job = 'hello_world' AND status = 'succeeded' AND result->>'from' = 'the original') = 1
             FROM job_runs",
        )
        .await;
    // The worker lives on.
    let run = cluster.run_ok(&["scheduler", "-rn", "hello"]);
    cluster
        .wait_until(
            "a normal run after the poison",
            Duration::from_secs(30),
            &format!(
                "SELECT status = 'succeeded' FROM job_runs WHERE id = '{}'",
                run.trim()
            ),
        )
        .await;
    let depth = cluster.queue_depth(&dead_queue).await;
    assert_eq!(depth, 3, "{}", cluster.logs());
}

#[tokio::test]
async fn a_job_that_keeps_killing_workers_ends_dead() {
    let cluster = Cluster::new(FAST).await;
    cluster.import("jobs:\n- id: crasher\n  job: test_abort\n");
    let run = cluster.run_ok(&["scheduler", "-rn", "crasher"]);
    let run = run.trim().to_string();
    // delivery_limit is 3: two deliveries crash a worker each, the third is given up.
    // Workers stay alive until the end: the last one dead-letters the message after recording.
    let mut workers = Vec::new();
    for round in 0..4 {
        workers.push(cluster.worker(&format!("w{round}"), 1));
        let worker = workers.last_mut().expect("just pushed");
        let status: String =
            sqlx::query_scalar(&format!("SELECT status FROM job_runs WHERE id = '{run}'"))
                .fetch_one(&cluster.pool)
                .await
                .unwrap();
        if status == "dead" {
            break;
        }
        // Either the job kills this worker, or the worker records the run dead.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let dead = cluster
                .count(&format!(
                    "SELECT count(*) FROM job_runs WHERE id = '{run}' AND status = 'dead'"
                ))
                .await
                == 1;
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
    let (status, error): (String, String) = sqlx::query_as(&format!(
        "SELECT status, error FROM job_runs WHERE id = '{run}'"
    ))
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(status, "dead", "{error}\n{}", cluster.logs());
    assert!(error.contains("deliveries"), "{error}");
    let dead_queue = format!("{}.dead", cluster.queue);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cluster.queue_depth(&dead_queue).await < 1 {
        assert!(std::time::Instant::now() < deadline, "not dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn timeouts_fail_runs_and_retries_back_off_then_stop() {
    let cluster = Cluster::new(FAST).await;
    cluster.import(
        "jobs:\n\
         - id: slow\n  job: test_sleep\n  timeout: 0.5\n  arguments: {seconds: 30}\n\
         - id: flaky\n  job: test_fail\n  retries: 2\n  arguments: {retryable: true}\n\
         - id: hopeless\n  job: test_fail\n  retries: 2\n  arguments: {retryable: false}\n",
    );
    let _scheduler = cluster.scheduler();
    let worker = cluster.worker("w1", 3);
    let slow = cluster.run_ok(&["scheduler", "-rn", "slow"]);
    let flaky = cluster.run_ok(&["scheduler", "-rn", "flaky"]);
    let hopeless = cluster.run_ok(&["scheduler", "-rn", "hopeless"]);
    cluster
        .wait_until(
            "all three runs to end",
            Duration::from_secs(60),
            &format!(
                "SELECT count(*) = 3 FROM job_runs WHERE id IN ('{}', '{}', '{}') AND status = 'failed'",
                slow.trim(),
                flaky.trim(),
                hopeless.trim()
            ),
        )
        .await;
    let row = |id: String| {
        let pool = cluster.pool.clone();
        async move {
            sqlx::query_as::<_, (i32, String)>(&format!(
                "SELECT attempt, error FROM job_runs WHERE id = '{}'",
                id.trim()
            ))
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (attempt, error) = row(slow).await;
    // A timeout is retryable, but `slow` has no retries.
    assert_eq!(attempt, 1);
    assert!(error.contains("timed out after 0.5s"), "{error}");
    let (attempt, error) = row(flaky).await;
    assert_eq!(attempt, 3, "one try and two retries");
    assert!(error.contains("asked to fail"), "{error}");
    let (attempt, _) = row(hopeless).await;
    assert_eq!(attempt, 1, "a non-retryable failure is not retried");
    // The retries of `flaky` waited retry_backoff (0.1 s), then twice that.
    let log = worker.log_text();
    assert!(
        log.contains("retry_in=100ms") && log.contains("retry_in=200ms"),
        "{log}"
    );
}

#[tokio::test]
async fn sigterm_lets_the_running_job_finish_then_exits_cleanly() {
    let cluster = Cluster::new(FAST).await;
    cluster.import("jobs:\n- id: slow\n  job: test_sleep\n  arguments: {seconds: 1.5}\n");
    let mut worker = cluster.worker("w1", 1);
    let run = cluster.run_ok(&["scheduler", "-rn", "slow"]);
    cluster
        .wait_until(
            "the run to start",
            Duration::from_secs(30),
            &format!(
                "SELECT status = 'running' FROM job_runs WHERE id = '{}'",
                run.trim()
            ),
        )
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
    let (status, attempt): (String, i32) = sqlx::query_as(&format!(
        "SELECT status, attempt FROM job_runs WHERE id = '{}'",
        run.trim()
    ))
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), attempt), ("succeeded", 1));
    assert_eq!(
        cluster.queue_depth(&cluster.queue).await,
        0,
        "the delivery was acknowledged"
    );
}

#[tokio::test]
async fn output_with_nul_bytes_and_bare_messages_with_long_names_are_recorded() {
    let cluster = Cluster::new(FAST).await;
    cluster.import("jobs:\n- id: binary\n  job: command\n  arguments: {command: \"printf 'a\\\\000b'\", shell: true}\n");
    let _worker = cluster.worker("w1", 2);
    let run = cluster.run_ok(&["scheduler", "-rn", "binary"]);
    cluster
        .wait_until(
            "the run with NUL output to be recorded",
            Duration::from_secs(30),
            &format!(
                "SELECT status = 'succeeded' FROM job_runs WHERE id = '{}'",
                run.trim()
            ),
        )
        .await;
    let stdout: String = sqlx::query_scalar(&format!(
        "SELECT result->>'stdout' FROM job_runs WHERE id = '{}'",
        run.trim()
    ))
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(stdout, "a\u{fffd}b");

    let long = "x".repeat(300);
    cluster
        .publish_raw(format!(r#"{{"cmd": "{long}", "args": {{}}}}"#).as_bytes())
        .await;
    cluster
        .wait_until(
            "the bare message of an unknown, long-named job to be recorded dead",
            Duration::from_secs(30),
            "SELECT count(*) = 1 FROM job_runs WHERE status = 'dead' AND length(job_name) = 200",
        )
        .await;
}

#[tokio::test]
async fn a_run_left_running_by_a_vanished_worker_is_queued_again() {
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

#[tokio::test]
async fn a_fan_out_is_not_repeated_when_its_parent_runs_again() {
    let cluster = Cluster::new(FAST).await;
    cluster.import("jobs:\n- id: fan\n  job: test_echo\n  preprocessing: test_fanout\n  arguments: {count: 3}\n");
    // An earlier attempt created one child and died before recording the parent.
    sqlx::raw_sql(
        "INSERT INTO job_runs (id, job_name, job, trigger, preprocessing, arguments, attempt)
         VALUES ('00000000-0000-4000-8000-000000000002', 'fan', 'test_echo', 'manual', 'test_fanout', '{\"count\": 3}', 1);
         INSERT INTO job_runs (id, job_name, job, trigger, arguments, parent_id, status)
         VALUES ('00000000-0000-4000-8000-000000000003', 'fan', 'test_echo', 'manual', '{\"index\": 0}',
                 '00000000-0000-4000-8000-000000000002', 'queued');
         SELECT pg_notify('jobschleuder', 'run');",
    )
    .execute(&cluster.pool)
    .await
    .unwrap();
    let _scheduler = cluster.scheduler();
    let _worker = cluster.worker("w1", 2);
    cluster
        .wait_until(
            "the parent and its one child to succeed",
            Duration::from_secs(30),
            "SELECT count(*) = 2 AND bool_or(id = '00000000-0000-4000-8000-000000000002')
             FROM job_runs WHERE status = 'succeeded'",
        )
        .await;
    let (fanned_out, total): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT (result->>'fanned_out')::bigint FROM job_runs WHERE id = '00000000-0000-4000-8000-000000000002'),
                (SELECT count(*) FROM job_runs)",
    )
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(
        (fanned_out, total),
        (1, 2),
        "no second fan-out\n{}",
        cluster.logs()
    );
}

#[tokio::test]
async fn a_message_larger_than_a_frame_is_delivered_whole() {
    // The connection asks for 32 KiB frames: a larger message travels in several.
    let cluster = Cluster::new("").await;
    let big = "x".repeat(300 * 1024);
    cluster.import(&format!(
        "jobs:\n- id: big\n  job: test_echo\n  arguments:\n    payload: {big}\n"
    ));
    let _worker = cluster.worker("w1", 1);
    cluster.run_ok(&["scheduler", "--run-now", "big"]);
    cluster
        .wait_until(
            "the big run is recorded",
            Duration::from_secs(30),
            "SELECT count(*) = 1 FROM job_runs WHERE status = 'succeeded'",
        )
        .await;
    let echoed: i32 = sqlx::query_scalar(
        "SELECT length(result->'args'->>'payload') FROM job_runs WHERE status = 'succeeded'",
    )
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(echoed, 300 * 1024);
}
