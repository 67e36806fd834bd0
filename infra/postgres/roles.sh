#!/bin/sh
# PostgreSQL init script (compose.yaml mounts it after init.sql; it runs once, on an empty
# data volume): one login role per service, owner of its database, and no other role may
# connect to that database. The MLflow server, the Prefect server and the worker's Optuna
# studies each hold their own password (POSTGRES_<SERVICE>_PASSWORD), never the
# superuser's. For a data volume made before these roles existed, run it by hand:
#   docker compose -f infra/compose.yaml --env-file infra/.env exec postgres \
#       sh /docker-entrypoint-initdb.d/20-roles.sh
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v mlflow_pw="$POSTGRES_MLFLOW_PASSWORD" \
    -v prefect_pw="$POSTGRES_PREFECT_PASSWORD" \
    -v optuna_pw="$POSTGRES_OPTUNA_PASSWORD" <<'SQL'
-- the values are psql variables, quoted by format(%L): never spliced into the SQL text
SELECT format('CREATE ROLE %I LOGIN', r) FROM unnest(ARRAY['mlflow', 'prefect', 'optuna']) AS r
    WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) \gexec
SELECT format('ALTER ROLE mlflow PASSWORD %L', :'mlflow_pw') \gexec
SELECT format('ALTER ROLE prefect PASSWORD %L', :'prefect_pw') \gexec
SELECT format('ALTER ROLE optuna PASSWORD %L', :'optuna_pw') \gexec
ALTER DATABASE mlflow OWNER TO mlflow;
ALTER DATABASE prefect OWNER TO prefect;
ALTER DATABASE optuna OWNER TO optuna;
REVOKE ALL ON DATABASE mlflow, prefect, optuna FROM PUBLIC;
SQL
