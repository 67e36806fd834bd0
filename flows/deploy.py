"""Deployments: retraining on a cron schedule (weekly by default) and the search on demand.

Serve both from one long-running process (no work pool needed) against a Prefect server::

    prefect server start                      # once, elsewhere; or point PREFECT_API_URL at yours
    python -m flows.deploy --repo /srv/fusion --cron "0 3 * * 1" --timezone Europe/Berlin
    prefect deployment run fusion-search/on-demand -p trials=16   # start a search

The schedule, repository and tracking URI can also come from the environment
(``FUSION_RETRAIN_CRON``, ``FUSION_REPO``, ``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import argparse
import os

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.retrain import retrain
from flows.search import search

WEEKLY = "0 3 * * 1"  # Mondays 03:00


def deployments(repo: str = ".", cron: str = WEEKLY, timezone: str = "UTC",
                tracking_uri: str = "") -> list[RunnerDeployment]:
    """The retraining deployment (scheduled) and the search deployment (on demand)."""
    common = {"repo": repo, "tracking_uri": tracking_uri}
    return [
        retrain.to_deployment(name="scheduled", schedule=Cron(cron, timezone=timezone),
                              parameters=common, tags=["fusion", "retrain"],
                              description="Retrain when data or params changed; register, "
                                          "promote."),
        search.to_deployment(name="on-demand", parameters=common, tags=["fusion", "search"],
                             description="Optuna/Ray Tune search over the loss weights."),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=os.environ.get("FUSION_REPO", "."))
    parser.add_argument("--cron", default=os.environ.get("FUSION_RETRAIN_CRON", WEEKLY))
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""))
    args = parser.parse_args(argv)
    serve(*deployments(os.path.abspath(args.repo), args.cron, args.timezone, args.tracking_uri))


if __name__ == "__main__":
    main()
