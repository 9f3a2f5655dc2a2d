-- A third kind of batch: 'candidate', a registered model's lists scored for a canary (`overnight canary
-- --model`, and the nightly refresh of a model canary). Such a batch goes live only by a promotion, so
-- a rollback never goes to one that never was live, and one that never was (a stopped canary's, or one
-- scored while its canary was stopped) has its own retention instead of taking one of the places that
-- retention keeps for rollback. The shadow's rules are unchanged: a shadow batch is never served.
ALTER TABLE overnight.batches DROP CONSTRAINT batches_kind_check;
ALTER TABLE overnight.batches
    ADD CONSTRAINT batches_kind_check CHECK (kind IN ('serving', 'candidate', 'shadow'));
