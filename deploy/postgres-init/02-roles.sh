#!/usr/bin/env bash
# The login roles of the compose stack, so that only the postgres container itself (and this script)
# uses the superuser. Run by the postgres image at the first start of an empty volume, after
# 01-databases.sql, as the superuser over the container's Unix socket:
#
#   overnight          LOGIN, owns the overnight and airflow databases: every Airflow component and
#                      the batch side (airflow-init runs `airflow db migrate` and `overnight db upgrade`
#                      as it, so it owns the schema and every table the migrations and publish create)
#   overnight_serving  NOLOGIN group role of the lookup service. Created here, not left to migration
#                      0003: 0003 creates it only if it is missing, then grants it USAGE and SELECT
#                      (and 0006/0008/0013 INSERT on the online logs), so the owner needs no CREATEROLE
#                      and overnight_lookup can join it now, before any migration ran.
#   overnight_lookup   LOGIN, member of overnight_serving and nothing more: the lookup service
#   overnight_console  NOLOGIN group role of the console (the dashboard). Created here for the same reason;
#                      migration 0018 grants it USAGE and SELECT on what the dashboard reads, no write.
#   overnight_console_login
#                      LOGIN, member of overnight_console and nothing more: the console
#
# Passwords come from OVERNIGHT_DB_PASSWORD, OVERNIGHT_LOOKUP_DB_PASSWORD and OVERNIGHT_CONSOLE_DB_PASSWORD
# (.env). psql reads them
# with \getenv and quotes them as literals with :'var', so they never pass through the shell, a
# command line or string concatenation, and any character is safe here.
#
# Every statement can run again, so on a volume created before these roles existed run it once, with
# the Airflow, lookup and console services stopped:
#   docker compose up -d postgres
#   docker compose exec postgres bash /docker-entrypoint-initdb.d/02-roles.sh
# It then also hands the objects the superuser created in the two databases to `overnight` (on a new
# volume there are none yet).
set -e
: "${OVERNIGHT_DB_PASSWORD:?is not set: add it to .env}"
: "${OVERNIGHT_LOOKUP_DB_PASSWORD:?is not set: add it to .env}"
: "${OVERNIGHT_CONSOLE_DB_PASSWORD:?is not set: add it to .env}"
case "${POSTGRES_USER:-postgres}" in
    overnight | overnight_lookup | overnight_serving | overnight_console | overnight_console_login)
        echo "POSTGRES_USER must not be one of the roles this script creates" >&2
        false
        ;;
esac

overnight_roles_psql() {
    PGHOST= PGHOSTADDR= psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password \
        --username "${POSTGRES_USER:-postgres}" "$@"
}

# Roles belong to the cluster; the databases' owner and rights are set from the overnight database.
overnight_roles_psql --dbname overnight <<'EOSQL'
-- This session's statements carry the passwords: the server log never gets them, whatever
-- postgresql.conf says (not even the statement of an error).
SET log_statement = 'none';
SET log_min_duration_statement = -1;
SET log_min_error_statement = 'panic';
\getenv owner_password OVERNIGHT_DB_PASSWORD
\getenv lookup_password OVERNIGHT_LOOKUP_DB_PASSWORD
\getenv console_password OVERNIGHT_CONSOLE_DB_PASSWORD

SELECT 'CREATE ROLE overnight' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'overnight') \gexec
ALTER ROLE overnight WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'owner_password';

SELECT 'CREATE ROLE overnight_serving' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'overnight_serving') \gexec
ALTER ROLE overnight_serving WITH NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;

SELECT 'CREATE ROLE overnight_lookup' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'overnight_lookup') \gexec
ALTER ROLE overnight_lookup WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'lookup_password';
GRANT overnight_serving TO overnight_lookup;

SELECT 'CREATE ROLE overnight_console' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'overnight_console') \gexec
ALTER ROLE overnight_console WITH NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;

SELECT 'CREATE ROLE overnight_console_login' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'overnight_console_login') \gexec
ALTER ROLE overnight_console_login WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'console_password';
GRANT overnight_console TO overnight_console_login;

ALTER DATABASE overnight OWNER TO overnight;
ALTER DATABASE airflow OWNER TO overnight;
-- Only the owner (and, for the overnight database, the lookup service and the console) may connect.
REVOKE ALL ON DATABASE overnight FROM PUBLIC;
REVOKE ALL ON DATABASE airflow FROM PUBLIC;
GRANT CONNECT ON DATABASE overnight TO overnight_serving;
GRANT CONNECT ON DATABASE overnight TO overnight_console;
EOSQL

# Objects the superuser created before the owner role existed (a volume older than this script) go to
# the owner: schemas, tables, views, sequences, functions and types outside the system schemas.
adopt_sql=$(cat <<'EOSQL'
DO $adopt$
DECLARE
    superuser oid := (SELECT oid FROM pg_roles WHERE rolname = current_user);
    statement text;
BEGIN
    FOR statement IN
        SELECT format('ALTER SCHEMA %I OWNER TO overnight', n.nspname)
        FROM pg_namespace n
        WHERE n.nspowner = superuser AND n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
        UNION ALL
        SELECT format('ALTER %s %s OWNER TO overnight',
                      CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                                     WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
                                     ELSE 'TABLE' END,
                      c.oid::regclass)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relowner = superuser AND n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
          AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
          -- a serial or identity sequence follows its table
          AND (c.relkind <> 'S' OR NOT EXISTS (SELECT FROM pg_depend d
                                               WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                                 AND d.refclassid = 'pg_class'::regclass
                                                 AND d.deptype IN ('a', 'i')))
        UNION ALL
        SELECT format('ALTER ROUTINE %s OWNER TO overnight', p.oid::regprocedure)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE p.proowner = superuser AND n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
          AND NOT EXISTS (SELECT FROM pg_depend d
                          WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
        UNION ALL
        SELECT format('ALTER TYPE %s OWNER TO overnight', t.oid::regtype)
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE t.typowner = superuser AND n.nspname NOT LIKE 'pg\_%' AND n.nspname <> 'information_schema'
          AND t.typtype IN ('e', 'd', 'r')  -- enums, domains, ranges (row and array types follow)
          AND NOT EXISTS (SELECT FROM pg_depend d
                          WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e')
    LOOP
        EXECUTE statement;
    END LOOP;
END
$adopt$;
EOSQL
)
overnight_roles_psql --dbname airflow <<<"$adopt_sql"
overnight_roles_psql --dbname overnight <<<"$adopt_sql"

# Batch tables the owner publishes from now on are readable by the lookup service. Migration 0003 says
# so for the role that ran it: `overnight` on a new volume, the superuser on an older one.
overnight_roles_psql --dbname overnight <<'EOSQL'
SELECT 'ALTER DEFAULT PRIVILEGES FOR ROLE overnight IN SCHEMA overnight GRANT SELECT ON TABLES TO overnight_serving'
WHERE EXISTS (SELECT FROM pg_namespace WHERE nspname = 'overnight') \gexec
EOSQL
