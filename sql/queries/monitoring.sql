-- Monitoring's checks, reports, acceptances and alerts (jobs/monitoring/).

-- name: delete_monitor_checks
DELETE FROM overnight.monitor_checks WHERE logical_date = %s AND stage = %s;

-- name: insert_monitor_check
INSERT INTO overnight.monitor_checks
    (logical_date, stage, statistic, subject, value, level, message, warn_at, fail_at, bad_side, details,
     run_id, model_id, batch_id)
VALUES (%(logical_date)s, %(stage)s, %(statistic)s, %(subject)s, %(value)s, %(level)s, %(message)s,
        %(warn_at)s, %(fail_at)s, %(bad_side)s, %(details)s, %(run_id)s, %(model_id)s, %(batch_id)s);

-- name: upsert_monitor_report
INSERT INTO overnight.monitor_reports (logical_date, stage, verdict, report, run_id, model_id, batch_id)
VALUES (%(logical_date)s, %(stage)s, %(verdict)s, %(report)s, %(run_id)s, %(model_id)s, %(batch_id)s)
ON CONFLICT (logical_date, stage) DO UPDATE SET
    verdict = EXCLUDED.verdict, report = EXCLUDED.report, run_id = EXCLUDED.run_id,
    model_id = EXCLUDED.model_id, batch_id = EXCLUDED.batch_id, created_at = now();

-- name: monitor_checks_for_date
SELECT stage, statistic, subject, value, level, message, warn_at, fail_at, bad_side, details, run_id,
       model_id, batch_id
FROM overnight.monitor_checks
WHERE logical_date = %s
ORDER BY array_position(ARRAY['input', 'drift', 'output'], stage), statistic, subject;

-- name: monitor_reports_for_date
SELECT stage, verdict, report, run_id, model_id, batch_id, created_at
FROM overnight.monitor_reports WHERE logical_date = %s;

-- name: request_retrain
INSERT INTO overnight.retrain_requests (model_id, logical_date, reason) VALUES (%s, %s, %s)
ON CONFLICT (model_id, logical_date) DO UPDATE SET reason = EXCLUDED.reason, created_at = now();

-- name: withdraw_retrain
DELETE FROM overnight.retrain_requests WHERE model_id = %s AND logical_date = %s;

-- name: retrain_request_for_date
-- The newest drift request against the model that a date would use (a newer model answers it).
SELECT r.reason
FROM overnight.retrain_requests AS r
WHERE r.logical_date <= %(logical_date)s
  AND r.model_id = (SELECT m.model_id FROM overnight.model_versions AS m
                    WHERE m.status IN ('production', 'retired') AND m.logical_date <= %(logical_date)s
                    ORDER BY m.logical_date DESC, m.created_at DESC LIMIT 1)
ORDER BY r.logical_date DESC
LIMIT 1;

-- name: previous_kept_batch
-- Yesterday's lists: the newest batch of an earlier date whose table is still kept.
SELECT batch_id, logical_date FROM overnight.batches
WHERE logical_date < %s AND status IN ('live', 'ready', 'retired')
ORDER BY logical_date DESC, batch_id DESC
LIMIT 1;

-- name: record_acceptance
INSERT INTO overnight.monitor_acceptances (logical_date, batch_id, run_id, checks, reason, accepted_by)
VALUES (%(logical_date)s, %(batch_id)s, %(run_id)s, %(checks)s, %(reason)s, %(accepted_by)s)
RETURNING accepted_at;

-- name: record_alert
-- True when the fingerprint is new (send it), false when it was sent before (only counted).
INSERT INTO overnight.alerts (fingerprint, title, details) VALUES (%s, %s, %s)
ON CONFLICT (fingerprint) DO UPDATE SET
    last_seen_at = now(), times_seen = overnight.alerts.times_seen + 1
RETURNING times_seen = 1;
