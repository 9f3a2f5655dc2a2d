-- Each step's own batch and model, as its result names them: a shadow's or a canary's batch is recorded
-- on its step, while the run's batch_id and model_id stay the night's production ones.
ALTER TABLE overnight.run_steps ADD COLUMN batch_id bigint, ADD COLUMN model_id text;

-- Runs and steps left 'running' without a recorder on record (recorded before migration 0016) can never be
-- told abandoned by their recorder's connection: they are marked abandoned now, once. An Airflow dag run
-- has no recorder of its own and is abandoned when its steps are (overnight.run_abandoned).
UPDATE overnight.run_steps SET status = 'abandoned', abandoned_at = now()
WHERE status = 'running' AND owner_name IS NULL;

UPDATE overnight.runs SET status = 'abandoned', abandoned_at = now()
WHERE status = 'running' AND (trigger = 'cli' AND owner_name IS NULL OR overnight.run_abandoned(run_id));
