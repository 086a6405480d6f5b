"""Typed run configuration: dataclass schemas, YAML loading, dotted overrides, validation, one-line errors.

A config is a YAML file with the sections `data`, `model`, `loss`, `train`, `engine`, `eval`
(docs/design.md, "Configuration"). It is merged onto the schema defaults below, so an unknown key, a
value of the wrong type or a missing file fails with a `ConfigError` naming the key or file. Then
`validate(cfg)` applies every rule that needs only the config (choices, ranges, combinations of
keys) before any work starts, and `check_runtime(cfg, env)` the rules that also need the world size
or the device, as soon as the process knows them. The `loss` section is open (each loss has its own
parameters); it is checked by the loss registry, passed in as `validate_loss`.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from unidml.errors import UserError

# Names every layer uses: similarities (eval.metric, a pairwise loss's `distance`, the kernels) and
# numeric precisions (engine.precision; their dtypes are in `unidml.runtime.precision`).
METRICS: tuple[str, ...] = ("cosine", "euclidean")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
# Retrieval metrics `eval.metrics` may name (computed in `unidml.evaluation.metrics`).
EVAL_METRICS: tuple[str, ...] = ("recall", "map_at_r", "r_precision", "map", "mrr", "nmi")
# The largest image accepted (`data.max_pixels`): PIL's decompression-bomb limit, 2 x
# PIL.Image.MAX_IMAGE_PIXELS, above which PIL refuses to open a file, so the limit means the same
# in both loaders (see unidml.data_pipeline.images).
MAX_PIXELS_LIMIT = 178_956_970


class ConfigError(UserError):
    """A configuration problem, reported as one line naming the key or file."""


@dataclass
class SyntheticConfig:
    """Parameters of the built-in synthetic dataset (generated into `data.root` when absent)."""

    classes: int = 100
    per_class: int = 40
    size: int = 64
    seed: int = 0
    test_fraction: float = 0.5


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: str = "data/synthetic"
    list_file: str = ""
    backend: str = "auto"
    on_error: str = "skip"
    sampler: str = "random"
    m_per_class: int = 4
    val_classes: float = 0.2  # class-disjoint validation split carved from the training classes (0: none)
    image_size: int = 224
    resize_size: int = 256
    train_resize: str = "none"
    crop_scale: list[float] = field(default_factory=lambda: [0.16, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip: bool = True
    color_jitter: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    num_workers: int = 2
    max_pixels: int = MAX_PIXELS_LIMIT
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    pretrained: str = ""
    pretrained_required: bool = True
    embedding_dim: int = 0
    freeze_bn: bool = True
    feature_bn: bool = True
    small_input_stem: bool = False
    pooling: str = "auto"
    gem_p: float = 3.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra backbone constructor arguments (timm: drop_path_rate)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.02
    optimizer: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 5e-4
    backbone_lr_mult: float = 1.0
    head_lr_mult: float = 1.0
    loss_lr_mult: float = 1.0
    layer_decay: float = 1.0
    warmup_iters: int = 100
    seed: int = 0
    resume: str = "never"
    grad_accum: int = 1
    grad_clip: float = 0.0
    log_every: int = 10


@dataclass
class EngineConfig:
    backend: str = "single"
    precision: str = "bf16"
    embed_chunks: int = 1
    max_skipped_steps: int = 10
    profile: bool = False
    compile: bool = False
    channels_last: bool = True
    deepspeed_config: str = ""
    sync_bn: bool = False
    device: str = "auto"


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    every: int = 1
    memory_budget_mb: int = 1024
    metric: str = "cosine"
    batch_size: int = 256
    metrics: list[str] = field(default_factory=lambda: ["recall", "map_at_r", "r_precision"])
    split: str = "val"  # the split whose Recall@1 selects the best epoch (test: the paper's protocol)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "cross_entropy"})
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("sop", "inshop", "cub", "cars", "list", "folder", "synthetic"),
    "data.backend": ("auto", "dali", "torchvision"),
    "data.on_error": ("skip", "fail"),
    "data.sampler": ("random", "m_per_class"),
    "data.train_resize": ("none", "shorter", "square"),
    "model.pooling": ("auto", "avg", "gem", "cls"),
    "train.optimizer": ("sgd", "adamw"),
    "engine.backend": ("single", "ddp", "deepspeed"),
    "engine.precision": PRECISIONS,
    "engine.device": ("auto", "cpu", "cuda"),
    "eval.metric": METRICS,
    "eval.split": ("test", "val"),
}

POSITIVE: tuple[str, ...] = (
    "data.image_size", "data.resize_size", "data.m_per_class", "train.batch_size", "train.grad_accum",
    "engine.embed_chunks", "engine.max_skipped_steps", "eval.every", "eval.memory_budget_mb",
    "eval.batch_size", "data.synthetic.classes", "data.synthetic.per_class", "data.synthetic.size",
)


def _finite(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """A range rule: the value is a finite number from `low` to `high` (bounds excluded where open)."""
    def rule(value: float) -> str | None:
        inside = (math.isfinite(value) and (value > low if low_open else value >= low)
                  and (value < high if high_open else value <= high))
        if inside:
            return None
        wanted = f"{'>' if low_open else '>='} {low:g}"
        if high != math.inf:
            wanted = f"in {'(' if low_open else '['}{low:g}, {high:{'d' if float(high).is_integer() else 'g'}}" \
                     f"{')' if high_open else ']'}"
        return f"must be a finite number {wanted}, got {value}"
    return rule


def _pair_rule(low: float, high: float):
    """Two values `[a, b]` with low < a <= b <= high (a RandomResizedCrop scale or ratio range)."""
    def rule(value: list[float]) -> str | None:
        if len(value) == 2 and all(math.isfinite(v) for v in value) and low < value[0] <= value[1] <= high:
            return None
        return f"must be two numbers [a, b] with {low:g} < a <= b <= {high:g}, got {list(value)}"
    return rule


def _jitter_rule(value: list[float]) -> str | None:
    if len(value) == 4 and all(math.isfinite(v) and v >= 0 for v in value) and value[3] <= 0.5:
        return None
    return f"must be four numbers [brightness, contrast, saturation, hue], all >= 0 and hue <= 0.5, got {list(value)}"


def _members(allowed: tuple[str, ...]):
    def rule(value: list[str]) -> str | None:
        unknown = [v for v in value if v not in allowed]
        if not value or unknown:
            return f"unknown {unknown} (known: {', '.join(allowed)})" if unknown else "must name at least one metric"
        return None
    return rule


# Value rules beyond "> 0": key -> check returning what is wrong, or None. Wrong values here would
# otherwise train garbage (lr=nan), crash late (an invalid crop scale inside the loader) or do
# nothing silently (epochs=-3).
VALUE_RULES: dict[str, Callable[[Any], str | None]] = {
    "model.embedding_dim": _finite(0),  # 0 = the backbone's own feature size
    "train.epochs": _finite(0),
    "train.lr": _finite(0, low_open=True),
    "train.weight_decay": _finite(0),
    "train.momentum": _finite(0, 1, high_open=True),
    "train.warmup_iters": _finite(0),
    "train.grad_clip": _finite(0),  # 0 = off
    "train.log_every": _finite(1),
    "data.num_workers": _finite(0),
    "data.max_pixels": _finite(1, MAX_PIXELS_LIMIT),  # above it PIL refuses to open an image anyway
    "data.crop_scale": _pair_rule(0, 1),
    "data.crop_ratio": _pair_rule(0, math.inf),
    "data.color_jitter": _jitter_rule,
    "eval.metrics": _members(EVAL_METRICS),
    # exact search needs a fixed 24 MiB working set on the CPU (16 on a GPU) plus its query rows
    "eval.memory_budget_mb": _finite(32),
}


def _check_values(cfg: DictConfig, source: str) -> None:
    for key, rule in VALUE_RULES.items():
        problem = rule(OmegaConf.select(cfg, key))
        if problem:
            raise ConfigError(f"{source}: key '{key}': {problem}")
    if cfg.data.resize_size < cfg.data.image_size:
        raise ConfigError(f"{source}: key 'data.resize_size': {cfg.data.resize_size} is smaller than data.image_size "
                          f"{cfg.data.image_size} (the test transform resizes, then crops image_size)")


def _one_line(exc: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf exception into one line naming the source and the full key."""
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"{source}: key '{key}': {msg}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        logging.getLogger(__name__).warning("%s: the config file is empty; running on the defaults", path)
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b=value` and parse the value as YAML (so `0.01`, `true`, `[1,2]` get their types)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    return out


def validate(cfg: DictConfig, source: str = "<config>") -> None:
    """Every rule that needs only the config: choices, ranges and combinations of keys (ConfigError)."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{source}: key '{key}': '{value}' is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value <= 0:
            raise ConfigError(f"{source}: key '{key}': must be > 0, got {value}")
    if not 0.0 <= cfg.data.val_classes < 1.0:
        raise ConfigError(f"{source}: key 'data.val_classes': must be in [0, 1), got {cfg.data.val_classes}")
    if not cfg.eval.ks or min(cfg.eval.ks) <= 0:
        raise ConfigError(f"{source}: key 'eval.ks': must be a non-empty list of positive integers")
    if not isinstance(cfg.loss.get("name"), str):
        raise ConfigError(f"{source}: key 'loss.name': missing or not a string")
    _check_values(cfg, source)
    if cfg.eval.split == "val" and cfg.data.val_classes == 0:
        raise ConfigError(f"{source}: key 'eval.split': 'val' needs a validation split (data.val_classes > 0)")
    if cfg.engine.backend == "deepspeed":
        if not cfg.engine.deepspeed_config:
            raise ConfigError(f"{source}: key 'engine.deepspeed_config': engine.backend=deepspeed needs a "
                              f"DeepSpeed JSON: pass --deepspeed configs/deepspeed/zero1.json")
        for key, refused in (("engine.embed_chunks", cfg.engine.embed_chunks > 1),
                             ("engine.sync_bn", cfg.engine.sync_bn)):
            if refused:
                raise ConfigError(f"{source}: key '{key}': not supported with engine.backend=deepspeed (use ddp)")
    _validate_optimizer(cfg, source)


def _validate_optimizer(cfg: DictConfig, source: str) -> None:
    """Ranges of the optimizer and pooling keys (the model itself is checked by `validate_model`)."""
    train = cfg.train
    if not 0.0 < train.layer_decay <= 1.0:
        raise ConfigError(f"{source}: key 'train.layer_decay': must be in (0, 1] (1 = off), got {train.layer_decay}")
    for key in ("backbone_lr_mult", "head_lr_mult", "loss_lr_mult"):
        if train[key] < 0:
            raise ConfigError(f"{source}: key 'train.{key}': must be >= 0, got {train[key]}")
    if train.nesterov and (train.optimizer != "sgd" or train.momentum <= 0):
        raise ConfigError(f"{source}: key 'train.nesterov': needs train.optimizer=sgd with train.momentum > 0")
    if cfg.model.gem_p <= 0:
        raise ConfigError(f"{source}: key 'model.gem_p': must be > 0, got {cfg.model.gem_p}")


class RuntimeEnv(Protocol):
    """What `check_runtime` needs to know about this process (`engine.distributed.DistEnv` has it)."""

    world_size: int
    device: Any


def check_runtime(cfg: DictConfig, env: RuntimeEnv) -> None:
    """Every rule that needs the world size or the device (or an optional package), checked once the
    process knows them."""
    from unidml.extras import require
    from unidml.runtime.collectives import process_group_active

    backend, world = cfg.engine.backend, env.world_size
    if backend == "deepspeed":
        require("deepspeed", "engine.backend=deepspeed")
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the world size {world}")
    if cfg.engine.embed_chunks > cfg.train.batch_size // world:
        raise ConfigError(f"engine.embed_chunks={cfg.engine.embed_chunks} exceeds the per-rank batch "
                          f"({cfg.train.batch_size // world} images)")
    if backend == "single" and world > 1:
        raise ConfigError(f"engine.backend=single but the launcher started {world} processes; "
                          f"set engine.backend=ddp (or deepspeed)")
    if backend == "ddp" and not process_group_active():
        raise ConfigError("engine.backend=ddp needs a process group: start with torchrun (see `unidml launch`)")
    if backend == "ddp" and cfg.engine.sync_bn and env.device.type != "cuda":
        raise ConfigError("engine.sync_bn=true needs CUDA (torch SyncBatchNorm has no CPU path); "
                          "on CPU use model.feature_bn=false or engine.sync_bn=false")


def _absolute_data_paths(cfg: DictConfig) -> None:
    """`data.root` (or, for a list without root, `data.list_file`) made absolute, so that a run's stored
    config names the same data from any working directory."""
    if cfg.data.root:
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
    elif cfg.data.list_file:
        cfg.data.list_file = os.path.abspath(os.path.expanduser(cfg.data.list_file))


def _switch_loss(cfg: DictConfig, name: Any, source: str) -> None:
    """A new `loss.name` starts a fresh loss section: the previous loss's parameters would not fit it."""
    old = dict(cfg.loss)
    if name == old.get("name"):
        return
    dropped = [key for key in old if key != "name"]
    if dropped and os.environ.get("RANK", "0") == "0":
        logging.getLogger(__name__).warning("%s: loss '%s' replaces '%s', whose parameters are dropped (%s); set "
                                            "them after loss.name to keep them", source, name, old.get("name"),
                                            ", ".join(dropped))
    cfg.loss = {"name": name}


def _merge_layer(cfg: DictConfig, data: dict[str, Any], source: str) -> DictConfig:
    """Merge one YAML file's (or one override's) keys onto `cfg`; naming another loss replaces the loss section."""
    loss = data.get("loss")
    if isinstance(loss, dict) and "name" in loss:
        _switch_loss(cfg, loss["name"], source)
    try:
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as exc:
        raise _one_line(exc, source) from None


def _delete(cfg: DictConfig, key: str, source: str) -> None:
    """`~key`: remove an open section's key (a loss parameter), or put a schema key back to its default."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise ConfigError(f"{source}: no key '{key}' to delete")
    if key == "loss.name":
        raise ConfigError(f"{source}: 'loss.name' cannot be deleted; set loss.name=NAME to change the loss")
    try:
        del parent[leaf]
    except OmegaConfBaseException:  # a schema field: deleting means its default
        OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.structured(RunConfig), key), merge=False)


def _build(layers: Sequence[tuple[dict[str, Any], str]], overrides: Iterable[str],
           validate_loss: Callable[[dict[str, Any]], None] | None,
           validate_model: Callable[[DictConfig, int], object] | None = None) -> DictConfig:
    """Schema defaults, then each (YAML mapping, its source) layer in order, then the overrides."""
    cfg = OmegaConf.structured(RunConfig)
    for data, where in layers:
        cfg = _merge_layer(cfg, data, where)
    source = " + ".join(where for _, where in layers) or "<defaults>"
    for item in overrides:
        if item.startswith("~"):
            _delete(cfg, item[1:].strip(), f"override '{item}'")
            continue
        key, value = parse_override(item)
        cfg = _merge_layer(cfg, _nest(key, value), f"override '{item}'")
    validate(cfg, source)
    _absolute_data_paths(cfg)
    if validate_loss is not None:
        try:
            validate_loss(OmegaConf.to_container(cfg.loss, resolve=True))
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{source}: key 'loss': {exc}") from None
    if validate_model is not None:  # e.g. unidml.models.check_model_config: (model section, image size)
        try:
            validate_model(cfg.model, cfg.data.image_size)
        except UserError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_config(paths: str | Path | Sequence[str | Path] | None, overrides: Iterable[str] = (),
                validate_loss: Callable[[dict[str, Any]], None] | None = None,
                validate_model: Callable[[DictConfig, int], object] | None = None) -> DictConfig:
    """Load YAML configs onto the schema, each file over the previous ones (left to right), apply
    `key=value` overrides (`~key` deletes a key), validate; raise ConfigError.

    A file or override that names a different `loss.name` starts a fresh loss section (the previous
    loss's parameters are dropped, with a one-line warning saying which).
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    return _build([(_read_yaml(Path(p)), str(p)) for p in paths], overrides, validate_loss, validate_model)


def load_config_text(text: str, source: str, overrides: Iterable[str] = (),
                     validate_loss: Callable[[dict[str, Any]], None] | None = None) -> DictConfig:
    """Like `load_config` for YAML text already in memory (e.g. the copy a checkpoint carries)."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: stored config is not a mapping")
    return _build([(data, source)], overrides, validate_loss)


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (what the run dir's config.yaml holds)."""
    return OmegaConf.to_yaml(cfg, resolve=True)

