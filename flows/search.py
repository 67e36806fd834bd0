"""On-demand loss-weight search: ``fusion search`` (Optuna through Ray Tune) as a flow.

Prepares the data through DVC, runs or resumes the Optuna study (``search`` in params),
writes the best weights into params.yaml (the retrain flow and ``dvc repro`` train them)
and publishes the trial table as a markdown artifact::

    python -m flows.search --trials 12
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

import fusion.models  # noqa: F401  (registers the families: params types their sections)
from flows.tasks import dvc, flow_parser, fusion, shared_ray, stage_env
from fusion.params import load_params


def trials_table(path: Path) -> str:
    with path.open() as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(body, key=lambda r: -float(r[2]) if r[2] else float("inf")):
        lines.append("| " + " | ".join(f"{float(c):.4g}" if _number(c) else c
                                       for c in row) + " |")
    return "\n".join(lines)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return not text.isdigit()


@flow(name="fusion-search", log_prints=True)
def search(repo: str = ".", trials: int = 0, study: str = "", write_params: bool = True,
           tracking_uri: str = "", ray_address: str = "") -> dict[str, Any]:
    """Run or resume the loss-weight search; returns best.json.

    Args:
        repo: the DVC repository to run in.
        trials: trials the study should hold (0: search.trials); a rerun adds the missing.
        study: Optuna study name (default: search.study); the same name resumes it.
        write_params: write the best weights into params.yaml (else only best.json).
        tracking_uri: MLflow tracking URI (default: params, $MLFLOW_TRACKING_URI, SQLite).
        ray_address: Ray cluster (default: ray.address, $RAY_ADDRESS, a local instance).
    """
    root = Path(repo).resolve()
    env = stage_env(tracking_uri, ray_address)
    dvc(root, ["repro", "prepare"], env)
    args = ["search", *(["--trials", str(trials)] if trials else []),
            *(["--study", study] if study else []), *([] if write_params else ["--no-write"])]
    with shared_ray(root, env) as ray_env:
        fusion(root, args, ray_env)
    out = root / load_params(root / "params.yaml").search.out
    best = json.loads((out / "best.json").read_text())
    weights = ", ".join(f"{k}={v:.4g}" for k, v in best["best"].items())
    create_markdown_artifact(
        f"# Search `{best['study']}`\n\nBest: trial {best['best_trial']} of {best['trials']} "
        f"(score {best['score']:+.4f}, relative gain over mean fusion on held-out pairs): "
        f"{weights}\n\n{trials_table(out / 'trials.csv')}\n",
        key="fusion-search", description="loss-weight search trials")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = flow_parser(__doc__)
    parser.add_argument("--trials", type=int, default=0)
    parser.add_argument("--study", default="")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    state = search(repo=args.repo, trials=args.trials, study=args.study,
                   write_params=not args.no_write, tracking_uri=args.tracking_uri,
                   ray_address=args.ray_address, return_state=True)
    if state.is_failed():
        print(f"search flow failed: {state.message}", file=sys.stderr)
        return 1
    best = state.result()
    print(f"search {best['study']}: best trial {best['best_trial']} (score {best['score']:+.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
