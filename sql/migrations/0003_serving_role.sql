-- overnight_serving: the group role of the lookup service. It may read the schema and nothing more;
-- the batch side (the role that runs migrations and publishes) owns the tables and writes them.
-- A login role for the service joins it:  CREATE ROLE overnight_api LOGIN PASSWORD '...' IN ROLE overnight_serving;
-- Roles belong to the whole cluster, and other databases may have created this one already (or be
-- creating it right now), so every statement here can run again.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'overnight_serving') THEN
        CREATE ROLE overnight_serving NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- created concurrently by a migration of another database
END
$$;

GRANT USAGE ON SCHEMA overnight TO overnight_serving;
GRANT SELECT ON ALL TABLES IN SCHEMA overnight TO overnight_serving;
-- Batch tables created from now on by the role running this migration (the publisher) are readable too.
ALTER DEFAULT PRIVILEGES IN SCHEMA overnight GRANT SELECT ON TABLES TO overnight_serving;
