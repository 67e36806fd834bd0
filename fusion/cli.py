"""``fusion <stage> [--params FILE] [--set section.key=value ...]``: one CLI for every stage."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fusion.errors import FusionError
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
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        return handlers[args.stage](args, params)
    except FusionError as exc:
        print(f"fusion {args.stage}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
