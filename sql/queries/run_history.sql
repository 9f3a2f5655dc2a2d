-- The run history: overnight.runs and overnight.run_steps (jobs/monitoring/history.py).

-- name: start_run
-- A CLI run gets a new row, owned by its recorder; an Airflow dag run gets one row, whichever of its
-- tasks reports first, owned by none (each task's process owns its step).
INSERT INTO overnight.runs (logical_date, trigger, external_id, owner_pid, owner_name)
VALUES (%(logical_date)s, %(trigger)s, %(external_id)s, %(owner_pid)s, %(owner_name)s)
ON CONFLICT (trigger, external_id) WHERE external_id IS NOT NULL
DO UPDATE SET external_id = EXCLUDED.external_id
RETURNING run_id;

-- name: recorder_session
-- The connection a recorder holds while its run or step runs: the server notices a lost machine within
-- about two minutes (keepalives) and never closes the connection for being idle.
SELECT pg_backend_pid(), set_config('tcp_keepalives_idle', '60', false),
       set_config('tcp_keepalives_interval', '10', false), set_config('tcp_keepalives_count', '6', false),
       set_config('idle_session_timeout', '0', false);

-- name: mark_abandoned_steps
-- Steps left 'running' by a process that died (see migration 0016), with when it was noticed.
UPDATE overnight.run_steps SET status = 'abandoned', abandoned_at = now()
WHERE status = 'running' AND overnight.recorder_gone(owner_pid, owner_name)
RETURNING run_id, step;

-- name: mark_abandoned_runs
UPDATE overnight.runs SET status = 'abandoned', abandoned_at = now()
WHERE status = 'running' AND overnight.run_abandoned(run_id)
RETURNING run_id;

-- name: start_run_step
INSERT INTO overnight.run_steps (run_id, step, status, started_at, owner_pid, owner_name)
VALUES (%(run_id)s, %(step)s, 'running', now(), %(owner_pid)s, %(owner_name)s)
ON CONFLICT (run_id, step) DO UPDATE SET
    status = 'running', attempt = overnight.run_steps.attempt + 1, started_at = now(),
    finished_at = NULL, seconds = NULL, peak_memory_bytes = NULL, rows_in = NULL, rows_out = NULL,
    summary = NULL, error = NULL, abandoned_at = NULL, batch_id = NULL, model_id = NULL,
    owner_pid = EXCLUDED.owner_pid,
    owner_name = EXCLUDED.owner_name;

-- name: resume_run
-- A step starting again makes its run running again: after an Airflow retry of a failed attempt, or a
-- dag run cleared or backfilled again (a blocked night re-run with accept_checks); any step starting
-- makes an abandoned run running again.
UPDATE overnight.runs SET status = 'running', abandoned_at = NULL, error = NULL, finished_at = NULL
WHERE run_id = %(run_id)s AND status <> 'running'
  AND (status = 'abandoned'
       OR EXISTS (SELECT 1 FROM overnight.run_steps AS s
                  WHERE s.run_id = %(run_id)s AND s.step = %(step)s AND s.attempt > 1));

-- name: finish_run_step
-- A step's end is recorded even if it was taken for abandoned (its recorder's connection was lost).
UPDATE overnight.run_steps
SET status = %(status)s, finished_at = now(), seconds = %(seconds)s,
    peak_memory_bytes = %(peak_memory_bytes)s, rows_in = %(rows_in)s, rows_out = %(rows_out)s,
    summary = %(summary)s, error = %(error)s, abandoned_at = NULL, batch_id = %(batch_id)s,
    model_id = %(model_id)s
WHERE run_id = %(run_id)s AND step = %(step)s;

-- name: note_run_result
-- What a step learned about the run (the batch it published, the model it used).
UPDATE overnight.runs
SET batch_id = coalesce(%(batch_id)s, batch_id), model_id = coalesce(%(model_id)s, model_id)
WHERE run_id = %(run_id)s;

-- name: finish_run
-- A run ends as its first step that failed or was blocked, whichever process reports its end: `overnight
-- run` raises the first error; in an Airflow dag run each failing task reports, and the online upkeep runs
-- (and ends the run) after them. Without such a step, as reported.
WITH failed_step AS (
    SELECT status, error FROM overnight.run_steps
    WHERE run_id = %(run_id)s AND status IN ('failed', 'blocked')
    ORDER BY finished_at, step LIMIT 1
)
UPDATE overnight.runs
SET status = coalesce((SELECT status FROM failed_step), %(status)s),
    error = coalesce((SELECT error FROM failed_step), %(error)s), abandoned_at = NULL,
    finished_at = CASE WHEN %(status)s = 'running' THEN NULL ELSE now() END
WHERE run_id = %(run_id)s;

-- name: recent_runs
-- The newest runs with each step's status and the checks accepted to publish their batch, if any
-- (`overnight status`); abandoned runs are marked before (mark_abandoned_steps, mark_abandoned_runs).
SELECT r.run_id, r.logical_date, r.trigger, r.status, r.started_at, r.finished_at, r.abandoned_at,
       r.batch_id, r.model_id, r.error,
       coalesce((SELECT jsonb_object_agg(s.step, s.status)
                 FROM overnight.run_steps AS s WHERE s.run_id = r.run_id), '{}') AS steps,
       (SELECT jsonb_build_object('reason', a.reason, 'accepted_by', a.accepted_by, 'accepted_at', a.accepted_at,
                                  'batch_id', a.batch_id, 'checks', a.checks)
        FROM overnight.monitor_acceptances AS a WHERE a.run_id = r.run_id
        ORDER BY a.accepted_at DESC LIMIT 1) AS accepted
FROM overnight.runs AS r
ORDER BY r.started_at DESC, r.run_id DESC
LIMIT %s;
