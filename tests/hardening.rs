//! The rare paths of "exactly once": imports while the scheduler fires, bare messages, stopping
//! workers, timeouts and hung plugins, lost replies, skewed clocks, unpublishable runs, runs
//! nobody claims, and lost leases. Each test reproduces its scenario against the real servers.

use std::time::{Duration, Instant};

use jobschleuder::store::{Claim, Finish, RunEnd};
use sqlx::Connection;
use uuid::Uuid;

use crate::util::cluster::Cluster;

const FAST: &str = "worker:\n  retry_backoff: 0.1\n  grace_period: 20\nscheduler:\n  max_sleep: 60\n  sweep_every: 0.5\n";

/// Whether `pid` is a live process (a zombie waiting to be reaped counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Waits for a file to hold a pid, and returns it.
fn pid_in(path: &std::path::Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no pid in {} within 30 s", path.display());
}

/// A job file with `tick` (every second) and `others` jobs that are due once a year.
fn big_file(others: usize, argument: &str) -> String {
    let mut file =
        String::from("jobs:\n- id: tick\n  job: hello_world\n  schedule: '* * * * * *'\n");
    for i in 0..others {
        file.push_str(&format!(
            "- id: job {i}\n  job: hello_world\n  schedule: '0 0 1 1 *'\n  arguments: {{{argument}: {i}}}\n"
        ));
    }
    file
}

/// (runs, distinct slots, seconds from the first slot to the last) of job `tick`.
async fn tick_slots(cluster: &Cluster) -> (i64, i64, i64) {
    let slots: Vec<_> = cluster
        .runs()
        .await
        .into_iter()
        .filter(|r| r.job_name == "tick")
        .map(|r| r.scheduled_for.expect("a scheduled run has a slot"))
        .collect();
    let distinct: std::collections::BTreeSet<_> = slots.iter().collect();
    let span = match (distinct.first(), distinct.last()) {
        (Some(first), Some(last)) => (**last - **first).num_seconds(),
        _ => -1,
    };
    (slots.len() as i64, distinct.len() as i64, span)
}

/// SQL that makes the database refuse, with `message`, every update of `job_runs` whose new
/// row matches `when` (written against `NEW`).
fn refusing_updates(backend: crate::util::backend::Backend, when: &str, message: &str) -> String {
    if backend.postgres() {
        format!(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION '{message}'; END $$;
             CREATE TRIGGER refuse BEFORE UPDATE ON job_runs FOR EACH ROW
             WHEN ({when}) EXECUTE FUNCTION refuse();"
        )
    } else {
        format!(
            "CREATE TRIGGER refuse BEFORE UPDATE ON job_runs WHEN {when}
             BEGIN SELECT RAISE(ABORT, '{message}'); END;"
        )
    }
}

/// The one run of a test: (status, attempt, error).
async fn only_run(cluster: &Cluster) -> (String, i32, Option<String>) {
    let runs = cluster.runs().await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = runs.into_iter().next().unwrap();
    (run.status, run.attempt, run.error)
}

crate::on_every_backend! {
async fn a_per_second_job_fires_every_slot_once_while_big_files_are_imported(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "a_per_second_job_fires_every_slot_once_while_big_files_are_imported", FAST).await else {
        return;
    };
    cluster.import(&big_file(49_999, "n"));
    let scheduler = cluster.scheduler();
    cluster
        .wait_until(
            "three ticks",
            Duration::from_secs(60),
            "SELECT count(*) >= 3 FROM job_runs WHERE job_name = 'tick'",
        )
        .await;
    // The same file again, then one that changes every other job: 50,000 jobs each time.
    cluster.import(&big_file(49_999, "n"));
    cluster.import(&big_file(49_999, "m"));
    let (after_import, _, _) = tick_slots(&cluster).await;
    cluster
        .wait_until(
            "three more ticks",
            Duration::from_secs(30),
            &format!(
                "SELECT count(*) >= {} FROM job_runs WHERE job_name = 'tick'",
                after_import + 3
            ),
        )
        .await;
    drop(scheduler);
    let (runs, slots, span) = tick_slots(&cluster).await;
    assert_eq!(runs, slots, "a slot ran twice:\n{}", cluster.logs());
    assert_eq!(
        runs,
        span + 1,
        "slots were missed: {runs} runs over {span} seconds\n{}",
        cluster.logs()
    );
    let changed: i64 = cluster
        .count("SELECT count(*) FROM jobs WHERE CAST(arguments AS TEXT) LIKE '%\"m\"%'")
        .await;
    assert_eq!(changed, 49_999, "the second file is the registry now");
}
}

crate::on_every_store! {
async fn an_import_keeps_a_missed_run_waiting_for_its_catch_up(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "an_import_keeps_a_missed_run_waiting_for_its_catch_up", FAST).await else {
        return;
    };
    let nightly = "jobs:\n- id: nightly\n  job: hello_world\n  schedule: '0 3 * * *'\n";
    cluster.import(nightly);
    cluster.run_ok(&["scheduler", "--init"]);
    let missed = chrono::DurationRound::duration_trunc(
        chrono::Utc::now() - chrono::Duration::hours(2),
        chrono::Duration::seconds(1),
    )
    .unwrap();
    cluster
        .sql(&format!("UPDATE schedule SET next_run = {}", cluster.time(missed)))
        .await;
    // The entry is unchanged; another job comes and one changes its schedule.
    cluster.import(&format!(
        "{nightly}- id: other\n  job: hello_world\n  schedule: '0 4 * * *'\n"
    ));
    assert_eq!(
        cluster
            .count(&format!(
                "SELECT count(*) FROM schedule s JOIN registry r ON r.id = s.job JOIN jobs j ON j.id = r.job
                 WHERE j.name = 'nightly' AND s.next_run = {}",
                cluster.time(missed)
            ))
            .await,
        1,
        "the import kept the missed run"
    );
    cluster.run_ok(&["scheduler", "--no-daemon"]);
    let ran: Vec<_> = cluster
        .runs()
        .await
        .into_iter()
        .filter(|r| r.job_name == "nightly")
        .map(|r| r.scheduled_for)
        .collect();
    assert_eq!(ran, [Some(missed)], "the missed run ran once, for its slot");

    // A changed schedule gets a new next run.
    cluster.import("jobs:\n- id: nightly\n  job: hello_world\n  schedule: '0 5 * * *'\n");
    cluster.run_ok(&["scheduler", "--no-daemon"]);
    let shown: serde_json::Value =
        serde_json::from_str(&cluster.run_ok(&["scheduler", "-aj", "--json"])).unwrap();
    let next = shown[0]["next_run"].as_str().unwrap_or_default().to_string();
    assert!(next.contains("T05:00:00"), "{shown}");
}
}

/// RabbitMQ only: bare messages come from the original's publishers, which write to RabbitMQ.
#[tokio::test]
async fn bare_messages_become_runs_and_a_redelivered_one_runs_once() {
    crate::needs_servers!("bare_messages_become_runs_and_a_redelivered_one_runs_once");
    let cluster = Cluster::new(FAST).await;
    let _scheduler = cluster.scheduler();
    let _worker = cluster.worker("w1", 2);
    let body = br#"{"cmd": "hello_world", "args": {"from": "the original"}}"#;
    // The same message twice (as a re-delivery after a lost acknowledgement would bring it),
    // and one without a message id.
    cluster.publish_message(body, Some("m-1")).await;
    cluster.publish_message(body, Some("m-1")).await;
    cluster.publish_message(body, None).await;
    cluster
        .wait_until(
            "two bare-message runs succeeded",
            Duration::from_secs(30),
            "SELECT count(*) = 2 FROM job_runs WHERE status = 'succeeded'",
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT job_name, status, published_at IS NOT NULL FROM job_runs ORDER BY created_at",
    )
    .fetch_all(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(
        runs,
        [
            ("hello_world".to_string(), "succeeded".to_string(), true),
            ("hello_world".to_string(), "succeeded".to_string(), true)
        ],
        "{}",
        cluster.logs()
    );
    assert_eq!(cluster.queue_depth(&cluster.queue).await, 0);
}

/// A job whose first attempt starts a background process (a grandchild of the worker) and
/// waits for it; later attempts succeed at once. The pid of the background process goes to
/// `pidfile`.
fn interruptible_job(cluster: &Cluster) -> (std::path::PathBuf, std::path::PathBuf) {
    let pidfile = cluster.ws.path().join("sleeper.pid");
    let marker = cluster.ws.path().join("started-once");
    cluster.import(&format!(
        "jobs:\n- id: slow\n  job: command\n  arguments:\n    command: [sh, -c, 'if [ -e \"$1\" ]; then exit 0; fi; touch \"$1\"; sleep 60 & echo $! > \"$2\"; wait', sh, '{}', '{}']\n",
        marker.display(),
        pidfile.display()
    ));
    (pidfile, marker)
}

crate::on_every_backend! {
async fn a_worker_stopped_past_its_grace_period_leaves_nothing_running(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "a_worker_stopped_past_its_grace_period_leaves_nothing_running", "worker:\n  grace_period: 1\n  retry_backoff: 0.1\nscheduler:\n  sweep_every: 0.5\n").await else {
        return;
    };
    let (pidfile, _) = interruptible_job(&cluster);
    let _scheduler = cluster.scheduler();
    let mut worker = cluster.worker("w1", 1);
    cluster.run_ok(&["scheduler", "--run-now", "slow"]);
    let sleeper = pid_in(&pidfile);
    assert!(alive(sleeper));
    worker.signal("TERM");
    let status = worker
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("worker did not stop:\n{}", cluster.logs()));
    assert_eq!(status.code(), Some(0), "{}", cluster.logs());
    assert!(
        !alive(sleeper),
        "the job's process outlived its worker:\n{}",
        cluster.logs()
    );
    let (status, attempt, error) = only_run(&cluster).await;
    let error = error.unwrap_or_default();
    assert_eq!(
        (status.as_str(), attempt),
        ("queued", 1),
        "{}",
        cluster.logs()
    );
    assert!(error.contains("interrupted"), "{error}");
    // Its next attempt runs on the next worker.
    let _next = cluster.worker("w2", 1);
    cluster
        .wait_until(
            "the run succeeded on its next attempt",
            Duration::from_secs(30),
            "SELECT status = 'succeeded' AND attempt = 2 AND worker = 'w2' FROM job_runs",
        )
        .await;
}
}

crate::on_every_backend! {
async fn a_second_signal_exits_at_once_and_leaves_nothing_running(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "a_second_signal_exits_at_once_and_leaves_nothing_running", "worker:\n  grace_period: 60\n").await else {
        return;
    };
    let (pidfile, _) = interruptible_job(&cluster);
    let mut worker = cluster.worker("w1", 1);
    cluster.run_ok(&["scheduler", "--run-now", "slow"]);
    let sleeper = pid_in(&pidfile);
    worker.signal("TERM");
    cluster.wait_for_log(&worker, "waiting for running jobs to finish");
    worker.signal("TERM");
    let status = worker
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("worker did not exit:\n{}", cluster.logs()));
    assert_eq!(status.code(), Some(130), "{}", cluster.logs());
    assert!(!alive(sleeper), "the job's process outlived its worker");
    let (status, _, error) = only_run(&cluster).await;
    let error = error.unwrap_or_default();
    assert_eq!(status, "queued", "{}", cluster.logs());
    assert!(error.contains("interrupted"), "{error}");
}
}

crate::on_every_backend! {
async fn a_timed_out_attempt_has_ended_before_its_retry_starts(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "a_timed_out_attempt_has_ended_before_its_retry_starts", FAST).await else {
        return;
    };
    let pidfile = cluster.ws.path().join("attempt.pid");
    let overlaps = cluster.ws.path().join("overlaps");
    // The plugin's own timeout (60 s) is longer than the job's (2 s): the job's wins.
    cluster.import(&format!(
        "jobs:\n- id: stubborn\n  job: command\n  timeout: 2\n  retries: 1\n  arguments:\n    timeout: 60\n    command: [sh, -c, 'p=$(cat \"$1\" 2>/dev/null); if [ -n \"$p\" ] && [ -e /proc/$p ] && ! grep -q \") [ZX] \" /proc/$p/stat; then echo overlap >> \"$2\"; fi; sleep 30 & echo $! > \"$1\"; wait', sh, '{}', '{}']\n",
        pidfile.display(),
        overlaps.display()
    ));
    let _scheduler = cluster.scheduler();
    let _worker = cluster.worker("w1", 2);
    cluster.run_ok(&["scheduler", "--run-now", "stubborn"]);
    cluster
        .wait_until(
            "both attempts timed out",
            Duration::from_secs(60),
            "SELECT status = 'failed' AND attempt = 2 FROM job_runs",
        )
        .await;
    let (_, _, error) = only_run(&cluster).await;
    let error = error.unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
    assert!(
        !overlaps.exists(),
        "the retry started while the timed-out attempt still ran"
    );
    assert!(
        !alive(pid_in(&pidfile)),
        "the last attempt's process lives on"
    );
}
}

crate::on_every_backend! {
async fn a_worker_whose_slots_all_hang_stops_and_queues_its_runs_again(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "a_worker_whose_slots_all_hang_stops_and_queues_its_runs_again", FAST).await else {
        return;
    };
    cluster.import(
        "jobs:\n- id: hang\n  job: test_sleep\n  timeout: 1\n  retries: 3\n  arguments: {seconds: 600}\n",
    );
    let mut worker = cluster.worker("w1", 1);
    cluster.run_ok(&["scheduler", "--run-now", "hang"]);
    let status = worker
        .wait_exit(Duration::from_secs(40))
        .unwrap_or_else(|| panic!("the stuck worker did not stop:\n{}", cluster.logs()));
    assert_eq!(status.code(), Some(1), "{}", cluster.logs());
    assert!(
        worker.log_text().contains("every slot is held"),
        "{}",
        worker.log_text()
    );
    let (status, attempt, _) = only_run(&cluster).await;
    assert_eq!((status.as_str(), attempt), ("queued", 1));
}
}

crate::on_every_backend! {
async fn lookahead_deliveries_wait_for_a_slot_and_nothing_is_lost_on_stop(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "lookahead_deliveries_wait_for_a_slot_and_nothing_is_lost_on_stop",
        "worker:\n  lookahead: 2\n  grace_period: 1\n",
    )
    .await
    else {
        return;
    };
    cluster.import("jobs:\n- id: busy\n  job: command\n  arguments: {command: [sleep, '60']}\n");
    let mut worker = cluster.worker("w1", 1);
    for _ in 0..4 {
        cluster.run_ok(&["scheduler", "--run-now", "busy"]);
    }
    // One slot runs one job; two deliveries wait in the worker for it; the fourth stays in
    // the queue for other workers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (held, ready) = (cluster.held().await, cluster.depth().await);
        if (held, ready) == (3, 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "held {held}, ready {ready}, not 3 and 1:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let running = "SELECT count(*) FROM job_runs WHERE status = 'running'";
    assert_eq!(cluster.count(running).await, 1, "no more jobs than slots");
    // Stopped: the running job is interrupted and queued for its next attempt, the waiting
    // deliveries go back to the queue unclaimed.
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", cluster.logs());
    assert_eq!(cluster.count(running).await, 0);
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM job_runs WHERE status = 'queued'")
            .await,
        4,
        "{}",
        cluster.logs()
    );
    // The broker's counts lag a little behind.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.held().await > 0 {
        assert!(Instant::now() < deadline, "deliveries still held after the worker stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
}

crate::on_backends! {
[postgres_table: PostgresTable, postgres_rabbitmq: PostgresRabbitmq]
async fn a_slot_takes_the_waiting_delivery_in_the_commit_that_records_its_last_job(backend: Backend) {
    // Default settings: as many deliveries wait in a worker as it has slots.
    let Some(cluster) = Cluster::on(
        backend,
        "a_slot_takes_the_waiting_delivery_in_the_commit_that_records_its_last_job",
        "worker:\n  grace_period: 1\n",
    )
    .await
    else {
        return;
    };
    cluster.import(
        "jobs:\n- id: quick\n  job: hello_world\n\
         - id: busy\n  job: command\n  arguments: {command: [sleep, '60']}\n",
    );
    cluster.run_ok(&["scheduler", "--run-now", "quick"]);
    cluster.run_ok(&["scheduler", "--run-now", "busy"]);
    // Both are in the queue before the worker starts: the quick run takes the slot, the busy
    // one waits for it.
    let mut worker = cluster.worker("w1", 1);
    cluster
        .wait_until(
            "quick done and busy running",
            Duration::from_secs(30),
            "SELECT count(*) = 2 FROM job_runs WHERE (job_name = 'quick' AND status = 'succeeded') \
             OR (job_name = 'busy' AND status = 'running')",
        )
        .await;
    // The busy run was claimed by the transaction that recorded the quick one: the rows'
    // current versions have the same writer.
    let writers: Vec<String> = sqlx::query_scalar(
        "SELECT xmin::text FROM job_runs WHERE job_name IN ('quick', 'busy') ORDER BY job_name",
    )
    .fetch_all(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(
        writers[0], writers[1],
        "the waiting run's claim and the last result were written apart:\n{}",
        cluster.logs()
    );
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", cluster.logs());
}
}

crate::on_every_backend! {
async fn a_delivery_waiting_behind_a_long_job_goes_to_a_worker_with_a_free_slot(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "a_delivery_waiting_behind_a_long_job_goes_to_a_worker_with_a_free_slot",
        "worker:\n  grace_period: 1\n",
    )
    .await
    else {
        return;
    };
    cluster.import(
        "jobs:\n- id: busy\n  job: command\n  arguments: {command: [sleep, '60']}\n\
         - id: quick\n  job: hello_world\n",
    );
    let mut w1 = cluster.worker("w1", 1);
    cluster.run_ok(&["scheduler", "--run-now", "busy"]);
    cluster
        .wait_until(
            "the long job running",
            Duration::from_secs(30),
            "SELECT count(*) = 1 FROM job_runs WHERE status = 'running'",
        )
        .await;
    cluster.run_ok(&["scheduler", "--run-now", "quick"]);
    // The quick run's delivery waits in w1, behind the long job.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (cluster.held().await, cluster.depth().await) != (2, 0) {
        assert!(
            Instant::now() < deadline,
            "the quick run's delivery did not reach w1:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A worker with a free slot gets it once w1 gives it back, long before the job ends.
    let _w2 = cluster.worker("w2", 1);
    cluster
        .wait_until(
            "the quick run done",
            Duration::from_secs(25),
            "SELECT count(*) = 1 FROM job_runs WHERE job_name = 'quick' AND status = 'succeeded'",
        )
        .await;
    let quick = cluster
        .runs()
        .await
        .into_iter()
        .find(|r| r.job_name == "quick")
        .expect("the quick run");
    assert_eq!(
        (quick.worker.as_deref(), quick.attempt),
        (Some("w2"), 1),
        "{}",
        cluster.logs()
    );
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM job_runs WHERE job_name = 'busy' AND status = 'running'")
            .await,
        1,
        "the long job still runs"
    );
    assert_eq!(cluster.dead_letters().await, 0);
    w1.signal("TERM");
    let status = w1.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", cluster.logs());
}
}

crate::on_every_backend! {
async fn a_delivery_that_waits_long_is_let_go_once_its_run_is_out_again(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "a_delivery_that_waits_long_is_let_go_once_its_run_is_out_again",
        "worker:\n  grace_period: 1\n",
    )
    .await
    else {
        return;
    };
    cluster.import(
        "jobs:\n- id: busy\n  job: command\n  arguments: {command: [sleep, '300']}\n\
         - id: quick\n  job: hello_world\n",
    );
    let mut w1 = cluster.worker("w1", 1);
    cluster.run_ok(&["scheduler", "--run-now", "busy"]);
    cluster
        .wait_until(
            "the long job running",
            Duration::from_secs(30),
            "SELECT count(*) = 1 FROM job_runs WHERE status = 'running'",
        )
        .await;
    cluster.run_ok(&["scheduler", "--run-now", "quick"]);
    let settled = |held: u64, ready: u32, what: &'static str, limit: u64| {
        let cluster = &cluster;
        async move {
            let deadline = Instant::now() + Duration::from_secs(limit);
            loop {
                let now = (cluster.held().await, cluster.depth().await);
                if now == (held, ready) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: held and ready {now:?}, not {:?}:\n{}",
                    (held, ready),
                    cluster.logs()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // The quick run's delivery waits in w1; after 10 s its run is published again, and the
    // copy stays in the queue (no other worker, and w1 has no room while it holds the
    // delivery).
    settled(2, 0, "the delivery waiting in w1", 30).await;
    settled(2, 1, "the run published again", 30).await;
    // After 60 s the waiting delivery is acknowledged (not returned): w1 has room again and
    // takes the copy, and nothing is left in the queue.
    settled(2, 0, "the delivery let go and the copy taken", 90).await;
    assert_eq!(cluster.dead_letters().await, 0);
    // Stopped: the long job is interrupted, the waiting copy is given back; both runs are
    // queued, none ran twice or got lost.
    w1.signal("TERM");
    let status = w1.wait_exit(Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", cluster.logs());
    let quick = cluster
        .runs()
        .await
        .into_iter()
        .find(|r| r.job_name == "quick")
        .expect("the quick run");
    assert_eq!((quick.status.as_str(), quick.attempt), ("queued", 0));
}
}

crate::on_every_backend! {
async fn sigterm_is_seen_while_every_slot_is_busy(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "sigterm_is_seen_while_every_slot_is_busy", "worker:\n  grace_period: 1\n").await else {
        return;
    };
    cluster.import("jobs:\n- id: busy\n  job: command\n  arguments: {command: [sleep, '60']}\n");
    let mut worker = cluster.worker("w1", 1);
    for _ in 0..3 {
        cluster.run_ok(&["scheduler", "--run-now", "busy"]);
    }
    cluster
        .wait_until(
            "one run running",
            Duration::from_secs(30),
            "SELECT count(*) = 1 FROM job_runs WHERE status = 'running'",
        )
        .await;
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(15));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", cluster.logs());
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM job_runs WHERE status = 'running'")
            .await,
        0
    );
}
}

crate::on_every_store! {
async fn claims_and_inserts_retried_after_a_lost_reply_change_nothing(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "claims_and_inserts_retried_after_a_lost_reply_change_nothing", "").await else {
        return;
    };
    let store = cluster.store.clone();
    let run = |id: Option<Uuid>| crate::util::new_run(id, None);
    // A deterministic id (a fan-out child's): the insert retried creates nothing new.
    let child = Uuid::new_v4();
    let first = store.insert_runs(&[run(Some(child))]).await.unwrap();
    let again = store.insert_runs(&[run(Some(child))]).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(cluster.count("SELECT count(*) FROM job_runs").await, 1);

    // Without the lease held, nothing is claimed (the deliveries go back).
    let lease = store.worker_lease().await.unwrap();
    let token = lease.token;
    let unheld = store
        .claim_runs(
            "w1",
            token.wrapping_add(1).max(1),
            Uuid::new_v4(),
            &[(child, false)],
        )
        .await
        .unwrap();
    assert_eq!(unheld, [Claim::Unavailable]);

    // A claim retried after its reply was lost finds its own first try.
    let nonce = Uuid::new_v4();
    let claimed = store
        .claim_runs("w1", token, nonce, &[(child, false)])
        .await
        .unwrap();
    assert!(matches!(claimed[0], Claim::Claimed { attempt: 1, .. }));
    let retried = store
        .claim_runs("w1", token, nonce, &[(child, false)])
        .await
        .unwrap();
    assert!(
        matches!(retried[0], Claim::Claimed { attempt: 1, .. }),
        "{retried:?}"
    );
    // Another claim (a duplicate delivery) is not mistaken for it.
    let other = store
        .claim_runs("w1", token, Uuid::new_v4(), &[(child, false)])
        .await
        .unwrap();
    assert_eq!(other[0], Claim::Running);

    // A retry's not-before time is counted on the database's clock.
    store
        .finish_runs(&[Finish {
            id: child,
            token,
            attempt: 1,
            end: RunEnd::Retry(std::time::Duration::from_secs(30)),
            result: None,
            error: Some("try again".into()),
        }])
        .await
        .unwrap();
    let not_before = cluster.run(&child.to_string()).await.not_before.unwrap();
    let wait = (not_before - store.now().await.unwrap()).num_milliseconds() as f64 / 1000.0;
    assert!((29.0..=30.0).contains(&wait), "{wait}");
    // A copy of its message arriving before that time claims nothing: the outbox publishes
    // it when its time comes.
    let early = store
        .claim_runs("w1", token, Uuid::new_v4(), &[(child, true)])
        .await
        .unwrap();
    assert_eq!(early, [Claim::Running]);
}
}

crate::on_every_store! {
async fn a_batch_of_claims_answers_each_delivery_as_a_claim_of_its_own_would(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "a_batch_of_claims_answers_each_delivery_as_a_claim_of_its_own_would", "").await else {
        return;
    };
    cluster.import(
        "jobs:\n- id: zoned\n  job: hello_world\n  schedule: '0 6 1 1 *'\n  timezone: Europe/Berlin\n",
    );
    let store = cluster.store.clone();
    let named = |name: &str, parent: Option<Uuid>| jobschleuder::store::NewRun {
        job_name: name.into(),
        ..crate::util::new_run(None, parent)
    };
    let parent = store.insert_runs(&[named("plain", None)]).await.unwrap()[0];
    let made = store
        .insert_runs(&[
            named("zoned", Some(parent)),
            jobschleuder::store::NewRun {
                trigger: "webhook",
                ..named("plain", None)
            },
            named("plain", None),
            named("plain", None),
        ])
        .await
        .unwrap();
    let (child, plain, ended, taken) = (made[0], made[1], made[2], made[3]);
    let lease = store.worker_lease().await.unwrap();
    let token = lease.token;
    // One run ended already, another is running under an earlier claim.
    store
        .claim_runs("w0", token, Uuid::new_v4(), &[(ended, false), (taken, false)])
        .await
        .unwrap();
    store
        .finish_runs(&[Finish {
            id: ended,
            token,
            attempt: 1,
            end: RunEnd::Succeeded,
            result: None,
            error: None,
        }])
        .await
        .unwrap();
    let created = |id: Uuid| {
        let cluster = &cluster;
        async move { Some(cluster.run(&id.to_string()).await.created_at) }
    };
    let claimed = |trigger: &str, scheduled_for, parent, timezone: Option<&str>| Claim::Claimed {
        attempt: 1,
        trigger: trigger.into(),
        run: jobschleuder::store::ClaimedRun {
            scheduled_for,
            parent,
            timezone: timezone.map(str::to_string),
        },
    };
    let expected = vec![
        claimed(
            "manual",
            created(child).await,
            Some(parent),
            Some("Europe/Berlin"),
        ),
        claimed("webhook", created(plain).await, None, None),
        Claim::Running,
        Claim::Finished("succeeded".into()),
        Claim::Running,
        Claim::Unknown,
    ];
    let batch = [
        (child, false),
        (plain, false),
        (child, false),
        (ended, false),
        (taken, false),
        (Uuid::new_v4(), false),
    ];
    let nonce = Uuid::new_v4();
    let answers = store.claim_runs("w1", token, nonce, &batch).await.unwrap();
    assert_eq!(answers, expected);
    // The same statement again, its answer lost: the same answers.
    let again = store.claim_runs("w1", token, nonce, &batch).await.unwrap();
    assert_eq!(again, expected);

    // A large batch, with results, as a worker's writer writes it: every claim answered.
    let many: Vec<Uuid> = store
        .insert_runs(&(0..300).map(|_| named("plain", None)).collect::<Vec<_>>())
        .await
        .unwrap();
    let mut claims: Vec<(Uuid, bool)> = many.iter().map(|id| (*id, false)).collect();
    claims.push((many[7], false));
    let finishes: Vec<Finish> = [child, plain]
        .into_iter()
        .map(|id| Finish {
            id,
            token,
            attempt: 1,
            end: RunEnd::Succeeded,
            result: Some(serde_json::json!({ "ok": true })),
            error: None,
        })
        .collect();
    let (not_recorded, answers) =
        write_together(&store, &finishes, "w1", token, Uuid::new_v4(), &claims)
            .await
            .unwrap();
    assert!(not_recorded.is_empty(), "{not_recorded:?}");
    assert_eq!(answers.len(), 301);
    assert!(
        answers[..300]
            .iter()
            .all(|a| matches!(a, Claim::Claimed { attempt: 1, .. })),
        "{answers:?}"
    );
    assert_eq!(answers[300], Claim::Running);
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM job_runs WHERE status = 'running'")
            .await,
        301
    );
    assert_eq!(
        cluster
            .count("SELECT count(*) FROM job_runs WHERE status = 'succeeded'")
            .await,
        3
    );
}
}

/// Takes a worker lease and claims `id` under it (its first attempt); the lease is held while
/// the returned value lives.
/// Results and claims as a worker's writer writes them: together, then the results that left
/// for `finish_runs`. Returns the results not recorded (in id order) and the claims' answers.
async fn write_together(
    store: &jobschleuder::store::Store,
    finishes: &[Finish],
    worker: &str,
    token: i32,
    nonce: Uuid,
    claims: &[(Uuid, bool)],
) -> Result<(Vec<Uuid>, Vec<Claim>), jobschleuder::store::StoreError> {
    let written = store
        .finish_and_claim_runs(finishes, worker, token, nonce, claims)
        .await?;
    let mut not_recorded = written.not_recorded;
    if !written.left.is_empty() {
        not_recorded.extend(store.finish_runs(&written.left).await?);
    }
    not_recorded.sort();
    Ok((not_recorded, written.claims))
}

async fn claim_one(
    store: &jobschleuder::store::Store,
    id: Uuid,
) -> jobschleuder::store::WorkerLease {
    let lease = store.worker_lease().await.unwrap();
    let claimed = store
        .claim_runs("w1", lease.token, Uuid::new_v4(), &[(id, false)])
        .await
        .unwrap();
    assert!(
        matches!(claimed[0], Claim::Claimed { attempt: 1, .. }),
        "{claimed:?}"
    );
    lease
}

/// Publishing and claiming a run change no column an index of `job_runs` reads, so Postgres
/// rewrites the row in place (a heap-only update): no index entries, and the old version is
/// reclaimed without VACUUM. An index on `status`, `published_at` or `claim_token` (or with
/// one of them in its condition) turns each step into a full update again, which was
/// Postgres's largest cost per run.
#[tokio::test]
async fn publishing_and_claiming_a_run_are_heap_only_updates() {
    crate::needs_postgres!("publishing_and_claiming_a_run_are_heap_only_updates");
    let db = crate::util::TestDb::new().await;
    let pool = db.pool().await;
    let store = jobschleuder::store::Store::from_pool(pool.clone())
        .await
        .unwrap();
    let id = Uuid::new_v4();
    store
        .insert_runs(&[crate::util::new_run(Some(id), None)])
        .await
        .unwrap();
    let batch = store.outbox(10, Some(&[id])).await.unwrap();
    assert_eq!(batch.runs.len(), 1, "the run is in the outbox");
    batch.settle(&[id], &[]).await.unwrap();
    let _lease = claim_one(&store, id).await;
    // The listing by state reads the open runs.
    let ids =
        |runs: Vec<jobschleuder::store::RunRow>| runs.iter().map(|r| r.id).collect::<Vec<_>>();
    let running = store.runs(None, Some("running"), None, 10).await.unwrap();
    let queued = store.runs(None, Some("queued"), None, 10).await.unwrap();
    assert_eq!((ids(running), ids(queued)), (vec![id], vec![]));
    // A backend reports its table statistics when it goes idle or exits: closing the pool
    // makes every connection that wrote report.
    pool.close().await;
    let reader = db.pool().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (updates, hot): (i64, i64) = loop {
        let counts: (i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'job_runs'",
        )
        .fetch_one(&reader)
        .await
        .unwrap();
        if counts.0 >= 2 || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(updates, 2, "the run was published and claimed");
    assert_eq!(
        hot, 2,
        "publishing and claiming rewrote the row in place, not every index of job_runs"
    );
}

crate::on_every_store! {
/// A new run's id starts with the time it was made (UUID version 7), so that the primary
/// key's index grows at its right-hand end instead of taking each new run on a random page.
async fn new_runs_get_ids_in_the_order_they_were_made(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "new_runs_get_ids_in_the_order_they_were_made", "").await else {
        return;
    };
    let store = cluster.store.clone();
    let mut made = Vec::new();
    for batch in [5, 1, 1] {
        let runs: Vec<_> = (0..batch).map(|_| crate::util::new_run(None, None)).collect();
        made.extend(store.insert_runs(&runs).await.unwrap());
    }
    assert_eq!(made.len(), 7);
    assert!(made.iter().all(|id| id.get_version_num() == 7), "{made:?}");
    assert!(made.windows(2).all(|w| w[0] < w[1]), "not in the order made: {made:?}");
}
}

crate::on_every_store! {
async fn a_result_and_the_next_claim_are_written_together(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "a_result_and_the_next_claim_are_written_together", "").await else {
        return;
    };
    let store = cluster.store.clone();
    let (done, next, never) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let run = |id| crate::util::new_run(Some(id), None);
    store.insert_runs(&[run(done), run(next), run(never)]).await.unwrap();
    let lease = claim_one(&store, done).await;
    let token = lease.token;
    let finish = |id, attempt| Finish {
        id,
        token,
        attempt,
        end: RunEnd::Succeeded,
        result: Some(serde_json::json!({ "ok": true })),
        error: None,
    };
    // A result for a run that is not running is reported, not recorded; the others are.
    let nonce = Uuid::new_v4();
    let (not_recorded, claims) = write_together(&store, &[finish(done, 1), finish(never, 1)], "w1", token, nonce, &[(next, false)])
        .await
        .unwrap();
    assert_eq!(not_recorded, [never]);
    assert_eq!(cluster.run(&never.to_string()).await.status, "queued");
    assert!(matches!(claims[..], [Claim::Claimed { attempt: 1, .. }]), "{claims:?}");
    let (recorded, claimed) = (cluster.run(&done.to_string()).await, cluster.run(&next.to_string()).await);
    assert_eq!(recorded.status, "succeeded");
    assert_eq!((claimed.status.as_str(), claimed.attempt), ("running", 1));

    // Retried after a lost reply: the result is not recorded twice, and the claim finds its
    // own first try.
    let (not_recorded, claims) = write_together(&store, &[finish(done, 1)], "w1", token, nonce, &[(next, false)])
        .await
        .unwrap();
    assert_eq!(not_recorded, [done]);
    assert!(matches!(claims[..], [Claim::Claimed { attempt: 1, .. }]), "{claims:?}");

    // Without the lease, the claims are refused as unavailable and nothing is claimed; the
    // results in the same transaction are recorded.
    let third = Uuid::new_v4();
    store.insert_runs(&[run(third)]).await.unwrap();
    let unheld = token.wrapping_add(1).max(1);
    let (_, claims) = write_together(&store, &[finish(next, 1)], "w1", unheld, Uuid::new_v4(), &[(third, false)])
        .await
        .unwrap();
    assert_eq!(claims, [Claim::Unavailable]);
    assert_eq!(cluster.run(&third.to_string()).await.status, "queued");
    assert_eq!(
        cluster.run(&next.to_string()).await.status,
        "succeeded",
        "the result (under its own claim's token) is recorded all the same"
    );
}
}

crate::on_every_store! {
/// Results written together with claims end each run as `finish_runs` alone would: on
/// Postgres most go in the claims' statement, and those that need more (a job that chains
/// another, a retry) in a transaction after it.
async fn results_that_chain_or_retry_are_written_with_claims_as_they_are_alone(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "results_that_chain_or_retry_are_written_with_claims_as_they_are_alone", "").await else {
        return;
    };
    cluster.import("jobs:\n- id: first\n  job: hello_world\n  on_success: [second]\n- id: second\n  job: hello_world\n");
    let store = cluster.store.clone();
    let [plain, chains, retried, late, next] = [(); 5].map(|_| Uuid::new_v4());
    let run = |id, job: &str| jobschleuder::store::NewRun {
        job_name: job.into(),
        ..crate::util::new_run(Some(id), None)
    };
    store
        .insert_runs(&[run(plain, "j"), run(chains, "first"), run(retried, "j"), run(late, "j"), run(next, "j")])
        .await
        .unwrap();
    let lease = store.worker_lease().await.unwrap();
    let token = lease.token;
    let claimed = store
        .claim_runs("w1", token, Uuid::new_v4(), &[(plain, false), (chains, false), (retried, false)])
        .await
        .unwrap();
    assert!(claimed.iter().all(|c| matches!(c, Claim::Claimed { attempt: 1, .. })), "{claimed:?}");
    let finish = |id, end| Finish {
        id,
        token,
        attempt: 1,
        end,
        result: Some(serde_json::json!({ "run": id.to_string() })),
        error: None,
    };
    let finishes = [
        finish(plain, RunEnd::Succeeded),
        finish(chains, RunEnd::Succeeded),
        finish(retried, RunEnd::Retry(Duration::from_secs(3600))),
        finish(late, RunEnd::Succeeded),
    ];
    let written = store
        .finish_and_claim_runs(&finishes, "w1", token, Uuid::new_v4(), &[(next, false)])
        .await
        .unwrap();
    // The claim is committed before anything is done with the results left: a writer that
    // fails on those has still claimed the run.
    assert_eq!(cluster.run(&next.to_string()).await.status, "running");
    let left: Vec<Uuid> = written.left.iter().map(|f| f.id).collect();
    if backend.postgres() {
        let mut expected = vec![chains, retried, late];
        expected.sort();
        let mut left = left.clone();
        left.sort();
        assert_eq!(left, expected, "retries, chains and results it did not find running are left");
        assert_eq!(cluster.run(&plain.to_string()).await.status, "succeeded");
    } else {
        assert!(left.is_empty(), "SQLite writes them all in one transaction");
    }
    let mut not_recorded = written.not_recorded;
    not_recorded.extend(store.finish_runs(&written.left).await.unwrap());
    let claims = written.claims;
    assert_eq!(not_recorded, [late], "only the result of a run that was not running is reported");
    assert!(matches!(claims[..], [Claim::Claimed { attempt: 1, .. }]), "{claims:?}");
    for (id, status) in [(plain, "succeeded"), (chains, "succeeded"), (retried, "queued"), (late, "queued"), (next, "running")] {
        assert_eq!(cluster.run(&id.to_string()).await.status, status, "run {id}");
    }
    let ended = cluster.run(&plain.to_string()).await;
    assert_eq!(ended.result, Some(serde_json::json!({ "run": plain.to_string() })));
    assert!(ended.finished_at.is_some());
    let again = cluster.run(&retried.to_string()).await;
    assert!(
        again.finished_at.is_none() && again.published_at.is_none(),
        "a retry goes back to the outbox: {again:?}"
    );
    assert!(again.not_before.is_some_and(|at| at > chrono::Utc::now() + chrono::TimeDelta::minutes(50)));
    let chained = store.runs(Some("second"), None, None, 10).await.unwrap();
    assert_eq!(chained.len(), 1, "the chained run is created with its parent's result: {chained:?}");
    assert_eq!((chained[0].trigger.as_str(), chained[0].parent_id), ("chain", Some(chains)));
}
}

/// Postgres only: a worker's writer has two connections of its own, open and readied (its
/// statement run once on each) before anything is written, so that a burst after a quiet
/// hour waits neither for a new connection nor for a new server process to read the tables.
#[tokio::test]
async fn a_workers_writer_has_its_connections_ready_before_the_first_write() {
    crate::needs_postgres!("a_workers_writer_has_its_connections_ready_before_the_first_write");
    let db = crate::util::TestDb::new().await;
    let pool = db.pool().await;
    let store = jobschleuder::store::Store::from_pool(pool.clone())
        .await
        .unwrap();
    let readied = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND state = 'idle' AND query LIKE 'WITH lease AS%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(readied().await, 0);
    let writer = store.for_writes();
    let deadline = Instant::now() + Duration::from_secs(30);
    while readied().await < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        readied().await,
        2,
        "two connections, each readied with the writer's statement"
    );
    // And it writes: without a lease held, nothing is claimed.
    let (_, claims) = write_together(
        &writer,
        &[],
        "w1",
        1,
        Uuid::new_v4(),
        &[(Uuid::new_v4(), false)],
    )
    .await
    .unwrap();
    assert_eq!(claims, [Claim::Unavailable]);
}

/// Postgres only: the writer's statement is prepared and planned as its connections open, so
/// that a burst's first claims do not wait for that; and as the plan is kept for the
/// connection's life, it must not be one made for the table as it is then (empty, on a new
/// installation): it finds runs by their id, not by reading `job_runs` through.
#[tokio::test]
async fn a_workers_writer_plans_its_statement_as_it_connects_finding_each_run_by_its_id() {
    crate::needs_postgres!(
        "a_workers_writer_plans_its_statement_as_it_connects_finding_each_run_by_its_id"
    );
    let db = crate::util::TestDb::new().await;
    let pool = db.pool().await;
    let store = jobschleuder::store::Store::from_pool(pool.clone())
        .await
        .unwrap();
    let writer = store.for_writes();
    let mut conn = writer.pg_pool().unwrap().acquire().await.unwrap();
    let prepared: Vec<(String, i64)> = sqlx::query_as(
        "SELECT name, generic_plans FROM pg_prepared_statements
         WHERE statement LIKE 'WITH lease AS%'",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        prepared.len(),
        1,
        "the writer's statement, prepared: {prepared:?}"
    );
    let (name, generic_plans) = &prepared[0];
    assert!(*generic_plans >= 1, "and planned as the connection opened");
    // The plan that every batch of this connection will use, made while `job_runs` is empty.
    let nil = Uuid::nil();
    let plan: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN EXECUTE {name}(0, '{{}}', '{{}}', '', 0, '{nil}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '1000')"
    ))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    // Every read of `job_runs` looks a run up by its id: no sequential scan, and no scan of a
    // whole index for a join.
    let reads: Vec<usize> = (0..plan.len())
        .filter(|&i| plan[i].contains("Scan") && plan[i].contains(" on job_runs "))
        .collect();
    assert!(
        reads.len() >= 3,
        "the results, the claims, the answers: {plan:#?}"
    );
    for i in reads {
        assert!(
            plan[i].contains("Index Scan using job_runs_pkey")
                && plan
                    .get(i + 1)
                    .is_some_and(|next| next.contains("Index Cond: (id = ")),
            "{}\n{plan:#?}",
            plan[i]
        );
    }
}

/// Postgres only: row locks held across an outbox pass's publishing are Postgres's own (on
/// SQLite one writer at a time holds the whole file).
#[tokio::test]
async fn claims_written_with_results_give_up_on_rows_an_outbox_pass_holds() {
    crate::needs_servers!("claims_written_with_results_give_up_on_rows_an_outbox_pass_holds");
    let cluster = Cluster::new("").await;
    let store = cluster.store.clone();
    let (held, done) = (Uuid::new_v4(), Uuid::new_v4());
    let run = |id| crate::util::new_run(Some(id), None);
    store.insert_runs(&[run(held), run(done)]).await.unwrap();
    let lease = claim_one(&store, done).await;
    let token = lease.token;
    let finish = Finish {
        id: done,
        token,
        attempt: 1,
        end: RunEnd::Succeeded,
        result: None,
        error: None,
    };
    // An outbox pass holds `held` while it waits for its confirms.
    let pass = store.outbox(10, Some(&[held])).await.unwrap();
    assert_eq!(pass.runs.len(), 1);
    let together = tokio::time::timeout(
        Duration::from_secs(60),
        write_together(
            &store,
            std::slice::from_ref(&finish),
            "w1",
            token,
            Uuid::new_v4(),
            &[(held, false)],
        ),
    )
    .await
    .expect("the claim waited for the outbox pass to end");
    let error = together.expect_err("the claim cannot have its row");
    assert!(error.is_lock_timeout(), "{error}");
    // Nothing of the transaction was written.
    assert_eq!(cluster.run(&done.to_string()).await.status, "running");
    assert_eq!(cluster.run(&held.to_string()).await.status, "queued");
    // Once the pass is over, both go through.
    pass.settle(&[held], &[]).await.unwrap();
    let (not_recorded, claims) = write_together(
        &store,
        &[finish],
        "w1",
        token,
        Uuid::new_v4(),
        &[(held, false)],
    )
    .await
    .unwrap();
    assert!(not_recorded.is_empty());
    assert!(
        matches!(claims[..], [Claim::Claimed { attempt: 1, .. }]),
        "{claims:?}"
    );
    assert_eq!(cluster.run(&done.to_string()).await.status, "succeeded");
}

crate::on_every_store! {
async fn orphans_are_fenced_by_claim_late_results_are_reported_and_crash_loops_end_dead(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "orphans_are_fenced_by_claim_late_results_are_reported_and_crash_loops_end_dead", "").await else {
        return;
    };
    let store = cluster.store.clone();
    let id = Uuid::new_v4();
    cluster
        .sql(&format!(
            "INSERT INTO job_runs (id, job_name, job, trigger, status, attempt, claim_token, max_retries, created_at)
             VALUES ({}, 'j', 'hello_world', 'manual', 'running', 2, 4242, 1, {})",
            cluster.id(id),
            cluster.time(chrono::Utc::now())
        ))
        .await;
    // A suspect is one claim: another attempt or another lease is not it.
    assert!(store
        .requeue_orphans(&[(id, 4242, 1)], 5)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .requeue_orphans(&[(id, 1, 2)], 5)
        .await
        .unwrap()
        .is_empty());
    let requeued = store.requeue_orphans(&[(id, 4242, 2)], 5).await.unwrap();
    assert_eq!(requeued, [(id, 2, "queued".to_string())]);

    // The vanished worker's result, arriving late, is not recorded, and says so.
    let late = Finish {
        id,
        token: 4242,
        attempt: 2,
        end: RunEnd::Succeeded,
        result: None,
        error: None,
    };
    assert_eq!(store.finish_runs(&[late]).await.unwrap(), [id]);

    // Vanishing counts as an attempt: at retries + limit the run is given up.
    cluster
        .sql(&format!(
            "UPDATE job_runs SET status = 'running', attempt = 6 WHERE id = {}",
            cluster.id(id)
        ))
        .await;
    let dead = store.requeue_orphans(&[(id, 4242, 6)], 5).await.unwrap();
    assert_eq!(dead, [(id, 6, "dead".to_string())]);

    // The scheduler's sleep reads these: a run running, none waiting.
    let wakeup = store.next_wakeup().await.unwrap();
    assert!(!wakeup.any_running && wakeup.next_run.is_none() && wakeup.oldest_unclaimed.is_none());
}
}

/// Postgres only: there the database's clock decides what is due whatever the schedulers'
/// clocks say; the processes of one SQLite host share one clock.
#[tokio::test]
async fn schedulers_with_skewed_clocks_fire_each_slot_once_and_on_time() {
    crate::needs_servers!("schedulers_with_skewed_clocks_fire_each_slot_once_and_on_time");
    // Debian puts it under the machine's multiarch folder.
    let lib = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("faketime/libfaketime.so.1"))
        .find(|path| path.exists())
        .expect("this test needs libfaketime (apt-get install faketime)");
    let lib = lib.to_str().expect("a UTF-8 path");
    let cluster = Cluster::new(FAST).await;
    cluster.import("jobs:\n- id: tick\n  job: hello_world\n  schedule: '* * * * * *'\n");
    let skewed = |offset: &str| {
        let process = cluster.spawn_with_env(
            &format!("scheduler{offset}"),
            &["scheduler", "--schedule"],
            &[
                ("LD_PRELOAD", lib),
                ("FAKETIME", offset),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
        );
        cluster.wait_for_log(&process, "listening for registry changes");
        process
    };
    let ahead = skewed("+600s");
    let behind = skewed("-600s");
    cluster
        .wait_until(
            "five ticks",
            Duration::from_secs(30),
            "SELECT count(*) >= 5 FROM job_runs WHERE job_name = 'tick'",
        )
        .await;
    drop((ahead, behind));
    let (runs, slots, span) = tick_slots(&cluster).await;
    assert_eq!(runs, slots, "a slot ran twice");
    assert_eq!(runs, span + 1, "slots were missed");
    let (early, late): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE scheduled_for > created_at + interval '0.5 s'),
                count(*) FILTER (WHERE created_at > scheduled_for + interval '5 s')
         FROM job_runs",
    )
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(
        (early, late),
        (0, 0),
        "runs fired early or late:\n{}",
        cluster.logs()
    );
}

/// RabbitMQ only: a queue declared with other arguments is a broker's refusal.
#[tokio::test]
async fn runs_that_can_never_be_published_are_recorded_dead_and_the_rest_go_out() {
    crate::needs_servers!("runs_that_can_never_be_published_are_recorded_dead_and_the_rest_go_out");
    let cluster = Cluster::with_rabbitmq("  max_message_size: 4096\n", FAST).await;
    // A queue that exists with other arguments than ours: declaring it is refused.
    let other = format!("{}_other", cluster.queue);
    cluster.declare_queue_with_other_arguments(&other).await;
    {
        let big = "x".repeat(5000);
        cluster.import(&format!(
            "jobs:\n\
             - id: good\n  job: hello_world\n  schedule: '0 0 1 1 *'\n\
             - id: misrouted\n  job: hello_world\n  queue: {other}\n  schedule: '0 0 1 1 *'\n\
             - id: huge\n  job: hello_world\n  schedule: '0 0 1 1 *'\n  arguments: {{blob: {big}}}\n"
        ));
        cluster.run_ok(&["scheduler", "--init"]);
        sqlx::query("UPDATE schedule SET next_run = now() - interval '1 second'")
            .execute(&cluster.pool)
            .await
            .unwrap();
        cluster.run_ok(&["scheduler", "--no-daemon"]);
        let runs: Vec<(String, String, Option<String>, bool)> = sqlx::query_as(
            "SELECT job_name, status, error, published_at IS NOT NULL FROM job_runs ORDER BY job_name",
        )
        .fetch_all(&cluster.pool)
        .await
        .unwrap();
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert_eq!(
            (runs[0].0.as_str(), runs[0].1.as_str(), runs[0].3),
            ("good", "queued", true)
        );
        assert_eq!((runs[1].0.as_str(), runs[1].1.as_str()), ("huge", "dead"));
        assert!(
            runs[1]
                .2
                .as_deref()
                .unwrap_or("")
                .contains("max_message_size"),
            "{runs:?}"
        );
        assert_eq!(
            (runs[2].0.as_str(), runs[2].1.as_str()),
            ("misrouted", "dead")
        );
        assert!(
            runs[2].2.as_deref().unwrap_or("").contains(&other),
            "{runs:?}"
        );
    }
    assert_eq!(
        cluster.queue_depth(&cluster.queue).await,
        1,
        "good was published"
    );
}

#[tokio::test]
async fn a_worker_id_the_history_cannot_hold_is_refused_at_start() {
    crate::needs_servers!("a_worker_id_the_history_cannot_hold_is_refused_at_start");
    let cluster = Cluster::new("").await;
    let id = "w".repeat(201);
    let mut worker = cluster.spawn("worker", &["worker", "--id", &id]);
    let status = worker
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("the worker started with an unusable id"));
    assert_eq!(status.code(), Some(2));
    assert!(worker.log_text().contains("--id"), "{}", worker.log_text());
}

crate::on_every_backend! {
async fn a_run_no_worker_can_claim_ends_dead_with_the_reason(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "a_run_no_worker_can_claim_ends_dead_with_the_reason", FAST).await else {
        return;
    };
    cluster
        .import("jobs:\n- id: unclaimable\n  job: hello_world\n- id: fine\n  job: hello_world\n");
    // The database refuses every claim of one job, for good.
    cluster
        .sql(&refusing_updates(
            backend,
            "NEW.status = 'running' AND NEW.job_name = 'unclaimable'",
            "claims refused for the test",
        ))
        .await;
    // Both waiting before the worker starts: their claims go to the database together, and
    // the refusal of one must not refuse the other.
    cluster.run_ok(&["scheduler", "--run-now", "unclaimable"]);
    cluster.run_ok(&["scheduler", "--run-now", "fine"]);
    let _worker = cluster.worker("w1", 2);
    cluster
        .wait_until(
            "the unclaimable run recorded dead, the other one run",
            Duration::from_secs(30),
            "SELECT count(*) = 2 FROM job_runs
             WHERE (job_name = 'unclaimable' AND status = 'dead'
                    AND error LIKE '%no worker can claim it%claims refused%')
                OR (job_name = 'fine' AND status = 'succeeded')",
        )
        .await;
}
}

crate::on_every_backend! {
async fn a_run_whose_message_was_lost_is_published_again(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "a_run_whose_message_was_lost_is_published_again", "scheduler:\n  sweep_every: 0.2\n  republish_after: 1\nworker:\n  grace_period: 5\n").await else {
        return;
    };
    cluster.import("jobs:\n- id: lost\n  job: hello_world\n");
    cluster.run_ok(&["scheduler", "--run-now", "lost"]);
    // The message goes missing (a broker that lost it, an operator who purged the queue).
    assert_eq!(cluster.drain_queue().await.len(), 1);
    let _worker = cluster.worker("w1", 1);
    let _scheduler = cluster.scheduler();
    cluster
        .wait_until(
            "the run published again and run",
            Duration::from_secs(30),
            "SELECT status = 'succeeded' FROM job_runs",
        )
        .await;
}
}

crate::on_every_backend! {
async fn a_result_that_cannot_be_recorded_is_not_acknowledged(backend: Backend) {
    let Some(cluster) = Cluster::on(backend, "a_result_that_cannot_be_recorded_is_not_acknowledged", FAST).await else {
        return;
    };
    cluster.import("jobs:\n- id: unrecordable\n  job: hello_world\n");
    cluster
        .sql(&refusing_updates(
            backend,
            "NEW.status IN ('succeeded', 'failed')",
            "refused for the test",
        ))
        .await;
    let worker = cluster.worker("w1", 1);
    cluster.run_ok(&["scheduler", "--run-now", "unrecordable"]);
    cluster.wait_for_log(&worker, "cannot be recorded at all");
    // The broker's counts lag a little behind; the delivery stays unacknowledged throughout.
    let deadline = Instant::now() + Duration::from_secs(15);
    while cluster.held().await != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(cluster.held().await, 1, "{}", cluster.logs());
    assert_eq!(cluster.depth().await, 0, "not returned to the queue");
}
}

/// Postgres only: the lease is an advisory lock there. A SQLite lease row that runs out is
/// taken over as the worker-kill tests of `scheduling` show on every backend.
#[tokio::test]
async fn a_worker_that_lost_its_lease_claims_nothing_until_it_holds_it_again() {
    crate::needs_servers!("a_worker_that_lost_its_lease_claims_nothing_until_it_holds_it_again");
    let cluster = Cluster::new(FAST).await;
    cluster.import("jobs:\n- id: fenced\n  job: hello_world\n");
    let worker = cluster.worker("w1", 1);
    // 0x6a73776b: the class of worker leases (`pg_advisory_lock(class, token)`).
    let (pid, token): (i32, i64) = sqlx::query_as(
        // This test's worker's: other tests' workers hold leases on the same server.
        "SELECT pid, objid::int8 FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND classid = 1785952107::oid AND objsubid = 2
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    // The lease connection drops, and someone else holds the lock meanwhile.
    let mut holder = sqlx::PgConnection::connect(&cluster.db.url).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&cluster.pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_lock(1785952107, $1::int4)")
        .bind(token)
        .execute(&mut holder)
        .await
        .unwrap();
    cluster.wait_for_log(&worker, "claiming nothing until the lease is taken again");
    cluster.run_ok(&["scheduler", "--run-now", "fenced"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status: String = sqlx::query_scalar("SELECT status FROM job_runs")
        .fetch_one(&cluster.pool)
        .await
        .unwrap();
    assert_eq!(
        status,
        "queued",
        "claimed without the lease:\n{}",
        cluster.logs()
    );
    holder.close().await.unwrap();
    cluster
        .wait_until(
            "the run claimed once the lease is back",
            Duration::from_secs(30),
            "SELECT status = 'succeeded' FROM job_runs",
        )
        .await;
}

/// Postgres + table queue: the acknowledgement is made to fail by a trigger (Postgres's
/// sequences count refusals outside the refused transaction).
#[tokio::test]
async fn a_lost_acknowledgement_returns_the_message_when_its_lease_runs_out() {
    let backend = crate::util::backend::Backend::PostgresTable;
    let name = "a_lost_acknowledgement_returns_the_message_when_its_lease_runs_out";
    let Some(cluster) = Cluster::on(backend, name, FAST).await else {
        return;
    };
    cluster.import(
        "jobs:\n- id: slow\n  job: test_sleep\n  arguments: {seconds: 20}\n- id: quick\n  job: hello_world\n",
    );
    // The first acknowledgement is refused; later ones go through.
    cluster
        .sql(
            "CREATE SEQUENCE refused_acks;
             CREATE FUNCTION refuse_ack() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF nextval('refused_acks') = 1 THEN RAISE EXCEPTION 'ack refused for the test'; END IF;
               RETURN OLD;
             END $$;
             CREATE TRIGGER refuse_ack BEFORE DELETE ON queue_messages
             FOR EACH ROW EXECUTE FUNCTION refuse_ack();",
        )
        .await;
    let _worker = cluster.worker("w1", 2);
    cluster.run_now("slow");
    cluster
        .wait_until(
            "the slow run running",
            Duration::from_secs(30),
            "SELECT count(*) = 1 FROM job_runs WHERE job_name = 'slow' AND status = 'running'",
        )
        .await;
    // Its acknowledgement is lost; the worker still holds the slow run's message and renews
    // its lease: the quick one's message must not be renewed with it.
    cluster.run_now("quick");
    cluster
        .wait_until(
            "the quick run's message gone",
            Duration::from_secs(15),
            "SELECT count(*) = 1 FROM queue_messages",
        )
        .await;
    let runs = cluster.runs().await;
    let slow = runs.iter().find(|r| r.job_name == "slow").unwrap();
    assert_eq!(slow.status, "running", "{}", cluster.logs());
    let quick: Vec<_> = runs.iter().filter(|r| r.job_name == "quick").collect();
    assert_eq!(quick.len(), 1);
    assert_eq!(
        (quick[0].status.as_str(), quick[0].attempt),
        ("succeeded", 1)
    );
    assert_eq!(
        cluster.count("SELECT last_value FROM refused_acks").await,
        2,
        "one acknowledgement refused, the copy's acknowledged"
    );
}

crate::on_backends! {
    [sqlite_table: SqliteTable, postgres_table: PostgresTable]
    /// Table queue only: its messages live in the store's own database, so a due run is
    /// published by the transaction that creates it, with no outbox pass after it. (With
    /// RabbitMQ the outbox publishes and then marks: tested by the crash tests.)
    async fn with_the_table_queue_a_run_and_its_message_are_created_together(backend: Backend) {
        let Some(cluster) = Cluster::on(
            backend,
            "with_the_table_queue_a_run_and_its_message_are_created_together",
            &format!("{FAST}rabbitmq:\n  max_message_size: 4096\n"),
        )
        .await
        else {
            return;
        };
        cluster.import(&format!(
            "jobs:\n- id: now\n  job: hello_world\n  schedule: '0 0 1 1 *'\n  arguments: {{device: sw1}}\n\
             - id: huge\n  job: hello_world\n  schedule: '0 0 1 1 *'\n  arguments: {{blob: {}}}\n  on_failure: [now]\n",
            "x".repeat(5000)
        ));
        let id = cluster.run_now("now");
        let run = cluster.run(&id).await;
        assert_eq!(run.status, "queued");
        assert_eq!(
            run.published_at,
            Some(run.created_at),
            "published in the transaction that created it"
        );
        let messages = cluster.drain_queue().await;
        assert_eq!(messages.len(), 1, "one message");
        let message = jobschleuder::queue::JobMessage::parse(&messages[0]).unwrap();
        assert_eq!(message.run_id.map(|id| id.to_string()), Some(id.clone()));
        assert_eq!(
            (message.cmd.as_str(), message.job_name.as_deref(), message.attempt),
            ("hello_world", Some("now"), Some(0))
        );
        assert_eq!(message.args["device"], "sw1");

        // A message too large to queue stays out of the table queue: the command that created
        // the run records it dead at once, with the reason (no scheduler runs here), and the
        // run it chains on failure is published by that same transaction.
        let huge = cluster.run_now("huge");
        let run = cluster.run(&huge).await;
        assert_eq!(run.status, "dead", "{:?}", run.error);
        let error = run.error.clone().unwrap_or_default();
        assert!(error.contains("max_message_size"), "{error}");
        let chained: Vec<_> = cluster
            .runs()
            .await
            .into_iter()
            .filter(|r| r.trigger == "chain")
            .collect();
        assert_eq!(chained.len(), 1, "{chained:?}");
        assert_eq!(chained[0].published_at, Some(chained[0].created_at));
        let messages = cluster.drain_queue().await;
        assert_eq!(messages.len(), 1, "only the chained run's message");
        let message = jobschleuder::queue::JobMessage::parse(&messages[0]).unwrap();
        assert_eq!(message.run_id, Some(chained[0].id));

        // A message that cannot be queued: the run is not created either.
        let refuse = if backend.postgres() {
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'no messages today'; END $$;
             CREATE TRIGGER refuse BEFORE INSERT ON queue_messages FOR EACH ROW
             EXECUTE FUNCTION refuse();"
        } else {
            "CREATE TRIGGER refuse BEFORE INSERT ON queue_messages
             BEGIN SELECT RAISE(ABORT, 'no messages today'); END;"
        };
        cluster.sql(refuse).await;
        let error = crate::util::failure(
            crate::util::run(cluster.command().args(["scheduler", "--run-now", "now"])),
            1,
        );
        assert!(error.contains("no messages today"), "{error}");
        assert_eq!(cluster.runs().await.len(), 3, "no run without its message");
    }
}
