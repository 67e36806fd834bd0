"""``fusion <stage> [--params FILE] [--set section.key=value ...]``: one CLI for every stage."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from fusion.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, FusionError, TransientError
from fusion.params import Params, load_params


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one parameter, like `dvc exp run -S` (repeatable)")


def _prepare(args: argparse.Namespace, params: Params) -> int:
    from fusion.prepare import prepare, write_summary

    result = prepare(params.data, raw=args.raw, out=args.out, exclude=args.exclude)
    for reject in result.rejects[:20]:
        print(f"  rejected {reject.path}: {reject.reason}", file=sys.stderr)
    if len(result.rejects) > 20:
        print(f"  ... and {len(result.rejects) - 20} more in the rejects report", file=sys.stderr)
    write_summary(result, args.summary or params.data.summary)
    print(result.line())
    return 0


def _score(args: argparse.Namespace, params: Params) -> int:
    from fusion.scoring import format_table, score_folders, write_json

    report = score_folders(args.fused, args.a, args.b, params.metrics, device=args.device)
    for error in report.errors:
        print(f"  {error}", file=sys.stderr)
    if report.per_image:
        print(format_table({f"{Path(args.fused).name} (n={len(report.per_image)})":
                            report.means()}))
    if args.json:
        write_json(report, args.json)
    if not report.per_image:
        raise FusionError(f"{args.fused}: no fused image could be scored")
    return 1 if report.errors else 0


def _train(args: argparse.Namespace, params: Params) -> int:
    if args.local:
        from fusion.runs import train_local

        out = train_local(params, args.phase, fresh=args.fresh)
    else:
        from fusion.distributed import train_ray

        out = train_ray(params, args.phase, fresh=args.fresh, address=args.address)
    print(f"phase {args.phase}: model exported to {out}")
    return 0


def _fuse(args: argparse.Namespace, params: Params) -> int:
    from fusion.inference import TileSpec, fuse_files, fuse_folders
    from fusion.serving import load_fusion_model
    from fusion.train import resolve_device

    device = resolve_device(args.device or params.train.device)
    model = load_fusion_model(args.model, device)
    tiles = TileSpec(args.tile, args.halo)
    a, b, out = Path(args.a), Path(args.b), Path(args.output)
    if a.is_dir() != b.is_dir():
        raise FusionError("--a and --b must both be files or both be folders")
    if not a.is_dir():
        fuse_files(model, a, b, out, tiles, device)
        print(f"fused {a.name} + {b.name} -> {out}")
        return 0
    written, errors = fuse_folders(model, a, b, out, tiles, device)
    for error in errors:
        print(f"  {error}", file=sys.stderr)
    print(f"fused {len(written)} pairs -> {out}, {len(errors)} failed")
    return 1 if errors else 0


def _evaluate(args: argparse.Namespace, params: Params) -> int:
    from fusion.evaluate import evaluate
    from fusion.scoring import format_table

    summary = evaluate(params)
    for name, methods in summary.items():
        print(f"{name} ({int(methods['model']['pairs'])} pairs)")
        print(format_table(methods))
    print(f"report: {Path(params.evaluate.out) / 'report.md'}")
    return 0


def _register(args: argparse.Namespace, params: Params) -> int:
    from fusion.tracking import register

    record = register(params)
    print(f"registered {record['model_name']} version {record['version']} as challenger "
          f"(run {record['run_id']}, {record['tracking_uri']})")
    return 0


def _promote(args: argparse.Namespace, params: Params) -> int:
    import json

    from fusion.promotion import promote, rollback

    if args.rollback:
        result = rollback(params)
        print(f"{result['model']}: champion moved back from version "
              f"{result['champion_before']} to {result['champion']}")
    else:
        result = promote(params)
        verdict = "promoted to champion" if result["promoted"] else "not promoted"
        print(f"{result['model']} version {result['challenger']} {verdict}: {result['reason']}"
              f" (champion now: version {result['champion']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


def _search(args: argparse.Namespace, params: Params) -> int:
    from fusion.search import run_search

    write = "" if args.no_write else None
    result = run_search(params, trials=args.trials, study=args.study, address=args.address,
                        write_params=write)
    print(f"search {result['study']}: best trial {result['best_trial']} of "
          f"{result['trials']} (score {result['score']:+.4f}): "
          + ", ".join(f"{k}={v:.4g}" for k, v in result["best"].items()))
    return 0


def _status(args: argparse.Namespace, params: Params) -> int:
    import json

    from fusion.tracking import champion_status

    status = champion_status(params)
    if status["champion"] is None:
        print(f"{status['model']}: no champion yet; fingerprint {status['fingerprint'][:12]}")
    else:
        same = "unchanged" if status["unchanged"] else "changed"
        print(f"{status['model']}: data and params {same} since champion version "
              f"{status['champion']} (fingerprint {status['fingerprint'][:12]})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(status, indent=2) + "\n")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(prog="fusion", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    handlers: dict[str, Callable] = {}

    p = sub.add_parser("prepare", help="raw image pairs -> manifest + Parquet patch shards")
    _common(p)
    p.add_argument("--raw", nargs="+", default=None, metavar="DIR",
                   help="raw data roots (default: data.raw)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: data.out)")
    p.add_argument("--exclude", nargs="*", default=None, metavar="FILE",
                   help="lists of pair names kept out of training (default: data.exclude)")
    p.add_argument("--summary", default=None, metavar="JSON",
                   help="counts for `dvc metrics` (default: data.summary)")
    handlers["prepare"] = _prepare

    p = sub.add_parser("train", help="train DAE-Fuse phase 1 (feature extraction) or 2 (fusion)")
    _common(p)
    p.add_argument("--phase", type=int, choices=(1, 2), required=True)
    p.add_argument("--fresh", action="store_true",
                   help="discard this configuration's checkpoints instead of resuming")
    p.add_argument("--address", default="",
                   help="Ray cluster to join (default: ray.address, then $RAY_ADDRESS, "
                        "else a local Ray instance)")
    p.add_argument("--local", action="store_true",
                   help="train in this process without Ray (same loop; for debugging)")
    handlers["train"] = _train

    p = sub.add_parser("fuse", help="fuse one pair or two folders of pairs with a trained model")
    _common(p)
    p.add_argument("--model", required=True,
                   help="exported model folder or MLflow URI (models:/dae-fuse@champion)")
    p.add_argument("--a", required=True, help="source A image or folder (ir / mri)")
    p.add_argument("--b", required=True, help="source B image or folder (vi / ct / pet ...)")
    p.add_argument("-o", "--output", required=True, help="output PNG, or folder in folder mode")
    p.add_argument("--tile", type=int, default=1024,
                   help="tile side for large images (default 1024); smaller saves memory")
    p.add_argument("--halo", "--overlap", type=int, default=64, dest="halo",
                   help="context in pixels around each tile's core (default 64; tiled output "
                        "equals the whole-image output once it covers the network's reach)")
    p.add_argument("--device", default=None, help="torch device (default: train.device)")
    handlers["fuse"] = _fuse

    p = sub.add_parser("evaluate", help="fuse and score every benchmark set, with baselines")
    _common(p)
    handlers["evaluate"] = _evaluate

    p = sub.add_parser("score", help="score fused images against their sources (EN, SD, ...)")
    _common(p)
    p.add_argument("--fused", required=True, metavar="DIR", help="fused images")
    p.add_argument("--a", required=True, metavar="DIR", help="source A images (ir / mri)")
    p.add_argument("--b", required=True, metavar="DIR", help="source B images (vi / ct ...)")
    p.add_argument("--json", default=None, metavar="OUT", help="per-image values and means")
    p.add_argument("--device", default="cpu", help="torch device for the metrics")
    handlers["score"] = _score

    p = sub.add_parser("register", help="log the pipeline run to MLflow, register the model "
                       "as challenger")
    _common(p)
    handlers["register"] = _register

    p = sub.add_parser("promote", help="challenger vs champion on the benchmark sets; move "
                       "the champion alias when the rule in params.yaml says so")
    _common(p)
    p.add_argument("--rollback", action="store_true",
                   help="move champion back to the version it replaced")
    p.add_argument("--json", default=None, metavar="OUT", help="write the decision as JSON")
    handlers["promote"] = _promote

    p = sub.add_parser("search", help="tune the loss weights: Optuna through Ray Tune, "
                       "trials as Ray Train runs, best weights into params.yaml")
    _common(p)
    p.add_argument("--trials", type=int, default=None,
                   help="trials the study should hold (default: search.trials)")
    p.add_argument("--study", default=None, help="Optuna study name (default: search.study)")
    p.add_argument("--address", default="", help="Ray cluster (as for `fusion train`)")
    p.add_argument("--no-write", action="store_true",
                   help="only write search.out/best.json, not search.write_params")
    handlers["search"] = _search

    p = sub.add_parser("status", help="have data or params changed since the champion was "
                       "trained? (the retrain flow skips training when not)")
    _common(p)
    p.add_argument("--json", default=None, metavar="OUT", help="write the answer as JSON")
    handlers["status"] = _status
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        return handlers[args.stage](args, params)
    except FusionError as exc:
        print(f"fusion {args.stage}: error: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT if isinstance(exc, TransientError) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
