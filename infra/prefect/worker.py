"""The process worker of compose.yaml: Prefect's process worker, except that it always uses
process-base-job-template.json (this directory, baked into the image) as its pool's base
job template, whatever the pool on the Prefect server holds.

A work pool's template lives on the server, and anyone with the server's credentials could
change it (a command of their own, an `env` for every run). This worker ignores that copy:
every run gets the fixed command (guard.py), no `env`, `command` or `working_dir` from the
deployment or the run, and the worker's own environment. Usage:

    python infra/prefect/worker.py --pool fusion-process
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
from pathlib import Path
from typing import Any

from prefect.client.schemas.objects import WorkPool
from prefect.workers.process import ProcessWorker

TEMPLATE_FILE = Path(__file__).resolve().with_name("process-base-job-template.json")
TEMPLATE: dict[str, Any] = json.loads(TEMPLATE_FILE.read_text())

class PinnedProcessWorker(ProcessWorker):
    """ProcessWorker whose work pool always carries TEMPLATE as its base job template."""

    _reported: object = None  # the last differing server template, logged once

    @classmethod
    def __dispatch_key__(cls) -> str:
        # its own key in Prefect's worker registry, so that "process" stays Prefect's class
        return "fusion-pinned-process"

    @property
    def work_pool(self) -> WorkPool:
        pool = super().work_pool
        if pool.base_job_template != TEMPLATE:
            if pool.base_job_template != self._reported:
                self._reported = pool.base_job_template
                self._logger.warning(
                    "work pool %r: the server's base job template differs from %s; "
                    "using the file", pool.name, TEMPLATE_FILE.name)
            pool = pool.model_copy(update={"base_job_template": copy.deepcopy(TEMPLATE)})
        return pool


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", required=True, help="the work pool to poll")
    parser.add_argument("--name", default=None, help="the worker's name")
    parser.add_argument("--limit", type=int, default=None, help="flow runs at once")
    args = parser.parse_args(argv)
    worker = PinnedProcessWorker(work_pool_name=args.pool, name=args.name, limit=args.limit,
                                 base_job_template=copy.deepcopy(TEMPLATE))
    asyncio.run(worker.start())


if __name__ == "__main__":
    main()
