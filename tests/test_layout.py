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
STAGES = ["data", "models", "engine", "inference", "evaluation", "mlops", "cli"]
BASE = {"errors", "params", "files", "s3", "progress", "chaos"}  # shared by every stage
REGISTRY = {PACKAGE / "models/registry.py", PACKAGE / "models/__init__.py"}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p
            for p in PACKAGE.rglob("*.py")}


def _stage(module: str) -> str | None:
    part = module.split(".")[1] if module.count(".") else ""
    return part if part in STAGES else None


def _family_folders() -> set[Path]:
    return {PACKAGE / "models" / name.replace("-", "_") for name in list_families()}


def test_every_stage_folder_exists():
    assert all((PACKAGE / s).is_dir() for s in STAGES[:-1]) and (PACKAGE / "cli.py").is_file()
    assert {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"} <= BASE | {"cli"}


def test_imports_flow_one_way():
    wrong = []
    for module, path in _modules().items():
        stage = _stage(module)
        if stage is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                target = _stage(name) if name.startswith("fusion.") else None
                if target and STAGES.index(target) > STAGES.index(stage):
                    wrong.append(f"{module} ({stage}) imports {name} ({target})")
    assert not wrong, "\n".join(wrong)


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
    (``model_code`` is the script MLflow itself runs to load a logged model: not imported.)"""
    modules = sorted(m for m in _modules() if m != "fusion.mlops.model_code")
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
