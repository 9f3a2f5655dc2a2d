-- Applying the migrations of sql/migrations (sql.migrations, jobs.database.upgrade).

-- name: create_migrations_table
CREATE SCHEMA IF NOT EXISTS overnight;
CREATE TABLE IF NOT EXISTS overnight.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: lock_migrations
SELECT pg_advisory_xact_lock(7368224362352640000);

-- name: applied_migrations
SELECT version FROM overnight.schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO overnight.schema_migrations (version, name) VALUES (%s, %s);
