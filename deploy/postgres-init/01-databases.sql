-- The first start of the postgres container creates the overnight database (POSTGRES_DB);
-- Airflow's metadata lives in a database of its own on the same server.
CREATE DATABASE airflow;
