-- Beyond one user's list: what a batch publishes besides its user lists, in tables of its own that are
-- switched, rolled back, canaried and dropped with it (sql.BATCH_TABLES names them):
--   overnight.similar_<batch>        each item's neighbours (item_id, item_ids, scores), like the user lists
--   overnight.items_<batch>          each catalogue item's popularity and the attributes filters use
--   overnight.segments_<batch>       each user segment's popular list
--   overnight.user_segments_<batch>  the segment of each user with attributes whom the batch did not score
-- similar_k is how many neighbours each item has (null: a batch published before this migration, which
-- has none of these tables); segment_attribute is the user attribute segments come from (null: none).
ALTER TABLE overnight.batches
    ADD COLUMN similar_k integer CHECK (similar_k > 0),
    ADD COLUMN segment_attribute text;
