"""Prefect flows: the orchestration edge of the pipeline (retraining, search, deployments)."""

import os

# Read when Prefect is first imported: the ephemeral server needs more than the default
# start-up time on a 2-core machine, and telemetry has nowhere to go in a closed network.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
