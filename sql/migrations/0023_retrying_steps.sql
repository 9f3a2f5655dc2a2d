-- An Airflow attempt that failed with a retry due is 'retrying' (with its error) until the retry starts it
-- again: not 'failed', which would make it the run's end while another step fails for good, nor
-- 'abandoned', though the attempt's process is gone. A dag run's own end records the run's (0023 adds
-- nothing for that: it is the dag's success and failure callbacks, jobs.monitoring.history).
ALTER TABLE overnight.run_steps
    DROP CONSTRAINT run_steps_status_check,
    ADD CONSTRAINT run_steps_status_check
        CHECK (status IN ('running', 'success', 'failed', 'blocked', 'abandoned', 'retrying'));
