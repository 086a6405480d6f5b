"""Optimizers for large global batches: LARS (You et al. 2017) and LAMB (You et al. 2020).

Both scale each tensor's update by a layer-wise trust ratio built from ||w||, so that every layer moves by
a similar fraction of its weights however large the batch (and so the learning rate) gets. A parameter
group with `layer_adaptation=False` (`engine.optim.optimizer_groups` gives it to biases, norm parameters
and the backbone's exempt tensors, the groups without weight decay; exclude_from_layer_adaptation in the
papers' implementations) takes the plain update instead. Where ||w|| or the other norm of the ratio (the
gradient's for LARS, the update's for LAMB) is 0, e.g. a zero-initialised layer or a zero gradient, the
ratio is 1, so no step is NaN.

`fused_lamb` picks apex's FusedLAMB on CUDA where it computes the same update (docs/design.md,
"Optimizers for large batches").
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable
from typing import Any

import torch


def _trust_ratio(ratio: torch.Tensor, w_norm: torch.Tensor, other_norm: torch.Tensor) -> torch.Tensor:
    """`ratio`, or 1 where ||w|| or the other norm is 0 (a 0-d tensor on the device: no host sync)."""
    return torch.where((w_norm > 0) & (other_norm > 0), ratio, 1.0)


class _PerTensor(torch.optim.Optimizer):
    """An optimizer whose step updates each parameter with a gradient on its own (`update(p, group)`)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group)
        return loss

    def update(self, p: torch.Tensor, group: dict) -> None:
        """Apply one parameter's update in place (each optimizer's own rule)."""
        raise NotImplementedError


class Lars(_PerTensor):
    """LARS: SGD with momentum on the trust-ratio-scaled gradient.

    Per tensor, d = (g + λw)·r with r = η·||w|| / (||g|| + λ||w||) (η the trust coefficient, λ the weight
    decay), the momentum buffer b = μb + d, and w -= lr·b (the learning rate outside the buffer, as in
    torch's SGD, so the schedule changes the step at once).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        layer_adaptation=True)
        super().__init__(params, defaults)

    def update(self, p: torch.Tensor, group: dict) -> None:
        momentum, decay = group["momentum"], group["weight_decay"]
        grad = p.grad
        update = grad.add(p, alpha=decay) if decay else grad.clone()
        if group["layer_adaptation"]:
            w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
            ratio = group["trust_coefficient"] * w_norm / (g_norm + decay * w_norm)
            update.mul_(_trust_ratio(ratio, w_norm, g_norm))
        if momentum:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            update = state["momentum_buffer"].mul_(momentum).add_(update)
        p.add_(update, alpha=-group["lr"])


class Lamb(_PerTensor):
    """LAMB: Adam's bias-corrected moments, decoupled weight decay, and the layer-wise trust ratio.

    Per tensor, at step t: m = β1·m + (1−β1)·g, v = β2·v + (1−β2)·g², u = m̂ / (√v̂ + ε) + λw with
    m̂ = m / (1−β1^t), v̂ = v / (1−β2^t), then w -= lr·r·u with r = ||w|| / ||u|| (Algorithm 2 of the
    paper, φ the identity; the same update as apex's FusedLAMB).
    """

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, layer_adaptation=True)
        super().__init__(params, defaults)

    def update(self, p: torch.Tensor, group: dict) -> None:
        (beta1, beta2), eps, decay = group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        exp_avg, exp_avg_sq, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(eps)
        update = (exp_avg / (1 - beta1 ** t)).div_(denom)
        if decay:
            update.add_(p, alpha=decay)
        if group["layer_adaptation"]:
            w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
            update.mul_(_trust_ratio(w_norm / u_norm, w_norm, u_norm))
        p.add_(update, alpha=-group["lr"])


def fused_lamb(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer | None:
    """apex's FusedLAMB over `groups` where it computes `Lamb`'s update, else None (the torch `Lamb` then).

    That is on CUDA, with apex importable, and where the groups it adapts are `Lamb`'s: FusedLAMB applies
    the trust ratio exactly to the tensors with non-zero weight decay (use_nvlamb=False), so the adapted
    groups must be exactly those with weight decay > 0. Its own global gradient clipping is off (max_grad_norm=inf: the
    backend clips, `train.grad_clip`). DeepSpeed's FusedLamb is not used: it adapts every tensor, biases
    and norm weights included, clamps the ratio to [0.01, 10] and takes ε outside the uncorrected √v.
    """
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    same_groups = all((g["weight_decay"] > 0) == g["layer_adaptation"] for g in groups)
    if not (on_cuda and same_groups and importlib.util.find_spec("apex") is not None):
        return None
    from apex.optimizers import FusedLAMB  # optional, only where apex is installed

    class ApexLamb(FusedLAMB):
        """FusedLAMB whose zero_grad takes torch's `set_to_none` (the backends pass it; apex's takes none)."""

        def zero_grad(self, set_to_none: bool = True) -> None:
            self.set_grad_none = set_to_none
            super().zero_grad()

    return ApexLamb(groups, lr=lr, betas=tuple(betas), eps=eps, bias_correction=True, adam_w_mode=True,
                    grad_averaging=True, max_grad_norm=math.inf, use_nvlamb=False)
