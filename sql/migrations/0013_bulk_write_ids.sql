-- The lookup service writes what it served and the feedback it accepted a batch at a time, and retries
-- a write that failed (serving/prediction_log.py). When Postgres committed the write but the reply
-- was lost (the connection dropped right after the commit, or the client gave up waiting just after
-- it), the retry would store the batch a second time: answers and clicks counted twice, in the online
-- report and in the next day's training data. So each batch carries an id, drawn when the batch is
-- made and kept through its retries, and the write claims the id here in the same statement that
-- inserts its rows: the rows go in only if the claim is new. A retry racing a write still running on
-- a dropped connection waits for that one's outcome on the primary key, so one of them wins.
--
-- An id matters only for the minutes a batch may be retried; maintain_tables (jobs/rollouts/online.py) deletes
-- those older than 2 days, once a night. Not partitioned (the primary key must be the id alone), and no
-- index on written_at: the nightly delete takes about a third of the table, a scan costs no more.
CREATE TABLE overnight.bulk_writes (
    write_id   text PRIMARY KEY,
    writer     text NOT NULL,
    row_count  integer NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now()
);

-- The service claims ids with ON CONFLICT DO NOTHING and no conflict target: INSERT is all it needs.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'overnight_serving') THEN
        GRANT INSERT ON overnight.bulk_writes TO overnight_serving;
    END IF;
END
$$;
