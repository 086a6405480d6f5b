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

__all__ = ["ChunkableBackend", "StepOutcome", "TorchBackend", "TrainBackend", "build_backend"]


def build_backend(module: nn.Module, cfg: DictConfig, env: DistEnv, total_steps: int) -> TrainBackend:
    """The backend named by `engine.backend` around `module` (a `TrainStep`), for `total_steps` steps."""
    if cfg.engine.backend == "deepspeed":
        from unidml.engine.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(module, cfg, env, total_steps)
    return TorchBackend(module, cfg, env, total_steps)
