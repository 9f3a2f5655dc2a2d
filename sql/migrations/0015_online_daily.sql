-- Each served model's online numbers per UTC day (impressions, clicks, conversions, CTR, conversion
-- rate and IPS click rate with their intervals: the online report's per-model rows for that one day),
-- stored by the nightly DAG for the day before its date (`jobs.rollouts.online.record_day`). The dashboard sets
-- them beside the held-out metrics without reading the prediction log, and they outlive the log's
-- partitions (OVERNIGHT_ONLINE_KEEP_DAYS). `complete`: the day's day of feedback grace had passed.
CREATE TABLE overnight.online_daily (
    day date NOT NULL,
    model_id text NOT NULL,
    summary jsonb NOT NULL,
    complete boolean NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, model_id)
);
