-- The original's three tables, exactly as it created them, so that a database made by the
-- original is adopted as it is: nothing here drops or rewrites existing rows.
CREATE TABLE IF NOT EXISTS public.jobs
(
    id serial,
    job character varying(50) NOT NULL,
    description character varying(100),
    preprocessing character varying(50),
    postprocessing character varying(50),
    arguments json,
    PRIMARY KEY (id)
);

CREATE TABLE IF NOT EXISTS public.registry
(
    id serial,
    job integer NOT NULL,
    schedule character varying(100) NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT job_id FOREIGN KEY (job)
        REFERENCES public.jobs (id) MATCH SIMPLE
        ON UPDATE NO ACTION
        ON DELETE CASCADE
        NOT VALID
);

CREATE TABLE IF NOT EXISTS public.schedule
(
    id serial,
    job integer NOT NULL,
    next_run timestamp with time zone NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT job_id FOREIGN KEY (job)
        REFERENCES public.registry (id) MATCH SIMPLE
        ON UPDATE NO ACTION
        ON DELETE CASCADE
        NOT VALID
);

-- Added columns are nullable or defaulted, so the original's rows stay valid.
-- The job's stable name: the job file's `id` (row ids change on every import, names do not).
ALTER TABLE public.jobs ADD COLUMN IF NOT EXISTS name character varying(200);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_name_key ON public.jobs (name);
ALTER TABLE public.jobs ADD COLUMN IF NOT EXISTS timeout_seconds double precision;
ALTER TABLE public.jobs ADD COLUMN IF NOT EXISTS retries integer NOT NULL DEFAULT 0;
ALTER TABLE public.jobs ADD COLUMN IF NOT EXISTS queue character varying(255);

-- The zone the schedule is read in (NULL: the configured zone) and what to do with missed runs.
ALTER TABLE public.registry ADD COLUMN IF NOT EXISTS timezone character varying(64);
ALTER TABLE public.registry ADD COLUMN IF NOT EXISTS misfire character varying(16) NOT NULL DEFAULT 'run_once';

CREATE INDEX IF NOT EXISTS registry_job_idx ON public.registry (job);
CREATE INDEX IF NOT EXISTS schedule_job_idx ON public.schedule (job);
CREATE INDEX IF NOT EXISTS schedule_next_run_idx ON public.schedule (next_run);

-- A run is a row before it is a message. No foreign keys to jobs or registry: the history
-- outlives re-imports, which replace those rows.
CREATE TABLE IF NOT EXISTS public.job_runs
(
    id uuid PRIMARY KEY,
    job_name character varying(200) NOT NULL,
    job character varying(50) NOT NULL,
    job_id integer,
    registry_id integer,
    trigger character varying(16) NOT NULL
        CHECK (trigger IN ('schedule', 'manual', 'webhook')),
    status character varying(16) NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'dead')),
    attempt integer NOT NULL DEFAULT 0,
    worker character varying(200),
    -- The claiming worker process's lease: it holds a Postgres advisory lock on this key while
    -- it lives, so a re-delivered message is taken over only when its worker is gone.
    claim_token integer,
    queue character varying(255),
    arguments jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- What the run needs besides its arguments, copied from the job when the run is created,
    -- so that a run is complete on its own (re-publishing it needs no job row).
    preprocessing character varying(50),
    postprocessing character varying(50),
    timeout_seconds double precision,
    max_retries integer NOT NULL DEFAULT 0,
    scheduled_for timestamp with time zone,
    not_before timestamp with time zone,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    published_at timestamp with time zone,
    started_at timestamp with time zone,
    finished_at timestamp with time zone,
    result jsonb,
    error text,
    parent_id uuid REFERENCES public.job_runs (id) ON DELETE CASCADE
);

-- A scheduled run's identity: one run per (registry entry, scheduled time), whoever schedules it.
CREATE UNIQUE INDEX IF NOT EXISTS job_runs_scheduled_slot_key
    ON public.job_runs (registry_id, scheduled_for)
    WHERE trigger = 'schedule' AND parent_id IS NULL;
-- The outbox: queued runs not yet confirmed by the broker.
CREATE INDEX IF NOT EXISTS job_runs_unpublished_idx
    ON public.job_runs (created_at)
    WHERE status = 'queued' AND published_at IS NULL;
-- Few indexes on purpose: every state change of a run rewrites each of them.
CREATE INDEX IF NOT EXISTS job_runs_job_name_idx ON public.job_runs (job_name, created_at DESC);
CREATE INDEX IF NOT EXISTS job_runs_created_idx ON public.job_runs (created_at DESC);
CREATE INDEX IF NOT EXISTS job_runs_parent_idx ON public.job_runs (parent_id) WHERE parent_id IS NOT NULL;
