-- The audit ledger (CONTRACT.md §6). Applied by `gateway migrate` in one transaction.
--
-- No foreign keys on purpose: rows reach Postgres from several nodes, after outages and journal
-- replays, in any order across tables (a socket's close can land before its open), and the
-- retention job deletes by time; every row stands on its own, keyed by the UUID its writer made.

-- Every client WebSocket: one row, inserted when it opens, completed when it closes.
CREATE TABLE sockets (
    socket_id             text PRIMARY KEY,
    node                  text,
    key_id                text,
    key_prefix            text,
    team_id               text,
    model                 text,            -- the locked model, openai/<model>
    opened_at             timestamptz,
    closed_at             timestamptz,
    closed_by             text CHECK (closed_by IN ('client', 'gateway')),
    close_code            integer,         -- on the client socket
    close_reason          text,
    upstream_close_code   integer,         -- the last upstream socket's
    upstream_close_reason text,
    turns                 integer CHECK (turns >= 0),
    -- Idempotency: the ledger row that filled each half; a replayed half changes nothing.
    open_row_id           uuid,
    close_row_id          uuid
);

-- Close codes of the last hour; the retention job's scan.
CREATE INDEX sockets_closed_at_idx ON sockets (closed_at);
-- Sockets that never closed (their node died) are pruned by their opening time.
CREATE INDEX sockets_opened_at_idx ON sockets (opened_at) WHERE closed_at IS NULL;

-- Every response.create (accepted or refused), POST /v1/responses and compaction.
CREATE TABLE turns (
    row_id                uuid PRIMARY KEY,
    socket_id             text,            -- NULL over HTTP
    node                  text NOT NULL,
    key_id                text NOT NULL,
    key_prefix            text NOT NULL,
    team_id               text NOT NULL,
    transport             text NOT NULL CHECK (transport IN ('ws', 'http', 'compact')),
    model                 text,            -- openai/<model> as asked; NULL if it was missing
    received_at           timestamptz NOT NULL,
    accepted              boolean NOT NULL,
    error_code            text,            -- the refusal's code, or the error that ended the turn
    response_id           text,
    -- completed, incomplete, failed, error, cancelled; no CHECK: an unexpected status from
    -- upstream is recorded as it came, not refused.
    status                text,
    previous_response_id  text,            -- as the client sent it
    retried               boolean NOT NULL DEFAULT false,  -- served again with remembered context
    http_fallback         boolean NOT NULL DEFAULT false,  -- served over HTTP after a silent close
    memory_bound_exceeded boolean NOT NULL DEFAULT false,
    input_tokens          integer,
    cached_tokens         integer,
    output_tokens         integer,         -- reasoning included
    reasoning_tokens      integer,
    cost_usd              numeric,
    ttfe_ms               double precision,
    duration_ms           double precision
);

-- Responses of a key in a time range.
CREATE INDEX turns_key_received_idx ON turns (key_id, received_at);
-- Spend per team per day (index-only), and the retention job's scan.
CREATE INDEX turns_received_idx ON turns (received_at) INCLUDE (team_id, accepted, cost_usd);
-- "Which turn made response resp_…?"
CREATE INDEX turns_response_id_idx ON turns (response_id) WHERE response_id IS NOT NULL;
-- The turns of one socket.
CREATE INDEX turns_socket_idx ON turns (socket_id) WHERE socket_id IS NOT NULL;

-- The accepted turns: what customers and invoices call responses. (`*` is expanded when the
-- view is created: a migration that adds a column to turns recreates the view.)
CREATE VIEW responses AS
    SELECT * FROM turns WHERE accepted;

-- Every admin write, from the API or the shell.
CREATE TABLE admin_actions (
    row_id      uuid PRIMARY KEY,
    actor       text NOT NULL,                -- X-Admin-Actor, else 'admin-token'
    remote_addr text,
    action      text NOT NULL,
    target      text NOT NULL,
    at          timestamptz NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX admin_actions_at_idx ON admin_actions (at);

-- Retention: delete what is older than `cutoff`; returns the number of rows deleted.
-- The writer of each node calls it about once an hour; the advisory lock lets one node at a
-- time do the work (the others return 0 at once instead of queueing on the same rows).
CREATE FUNCTION ledger_prune(cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    deleted bigint := 0;
    n       bigint;
BEGIN
    -- 0x6c6564676572 is 'ledger'; any fixed key no other code uses.
    IF NOT pg_try_advisory_xact_lock(x'6c6564676572'::bigint) THEN
        RETURN 0;
    END IF;
    DELETE FROM turns WHERE received_at < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    deleted := deleted + n;
    DELETE FROM sockets WHERE closed_at < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    deleted := deleted + n;
    DELETE FROM sockets WHERE closed_at IS NULL AND opened_at < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    deleted := deleted + n;
    DELETE FROM admin_actions WHERE at < cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    deleted := deleted + n;
    RETURN deleted;
END
$$;
