"""Scheduled retraining: the DVC pipeline, on Ray, into the MLflow registry.

dvc pull (when a remote is configured) -> ``dvc repro prepare`` -> skip the rest when data
and params are what the champion was trained from -> (search) -> ``dvc repro`` of
train_phase1, train_phase2, evaluate, register -> ``fusion promote`` -> dvc push; then a
markdown artifact with the promotion decision, links to the version's model card and the
metric table.

Run once with the embedded defaults (local Ray, SQLite MLflow, ephemeral Prefect)::

    python -m flows.retrain                    # in the repository
    python -m flows.retrain --profile quality  # a named set of overrides (flows/profiles/)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

import fusion.models  # noqa: F401  (registers the families: params types their sections)
from flows.search import search
from flows.tasks import dvc, flow_parser, fusion, has_remote, shared_ray, stage_env
from fusion.errors import FusionError
from fusion.family import profile_update
from fusion.metric_names import EIGHT as METRICS
from fusion.mlops.model_card import card_uri, version_page
from fusion.params import load_params, update_params_file

PROFILES = Path(__file__).with_name("profiles")
TRAINING = ("train_phase1", "train_phase2", "evaluate", "register")


def apply_params(repo: Path, params_file: str, profile: str) -> list[str]:
    """Merge a params file and/or profiles (comma-separated: ``flows/profiles/<name>.yaml``,
    else a profile of the family, e.g. ``tiny`` or ``paper``) into the repo's params.yaml,
    validated as a whole first, so a bad one leaves params.yaml untouched; DVC then sees
    the values like any edit."""
    sources = []
    if params_file and Path(repo, params_file).resolve() != (repo / "params.yaml").resolve():
        sources.append(Path(repo, params_file))
    sources += [PROFILES / f"{name.strip()}.yaml" for name in profile.split(",") if name.strip()]
    merged: dict[str, Any] = {}
    for source in sources:
        if source.exists():
            _merge(merged, yaml.safe_load(source.read_text()) or {})
        elif source.parent == PROFILES:
            family = merged.get("model", {}).get("family") or load_params(
                repo / "params.yaml").model.family
            try:
                _merge(merged, profile_update(family, source.stem))
            except FusionError as exc:
                known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
                raise FusionError(f"profile {source.stem!r}: not in {PROFILES.name}/ "
                                  f"(profiles: {known}), and {exc}") from None
        else:
            raise FusionError(f"{source}: not found")
    if merged:
        update_params_file(repo / "params.yaml", merged)
    return [str(s) for s in sources]


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def metric_table(summary: dict[str, Any]) -> str:
    lines = ["| set | method | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---:|" * len(METRICS)]
    for name, methods in summary.items():
        for method, values in methods.items():
            cells = " | ".join(f"{values[m]:.3f}" for m in METRICS)
            lines.append(f"| {name} | {method} | {cells} |")
    return "\n".join(lines)


def card_links(record: dict[str, Any]) -> str:
    """Where the registered version's model card is: its MLflow artifact URI and, for a
    tracking server, the version's page in the MLflow UI."""
    line = f"- model card: `{card_uri(record['run_id'])}`"
    page = version_page(record["tracking_uri"], record["model_name"], record["version"])
    return line + (f" ([version {record['version']} in MLflow]({page}))" if page else "")


def report(repo: Path, status: dict[str, Any], decision: dict[str, Any] | None) -> str:
    """The run's markdown: promotion decision, the model card's links and the evaluate
    stage's metric table."""
    if decision is None:
        return (f"# Retraining skipped\n\nData and params are unchanged since champion "
                f"version {status['champion']} of `{status['model']}` was trained "
                f"(fingerprint `{status['fingerprint'][:12]}`).\n")
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    params = load_params(repo / "params.yaml")
    summary = json.loads((repo / params.evaluate.out / "summary.json").read_text())
    registered = repo / params.mlflow.registered
    card = (card_links(json.loads(registered.read_text())) + "\n" if registered.exists()
            else "")
    return (f"# Retraining: `{decision['model']}` version {decision['challenger']} {verdict}\n\n"
            f"- reason: {decision['reason']}\n- champion now: version {decision['champion']} "
            f"(before: {decision['champion_before'] or 'none'})\n"
            f"- weighted gain over the champion: {decision['score']:+.2%}\n{card}\n"
            f"## Evaluation (model vs. mean / max fusion)\n\n{metric_table(summary)}\n")


@flow(name="fusion-retrain", log_prints=True)
def retrain(repo: str = ".", params_file: str = "params.yaml", profile: str = "",
            search_first: bool = False, tracking_uri: str = "", ray_address: str = "",
            push: bool = True) -> dict[str, Any]:
    """Retrain when data or params changed since the champion; register and promote.

    Args:
        repo: the DVC repository (a checkout of this project) to run in.
        params_file: params to run with; a file other than the repo's params.yaml is
            merged into it first (as `dvc exp run -S` would), so dvc.lock records them.
        profile: name of a set of overrides in flows/profiles/ (e.g. quality, gpu).
        search_first: run the loss-weight search first; its best weights are trained.
        tracking_uri: MLflow tracking URI (default: params, $MLFLOW_TRACKING_URI, SQLite).
        ray_address: Ray cluster (default: ray.address, $RAY_ADDRESS, else one local
            instance that all stages of this run share).
        push: dvc push at the end when a remote is configured.
    """
    logger = get_run_logger()
    root = Path(repo).resolve()
    env = stage_env(tracking_uri, ray_address)
    for source in apply_params(root, params_file, profile):
        logger.info("params: merged %s into params.yaml", source)
    remote = has_remote(root, env)
    if remote:
        dvc(root, ["pull", "--allow-missing"], env)
    dvc(root, ["repro", "prepare"], env)
    if search_first:
        search(repo=str(root), tracking_uri=tracking_uri, ray_address=ray_address)
    fusion(root, ["status", "--json", "reports/status.json"], env)
    status = json.loads((root / "reports/status.json").read_text())
    if status["unchanged"]:
        logger.info("skipping training: data and params unchanged since champion version %s "
                    "was trained (fingerprint %s)", status["champion"], status["fingerprint"][:12])
        create_markdown_artifact(report(root, status, None), key="fusion-retrain",
                                 description="retraining skipped")
        return {"skipped": True, "status": status}
    with shared_ray(root, env) as ray_env:
        for stage in TRAINING:
            dvc(root, ["repro", stage], ray_env)
    fusion(root, ["promote", "--json", "reports/promotion.json"], env)
    decision = json.loads((root / "reports/promotion.json").read_text())
    if remote and push:
        dvc(root, ["push"], env)
    create_markdown_artifact(report(root, status, decision), key="fusion-retrain",
                             description="metrics and promotion decision")
    return {"skipped": False, "status": status, "promotion": decision}


def main(argv: list[str] | None = None) -> int:
    parser = flow_parser(__doc__)
    parser.add_argument("--params-file", default="params.yaml")
    parser.add_argument("--profile", default="")
    parser.add_argument("--search-first", action="store_true")
    parser.add_argument("--no-push", action="store_true")
    args = parser.parse_args(argv)
    state = retrain(repo=args.repo, params_file=args.params_file, profile=args.profile,
                    search_first=args.search_first, tracking_uri=args.tracking_uri,
                    ray_address=args.ray_address, push=not args.no_push, return_state=True)
    if state.is_failed():
        print(f"retrain flow failed: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    if result["skipped"]:
        print("retrain: skipped (nothing changed since the champion was trained)")
    else:
        p = result["promotion"]
        print(f"retrain: {p['model']} version {p['challenger']} "
              f"{'promoted' if p['promoted'] else 'not promoted'} ({p['reason']}); "
              f"champion: version {p['champion']}; report: reports/eval/report.md")
        print("dvc.lock (and params.yaml, when the run merged params into it) now record "
              "this run: `git commit dvc.lock params.yaml` keeps that record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
