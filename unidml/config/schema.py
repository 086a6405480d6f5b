"""The run configuration's schema: the names every layer shares, the typed sections and their defaults.

A YAML config is merged onto `RunConfig` (see `unidml.config.loading`), so an unknown key or a value of
the wrong type fails there, naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unidml.errors import UserError

# Names every layer uses: similarities (eval.metric, a pairwise loss's `distance`, the kernels) and
# numeric precisions (engine.precision; their dtypes are in `unidml.runtime.precision`).
METRICS: tuple[str, ...] = ("cosine", "euclidean")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
# engine.precision may also be `auto` (resolved on the device by `unidml.runtime.precision`).
AUTO_PRECISION = "auto"
# Retrieval metrics `eval.metrics` may name (computed in `unidml.evaluation.metrics`).
# A recipe variant's search space (configs/pairwise/<loss>.yaml), read only by `unidml compare --trials`;
# a run trains at the values the file sets, so `unidml train --config BASE --config VARIANT` drops it.
STUDY_SECTION = "search"
EVAL_METRICS: tuple[str, ...] = ("recall", "map_at_r", "r_precision", "map", "mrr", "nmi")
# Experiment trackers `log.trackers` may name (implemented in `unidml.engine.trackers`).
TRACKERS: tuple[str, ...] = ("tensorboard", "mlflow", "wandb")
# Re-rankings `eval.rerank.name` may name (computed in `unidml.evaluation.rerank`).
RERANKS: tuple[str, ...] = ("none", "k_reciprocal", "query_expansion", "database_augmentation")
# The largest image accepted (`data.max_pixels`): PIL's decompression-bomb limit, 2 x
# PIL.Image.MAX_IMAGE_PIXELS, above which PIL refuses to open a file, so the limit means the same
# in both loaders (see unidml.data_pipeline.images).
MAX_PIXELS_LIMIT = 178_956_970


# The optimizer keys of `train` at the values no optimizer reads (momentum off), as in `TrainConfig`.
_OPTIMIZER_KEYS: dict[str, Any] = {"momentum": 0.0, "nesterov": False, "betas": [0.9, 0.999], "eps": 1e-8,
                                   "trust_coefficient": 0.001}
# What choosing `train.optimizer` brings when the config does not say: every optimizer key, at that
# optimizer's own default where it reads the key and at the neutral value above where it does not. SGD as
# in the paper's cross-entropy recipe (momentum 0.9, Nesterov); AdamW with torch's own betas and eps; LARS
# with momentum 0.9 and trust coefficient 0.001 (You et al. 2017); LAMB with eps 1e-6 (You et al. 2020).
# Applied by the loader when a layer switches the optimizer, so the previous one's keys never leak.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {**_OPTIMIZER_KEYS, "momentum": 0.9, "nesterov": True},
    "adamw": dict(_OPTIMIZER_KEYS),
    "lars": {**_OPTIMIZER_KEYS, "momentum": 0.9, "trust_coefficient": 0.001},
    "lamb": {**_OPTIMIZER_KEYS, "eps": 1e-6},
}
# train.lr_scaling: how the learning rate follows the global batch (`unidml.engine.optim.scaled_lr`).
LR_SCALINGS: tuple[str, ...] = ("none", "linear", "sqrt")


class ConfigError(UserError):
    """A configuration problem, reported as one line naming the key or file."""


@dataclass
class SyntheticConfig:
    """Parameters of the built-in generated datasets, `synthetic` and `glyphs` (written into `data.root` when
    absent)."""

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
    momentum: float = 0.0  # SGD and LARS
    nesterov: bool = False  # SGD only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW and LAMB
    eps: float = 1e-8  # AdamW and LAMB
    trust_coefficient: float = 0.001  # LARS: eta of the trust ratio
    weight_decay: float = 5e-4
    # the learning rate is train.lr at lr_reference_batch images per optimizer step, scaled to the run's
    # (batch_size x grad_accum) linearly, by its square root, or not at all (none)
    lr_scaling: str = "none"
    lr_reference_batch: int = 256
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
    deterministic: bool = False  # CUDA: deterministic cuDNN/torch/cuBLAS kernels, not the fastest (runtime.determinism)


@dataclass
class EngineConfig:
    backend: str = "single"
    precision: str = AUTO_PRECISION
    embed_chunks: int = 1
    max_skipped_steps: int = 10
    profile: bool = False
    compile: bool = False
    channels_last: bool = True
    deepspeed_config: str = ""
    sync_bn: bool = False
    device: str = "auto"


@dataclass
class RerankConfig:
    """Re-ranking after the exact k-NN (docs/design.md, "Re-ranking"); each method reads its own keys."""

    name: str = "none"
    k1: int = 20  # k_reciprocal: the k of the k-reciprocal sets (Zhong et al. 2017)
    k2: int = 6  # k_reciprocal: neighbours averaged in the local query expansion (1 = none)
    lambda_value: float = 0.3  # k_reciprocal: weight of the original distance against the Jaccard distance
    candidates: int = 100  # k_reciprocal: each query's top neighbours re-ordered (at least the k the metrics need)
    top_n: int = 2  # query_expansion / database_augmentation: neighbours averaged in
    alpha: float = 3.0  # query_expansion / database_augmentation: neighbour weight max(similarity, 0)^alpha


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    every: int = 1
    memory_budget_mb: int = 1024
    metric: str = "cosine"
    batch_size: int = 256
    metrics: list[str] = field(default_factory=lambda: ["recall", "map_at_r", "r_precision"])
    split: str = "val"  # the split whose Recall@1 selects the best epoch (test: the paper's protocol)
    rerank: RerankConfig = field(default_factory=RerankConfig)


@dataclass
class MlflowConfig:
    # a relative `file:` store is read from the working directory, as MLflow itself does (docs/design.md,
    # "Experiment trackers"); any other URI (sqlite:///..., http://...) is passed to MLflow as is
    tracking_uri: str = "file:./mlruns"
    experiment: str = "unidml"


@dataclass
class WandbConfig:
    project: str = "unidml"
    entity: str = ""
    mode: str = "auto"  # auto: online with an API key (WANDB_API_KEY or `wandb login`), else offline


@dataclass
class LogConfig:
    """Where a run's params, scalars, metrics and files go besides its run directory (rank 0 only)."""

    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "cross_entropy"})
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
