-- Named queries of both sides. `-- name: x` starts a query; `{recs}` stands for one batch's
-- table and is filled in with psycopg.sql.Identifier by sql.batch_query().

-- ===================================================================== migrations

-- name: create_migrations_table
CREATE SCHEMA IF NOT EXISTS overnight;
CREATE TABLE IF NOT EXISTS overnight.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: lock_migrations
SELECT pg_advisory_xact_lock(7368224362352640000);

-- name: applied_migrations
SELECT version FROM overnight.schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO overnight.schema_migrations (version, name) VALUES (%s, %s);

-- ===================================================================== serving

-- name: recs_for_users
-- Every lookup trip: the users waiting at that moment, one or many, in one round trip.
SELECT user_id, item_ids, scores FROM {recs} WHERE user_id = ANY(%s);

-- name: explained_recs_for_users
-- `recs_for_users` with each list's reasons (`?explain=true`), for a batch published with them.
SELECT user_id, item_ids, scores, reason_codes, reason_refs FROM {recs} WHERE user_id = ANY(%s);

-- name: explained_recs_and_segments_for_users
SELECT user_id, item_ids, scores, reason_codes, reason_refs, NULL::text AS segment
FROM {recs} WHERE user_id = ANY(%(user_ids)s)
UNION ALL
SELECT user_id, NULL, NULL, NULL, NULL, segment FROM {user_segments} WHERE user_id = ANY(%(user_ids)s);

-- name: similar_for_items
-- The neighbour lists of the items asked for (similar items, session recommendations), in one round trip.
SELECT item_id, item_ids, scores FROM {similar} WHERE item_id = ANY(%s);

-- name: recs_and_segments_for_users
-- `recs_for_users` for a batch with user segments: a user it did not score comes back with the segment
-- their attributes put them in (item_ids and scores null), in the same round trip.
SELECT user_id, item_ids, scores, NULL::text AS segment FROM {recs} WHERE user_id = ANY(%(user_ids)s)
UNION ALL
SELECT user_id, NULL, NULL, segment FROM {user_segments} WHERE user_id = ANY(%(user_ids)s);

-- name: batch_items
-- Every catalogue item of a batch with its popularity and attributes: the service holds them in memory
-- for filters and fallbacks. Most popular first (ties by id), the order its fallbacks and fills take.
SELECT item_id, popularity, attributes FROM {items} ORDER BY popularity DESC, item_id;

-- name: batch_segments
SELECT segment, item_ids, scores FROM {segments};

-- name: serving_session
-- Run once per pooled lookup connection: the server gives up on a lookup when the client would.
SELECT set_config('statement_timeout', %s, false);

-- ===================================================================== model registry

-- name: upsert_model_version
INSERT INTO overnight.model_versions
    (model_id, logical_date, status, status_reason, data_window, params, features, metrics,
     artifact_path, artifact_sha256)
VALUES (%(model_id)s, %(logical_date)s, %(status)s, %(status_reason)s, %(data_window)s, %(params)s,
        %(features)s, %(metrics)s, %(artifact_path)s, %(artifact_sha256)s)
ON CONFLICT (model_id) DO UPDATE SET
    status = EXCLUDED.status, status_reason = EXCLUDED.status_reason,
    data_window = EXCLUDED.data_window, params = EXCLUDED.params, features = EXCLUDED.features,
    metrics = EXCLUDED.metrics, artifact_path = EXCLUDED.artifact_path,
    artifact_sha256 = EXCLUDED.artifact_sha256;

-- name: production_model
SELECT model_id, logical_date, status, status_reason, data_window, params, features, metrics,
       artifact_path, artifact_sha256, created_at
FROM overnight.model_versions
WHERE status = 'production';

-- name: model_for_date
-- What scoring a date may use: the production model when it was trained on or before the date, else
-- the newest promoted model that was. (Production is the newest but for a model a canary promotion
-- made production: then it, not the newer model it replaced, scores the coming nights.)
SELECT model_id, logical_date, status, status_reason, data_window, params, features, metrics,
       artifact_path, artifact_sha256, created_at
FROM overnight.model_versions
WHERE status IN ('production', 'retired') AND logical_date <= %s
ORDER BY status = 'production' DESC, logical_date DESC, created_at DESC
LIMIT 1;

-- name: model_by_id
SELECT model_id, logical_date, status, status_reason, data_window, params, features, metrics,
       artifact_path, artifact_sha256, created_at
FROM overnight.model_versions
WHERE model_id = %s;

-- name: record_tuning_trial
INSERT INTO overnight.tuning_trials
    (search_id, trial_number, logical_date, state, params, score, seconds, warm_start, error)
VALUES (%(search_id)s, %(trial_number)s, %(logical_date)s, %(state)s, %(params)s, %(score)s, %(seconds)s,
        %(warm_start)s, %(error)s);

-- name: tuning_trials
-- Every trial of one search, in the order they ran.
SELECT trial_number, state, params, score, seconds, warm_start, error
FROM overnight.tuning_trials
WHERE search_id = %s
ORDER BY trial_number;

-- name: list_models
SELECT model_id, logical_date, status, status_reason, data_window, params, features, metrics,
       artifact_path, artifact_sha256, created_at
FROM overnight.model_versions
ORDER BY logical_date DESC, created_at DESC
LIMIT %s;

-- name: retire_production_model
UPDATE overnight.model_versions
SET status = 'retired', status_reason = %s
WHERE status = 'production' AND model_id <> %s;

-- name: make_production_model
UPDATE overnight.model_versions SET status = 'production', status_reason = %s WHERE model_id = %s;

-- name: lock_registry
-- Serialises promotions so that exactly one model is 'production'.
SELECT pg_advisory_xact_lock(7368224362352640002);

-- ===================================================================== publish

-- name: lock_live
-- Serialises switches of the live pointer, rollbacks and retention across processes.
SELECT pg_advisory_xact_lock(7368224362352640001);

-- name: insert_batch
INSERT INTO overnight.batches
    (logical_date, model_id, status, k, users_scored, active_users, fallback_item_ids,
     fallback_scores, generated_at, loader_pid)
VALUES (%(logical_date)s, %(model_id)s, 'loading', %(k)s, %(users_scored)s, %(active_users)s,
        %(fallback_item_ids)s, %(fallback_scores)s, %(generated_at)s, pg_backend_pid())
RETURNING batch_id;

-- name: create_recs_table
-- No primary key yet: it is built after the load, which is much faster than maintaining it.
CREATE TABLE {recs} (
    user_id  text NOT NULL,
    item_ids text[] NOT NULL,
    scores   real[] NOT NULL
);

-- name: copy_recs
COPY {recs} (user_id, item_ids, scores) FROM STDIN (FORMAT BINARY);

-- name: add_recs_reasons
-- Each list's reasons (sql/contract.py: REASON_SOURCES), for a night published with explanations.
ALTER TABLE {recs} ADD COLUMN reason_codes bytea NOT NULL, ADD COLUMN reason_refs text[] NOT NULL;

-- name: copy_explained_recs
COPY {recs} (user_id, item_ids, scores, reason_codes, reason_refs) FROM STDIN (FORMAT BINARY);

-- name: mark_batch_explained
UPDATE overnight.batches SET explained = true WHERE batch_id = %s;

-- name: create_similar_table
CREATE TABLE {similar} (
    item_id  text NOT NULL,
    item_ids text[] NOT NULL,
    scores   real[] NOT NULL
);

-- name: copy_similar
COPY {similar} (item_id, item_ids, scores) FROM STDIN (FORMAT BINARY);

-- name: add_similar_primary_key
ALTER TABLE {similar} ADD PRIMARY KEY (item_id);

-- name: create_items_table
CREATE TABLE {items} (
    item_id    text PRIMARY KEY,
    -- larger is more popular: fallbacks and filtered fills take items in this order
    popularity real NOT NULL,
    -- {{"genre": ["Comedy", "Drama"], "available": true, ...}}: what `filter=` may ask about (braces doubled:
    -- sql.batch_query formats this text)
    attributes jsonb NOT NULL
);

-- name: copy_items
COPY {items} (item_id, popularity, attributes) FROM STDIN (FORMAT BINARY);

-- name: create_segments_table
CREATE TABLE {segments} (
    segment  text PRIMARY KEY,
    item_ids text[] NOT NULL,
    scores   real[] NOT NULL
);

-- name: copy_segments
COPY {segments} (segment, item_ids, scores) FROM STDIN (FORMAT BINARY);

-- name: create_user_segments_table
CREATE TABLE {user_segments} (
    user_id text NOT NULL,
    segment text NOT NULL
);

-- name: copy_user_segments
COPY {user_segments} (user_id, segment) FROM STDIN (FORMAT BINARY);

-- name: add_user_segments_primary_key
ALTER TABLE {user_segments} ADD PRIMARY KEY (user_id);

-- name: set_batch_extras
UPDATE overnight.batches SET similar_k = %s, segment_attribute = %s WHERE batch_id = %s;

-- name: add_recs_primary_key
ALTER TABLE {recs} ADD PRIMARY KEY (user_id);

-- name: analyze_recs
ANALYZE {recs};

-- name: mark_batch_ready
UPDATE overnight.batches SET status = 'ready', validation = %s WHERE batch_id = %s;

-- name: mark_batch_failed
UPDATE overnight.batches SET status = 'failed', validation = %s, failure_reason = %s
WHERE batch_id = %s;

-- name: set_drop_lock_timeout
-- A lookup still reading an old batch holds its DROP back; give up after a while and retry later.
SET LOCAL lock_timeout = '5s';

-- name: drop_recs_table
-- Every table of the batch (sql.BATCH_TABLES).
DROP TABLE IF EXISTS {recs}, {similar}, {items}, {segments}, {user_segments};

-- name: batch_by_id
SELECT batch_id, logical_date, model_id, status, k, users_scored, active_users, generated_at,
       created_at, published_at, validation, failure_reason
FROM overnight.batches
WHERE batch_id = %s;

-- name: live_batch_id
SELECT batch_id FROM overnight.live FOR UPDATE;

-- name: set_live
INSERT INTO overnight.live (singleton, batch_id, switched_at) VALUES (true, %s, now())
ON CONFLICT (singleton) DO UPDATE SET batch_id = EXCLUDED.batch_id, switched_at = EXCLUDED.switched_at;

-- name: mark_batch_live
UPDATE overnight.batches SET status = 'live', published_at = coalesce(published_at, now())
WHERE batch_id = %s;

-- name: mark_batch_retired
UPDATE overnight.batches SET status = 'retired' WHERE batch_id = %s AND status = 'live';

-- name: record_switch
INSERT INTO overnight.live_history (batch_id, previous_batch_id, action) VALUES (%s, %s, %s);

-- name: notify_live
SELECT pg_notify(%s, %s);

-- name: rollback_target
-- The kept batch just before the live one in (logical date, batch id) order: one that was live, or a
-- nightly batch that was not (a backfill). Never a batch that was a canary or scored for one and never
-- went live (a stopped canary, often of another model): it was never production.
SELECT b.batch_id
FROM overnight.batches AS b, overnight.batches AS live
WHERE live.batch_id = %s
  AND (b.logical_date, b.batch_id) < (live.logical_date, live.batch_id)
  AND (b.status = 'retired'
       OR (b.status = 'ready' AND b.kind = 'serving'
           AND NOT EXISTS (SELECT 1 FROM overnight.canary_history AS h WHERE h.batch_id = b.batch_id)))
ORDER BY b.logical_date DESC, b.batch_id DESC
LIMIT 1;

-- name: same_date_batches
-- Earlier batches of a date that a newer live batch of the same date replaces (not a canary's).
SELECT batch_id FROM overnight.batches
WHERE logical_date = %s AND batch_id <> %s AND status IN ('ready', 'retired')
  AND NOT (kind = 'canary' AND status = 'ready');

-- name: expired_batches
-- Kept batches beyond the newest N (by creation), never the live one, nor a canary's never-live batch
-- (expired_canary_batches).
SELECT batch_id FROM overnight.batches
WHERE status IN ('ready', 'retired') AND NOT (kind = 'canary' AND status = 'ready')
ORDER BY batch_id DESC
OFFSET %s;

-- name: expired_canary_batches
-- Batches scored for a canary that are not (or no longer) the canary and never went live, beyond the
-- newest N.
SELECT batch_id FROM overnight.batches
WHERE kind = 'canary' AND status = 'ready'
ORDER BY batch_id DESC
OFFSET %s;

-- name: batch_status
SELECT status FROM overnight.batches WHERE batch_id = %s;

-- name: mark_batch_dropped
UPDATE overnight.batches SET status = 'dropped' WHERE batch_id = %s;

-- name: orphan_loading_batches
-- Batches left half-loaded by a publish that died before it could mark them failed.
SELECT batch_id FROM overnight.batches
WHERE status = 'loading'
  AND loader_pid IS DISTINCT FROM pg_backend_pid()
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = loader_pid);

-- name: newest_live_date
SELECT b.logical_date FROM overnight.live AS l JOIN overnight.batches AS b USING (batch_id);

-- ===================================================================== status

-- name: live_status
SELECT b.batch_id, b.logical_date, b.model_id, b.status, b.k, b.users_scored, b.active_users,
       b.generated_at, b.published_at, l.switched_at,
       extract(epoch FROM now() - b.generated_at) AS age_seconds
FROM overnight.live AS l
JOIN overnight.batches AS b USING (batch_id);

-- name: canary_batch_status
SELECT b.logical_date, b.model_id, extract(epoch FROM now() - b.generated_at) AS age_seconds
FROM overnight.canary AS c
JOIN overnight.batches AS b USING (batch_id);

-- name: count_recs
SELECT count(*) FROM {recs};

-- name: recent_batches
SELECT batch_id, logical_date, model_id, status, users_scored, generated_at, published_at,
       failure_reason
FROM overnight.batches
ORDER BY batch_id DESC
LIMIT %s;

-- ===================================================================== run history

-- name: start_run
-- A CLI run gets a new row, owned by its recorder; an Airflow dag run gets one row, whichever of its
-- tasks reports first, owned by none (each task's process owns its step).
INSERT INTO overnight.runs (logical_date, trigger, external_id, owner_pid, owner_name)
VALUES (%(logical_date)s, %(trigger)s, %(external_id)s, %(owner_pid)s, %(owner_name)s)
ON CONFLICT (trigger, external_id) WHERE external_id IS NOT NULL
DO UPDATE SET external_id = EXCLUDED.external_id
RETURNING run_id;

-- name: recorder_session
-- The connection a recorder holds while its run or step runs: the server notices a lost machine within
-- about two minutes (keepalives) and never closes the connection for being idle.
SELECT pg_backend_pid(), set_config('tcp_keepalives_idle', '60', false),
       set_config('tcp_keepalives_interval', '10', false), set_config('tcp_keepalives_count', '6', false),
       set_config('idle_session_timeout', '0', false);

-- name: mark_abandoned_steps
-- Steps left 'running' by a process that died (see migration 0016), with when it was noticed.
UPDATE overnight.run_steps SET status = 'abandoned', abandoned_at = now()
WHERE status = 'running' AND overnight.recorder_gone(owner_pid, owner_name)
RETURNING run_id, step;

-- name: mark_abandoned_runs
UPDATE overnight.runs SET status = 'abandoned', abandoned_at = now()
WHERE status = 'running' AND overnight.run_abandoned(run_id)
RETURNING run_id;

-- name: start_run_step
INSERT INTO overnight.run_steps (run_id, step, status, started_at, owner_pid, owner_name)
VALUES (%(run_id)s, %(step)s, 'running', now(), %(owner_pid)s, %(owner_name)s)
ON CONFLICT (run_id, step) DO UPDATE SET
    status = 'running', attempt = overnight.run_steps.attempt + 1, started_at = now(),
    finished_at = NULL, seconds = NULL, peak_memory_bytes = NULL, rows_in = NULL, rows_out = NULL,
    summary = NULL, error = NULL, abandoned_at = NULL, batch_id = NULL, model_id = NULL,
    owner_pid = EXCLUDED.owner_pid,
    owner_name = EXCLUDED.owner_name;

-- name: resume_abandoned_run
-- A step starting again (an Airflow retry) makes its abandoned run running again.
UPDATE overnight.runs SET status = 'running', abandoned_at = NULL
WHERE run_id = %s AND status = 'abandoned';

-- name: finish_run_step
-- A step's end is recorded even if it was taken for abandoned (its recorder's connection was lost).
UPDATE overnight.run_steps
SET status = %(status)s, finished_at = now(), seconds = %(seconds)s,
    peak_memory_bytes = %(peak_memory_bytes)s, rows_in = %(rows_in)s, rows_out = %(rows_out)s,
    summary = %(summary)s, error = %(error)s, abandoned_at = NULL, batch_id = %(batch_id)s,
    model_id = %(model_id)s
WHERE run_id = %(run_id)s AND step = %(step)s;

-- name: note_run_result
-- What a step learned about the run (the batch it published, the model it used).
UPDATE overnight.runs
SET batch_id = coalesce(%(batch_id)s, batch_id), model_id = coalesce(%(model_id)s, model_id)
WHERE run_id = %(run_id)s;

-- name: finish_run
-- A run ends as its first step that failed or was blocked, whichever process reports its end: `overnight
-- run` raises the first error; in an Airflow dag run each failing task reports, and the online upkeep runs
-- (and ends the run) after them. Without such a step, as reported.
WITH failed_step AS (
    SELECT status, error FROM overnight.run_steps
    WHERE run_id = %(run_id)s AND status IN ('failed', 'blocked')
    ORDER BY finished_at, step LIMIT 1
)
UPDATE overnight.runs
SET status = coalesce((SELECT status FROM failed_step), %(status)s),
    error = coalesce((SELECT error FROM failed_step), %(error)s), abandoned_at = NULL,
    finished_at = CASE WHEN %(status)s = 'running' THEN NULL ELSE now() END
WHERE run_id = %(run_id)s;

-- name: recent_runs
-- The newest runs with each step's status and the checks accepted to publish their batch, if any
-- (`overnight status`); abandoned runs are marked before (mark_abandoned_steps, mark_abandoned_runs).
SELECT r.run_id, r.logical_date, r.trigger, r.status, r.started_at, r.finished_at, r.abandoned_at,
       r.batch_id, r.model_id, r.error,
       coalesce((SELECT jsonb_object_agg(s.step, s.status)
                 FROM overnight.run_steps AS s WHERE s.run_id = r.run_id), '{}') AS steps,
       (SELECT jsonb_build_object('reason', a.reason, 'accepted_by', a.accepted_by, 'accepted_at', a.accepted_at,
                                  'batch_id', a.batch_id, 'checks', a.checks)
        FROM overnight.monitor_acceptances AS a WHERE a.run_id = r.run_id
        ORDER BY a.accepted_at DESC LIMIT 1) AS accepted
FROM overnight.runs AS r
ORDER BY r.started_at DESC, r.run_id DESC
LIMIT %s;

-- ===================================================================== monitoring

-- name: delete_monitor_checks
DELETE FROM overnight.monitor_checks WHERE logical_date = %s AND stage = %s;

-- name: insert_monitor_check
INSERT INTO overnight.monitor_checks
    (logical_date, stage, statistic, subject, value, level, message, warn_at, fail_at, bad_side, details,
     run_id, model_id, batch_id)
VALUES (%(logical_date)s, %(stage)s, %(statistic)s, %(subject)s, %(value)s, %(level)s, %(message)s,
        %(warn_at)s, %(fail_at)s, %(bad_side)s, %(details)s, %(run_id)s, %(model_id)s, %(batch_id)s);

-- name: upsert_monitor_report
INSERT INTO overnight.monitor_reports (logical_date, stage, verdict, report, run_id, model_id, batch_id)
VALUES (%(logical_date)s, %(stage)s, %(verdict)s, %(report)s, %(run_id)s, %(model_id)s, %(batch_id)s)
ON CONFLICT (logical_date, stage) DO UPDATE SET
    verdict = EXCLUDED.verdict, report = EXCLUDED.report, run_id = EXCLUDED.run_id,
    model_id = EXCLUDED.model_id, batch_id = EXCLUDED.batch_id, created_at = now();

-- name: monitor_checks_for_date
SELECT stage, statistic, subject, value, level, message, warn_at, fail_at, bad_side, details, run_id,
       model_id, batch_id
FROM overnight.monitor_checks
WHERE logical_date = %s
ORDER BY array_position(ARRAY['input', 'drift', 'output'], stage), statistic, subject;

-- name: monitor_reports_for_date
SELECT stage, verdict, report, run_id, model_id, batch_id, created_at
FROM overnight.monitor_reports WHERE logical_date = %s;

-- name: request_retrain
INSERT INTO overnight.retrain_requests (model_id, logical_date, reason) VALUES (%s, %s, %s)
ON CONFLICT (model_id, logical_date) DO UPDATE SET reason = EXCLUDED.reason, created_at = now();

-- name: withdraw_retrain
DELETE FROM overnight.retrain_requests WHERE model_id = %s AND logical_date = %s;

-- name: retrain_request_for_date
-- The newest drift request against the model that a date would use (a newer model answers it).
SELECT r.reason
FROM overnight.retrain_requests AS r
WHERE r.logical_date <= %(logical_date)s
  AND r.model_id = (SELECT m.model_id FROM overnight.model_versions AS m
                    WHERE m.status IN ('production', 'retired') AND m.logical_date <= %(logical_date)s
                    ORDER BY m.logical_date DESC, m.created_at DESC LIMIT 1)
ORDER BY r.logical_date DESC
LIMIT 1;

-- name: previous_kept_batch
-- Yesterday's lists: the newest batch of an earlier date whose table is still kept.
SELECT batch_id, logical_date FROM overnight.batches
WHERE logical_date < %s AND status IN ('live', 'ready', 'retired')
ORDER BY logical_date DESC, batch_id DESC
LIMIT 1;

-- name: record_acceptance
INSERT INTO overnight.monitor_acceptances (logical_date, batch_id, run_id, checks, reason, accepted_by)
VALUES (%(logical_date)s, %(batch_id)s, %(run_id)s, %(checks)s, %(reason)s, %(accepted_by)s)
RETURNING accepted_at;

-- name: record_alert
-- True when the fingerprint is new (send it), false when it was sent before (only counted).
INSERT INTO overnight.alerts (fingerprint, title, details) VALUES (%s, %s, %s)
ON CONFLICT (fingerprint) DO UPDATE SET
    last_seen_at = now(), times_seen = overnight.alerts.times_seen + 1
RETURNING times_seen = 1;

-- ===================================================================== console
-- The operator dashboard (console/dashboard.py QUERIES, with live_status and retrain_request_for_date);
-- it reads them as overnight_console (migration 0018), which may read what they name and nothing else.

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
            ARRAY['failed', 'blocked', 'abandoned', 'running', 'success'], seen.status)))[1] AS status
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
-- ===================================================================== rollouts: canary and shadow

-- name: serving_batches
-- Production and, when one runs, the canary, read in one statement so a reader never sees a promote
-- half done. What the lookup service needs to answer from each batch (see serving.live.live_batch_from_row),
-- its extras (similar_k, segment_attribute: null for none), whether its lists have reasons, then the
-- canary's traffic and salt (null for production). The canary's switched_at is its updated_at.
SELECT 'production' AS variant, b.batch_id, b.model_id, b.k, b.generated_at, b.fallback_item_ids,
       b.fallback_scores, l.switched_at, b.similar_k, b.segment_attribute, b.explained,
       NULL::double precision AS traffic, NULL::text AS salt
FROM overnight.live AS l
JOIN overnight.batches AS b USING (batch_id)
UNION ALL
SELECT 'canary', b.batch_id, b.model_id, b.k, b.generated_at, b.fallback_item_ids, b.fallback_scores,
       c.updated_at, b.similar_k, b.segment_attribute, b.explained, c.traffic, c.salt
FROM overnight.canary AS c
JOIN overnight.batches AS b USING (batch_id);

-- name: canary_state
SELECT batch_id, traffic, salt, started_at, updated_at FROM overnight.canary FOR UPDATE;

-- name: upsert_canary
INSERT INTO overnight.canary (singleton, batch_id, traffic, salt) VALUES (true, %s, %s, %s)
ON CONFLICT (singleton) DO UPDATE SET traffic = EXCLUDED.traffic, updated_at = now()
WHERE overnight.canary.batch_id = EXCLUDED.batch_id;

-- name: move_canary_to_batch
-- A refresh: the same canary (salt, traffic, start) serves another batch.
UPDATE overnight.canary SET batch_id = %(batch_id)s, updated_at = now() WHERE batch_id = %(previous_batch_id)s;

-- name: delete_canary
DELETE FROM overnight.canary;

-- name: mark_batch_canary
UPDATE overnight.batches SET status = 'canary', published_at = coalesce(published_at, now())
WHERE batch_id = %s AND status IN ('ready', 'retired', 'canary');

-- name: mark_canary_batch_ready
-- A canary no more: 'retired' when it was live once (a rollback may go back to it), else 'ready'.
UPDATE overnight.batches
SET status = CASE WHEN EXISTS (SELECT 1 FROM overnight.live_history AS h WHERE h.batch_id = batches.batch_id)
                  THEN 'retired' ELSE 'ready' END
WHERE batch_id = %s AND status = 'canary';

-- name: record_canary_event
INSERT INTO overnight.canary_history (action, batch_id, traffic, salt, production_batch_id)
VALUES (%s, %s, %s, %s, %s);

-- name: batch_for_rollout
SELECT b.batch_id, b.kind, b.status, b.k, b.logical_date, b.model_id,
       to_regclass(format('overnight.recs_%%s', b.batch_id)) IS NOT NULL AS has_table
FROM overnight.batches AS b
WHERE b.batch_id = %s;

-- name: canary_history
SELECT event_id, action, batch_id, traffic, salt, production_batch_id, happened_at
FROM overnight.canary_history
ORDER BY event_id DESC
LIMIT %s;

-- name: mark_batch_kind
UPDATE overnight.batches SET kind = %s WHERE batch_id = %s AND status = 'loading';

-- name: mark_shadow_ready
UPDATE overnight.batches SET status = 'shadow', validation = %s WHERE batch_id = %s AND kind = 'shadow';

-- name: same_date_shadow_batches
-- Earlier shadow batches of a date that a newer shadow batch of the same date replaces.
SELECT batch_id FROM overnight.batches
WHERE logical_date = %s AND batch_id <> %s AND kind = 'shadow' AND status = 'shadow';

-- name: expired_shadow_batches
SELECT batch_id FROM overnight.batches
WHERE kind = 'shadow' AND status = 'shadow'
ORDER BY batch_id DESC
OFFSET %s;

-- name: shadow_batch_for_date
-- The newest kept shadow batch of a date, else the newest that retention dropped (the shadow report
-- still compares its model with production's).
SELECT batch_id, model_id, k, generated_at FROM overnight.batches
WHERE logical_date = %s AND kind = 'shadow' AND status IN ('shadow', 'dropped')
ORDER BY status = 'shadow' DESC, batch_id DESC
LIMIT 1;

-- name: serving_batch_for_date
-- The production batch of a date: the newest kept one that went live, else the newest kept nightly
-- batch (a backfill), else the newest that went live and retention dropped (the shadow report still
-- compares its model). Never a canary's batch that was not promoted: it was not production.
SELECT batch_id, model_id, k, generated_at FROM overnight.batches
WHERE logical_date = %s
  AND (status IN ('live', 'retired')
       OR (status = 'ready' AND kind = 'serving'
           AND NOT EXISTS (SELECT 1 FROM overnight.canary_history AS h WHERE h.batch_id = batches.batch_id))
       OR (status = 'dropped'
           AND EXISTS (SELECT 1 FROM overnight.live_history AS h WHERE h.batch_id = batches.batch_id)))
ORDER BY status IN ('live', 'retired') DESC, status = 'ready' DESC, batch_id DESC
LIMIT 1;

-- name: batch_overlap
-- Per user in both batches: how many of the first n items they share, and n (the shorter list).
SELECT count(*) AS users,
       coalesce(avg(shared::double precision / n), 0) AS mean_overlap,
       count(*) FILTER (WHERE shared = n) AS identical
FROM (
    SELECT cardinality(ARRAY(SELECT unnest(p.item_ids[1:%(n)s]) INTERSECT SELECT unnest(s.item_ids[1:%(n)s])))
               AS shared,
           least(%(n)s, cardinality(p.item_ids), cardinality(s.item_ids)) AS n
    FROM {production} AS p JOIN {shadow} AS s USING (user_id)
) AS per_user
WHERE n > 0;

-- name: score_distribution
-- Quantiles of every published score and of each user's top score.
SELECT count(*) AS users,
       (SELECT percentile_cont(ARRAY[0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]) WITHIN GROUP (ORDER BY s)
        FROM {recs}, unnest(scores) AS s) AS all_scores,
       percentile_cont(ARRAY[0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]) WITHIN GROUP (ORDER BY scores[1])
           AS top_scores
FROM {recs};

-- name: top_items_for_users
SELECT user_id, item_ids[1:%s] FROM {recs} WHERE user_id = ANY(%s);

-- ===================================================================== online: served predictions and feedback

-- name: ensure_daily_partitions
SELECT overnight.ensure_daily_partitions(%s, %s, %s);

-- name: drop_daily_partitions
SELECT overnight.drop_daily_partitions(%s, %s);

-- The lookup service writes both a batch at a time: one JSON array of rows (each an array of the
-- columns in order) that orjson encodes in one call (serving/prediction_log.py), with the batch's
-- row count and earliest and latest time (each row's first column), and the batch's write id.
-- Each write first claims its id in overnight.bulk_writes (migration 0013) and inserts its rows only if
-- the claim is new, in one statement: a retry of a write that was committed, but whose reply was lost,
-- inserts nothing. No conflict target, so the service's role needs no more than INSERT.
-- What was served is stored as that text, one row per batch (migration 0008): no per-answer work.
-- Its times are microseconds since the Unix epoch (migration 0009), first and last too.
-- name: insert_served_predictions
WITH claimed AS (
    INSERT INTO overnight.bulk_writes (write_id, writer, row_count)
    VALUES (%(write_id)s, 'served_predictions', %(count)s)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
INSERT INTO overnight.served_prediction_chunks (first_served_at, last_served_at, answer_count, answers)
SELECT to_timestamp(%(first)s::bigint / 1e6), to_timestamp(%(last)s::bigint / 1e6), %(count)s, %(rows)s
WHERE EXISTS (SELECT 1 FROM claimed);

-- Feedback is read by its columns (ingest, reports), so each event is a row; the array is parsed
-- once as jsonb (the fields of a json row would be re-read from its text one by one).
-- name: insert_feedback_events
WITH claimed AS (
    INSERT INTO overnight.bulk_writes (write_id, writer, row_count)
    VALUES (%(write_id)s, 'feedback_events', %(count)s)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
INSERT INTO overnight.feedback_events (occurred_at, received_at, user_id, item_id, event_type, request_id)
SELECT (r->>0)::timestamptz, (r->>1)::timestamptz, r->>2, r->>3, r->>4, r->>5
FROM jsonb_array_elements(%(rows)s::jsonb) AS r
WHERE EXISTS (SELECT 1 FROM claimed);

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
