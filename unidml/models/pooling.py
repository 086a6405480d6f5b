"""Global pooling of a backbone's unpooled output into one feature vector per image.

A backbone hands over either feature maps (B, C, H, W) — CNNs — or tokens (B, N, D) — vision
transformers, whose first `num_prefix_tokens` tokens are the class/register tokens. `model.pooling`:

- `avg`: spatial mean of the maps, or mean of the patch tokens (prefix tokens left out);
- `gem`: generalised mean (Radenović et al.) with a learnable exponent p, maps only;
- `cls`: the class token, tokens only;
- `auto`: the backbone's own pooling (torchvision ResNets: avg; timm models: their default head,
  e.g. the class token for ViT/DINO/DINOv2, average + norm for ConvNeXt).
"""
from __future__ import annotations

import torch
from torch import nn

from unidml.errors import UserError
from unidml.registry import POOLINGS

OUTPUTS = ("pooled", "maps", "tokens")


class AvgPool(nn.Module):
    """Mean over the spatial positions of maps, or over the patch tokens of a token sequence."""

    def __init__(self, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 4:
            return features.mean(dim=(2, 3))
        return features[:, self.num_prefix_tokens:].mean(dim=1)


class GeM(nn.Module):
    """(mean x^p)^(1/p) over the spatial positions; p is learned (initialised at `p`).

    Inputs are clamped at `eps` first: p-th powers need non-negative features (post-ReLU maps).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class ClsToken(nn.Module):
    """The first (class) token of a token sequence."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, 0]


@POOLINGS.register("avg")
def _average(output: str, num_prefix_tokens: int, gem_p: float) -> nn.Module:
    return AvgPool(num_prefix_tokens if output == "tokens" else 0)


@POOLINGS.register("gem")
def _generalised_mean(output: str, num_prefix_tokens: int, gem_p: float) -> nn.Module | None:
    return GeM(gem_p) if output == "maps" else None


@POOLINGS.register("cls")
def _class_token(output: str, num_prefix_tokens: int, gem_p: float) -> nn.Module | None:
    return ClsToken() if output == "tokens" and num_prefix_tokens > 0 else None


def build_pooling(pooling: str, output: str, arch: str, num_prefix_tokens: int = 0, gem_p: float = 3.0) -> nn.Module:
    """The pooling module for a backbone whose output kind is `output` (pooled | maps | tokens); a
    registered pooling returns None where it does not apply to that output."""
    if output == "pooled":
        return nn.Identity()
    module = POOLINGS.get("avg" if pooling == "auto" else pooling)(output, num_prefix_tokens, gem_p)
    if module is not None:
        return module
    kind = {"maps": "feature maps", "tokens": f"tokens ({num_prefix_tokens} prefix tokens)"}[output]
    raise UserError(f"model.pooling: '{pooling}' does not apply to '{arch}', whose backbone outputs {kind} "
                    f"(gem needs feature maps, cls a class token)")
