-- The socket, turn and admin tables become partitioned by month on their time column
-- (CONTRACT.md §6): sockets on opened_at, turns on received_at, admin_actions on at.
--
-- No row is copied. Each old table is renamed to <table>_legacy, given a CHECK constraint on
-- its own min..max month range (added NOT VALID, then validated: one read of the table, no
-- rewrite), and attached as one partition for that range, which Postgres then does not scan
-- again. The unique index on (id, time) each partition needs is built on it here: with the
-- validation, the only work under the lock that grows with the table. An empty old table is
-- dropped instead. Monthly partitions follow from the month after through three months ahead;
-- the gateway keeps creating them (ledger_ensure_partitions) and drops old ones
-- (ledger_drop_partitions), a whole month at a time.
--
-- Keys: a partitioned table's unique keys must include the partition key, so turns and
-- admin_actions are keyed by (row_id, time) and sockets by (socket_id, opened_at). Every ledger
-- row carries its time, and a replay carries the same time as the first write, so
-- `ON CONFLICT (row_id, received_at)` is exactly-once as `ON CONFLICT (row_id)` was; a socket's
-- close carries its opened_at for the same reason.
--
-- Each table has a DEFAULT partition as a safety net: rows no month partition takes (a socket
-- close from before this migration without opened_at, a row older than the oldest partition).
-- ledger_ensure_partitions moves rows out of it when it creates their month; retention deletes
-- its rows older than the cutoff (the only DELETE left, on a table expected to be empty).

CREATE FUNCTION ledger_month_partition(parent text, key text, month timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    lo   timestamptz := date_trunc('month', month AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    hi   timestamptz := ((date_trunc('month', month AT TIME ZONE 'UTC') + interval '1 month')
                         AT TIME ZONE 'UTC');
    name text := parent || '_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYY_MM');
    dflt text := parent || '_default';
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    -- Another partition (the legacy one) may already cover this month.
    IF EXISTS (
        SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = parent::regclass
          AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
          AND substring(pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \(''([^'']+)''\)')::timestamptz < hi
          AND substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz > lo
    ) THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name, parent);
    IF to_regclass(dflt) IS NOT NULL THEN
        -- Rows the safety net took for this month move into it (normally none).
        EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I >= $1 AND %I < $2 RETURNING *) '
                       'INSERT INTO %I SELECT * FROM moved', dflt, key, key, name) USING lo, hi;
    END IF;
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   parent, name, lo, hi);
    RETURN true;
END
$$;

-- Partitions for every month from now through `months_ahead` months ahead; the names created.
CREATE FUNCTION ledger_ensure_partitions(months_ahead integer) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    t record;
    m integer;
    month timestamptz;
BEGIN
    -- 0x6c6564676572 is 'ledger': one node at a time; the others find the work done.
    PERFORM pg_advisory_xact_lock(x'6c6564676572'::bigint);
    FOR t IN SELECT * FROM (VALUES ('sockets', 'opened_at'), ('turns', 'received_at'),
                                   ('admin_actions', 'at')) AS v (parent, key) LOOP
        FOR m IN 0..months_ahead LOOP
            month := now() + make_interval(months => m);
            IF ledger_month_partition(t.parent, t.key, month) THEN
                RETURN NEXT t.parent || '_p' || to_char(month AT TIME ZONE 'UTC', 'YYYY_MM');
            END IF;
        END LOOP;
    END LOOP;
END
$$;

-- Retention: drop every partition whose whole range is older than `cutoff`; the names dropped.
CREATE FUNCTION ledger_drop_partitions(cutoff timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    p record;
BEGIN
    IF NOT pg_try_advisory_xact_lock(x'6c6564676572'::bigint) THEN
        RETURN;
    END IF;
    FOR p IN
        SELECT c.relname, substring(pg_get_expr(c.relpartbound, c.oid)
                                    FROM 'TO \(''([^'']+)''\)')::timestamptz AS upper
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent IN ('sockets'::regclass, 'turns'::regclass, 'admin_actions'::regclass)
          AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
        ORDER BY 2, 1
    LOOP
        IF p.upper <= cutoff THEN
            EXECUTE format('DROP TABLE %I', p.relname);
            RETURN NEXT p.relname;
        END IF;
    END LOOP;
    DELETE FROM sockets_default WHERE coalesce(opened_at, closed_at) < cutoff;
    DELETE FROM turns_default WHERE received_at < cutoff;
    DELETE FROM admin_actions_default WHERE at < cutoff;
END
$$;

CREATE FUNCTION ledger_partition_table(parent text, key text, keycols text, keykind text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    legacy text := parent || '_legacy';
    lo     timestamptz;
    hi     timestamptz;
    ix     record;
    first  timestamptz;
BEGIN
    EXECUTE format('ALTER TABLE %I RENAME TO %I', parent, legacy);
    -- Index and constraint names are per schema: the legacy ones make way for the parent's.
    FOR ix IN SELECT indexrelid::regclass::text AS name FROM pg_index
              WHERE indrelid = legacy::regclass LOOP
        IF EXISTS (SELECT 1 FROM pg_constraint WHERE conindid = ix.name::regclass) THEN
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', legacy,
                           (SELECT conname FROM pg_constraint WHERE conindid = ix.name::regclass));
        ELSE
            EXECUTE format('ALTER INDEX %I RENAME TO %I', ix.name, 'legacy_' || ix.name);
        END IF;
    END LOOP;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS) '
                   'PARTITION BY RANGE (%I)', parent, legacy, key);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I %s (%s)', parent, parent || '_key', keykind,
                   keycols);
    EXECUTE format('SELECT date_trunc(''month'', min(%I) AT TIME ZONE ''UTC'') AT TIME ZONE ''UTC'', '
                   '(date_trunc(''month'', max(%I) AT TIME ZONE ''UTC'') + interval ''1 month'') '
                   'AT TIME ZONE ''UTC'' FROM %I', key, key, legacy) INTO lo, hi;
    EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', parent || '_default', parent);
    IF lo IS NULL THEN
        -- Nothing with a time to keep; rows without one (never the case for turns and admin)
        -- go to the safety net.
        EXECUTE format('INSERT INTO %I SELECT * FROM %I', parent || '_default', legacy);
        EXECUTE format('DROP TABLE %I', legacy);
        first := date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    ELSE
        -- Rows without a time (a socket whose open never arrived): few; into the safety net.
        EXECUTE format('WITH moved AS (DELETE FROM %I WHERE %I IS NULL RETURNING *) '
                       'INSERT INTO %I SELECT * FROM moved', legacy, key, parent || '_default');
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (%I IS NOT NULL AND %I >= %L AND %I < %L) NOT VALID',
                       legacy, legacy || '_range', key, key, lo, key, hi);
        EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', legacy, legacy || '_range');
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       parent, legacy, lo, hi);
        first := hi;
    END IF;
    WHILE first < now() + interval '4 months' LOOP
        PERFORM ledger_month_partition(parent, key, first);
        first := first + interval '1 month';
    END LOOP;
END
$$;

DROP VIEW responses;
DROP FUNCTION ledger_prune(timestamptz);

SELECT ledger_partition_table('sockets', 'opened_at', 'socket_id, opened_at', 'UNIQUE');
CREATE INDEX sockets_closed_at_idx ON sockets (closed_at);
CREATE INDEX sockets_opened_at_idx ON sockets (opened_at) WHERE closed_at IS NULL;

SELECT ledger_partition_table('turns', 'received_at', 'row_id, received_at', 'PRIMARY KEY');
CREATE INDEX turns_key_received_idx ON turns (key_id, received_at);
CREATE INDEX turns_received_idx ON turns (received_at) INCLUDE (team_id, accepted, cost_usd);
CREATE INDEX turns_response_id_idx ON turns (response_id) WHERE response_id IS NOT NULL;
CREATE INDEX turns_socket_idx ON turns (socket_id) WHERE socket_id IS NOT NULL;

SELECT ledger_partition_table('admin_actions', 'at', 'row_id, at', 'PRIMARY KEY');
CREATE INDEX admin_actions_at_idx ON admin_actions (at);

-- The view bound itself to the renamed table; it reads the partitioned one again.
CREATE VIEW responses AS
    SELECT * FROM turns WHERE accepted;

DROP FUNCTION ledger_partition_table(text, text, text, text);
