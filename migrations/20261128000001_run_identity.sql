-- A scheduled run's identity is its job's name and its scheduled time: names survive imports,
-- registry row ids need not. Any scheduler, restart, import or re-published message that tries
-- to create the same slot again creates nothing.
DROP INDEX IF EXISTS public.job_runs_scheduled_slot_key;
CREATE UNIQUE INDEX IF NOT EXISTS job_runs_scheduled_slot_name_key
    ON public.job_runs (job_name, scheduled_for)
    WHERE trigger = 'schedule' AND parent_id IS NULL;

-- Which claim statement set a run running: a claim retried after a lost reply finds its own
-- first try instead of mistaking it for another worker's.
ALTER TABLE public.job_runs ADD COLUMN IF NOT EXISTS claim_nonce uuid;

-- Indexes that keep the scheduler's periodic work independent of the size of the history:
-- the orphan sweep reads running runs only,
CREATE INDEX IF NOT EXISTS job_runs_running_idx
    ON public.job_runs (claim_token) WHERE status = 'running';
-- the republishing of long-unclaimed runs reads published, queued runs only,
CREATE INDEX IF NOT EXISTS job_runs_queued_published_idx
    ON public.job_runs (published_at) WHERE status = 'queued' AND published_at IS NOT NULL;
-- and pruning walks finished top-level runs by their end (children go with their parent).
CREATE INDEX IF NOT EXISTS job_runs_finished_idx
    ON public.job_runs (finished_at) WHERE parent_id IS NULL AND finished_at IS NOT NULL;
