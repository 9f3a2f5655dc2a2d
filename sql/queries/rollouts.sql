-- Canary and shadow rollouts (jobs/rollouts/, jobs/batches.py).

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
