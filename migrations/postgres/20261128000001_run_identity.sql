-- A scheduled run's identity is its job's name and its scheduled time: names survive imports,
-- registry row ids need not. Any scheduler, restart, import or re-published message that tries
-- to create the same slot again creates nothing.
DROP INDEX IF EXISTS public.job_runs_scheduled_slot_key;
-- History written before this rule may hold a slot twice (it ran twice: the bug this index
-- prevents). The earliest run keeps the slot; the later ones keep every other column but their
-- scheduled time, so that the unique index can be built and no history row is lost.
UPDATE public.job_runs d SET scheduled_for = NULL
FROM (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY job_name, scheduled_for ORDER BY created_at, id) AS n
        FROM public.job_runs
        WHERE trigger = 'schedule' AND parent_id IS NULL AND scheduled_for IS NOT NULL
    ) ranked
    WHERE n > 1
) later
WHERE d.id = later.id;
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
