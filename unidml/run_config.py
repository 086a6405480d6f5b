"""The composition root of a run's config: `load_run_config` is the one way a command, the study or a
checkpoint's stored config becomes a `DictConfig`, so "validated" means the same everywhere.

It registers every component first (datasets, data backends, samplers, poolings, engine backends,
losses, backbone families: `unidml.registry`), then loads the YAML layers and overrides and runs every
check that needs only the config: the registry-backed choices and the rules of `unidml.config.rules`, the
loss section (built on stand-in sizes on the meta device) and the model (built on the meta device, one
forward pass at `data.image_size`). Rules that need the world size or the device run later, in
`unidml.config.check_runtime`, once the process knows them.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from unidml.config import ConfigError, load_config, load_config_text
from unidml.engine.checkpoint import (
    CheckpointError,
    load,
    load_module_state,
    stored_config_difference,
    stored_config_text,
)

# The modules whose import registers the components a config can name.
COMPONENT_MODULES = ("unidml.data_pipeline", "unidml.models", "unidml.models.torchvision_backbones",
                     "unidml.models.timm_backbones", "unidml.losses", "unidml.engine.backends")

ConfigPaths = str | Path | Sequence[str | Path] | None


def register_components() -> None:
    """Import every module that registers a component (each import happens once per process)."""
    for module in COMPONENT_MODULES:
        importlib.import_module(module)


def load_run_config(paths: ConfigPaths = None, overrides: Iterable[str] = (), *, text: str | None = None,
                    source: str = "<config>") -> DictConfig:
    """The run config of YAML files `paths` (each over the previous one), or of YAML `text` read from
    `source`, with `key=value` overrides; every config-only check passed, or one-line ConfigError."""
    from unidml.losses import validate_loss_params
    from unidml.models import check_model_config

    register_components()
    checks: dict[str, Any] = {"validate_loss": validate_loss_params, "validate_model": check_model_config}
    if text is not None:
        return load_config_text(text, source, list(overrides), **checks)
    return load_config(paths, list(overrides), **checks)


def stored_run_config(state: Mapping[str, Any], path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The run config a checkpoint carries (with `overrides`), checked as `load_run_config` checks a file."""
    text = stored_config_text(state, path)
    try:
        return load_run_config(text=text, source=f"{path} (stored config)", overrides=overrides)
    except ConfigError:
        raise
    except Exception as exc:  # YAML syntax errors and the like in a hand-edited checkpoint
        raise CheckpointError(f"{path}: the stored run config is unreadable ({type(exc).__name__})") from None


def load_for_inference(checkpoint_path: str | Path, overrides: Sequence[str] = ()
                       ) -> tuple[torch.nn.Module, DictConfig]:
    """The checkpoint's embedding network in eval mode and its run config (with `overrides` applied)."""
    from unidml.models import build_model
    from unidml.runtime.device import device_type
    from unidml.runtime.memory_format import channels_last

    state = load(checkpoint_path)
    cfg = stored_run_config(state, checkpoint_path, overrides)
    model_cfg = OmegaConf.merge(cfg.model, {"pretrained": ""})  # the checkpoint carries the weights
    model = build_model(model_cfg, image_size=int(cfg.data.image_size))
    hint = stored_config_difference(state, checkpoint_path, cfg,
                                    ("model.arch", "model.embedding_dim", "model.small_input_stem"))
    load_module_state(model, state.get("model"), checkpoint_path, "model",
                      hint or "the stored config does not describe the stored weights")
    device = device_type(str(cfg.engine.device))  # where the commands that load it compute
    if channels_last(cfg.engine.channels_last, device, cfg.engine.backend, model).weights:
        # The memory format the run trained and evaluated in (see Trainer): another one changes low-precision
        # rounding, and with it near-tied neighbours, so evaluation would not reproduce the run's figures.
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), cfg
