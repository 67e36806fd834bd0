"""``fusion <stage> [--params FILE] [--set section.key=value ...]``: one CLI for every stage.

Exit codes: 0 done; 1 some inputs of a folder could not be processed (each reported);
2 bad input or configuration (one line naming the file and the reason; retrying cannot
help); 75 a service did not answer (MLflow server, Ray cluster, S3: worth a retry).
Heavy libraries (torch, Ray, MLflow) are imported only once the inputs have been checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fusion.models  # noqa: F401  (registers the families: params types their sections)
from fusion import __version__
from fusion.device import PRECISIONS
from fusion.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, BadInputError, FusionError, TransientError
from fusion.files import write_text
from fusion.inference.rules import METHODS
from fusion.params import Params, load_params
from fusion.progress import QUIET_ENV


def _prepare(args: argparse.Namespace, params: Params) -> int:
    from fusion.data.prepare import prepare, write_summary

    result = prepare(params.data, raw=args.raw, out=args.out, exclude=args.exclude)
    for reject in result.rejects[:20]:
        print(f"  rejected {reject.path}: {reject.reason}", file=sys.stderr)
    if len(result.rejects) > 20:
        print(f"  ... and {len(result.rejects) - 20} more in the rejects report", file=sys.stderr)
    write_summary(result, args.summary or params.data.summary)
    print(result.line())
    return 0


def _score(args: argparse.Namespace, params: Params) -> int:
    from fusion.evaluation.scoring import format_table, score_folders, write_json

    report = score_folders(args.fused, args.a, args.b, params.metrics, device=args.device,
                           max_pixels=params.data.max_pixels)
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


def _publish(params: Params) -> None:
    from fusion.data.prepared import publish_prepared

    done = publish_prepared(params.data.out, params.train.data, params.ray.storage_endpoint)
    if done:
        print(done)


def _train(args: argparse.Namespace, params: Params) -> int:
    from fusion.engine.fingerprints import fingerprint, run_name
    from fusion.mlops.model_refs import resolve_start
    from fusion.mlops.pipeline_runs import phase_sink

    params.family.phase(args.phase)
    _publish(params)
    start = resolve_start(params)
    workers = None if args.local else params.ray.num_workers
    sink = None
    if params.family.runs_phase(args.phase, start.warm):
        name = run_name(params, args.phase, start, workers)
        sink = phase_sink(params, args.phase, name, fingerprint(params))
    if args.local:
        from fusion.engine.local_runner import train_local

        out = train_local(params, args.phase, start, fresh=args.fresh, sink=sink)
    else:
        from fusion.engine.ray_runner import train_ray

        out = train_ray(params, args.phase, start, fresh=args.fresh, address=args.address,
                        sink=sink)
    print(f"phase {args.phase}: model exported to {out}")
    return 0


def _fuse_on_ray(args: argparse.Namespace, params: Params) -> int:
    from fusion.serving.batch import fuse_on_cluster

    if not args.model or args.method:
        raise FusionError("fuse --ray: give a model (--model); --method runs in folder mode")
    try:
        report = fuse_on_cluster(params, args.model, args.a, args.b, args.output, args.address)
    finally:
        if "fusion.s3" in sys.modules:  # an s3:// path was met
            from fusion.s3 import finalize

            finalize()
    for error in report.errors:
        print(f"  {error}", file=sys.stderr)
    print(f"fused {report.fused} pairs -> {args.output} ({report.skipped} done before), "
          f"{len(report.errors)} failed")
    return 1 if report.errors else 0


def _fuse(args: argparse.Namespace, params: Params) -> int:
    from fusion.data.images import output_format, probe_image
    from fusion.inference.fuse import TileSpec, plan

    if args.ray:
        return _fuse_on_ray(args, params)
    a, b, out = Path(args.a), Path(args.b), Path(args.output)
    for side in (a, b):
        if not side.exists():
            raise BadInputError(side, "not found")
    if a.is_dir() != b.is_dir():
        raise FusionError("--a and --b must both be files or both be folders")
    single = not a.is_dir()
    if single:  # everything that can be checked is checked before the model loads
        out = out / f"{a.stem}.png" if out.is_dir() else out
        spec = plan(probe_image(a, params.data.max_pixels), probe_image(b, params.data.max_pixels))
        output_format(out, spec.bits, spec.colour)
        if args.explain:
            output_format(Path(args.explain), 8, False)
    if bool(args.model) == bool(args.method):
        raise FusionError("fuse: give a model (--model) or a training-free method (--method)")
    if args.method:
        from fusion.inference.rules import TwoScaleEngine

        engine = TwoScaleEngine(params.evaluate.two_scale)
    else:
        from fusion.mlops.model_refs import open_engine

        given = {k: v for k, v in (("exact_pixels", args.exact_pixels),
                                   ("window", args.window),
                                   ("overlap", args.window_overlap)) if v is not None}
        tiles = TileSpec(args.tile, args.halo, **given)
        if args.precision and args.engine != "torch":
            raise FusionError(f"--precision is torch's; {args.engine} runs the exported "
                              "fp32 graph")
        engine = open_engine(params, args.model, args.engine, args.device or "", tiles,
                             args.threads, args.precision or "auto")
    if args.explain and not engine.explains:
        raise FusionError(f"--explain: {args.model} has no contribution map (families that "
                          "have one: see `fusion fuse --help`)")
    if single:
        from fusion.inference.fuse import fuse_files

        fuse_files(engine, a, b, out, params.data.max_pixels,
                   Path(args.explain) if args.explain else None)
        print(f"fused {a.name} + {b.name} -> {out}")
        return 0
    from fusion.inference.fuse import fuse_folders

    written, errors = fuse_folders(engine, a, b, out, params.data.max_pixels,
                                   bool(args.explain))
    for error in errors:
        print(f"  {error}", file=sys.stderr)
    print(f"fused {len(written)} pairs -> {out}, {len(errors)} failed")
    return 1 if errors else 0


def _evaluate(args: argparse.Namespace, params: Params) -> int:
    from fusion.engine.exports import weights_digest
    from fusion.evaluation.evaluate import Candidate, evaluate, set_pairs, with_sets
    from fusion.evaluation.scoring import format_table
    from fusion.inference.fuse import TileSpec
    from fusion.mlops.model_refs import is_uri, open_engine

    params = with_sets(params, args.sets or [])
    refs = args.model or [params.evaluate.model, *params.evaluate.compare]
    for bench in params.evaluate.sets:
        set_pairs(bench)  # bad folders or names fail before any model loads
    candidates = []
    for i, ref in enumerate(refs):
        engine = open_engine(params, ref, device="cpu", tiles=TileSpec(params.evaluate.tile))
        label = ("model" if i == 0 else ref if is_uri(ref)
                 else f"{engine.family.name}:{Path(ref).name}")
        candidates.append(Candidate(label, engine))
    digest = "" if is_uri(refs[0]) else weights_digest(refs[0])
    summary = evaluate(params, candidates, digest)
    for name, methods in summary.items():
        print(f"{name} ({int(methods['model']['pairs'])} pairs)")
        print(format_table(methods))
    print(f"report: {Path(params.evaluate.out) / 'report.md'}")
    return 0


def _export(args: argparse.Namespace, params: Params) -> int:
    from fusion.inference.onnx import export_onnx
    from fusion.mlops.model_refs import load_ref

    family, model = load_ref(params, args.model)
    out = export_onnx(model, family, Path(args.onnx), opset=args.opset)
    print(f"exported {family.name} to {out} (ONNX opset {args.opset})")
    return 0


def _register(args: argparse.Namespace, params: Params) -> int:
    from fusion.mlops.register import register

    record = register(params)
    print(f"registered {record['model_name']} version {record['version']} as challenger "
          f"(run {record['run_id']}, {record['tracking_uri']})")
    return 0


def _bundle(args: argparse.Namespace, params: Params) -> int:
    from fusion.mlops.bundle import bundle

    out = bundle(params, Path(args.out) if args.out else None)
    print(f"bundled {params.evaluate.model} as the {params.model.family} starting checkpoint "
          f"in {out}")
    return 0


def _promote(args: argparse.Namespace, params: Params) -> int:
    from fusion.mlops.promotion import promote, rollback

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
        write_text(args.json, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


def _search(args: argparse.Namespace, params: Params) -> int:
    from fusion.mlops.model_refs import resolve_start
    from fusion.mlops.search import run_search

    _publish(params)
    write = "" if args.no_write else None
    result = run_search(params, trials=args.trials, study=args.study, address=args.address,
                        write_params=write, start=resolve_start(params))
    print(f"search {result['study']}: best trial {result['best_trial']} of "
          f"{result['trials']} (score {result['score']:+.4f}): "
          + ", ".join(f"{k}={v:.4g}" for k, v in result["best"].items()))
    return 0


def _serve(args: argparse.Namespace, params: Params) -> int:
    import time

    from fusion.serving.app import run

    url = run(params, args.address)
    print(f"serving {params.model_name}@{params.serve.alias} at {url}: POST /fuse, "
          f"GET /healthz, GET /metrics", flush=True)
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


def _status(args: argparse.Namespace, params: Params) -> int:
    from fusion.mlops.status import champion_status

    status = champion_status(params)
    if status["champion"] is None:
        print(f"{status['model']}: no champion yet; fingerprint {status['fingerprint'][:12]}")
    else:
        same = "unchanged" if status["unchanged"] else "changed"
        print(f"{status['model']}: data and params {same} since champion version "
              f"{status['champion']} (fingerprint {status['fingerprint'][:12]})")
    if args.json:
        write_text(args.json, json.dumps(status, indent=2) + "\n")
    return 0


FUSE_EPILOG = """\
Folder mode: --a and --b are folders; files pair up by stem (ir/07.png with vi/07.jpg).
A stem held by two files in one folder (07.png and 07.tif) is ambiguous and reported, as
is a file with no partner; the other pairs are fused into OUT/<stem>.png and the command
exits 1 if anything was reported.

On the Ray cluster (--ray): --a, --b and -o may be folders or s3:// prefixes; pairs are
fused by batch.workers actors through Ray Data into OUT/<stem>.png and recorded in
OUT/manifest/ (Parquet), so a rerun fuses only what is not recorded yet. A stem that two
files share on one side is refused before anything is fused.

Output: grey when both sources are grey (an RGB file of grey content counts as grey),
colour when one source is colour (its Cb/Cr are kept, its luma Y is fused). The bit depth
is the larger of the two sources: 16-bit when either is 16-bit (PNG or TIFF, colour too),
else 8-bit. The format follows -o's suffix (.png, .tif, .jpg, .bmp); a format that cannot
hold the result (16-bit into .jpg) is refused before the model loads.

--explain FILE writes the contribution map of source A (8-bit grey, 255 = all A) for
families that estimate one (`explains` in the registry); in folder mode maps go to
OUT/contribution/
"""


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One ``add_argument`` of a stage, as data."""
    return flags, options


ADDRESS = arg("--address", default="", help="Ray cluster to join (default: ray.address, then "
              "$RAY_ADDRESS, else a new local Ray instance)")
JSON_OUT = arg("--json", default=None, metavar="OUT", help="write the result as JSON")


@dataclass(frozen=True)
class Stage:
    """A ``fusion`` subcommand: its handler and its own arguments (every stage also takes
    ``--params`` and ``--set``)."""

    name: str
    help: str
    run: Callable[[argparse.Namespace, Params], int]
    args: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()
    epilog: str = ""


STAGES = (
    Stage("prepare", "raw image pairs -> manifest + Parquet patch shards", _prepare, (
        arg("--raw", nargs="+", default=None, metavar="DIR",
            help="raw data roots (default: data.raw)"),
        arg("--out", default=None, metavar="DIR", help="output folder (default: data.out)"),
        arg("--exclude", nargs="*", default=None, metavar="FILE",
            help="lists of pair names kept out of training (default: data.exclude)"),
        arg("--summary", default=None, metavar="JSON",
            help="counts for `dvc metrics` (default: data.summary)"))),
    Stage("train", "train one phase of the family's recipe (model.family)", _train, (
        arg("--phase", type=int, required=True, metavar="N",
            help="phase of the recipe, from 1; each phase starts from the one before "
                 "(docs/families.md lists each family's phases)"),
        arg("--fresh", action="store_true",
            help="discard this configuration's checkpoints instead of resuming"),
        ADDRESS,
        arg("--local", action="store_true",
            help="train in this process without Ray (same loop; for debugging)"))),
    Stage("fuse", "fuse one pair or two folders of pairs with a trained model", _fuse, (
        arg("--model", default=None,
            help="exported model folder, MLflow URI (models:/<name>@champion), @alias of the "
                 "active family, or an .onnx file (--engine onnxruntime)"),
        arg("--method", choices=METHODS, default=None,
            help="a training-free method instead of a model: two-scale, the brighter "
                 "source's Gaussian base plus both sources' detail (evaluate.two_scale)"),
        arg("--a", required=True, help="source A image or folder (ir / mri)"),
        arg("--b", required=True, help="source B image or folder (vi / ct / pet ...)"),
        arg("-o", "--output", required=True,
            help="output image (format from the suffix), or a folder"),
        arg("--tile", type=int, default=1024,
            help="tile side for large images (default 1024); smaller saves memory"),
        arg("--halo", "--overlap", type=int, default=64, dest="halo",
            help="context in pixels around each tile's core (default 64; tiled output "
                 "equals the whole-image output once it covers the network's reach)"),
        arg("--exact-pixels", type=int, default=None, metavar="N",
            help="images above N pixels (default 1 MP) are fused in overlapping windows, "
                 "cross-faded: linear time, attention sees one window; up to "
                 "N, exactly (torch: tiled; onnxruntime: whole)"),
        arg("--window", type=int, default=None,
            help="window side above --exact-pixels (default 512)"),
        arg("--window-overlap", type=int, default=None, metavar="PX",
            help="overlap of neighbouring windows, where they are cross-faded (default 32)"),
        arg("--device", default=None, help="torch device (default: train.device)"),
        arg("--precision", choices=PRECISIONS, default=None,
            help="torch arithmetic (default auto: bf16 in windows, above --exact-pixels, on "
                 "CPUs and GPUs with native bf16, about 2x faster there; fp32 otherwise)"),
        arg("--engine", choices=("torch", "onnxruntime"), default="torch",
            help="torch (default; exact tiling of large images) or onnxruntime (a file from "
                 "`fusion export --onnx`, whole images up to --exact-pixels)"),
        arg("--threads", type=int, default=0,
            help="onnxruntime intra-op threads (default 0: all cores)"),
        arg("--explain", default=None, metavar="FILE",
            help="also write the contribution map of source A (see below)"),
        arg("--ray", action="store_true",
            help="fuse two folders or s3:// prefixes on the Ray cluster (batch.*), "
                 "resumable from OUT/manifest/"),
        ADDRESS), FUSE_EPILOG),
    Stage("export", "export a model for other runtimes (ONNX)", _export, (
        arg("--model", required=True, help="exported model folder or MLflow URI"),
        arg("--onnx", required=True, metavar="FILE", help="ONNX file to write"),
        arg("--opset", type=int, default=18, help="ONNX opset (default 18)"))),
    Stage("evaluate", "fuse and score the benchmark sets with one or more models side by "
          "side, with the mean, max and two-scale baselines, raw and under the published "
          "protocol", _evaluate, (
              arg("--model", action="append", default=None, metavar="REF",
                  help="model to evaluate (folder or MLflow URI; repeatable: models side by "
                       "side, the first is 'model'); default: evaluate.model + .compare"),
              arg("--sets", action="append", default=None,
                  metavar="NAME=A_DIR:B_DIR[:LIST]",
                  help="benchmark set instead of evaluate.sets (repeatable); LIST names the "
                       "pairs to use"))),
    Stage("score", "score fused images against their sources (EN, SD, ...)", _score, (
        arg("--fused", required=True, metavar="DIR", help="fused images"),
        arg("--a", required=True, metavar="DIR", help="source A images (ir / mri)"),
        arg("--b", required=True, metavar="DIR", help="source B images (vi / ct ...)"),
        arg("--json", default=None, metavar="OUT", help="per-image values and means"),
        arg("--device", default="cpu", help="torch device for the metrics"))),
    Stage("register", "log the pipeline run to MLflow, register the model as challenger "
          "(a rerun after a failure completes it)", _register),
    Stage("bundle", "pack the evaluated model (evaluate.model) as the family's bundled "
          "starting checkpoint, with its params, metrics and provenance (after dvc repro "
          "with the quality profile)", _bundle, (
              arg("--out", default="", metavar="DIR",
                  help="folder to write (default: the family's pretrained/ folder)"),)),
    Stage("promote", "challenger vs floor and champion on the benchmark sets; move the "
          "champion alias when the rule in params.yaml says so", _promote, (
              arg("--rollback", action="store_true",
                  help="move champion back to the version it replaced"),
              JSON_OUT)),
    Stage("search", "tune the family's loss weights: Optuna through Ray Tune, trials as Ray "
          "Train runs, best weights into params.yaml", _search, (
              arg("--trials", type=int, default=None,
                  help="trials the study should hold (default: search.trials)"),
              arg("--study", default=None,
                  help="Optuna study name (default: search.study, else <family>-loss)"),
              ADDRESS,
              arg("--no-write", action="store_true",
                  help="only write search.out/best.json, not search.write_params"))),
    Stage("status", "have data or params changed since the champion was trained? (the "
          "retrain flow skips training when not)", _status, (JSON_OUT,)),
    Stage("serve", "serve the family's model under serve.alias over HTTP (Ray Serve), "
          "following the alias when it moves", _serve, (
              ADDRESS,
              arg("--detach", action="store_true",
                  help="deploy and return (the application keeps running on the cluster)"))),
)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(prog="fusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fusion {__version__}")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (they show only on a terminal anyway)")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help, epilog=stage.epilog or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--params", default=None, help="params file (default: params.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE",
                       help="override one parameter, like `dvc exp run -S` (repeatable)")
        for flags, options in stage.args:
            p.add_argument(*flags, **options)
    return parser, {stage.name: stage.run for stage in STAGES}


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        os.environ[QUIET_ENV] = "1"
    try:
        params = load_params(args.params, args.overrides)
        return handlers[args.stage](args, params)
    except FusionError as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        more = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
        print(f"fusion {args.stage}: error: {lines[0]}{more}", file=sys.stderr)
        return EXIT_TRANSIENT if isinstance(exc, TransientError) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
