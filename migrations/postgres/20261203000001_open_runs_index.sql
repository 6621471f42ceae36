-- A run's steps (published, claimed, finished) rewrite its row. An update that changes no
-- column an index reads (as key or in its WHERE) is a heap-only (HOT) update: the new row
-- version goes on the same page, no index gets an entry, and the old version is reclaimed
-- when the page is next read, without VACUUM. The three partial indexes by state (status,
-- published_at, claim_token) made every step a full update, one new entry in each of the
-- table's indexes: four row versions and twenty index entries per run, Postgres's largest
-- cost on the run path.
--
-- One index of open runs replaces them. A run is open (queued or running) exactly while its
-- `finished_at` is NULL, so publishing and claiming it change nothing this index reads, and
-- only its end does. The outbox, the sweeps and the overlap policy read the open runs
-- through it; metrics and pruning read finished runs through `job_runs_finished_at_idx`.
UPDATE public.job_runs SET finished_at = NULL
WHERE status IN ('queued', 'running') AND finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS job_runs_open_idx
    ON public.job_runs (created_at) WHERE finished_at IS NULL;
DROP INDEX IF EXISTS public.job_runs_unpublished_idx;
DROP INDEX IF EXISTS public.job_runs_running_idx;
DROP INDEX IF EXISTS public.job_runs_queued_published_idx;
-- Room on each page for a run's later versions: a HOT update needs free space on the page
-- that holds the row. Applies to pages filled from now on.
ALTER TABLE public.job_runs SET (fillfactor = 60);
