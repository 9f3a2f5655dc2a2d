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

-- name: live_batch
-- What the lookup service needs to answer from the live batch, in one row.
SELECT b.batch_id, b.model_id, b.k, b.generated_at, b.fallback_item_ids, b.fallback_scores,
       l.switched_at
FROM overnight.live AS l
JOIN overnight.batches AS b USING (batch_id);

-- name: recs_for_user
SELECT item_ids, scores FROM {recs} WHERE user_id = %s;

-- name: recs_for_users
SELECT user_id, item_ids, scores FROM {recs} WHERE user_id = ANY(%s);

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
-- The newest promoted model trained on or before a date: what scoring that date may use.
SELECT model_id, logical_date, status, status_reason, data_window, params, features, metrics,
       artifact_path, artifact_sha256, created_at
FROM overnight.model_versions
WHERE status IN ('production', 'retired') AND logical_date <= %s
ORDER BY logical_date DESC, created_at DESC
LIMIT 1;

-- name: model_by_id
SELECT model_id, logical_date, status, status_reason, data_window, params, features, metrics,
       artifact_path, artifact_sha256, created_at
FROM overnight.model_versions
WHERE model_id = %s;

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

-- name: add_recs_primary_key
ALTER TABLE {recs} ADD PRIMARY KEY (user_id);

-- name: analyze_recs
ANALYZE {recs};

-- name: validate_recs
-- One pass over the loaded rows: counts of every kind of bad row.
SELECT count(*) AS rows,
       count(*) FILTER (WHERE cardinality(item_ids) = 0) AS empty_lists,
       count(*) FILTER (WHERE cardinality(item_ids) <> cardinality(scores)) AS length_mismatches,
       count(*) FILTER (WHERE 'NaN'::real = ANY(scores) OR 'Infinity'::real = ANY(scores)
                              OR '-Infinity'::real = ANY(scores)) AS non_finite_scores,
       count(*) FILTER (WHERE array_position(item_ids, NULL) IS NOT NULL
                              OR array_position(scores, NULL) IS NOT NULL) AS null_elements
FROM {recs};

-- name: create_catalogue_table
CREATE TEMPORARY TABLE catalogue (item_id text PRIMARY KEY) ON COMMIT DROP;

-- name: copy_catalogue
COPY catalogue (item_id) FROM STDIN;

-- name: unknown_items
-- Items in the batch (or its fallback list) that are not in the catalogue, with a few examples.
WITH published AS (
    SELECT DISTINCT unnest(item_ids) AS item_id FROM {recs}
    UNION
    SELECT unnest(fallback_item_ids) FROM overnight.batches WHERE batch_id = %s
)
SELECT count(*), (array_agg(p.item_id ORDER BY p.item_id))[1:5]
FROM published AS p
WHERE NOT EXISTS (SELECT 1 FROM catalogue AS c WHERE c.item_id = p.item_id);

-- name: mark_batch_ready
UPDATE overnight.batches SET status = 'ready', validation = %s WHERE batch_id = %s;

-- name: mark_batch_failed
UPDATE overnight.batches SET status = 'failed', validation = %s, failure_reason = %s
WHERE batch_id = %s;

-- name: set_drop_lock_timeout
-- A lookup still reading an old batch holds its DROP back; give up after a while and retry later.
SET LOCAL lock_timeout = '5s';

-- name: drop_recs_table
DROP TABLE IF EXISTS {recs};

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
-- The kept batch just before the live one in (logical date, batch id) order.
SELECT b.batch_id
FROM overnight.batches AS b, overnight.batches AS live
WHERE live.batch_id = %s
  AND b.status IN ('ready', 'retired')
  AND (b.logical_date, b.batch_id) < (live.logical_date, live.batch_id)
ORDER BY b.logical_date DESC, b.batch_id DESC
LIMIT 1;

-- name: same_date_batches
-- Earlier batches of a date that a newer live batch of the same date replaces.
SELECT batch_id FROM overnight.batches
WHERE logical_date = %s AND batch_id <> %s AND status IN ('ready', 'retired');

-- name: expired_batches
-- Kept batches beyond the newest N (by creation), never the live one.
SELECT batch_id FROM overnight.batches
WHERE status IN ('ready', 'retired')
ORDER BY batch_id DESC
OFFSET %s;

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

-- name: count_recs
SELECT count(*) FROM {recs};

-- name: recent_batches
SELECT batch_id, logical_date, model_id, status, users_scored, generated_at, published_at,
       failure_reason
FROM overnight.batches
ORDER BY batch_id DESC
LIMIT %s;
