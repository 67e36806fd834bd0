"""The model card of a registered version: what the weights are and where they come from,
how they score beside the training-free baselines, what was decided about them, and what
they are (not) for.

``build_card`` writes the card into a folder from what ``register`` has at hand (params,
the export's config.json, the prepared dataset's manifest and summary, the loss curves,
the evaluation and its grid images): ``model_card.md``, the curves drawn as PNGs, the grids
copied beside it, and ``model_card.json``, the facts it was rendered from. ``log_card``
logs that folder to the version's run under ``model_card/`` and puts a short summary in
the version's description. ``refresh_card`` re-renders the card from its logged facts and
the version's ``promotion.*`` tags (``promote`` and ``rollback`` call it), so the decision
lands in the same artifact, without the files of the machine that registered it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from fusion.data.prepared import MANIFEST, manifest_digest, source
from fusion.engine.exports import CONFIG_FILE
from fusion.engine.fingerprints import RESULT_KEYS
from fusion.evaluation.evaluate import EVALUATED, PUBLISHED, SUMMARY
from fusion.evaluation.gain import weighted_gain
from fusion.metric_names import EIGHT
from fusion.mlops.provenance import git_commit
from fusion.params import BASELINES, Params

CARD_DIR = "model_card"  # artifact folder of the version's run
CARD = "model_card.md"
FACTS = "model_card.json"  # what the card is rendered from (promote re-renders it)
GAIN_OVER = "two-scale"  # the gate's baseline the card and the description report gains over
CURVE_COLUMNS = {"step", "time", "lr", "checkpoint_step"}  # not loss terms


def card_uri(run_id: str) -> str:
    """The MLflow URI of a version's card, from its run."""
    return f"runs:/{run_id}/{CARD_DIR}/{CARD}"


def version_page(tracking_uri: str, name: str, version: str) -> str | None:
    """The version's page in the MLflow UI of an http(s) tracking server (credentials in the
    URI left out); None for a local store."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return None
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return f"{base}/#/models/{urllib.parse.quote(name)}/versions/{version}"


# -- building ---------------------------------------------------------------------------

def build_card(params: Params, name: str, version: str, run_id: str, digest: str,
               folder: Path, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the card of registered version ``version`` of ``name`` (run ``run_id``,
    weights hash ``digest``) into ``folder``: the markdown, its images and its facts;
    ``tags``: the version's tags (a decision already taken is kept). Returns the facts."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(params.evaluate.model) / CONFIG_FILE).read_text())
    facts = {"model": name, "version": str(version), "run_id": run_id,
             "family": config["family"], "format": config["format"],
             "lineage": config.get("lineage", "") or "scratch",
             "training": {k: config.get(k) for k in ("run", "steps", "resumed_at", "skipped")},
             "code": git_commit(), "weights_sha256": digest,
             "traits": {"exact_tiling": params.family.exact_tiling,
                        "explains": params.family.explains},
             "data": _data(params), "params": _shaping(params),
             "curves": _curves(params, folder), "evaluation": _evaluation(params, folder)}
    write_card(folder, facts, tags or {})
    return facts


def write_card(folder: Path, facts: dict[str, Any], tags: dict[str, str]) -> None:
    """``model_card.md`` (rendered with the version's tags) and ``model_card.json``."""
    (folder / CARD).write_text(render(facts, tags))
    (folder / FACTS).write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")


def _data(params: Params) -> dict[str, Any]:
    """The prepared dataset the weights were trained on: its manifest's digest, pairs per
    split and modality (from the manifest), patches (from the prepare summary)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = params.data
    out: dict[str, Any] = {
        "manifest_sha256": manifest_digest(params.train.data, params.ray.storage_endpoint),
        "roots": [Path(r).name for r in d.raw],
        "excluded": [f"{Path(e).parent.name}/{Path(e).name}" for e in d.exclude],
        "pairs": {}, "modalities": {}}
    summary = Path(d.summary)
    if summary.exists():
        counts = json.loads(summary.read_text())
        out.update(pairs=counts.get("pairs", {}), patches=counts.get("patches"),
                   rejected=counts.get("rejected"))
    manifest = source(params.train.data, params.ray.storage_endpoint).read(MANIFEST)
    if manifest is not None:
        rows = pq.read_table(pa.BufferReader(manifest), columns=["split", "a_modality",
                                                                  "b_modality"]).to_pylist()
        if not out["pairs"]:
            for row in rows:
                out["pairs"][row["split"]] = out["pairs"].get(row["split"], 0) + 1
        for row in rows:
            if row["split"] != "test":
                key = f"{row['a_modality']}+{row['b_modality']}"
                out["modalities"][key] = out["modalities"].get(key, 0) + 1
    return out


def _shaping(params: Params) -> dict[str, Any]:
    """The params that shaped the weights: network sizes, each phase's loss weights, the
    training settings that change results (``fingerprints.RESULT_KEYS``) and steps."""
    t = params.train
    return {"net": dataclasses.asdict(params.config.net),
            "loss": {f"phase{n}": dataclasses.asdict(params.family.loss(params.config, n))
                     for n in range(1, len(params.family.phases) + 1)},
            "phases": [p.name for p in params.family.phases],
            "train": {**{k: getattr(t, k) for k in RESULT_KEYS}, "steps": list(t.steps),
                      "init": t.init, "workers": params.ray.num_workers}}


def _curves(params: Params, folder: Path) -> list[dict[str, Any]]:
    """Each phase's loss curve (``train.curves/phase<N>_curve.csv``) drawn as a PNG."""
    out = []
    for n, phase in enumerate(params.family.phases, 1):
        path = Path(params.train.curves) / f"phase{n}_curve.csv"
        rows = _read_curve(path)
        entry: dict[str, Any] = {"phase": n, "name": phase.name, "image": None,
                                 "steps": 0, "final": {}}
        if rows:
            terms = [k for k in rows[0] if k not in CURVE_COLUMNS]
            last = rows[-1]
            entry.update(steps=int(last["step"]),
                         final={k: last[k] for k in terms if math.isfinite(last[k])},
                         image=f"phase{n}_curve.png")
            _plot(rows, terms, f"phase {n} ({phase.name})", folder / entry["image"])
        out.append(entry)
    return out


def _read_curve(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [{k: float(v) if v else math.nan for k, v in row.items() if k}
                for row in csv.DictReader(fh) if row.get("step")]


def _plot(rows: list[dict[str, float]], terms: list[str], title: str, path: Path) -> None:
    """One line per loss term against the step, the total ``loss`` in bold (matplotlib's
    object API: no pyplot, no global backend switch)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab20"]
    steps = [r["step"] for r in rows]
    for i, term in enumerate(terms):
        style = ({"color": "black", "linewidth": 2.2} if term == "loss" else
                 {"color": colours(i % 20), "linewidth": 1.2})
        ax.plot(steps, [r[term] for r in rows], label=term,
                marker="." if len(rows) < 20 else None, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss term")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)


def _evaluation(params: Params, folder: Path) -> dict[str, Any]:
    """The evaluation's raw and published tables, each method's weighted gain over the
    two-scale rule with the promotion weights, whether each set is held out, the grids."""
    ev = params.evaluate
    raw = json.loads((Path(ev.out) / SUMMARY).read_text())
    published_file = Path(ev.out) / PUBLISHED
    published = json.loads(published_file.read_text()) if published_file.exists() else {}
    evaluated = json.loads((Path(ev.out) / EVALUATED).read_text())
    weights = params.promote.weights
    gains = {name: {method: weighted_gain(values, methods[GAIN_OVER], weights)
                    for method, values in methods.items()}
             for name, methods in raw.items() if GAIN_OVER in methods}
    grids = {}
    for name in raw:
        grid = Path(ev.grids) / f"{name}.png"
        if grid.exists():
            grids[name] = f"grid_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
            shutil.copy2(grid, folder / grids[name])
    return {"raw": raw, "published": published, "gains": gains, "grids": grids,
            "labels": ["model", *evaluated.get("compared", [])],
            "weights": [[w.metric, w.weight] for w in weights],
            "held_out": {s.name: _held_out(params, s.a, s.names) for s in ev.sets}}


def _held_out(params: Params, folder: str, names: str) -> bool:
    """Whether a benchmark set lies outside the training data: not under a ``data.raw``
    root, or restricted to a pair list that ``data.exclude`` keeps out of training."""
    where = Path(folder).resolve()
    inside = any(where.is_relative_to(Path(r).resolve()) for r in params.data.raw)
    excluded = {Path(e).resolve() for e in params.data.exclude}
    return not inside or (bool(names) and Path(names).resolve() in excluded)


# -- rendering --------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.2%}"


def _kv(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                     for k, v in mapping.items())


def decision_line(tags: dict[str, str]) -> str:
    """The first line of the description: where the version stands."""
    decision = tags.get("promotion.decision")
    if decision is None:
        return "challenger: not judged yet (`fusion promote` adds its decision)"
    line = f"{decision}: {tags.get('promotion.reason', '')}"
    if tags.get("promotion.rolled_back") == "true":
        line = (f"rolled back: champion moved back to version "
                f"{tags.get('promotion.previous_champion', '?')} (was {line})")
    return line


def describe(facts: dict[str, Any], tags: dict[str, str]) -> str:
    """The version's description: its standing, family, lineage, data, the weighted gain
    over the two-scale rule per set, and where the card is."""
    data = facts["data"]
    pairs = ", ".join(f"{split} {n}" for split, n in sorted(data["pairs"].items()))
    gains = ", ".join(f"{name} {_pct(methods.get('model'))}"
                      for name, methods in facts["evaluation"]["gains"].items())
    return "\n".join([
        decision_line(tags),
        f"{facts['family']} ({facts['format']}), lineage: {facts['lineage']}",
        f"data: manifest {data['manifest_sha256'][:12]}, pairs: {pairs or 'unknown'}",
        f"weighted gain over {GAIN_OVER} (promotion weights): {gains or 'n/a'}",
        f"model card: {card_uri(facts['run_id'])}"])


def render(facts: dict[str, Any], tags: dict[str, str]) -> str:
    """The card's markdown, with the promotion decision when ``tags`` hold one."""
    lines = [f"# Model card: `{facts['model']}` version {facts['version']}", "",
             f"_{decision_line(tags)}_", ""]
    lines += _details(facts) + _promotion(facts, tags) + _use(facts) + _data_section(facts)
    lines += _params_section(facts) + _curves_section(facts) + _evaluation_section(facts)
    return "\n".join(lines).rstrip() + "\n"


def _details(f: dict[str, Any]) -> list[str]:
    training = f["training"]
    lineage = f["lineage"]
    origin = ("trained from scratch" if lineage == "scratch" else
              f"warm-started from `{lineage}` (its weights are the starting point)")
    run = (f"passed through from the warm start ({training['skipped']})"
           if training.get("skipped") else
           f"`{training.get('run') or '?'}`, {training.get('steps')} steps in the last phase"
           + (f", resumed at {training['resumed_at']}" if training.get("resumed_at") else ""))
    return ["## Model", "", "| | |", "|---|---|",
            f"| family | `{f['family']}` |",
            f"| format | `{f['format']}` (safetensors weights + config.json), logged as an "
            "MLflow pyfunc with an ONNX export |",
            f"| registered as | `models:/{f['model']}/{f['version']}` (run `{f['run_id']}`) |",
            f"| lineage | `{lineage}`: {origin} |",
            f"| training run | {run} |",
            f"| code | git commit `{f['code']}` |",
            f"| weights sha256 | `{f['weights_sha256']}` |", ""]


def _promotion(f: dict[str, Any], tags: dict[str, str]) -> list[str]:
    lines = ["## Promotion", ""]
    decision = tags.get("promotion.decision")
    if decision is None:
        return lines + ["Not judged yet: `fusion promote` re-scores this version beside the "
                        "champion and the baselines and writes its decision here.", ""]
    try:
        numbers = json.loads(tags.get("promotion.numbers", "{}"))
    except json.JSONDecodeError:  # cut at the tag's length limit
        numbers = {}
    compared = tags.get("promotion.compared_to", "none")
    score = (" (weighted gain over the floor baseline, `promote.floor`, where it failed)"
             if numbers.get("floor") else " (weighted mean gain over the champion)"
             if compared != "none" else " (no champion to compare with)")
    lines += [f"- decision: **{decision}**",
              f"- reason: {tags.get('promotion.reason', '')}",
              f"- score: {_pct(float(tags.get('promotion.score', 'nan')))}{score}",
              "- compared to: " + (f"champion version {compared}" if compared != "none"
                                   else "no champion")]
    if "promotion.previous_champion" in tags:
        previous = tags["promotion.previous_champion"]
        lines.append(f"- previous champion: "
                     f"{'version ' + previous if previous != 'none' else 'none'}")
    if tags.get("promotion.rolled_back") == "true":
        lines.append(f"- **rolled back**: `fusion promote --rollback` moved `champion` back to "
                     f"version {tags.get('promotion.previous_champion', '?')}")
    if numbers.get("floor"):
        lines += ["", "Weighted gain over the floor baseline per set, re-scored by promote: "
                  + ", ".join(f"{k} {_pct(v)}" for k, v in numbers["floor"].items())]
    if numbers.get("gains"):
        first = next(iter(numbers["gains"].values()))
        metrics = [m for m, _ in f["evaluation"]["weights"] if m in first] or list(first)
        lines += ["", "Relative gain over the champion, re-scored by promote:", "",
                  "| set | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
        lines += [f"| {name} | " + " | ".join(_pct(g.get(m)) for m in metrics) + " |"
                  for name, g in numbers["gains"].items()]
    return lines + [""]


def _use(f: dict[str, Any]) -> list[str]:
    data, ev, traits = f["data"], f["evaluation"], f["traits"]
    modalities = ", ".join(f"{k} ({n} pairs)" for k, n in sorted(data["modalities"].items()))
    tiling = ("images larger than the tile (`--tile`, default 1024) are fused tile by tile "
              "and reproduce the whole-image result to float rounding" if traits["exact_tiling"]
              else "this family does not tile exactly: large images are fused whole, and "
              "memory grows with the image")
    tiling += ("; above `--exact-pixels` (default 1 MP) in overlapping windows, cross-faded, "
               "in time linear in the pixels, each window's attention seeing only itself")
    held = [name for name, ok in ev["held_out"].items() if ok]
    inside = [name for name, ok in ev["held_out"].items() if not ok]
    lines = ["## Intended use", "",
             "Fusing a **registered** (pixel-aligned) pair of two modalities of the same scene, "
             "of the same size, into one image: infrared + visible, or MRI + CT/PET/SPECT"
             + (f"; trained on {modalities}" if modalities else "") + ". "
             f"`fusion fuse --model models:/{f['model']}/{f['version']}` takes files (grey or "
             "colour, 8 or 16 bit); the pyfunc takes a float32 array (2, H, W) in [0, 1].", "",
             "## Known limits", "",
             "- **Registered pairs only**: the sources are not aligned by the model; pairs of "
             "different sizes are refused, misaligned pairs give doubled edges.",
             "- **Not a diagnostic device**: the medical fusion is for visualisation and "
             "research; it was not validated for diagnosis or any clinical decision.",
             "- **Scored on data it was not trained on**: "
             + (f"{', '.join(held)} held out (outside the training roots, or a pair list "
                "excluded from training"
                + (f": {', '.join(data['excluded'])}" if data["excluded"] else "") + ")"
                if held else "no set is held out")
             + (f"; **{', '.join(inside)} lie inside the training data: not held out**"
                if inside else "") + ".",
             "- **Raw scores**: the model's output is scored as it writes it; promotion uses "
             "these. The published protocol (each image min-max stretched, which raises SD, SF "
             "and VIF) is only for comparing with published tables.",
             "- **Small sets**: the means below come from "
             + ", ".join(f"{name} ({_pairs(methods)} pairs)"
                         for name, methods in ev["raw"].items()) + ".",
             "- **Colour**: the model fuses grey (luma) only; a colour source keeps its Cb/Cr "
             "(source B's when both are colour). 16-bit sources give 16-bit output.",
             f"- **Tiling**: {tiling}."]
    if traits["explains"]:
        lines.append("- `fusion fuse --explain` writes the contribution map of source A.")
    return lines + [""]


def _pairs(methods: dict[str, dict[str, float]]) -> int:
    return int(next(iter(methods.values())).get("pairs", 0))


def _data_section(f: dict[str, Any]) -> list[str]:
    data = f["data"]
    lines = ["## Data", "",
             f"- prepared dataset manifest sha256: `{data['manifest_sha256']}`",
             f"- training roots: {', '.join(data['roots']) or 'none'}; excluded (never "
             f"trained on): {', '.join(data['excluded']) or 'none'}"]
    if data["pairs"]:
        lines += ["", "| split | pairs |" + (" patches |" if data.get("patches") else ""),
                  "|---|---:|" + ("---:|" if data.get("patches") else "")]
        for split, n in sorted(data["pairs"].items()):
            patches = data.get("patches") or {}
            lines.append(f"| {split} | {n} |" + (f" {patches.get(split, 0)} |"
                                                 if data.get("patches") else ""))
    if data.get("rejected") is not None:
        lines += ["", f"Inputs rejected by prepare: {data['rejected']}."]
    return lines + [""]


def _params_section(f: dict[str, Any]) -> list[str]:
    p = f["params"]
    lines = ["## Params that shaped the weights", "",
             f"Network (`model.{f['family']}.net`): {_kv(p['net'])}", "",
             "| phase | loss weights |", "|---|---|"]
    lines += [f"| {phase} ({name}) | {_kv(p['loss'][phase])} |"
              for phase, name in zip(p["loss"], p["phases"], strict=True)]
    return lines + ["", f"Training (`train`): {_kv(p['train'])}", ""]


def _curves_section(f: dict[str, Any]) -> list[str]:
    lines = ["## Training curves", ""]
    for c in f["curves"]:
        if c["image"]:
            final = ", ".join(f"{k} {v:.4g}" for k, v in c["final"].items())
            lines += [f"Phase {c['phase']} ({c['name']}), {c['steps']} steps; last logged: "
                      f"{final}", "", f"![phase {c['phase']} loss curve]({c['image']})", ""]
        else:
            lines += [f"Phase {c['phase']} ({c['name']}): no curve recorded (not trained in "
                      "this run, e.g. passed through from a warm start).", ""]
    return lines


def _evaluation_section(f: dict[str, Any]) -> list[str]:
    ev = f["evaluation"]
    weights = ", ".join(f"{m} x{w:g}" for m, w in ev["weights"])
    lines = ["## Evaluation", "",
             "Means per set, published metric definitions (`fusion/metrics.py`), beside the "
             "training-free baselines: mean fusion, max fusion and the two-scale rule. "
             f"Gain: the weighted mean relative gain over {GAIN_OVER} with the promotion "
             f"weights ({weights}). Higher is better for every metric shown.", ""]
    for name, methods in ev["raw"].items():
        held = "held out" if ev["held_out"].get(name, True) else "NOT held out"
        lines += [f"### {name} ({_pairs(methods)} pairs, {held})", "", "Raw:", "",
                  _table(methods, ev["gains"].get(name, {})), ""]
        if name in ev["published"]:
            lines += ["Published protocol (min-max stretched; only to compare with published "
                      "tables):", "", _table(ev["published"][name], None), ""]
        if name in ev["grids"]:
            columns = " | ".join(["A", "B", *ev.get("labels", ["model"]), GAIN_OVER])
            lines += [f"Grid, one row per pair: {columns}", "",
                      f"![{name} grid]({ev['grids'][name]})", ""]
    return lines


def _table(methods: dict[str, dict[str, float]], gains: dict[str, float] | None) -> str:
    order = ["model", *[m for m in methods if m not in ("model", *BASELINES)],
             *[b for b in BASELINES if b in methods]]
    head = "| method | " + " | ".join(EIGHT) + (f" | gain over {GAIN_OVER} |"
                                                   if gains is not None else " |")
    lines = [head, "|---|" + "---:|" * (len(EIGHT) + (gains is not None))]
    for method in (m for m in order if m in methods):
        cells = [f"{methods[method][m]:.3f}" for m in EIGHT]
        if gains is not None:
            cells.append(_pct(gains.get(method)))
        label = f"**{method}**" if method == "model" else method
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- MLflow -----------------------------------------------------------------------------

def log_card(client: Any, params: Params, name: str, version: str, digest: str) -> str:
    """Build the card of a registered version, log it to the version's run under
    ``model_card/`` and summarise it in the version's description (rerun-safe: it replaces
    both). Returns the card's URI."""
    mv = client.get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        facts = build_card(params, name, version, mv.run_id, digest, folder, dict(mv.tags))
        client.log_artifacts(mv.run_id, str(folder), CARD_DIR)
    client.update_model_version(name, version, description=describe(facts, dict(mv.tags)))
    return card_uri(mv.run_id)


def refresh_card(client: Any, name: str, version: str) -> bool:
    """Re-render a version's card and description with its current ``promotion.*`` tags,
    from the facts logged beside the card; False when the version has no card (registered
    before cards existed)."""
    import mlflow

    mv = client.get_model_version(name, version)
    if not any(a.path.endswith(FACTS) for a in client.list_artifacts(mv.run_id, CARD_DIR)):
        print(f"note: {name} version {version} has no model card to update")
        return False
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id, artifact_path=f"{CARD_DIR}/{FACTS}", dst_path=tmp,
            tracking_uri=mlflow.get_tracking_uri())
        facts = json.loads(Path(local).read_text())
        card = Path(tmp) / CARD
        card.write_text(render(facts, dict(mv.tags)))
        client.log_artifact(mv.run_id, str(card), CARD_DIR)
    client.update_model_version(name, version, description=describe(facts, dict(mv.tags)))
    return True
