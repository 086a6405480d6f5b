"""Optimizer (SGD, AdamW, LARS or LAMB) over per-group learning rates, the learning rate's scaling with the
global batch, and the per-iteration warm-up + cosine schedule.

Parameters fall into three roles, each with its own learning-rate multiplier: the embedding
network's backbone (`train.backbone_lr_mult`), its head — pooling, projection, embedding BN —
(`train.head_lr_mult`), and the loss's own parameters such as a classifier or proxies
(`train.loss_lr_mult`; Proxy-Anchor trains its proxies 100x faster than the backbone). With
`train.layer_decay` < 1, backbone layer l of L (0 = input side, numbered by the backbone family)
learns at `layer_decay ** (L - l)` times the backbone rate (layer-wise decay as in BEiT/timm).
Weight decay applies to matrices and kernels only: biases, norm parameters (1-d) and the
backbone's exempt tensors (position embeddings, class tokens) are not decayed, and LARS and LAMB do
not adapt their updates layer-wise either (`layer_adaptation`, `engine.large_batch_optim`).
"""
from __future__ import annotations

import importlib.util
import math

import torch
from omegaconf import DictConfig
from torch import nn

from unidml.engine.large_batch_optim import Lamb, Lars, fused_lamb
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
    """Parameter groups of `module` (a model, or model and loss together), each with its `lr`, `weight_decay`
    and `layer_adaptation` (whether LARS/LAMB scale its updates by the trust ratio: the decayed tensors).

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
                           "layer_adaptation": decayed, "name": label}
        groups[key]["params"].append(param)
    return list(groups.values())


def scaled_lr(lr: float, scaling: str, global_batch: int, reference_batch: int) -> float:
    """`lr`, stated for `reference_batch` images per step, at `global_batch`: times their ratio (linear,
    Goyal et al. 2017), its square root (sqrt, as for LAMB in You et al. 2020) or unchanged (none)."""
    ratio = global_batch / reference_batch
    return lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[scaling]


def global_batch(train_cfg: DictConfig) -> int:
    """Images per optimizer step over all ranks: `train.batch_size` (already global) x `train.grad_accum`."""
    return train_cfg.batch_size * train_cfg.grad_accum


def effective_lr(train_cfg: DictConfig) -> float:
    """The run's learning rate: `train.lr` scaled by `train.lr_scaling` to its global batch (warm-up and the
    cosine decay then act on this rate)."""
    return scaled_lr(train_cfg.lr, train_cfg.lr_scaling, global_batch(train_cfg), train_cfg.lr_reference_batch)


def lr_scaling_line(train_cfg: DictConfig) -> str | None:
    """What `train.lr_scaling` made of `train.lr`, for the run's start (None without scaling)."""
    if train_cfg.lr_scaling == "none":
        return None
    return (f"lr {train_cfg.lr:g} scaled {train_cfg.lr_scaling} to {effective_lr(train_cfg):g} for global batch "
            f"{global_batch(train_cfg)} (reference {train_cfg.lr_reference_batch})")


def build_optimizer(module: nn.Module, train_cfg: DictConfig) -> torch.optim.Optimizer:
    """`train.optimizer` over `module`'s groups at the scaled learning rate (`effective_lr`): SGD (apex
    FusedSGD on CUDA when importable, else torch's fused SGD), torch's fused AdamW, LARS, or LAMB (apex
    FusedLAMB on CUDA where it computes the same update, else the torch implementation)."""
    lr = effective_lr(train_cfg)
    groups = optimizer_groups(module, lr, train_cfg.weight_decay, backbone_lr_mult=train_cfg.backbone_lr_mult,
                              head_lr_mult=train_cfg.head_lr_mult, loss_lr_mult=train_cfg.loss_lr_mult,
                              layer_decay=train_cfg.layer_decay)
    betas = tuple(train_cfg.betas)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=train_cfg.eps, fused=True)
    if train_cfg.optimizer == "lamb":
        fused = fused_lamb(groups, lr, betas, train_cfg.eps)
        return fused if fused is not None else Lamb(groups, lr=lr, betas=betas, eps=train_cfg.eps)
    if train_cfg.optimizer == "lars":
        return Lars(groups, lr=lr, momentum=train_cfg.momentum, trust_coefficient=train_cfg.trust_coefficient)
    kwargs = dict(lr=lr, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov)
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
