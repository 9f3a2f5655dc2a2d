-- The retrain's parameter search (jobs/tuning.py): every trial of every search, with the parameters it
-- tried, the NDCG@10 it reached on the training users' newest label window and how long it took. A search
-- is one `search_id`; its model (when a retrain ran it) keeps the chosen parameters in its params.
CREATE TABLE overnight.tuning_trials (
    search_id text NOT NULL,
    trial_number integer NOT NULL,
    logical_date date NOT NULL,
    state text NOT NULL CHECK (state IN ('complete', 'failed')),
    params jsonb NOT NULL,
    score double precision,
    seconds double precision NOT NULL CHECK (seconds >= 0),
    warm_start boolean NOT NULL DEFAULT false,
    error text,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (search_id, trial_number)
);
CREATE INDEX tuning_trials_by_date ON overnight.tuning_trials (logical_date, recorded_at);
