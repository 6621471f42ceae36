-- The table queue (`queue: postgres`, for sites without RabbitMQ): a message is a row until a
-- worker acknowledges it (deletes the row). A worker holds a row by its consumer tag until
-- `visible_at`, a lease it renews while the job runs; a worker that dies stops renewing, and
-- the row is handed out again when the lease runs out.
CREATE TABLE IF NOT EXISTS public.queue_messages
(
    id bigserial PRIMARY KEY,
    queue character varying(255) NOT NULL,
    body bytea NOT NULL,
    message_id text,
    -- Times it was handed out; past the delivery limit it is dead-lettered instead.
    deliveries integer NOT NULL DEFAULT 0,
    visible_at timestamp with time zone NOT NULL DEFAULT now(),
    consumer text,
    created_at timestamp with time zone NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS queue_messages_queue_idx ON public.queue_messages (queue, id);
CREATE INDEX IF NOT EXISTS queue_messages_consumer_idx
    ON public.queue_messages (consumer) WHERE consumer IS NOT NULL;

-- Messages no worker could use (unparsable, unknown run, handed out too often), kept for an
-- operator: `runs --dead-letters` lists them.
CREATE TABLE IF NOT EXISTS public.queue_dead_letters
(
    id bigint PRIMARY KEY,
    queue character varying(255) NOT NULL,
    body bytea NOT NULL,
    message_id text,
    deliveries integer NOT NULL,
    reason text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    dead_at timestamp with time zone NOT NULL DEFAULT now()
);
