-- The same tables as on Postgres, in SQLite's types. Times are RFC 3339 text in UTC (they sort
-- as they compare); run ids are 16-byte blobs; JSON columns hold JSON text.

-- AUTOINCREMENT: a job's or entry's id is never given to another one later (as with serial on
-- Postgres), so a hook or a command that names a job by id never reaches another job.
CREATE TABLE IF NOT EXISTS jobs
(
    id integer PRIMARY KEY AUTOINCREMENT,
    job text NOT NULL,
    description text,
    preprocessing text,
    postprocessing text,
    arguments text,
    -- The job's stable name: the job file's `id` (row ids change on imports, names do not).
    name text UNIQUE,
    timeout_seconds real,
    retries integer NOT NULL DEFAULT 0,
    queue text,
    concurrency text NOT NULL DEFAULT 'allow',
    on_success text,
    on_failure text,
    jitter_seconds real
);

CREATE TABLE IF NOT EXISTS registry
(
    id integer PRIMARY KEY AUTOINCREMENT,
    job integer NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    schedule text NOT NULL,
    timezone text,
    misfire text NOT NULL DEFAULT 'run_once',
    paused integer NOT NULL DEFAULT 0,
    paused_note text,
    paused_at text
);
CREATE INDEX IF NOT EXISTS registry_job_idx ON registry (job);

CREATE TABLE IF NOT EXISTS schedule
(
    id integer PRIMARY KEY AUTOINCREMENT,
    job integer NOT NULL REFERENCES registry (id) ON DELETE CASCADE,
    next_run text NOT NULL
);
CREATE INDEX IF NOT EXISTS schedule_job_idx ON schedule (job);
CREATE INDEX IF NOT EXISTS schedule_next_run_idx ON schedule (next_run);

CREATE TABLE IF NOT EXISTS job_runs
(
    id blob PRIMARY KEY,
    job_name text NOT NULL,
    job text NOT NULL,
    job_id integer,
    registry_id integer,
    trigger text NOT NULL
        CHECK (trigger IN ('schedule', 'manual', 'webhook', 'chain', 'backfill')),
    status text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'dead', 'skipped', 'cancelled')),
    attempt integer NOT NULL DEFAULT 0,
    worker text,
    -- The claiming worker process's lease (a row of worker_leases while the process lives).
    claim_token integer,
    claim_nonce blob,
    queue text,
    arguments text NOT NULL DEFAULT '{}',
    preprocessing text,
    postprocessing text,
    timeout_seconds real,
    max_retries integer NOT NULL DEFAULT 0,
    scheduled_for text,
    not_before text,
    created_at text NOT NULL,
    published_at text,
    started_at text,
    finished_at text,
    result text,
    error text,
    parent_id blob REFERENCES job_runs (id) ON DELETE CASCADE,
    cancel_requested_at text,
    cancel_reason text
);
-- A slot's identity: one run per job name and scheduled time, scheduled or backfilled.
CREATE UNIQUE INDEX IF NOT EXISTS job_runs_slot_key
    ON job_runs (job_name, scheduled_for)
    WHERE trigger IN ('schedule', 'backfill') AND parent_id IS NULL;
-- The outbox: queued runs not yet in the queue.
CREATE INDEX IF NOT EXISTS job_runs_unpublished_idx
    ON job_runs (created_at) WHERE status = 'queued' AND published_at IS NULL;
CREATE INDEX IF NOT EXISTS job_runs_job_name_idx ON job_runs (job_name, created_at DESC);
CREATE INDEX IF NOT EXISTS job_runs_created_idx ON job_runs (created_at DESC);
CREATE INDEX IF NOT EXISTS job_runs_parent_idx ON job_runs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS job_runs_running_idx ON job_runs (claim_token) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS job_runs_queued_published_idx
    ON job_runs (published_at) WHERE status = 'queued' AND published_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS job_runs_finished_at_idx
    ON job_runs (finished_at) WHERE finished_at IS NOT NULL;

-- Webhook keys (dedupe and debounce); run_ids is a JSON list of run ids.
CREATE TABLE IF NOT EXISTS webhook_keys
(
    hook text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('dedupe', 'debounce')),
    key text NOT NULL,
    run_ids text NOT NULL,
    created_at text NOT NULL,
    expires_at text NOT NULL,
    PRIMARY KEY (hook, kind, key)
);
CREATE INDEX IF NOT EXISTS webhook_keys_expires_idx ON webhook_keys (expires_at);

-- A worker process's lease: its row, whose heartbeat the process renews every few seconds.
-- A run claimed under a lease that ran out (its worker died) is taken over.
CREATE TABLE IF NOT EXISTS worker_leases
(
    token integer PRIMARY KEY,
    worker text NOT NULL,
    expires_at text NOT NULL
);

-- The table queue (see the Postgres migration of the same name). AUTOINCREMENT: an id is
-- never reused, so a late acknowledgement can never delete another message.
CREATE TABLE IF NOT EXISTS queue_messages
(
    id integer PRIMARY KEY AUTOINCREMENT,
    queue text NOT NULL,
    body blob NOT NULL,
    message_id text,
    deliveries integer NOT NULL DEFAULT 0,
    visible_at text NOT NULL,
    consumer text,
    created_at text NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_messages_queue_idx ON queue_messages (queue, id);
CREATE INDEX IF NOT EXISTS queue_messages_consumer_idx
    ON queue_messages (consumer) WHERE consumer IS NOT NULL;

CREATE TABLE IF NOT EXISTS queue_dead_letters
(
    id integer PRIMARY KEY,
    queue text NOT NULL,
    body blob NOT NULL,
    message_id text,
    deliveries integer NOT NULL,
    reason text NOT NULL,
    created_at text NOT NULL,
    dead_at text NOT NULL
);
