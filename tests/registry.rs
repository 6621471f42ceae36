//! `registry`: import, validation, re-import, adopting the original's database.

use serde_json::Value;

use crate::util::backend::Backend;
use crate::util::cluster::Cluster;
use crate::util::*;

/// Every row of the original's three tables, as text, in a stable order: what an import that
/// changes nothing must leave exactly as it was.
async fn registry_tables(cluster: &Cluster) -> Vec<String> {
    let mut rows = Vec::new();
    for table in ["jobs", "registry", "schedule"] {
        rows.extend(
            cluster
                .table_text(table)
                .await
                .into_iter()
                .map(|row| format!("{table} {row}")),
        );
    }
    rows
}

fn show_jobs_json(cluster: &Cluster) -> Value {
    let out = cluster.run_ok(&["registry", "--show-jobs", "--json"]);
    serde_json::from_str(&out).expect("--json prints JSON")
}

/// The names of `registry --show-jobs --json`'s jobs, in its order.
fn job_names(jobs: &Value) -> Vec<&str> {
    jobs.as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect()
}

crate::on_every_store! {
async fn import_the_seed_file_and_show_it(backend: Backend) {
    let Some(cluster) = Cluster::on_with_plugins(backend, "import_the_seed_file_and_show_it", "", "").await else {
        return;
    };
    let file = cluster.ws.write("jobs.yaml", SEED_JOBS);
    let out = success(run(cluster
        .command()
        .arg("registry")
        .arg("--import")
        .arg(&file)));
    assert!(
        out.contains("Imported 3 jobs") && out.contains("3 new"),
        "{out}"
    );

    let jobs = show_jobs_json(&cluster);
    let names = job_names(&jobs);
    assert_eq!(
        names,
        ["hello world", "backup devices", "retry failed backups"]
    );
    assert_eq!(jobs[1]["arguments"]["exclude"]["devices"][0], "labx.local");
    assert_eq!(jobs[1]["preprocessing"], "preprocessing_backup");

    // The seed's two-letter options and its table columns.
    let table = cluster.run_ok(&["registry", "-sj"]);
    assert!(table.starts_with("All Jobs"), "{table}");
    for column in ["id", "name", "job", "descr", "pre", "post", "args"] {
        assert!(table.contains(column), "{column} missing:\n{table}");
    }
    assert!(
        table.contains(r#"{"hello":"world"}"#),
        "args as compact JSON:\n{table}"
    );
    let registry = cluster.run_ok(&["registry", "-sr"]);
    assert!(
        registry.starts_with("Job registry") && registry.contains("*/1 * * * *"),
        "{registry}"
    );
    assert_eq!(cluster.count("SELECT count(*) FROM registry").await, 3);
}
}

/// A database trigger that refuses to write the job named `refused`.
fn refusing_trigger(backend: Backend) -> &'static str {
    if backend.postgres() {
        "CREATE FUNCTION refuse_job() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'refused by the test'; END $$;
         CREATE TRIGGER refuse_job BEFORE INSERT OR UPDATE ON jobs FOR EACH ROW
         WHEN (NEW.name = 'refused') EXECUTE FUNCTION refuse_job();"
    } else {
        "CREATE TRIGGER refuse_insert BEFORE INSERT ON jobs WHEN NEW.name = 'refused'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;
         CREATE TRIGGER refuse_update BEFORE UPDATE ON jobs WHEN NEW.name = 'refused'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;"
    }
}

crate::on_every_store! {
async fn every_kind_of_bad_file_changes_nothing(backend: Backend) {
    let Some(cluster) = Cluster::on_with_plugins(backend, "every_kind_of_bad_file_changes_nothing", "", "").await else {
        return;
    };
    cluster.import(SEED_JOBS);
    // A schedule, so that the schedule table has rows to keep too.
    cluster.run_ok(&["scheduler", "--init"]);
    let before = registry_tables(&cluster).await;
    assert!(before.iter().any(|r| r.starts_with("schedule ")));

    let cases: &[(&str, &str, &[&str])] = &[
        ("syntax", "jobs:\n- id: a\n  job: [unclosed\n", &["line 4 column 1"]),
        ("not a list", "jobs: 5\n", &["jobs"]),
        ("missing job", "jobs:\n- id: a\n", &["job 1", "missing `job`"]),
        ("missing id", "jobs:\n- job: x\n", &["missing `id`"]),
        ("bad cron", "jobs:\n- id: a\n  job: x\n  schedule: '61 * * * *'\n", &["job 1 (id \"a\"", "61 * * * *"]),
        ("bad zone", "jobs:\n- id: a\n  job: x\n  timezone: Moon/Base\n", &["Moon/Base"]),
        ("duplicate", "jobs:\n- id: a\n  job: x\n- id: a\n  job: y\n", &["duplicate id \"a\""]),
        ("wrong type", "jobs:\n- id: a\n  job: x\n  arguments: [1, 2]\n", &["arguments"]),
        ("unknown field", "jobs:\n- id: a\n  job: x\n  shedule: '* * * * *'\n", &["shedule"]),
        ("too long", &format!("jobs:\n- id: a\n  job: {}\n", "j".repeat(60)), &["longer than 50"]),
        (
            "several at once",
            "jobs:\n- id: ok\n  job: x\n- id: b\n  job: x\n  schedule: nope\n- id: c\n  job: x\n  misfire: never\n",
            &["2 problems", "job 2 (id \"b\"", "job 3 (id \"c\""],
        ),
    ];
    for (what, text, expected) in cases {
        let file = cluster.ws.write("bad.yaml", text);
        let err = failure(
            run(cluster
                .command()
                .arg("registry")
                .arg("--import")
                .arg(&file)),
            1,
        );
        assert!(err.contains("nothing was imported"), "{what}: {err}");
        for needle in *expected {
            assert!(
                err.contains(needle),
                "{what}: expected {needle:?} in:\n{err}"
            );
        }
        assert_eq!(
            registry_tables(&cluster).await,
            before,
            "{what}: the registry changed"
        );
    }

    // A file that passes validation but fails inside the import's transaction (here: the
    // database refuses its last job) changes nothing either: the transaction is atomic.
    cluster.sql(refusing_trigger(backend)).await;
    let valid = cluster.ws.write(
        "valid.yaml",
        "jobs:\n- id: new one\n  job: x\n  schedule: '* * * * *'\n- id: hello world\n  job: changed\n- id: refused\n  job: x\n",
    );
    let err = failure(
        run(cluster.command().args(["registry", "-i"]).arg(&valid)),
        1,
    );
    assert!(err.contains("refused by the test"), "{err}");
    assert_eq!(
        registry_tables(&cluster).await,
        before,
        "a failed import transaction changed the registry"
    );
    let missing = failure(
        run(cluster
            .command()
            .args(["registry", "-i", "no-such-file.yaml"])),
        1,
    );
    assert!(
        missing.contains("no-such-file.yaml") && missing.contains("cannot read"),
        "{missing}"
    );
}
}

crate::on_every_store! {
async fn reimport_replaces_jobs_keeps_names_and_run_history(backend: Backend) {
    let Some(cluster) = Cluster::on_with_plugins(backend, "reimport_replaces_jobs_keeps_names_and_run_history", "", "").await else {
        return;
    };
    cluster.import(SEED_JOBS);
    let job_id = "SELECT CAST(id AS BIGINT) FROM jobs WHERE name = 'hello world'";
    let old_id = cluster.count(job_id).await;
    let mut history = new_run(None, None);
    history.job_name = "hello world".into();
    history.job_id = Some(old_id as i32);
    let run_id = cluster.store.insert_runs(&[history]).await.unwrap()[0];
    cluster
        .sql(&format!(
            "UPDATE job_runs SET status = 'succeeded' WHERE id = {}",
            cluster.id(run_id)
        ))
        .await;

    let second = cluster.ws.write(
        "second.yaml",
        "jobs:\n- id: hello world\n  job: hello_world\n  schedule: '*/5 * * * *'\n- id: report\n  job: command\n",
    );
    let out = success(run(cluster.command().arg("registry").arg("-i").arg(&second)));
    assert!(
        out.contains("Imported 2 jobs") && out.contains("1 new, 1 replaced, 2 removed"),
        "{out}"
    );
    assert!(
        out.contains("1 scheduled"),
        "a job without schedule has no registry entry: {out}"
    );

    let jobs = show_jobs_json(&cluster);
    let names = job_names(&jobs);
    assert_eq!(names, ["hello world", "report"]);
    assert_eq!(
        cluster
            .count(
                "SELECT count(*) FROM registry r JOIN jobs j ON j.id = r.job
                 WHERE j.name = 'hello world' AND r.schedule = '*/5 * * * *'"
            )
            .await,
        1,
        "hello world keeps one entry, with the new schedule; report has none"
    );
    assert_eq!(cluster.count("SELECT count(*) FROM registry").await, 1);
    let runs = cluster.runs().await;
    assert_eq!(runs.len(), 1, "run history survives a re-import");
    assert_eq!(
        (
            runs[0].job_name.as_str(),
            runs[0].job.as_str(),
            runs[0].trigger.as_str(),
            runs[0].status.as_str()
        ),
        ("hello world", "hello_world", "manual", "succeeded"),
        "run history survives a re-import as it was"
    );
    assert_eq!(
        cluster
            .count("SELECT CAST(job_id AS BIGINT) FROM job_runs")
            .await,
        old_id,
        "the run still names the job's row"
    );
    assert_eq!(cluster.count(job_id).await, old_id, "a job that stays keeps its row id");
}
}

#[tokio::test]
async fn adopts_a_database_made_by_the_original() {
    crate::needs_postgres!("adopts_a_database_made_by_the_original");
    let db = TestDb::new().await;
    let pool = db.pool().await;
    // The original's DDL, as its documentation gives it, with rows.
    for statement in [
        "CREATE TABLE IF NOT EXISTS public.jobs (id serial, job character varying(50) NOT NULL, description character varying(100), preprocessing character varying(50), postprocessing character varying(50), arguments json, PRIMARY KEY (id))",
        "CREATE TABLE public.registry (id serial, job integer NOT NULL, schedule character varying(100) NOT NULL, PRIMARY KEY (id), CONSTRAINT job_id FOREIGN KEY (job) REFERENCES public.jobs (id) MATCH SIMPLE ON UPDATE NO ACTION ON DELETE CASCADE NOT VALID)",
        "CREATE TABLE public.schedule (id serial, job integer NOT NULL, next_run timestamp with time zone NOT NULL, PRIMARY KEY (id), CONSTRAINT job_id FOREIGN KEY (job) REFERENCES public.registry (id) MATCH SIMPLE ON UPDATE NO ACTION ON DELETE CASCADE NOT VALID)",
        "INSERT INTO jobs (id, job, description, preprocessing, postprocessing, arguments) VALUES (4, 'simple_config_backup', 'simple_config_backup', 'get_missing_devices', NULL, '{}')",
        "INSERT INTO registry (id, job, schedule) VALUES (4, 4, '*/1 * * * *')",
        "INSERT INTO schedule (job, next_run) VALUES (4, '2024-01-01 01:00:00+00'), (4, '2024-01-01 01:00:00+00')",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let ws = Workspace::new();
    let out = success(run(ws.jobschleuder(&db).args([
        "registry",
        "--show-jobs",
        "--json",
    ])));
    let jobs: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    assert_eq!(jobs[0]["id"], 4);
    assert_eq!(jobs[0]["job"], "simple_config_backup");
    assert_eq!(jobs[0]["preprocessing"], "get_missing_devices");
    assert_eq!(jobs[0]["name"], Value::Null);
    let registry = success(run(ws.jobschleuder(&db).args(["registry", "-sr"])));
    assert!(registry.contains("*/1 * * * *"), "{registry}");
    let schedule_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM schedule")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        schedule_rows, 2,
        "migrations never drop the original's rows"
    );

    // Running again (migrations already applied) changes nothing, and an import takes over.
    success(run(ws.jobschleuder(&db).args(["registry", "-sj"])));
    let file = ws.write("jobs.yaml", SEED_JOBS);
    let out = success(run(ws
        .jobschleuder(&db)
        .arg("registry")
        .arg("-i")
        .arg(&file)));
    assert!(out.contains("3 new, 0 replaced, 1 removed"), "{out}");
}

#[tokio::test]
async fn history_that_holds_a_slot_twice_is_migrated_without_losing_a_row() {
    crate::needs_postgres!("history_that_holds_a_slot_twice_is_migrated_without_losing_a_row");
    let db = TestDb::new().await;
    let pool = db.pool().await;
    // The schema before run identity by job name, with a slot that ran twice (under two
    // registry ids, as re-imports made possible).
    sqlx::raw_sql(include_str!(
        "../migrations/postgres/20261127000001_registry.sql"
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(
        "INSERT INTO job_runs (id, job_name, job, registry_id, trigger, status, scheduled_for, created_at) VALUES
           (gen_random_uuid(), 'nightly', 'x', 1, 'schedule', 'succeeded', '2026-01-01 03:00+00', '2026-01-01 03:00:01+00'),
           (gen_random_uuid(), 'nightly', 'x', 2, 'schedule', 'succeeded', '2026-01-01 03:00+00', '2026-01-01 03:00:02+00'),
           (gen_random_uuid(), 'nightly', 'x', 2, 'schedule', 'succeeded', '2026-01-02 03:00+00', '2026-01-02 03:00:01+00')",
    )
    .execute(&pool)
    .await
    .unwrap();
    jobschleuder::store::Store::from_pool(pool.clone())
        .await
        .expect("the migration copes with a slot held twice");
    let rows: Vec<(
        Option<chrono::DateTime<chrono::Utc>>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as("SELECT scheduled_for, created_at FROM job_runs ORDER BY created_at")
        .fetch_all(&pool)
        .await
        .unwrap();
    let slots: Vec<Option<String>> = rows
        .iter()
        .map(|(slot, _)| slot.map(|s| s.format("%m-%d").to_string()))
        .collect();
    assert_eq!(
        slots,
        [Some("01-01".to_string()), None, Some("01-02".to_string())],
        "the earliest run keeps the slot; every row stays"
    );
}

#[tokio::test]
async fn the_database_is_created_on_first_use() {
    crate::needs_postgres!("the_database_is_created_on_first_use");
    let db = TestDb::new().await;
    let ws = Workspace::new();
    // A database name that does not exist yet on the same server.
    let mut url = url::Url::parse(&db.url).unwrap();
    let fresh = format!("{}_new", db.name);
    url.set_path(&format!("/{fresh}"));
    let out = run(ws
        .jobschleuder(&db)
        .env("JOBSCHLEUDER_DATABASE_URL", url.as_str())
        .args(["registry", "-sj"]));
    let drop_fresh = async {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url())
            .await
            .unwrap();
        sqlx::Executor::execute(
            &mut conn,
            format!("DROP DATABASE IF EXISTS {fresh} WITH (FORCE)").as_str(),
        )
        .await
        .unwrap();
    };
    let ok = out.status.success();
    drop_fresh.await;
    assert!(ok, "{}", stderr(&out));
}

/// Prepared statements run many times with new values; planning each execution anew cost the
/// run path more than running it. Every pooled connection plans them once.
#[tokio::test]
async fn pooled_connections_plan_prepared_statements_once() {
    crate::needs_postgres!("pooled_connections_plan_prepared_statements_once");
    let db = TestDb::new().await;
    let text = format!("database:\n  url: {}\n  max_connections: 3\n", db.url);
    let config = jobschleuder::config::Config::from_str_with_env(
        std::path::Path::new("config.yaml"),
        &text,
        &|_| None,
    )
    .expect("config");
    let store = jobschleuder::store::Store::open(&config)
        .await
        .expect("database");
    let pool = store.pg_pool().expect("a Postgres store");
    // Three connections held at once: each one the pool opened.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(pool.acquire().await.expect("a connection"));
    }
    for conn in &mut held {
        let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        assert_eq!(mode, "force_generic_plan");
    }
}

#[tokio::test]
async fn old_finished_runs_are_pruned_and_others_kept() {
    crate::needs_postgres!("old_finished_runs_are_pruned_and_others_kept");
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let store = jobschleuder::store::Store::from_pool(pool.clone())
        .await
        .unwrap();
    sqlx::raw_sql(
        "INSERT INTO job_runs (id, job_name, job, trigger, status, created_at, finished_at) VALUES
           (gen_random_uuid(), 'old', 'x', 'manual', 'succeeded', now() - interval '40 days', now() - interval '40 days'),
           (gen_random_uuid(), 'old-failed', 'x', 'manual', 'failed', now() - interval '40 days', now() - interval '39 days'),
           (gen_random_uuid(), 'recent', 'x', 'manual', 'succeeded', now() - interval '1 day', now() - interval '1 day'),
           (gen_random_uuid(), 'stuck', 'x', 'manual', 'queued', now() - interval '40 days', NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let retention = std::time::Duration::from_secs(30 * 86400);
    // Bounded chunks: one call deletes at most its chunk.
    assert_eq!(store.prune_runs(retention, 1).await.unwrap(), 1);
    assert_eq!(store.prune_runs(retention, 1000).await.unwrap(), 1);
    assert_eq!(store.prune_runs(retention, 1000).await.unwrap(), 0);
    let left: Vec<String> = sqlx::query_scalar("SELECT job_name FROM job_runs ORDER BY job_name")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, ["recent", "stuck"]);
}

crate::on_every_store! {
async fn the_queues_in_use_are_those_jobs_name_and_the_default_for_the_rest(backend: Backend) {
    let Some(cluster) = Cluster::on(
        backend,
        "the_queues_in_use_are_those_jobs_name_and_the_default_for_the_rest",
        "",
    )
    .await
    else {
        return;
    };
    let store = &cluster.store;
    // No jobs: no queue in use (the scheduler then declares the default queue alone).
    assert!(store.queues_in_use("main").await.unwrap().is_empty());
    cluster.import(
        "jobs:\n\
         - id: a\n  job: hello_world\n  queue: zeta\n\
         - id: b\n  job: hello_world\n\
         - id: c\n  job: hello_world\n  queue: alpha\n\
         - id: d\n  job: hello_world\n  queue: zeta\n",
    );
    assert_eq!(
        store.queues_in_use("main").await.unwrap(),
        ["alpha", "main", "zeta"]
    );
    // Every job names a queue: the default one is not in use.
    cluster.import("jobs:\n- id: a\n  job: hello_world\n  queue: zeta\n");
    assert_eq!(store.queues_in_use("main").await.unwrap(), ["zeta"]);
}
}
