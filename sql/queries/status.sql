-- What `overnight status` and check-freshness read (jobs/monitoring/freshness.py).

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
