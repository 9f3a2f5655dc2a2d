-- What the lookup service served is stored a write at a time: one row per bulk write (a chunk of
-- answers, as the JSON text the service encoded), instead of one row per answer. Inserting and
-- indexing hundreds of rows per write cost Postgres about 5 µs of CPU an answer, taken from the same
-- cores as the lookups; storing one chunk costs under 1 µs an answer. Reads go through the view
-- overnight.served_predictions (the old table's columns, one row per answer) or, for a time window,
-- overnight.served_predictions_between(start, end), which reads only that window's chunks.
--
-- answers: a JSON array of [served_at, request_id, user_id, batch_id, variant, source, [item ids]];
-- an item's position is its 1-based index. Stored as text (json would validate every byte on the way
-- in), uncompressed or lz4-compressed (pglz costs several times more). A chunk never spans two UTC
-- days, so it belongs to the day partition of its first answer, and dropping a day drops all of it.
CREATE TABLE overnight.served_prediction_chunks (
    first_served_at timestamptz NOT NULL,
    last_served_at  timestamptz NOT NULL,
    answer_count    integer NOT NULL CHECK (answer_count > 0),
    answers         text NOT NULL,
    CONSTRAINT answers_in_order CHECK (first_served_at <= last_served_at),
    CONSTRAINT answers_of_one_utc_day
        CHECK ((first_served_at AT TIME ZONE 'UTC')::date = (last_served_at AT TIME ZONE 'UTC')::date)
) PARTITION BY RANGE (first_served_at);

DO $$
BEGIN
    ALTER TABLE overnight.served_prediction_chunks ALTER COLUMN answers SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    -- A server built without lz4: keep the text as it is rather than pay for pglz.
    ALTER TABLE overnight.served_prediction_chunks ALTER COLUMN answers SET STORAGE EXTERNAL;
END
$$;

CREATE TABLE overnight.served_prediction_chunks_default PARTITION OF overnight.served_prediction_chunks DEFAULT;
CREATE INDEX served_prediction_chunks_first_served_at
    ON overnight.served_prediction_chunks USING brin (first_served_at);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'overnight_serving') THEN
        GRANT INSERT ON overnight.served_prediction_chunks TO overnight_serving;
    END IF;
END
$$;

-- The answers of [start_at, end_at), one row per answer. Inlined by the planner, so a window's
-- bounds prune the day partitions and the chunks outside it are never decoded.
CREATE FUNCTION overnight.served_predictions_between(start_at timestamptz, end_at timestamptz)
RETURNS TABLE (
    served_at  timestamptz,
    request_id text,
    user_id    text,
    batch_id   bigint,
    variant    text,
    source     text,
    item_ids   json
) LANGUAGE sql STABLE AS $$
    SELECT answer.*
    FROM overnight.served_prediction_chunks AS chunk,
         LATERAL (
             SELECT (a->>0)::timestamptz, a->>1, a->>2, (a->>3)::bigint, a->>4, a->>5, a->6
             FROM json_array_elements(chunk.answers::json) AS a
         ) AS answer (served_at, request_id, user_id, batch_id, variant, source, item_ids)
    WHERE chunk.first_served_at >= date_trunc('day', start_at, 'UTC')
      AND chunk.first_served_at < end_at
      AND chunk.last_served_at >= start_at
      AND answer.served_at >= start_at
      AND answer.served_at < end_at
$$;

-- Answers already logged move into chunks of one second each (a second never spans two days).
INSERT INTO overnight.served_prediction_chunks (first_served_at, last_served_at, answer_count, answers)
SELECT min(served_at), max(served_at), count(*),
       json_agg(json_build_array(served_at, request_id, user_id, batch_id, variant, source, item_ids)
                ORDER BY served_at)::text
FROM overnight.served_predictions
GROUP BY date_trunc('second', served_at AT TIME ZONE 'UTC');

DROP TABLE overnight.served_predictions;

CREATE VIEW overnight.served_predictions AS
SELECT * FROM overnight.served_predictions_between('-infinity', 'infinity');

-- The day partitions of the chunks (by their first answer), made and dropped as those of the old
-- table were. A partition takes its parent's storage and compression too (LIKE leaves them out).
CREATE OR REPLACE FUNCTION overnight.ensure_daily_partitions(parent text, first_day date, last_day date)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    time_column text := CASE parent WHEN 'served_prediction_chunks' THEN 'first_served_at'
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
        EXECUTE format('CREATE TABLE overnight.%I (LIKE overnight.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                       'INCLUDING STORAGE INCLUDING COMPRESSION)', partition, parent);
        EXECUTE format('WITH moved AS (DELETE FROM overnight.%I WHERE %I >= %L AND %I < %L RETURNING *) '
                       'INSERT INTO overnight.%I SELECT * FROM moved',
                       parent || '_default', time_column, lower_bound, time_column, upper_bound, partition);
        EXECUTE format('ALTER TABLE overnight.%I ATTACH PARTITION overnight.%I FOR VALUES FROM (%L) TO (%L)',
                       parent, partition, lower_bound, upper_bound);
        created := created + 1;
    END LOOP;
    RETURN created;
END $$;

CREATE OR REPLACE FUNCTION overnight.drop_daily_partitions(parent text, before_day date)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    time_column text := CASE parent WHEN 'served_prediction_chunks' THEN 'first_served_at'
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

SELECT overnight.ensure_daily_partitions('served_prediction_chunks', (now() AT TIME ZONE 'UTC')::date - 1,
                                         (now() AT TIME ZONE 'UTC')::date + 2);
