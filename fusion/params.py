"""Typed view of ``params.yaml``: the one source of truth for every stage.

DVC stages, the CLI and the flows all call :func:`load_params`; ``--set section.key=value``
overrides use the same syntax as ``dvc exp run -S`` and are type-checked here.
"""

from __future__ import annotations

import dataclasses
import io
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusion.errors import FusionError
from fusion.family import Family, default_family, get_family, list_families
from fusion.files import write_text
from fusion.metric_names import METRICS

DEFAULT_PARAMS = Path("params.yaml")


@dataclass(frozen=True)
class DataParams:
    """The ``data`` section: where raw pairs live and how ``prepare`` cuts them."""

    raw: list[str] = field(default_factory=lambda: ["data/sample/roadscene"])
    out: str = "data/prepared"
    summary: str = "reports/prepare.json"
    exclude: list[str] = field(default_factory=lambda: ["data/sample/roadscene/test_split.txt"])
    val_ratio: float = 0.1
    patch_size: int = 128
    stride: int = 64
    min_patch_std: float = 0.02
    shard_max_mb: float = 64.0
    strict: bool = False
    max_pixels: int = 50_000_000  # larger images are refused from their header (prepare ...)
    follow_symlinks: bool = False  # false: symlinks leaving a raw root are rejected

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise FusionError("data.max_pixels must be positive")


class FamilyConfig(typing.Protocol):
    """A family's section ``model.<family>``, typed by the dataclass the family registered
    (``fusion.family``): sizes, loss weights of each phase, search space."""

    net: Any
    search: list[Any]


@dataclass(frozen=True)
class ModelParams:
    """The ``model`` section: which family trains, and one typed section per registered
    family (the registry hands params each family's dataclass). Sections of other families
    are kept, and checked, too."""

    family: str = field(default_factory=default_family)
    configs: dict[str, FamilyConfig] = field(default_factory=dict)  # family name -> section

    @property
    def config(self) -> FamilyConfig:
        """The active family's section."""
        return self.configs[self.family]


@dataclass(frozen=True)
class TrainParams:
    """The ``train`` section: the loop shared by single-process and Ray Train runs."""

    data: str = "data/prepared"  # output of `fusion prepare` (reads patches/train-*)
    out: str = "models"  # exports: <out>/phase1, <out>/phase2 ...
    curves: str = "reports"  # loss curves for `dvc plots`: reports/phase{N}_curve.csv
    checkpoints: str = "checkpoints"  # single-process (--local) checkpoints, one folder per run
    keep_checkpoints: int = 2
    steps: list[int] = field(default_factory=lambda: [60, 60])  # per phase of the recipe
    init: str = "@champion"  # warm start: an export folder, models:/<name>@<alias>, "": scratch
    teacher: str = ""  # an export folder whose fused images phase 2 also learns (w_distill)
    batch_size: int = 8
    crop: int = 0  # random crop inside each patch (0: whole patch)
    lr: float = 5e-4  # network Adam learning rate
    d_lr: float = 2e-4  # discriminator Adam learning rate (adversarial phases)
    lr_min_ratio: float = 0.1  # cosine decay from lr to lr * ratio
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if not self.steps or min(self.steps) < 1:
            raise FusionError(f"train.steps: one positive count per phase, got {self.steps}")

    def phase_out(self, phase: int) -> Path:
        return Path(self.out) / f"phase{phase}"


PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class RayParams:
    """The ``ray`` section: how ``fusion train`` runs on Ray Train (laptop to cluster)."""

    address: str = ""  # "": $RAY_ADDRESS if set, else a new local Ray instance
    num_workers: int = 1  # DDP workers; train.batch_size is per worker
    use_gpu: bool = False  # one GPU per worker (nccl); false: CPU workers (gloo)
    cpus_per_worker: float = 2.0  # also the worker's torch threads
    gpus_per_worker: float = 1.0  # only with use_gpu
    placement_strategy: str = "PACK"  # SPREAD / STRICT_SPREAD: workers on different nodes
    storage_path: str = "checkpoints/ray"  # local folder or s3://bucket/prefix
    storage_endpoint: str = ""  # S3-compatible endpoint (MinIO ...); "": $AWS_ENDPOINT_URL
    max_failures: int = 2  # worker-group restarts from the last checkpoint

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise FusionError(f"ray.num_workers must be at least 1, got {self.num_workers}")
        if self.placement_strategy not in PLACEMENT:
            raise FusionError(f"ray.placement_strategy must be one of {PLACEMENT}")


@dataclass(frozen=True)
class BenchmarkSet:
    """One test set: two source folders matched by stem, optionally only the listed names."""

    name: str
    a: str
    b: str
    names: str = ""  # file listing the pairs to use (e.g. roadscene/test_split.txt)


def _default_sets() -> list[BenchmarkSet]:
    return [BenchmarkSet("tno", "data/sample/tno/ir", "data/sample/tno/vi"),
            BenchmarkSet("roadscene_test", "data/sample/roadscene/ir",
                         "data/sample/roadscene/vi", "data/sample/roadscene/test_split.txt"),
            BenchmarkSet("mri_ct", "data/sample/mri_ct/mri", "data/sample/mri_ct/ct")]


@dataclass(frozen=True)
class TwoScaleParams:
    """The training-free two-scale rule (``fusion fuse --method two-scale``, the baseline
    ``two-scale`` of every report and the default promotion floor)."""

    sigma: float = 3.0  # Gaussian sigma (pixels) that splits base from detail
    ceiling: float = 0.05  # at most (1 + ceiling) x the brighter source: no halo, dark stays dark

    def __post_init__(self) -> None:
        if self.sigma <= 0 or self.ceiling < 0:
            raise FusionError("evaluate.two_scale: sigma must be positive, ceiling >= 0")


@dataclass(frozen=True)
class EvaluateParams:
    """The ``evaluate`` section: which sets to fuse and score, and where reports go."""

    model: str = "models/phase2"  # the pipeline's model (what `register` registers)
    compare: list[str] = field(default_factory=list)  # more models beside it (folder or URI)
    sets: list[BenchmarkSet] = field(default_factory=_default_sets)
    out: str = "reports/eval"  # per-image parquet, report.md, fused images
    grids: str = "reports/grids"  # one PNG per set (A | B | fused) for `dvc plots`
    summary: str = "reports/metrics"  # <set>.json, <set>-mean.json ... for `dvc metrics show`
    grid_rows: int = 4  # pairs shown per grid image
    tile: int = 1024
    two_scale: TwoScaleParams = field(default_factory=TwoScaleParams)


@dataclass(frozen=True)
class MetricParams:
    """The ``metrics`` section: definition variants; defaults reproduce the published evaluator."""

    ssim_data_range: float = 2.0
    mi_unit: str = "nats"

    def __post_init__(self) -> None:
        if self.mi_unit not in ("nats", "bits"):
            raise FusionError(f"metrics.mi_unit must be 'nats' or 'bits', got {self.mi_unit!r}")
        if self.ssim_data_range <= 0:
            raise FusionError("metrics.ssim_data_range must be positive")


@dataclass(frozen=True)
class MlflowParams:
    """The ``mlflow`` section: where runs, models and the registry live."""

    tracking_uri: str = ""  # "": $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (embedded)
    experiment: str = "fusion"
    model_name: str = ""  # registered model; "": the family's name
    registered: str = "reports/registered.json"  # the register stage's record (DVC out)
    timeout_s: float = 15.0  # per HTTP request to a tracking server (3 tries: under 60 s)
    retries: int = 2  # retries of a failed request (then exit 75, naming the server)


@dataclass(frozen=True)
class MetricWeight:
    metric: str
    weight: float = 1.0


def _check_weights(weights: list[MetricWeight], where: str) -> None:
    unknown = sorted({w.metric for w in weights} - set(METRICS))
    if unknown or not weights:
        raise FusionError(f"{where}: unknown metric(s) {unknown}; known: {list(METRICS)}")


def _default_weights() -> list[MetricWeight]:
    return [MetricWeight(m) for m in ("VIF", "Qabf", "SSIM")] + [
        MetricWeight(m, 0.5) for m in ("MI", "SCD")]


BASELINES = ("mean", "max", "two-scale")  # training-free fusions every report shows
FLOORS = (*BASELINES, "none")


@dataclass(frozen=True)
class PromoteParams:
    """The ``promote`` section: the rule that moves the ``champion`` alias."""

    weights: list[MetricWeight] = field(default_factory=_default_weights)
    sets: list[str] = field(default_factory=list)  # evaluate.sets names; empty: all of them
    floor: str = "two-scale"  # the challenger must beat this baseline on every set (none: off)
    min_improvement: float = 0.0  # weighted mean relative gain the challenger needs
    max_drop: float = 0.05  # no weighted metric may get worse by more (relative), on any set

    def __post_init__(self) -> None:
        _check_weights(self.weights, "promote.weights")
        if self.floor not in FLOORS:
            raise FusionError(f"promote.floor must be one of {FLOORS}, got {self.floor!r}")


@dataclass(frozen=True)
class SearchParams:
    """The ``search`` section: Optuna through Ray Tune over the active family's loss weights
    (the space is ``model.<family>.search``)."""

    study: str = ""  # Optuna study; "": <family>-loss. The same name resumes the study
    storage: str = ""  # "": sqlite:///<out>/optuna.db; any SQLAlchemy URL (postgresql://...)
    trials: int = 8  # trials the study should hold; a rerun adds only the missing ones
    max_concurrent: int = 1  # trials at once (each one is a Ray Train run)
    steps: list[int] = field(default_factory=lambda: [60, 60])  # per phase, per trial
    eval_every: int = 20  # validation score every N steps of the last phase (ASHA milestones)
    reduction_factor: int = 2  # ASHA keeps the best 1/N of the trials at each milestone
    val_pairs: int = 8  # held-out pairs (split "val" of the manifest) scored; 0: all
    score: list[MetricWeight] = field(default_factory=_default_weights)
    baseline: str = "two-scale"  # the score is the weighted relative gain over this baseline
    guard: float = 4.0  # minus this times each relative loss in SD, SF, SCD or SSIM
    out: str = "reports/search"  # best.json, trials.csv, optuna.db
    write_params: str = "params.yaml"  # best loss weights written here; "": best.json only

    def __post_init__(self) -> None:
        _check_weights(self.score, "search.score")
        if self.baseline not in BASELINES:
            raise FusionError(f"search.baseline must be one of {BASELINES}, got "
                              f"{self.baseline!r}")
        if self.guard < 0:
            raise FusionError(f"search.guard must be >= 0, got {self.guard}")
        if min(self.trials, self.max_concurrent, self.eval_every, *self.steps) < 1:
            raise FusionError("search: trials, max_concurrent, steps and eval_every must be >= 1")


@dataclass(frozen=True)
class ServeParams:
    """The ``serve`` section: ``fusion serve``, the Ray Serve application that serves the
    active family's model under ``alias`` and follows the alias when it moves."""

    alias: str = "champion"  # served: models:/<registered model>@<alias>
    replicas: int = 1
    cpus_per_replica: float = 1.0  # also each replica's onnxruntime threads
    host: str = "127.0.0.1"  # where the HTTP endpoint listens (0.0.0.0 behind a proxy)
    port: int = 8000
    proxy_location: str = "HeadOnly"  # HeadOnly: one endpoint; EveryNode: one per node
    poll_s: float = 10.0  # every replica checks the alias this often
    max_request_mb: float = 64.0  # larger requests are refused (413) before they are read
    max_ongoing: int = 4  # requests one replica takes at once; Serve queues the rest

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.cpus_per_replica <= 0 or self.max_ongoing < 1:
            raise FusionError("serve: replicas and max_ongoing must be >= 1, "
                              "cpus_per_replica positive")
        if self.poll_s <= 0 or self.max_request_mb <= 0:
            raise FusionError("serve: poll_s and max_request_mb must be positive")
        if self.proxy_location not in ("HeadOnly", "EveryNode"):
            raise FusionError("serve.proxy_location must be HeadOnly or EveryNode")


@dataclass(frozen=True)
class BatchParams:
    """The ``batch`` section: ``fusion fuse --ray``, folders or S3 prefixes of pairs fused on
    the Ray cluster through Ray Data, resumable from the output's manifest."""

    workers: int = 2  # fusing actors (each holds one onnxruntime session)
    cpus_per_worker: float = 1.0  # also each actor's onnxruntime threads
    use_gpu: bool = False  # one GPU per actor (onnxruntime's CUDA provider)
    pairs_per_batch: int = 4  # pairs a worker fuses per Ray Data batch
    storage_endpoint: str = ""  # S3-compatible endpoint for s3:// inputs and outputs

    def __post_init__(self) -> None:
        if self.workers < 1 or self.pairs_per_batch < 1 or self.cpus_per_worker <= 0:
            raise FusionError("batch: workers and pairs_per_batch must be >= 1, "
                              "cpus_per_worker positive")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    ray: RayParams = field(default_factory=RayParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    metrics: MetricParams = field(default_factory=MetricParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    promote: PromoteParams = field(default_factory=PromoteParams)
    search: SearchParams = field(default_factory=SearchParams)
    serve: ServeParams = field(default_factory=ServeParams)
    batch: BatchParams = field(default_factory=BatchParams)

    def __post_init__(self) -> None:
        if not self.model.configs:  # built in code: every family at its defaults
            object.__setattr__(self, "model", _model_section({"family": self.model.family},
                                                             "model"))
        phases = len(self.family.phases)
        for where, steps in (("train.steps", self.train.steps),
                             ("search.steps", self.search.steps)):
            if len(steps) != phases:
                raise FusionError(f"{where}: {self.model.family} trains {phases} phases, "
                                  f"got {len(steps)} step counts")
        if self.distill_weight and not self.train.teacher:
            raise FusionError(f"model.{self.model.family}.phase2.w_distill: "
                              f"{self.distill_weight} needs a train.teacher (an export folder)")

    @property
    def family(self) -> Family:
        """The active family's registry entry."""
        return get_family(self.model.family)

    @property
    def config(self) -> FamilyConfig:
        return self.model.config

    @property
    def distill_weight(self) -> float:
        """The active family's ``phase2.w_distill`` (0 for a family without one)."""
        return getattr(getattr(self.config, "phase2", None), "w_distill", 0.0)

    @property
    def model_name(self) -> str:
        """The registered model of the active family."""
        return self.mlflow.model_name or self.model.family


def _model_section(raw: Any, where: str) -> ModelParams:
    """``model``: the family name plus a typed section per registered family."""
    if not isinstance(raw, dict):
        raise FusionError(f"{where}: expected a mapping, got {raw!r}")
    families = list_families()
    unknown = sorted(set(raw) - {"family", *families})
    if unknown:
        raise FusionError(f"{where}: unknown key(s) {unknown}; known: family, {families}")
    family = _check_type(raw.get("family", default_family()), str, f"{where}.family")
    get_family(family)  # a clear error for an unknown name
    configs = {}
    for name in families:
        fam = get_family(name)
        config = typed(fam.config, raw.get(name) or {}, f"{where}.{name}")
        fam.check(config, f"{where}.{name}")
        configs[name] = config
    return ModelParams(family, configs)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` coerced to ``hint`` (int -> float only) or raise naming ``where``."""
    origin = typing.get_origin(hint)
    if hint is ModelParams:
        return _model_section(value, where)
    if dataclasses.is_dataclass(hint):
        return typed(hint, value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise FusionError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise FusionError(f"{where}: expected true/false, got {value!r}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise FusionError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def typed(cls: type, raw: dict[str, Any], where: str) -> Any:
    """``cls`` (a params dataclass) built from a mapping, every value type-checked; errors
    name the key as ``where.key``."""
    if not isinstance(raw, dict):
        raise FusionError(f"{where or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise FusionError(f"{where or 'params'}: unknown key(s) {unknown}; known: "
                          f"{sorted(names)}")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(raw))
    if missing:
        raise FusionError(f"{where}: missing key(s) {missing}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        sub = f"{where}.{name}" if where else name
        kwargs[name] = _check_type(value, hint, sub)
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a params mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise FusionError(f"--set {item!r}: expected section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FusionError(f"--set {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(text) if text else ""
    return raw


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: where (line and column, from 1) and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}{what}"


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Read ``params.yaml`` (missing sections take their defaults) and apply overrides."""
    path = Path(path) if path else DEFAULT_PARAMS
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise FusionError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
    elif path != DEFAULT_PARAMS:
        raise FusionError(f"{path}: params file not found")
    return typed(Params, apply_overrides(raw, list(overrides or [])), "")


def update_params_file(path: str | Path, updates: dict[str, Any]) -> Params:
    """Merge a (partial) params mapping into a params file, keeping its comments and layout.

    The merged result is validated first and written atomically: a bad update raises and
    leaves the file as it was. Returns the params now in the file.
    """
    from ruamel.yaml import YAML

    path = Path(path)
    rt = YAML()
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.width = 4096
    doc = rt.load(path.read_text()) if path.exists() else None
    doc = doc if doc is not None else {}

    def merge(node: Any, new: dict[str, Any], where: str) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value, f"{where}{key}.")
            else:
                node[key] = value

    if not isinstance(updates, dict):
        raise FusionError(f"params update for {path}: expected a mapping, got {updates!r}")
    merge(doc, updates, "")
    buffer = io.StringIO()
    rt.dump(doc, buffer)
    text = buffer.getvalue()
    params = typed(Params, yaml.safe_load(text) or {}, "")
    write_text(path, text)
    return params


def to_dict(params: Params) -> dict[str, Any]:
    """Plain mapping of the params, laid out as params.yaml (for logging or writing)."""
    out = dataclasses.asdict(params)
    out["model"] = {"family": params.model.family,
                    **{name: dataclasses.asdict(c) for name, c in params.model.configs.items()}}
    return out
