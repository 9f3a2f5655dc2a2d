-- overnight_console: the group role of the operator console (`overnight console`). It reads what the
-- dashboard shows (the queries of sql/queries/console.sql) and nothing else: no batch table, no online
-- log, no write anywhere.
-- A login role for the console joins it:  CREATE ROLE overnight_dash LOGIN PASSWORD '...' IN ROLE overnight_console;
-- Roles belong to the whole cluster, and other databases may have created this one already (or be
-- creating it right now), so every statement here can run again.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'overnight_console') THEN
        CREATE ROLE overnight_console NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- created concurrently by a migration of another database
END
$$;

GRANT USAGE ON SCHEMA overnight TO overnight_console;
GRANT SELECT ON
    overnight.live,
    overnight.batches,
    overnight.canary,
    overnight.model_versions,
    overnight.runs,
    overnight.run_steps,
    overnight.monitor_acceptances,
    overnight.monitor_checks,
    overnight.monitor_reports,
    overnight.retrain_requests,
    overnight.alerts,
    overnight.online_daily
TO overnight_console;
-- dashboard_runs and dashboard_run_steps tell abandoned runs with these (migration 0016). PUBLIC may
-- run functions by default; granted by name so a database that revoked that still shows its runs.
GRANT EXECUTE ON FUNCTION overnight.run_abandoned(bigint), overnight.recorder_gone(integer, text)
TO overnight_console;
-- Unlike overnight_serving (0003), no default privileges: the tables the batch side creates after
-- migrations are one batch's lists (recs_<id>, ...), which the console never reads. A later migration
-- whose table the console reads grants it here by name, as 0016 does for overnight_serving.
