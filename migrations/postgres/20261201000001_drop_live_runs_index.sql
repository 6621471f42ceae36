-- The partial index on live runs by job name (added with the overlap policy) made the planner
-- read every live run for each claim instead of looking claimed runs up by id, which cost a
-- third of the throughput. The overlap policy reads the partial indexes that already hold live
-- runs instead.
DROP INDEX IF EXISTS public.job_runs_live_idx;
