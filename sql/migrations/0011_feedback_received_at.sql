-- Ingest of D reads the feedback the service received in its window (jobs/steps/feedback_interactions.py), whatever
-- day the events happened on: received_at needs an index of its own. BRIN, like occurred_at's: the
-- service writes events in the order it receives them, so each day partition's rows are in
-- received_at order, and a partition received entirely before the window is skipped for the price of
-- reading its few index pages. Created on the parent, so every partition has it, present and future.
CREATE INDEX feedback_events_received_at ON overnight.feedback_events USING brin (received_at);
