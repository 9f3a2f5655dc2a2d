-- The lookup service stamps each answer it logs with an integer: microseconds since the Unix epoch
-- (a datetime cost it more to make and to encode, on every request). Chunks written before keep
-- their RFC 3339 text; the reader takes both. Integer microseconds divided by 1e6 are exact to the
-- microsecond in to_timestamp, so an answer's day here is the day the service batched it by.
CREATE OR REPLACE FUNCTION overnight.served_predictions_between(start_at timestamptz, end_at timestamptz)
RETURNS TABLE (
    served_at  timestamptz,
    request_id text,
    user_id    text,
    batch_id   bigint,
    variant    text,
    source     text,
    item_ids   json
) LANGUAGE sql STABLE AS $$
    SELECT answer.*
    FROM overnight.served_prediction_chunks AS chunk,
         LATERAL (
             SELECT CASE json_typeof(a->0)
                        WHEN 'number' THEN to_timestamp((a->>0)::bigint / 1e6)
                        ELSE (a->>0)::timestamptz
                    END,
                    a->>1, a->>2, (a->>3)::bigint, a->>4, a->>5, a->6
             FROM json_array_elements(chunk.answers::json) AS a
         ) AS answer (served_at, request_id, user_id, batch_id, variant, source, item_ids)
    WHERE chunk.first_served_at >= date_trunc('day', start_at, 'UTC')
      AND chunk.first_served_at < end_at
      AND chunk.last_served_at >= start_at
      AND answer.served_at >= start_at
      AND answer.served_at < end_at
$$;
