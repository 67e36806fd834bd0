"""Prefect tasks shared by the flows: DVC and ``fusion`` commands with streamed logs.

Every stage runs as the same command a user would type (``dvc repro <stage>``,
``fusion promote``), in the repository, so ``dvc.lock`` stays the record of what ran.
Retry policy: a failure whose ``fusion`` exit code is ``EXIT_BAD_INPUT`` (bad data or
configuration) fails at once with its reason; anything else (an unreachable server, a lost
Ray node, an S3 error) is retried. DVC commands of one repository hold a Prefect global
concurrency slot, one at a time, because DVC locks the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

import fusion.models  # noqa: F401  (registers the families: params types their sections)
from fusion.errors import EXIT_BAD_INPUT

RETRIES = 2
RETRY_DELAY_S = 20


class StageFailed(Exception):
    """A command failed; ``code`` is the ``fusion`` exit code when DVC ran it."""

    def __init__(self, command: str, code: int, reason: str) -> None:
        super().__init__(f"`{command}` failed (exit {code}): {reason}")
        self.command, self.code, self.reason = command, code, reason


class BadData(StageFailed):
    """Bad data or configuration: retrying cannot help."""


def exit_code(output: list[str], returncode: int) -> int:
    """The ``fusion`` exit code: DVC reports a failed stage command as 'exited with N'."""
    found = [int(m) for line in output for m in re.findall(r"exited with (-?\d+)", line)]
    return found[-1] if found else returncode


def failure(command: str, returncode: int, output: list[str]) -> StageFailed:
    code = exit_code(output, returncode)
    errors = [line.strip() for line in output if "error" in line.lower()]
    reason = " | ".join(errors[-3:]) or " | ".join(line.strip() for line in output[-3:])
    return (BadData if code == EXIT_BAD_INPUT else StageFailed)(command, code, reason)


def retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry everything except bad data."""
    return not isinstance(state.result(raise_on_failure=False), BadData)


def _tool(name: str) -> str:
    """The tool from this environment (a Prefect worker's PATH may not hold it)."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def run_command(args: list[str], repo: Path, env: dict[str, str]) -> list[str]:
    """Run a command in ``repo``, streaming its output to the flow log; returns the lines."""
    logger = get_run_logger()
    command = " ".join(args)
    logger.info("$ %s", command)
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=200)
    with subprocess.Popen([_tool(args[0]), *args[1:]], cwd=repo, env={**os.environ, **env},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                logger.info(line)
                lines.append(line)
                tail.append(line)
    if proc.returncode:
        raise failure(command, proc.returncode, list(tail))
    return lines


def _run_name(tool: str):
    def name() -> str:
        from prefect.runtime import task_run

        return " ".join([tool, *task_run.parameters["args"]])
    return name


def dvc_limit_name(repo: Path) -> str:
    return f"dvc-{hashlib.sha256(str(repo.resolve()).encode()).hexdigest()[:12]}"


@contextmanager
def dvc_slot(repo: Path) -> Iterator[None]:
    """One DVC command per repository at a time, across flow runs on this Prefect server."""
    name = dvc_limit_name(repo)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    with concurrency(name, occupy=1, strict=True):
        yield


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retryable,
      task_run_name=_run_name("dvc"), tags=["dvc"])
def dvc(repo: Path, args: list[str], env: dict[str, str]) -> list[str]:
    """A DVC command (``repro STAGE``, ``pull``, ``push``) holding the repository's slot."""
    with dvc_slot(repo):
        return run_command(["dvc", *args], repo, env)


@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=retryable,
      task_run_name=_run_name("fusion"))
def fusion(repo: Path, args: list[str], env: dict[str, str]) -> list[str]:
    """A ``fusion`` command that is not a DVC stage (status, promote, search)."""
    return run_command(["fusion", *args], repo, env)


def flow_parser(doc: str | None) -> argparse.ArgumentParser:
    """Command line of a flow module: the options every flow takes, the rest added by it."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".")
    parser.add_argument("--tracking-uri", default="")
    parser.add_argument("--ray-address", default="")
    return parser


def stage_env(tracking_uri: str = "", ray_address: str = "") -> dict[str, str]:
    """Environment of the stage commands: where MLflow and Ray are, unbuffered logs."""
    tools = str(Path(sys.executable).parent)  # dvc runs `fusion` from this environment
    return {"PYTHONUNBUFFERED": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "PATH": f"{tools}{os.pathsep}{os.environ.get('PATH', '')}",
            **({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}),
            **({"RAY_ADDRESS": ray_address} if ray_address else {})}


@contextmanager
def shared_ray(repo: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The stage environment, with one Ray instance for all stages of a flow run.

    When no cluster is named (flow parameter, ``ray.address`` in params.yaml, $RAY_ADDRESS),
    each stage would start and tear down its own local Ray, about 30 s each on 2 cores.
    Instead this process starts one local instance, the stages join it through RAY_ADDRESS,
    and it stops when the block ends.
    """
    from fusion.params import load_params

    named = env.get("RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if named or load_params(repo / "params.yaml").ray.address:
        yield env
        return
    from fusion.engine.cluster import WORKER_ENV, local_cpus

    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    context = ray.init(address="local", num_cpus=local_cpus(), logging_level="WARNING")
    try:
        yield {**env, "RAY_ADDRESS": context.address_info["gcs_address"]}
    finally:
        ray.shutdown()


def has_remote(repo: Path, env: dict[str, str]) -> bool:
    done = subprocess.run([_tool("dvc"), "remote", "default"], cwd=repo, capture_output=True,
                          text=True, env={**os.environ, **env})
    return done.returncode == 0 and bool(done.stdout.strip())
