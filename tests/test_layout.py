"""The package's shape (issue 13): stage folders with imports flowing one way, family names
only in the family folders and the registry, and nothing happening at import time."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from fusion.models import list_families

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fusion"
# pipeline stages in data-flow order; a module may import its own stage and earlier ones
STAGES = ["data", "models", "engine", "inference", "evaluation", "mlops", "serving", "cli"]
# shared by every stage; they import only each other
BASE = {"errors", "params", "files", "s3", "progress", "chaos", "family", "metric_names",
        "metrics", "device"}
REGISTRY = {PACKAGE / "models/__init__.py"}  # imports each family's folder by name


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p
            for p in PACKAGE.rglob("*.py")}


def _stage(module: str) -> str | None:
    """A module's stage; ``base`` for the base modules (None outside the package)."""
    part = module.split(".")[1] if module.count(".") else ""
    return part if part in STAGES else "base" if part in BASE else None


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, at module level or inside a function (lazy
    imports too); ``from pkg import mod`` counts as importing ``pkg.mod``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return {name for name in found if name in known}


def _graph() -> dict[str, set[str]]:
    files = {**_modules(), **{".".join(p.relative_to(REPO).with_suffix("").parts): p
                              for p in (REPO / "flows").rglob("*.py")}}
    files = {name.removesuffix(".__init__"): path for name, path in files.items()}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def _family_folders() -> set[Path]:
    return {PACKAGE / "models" / name.replace("-", "_") for name in list_families()}


def test_every_stage_folder_exists():
    assert all((PACKAGE / s).is_dir() for s in STAGES[:-1]) and (PACKAGE / "cli.py").is_file()
    assert {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"} <= BASE | {"cli"}


def test_imports_flow_one_way():
    """Base modules import only base modules; a stage imports the base and its own or an
    earlier stage, lazy imports included."""
    order = ["base", *STAGES]
    wrong = []
    for module, targets in _graph().items():
        stage = _stage(module)
        if stage is None:
            continue
        for target in targets:
            there = _stage(target)
            if there and order.index(there) > order.index(stage):
                wrong.append(f"{module} ({stage}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)
    assert not (_graph()["fusion.params"] - {f"fusion.{b}" for b in BASE})


def test_no_import_circle():
    """The import graph of fusion/ and flows/ (lazy imports included) has no cycle."""
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


def test_data_knows_no_network():
    """Nothing the data stage imports, directly or through the base, reaches models/."""
    graph, seen, todo = _graph(), set(), [m for m in _graph() if _stage(m) == "data"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    assert not [m for m in seen if _stage(m) in ("models", "engine", "inference")]


def test_family_names_only_in_their_folders_and_the_registry():
    names = [n for f in list_families() for n in {f, f.replace("-", "_"), f.replace("-", "")}]
    pattern = re.compile("|".join(map(re.escape, names)), re.I)
    files = [p for p in PACKAGE.rglob("*.py")
             if p not in REGISTRY and not any(d in p.parents for d in _family_folders())]
    files += list((REPO / "flows").rglob("*.py")) + [REPO / "dvc.yaml"]
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_importing_every_module_has_no_side_effects():
    """No environment change, no Ray / MLflow / Prefect / Optuna imported, nothing printed.
    (``pyfunc_entry`` is the script MLflow itself runs to load a logged model: not imported.)"""
    modules = sorted(m for m in _modules() if m != "fusion.mlops.pyfunc_entry")
    code = f"""
import importlib, json, os, sys
before = dict(os.environ)
for name in {modules!r}:
    importlib.import_module(name.removesuffix(".__init__"))
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
heavy = sorted(m for m in ("ray", "mlflow", "prefect", "optuna") if m in sys.modules)
print(json.dumps({{"changed": changed, "heavy": heavy}}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *printed, last = done.stdout.strip().splitlines()
    assert not printed and json.loads(last) == {"changed": [], "heavy": []}
