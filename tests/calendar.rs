//! Time zones, daylight saving time and missed runs through the whole path: a job file is
//! imported, and scheduling passes run against each store with an injected "now" that steps
//! across the DST changes of 2026 in Europe/Berlin.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, TimeZone, Utc};
use jobschleuder::config::Config;
use jobschleuder::scheduler::create_due_runs;
use jobschleuder::store::Store;

use crate::on_every_backend;
use crate::util::backend::Backend;
use crate::util::TestDb;

fn utc(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

/// The store of `backend` with `jobs` imported; `None` (after a notice) without its server.
/// What the store holds lives as long as the returned guards.
async fn store_with(
    backend: Backend,
    test: &str,
    jobs: &str,
) -> Option<((TestDb, tempfile::TempDir), Store, Config)> {
    if backend.unavailable(test).is_some() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (db, store) = if backend.postgres() {
        let db = TestDb::new().await;
        let store = Store::from_pool(db.pool().await).await.unwrap();
        (db, store)
    } else {
        let text = format!(
            "database:\n  path: {}\n",
            dir.path().join("test.db").display()
        );
        let config = Config::from_str_with_env(Path::new("c.yaml"), &text, &|_| None).unwrap();
        (
            TestDb::none(),
            Store::connect(&config.database).await.unwrap(),
        )
    };
    let parsed = jobschleuder::jobfile::parse(Path::new("jobs.yaml"), jobs, None).unwrap();
    store
        .replace_registry(&parsed, &mut |_, _| {})
        .await
        .unwrap();
    let config =
        Config::from_str_with_env(&PathBuf::from("config.yaml"), "timezone: UTC\n", &|_| None)
            .unwrap();
    Some(((db, dir), store, config))
}

/// Passes every `step` from `from` to `to` (inclusive).
async fn step(
    store: &Store,
    config: &Config,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Duration,
) {
    let mut at = from;
    while at <= to {
        create_due_runs(store, config, Some(at)).await.unwrap();
        at += step;
    }
}

async fn slots(store: &Store, job: &str) -> Vec<DateTime<Utc>> {
    let mut slots: Vec<DateTime<Utc>> = store
        .runs(Some(job), None, None, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| r.scheduled_for)
        .collect();
    slots.sort();
    slots
}

on_every_backend! {
async fn a_berlin_job_runs_once_a_day_across_both_dst_changes(backend: Backend) {
    let Some((_db, store, config)) = store_with(
        backend,
        "a_berlin_job_runs_once_a_day_across_both_dst_changes",
        "jobs:\n\
         - id: nightly\n  job: hello_world\n  schedule: '30 2 * * *'\n  timezone: Europe/Berlin\n\
         - id: quarterly\n  job: hello_world\n  schedule: '*/15 * * * *'\n  timezone: Europe/Berlin\n",
    )
    .await
    else {
        return;
    };
    // Spring: 02:00 becomes 03:00 on 2026-03-29. A pass every 5 minutes.
    step(
        &store,
        &config,
        utc("2026-03-28T12:00:00Z"),
        utc("2026-03-30T12:00:00Z"),
        Duration::minutes(5),
    )
    .await;
    assert_eq!(
        slots(&store, "nightly").await,
        [
            // The skipped 02:30 runs at the first valid instant after it, 03:00 CEST.
            utc("2026-03-29T01:00:00Z"),
            utc("2026-03-30T00:30:00Z"),
        ]
    );
    // An interval job follows real elapsed time: 4 runs an hour, 23 hours that day.
    let day: Vec<_> = slots(&store, "quarterly")
        .await
        .into_iter()
        .filter(|t| *t >= utc("2026-03-28T23:00:00Z") && *t < utc("2026-03-29T22:00:00Z"))
        .collect();
    assert_eq!(day.len(), 23 * 4);
    assert!(day.windows(2).all(|w| w[1] - w[0] == Duration::minutes(15)));

    // Autumn: 03:00 becomes 02:00 on 2026-10-25; 02:30 happens twice and runs once.
    step(
        &store,
        &config,
        utc("2026-10-24T12:00:00Z"),
        utc("2026-10-26T12:00:00Z"),
        Duration::minutes(5),
    )
    .await;
    let autumn: Vec<_> = slots(&store, "nightly")
        .await
        .into_iter()
        .filter(|t| *t >= utc("2026-10-01T00:00:00Z"))
        .collect();
    assert_eq!(
        autumn,
        [utc("2026-10-25T00:30:00Z"), utc("2026-10-26T01:30:00Z")]
    );
    let day: Vec<_> = slots(&store, "quarterly")
        .await
        .into_iter()
        .filter(|t| *t >= utc("2026-10-24T22:00:00Z") && *t < utc("2026-10-25T23:00:00Z"))
        .collect();
    assert_eq!(day.len(), 25 * 4, "25 hours that day");
}
}

on_every_backend! {
async fn runs_missed_for_hours_run_once_or_not_at_all_as_each_job_says(backend: Backend) {
    let Some((_db, store, config)) = store_with(
        backend,
        "runs_missed_for_hours_run_once_or_not_at_all_as_each_job_says",
        "jobs:\n\
         - id: once\n  job: hello_world\n  schedule: '0 * * * *'\n  misfire: run_once\n\
         - id: skip\n  job: hello_world\n  schedule: '0 * * * *'\n  misfire: skip\n\
         - id: berlin\n  job: hello_world\n  schedule: '0 6 * * *'\n  timezone: Europe/Berlin\n  misfire: skip\n",
    )
    .await
    else {
        return;
    };
    let start = Utc.with_ymd_and_hms(2026, 6, 1, 9, 30, 0).unwrap();
    // The first pass schedules every entry; then the scheduler is down for five hours.
    create_due_runs(&store, &config, Some(start)).await.unwrap();
    let back = start + Duration::hours(5);
    create_due_runs(&store, &config, Some(back)).await.unwrap();
    // run_once: the first missed slot runs once; the rest of the downtime is not made up.
    assert_eq!(slots(&store, "once").await, [utc("2026-06-01T10:00:00Z")]);
    // skip: nothing for the downtime.
    assert!(slots(&store, "skip").await.is_empty());
    // Both go on from now: the next slot is 15:00, each runs once, on time.
    create_due_runs(&store, &config, Some(utc("2026-06-01T15:00:10Z")))
        .await
        .unwrap();
    assert_eq!(
        slots(&store, "once").await,
        [utc("2026-06-01T10:00:00Z"), utc("2026-06-01T15:00:00Z")]
    );
    assert_eq!(slots(&store, "skip").await, [utc("2026-06-01T15:00:00Z")]);
    // A zone's daily job skipped while down: none that day, the next day's at 06:00 CEST.
    create_due_runs(&store, &config, Some(utc("2026-06-02T10:00:00Z")))
        .await
        .unwrap();
    assert!(slots(&store, "berlin").await.is_empty());
    create_due_runs(&store, &config, Some(utc("2026-06-03T04:00:30Z")))
        .await
        .unwrap();
    assert_eq!(slots(&store, "berlin").await, [utc("2026-06-03T04:00:00Z")]);
}
}
