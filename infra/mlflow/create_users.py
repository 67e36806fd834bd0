"""Create (or update) the pipeline's MLflow user on a basic-auth MLflow server.

Runs as the one-off compose service `mlflow-users`, authenticated as the admin
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD): the user FUSION_MLFLOW_USERNAME with
the password FUSION_MLFLOW_PASSWORD, not an admin. The worker and the Ray nodes log, register
and promote as that user; the admin's password stays with the server and the people who
administer it. Rerunning it sets the password again (rotation: change it in infra/.env).
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    from mlflow.exceptions import RestException
    from mlflow.server.auth.client import AuthServiceClient

    username = os.environ["FUSION_MLFLOW_USERNAME"]
    password = os.environ["FUSION_MLFLOW_PASSWORD"]
    if username == os.environ.get("MLFLOW_TRACKING_USERNAME"):
        print("the pipeline's MLflow user must not be the admin", file=sys.stderr)
        return 2
    client = AuthServiceClient(os.environ["MLFLOW_TRACKING_URI"])
    try:
        user = client.get_user(username)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(username, password)
        print(f"MLflow user {username!r} created")
        return 0
    client.update_user_password(username, password)
    if user.is_admin:
        client.update_user_admin(username, False)
    print(f"MLflow user {username!r} exists: password set, not an admin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
