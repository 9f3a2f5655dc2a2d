-- Runs whose process died, and monitoring fails an operator accepted to publish a batch anyway.

-- The process that records a run or a step (its recorder) holds one connection to Postgres while it
-- runs, under a random application_name; the row keeps that backend's pid and name. A 'running' row
-- whose recorder's backend is gone was abandoned: its process died (SIGKILL, OOM, a lost machine: the
-- recorder asks the server for TCP keepalives) before it could record the end. abandoned_at is when
-- that was noticed. A pid and an application_name are visible to every role in pg_stat_activity, so
-- the dashboard's read-only role tells as well; the name tells a reused pid from the recorder's.
ALTER TABLE overnight.runs
    ADD COLUMN owner_pid integer,
    ADD COLUMN owner_name text,
    ADD COLUMN abandoned_at timestamptz,
    DROP CONSTRAINT runs_status_check,
    ADD CONSTRAINT runs_status_check CHECK (status IN ('running', 'success', 'failed', 'blocked', 'abandoned'));

ALTER TABLE overnight.run_steps
    ADD COLUMN owner_pid integer,
    ADD COLUMN owner_name text,
    ADD COLUMN abandoned_at timestamptz,
    DROP CONSTRAINT run_steps_status_check,
    ADD CONSTRAINT run_steps_status_check
        CHECK (status IN ('running', 'success', 'failed', 'blocked', 'abandoned'));

-- What is marked abandoned is looked for among the running rows only.
CREATE INDEX runs_running ON overnight.runs (run_id) WHERE status = 'running';
CREATE INDEX run_steps_running ON overnight.run_steps (run_id) WHERE status = 'running';

-- Only rows a recorder owns can be told abandoned; one without (recorded before this migration, or
-- whose recorder could not connect) is left as it is.
CREATE FUNCTION overnight.recorder_gone(owner_pid integer, owner_name text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT owner_name IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a
                       WHERE a.pid = recorder_gone.owner_pid AND a.application_name = recorder_gone.owner_name)
$$;

-- A running run is abandoned when its recorder is gone (`overnight run`: one process records the run and
-- its steps). An Airflow dag run has no recorder of its own, each task process records its step: it is
-- abandoned when a step is and none is still running, and a retry of the step makes it running again.
CREATE FUNCTION overnight.run_abandoned(run_id bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT r.status = 'running' AND CASE
        WHEN r.owner_name IS NOT NULL THEN overnight.recorder_gone(r.owner_pid, r.owner_name)
        ELSE EXISTS (SELECT 1 FROM overnight.run_steps AS s
                     WHERE s.run_id = r.run_id
                       AND (s.status = 'abandoned'
                            OR s.status = 'running' AND overnight.recorder_gone(s.owner_pid, s.owner_name)))
         AND NOT EXISTS (SELECT 1 FROM overnight.run_steps AS s
                         WHERE s.run_id = r.run_id AND s.status = 'running'
                           AND NOT overnight.recorder_gone(s.owner_pid, s.owner_name))
    END
    FROM overnight.runs AS r
    WHERE r.run_id = run_abandoned.run_id
$$;

-- `overnight publish --accept-checks "why"` (the DAG's accept_checks param): the date's failing checks
-- an operator accepted to publish a batch monitoring held back; who, why, when and which.
CREATE TABLE overnight.monitor_acceptances (
    acceptance_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    logical_date  date NOT NULL,
    batch_id      bigint NOT NULL,
    run_id        bigint REFERENCES overnight.runs ON DELETE SET NULL,
    -- [{"stage", "statistic", "subject", "message"}] of every check at its fail threshold
    checks        jsonb NOT NULL,
    reason        text NOT NULL CHECK (btrim(reason) <> ''),
    accepted_by   text NOT NULL,
    accepted_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX monitor_acceptances_run_id ON overnight.monitor_acceptances (run_id);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'overnight_serving') THEN
        GRANT SELECT ON overnight.monitor_acceptances TO overnight_serving;
    END IF;
END
$$;
