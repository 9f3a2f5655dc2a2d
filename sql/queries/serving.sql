-- Everything the lookup service runs (serving/), as a login role of overnight_serving: its reads, and its
-- writers' inserts (the prediction log, feedback events), which jobs/rollouts/online.py reads back.

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
