-- One server, one database per service (compose.yaml mounts this as the first init script;
-- roles.sh then gives each database its own login role as owner).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
CREATE DATABASE optuna;
