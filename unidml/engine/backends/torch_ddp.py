"""engine.backend=single | ddp: torch SGD, warm-up/cosine schedule, fp16 loss scaling, and for `ddp`
DistributedDataParallel with bucketed all-reduce overlapping the backward pass."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, ContextManager

import torch
from omegaconf import DictConfig
from torch import nn

from unidml.engine import checkpoint
from unidml.engine.backends.base import StepOutcome
from unidml.engine.distributed import DistEnv
from unidml.engine.optim import build_optimizer, build_scheduler
from unidml.kernels.classifier.head import (
    class_sharded_names,
    gather_optimizer_state,
    global_grad_norm,
    slice_optimizer_state,
)
from unidml.runtime.collectives import barrier
from unidml.runtime.precision import precision_of

DDP_BUCKET_MB = 25


def sync_batch_norm(model: nn.Module) -> None:
    """engine.sync_bn: batch statistics over the global batch for the feature BatchNorm1d, and for the
    backbone's BatchNorm2d layers when they train (frozen ones stay per-rank eval-mode layers).
    In place: converted layers share the parameters the optimizer already holds. CUDA only
    (`config.check_runtime` says so before the run starts)."""
    model.feature_bn = nn.SyncBatchNorm.convert_sync_batchnorm(model.feature_bn)
    if not model.freeze_bn:
        model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)


class TorchBackend:
    """A `ChunkableBackend` for one process or DDP. A step whose gradient norm is non-finite is not
    applied (fp16 loss-scale overflow included); the trainer counts consecutive skips."""

    def __init__(self, module: nn.Module, cfg: DictConfig, env: DistEnv, total_steps: int) -> None:
        self.module = module
        self.cfg = cfg
        self.env = env
        self.accum = cfg.train.grad_accum
        self.grad_clip = cfg.train.grad_clip
        self.optimizer = build_optimizer(module, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.warmup_iters, total_steps)
        self.precision = precision_of(cfg)
        self.scaler = self.precision.grad_scaler(env.device)
        self.ddp = cfg.engine.backend == "ddp"
        self.wrapped = self._wrap(module, cfg.engine.sync_bn) if self.ddp else module
        if cfg.engine.compile:
            self.wrapped = torch.compile(self.wrapped)

    def _wrap(self, module: nn.Module, sync_bn: bool) -> nn.Module:
        if sync_bn:
            sync_batch_norm(module.model)
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        # A class-sharded loss head (loss.head_parallel) is not replicated: its gradients are not averaged.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, class_sharded_names(module))
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, bucket_cap_mb=DDP_BUCKET_MB,
                                                   gradient_as_bucket_view=True)

    def autocast(self) -> ContextManager:
        return self.precision.autocast(self.env.device)

    def forward(self, *inputs: Any) -> torch.Tensor:
        """The wrapped `TrainStep` under autocast (through DDP, so its gradient hooks are armed)."""
        with self.autocast():
            return self.wrapped(*inputs)

    def sync(self, enabled: bool) -> ContextManager:
        """Gradient all-reduce on the next backward only when `enabled` (DDP `no_sync` otherwise)."""
        return contextlib.nullcontext() if enabled or not self.ddp else self.wrapped.no_sync()

    def set_group(self, micro_batches: int) -> None:
        self.accum = micro_batches

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """What to differentiate for one micro-batch: loss / its group's size, times the fp16 loss scale."""
        return self.scaler.scale(loss / self.accum)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaled(loss).backward()

    def step(self) -> StepOutcome:
        """Unscale, clip, and step unless the gradient norm is non-finite; then advance the schedule."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.module.parameters() if p.grad is not None]
        total = global_grad_norm(params)  # class-sharded head gradients summed over ranks
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
        optimizer_state = gather_optimizer_state(self.optimizer)  # collective for a class-sharded head
        if self.env.is_main:
            full = {**state, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict()}
            checkpoint.save_epoch(full, directory, is_best)
        barrier()

    def restore(self, source: Path) -> tuple[dict[str, Any], Path] | None:
        """Load model, loss, optimizer, schedule and scaler from a checkpoint directory (newest usable
        file) or one file; return the checkpoint (for the trainer's own fields), or None if none exists."""
        found = checkpoint.load_source(source, quarantine=self.env.is_main)  # rank 0 moves unreadable files aside
        if found is None:
            return None
        state, path = found
        checkpoint.restore_modules(self.module.model, self.module.loss, state, path, self.cfg)
        stored = state.get("optimizer")
        if isinstance(stored, dict) and "state" in stored:  # re-slice class shards to this world size
            stored = slice_optimizer_state(self.optimizer, stored)
        checkpoint.load_optimizer_state(self.optimizer, stored, path)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        return state, path

