#!/bin/sh
# One-off set-up of the stack's object store (compose.yaml: service `buckets`, image mc):
# the bucket `fusion` and one MinIO user per service, each with the policy of
# policies/<service>.json (read/write on its own prefixes only). Only this container and
# MinIO itself see the root keys. Rerunning it is safe: `policy create` overwrites the
# policy, `user add` sets the secret key of an existing user (rotation: change it in
# infra/.env and rerun), `policy attach` of an attached policy succeeds (mc >= 2024-10).
set -eu
POLICIES=/etc/fusion-minio/policies

mc alias set s3 http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing s3/fusion

user() {  # service access_key secret_key
    mc admin policy create s3 "fusion-$1" "$POLICIES/$1.json"
    mc admin user add s3 "$2" "$3"
    mc admin policy attach s3 "fusion-$1" --user "$2"
}
user mlflow "$S3_MLFLOW_ACCESS_KEY" "$S3_MLFLOW_SECRET_KEY"        # the MLflow server
user pipeline "$S3_PIPELINE_ACCESS_KEY" "$S3_PIPELINE_SECRET_KEY"  # the Prefect worker's flows
user ray "$S3_RAY_ACCESS_KEY" "$S3_RAY_SECRET_KEY"                 # the Ray nodes
