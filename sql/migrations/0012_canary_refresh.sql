-- A canary of a model is refreshed each night (jobs.rollouts.model_canary.refresh_canary): the night's date is
-- scored with the canary's model and the canary moves to that batch, keeping its salt and traffic, so
-- the same users compare fresh lists with fresh lists. The move is recorded as a 'refresh'; it does
-- not end the canary's period (the online report's canary minus production spans it).
ALTER TABLE overnight.canary_history DROP CONSTRAINT canary_history_action_check;
ALTER TABLE overnight.canary_history
    ADD CONSTRAINT canary_history_action_check CHECK (action IN ('start', 'ramp', 'refresh', 'stop', 'promote'));
