-- Safe rollouts and the online loop: canary and shadow batches, what the service served, and what
-- users did with it (feedback events).

-- A batch is 'serving' (it may be made live) or 'shadow' (another model scored for comparison).
ALTER TABLE overnight.batches
    ADD COLUMN kind text NOT NULL DEFAULT 'serving' CHECK (kind IN ('serving', 'shadow'));

-- Two more statuses: 'canary' (a serving batch answering a slice of users) and 'shadow' (a validated
-- shadow batch). Every query that picks a batch to make live, roll back to or drop asks for 'ready',
-- 'retired' or 'live', so neither can be picked by a publish, a rollback or retention.
ALTER TABLE overnight.batches DROP CONSTRAINT batches_status_check;
ALTER TABLE overnight.batches ADD CONSTRAINT batches_status_check
    CHECK (status IN ('loading', 'ready', 'live', 'retired', 'failed', 'dropped', 'canary', 'shadow'));
ALTER TABLE overnight.batches ADD CONSTRAINT batches_shadow_never_served
    CHECK (CASE kind WHEN 'shadow' THEN status IN ('loading', 'shadow', 'failed', 'dropped')
                     ELSE status <> 'shadow' END);

ALTER TABLE overnight.live_history DROP CONSTRAINT live_history_action_check;
ALTER TABLE overnight.live_history ADD CONSTRAINT live_history_action_check
    CHECK (action IN ('publish', 'rollback', 'promote'));

-- At most one canary: a serving batch that answers `traffic` of the users, chosen by a hash of
-- (salt, user_id) so a user stays in the same arm across requests, processes and days.
CREATE TABLE overnight.canary (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    batch_id   bigint NOT NULL REFERENCES overnight.batches,
    traffic    double precision NOT NULL CHECK (traffic > 0 AND traffic < 1),
    salt       text NOT NULL CHECK (salt <> ''),
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE overnight.canary_history (
    event_id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action              text NOT NULL CHECK (action IN ('start', 'ramp', 'stop', 'promote')),
    batch_id            bigint NOT NULL REFERENCES overnight.batches,
    traffic             double precision,
    salt                text,
    production_batch_id bigint REFERENCES overnight.batches,
    happened_at         timestamptz NOT NULL DEFAULT now()
);

-- The last line of defence: whatever the code does, a shadow batch is never served.
CREATE FUNCTION overnight.refuse_shadow_batch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM overnight.batches WHERE batch_id = NEW.batch_id AND kind = 'shadow') THEN
        RAISE EXCEPTION 'batch % is a shadow batch: shadow batches are never served', NEW.batch_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER live_is_never_shadow BEFORE INSERT OR UPDATE ON overnight.live
    FOR EACH ROW EXECUTE FUNCTION overnight.refuse_shadow_batch();
CREATE TRIGGER canary_is_never_shadow BEFORE INSERT OR UPDATE ON overnight.canary
    FOR EACH ROW EXECUTE FUNCTION overnight.refuse_shadow_batch();

-- What the lookup service answered (sampled), one row per answer; an item's position is its
-- 1-based index in item_ids. High volume, append-only, read by day: partitioned by day (UTC) so a
-- report scans only its days and retention drops whole days. No foreign keys: they would cost
-- every insert, and batch rows are never deleted anyway.
CREATE TABLE overnight.served_predictions (
    served_at  timestamptz NOT NULL,
    request_id text NOT NULL,
    user_id    text NOT NULL,
    batch_id   bigint NOT NULL,
    variant    text NOT NULL,
    source     text NOT NULL,
    item_ids   text[] NOT NULL
) PARTITION BY RANGE (served_at);

-- What users did with what they were shown, as reported by the product (POST /v1/events).
CREATE TABLE overnight.feedback_events (
    occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    user_id     text NOT NULL,
    item_id     text NOT NULL,
    event_type  text NOT NULL CHECK (event_type IN ('impression', 'click', 'conversion')),
    request_id  text
) PARTITION BY RANGE (occurred_at);

-- The lookup service's read-only role (overnight_serving, migration 0003) may add rows to these two
-- tables and nothing more; an insert through the parent needs no right on the partitions.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'overnight_serving') THEN
        GRANT INSERT ON overnight.served_predictions, overnight.feedback_events TO overnight_serving;
    END IF;
END
$$;

-- Rows for a day without its own partition land here, so an insert never fails; creating the
-- day's partition later moves them over.
CREATE TABLE overnight.served_predictions_default PARTITION OF overnight.served_predictions DEFAULT;
CREATE TABLE overnight.feedback_events_default PARTITION OF overnight.feedback_events DEFAULT;
-- BRIN: tiny, and rows arrive in time order, so ranges within a day are cheap to find.
CREATE INDEX served_predictions_served_at ON overnight.served_predictions USING brin (served_at);
CREATE INDEX feedback_events_occurred_at ON overnight.feedback_events USING brin (occurred_at);

-- Creates the missing daily partitions (UTC days) of served_predictions or feedback_events for
-- [first_day, last_day], moving any rows of those days out of the default partition.
CREATE FUNCTION overnight.ensure_daily_partitions(parent text, first_day date, last_day date)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    time_column text := CASE parent WHEN 'served_predictions' THEN 'served_at'
                                    WHEN 'feedback_events' THEN 'occurred_at' END;
    day date;
    partition text;
    lower_bound timestamptz;
    upper_bound timestamptz;
    created integer := 0;
BEGIN
    IF time_column IS NULL THEN
        RAISE EXCEPTION 'not a daily-partitioned table: %', parent;
    END IF;
    PERFORM pg_advisory_xact_lock(7368224362352640008);
    FOR day IN SELECT generate_series(first_day, last_day, interval '1 day')::date LOOP
        partition := parent || '_' || to_char(day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(format('overnight.%I', partition)) IS NOT NULL;
        lower_bound := day::timestamp AT TIME ZONE 'UTC';
        upper_bound := (day + 1)::timestamp AT TIME ZONE 'UTC';
        EXECUTE format('CREATE TABLE overnight.%I (LIKE overnight.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       partition, parent);
        EXECUTE format('WITH moved AS (DELETE FROM overnight.%I WHERE %I >= %L AND %I < %L RETURNING *) '
                       'INSERT INTO overnight.%I SELECT * FROM moved',
                       parent || '_default', time_column, lower_bound, time_column, upper_bound, partition);
        EXECUTE format('ALTER TABLE overnight.%I ATTACH PARTITION overnight.%I FOR VALUES FROM (%L) TO (%L)',
                       parent, partition, lower_bound, upper_bound);
        created := created + 1;
    END LOOP;
    RETURN created;
END $$;

-- Drops the daily partitions (and default-partition rows) of days before before_day: retention.
CREATE FUNCTION overnight.drop_daily_partitions(parent text, before_day date)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    time_column text := CASE parent WHEN 'served_predictions' THEN 'served_at'
                                    WHEN 'feedback_events' THEN 'occurred_at' END;
    partition text;
    dropped integer := 0;
BEGIN
    IF time_column IS NULL THEN
        RAISE EXCEPTION 'not a daily-partitioned table: %', parent;
    END IF;
    PERFORM pg_advisory_xact_lock(7368224362352640008);
    FOR partition IN
        SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = format('overnight.%I', parent)::regclass
          AND c.relname ~ ('^' || parent || '_[0-9]{8}$')
          AND to_date(right(c.relname, 8), 'YYYYMMDD') < before_day
    LOOP
        EXECUTE format('DROP TABLE overnight.%I', partition);
        dropped := dropped + 1;
    END LOOP;
    EXECUTE format('DELETE FROM overnight.%I WHERE %I < %L', parent || '_default', time_column,
                   before_day::timestamp AT TIME ZONE 'UTC');
    RETURN dropped;
END $$;

SELECT overnight.ensure_daily_partitions(name, (now() AT TIME ZONE 'UTC')::date - 1,
                                         (now() AT TIME ZONE 'UTC')::date + 2)
FROM (VALUES ('served_predictions'), ('feedback_events')) AS tables (name);
