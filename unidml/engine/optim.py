"""SGD with the paper's weight-decay rule and the per-iteration warm-up + cosine schedule."""
from __future__ import annotations

import importlib.util
import math

import torch
from omegaconf import DictConfig
from torch import nn


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only: biases and norm parameters (1-d) are not decayed."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, train_cfg: DictConfig) -> torch.optim.Optimizer:
    """SGD over `module`'s parameters; apex's FusedSGD when importable on CUDA, else torch's fused SGD."""
    groups = parameter_groups(module, train_cfg.weight_decay)
    kwargs = dict(lr=train_cfg.lr, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov)
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    if on_cuda and importlib.util.find_spec("apex") is not None:
        from apex.optimizers import FusedSGD  # optional, only where apex is installed
        return FusedSGD(groups, **kwargs)
    return torch.optim.SGD(groups, fused=True, **kwargs)


def warmup_cosine(step: int, warmup_iters: int, total_iters: int) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine from 1 to 0 at `total_iters`."""
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    span = max(1, total_iters - warmup_iters)
    progress = min(1.0, (step - warmup_iters) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_iters: int, total_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (the recipe's per-iteration schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_iters, total_iters))
