-- The operator console's reads (console/dashboard.py QUERIES), all of them and only here: the console runs
-- no query of another file, so a change on the batch side never breaks it. It runs them as
-- overnight_console (migration 0018), which may read what they name and nothing else.

-- name: dashboard_live
-- The live batch. The same read as status.sql's live_status, copied on purpose (`duplicates` may list the
-- pair): when the batch side changes its query, the console's and this role's grants need not follow.
SELECT b.batch_id, b.logical_date, b.model_id, b.status, b.k, b.users_scored, b.active_users,
       b.generated_at, b.published_at, l.switched_at,
       extract(epoch FROM now() - b.generated_at) AS age_seconds
FROM overnight.live AS l
JOIN overnight.batches AS b USING (batch_id);

-- name: dashboard_runs
-- A run whose process died reads as abandoned here already, though this read-only role cannot mark it:
-- the batch side does (with when it noticed) when it next starts or lists runs or checks freshness
-- (migration 0016). Until then abandoned_at is null and its time ends at its last recorded step.
SELECT r.run_id, r.logical_date, r.trigger,
       CASE WHEN gone.abandoned THEN 'abandoned' ELSE r.status END AS status,
       r.started_at, r.finished_at, r.abandoned_at,
       r.batch_id, r.model_id, r.error,
       extract(epoch FROM coalesce(
           r.finished_at, r.abandoned_at,
           CASE WHEN gone.abandoned THEN
               (SELECT max(greatest(s.started_at, s.finished_at)) FROM overnight.run_steps AS s
                WHERE s.run_id = r.run_id)
           END,
           CASE WHEN gone.abandoned THEN r.started_at ELSE now() END) - r.started_at) AS seconds,
       (SELECT jsonb_build_object('reason', a.reason, 'accepted_by', a.accepted_by, 'accepted_at', a.accepted_at,
                                  'batch_id', a.batch_id, 'checks', a.checks)
        FROM overnight.monitor_acceptances AS a WHERE a.run_id = r.run_id
        ORDER BY a.accepted_at DESC LIMIT 1) AS accepted
FROM (SELECT * FROM overnight.runs ORDER BY started_at DESC LIMIT %s) AS r
CROSS JOIN LATERAL (SELECT overnight.run_abandoned(r.run_id) AS abandoned) AS gone
ORDER BY r.started_at DESC;

-- name: dashboard_run_steps
-- Steps of the given runs; a mapped step's parts ("score[0]", "score[1]") count as one, wall to wall.
-- A part whose process died reads as abandoned, as in dashboard_runs.
SELECT run_id,
       regexp_replace(step, '\[\d+\]$', '') AS step,
       count(*) AS parts,
       min(started_at) AS started_at,
       extract(epoch FROM max(coalesce(finished_at, abandoned_at, now())) - min(started_at)) AS seconds,
       max(peak_memory_bytes) AS peak_memory_bytes,
       sum(rows_in) AS rows_in,
       sum(rows_out) AS rows_out,
       (array_agg(seen.status ORDER BY array_position(
            ARRAY['failed', 'blocked', 'abandoned', 'retrying', 'running', 'success'], seen.status)))[1] AS status
FROM overnight.run_steps
CROSS JOIN LATERAL (
    SELECT CASE WHEN status = 'running' AND overnight.recorder_gone(owner_pid, owner_name) THEN 'abandoned'
                ELSE status END AS status
) AS seen
WHERE run_id = ANY(%s)
GROUP BY run_id, 2
ORDER BY run_id, min(started_at);

-- name: dashboard_models
SELECT model_id, logical_date, status, metrics, created_at
FROM overnight.model_versions
ORDER BY logical_date DESC, created_at DESC
LIMIT %s;

-- name: dashboard_online
-- The served models' online numbers of the last N recorded days, beside their held-out NDCG@10.
SELECT o.day, o.model_id, o.summary, o.complete, m.status, (m.metrics->>'ndcg@10')::double precision AS ndcg
FROM overnight.online_daily AS o
LEFT JOIN overnight.model_versions AS m USING (model_id)
WHERE o.day IN (SELECT DISTINCT day FROM overnight.online_daily ORDER BY day DESC LIMIT %s)
ORDER BY o.day DESC, o.model_id;

-- name: dashboard_checks
-- Every check of the last N measured dates, for the heat map and the statistics over time.
SELECT logical_date, stage, statistic, subject, value, level, message, warn_at, fail_at
FROM overnight.monitor_checks
WHERE logical_date IN (SELECT DISTINCT logical_date FROM overnight.monitor_checks
                       ORDER BY logical_date DESC LIMIT %s)
ORDER BY logical_date, stage, statistic, subject;

-- name: dashboard_output_report
SELECT logical_date, verdict, report, batch_id, model_id
FROM overnight.monitor_reports
WHERE stage = 'output' AND (%(logical_date)s::date IS NULL OR logical_date <= %(logical_date)s)
ORDER BY logical_date DESC
LIMIT 1;

-- name: dashboard_canary
SELECT c.batch_id, b.logical_date, b.model_id, c.traffic, c.started_at, c.updated_at
FROM overnight.canary AS c
JOIN overnight.batches AS b USING (batch_id);

-- name: dashboard_alerts
SELECT fingerprint, title, details->>'text' AS text, first_sent_at, last_seen_at, times_seen
FROM overnight.alerts
ORDER BY last_seen_at DESC
LIMIT %s;

-- name: dashboard_retrain_request
-- The newest drift request against the model that a date would use (a newer model answers it). The same
-- read as monitoring.sql's retrain_request_for_date, copied on purpose (`duplicates` lists the pair), as
-- dashboard_live is.
SELECT r.reason
FROM overnight.retrain_requests AS r
WHERE r.logical_date <= %(logical_date)s
  AND r.model_id = (SELECT m.model_id FROM overnight.model_versions AS m
                    WHERE m.status IN ('production', 'retired') AND m.logical_date <= %(logical_date)s
                    ORDER BY m.logical_date DESC, m.created_at DESC LIMIT 1)
ORDER BY r.logical_date DESC
LIMIT 1;
