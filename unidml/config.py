"""Typed run configuration: dataclass schemas, YAML loading, dotted overrides, one-line errors.

A config is a YAML file with the sections `data`, `model`, `loss`, `train`, `engine`, `eval`
(DESIGN.md §8). It is merged onto the schema defaults below, so an unknown key, a value of the
wrong type or a missing file fails with a `ConfigError` naming the key or file before any work
starts. The `loss` section is open (each loss has its own parameters); its keys are checked
against the chosen loss's constructor by `validate_loss_section`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from unidml.errors import UserError


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
    val_classes: float = 0.0
    image_size: int = 224
    resize_size: int = 256
    train_resize: str = "none"
    crop_scale: list[float] = field(default_factory=lambda: [0.16, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip: bool = True
    color_jitter: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    num_workers: int = 2
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


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.02
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 5e-4
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
    split: str = "test"


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
    "engine.backend": ("single", "ddp", "deepspeed"),
    "engine.precision": ("fp32", "bf16", "fp16"),
    "engine.device": ("auto", "cpu", "cuda"),
    "eval.metric": ("cosine", "euclidean"),
    "eval.split": ("test", "val"),
}

POSITIVE: tuple[str, ...] = (
    "data.image_size", "data.resize_size", "data.m_per_class", "train.batch_size", "train.grad_accum",
    "engine.embed_chunks", "engine.max_skipped_steps", "eval.every", "eval.memory_budget_mb",
    "eval.batch_size", "data.synthetic.classes", "data.synthetic.per_class", "data.synthetic.size",
)


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


def _check_choices(cfg: DictConfig, source: str) -> None:
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


def _build(data: dict[str, Any], source: str, overrides: Iterable[str],
           validate_loss: Callable[[dict[str, Any]], None] | None) -> DictConfig:
    cfg = OmegaConf.structured(RunConfig)
    try:
        cfg = OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as exc:
        raise _one_line(exc, source) from None
    for item in overrides:
        key, value = parse_override(item)
        try:
            cfg = OmegaConf.merge(cfg, _nest(key, value))
        except OmegaConfBaseException as exc:
            raise _one_line(exc, f"override '{item}'") from None
    _check_choices(cfg, source)
    if validate_loss is not None:
        try:
            validate_loss(OmegaConf.to_container(cfg.loss, resolve=True))
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{source}: key 'loss': {exc}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_config(path: str | Path | None, overrides: Iterable[str] = (),
                validate_loss: Callable[[dict[str, Any]], None] | None = None) -> DictConfig:
    """Load a YAML config onto the schema, apply `key=value` overrides, validate; raise ConfigError."""
    data = _read_yaml(Path(path)) if path is not None else {}
    return _build(data, str(path) if path is not None else "<defaults>", overrides, validate_loss)


def load_config_text(text: str, source: str, overrides: Iterable[str] = (),
                     validate_loss: Callable[[dict[str, Any]], None] | None = None) -> DictConfig:
    """Like `load_config` for YAML text already in memory (e.g. the copy a checkpoint carries)."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: stored config is not a mapping")
    return _build(data, source, overrides, validate_loss)


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (what the run dir's config.yaml holds)."""
    return OmegaConf.to_yaml(cfg, resolve=True)

