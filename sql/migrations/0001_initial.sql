-- The contract between the batch side (jobs/) and the serving side (serving/).
-- One table per published batch (overnight.recs_<batch_id>), a registry of batches and
-- models, and a single-row pointer at the batch that is live.

CREATE SCHEMA IF NOT EXISTS overnight;

CREATE TABLE overnight.model_versions (
    model_id        text PRIMARY KEY,
    logical_date    date NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    status          text NOT NULL
                    CHECK (status IN ('candidate', 'production', 'rejected', 'retired')),
    status_reason   text,
    -- the point-in-time window: features from events before features_before,
    -- labels from [label_start, label_end)
    data_window     jsonb NOT NULL,
    params          jsonb NOT NULL,
    features        text[] NOT NULL,
    metrics         jsonb NOT NULL,
    artifact_path   text NOT NULL,
    artifact_sha256 text NOT NULL CHECK (artifact_sha256 ~ '^[0-9a-f]{64}$')
);

CREATE INDEX model_versions_status_date ON overnight.model_versions (status, logical_date DESC);

CREATE TABLE overnight.batches (
    batch_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    logical_date      date NOT NULL,
    model_id          text NOT NULL REFERENCES overnight.model_versions,
    -- loading -> ready -> live -> retired -> dropped; loading -> failed
    status            text NOT NULL
                      CHECK (status IN ('loading', 'ready', 'live', 'retired', 'failed', 'dropped')),
    k                 integer NOT NULL CHECK (k > 0),
    users_scored      bigint NOT NULL,
    active_users      bigint NOT NULL,
    fallback_item_ids text[] NOT NULL,
    fallback_scores   real[] NOT NULL,
    generated_at      timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    published_at      timestamptz,
    validation        jsonb,
    failure_reason    text,
    -- backend pid of the publish loading it: a 'loading' batch whose loader is gone is an orphan
    loader_pid        integer
);

CREATE INDEX batches_logical_date ON overnight.batches (logical_date, batch_id);

-- Exactly one row once anything has been published; switched in one transaction with NOTIFY.
CREATE TABLE overnight.live (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    batch_id    bigint NOT NULL REFERENCES overnight.batches,
    switched_at timestamptz NOT NULL DEFAULT now()
);

-- Every switch of the live pointer, for audit and for `overnight status`.
CREATE TABLE overnight.live_history (
    switch_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id          bigint NOT NULL REFERENCES overnight.batches,
    previous_batch_id bigint REFERENCES overnight.batches,
    action            text NOT NULL CHECK (action IN ('publish', 'rollback')),
    switched_at       timestamptz NOT NULL DEFAULT now()
);
