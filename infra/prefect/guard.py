"""The command of every flow run on the fusion work pools: run only this project's deployments.

The pools' base job templates (process-base-job-template.json, k8s-base-job-template.json)
fix the command to this file, taken from the image; worker.py keeps the process pool's
template whatever the Prefect server says. It replaces `python -m prefect.engine`, which
would run whatever the deployment on the server names: its pull steps (any repository, any
shell command), its entrypoint and parameters. Here, before any code of the run is loaded:

- the run's deployment must be one of prefect.yaml (this directory, baked into the image),
  on the same work pool and with the same entrypoint;
- every parameter must pass RULES: `repo` is ".", `params_file` one of the files the
  deployments name (or params.yaml), no `tracking_uri` or `ray_address` (the run would
  send the MLflow credentials or the Ray token to a server of the caller's choosing),
  `profile` and `study` plain names, `trials` bounded;
- the code is cloned from $FUSION_GIT_URL at $FUSION_GIT_BRANCH (the worker's environment),
  not from the deployment's pull steps, and the flow is loaded from the allowed entrypoint;
  its name must be the one the run was created for;
- the flow runs with the parameters checked here (a later change of the run's parameters
  through the API does not reach it).

A refused run is set Failed with the reason, and nothing of it runs. What this does not
stop (someone with the Prefect credentials can still start, cancel or delete the allowed
deployments, and read their logs) is in docs/security.md.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

PREFECT_FILE = Path(__file__).resolve().with_name("prefect.yaml")
DEFAULT_PARAMS_FILE = "params.yaml"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PROFILES = re.compile(r"[A-Za-z0-9_-]{1,64}(,[A-Za-z0-9_-]{1,64}){0,7}")
MAX_TRIALS = 1000


class Refused(Exception):
    """A flow run this worker will not run."""


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_trials(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TRIALS


def _is_empty(value: Any) -> bool:
    return value in ("", None)


def rules(params_files: set[str]) -> dict[str, Callable[[Any], bool]]:
    """Parameter name -> whether a value is allowed. A name not here is refused."""
    return {
        "repo": lambda v: v == ".",  # the clone made here
        "params_file": lambda v: v in params_files,
        "profile": lambda v: v == "" or (isinstance(v, str) and bool(_PROFILES.fullmatch(v))),
        "search_first": _is_bool,
        "push": _is_bool,
        "write_params": _is_bool,
        "trials": _is_trials,
        "study": lambda v: v == "" or (isinstance(v, str) and bool(_NAME.fullmatch(v))),
        # the services of the worker's environment, never one named by the caller
        "tracking_uri": _is_empty,
        "ray_address": _is_empty,
    }


def allowed_deployments(prefect_file: Path = PREFECT_FILE) -> dict[str, dict[str, Any]]:
    """The deployments of prefect.yaml by name."""
    config = yaml.safe_load(prefect_file.read_text())
    return {d["name"]: d for d in config["deployments"]}


def check(deployment: str, entrypoint: str | None, pool: str | None,
          parameters: dict[str, Any], prefect_file: Path = PREFECT_FILE) -> str:
    """The entrypoint to run for a flow run of `deployment` (its name) on work pool `pool`
    with `parameters`, whose deployment on the server has `entrypoint`; Refused if any of
    them is not what prefect.yaml allows."""
    allowed = allowed_deployments(prefect_file)
    spec = allowed.get(deployment)
    if spec is None:
        raise Refused(f"deployment {deployment!r} is not one of {sorted(allowed)} "
                      f"({prefect_file.name} of the worker's image)")
    if entrypoint != spec["entrypoint"]:
        raise Refused(f"deployment {deployment!r} runs {entrypoint!r}, "
                      f"not {spec['entrypoint']!r}")
    if pool != spec["work_pool"]["name"]:
        raise Refused(f"deployment {deployment!r} belongs on work pool "
                      f"{spec['work_pool']['name']!r}, not {pool!r}")
    params_files = {DEFAULT_PARAMS_FILE} | {
        d.get("parameters", {}).get("params_file", DEFAULT_PARAMS_FILE) for d in allowed.values()}
    allowed_values = rules(params_files)
    for name, value in sorted(parameters.items()):
        rule = allowed_values.get(name)
        if rule is None or not rule(value):
            raise Refused(f"parameter {name}={value!r} is not allowed on this worker")
    return spec["entrypoint"]


def clone() -> Path:
    """The repository and branch of the worker's environment, cloned into the working
    directory (the worker's fresh temporary directory for this run)."""
    from prefect.deployments.steps import git_clone

    url, branch = os.environ.get("FUSION_GIT_URL"), os.environ.get("FUSION_GIT_BRANCH")
    if not url or not branch:
        raise Refused("FUSION_GIT_URL and FUSION_GIT_BRANCH must be set on the worker")
    return Path(git_clone(repository=url, branch=branch)["directory"]).resolve()


def _refuse(flow_run_id: UUID, reason: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    print(f"flow run {flow_run_id} refused: {reason}", file=sys.stderr)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Failed(message=f"Refused by the worker: "
                                                               f"{reason}"), force=True)
    return 1


def main() -> int:
    flow_run_id = UUID(os.environ["PREFECT__FLOW_RUN_ID"])
    # as `python -m prefect.engine` does: the runner's control channel (cancellation)
    from prefect._internal.control_listener import configure_from_env

    configure_from_env()
    from prefect.client.orchestration import get_client
    from prefect.engine import handle_engine_signals
    from prefect.flow_engine import flow_run_logger, run_flow
    from prefect.flows import load_flow_from_entrypoint

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.deployment_id is None:
            return _refuse(flow_run_id, "the flow run has no deployment")
        deployment = client.read_deployment(flow_run.deployment_id)
        flow_name = client.read_flow(flow_run.flow_id).name
    try:
        entrypoint = check(deployment.name, deployment.entrypoint, flow_run.work_pool_name,
                           dict(flow_run.parameters or {}))
        repo = clone()
    except Refused as exc:
        return _refuse(flow_run_id, str(exc))
    with handle_engine_signals(flow_run_id):
        os.chdir(repo)
        sys.path.insert(0, str(repo))
        flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
        if flow.name != flow_name:
            return _refuse(flow_run_id, f"{entrypoint} is flow {flow.name!r}, "
                                        f"the run is of {flow_name!r}")
        run_flow(flow, flow_run=flow_run, error_logger=flow_run_logger(flow_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
