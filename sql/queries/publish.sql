-- Publishing a batch (jobs/steps/publish.py), the live pointer, rollback and retention (jobs/batches.py).

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
-- No primary key yet: it is built after the load, which is much faster than maintaining it. Statistics are kept
-- of user_id alone: every query of the table finds its rows by user_id, and ANALYZE (publish's and autovacuum's)
-- on the wide lists would cost several times the rest of it for statistics no plan uses.
CREATE TABLE {recs} (
    user_id  text NOT NULL,
    item_ids text[] NOT NULL,
    scores   real[] NOT NULL
);
ALTER TABLE {recs} ALTER COLUMN item_ids SET STATISTICS 0, ALTER COLUMN scores SET STATISTICS 0;

-- name: copy_recs
COPY {recs} (user_id, item_ids, scores) FROM STDIN (FORMAT BINARY);

-- name: add_recs_reasons
-- Each list's reasons (sql/contract.py: REASON_SOURCES), for a night published with explanations; no statistics
-- of them, as of the lists (create_recs_table).
ALTER TABLE {recs} ADD COLUMN reason_codes bytea NOT NULL, ADD COLUMN reason_refs text[] NOT NULL,
    ALTER COLUMN reason_codes SET STATISTICS 0, ALTER COLUMN reason_refs SET STATISTICS 0;

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
