-- Monitoring: the history of every pipeline run, the statistics measured on each night's input,
-- features and output with their verdicts, retrain requests raised by drift, and sent alerts.

CREATE TABLE overnight.runs (
    run_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    logical_date date NOT NULL,
    trigger      text NOT NULL CHECK (trigger IN ('cli', 'airflow')),
    -- Airflow's dag run id; one row per dag run however many task processes report into it
    external_id  text,
    status       text NOT NULL DEFAULT 'running'
                 CHECK (status IN ('running', 'success', 'failed', 'blocked')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    batch_id     bigint,
    model_id     text,
    error        text
);

CREATE UNIQUE INDEX runs_trigger_external_id ON overnight.runs (trigger, external_id)
    WHERE external_id IS NOT NULL;
CREATE INDEX runs_started_at ON overnight.runs (started_at DESC);

-- One row per step of a run; a mapped Airflow task reports one row per map index ("score[2]").
CREATE TABLE overnight.run_steps (
    run_id            bigint NOT NULL REFERENCES overnight.runs ON DELETE CASCADE,
    step              text NOT NULL,
    status            text NOT NULL CHECK (status IN ('running', 'success', 'failed', 'blocked')),
    attempt           integer NOT NULL DEFAULT 1,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    seconds           double precision,
    -- the step's own peak resident memory where the OS can reset the mark, else the process's
    peak_memory_bytes bigint,
    rows_in           bigint,
    rows_out          bigint,
    summary           text,
    error             text,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE overnight.monitor_reports (
    logical_date date NOT NULL,
    stage        text NOT NULL CHECK (stage IN ('input', 'drift', 'output')),
    verdict      text NOT NULL CHECK (verdict IN ('ok', 'warn', 'fail')),
    report       jsonb NOT NULL,
    run_id       bigint REFERENCES overnight.runs ON DELETE SET NULL,
    model_id     text,
    batch_id     bigint,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (logical_date, stage)
);

CREATE TABLE overnight.monitor_checks (
    logical_date date NOT NULL,
    stage        text NOT NULL CHECK (stage IN ('input', 'drift', 'output')),
    statistic    text NOT NULL,
    -- the feature of a per-feature statistic, '' otherwise
    subject      text NOT NULL DEFAULT '',
    value        double precision,
    level        text NOT NULL CHECK (level IN ('ok', 'warn', 'fail')),
    message      text NOT NULL,
    warn_at      double precision,
    fail_at      double precision,
    bad_side     text NOT NULL CHECK (bad_side IN ('above', 'below')),
    details      jsonb NOT NULL DEFAULT '{}',
    run_id       bigint REFERENCES overnight.runs ON DELETE SET NULL,
    model_id     text,
    batch_id     bigint,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (logical_date, stage, statistic, subject)
);

-- Feature drift past OVERNIGHT_DRIFT_RETRAIN_PSI asks for the model it was measured on to be retrained.
CREATE TABLE overnight.retrain_requests (
    model_id     text NOT NULL,
    logical_date date NOT NULL,
    reason       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, logical_date)
);

-- Alerts by fingerprint: a problem is announced once, later sightings only counted.
CREATE TABLE overnight.alerts (
    fingerprint   text PRIMARY KEY,
    title         text NOT NULL,
    details       jsonb NOT NULL,
    first_sent_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    times_seen    integer NOT NULL DEFAULT 1
);
