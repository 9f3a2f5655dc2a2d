-- The model registry (jobs/registry.py): register, promote, find the model a date may use.

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
