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

DEFAULT_PARAMS = Path("params.yaml")


@dataclass(frozen=True)
class DataParams:
    """The ``data`` section: where raw pairs live and how ``prepare`` cuts them."""

    raw: list[str] = field(default_factory=lambda: ["data/sample/roadscene"])
    out: str = "data/prepared"
    summary: str = "reports/prepare.json"
    exclude: list[str] = field(default_factory=list)
    val_ratio: float = 0.1
    patch_size: int = 128
    stride: int = 64
    min_patch_std: float = 0.02
    shard_max_mb: float = 64.0
    strict: bool = False


@dataclass(frozen=True)
class ModelParams:
    """The ``model`` section: DAE-Fuse sizes (see DESIGN.md section 2)."""

    channels: int = 24  # C: width of the shallow encoder and the decoder
    stem_stride: int = 2  # pixel-unshuffle factor before the encoder (1: full resolution)
    heads: int = 2  # channel-attention heads (Restormer blocks, cross-modality fusion)
    ffn_factor: float = 2.0  # gated-dconv feed-forward expansion
    fusion_ffn_factor: float = 0.0  # feed-forward after cross attention (0: none)
    se_blocks: int = 1  # Restormer blocks in the shallow encoder
    dhe_blocks: int = 2  # ResNet-18 basic blocks in the high-frequency encoder
    vit_patch: int = 8  # low-frequency encoder token stride
    vit_dim: int = 64
    vit_depth: int = 2
    vit_heads: int = 4
    decoder_blocks: int = 1
    disc_channels: int = 32
    disc_layers: int = 4

    def __post_init__(self) -> None:
        for name in ("channels", "vit_dim"):
            heads = self.heads if name == "channels" else self.vit_heads
            if getattr(self, name) % heads:
                raise FusionError(f"model.{name} must be divisible by its number of heads")


@dataclass(frozen=True)
class LossParams:
    """The ``loss`` section: the weights the search tunes (DESIGN.md section 3)."""

    lam: float = 0.1  # phase I: weight of the adversarial term (lambda)
    sigma: float = 0.2  # phase I: sigma * L_corr + (1 - sigma) * L_content
    w_text: float = 5.0  # phase II texture term (Sobel magnitudes are small: weigh it up)
    w_int: float = 1.0  # phase II intensity term
    w_adv: float = 0.01  # phase II adversarial term (at 0.1 it dominated and added noise)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma <= 1.0:
            raise FusionError(f"loss.sigma must be in [0, 1], got {self.sigma}")


@dataclass(frozen=True)
class TrainParams:
    """The ``train`` section: the loop shared by single-process and Ray Train runs."""

    data: str = "data/prepared"  # output of `fusion prepare` (reads patches/train-*)
    phase1_out: str = "models/phase1"
    phase2_out: str = "models/phase2"
    curves: str = "reports"  # loss curves for `dvc plots`: reports/phase{1,2}_curve.csv
    checkpoints: str = "checkpoints"  # single-process (--local) checkpoints, one folder per run
    keep_checkpoints: int = 2
    phase1_steps: int = 60
    phase2_steps: int = 60
    batch_size: int = 8
    crop: int = 0  # random crop inside each patch (0: whole patch)
    lr: float = 5e-4  # autoencoder / fusion Adam learning rate
    d_lr: float = 2e-4  # discriminator Adam learning rate
    lr_min_ratio: float = 0.1  # cosine decay from lr to lr * ratio
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    log_every: int = 10
    checkpoint_every: int = 100


PLACEMENT = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class RayParams:
    """The ``ray`` section: how ``fusion train`` runs on Ray Train (laptop to cluster)."""

    address: str = ""  # "": $RAY_ADDRESS if set, else start a local cluster
    num_workers: int = 1  # DDP workers; train.batch_size is per worker
    use_gpu: bool = False  # one GPU per worker (nccl); false: CPU workers (gloo)
    cpus_per_worker: float = 1.0
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
class EvaluateParams:
    """The ``evaluate`` section: which sets to fuse and score, and where reports go."""

    model: str = "models/phase2"
    sets: list[BenchmarkSet] = field(default_factory=_default_sets)
    out: str = "reports/eval"  # per-image parquet, report.md, fused images
    grids: str = "reports/grids"  # one PNG per set (A | B | fused) for `dvc plots`
    summary: str = "reports/metrics.json"  # per-set means for `dvc metrics show`
    grid_rows: int = 4  # pairs shown per grid image
    tile: int = 1024


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
    model_name: str = "dae-fuse"
    registered: str = "reports/registered.json"  # the register stage's record (DVC out)


@dataclass(frozen=True)
class MetricWeight:
    metric: str
    weight: float = 1.0


def _check_weights(weights: list[MetricWeight], where: str) -> None:
    from fusion.metrics import ALL

    unknown = sorted({w.metric for w in weights} - set(ALL))
    if unknown or not weights:
        raise FusionError(f"{where}: unknown metric(s) {unknown}; known: {ALL}")


def _default_weights() -> list[MetricWeight]:
    return [MetricWeight(m) for m in ("VIF", "Qabf", "SSIM", "MI", "SCD")]


@dataclass(frozen=True)
class PromoteParams:
    """The ``promote`` section: the rule that moves the ``champion`` alias."""

    weights: list[MetricWeight] = field(default_factory=_default_weights)
    sets: list[str] = field(default_factory=list)  # evaluate.sets names; empty: all of them
    min_improvement: float = 0.0  # weighted mean relative gain the challenger needs
    max_drop: float = 0.05  # no weighted metric may get worse by more (relative), on any set

    def __post_init__(self) -> None:
        _check_weights(self.weights, "promote.weights")


@dataclass(frozen=True)
class SearchRange:
    """One tuned loss weight: a key of the ``loss`` section and its range."""

    name: str
    low: float
    high: float
    log: bool = False  # sample on a log scale (weights spanning decades)

    def __post_init__(self) -> None:
        known = [f.name for f in dataclasses.fields(LossParams)]
        if self.name not in known:
            raise FusionError(f"search.space: {self.name!r} is not a loss weight; known: {known}")
        if not self.low < self.high or self.low < 0 or (self.log and self.low <= 0):
            raise FusionError(f"search.space.{self.name}: need 0 <= low < high (low > 0 "
                              f"with log), got [{self.low}, {self.high}]")
        if self.name == "sigma" and self.high > 1:
            raise FusionError("search.space.sigma: sigma must stay in [0, 1]")


def _default_space() -> list[SearchRange]:
    return [SearchRange("lam", 0.01, 1.0, True), SearchRange("sigma", 0.0, 1.0),
            SearchRange("w_text", 0.5, 20.0, True), SearchRange("w_int", 0.2, 5.0, True),
            SearchRange("w_adv", 0.01, 1.0, True)]


@dataclass(frozen=True)
class SearchParams:
    """The ``search`` section: Optuna through Ray Tune over the loss weights."""

    study: str = "dae-fuse-loss"  # Optuna study name: the same name resumes the study
    storage: str = ""  # "": sqlite:///<out>/optuna.db; any SQLAlchemy URL (postgresql://...)
    trials: int = 8  # trials the study should hold; a rerun adds only the missing ones
    max_concurrent: int = 1  # trials at once (each one is a Ray Train run)
    phase1_steps: int = 60  # per trial (replace train.phase{1,2}_steps)
    phase2_steps: int = 60
    eval_every: int = 20  # validation score every N phase II steps: the ASHA milestones
    reduction_factor: int = 2  # ASHA keeps the best 1/N of the trials at each milestone
    val_pairs: int = 8  # held-out pairs (split "val" of the manifest) scored; 0: all
    score: list[MetricWeight] = field(default_factory=_default_weights)
    space: list[SearchRange] = field(default_factory=_default_space)
    out: str = "reports/search"  # best.json, trials.csv, optuna.db
    write_params: str = "params.yaml"  # best loss weights written here; "": best.json only

    def __post_init__(self) -> None:
        _check_weights(self.score, "search.score")
        if min(self.trials, self.max_concurrent, self.phase1_steps, self.phase2_steps,
               self.eval_every) < 1:
            raise FusionError("search: trials, max_concurrent, steps and eval_every must be >= 1")
        if not self.space:
            raise FusionError("search.space: nothing to tune")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    loss: LossParams = field(default_factory=LossParams)
    train: TrainParams = field(default_factory=TrainParams)
    ray: RayParams = field(default_factory=RayParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    metrics: MetricParams = field(default_factory=MetricParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    promote: PromoteParams = field(default_factory=PromoteParams)
    search: SearchParams = field(default_factory=SearchParams)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Return ``value`` coerced to ``hint`` (int -> float only) or raise naming ``where``."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
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


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise FusionError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise FusionError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
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


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Read ``params.yaml`` (missing sections take their defaults) and apply overrides."""
    path = Path(path) if path else DEFAULT_PARAMS
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise FusionError(f"{path}: not valid YAML: {exc}") from exc
    elif path != DEFAULT_PARAMS:
        raise FusionError(f"{path}: params file not found")
    return _build(Params, apply_overrides(raw, list(overrides or [])), "")


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
    params = _build(Params, yaml.safe_load(text) or {}, "")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return params


def to_dict(params: Params) -> dict[str, Any]:
    """Plain mapping of the params, e.g. for logging or writing a params file."""
    return dataclasses.asdict(params)
