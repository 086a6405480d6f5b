"""The config's rules, checked in one place: `validate(cfg)` for everything the config alone decides
(choices, ranges, combinations of keys), before any work starts, and `check_runtime(cfg, env)` for the
rules that also need the world size or the device, once the process knows them."""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol, Union

from omegaconf import DictConfig, OmegaConf

from unidml.config.schema import (
    AUTO_PRECISION,
    EVAL_METRICS,
    LR_SCALINGS,
    MAX_PIXELS_LIMIT,
    METRICS,
    OPTIMIZER_DEFAULTS,
    PRECISIONS,
    RERANKS,
    TRACKERS,
    ConfigError,
)
from unidml.registry import CONFIG_CHOICES, choices

# Fixed choices; the keys naming a component (data.dataset, data.backend, data.sampler, model.pooling,
# engine.backend) take a registry's names (`unidml.registry.CONFIG_CHOICES`).
CHOICES: dict[str, tuple[str, ...]] = {
    "data.on_error": ("skip", "fail"),
    "data.train_resize": ("none", "shorter", "square"),
    "train.optimizer": tuple(OPTIMIZER_DEFAULTS),
    "train.lr_scaling": LR_SCALINGS,
    "engine.precision": (*PRECISIONS, AUTO_PRECISION),
    "engine.device": ("auto", "cpu", "cuda"),
    "eval.metric": METRICS,
    "eval.split": ("test", "val"),
    "log.wandb.mode": ("auto", "online", "offline"),
    "eval.rerank.name": RERANKS,
}

POSITIVE: tuple[str, ...] = (
    "data.image_size", "data.resize_size", "data.m_per_class", "train.batch_size", "train.grad_accum",
    "train.lr_reference_batch",
    "engine.embed_chunks", "engine.max_skipped_steps", "eval.every", "eval.memory_budget_mb",
    "eval.batch_size", "data.synthetic.classes", "data.synthetic.per_class", "data.synthetic.size",
    "eval.rerank.k1", "eval.rerank.k2", "eval.rerank.candidates", "eval.rerank.top_n",
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


def _integer(low: int, high: int):
    """A whole number from `low` to `high`."""
    def rule(value: int) -> str | None:
        return None if low <= value <= high else f"must be an integer in [{low}, {high}], got {value}"
    return rule


def _pair_rule(low: float, high: float):
    """Two values `[a, b]` with low < a <= b <= high (a RandomResizedCrop scale or ratio range)."""
    def rule(value: list[float]) -> str | None:
        if len(value) == 2 and all(math.isfinite(v) for v in value) and low < value[0] <= value[1] <= high:
            return None
        return f"must be two numbers [a, b] with {low:g} < a <= b <= {high:g}, got {list(value)}"
    return rule


def _betas_rule(value: list[float]) -> str | None:
    """Adam's two moment decay rates [beta1, beta2], each in [0, 1)."""
    if len(value) == 2 and all(math.isfinite(v) and 0 <= v < 1 for v in value):
        return None
    return f"must be two numbers [beta1, beta2], each in [0, 1), got {list(value)}"


def _jitter_rule(value: list[float]) -> str | None:
    if len(value) == 4 and all(math.isfinite(v) and v >= 0 for v in value) and value[3] <= 0.5:
        return None
    return f"must be four numbers [brightness, contrast, saturation, hue], all >= 0 and hue <= 0.5, got {list(value)}"


def _members(allowed: tuple[str, ...], at_least_one: str = ""):
    """Names from `allowed`, each once; `at_least_one` names what an empty list lacks (empty allowed without it)."""
    def rule(value: list[str]) -> str | None:
        unknown = [v for v in value if v not in allowed]
        if unknown:
            return f"unknown {unknown} (known: {', '.join(allowed)})"
        if len(set(value)) < len(value):
            return f"names one twice: {list(value)}"
        return f"must name at least one {at_least_one}" if at_least_one and not value else None
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
    "train.betas": _betas_rule,
    "train.eps": _finite(0, low_open=True),
    "train.trust_coefficient": _finite(0, low_open=True),  # LARS's eta
    "train.warmup_iters": _finite(0),
    "train.grad_clip": _finite(0),  # 0 = off
    "train.log_every": _finite(1),
    # every generator seeded from it takes it unchanged: NumPy's legacy global seed is 32-bit
    "train.seed": _integer(0, 2**32 - 1),
    "data.num_workers": _finite(0),
    "data.max_pixels": _finite(1, MAX_PIXELS_LIMIT),  # above it PIL refuses to open an image anyway
    "data.crop_scale": _pair_rule(0, 1),
    "data.crop_ratio": _pair_rule(0, math.inf),
    "data.color_jitter": _jitter_rule,
    "eval.metrics": _members(EVAL_METRICS, "metric"),
    "log.trackers": _members(TRACKERS),  # [] logs to the run directory only (no TensorBoard)
    # exact search needs a fixed 24 MiB working set on the CPU (16 on a GPU) plus its query rows
    "eval.memory_budget_mb": _finite(32),
    "eval.rerank.lambda_value": _finite(0, 1),
    "eval.rerank.alpha": _finite(0),
}


Source = Union[str, Callable[[str], str]]  # a config's source, or where each key's value came from


def _fail(source: Source, key: str, problem: str) -> ConfigError:
    """The one line for `key`, naming where its value came from (the YAML file or the override)."""
    return ConfigError(f"{source(key) if callable(source) else source}: key '{key}': {problem}")


def _check_values(cfg: DictConfig, source: Source) -> None:
    for key, rule in VALUE_RULES.items():
        problem = rule(OmegaConf.select(cfg, key))
        if problem:
            raise _fail(source, key, problem)
    if cfg.data.resize_size < cfg.data.image_size:
        raise _fail(source, "data.resize_size", f"{cfg.data.resize_size} is smaller than data.image_size "
                          f"{cfg.data.image_size} (the test transform resizes, then crops image_size)")


def _registered_choices() -> list[tuple[str, tuple[str, ...]]]:
    """(key, accepted names) of the registry-backed keys; their registries must have been filled."""
    empty = [registry.name for registry, _ in CONFIG_CHOICES.values() if not registry]
    if empty:
        raise RuntimeError(f"the {', '.join(empty)} registry is empty: load run configs with "
                           f"unidml.run_config.load_run_config, which registers every component first")
    return [(key, choices(key)) for key in CONFIG_CHOICES]


def validate(cfg: DictConfig, source: Source = "<config>") -> None:
    """Every rule that needs only the config: choices, ranges and combinations of keys (ConfigError).
    `source` names where the config came from, or is a function of the key giving where its value did."""
    for key, allowed in (*CHOICES.items(), *_registered_choices()):
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise _fail(source, key, f"'{value}' is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value <= 0:
            raise _fail(source, key, f"must be > 0, got {value}")
    if not 0.0 <= cfg.data.val_classes < 1.0:
        raise _fail(source, "data.val_classes", f"must be in [0, 1), got {cfg.data.val_classes}")
    if not cfg.eval.ks or min(cfg.eval.ks) <= 0:
        raise _fail(source, "eval.ks", "must be a non-empty list of positive integers")
    if not isinstance(cfg.loss.get("name"), str):
        raise _fail(source, "loss.name", "missing or not a string")
    _check_values(cfg, source)
    if cfg.eval.split == "val" and cfg.data.val_classes == 0:
        raise _fail(source, "eval.split", "'val' needs a validation split (data.val_classes > 0)")
    _validate_rerank(cfg.eval, source)
    if cfg.engine.backend == "deepspeed":
        if not cfg.engine.deepspeed_config:
            raise _fail(source, "engine.deepspeed_config", "engine.backend=deepspeed needs a "
                              "DeepSpeed JSON: pass --deepspeed configs/deepspeed/zero1.json")
        for key, refused in (("engine.embed_chunks", cfg.engine.embed_chunks > 1),
                             ("engine.sync_bn", cfg.engine.sync_bn)):
            if refused:
                raise _fail(source, key, "not supported with engine.backend=deepspeed (use ddp)")
        if cfg.loss.get("head_parallel", False):
            # DeepSpeed broadcasts every parameter from rank 0 and averages every gradient: class shards
            # of unequal size would desync its collectives, equal ones would train rank 0's rows everywhere.
            raise _fail(source, "loss.head_parallel", "a class-sharded head is not supported with "
                        "engine.backend=deepspeed (DeepSpeed replicates every parameter); use ddp")
    _validate_optimizer(cfg, source)


def _validate_rerank(eval_cfg: DictConfig, source: Source) -> None:
    """Combinations of the re-ranking keys with the rest of `eval` (docs/design.md, "Re-ranking")."""
    rerank = eval_cfg.rerank
    if rerank.name == "k_reciprocal" and rerank.k2 > rerank.k1 + 1:
        raise _fail(source, "eval.rerank.k2", f"must be at most eval.rerank.k1 + 1 = {rerank.k1 + 1} (the local "
                    f"query expansion averages a point's own k1-neighbourhood), got {rerank.k2}")
    if rerank.name in ("query_expansion", "database_augmentation") and eval_cfg.metric != "cosine":
        raise _fail(source, "eval.rerank.name", f"{rerank.name} averages unit vectors weighted by their cosine "
                    f"similarity: it needs eval.metric=cosine")
    full_ranking = [m for m in eval_cfg.metrics if m in ("map", "mrr")]
    if rerank.name == "k_reciprocal" and full_ranking:
        raise _fail(source, "eval.metrics", f"{', '.join(full_ranking)} rank the whole gallery, but k_reciprocal "
                    f"re-orders only each query's top eval.rerank.candidates; leave them out or use another "
                    f"eval.rerank.name")


def _validate_optimizer(cfg: DictConfig, source: Source) -> None:
    """Ranges of the optimizer and pooling keys (the model itself is checked by `validate_model`)."""
    train = cfg.train
    if not 0.0 < train.layer_decay <= 1.0:
        raise _fail(source, "train.layer_decay", f"must be in (0, 1] (1 = off), got {train.layer_decay}")
    for key in ("backbone_lr_mult", "head_lr_mult", "loss_lr_mult"):
        if train[key] < 0:
            raise _fail(source, f"train.{key}", f"must be >= 0, got {train[key]}")
    if train.nesterov and (train.optimizer != "sgd" or train.momentum <= 0):
        raise _fail(source, "train.nesterov", "needs train.optimizer=sgd with train.momentum > 0")
    if train.momentum and train.optimizer == "lamb":
        raise _fail(source, "train.momentum", "train.optimizer=lamb does not read it (its first moment decays "
                    "at train.betas[0]); set train.momentum=0")
    if train.optimizer in ("lars", "lamb"):
        # the trust ratio needs each whole tensor: a class shard, or ZeRO's flattened partitions, would
        # each get their own ratio
        if cfg.loss.get("head_parallel", False):
            raise _fail(source, "loss.head_parallel", f"train.optimizer={train.optimizer} needs whole tensors "
                        f"for its layer-wise trust ratio, a class-sharded head holds a shard per rank")
        if cfg.engine.backend == "deepspeed":
            raise _fail(source, "engine.backend", f"train.optimizer={train.optimizer} needs whole tensors for "
                        f"its layer-wise trust ratio, DeepSpeed's ZeRO steps flattened ones; use engine.backend=ddp")
    if cfg.model.gem_p <= 0:
        raise _fail(source, "model.gem_p", f"must be > 0, got {cfg.model.gem_p}")


def per_rank_batch(global_batch_size: int, world_size: int) -> int:
    """Each rank's share of `train.batch_size`; a global batch the ranks cannot share equally is refused."""
    if global_batch_size % world_size:
        raise ConfigError(f"train.batch_size={global_batch_size} is not divisible by the world size {world_size}")
    return global_batch_size // world_size


def check_trackers(cfg: DictConfig) -> None:
    """One line naming the extra to install when `log.trackers` names a tracker whose package is missing
    (checked before any training: a run, and a study before its first run)."""
    from unidml.extras import require

    for name in cfg.log.trackers:
        if name != "tensorboard":  # TensorBoard is a core dependency
            require(name, f"log.trackers: {name}")


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
    check_trackers(cfg)
    if cfg.engine.embed_chunks > per_rank_batch(cfg.train.batch_size, world):
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
