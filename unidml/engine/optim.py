"""Optimizer (SGD or AdamW) over per-group learning rates, and the per-iteration warm-up + cosine schedule.

Parameters fall into three roles, each with its own learning-rate multiplier: the embedding
network's backbone (`train.backbone_lr_mult`), its head — pooling, projection, embedding BN —
(`train.head_lr_mult`), and the loss's own parameters such as a classifier or proxies
(`train.loss_lr_mult`; Proxy-Anchor trains its proxies 100x faster than the backbone). With
`train.layer_decay` < 1, backbone layer l of L (0 = input side, numbered by the backbone family)
learns at `layer_decay ** (L - l)` times the backbone rate (layer-wise decay as in BEiT/timm).
Weight decay applies to matrices and kernels only: biases, norm parameters (1-d) and the
backbone's exempt tensors (position embeddings, class tokens) are not decayed.
"""
from __future__ import annotations

import importlib.util
import math

import torch
from omegaconf import DictConfig
from torch import nn

from unidml.errors import UserError
from unidml.models import EmbeddingNet

GroupKey = tuple[str, int, bool]  # (role, backbone layer or -1, decayed)


def _roles(module: nn.Module) -> dict[str, tuple[str, int, bool, EmbeddingNet | None]]:
    """Per parameter name: (role, backbone layer or -1, exempt from weight decay, its embedding network)."""
    nets = {prefix: m for prefix, m in module.named_modules() if isinstance(m, EmbeddingNet)}
    out = {}
    for name, _ in module.named_parameters():
        prefix = next((p for p in nets if p == "" or name.startswith(p + ".")), None)
        if prefix is None:
            out[name] = ("loss", -1, False, None)
            continue
        net, inner = nets[prefix], name[len(prefix) + 1:] if prefix else name
        if inner.startswith("backbone."):
            local = inner.removeprefix("backbone.")
            top = max(net.layer_of.values(), default=0)
            out[name] = ("backbone", net.layer_of.get(local, top), local in net.backbone_no_weight_decay, net)
        else:
            out[name] = ("head", -1, False, net)
    return out


def optimizer_groups(module: nn.Module, lr: float, weight_decay: float, *, backbone_lr_mult: float = 1.0,
                     head_lr_mult: float = 1.0, loss_lr_mult: float = 1.0, layer_decay: float = 1.0) -> list[dict]:
    """Parameter groups of `module` (a model, or model and loss together), each with its `lr` and `weight_decay`.

    Parameters outside every `EmbeddingNet` inside `module` belong to the loss.
    """
    multipliers = {"backbone": backbone_lr_mult, "head": head_lr_mult, "loss": loss_lr_mult}
    roles = _roles(module)
    groups: dict[GroupKey, dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        role, layer, exempt, net = roles[name]
        scale = multipliers[role]
        if role == "backbone" and layer_decay != 1.0:
            if not net.layer_of:
                raise UserError("train.layer_decay: this backbone has no layer grouping; set train.layer_decay=1")
            scale *= layer_decay ** (max(net.layer_of.values()) - layer)
        else:
            layer = -1  # one group per role when the layers share a rate
        decayed = param.ndim > 1 and not exempt
        key = (role, layer, decayed)
        if key not in groups:
            label = f"{role}{'' if layer < 0 else f'.layer{layer}'}/{'decay' if decayed else 'no_decay'}"
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": weight_decay if decayed else 0.0,
                           "name": label}
        groups[key]["params"].append(param)
    return list(groups.values())


def build_optimizer(module: nn.Module, train_cfg: DictConfig) -> torch.optim.Optimizer:
    """`train.optimizer` over `module`'s groups: SGD (apex FusedSGD on CUDA when importable, else torch's
    fused SGD) or torch's fused AdamW."""
    groups = optimizer_groups(module, train_cfg.lr, train_cfg.weight_decay, backbone_lr_mult=train_cfg.backbone_lr_mult,
                              head_lr_mult=train_cfg.head_lr_mult, loss_lr_mult=train_cfg.loss_lr_mult,
                              layer_decay=train_cfg.layer_decay)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr, fused=True)
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


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_iters: int,
                    total_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (the recipe's per-iteration schedule); scales every group's own lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_iters, total_iters))
