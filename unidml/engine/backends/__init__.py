"""How gradients become parameter updates: `engine.backend` = single | ddp | deepspeed.

`build_backend` returns a `TrainBackend` (see `base`): `torch_ddp.TorchBackend` for one process or
DistributedDataParallel, `deepspeed.DeepSpeedBackend` for DeepSpeed ZeRO (imported only when used).
docs/design.md, "How to add a backend", lists the steps for another one.
"""
from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from unidml.engine.backends.base import ChunkableBackend, StepOutcome, TrainBackend
from unidml.engine.backends.torch_ddp import TorchBackend
from unidml.engine.distributed import DistEnv
from unidml.registry import ENGINE_BACKENDS

__all__ = ["ChunkableBackend", "StepOutcome", "TorchBackend", "TrainBackend", "build_backend"]


def _deepspeed(module: nn.Module, cfg: DictConfig, env: DistEnv, total_steps: int) -> TrainBackend:
    from unidml.engine.backends.deepspeed import DeepSpeedBackend  # imported only when used

    return DeepSpeedBackend(module, cfg, env, total_steps)


ENGINE_BACKENDS.add("single", TorchBackend)  # one process
ENGINE_BACKENDS.add("ddp", TorchBackend)  # DistributedDataParallel over the process group
ENGINE_BACKENDS.add("deepspeed", _deepspeed)


def build_backend(module: nn.Module, cfg: DictConfig, env: DistEnv, total_steps: int) -> TrainBackend:
    """The backend registered as `engine.backend` around `module` (a `TrainStep`), for `total_steps` steps."""
    return ENGINE_BACKENDS.get(str(cfg.engine.backend))(module, cfg, env, total_steps)
