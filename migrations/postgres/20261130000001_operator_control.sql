-- Operator control: pausing entries, overlap policy, cancelling runs, backfill, chains, jitter.

-- A paused registry entry fires nothing; its state lives on the entry, which an import keeps
-- (entries are matched by job name), so a pause survives re-imports.
ALTER TABLE public.registry ADD COLUMN IF NOT EXISTS paused boolean NOT NULL DEFAULT false;
ALTER TABLE public.registry ADD COLUMN IF NOT EXISTS paused_note text;
ALTER TABLE public.registry ADD COLUMN IF NOT EXISTS paused_at timestamp with time zone;

-- What a slot does while a run of its job is queued or running; the jobs started when a run
-- ends (JSON lists of job names, NULL for none); the spread of a slot's start.
ALTER TABLE public.jobs ADD COLUMN IF NOT EXISTS concurrency character varying(16) NOT NULL DEFAULT 'allow';
ALTER TABLE public.jobs ADD COLUMN IF NOT EXISTS on_success jsonb;
ALTER TABLE public.jobs ADD COLUMN IF NOT EXISTS on_failure jsonb;
ALTER TABLE public.jobs ADD COLUMN IF NOT EXISTS jitter_seconds double precision;

-- New statuses (`skipped`: a slot that fired while its job still ran, with `concurrency:
-- forbid`; `cancelled`: stopped by an operator or replaced) and triggers (`chain`, `backfill`).
ALTER TABLE public.job_runs DROP CONSTRAINT IF EXISTS job_runs_trigger_check;
ALTER TABLE public.job_runs ADD CONSTRAINT job_runs_trigger_check
    CHECK (trigger IN ('schedule', 'manual', 'webhook', 'chain', 'backfill'));
ALTER TABLE public.job_runs DROP CONSTRAINT IF EXISTS job_runs_status_check;
ALTER TABLE public.job_runs ADD CONSTRAINT job_runs_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'dead', 'skipped', 'cancelled'));

-- A cancel asked for while the run was running, and why: its worker stops it and records it
-- cancelled with that reason.
ALTER TABLE public.job_runs ADD COLUMN IF NOT EXISTS cancel_requested_at timestamp with time zone;
ALTER TABLE public.job_runs ADD COLUMN IF NOT EXISTS cancel_reason text;

-- A slot's identity covers backfilled runs too: a backfill creates nothing for a slot that has
-- a run (scheduled or backfilled), and the scheduler nothing for a backfilled slot.
CREATE UNIQUE INDEX IF NOT EXISTS job_runs_slot_key
    ON public.job_runs (job_name, scheduled_for)
    WHERE trigger IN ('schedule', 'backfill') AND parent_id IS NULL;
DROP INDEX IF EXISTS public.job_runs_scheduled_slot_name_key;

-- The runs of a job that are queued or running (overlap policy, cancel requests): small, as
-- it holds only live runs.
CREATE INDEX IF NOT EXISTS job_runs_live_idx
    ON public.job_runs (job_name) WHERE status IN ('queued', 'running');
