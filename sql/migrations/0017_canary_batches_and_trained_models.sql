-- "candidate" meant three things: the candidate generators, a model status and a batch kind. A batch
-- scored for a canary is now of kind 'canary' (migration 0014 named it 'candidate'); a registered model
-- that the promotion gate has not decided on is 'trained'. Rows keep their meaning under the new names.
ALTER TABLE overnight.batches DROP CONSTRAINT batches_kind_check;
UPDATE overnight.batches SET kind = 'canary' WHERE kind = 'candidate';
ALTER TABLE overnight.batches
    ADD CONSTRAINT batches_kind_check CHECK (kind IN ('serving', 'canary', 'shadow'));

ALTER TABLE overnight.model_versions DROP CONSTRAINT model_versions_status_check;
UPDATE overnight.model_versions SET status = 'trained' WHERE status = 'candidate';
ALTER TABLE overnight.model_versions
    ADD CONSTRAINT model_versions_status_check CHECK (status IN ('trained', 'production', 'rejected', 'retired'));
