"""Typed run configuration: a YAML file with the sections `data`, `model`, `loss`, `train`, `engine`,
`eval`, `log` (docs/design.md, "Configuration").

- `schema`: the typed sections and their defaults, and the names every layer shares (`METRICS`, ...);
- `loading`: YAML files layered onto the schema, dotted overrides, one-line `ConfigError`s;
- `rules`: `validate(cfg)`, every rule that needs only the config, run before any work, and
  `check_runtime(cfg, env)`, the rules that also need the world size or the device.

The `loss` section is open (each loss has its own parameters); the loss registry checks it, passed to
`load_config` as `validate_loss`.
"""
from unidml.config.loading import load_config, load_config_text, parse_override, to_yaml
from unidml.config.rules import CHOICES, POSITIVE, VALUE_RULES, RuntimeEnv, check_runtime, check_trackers, validate
from unidml.config.schema import (
    AUTO_PRECISION,
    EVAL_METRICS,
    MAX_PIXELS_LIMIT,
    METRICS,
    PRECISIONS,
    RERANKS,
    STUDY_SECTION,
    TRACKERS,
    ConfigError,
    DataConfig,
    EngineConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    RerankConfig,
    RunConfig,
    SyntheticConfig,
    TrainConfig,
)

__all__ = [
    "AUTO_PRECISION", "CHOICES", "EVAL_METRICS", "MAX_PIXELS_LIMIT", "METRICS", "POSITIVE", "PRECISIONS",
    "RERANKS", "STUDY_SECTION", "TRACKERS", "VALUE_RULES",
    "ConfigError", "DataConfig", "EngineConfig", "EvalConfig", "LogConfig", "ModelConfig", "RerankConfig",
    "RunConfig", "RuntimeEnv", "SyntheticConfig", "TrainConfig", "check_runtime", "check_trackers", "load_config",
    "load_config_text", "parse_override", "to_yaml", "validate",
]
