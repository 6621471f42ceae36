-- Keys of webhook requests, so that a sender's repeats and bursts become one run: a dedupe key
-- answers its first request's runs for a while, a debounce key gathers a burst into one run
-- that starts when the window ends. They live here, not in a listener's memory, so that every
-- listener (and a restarted one) sees them. `key` is what the hook's template rendered, or its
-- SHA-256 when that is long.
CREATE TABLE IF NOT EXISTS public.webhook_keys
(
    hook character varying(200) NOT NULL,
    kind character varying(16) NOT NULL CHECK (kind IN ('dedupe', 'debounce')),
    key text NOT NULL,
    run_ids uuid[] NOT NULL,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    expires_at timestamp with time zone NOT NULL,
    PRIMARY KEY (hook, kind, key)
);
CREATE INDEX IF NOT EXISTS webhook_keys_expires_idx ON public.webhook_keys (expires_at);

-- Metrics read the runs that finished since their last look, fan-out children included, in
-- finishing order; pruning walks the same index for finished top-level runs.
DROP INDEX IF EXISTS public.job_runs_finished_idx;
CREATE INDEX IF NOT EXISTS job_runs_finished_at_idx
    ON public.job_runs (finished_at) WHERE finished_at IS NOT NULL;
