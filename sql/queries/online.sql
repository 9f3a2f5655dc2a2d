-- The online loop: the served predictions and feedback the service writes (sql/queries/serving.sql), read back
-- (jobs/rollouts/online.py).

-- name: ensure_daily_partitions
SELECT overnight.ensure_daily_partitions(%s, %s, %s);

-- name: drop_daily_partitions
SELECT overnight.drop_daily_partitions(%s, %s);

-- The lookup service writes both a batch at a time: one JSON array of rows (each an array of the
-- columns in order) that orjson encodes in one call (serving/prediction_log.py), with the batch's
-- row count and earliest and latest time (each row's first column), and the batch's write id.
-- name: delete_old_bulk_writes
-- The write ids of overnight.bulk_writes matter for the minutes a write may be retried; two days is
-- ample, and maintain_tables deletes the older ones once a night.
DELETE FROM overnight.bulk_writes WHERE written_at < now() - interval '2 days';

-- name: online_impressed
-- The impressed (request, item) pairs of the answers served in [start, end): a pair with an impression,
-- click or conversion event (a click or conversion implies the item was seen). Feedback is joined by
-- request id, so a served list and its feedback pair exactly. Only the answers that got feedback are
-- taken apart item by item (most get none, and expanding every list made the report ten times slower).
-- A temporary table: the propensities are chosen from its counts by position (jobs/rollouts/online.py) before
-- online_outcomes weighs its clicks with them. while_canary: the answer was served while a canary ran
-- (from a start in overnight.canary_history to the next start, stop or promote), the time in which
-- canary and production split the users between them.
CREATE TEMPORARY TABLE online_impressed ON COMMIT DROP AS
WITH answers AS MATERIALIZED (
    SELECT served_at, request_id, user_id, variant, batch_id, item_ids
    FROM overnight.served_predictions_between(%(start)s, %(end)s)
),
canary_periods AS MATERIALIZED (
    SELECT started_at, stopped_at
    FROM (
        SELECT action, happened_at AS started_at,
               coalesce(lead(happened_at) OVER (ORDER BY happened_at, event_id), 'infinity') AS stopped_at
        FROM overnight.canary_history
        WHERE action IN ('start', 'stop', 'promote')
    ) AS events
    WHERE action = 'start' AND stopped_at > %(start)s AND started_at < %(end)s
),
feedback AS MATERIALIZED (
    SELECT request_id, user_id, item_id,
           bool_or(event_type = 'click') AS clicked,
           bool_or(event_type = 'conversion') AS converted
    FROM overnight.feedback_events
    WHERE occurred_at >= %(start)s AND occurred_at < %(feedback_end)s AND request_id IS NOT NULL
    GROUP BY request_id, user_id, item_id
),
-- A client may send one X-Request-Id twice (a retry, two widgets of one page): the first answer to a
-- (request, user) is the one its feedback is paired with, so one click never counts twice.
answered AS (
    SELECT DISTINCT ON (request_id, user_id) served_at, request_id, user_id, variant, batch_id, item_ids
    FROM answers
    WHERE request_id IN (SELECT request_id FROM feedback)
    ORDER BY request_id, user_id, served_at
)
SELECT a.variant, a.batch_id, a.user_id, shown.position::integer AS position, f.clicked, f.converted,
       EXISTS (
           SELECT FROM canary_periods AS c WHERE a.served_at >= c.started_at AND a.served_at < c.stopped_at
       ) AS while_canary
FROM answered AS a
CROSS JOIN LATERAL json_array_elements_text(a.item_ids) WITH ORDINALITY AS shown (item_id, position)
JOIN feedback AS f ON f.request_id = a.request_id AND f.user_id = a.user_id AND f.item_id = shown.item_id;

-- name: online_impressions_by_position
SELECT position, count(*) AS impressions, count(*) FILTER (WHERE clicked) AS clicks
FROM online_impressed
GROUP BY position;

-- name: online_outcomes
-- Per variant, per (variant, batch), per model, and per variant of what was served while a canary ran
-- (the clean canary-minus-production comparison): the sums over users that the user-clustered
-- intervals need (jobs/rollouts/online.py, UserSums). Each user's impressions n, clicks c, conversions v and
-- inverse-propensity weighted clicks w (Σ click/θ_position) are summed first, then their sums, squares
-- and products with n over the users of the group; the user is the unit, as users are randomized.
WITH per_user AS (
    SELECT GROUPING(i.variant, i.batch_id, b.model_id, i.while_canary) AS grouping,
           i.variant, i.batch_id, b.model_id, i.while_canary,
           count(*)::float8 AS n,
           count(*) FILTER (WHERE i.clicked)::float8 AS c,
           count(*) FILTER (WHERE i.converted)::float8 AS v,
           coalesce(sum(1 / t.theta) FILTER (WHERE i.clicked), 0) AS w
    FROM online_impressed AS i
    JOIN unnest(%(positions)s::integer[], %(theta)s::float8[]) AS t (position, theta) USING (position)
    LEFT JOIN overnight.batches AS b USING (batch_id)
    GROUP BY GROUPING SETS (
        (i.variant, i.user_id), (i.variant, i.batch_id, i.user_id), (b.model_id, i.user_id),
        (i.while_canary, i.variant, i.user_id)
    )
)
SELECT CASE grouping WHEN 7 THEN 'variant' WHEN 3 THEN 'batch' WHEN 13 THEN 'model' ELSE 'while_canary' END AS level,
       variant, batch_id, model_id, while_canary,
       count(*) AS impressed_users,
       sum(n)::bigint AS impressions, sum(n * n) AS impressions_squared,
       sum(c)::bigint AS clicks, sum(c * c) AS clicks_squared, sum(c * n) AS clicks_impressions,
       sum(v)::bigint AS conversions, sum(v * v) AS conversions_squared, sum(v * n) AS conversions_impressions,
       sum(w) AS ips, sum(w * w) AS ips_squared, sum(w * n) AS ips_impressions
FROM per_user
GROUP BY grouping, variant, batch_id, model_id, while_canary;

-- name: online_requests
-- Requests, served pairs and distinct users per variant, per (variant, batch) and per model: a user
-- served by two batches of a variant is one user of the variant, not two.
WITH per_user AS (
    SELECT variant, batch_id, user_id, count(*) AS requests, sum(json_array_length(item_ids)) AS served
    FROM overnight.served_predictions_between(%(start)s, %(end)s)
    GROUP BY variant, batch_id, user_id
)
SELECT CASE GROUPING(u.variant, u.batch_id, b.model_id) WHEN 3 THEN 'variant' WHEN 1 THEN 'batch' ELSE 'model' END
           AS level,
       u.variant, u.batch_id, b.model_id,
       sum(u.requests)::bigint AS requests, sum(u.served)::bigint AS served, count(DISTINCT u.user_id) AS users
FROM per_user AS u
LEFT JOIN overnight.batches AS b USING (batch_id)
GROUP BY GROUPING SETS ((u.variant), (u.variant, u.batch_id), (b.model_id));

-- name: batch_models
-- The model behind each served batch, with the held-out metrics it was registered with.
SELECT b.batch_id, b.model_id, m.metrics
FROM overnight.batches AS b
JOIN overnight.model_versions AS m USING (model_id)
WHERE b.batch_id = ANY(%(batch_ids)s);

-- name: delete_online_daily
DELETE FROM overnight.online_daily WHERE day = %(day)s;

-- name: insert_online_daily
INSERT INTO overnight.online_daily (day, model_id, summary, complete)
VALUES (%(day)s, %(model_id)s, %(summary)s, %(complete)s);

-- name: unattributed_feedback
-- Feedback of the period that names no request, or a request (and item) that was not logged as served
-- (sampling, a dropped log entry, or a client error). Only the answers its requests name are read item
-- by item.
WITH events AS MATERIALIZED (
    SELECT event_type, request_id, user_id, item_id
    FROM overnight.feedback_events
    WHERE occurred_at >= %(start)s AND occurred_at < %(end)s
),
answers AS MATERIALIZED (
    SELECT request_id, user_id, item_ids
    FROM overnight.served_predictions_between(%(start)s - interval '1 day', %(end)s)
),
served AS MATERIALIZED (
    SELECT a.request_id, a.user_id, shown.item_id
    FROM answers AS a
    CROSS JOIN LATERAL json_array_elements_text(a.item_ids) AS shown (item_id)
    WHERE a.request_id IN (SELECT request_id FROM events)
)
SELECT e.event_type, count(*)
FROM events AS e
LEFT JOIN served AS s ON s.request_id = e.request_id AND s.user_id = e.user_id AND s.item_id = e.item_id
WHERE s.request_id IS NULL
GROUP BY e.event_type;

-- name: feedback_interactions
-- Feedback as interactions for ingest of D, as CSV (COPY: read column-wise, no Python object per
-- value): events of the given types that happened before end (D + 1 day) and were received before
-- it, and that became visible (the later of the two times) at or after start (D - late days). So the
-- window is by receipt: an event that happened days before it arrived is still read, a re-run of D
-- never sees what arrived after D, and an event stamped after D (the service allows a little clock
-- skew) waits for the night of its own day. The OR keeps both BRIN indexes usable (migration 0011).
-- Times are microseconds since the Unix epoch.
COPY (
    SELECT user_id, item_id, (extract(epoch FROM occurred_at) * 1000000)::bigint, event_type
    FROM overnight.feedback_events
    WHERE occurred_at < %(end)s AND received_at < %(end)s
      AND (received_at >= %(start)s OR occurred_at >= %(start)s)
      AND event_type = ANY(%(types)s)
) TO STDOUT (FORMAT csv);
