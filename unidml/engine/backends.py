"""How gradients become parameter updates: `engine.backend` = single | ddp | deepspeed.

Every backend owns the optimizer side of a run behind one small interface used by the trainer:
`wrapped` (what the forward goes through), `sync(enabled)` (gradient all-reduce on/off for
accumulation micro-batches), `backward(loss)`, `step() -> StepOutcome`, `lr`, `loss_scale`,
`save(state, directory, is_best)` and `restore(directory_or_path)`. The torch backend here
covers one process and DDP; DeepSpeed lives in `deepspeed_backend`.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch
from omegaconf import DictConfig
from torch import nn

from unidml.engine import checkpoint
from unidml.engine.distributed import DistEnv, barrier
from unidml.engine.optim import build_optimizer, build_scheduler
from unidml.engine.precision import autocast, grad_scaler
from unidml.errors import UserError

log = logging.getLogger(__name__)
DDP_BUCKET_MB = 25


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step: the global gradient norm (before clipping) and whether it was applied."""

    grad_norm: float
    applied: bool


def check_backend(backend: str, env: DistEnv) -> None:
    """`single` is one process; more processes need `ddp` or `deepspeed` (said in one line)."""
    if backend == "single" and env.distributed:
        raise UserError(f"engine.backend=single but the launcher started {env.world_size} processes; "
                        f"set engine.backend=ddp (or deepspeed)")


def sync_batch_norm(model: nn.Module, env: DistEnv) -> None:
    """engine.sync_bn: batch statistics over the global batch for the feature BatchNorm1d, and for the
    backbone's BatchNorm2d layers when they train (frozen ones stay per-rank eval-mode layers).
    In place: converted layers share the parameters the optimizer already holds. CUDA only (torch's
    SyncBatchNorm refuses CPU tensors)."""
    if env.device.type != "cuda":
        raise UserError("engine.sync_bn=true needs CUDA (torch SyncBatchNorm has no CPU path); "
                        "on CPU use model.feature_bn=false or engine.sync_bn=false")
    model.feature_bn = nn.SyncBatchNorm.convert_sync_batchnorm(model.feature_bn)
    if not model.freeze_bn:
        model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)


class TorchBackend:
    """engine.backend=single|ddp: torch SGD + warm-up/cosine schedule + GradScaler (fp16), and for
    `ddp` a DistributedDataParallel wrapper with bucketed all-reduce overlapping the backward pass.

    A step whose gradient norm is non-finite is not applied (fp16 loss-scale overflow included);
    the trainer counts consecutive skips.
    """

    def __init__(self, module: nn.Module, cfg: DictConfig, env: DistEnv, total_steps: int) -> None:
        self.module = module
        self.env = env
        self.accum = cfg.train.grad_accum
        self.grad_clip = cfg.train.grad_clip
        self.optimizer = build_optimizer(module, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.warmup_iters, total_steps)
        self.scaler = grad_scaler(env.device, cfg.engine.precision)
        self.precision = cfg.engine.precision
        self.ddp = cfg.engine.backend == "ddp"
        self.wrapped = self._wrap(module, cfg.engine.sync_bn) if self.ddp else module
        if cfg.engine.compile:
            self.wrapped = torch.compile(self.wrapped)

    def _wrap(self, module: nn.Module, sync_bn: bool) -> nn.Module:
        if not torch.distributed.is_initialized():
            raise UserError("engine.backend=ddp needs a process group: start with torchrun (see `unidml launch`)")
        if sync_bn:
            sync_batch_norm(module.model, self.env)
        device_ids = [self.env.local_rank] if self.env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, bucket_cap_mb=DDP_BUCKET_MB,
                                                   gradient_as_bucket_view=True)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None, *extra: Any) -> torch.Tensor:
        """The wrapped `TrainStep` under autocast (through DDP, so its gradient hooks are armed)."""
        with autocast(self.env.device, self.precision):
            return self.wrapped(images, labels, *extra)

    def sync(self, enabled: bool) -> ContextManager:
        """Gradient all-reduce on the next backward only when `enabled` (DDP `no_sync` otherwise)."""
        return contextlib.nullcontext() if enabled or not self.ddp else self.wrapped.no_sync()

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """What to differentiate for one micro-batch: loss / grad_accum, times the fp16 loss scale."""
        return self.scaler.scale(loss / self.accum)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaled(loss).backward()

    def step(self) -> StepOutcome:
        """Unscale, clip, and step unless the gradient norm is non-finite; then advance the schedule."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.module.parameters() if p.grad is not None]
        total = nn.utils.get_total_norm([p.grad for p in params])
        if self.grad_clip > 0:
            nn.utils.clip_grads_with_norm_(params, self.grad_clip, total)
        grad_norm = float(total)  # clip_grad_norm_ would also rescale every gradient, costly on CPU
        applied = math.isfinite(grad_norm)
        if applied:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepOutcome(grad_norm, applied)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def save(self, state: dict[str, Any], directory: Path, is_best: bool) -> None:
        """Rank 0 writes `last.pt` (previous kept as `prev.pt`) and `best.pt`; every rank waits for it."""
        if self.env.is_main:
            full = {**state, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict()}
            checkpoint.save_rotating(full, directory)
            if is_best:
                checkpoint.save_atomic(full, directory / "best.pt")
        barrier(self.env)

    def restore(self, source: Path) -> tuple[dict[str, Any], Path] | None:
        """Load model, loss, optimizer, schedule and scaler from a checkpoint directory (newest usable
        file) or one file; return the checkpoint (for the trainer's own fields), or None if none exists."""
        found = checkpoint.load_latest(source) if source.is_dir() or not source.suffix else (checkpoint.load(source), source)
        if found is None:
            return None
        state, path = found
        self.module.model.load_state_dict(state["model"])
        self.module.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        return state, path


def build_backend(module: nn.Module, cfg: DictConfig, env: DistEnv, total_steps: int, steps_per_epoch: int):
    """The backend named by `engine.backend` around `module` (a `TrainStep`)."""
    check_backend(cfg.engine.backend, env)
    if cfg.engine.backend == "deepspeed":
        from unidml.engine.deepspeed_backend import DeepSpeedBackend
        return DeepSpeedBackend(module, cfg, env, total_steps)
    return TorchBackend(module, cfg, env, total_steps)
