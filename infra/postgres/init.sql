-- One server, one database per service (compose.yaml mounts this as an init script).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
CREATE DATABASE optuna;
