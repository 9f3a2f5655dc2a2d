-- A batch published with explanations (OVERNIGHT_EXPLANATIONS): its recs table has reason_codes and
-- reason_refs beside each user's list (sql/contract.py), which `?explain=true` returns.
ALTER TABLE overnight.batches ADD COLUMN explained boolean NOT NULL DEFAULT false;
