//! `/metrics`: Prometheus text format, every name prefixed `jobschleuder_`.
//!
//! A scrape only encodes what is in memory. A collector task reads, every few seconds, what
//! changed since its last look: runs created and runs finished (index ranges on their
//! timestamps), the oldest queued run (the first entries of the outbox's indexes) and the
//! queues' depths (the broker). The history itself is never scanned.

use chrono::{DateTime, Utc};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::store::{Store, StoreError};

/// The collector stays this far behind the database's clock, so that a run is counted once its
/// transaction committed: `created_at` and `finished_at` are the time a transaction began, and
/// one that commits more than this later is missed (the counters are a view, not the record).
const SETTLE: chrono::TimeDelta = chrono::TimeDelta::seconds(5);
/// Finished runs read per query; a busier interval is read in several.
const FINISHED_CHUNK: u32 = 10_000;

pub struct Metrics {
    registry: Registry,
    pub webhook_requests: IntCounterVec,
    pub runs_created: IntCounterVec,
    pub runs_finished: IntCounterVec,
    pub run_duration: HistogramVec,
    pub firing_lag: Histogram,
    pub queue_depth: IntGaugeVec,
    pub oldest_queued: Gauge,
    pub database_up: IntGauge,
    pub broker_up: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let webhook_requests = counter(
            "jobschleuder_webhook_requests_total",
            "Webhook requests answered, by hook and HTTP status code.",
            &["hook", "code"],
        );
        let runs_created = counter(
            "jobschleuder_runs_created_total",
            "Runs created, by trigger (schedule, manual, webhook, chain, backfill).",
            &["trigger"],
        );
        let runs_finished = counter(
            "jobschleuder_runs_finished_total",
            "Runs finished, by job and status (succeeded, failed, dead, skipped, cancelled).",
            &["job", "status"],
        );
        let run_duration = HistogramVec::new(
            HistogramOpts::new(
                "jobschleuder_run_duration_seconds",
                "How long finished runs ran, by job.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            ]),
            &["job"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(run_duration.clone()))
            .expect("unique metric");
        let firing_lag = Histogram::with_opts(
            HistogramOpts::new(
                "jobschleuder_firing_lag_seconds",
                "From a run's time (its scheduled time, or its creation) to its publication.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(firing_lag.clone()))
            .expect("unique metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "jobschleuder_queue_depth",
                "Messages ready in each queue, as the broker last said.",
            ),
            &["queue"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(queue_depth.clone()))
            .expect("unique metric");
        let oldest_queued = Gauge::new(
            "jobschleuder_oldest_queued_run_age_seconds",
            "How long the oldest queued run whose time has come has waited (0: none waits).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(oldest_queued.clone()))
            .expect("unique metric");
        let up = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let database_up = up(
            "jobschleuder_database_up",
            "1 when the database answered the last check.",
        );
        let broker_up = up(
            "jobschleuder_broker_up",
            "1 when RabbitMQ answered the last check.",
        );
        Metrics {
            registry,
            webhook_requests,
            runs_created,
            runs_finished,
            run_duration,
            firing_lag,
            queue_depth,
            oldest_queued,
            database_up,
            broker_up,
        }
    }

    /// The text a scrape gets.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding to memory");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Where the collector's last look ended.
pub struct Collector {
    created_after: DateTime<Utc>,
    finished_after: DateTime<Utc>,
}

impl Collector {
    /// Starts counting from the database's clock now.
    pub async fn start(store: &Store) -> Result<Collector, StoreError> {
        let now = store.now().await? - SETTLE;
        Ok(Collector {
            created_after: now,
            finished_after: now,
        })
    }

    /// Adds what the database says changed since the last look.
    pub async fn collect(&mut self, store: &Store, metrics: &Metrics) -> Result<(), StoreError> {
        let until = store.now().await? - SETTLE;
        if until > self.created_after {
            for (trigger, count) in store
                .runs_created_between(self.created_after, until)
                .await?
            {
                metrics
                    .runs_created
                    .with_label_values(&[trigger.as_str()])
                    .inc_by(u64::try_from(count).unwrap_or(0));
            }
            self.created_after = until;
        }
        loop {
            let mut finished = store
                .runs_finished_between(self.finished_after, until, FINISHED_CHUNK)
                .await?;
            let full = finished.len() == FINISHED_CHUNK as usize;
            if full {
                // The chunk may end amid runs of one instant (a worker records a batch at
                // once): those are read again by the next query, which starts after the
                // last instant counted here. A chunk of one instant only is counted whole.
                let boundary = finished.last().map(|r| r.finished_at);
                if finished.iter().any(|r| Some(r.finished_at) != boundary) {
                    finished.retain(|r| Some(r.finished_at) != boundary);
                }
            }
            for run in &finished {
                metrics
                    .runs_finished
                    .with_label_values(&[run.job_name.as_str(), run.status.as_str()])
                    .inc();
                if let Some(duration) = run.duration {
                    metrics
                        .run_duration
                        .with_label_values(&[run.job_name.as_str()])
                        .observe(duration.max(0.0));
                }
                if let Some(lag) = run.lag {
                    metrics.firing_lag.observe(lag.max(0.0));
                }
            }
            match finished.last() {
                Some(last) if full => self.finished_after = last.finished_at,
                _ => {
                    self.finished_after = until;
                    break;
                }
            }
        }
        metrics
            .oldest_queued
            .set(store.oldest_queued_age().await?.unwrap_or(0.0).max(0.0));
        Ok(())
    }
}
