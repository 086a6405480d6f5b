"""torchvision ResNet-family backbones (`model.arch: resnet50`, `resnext50_32x4d`, `wide_resnet50_2`, ...).

The network minus its average pool and ImageNet classifier is kept as an `nn.Sequential` of the
same children, so parameter names stay torchvision's (`conv1.weight`, `layer4.1.bn2.bias`) and
torchvision weight files load unchanged. Weights: a file, or a torchvision weights name looked up in
the local torch hub cache.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from omegaconf import DictConfig
from torch import nn

from unidml.errors import UserError
from unidml.models.pretrained import NO_WEIGHTS, load_file_into, looks_like_path
from unidml.models.registry import Backbone, register_family

FAMILIES = ("resnet", "resnext", "wide_resnet")  # torchvision models whose forward is their children in order
BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.")


def resolve_weights_file(spec: str, arch: str) -> Path:
    """The local file that `model.pretrained=spec` refers to (it may not exist)."""
    if looks_like_path(spec):
        return Path(spec).expanduser()
    try:
        if "." in spec:
            weights = torchvision.models.get_weight(spec)
        else:
            weights = torchvision.models.get_model_weights(arch)[spec]
    except (KeyError, ValueError, AttributeError):
        raise UserError(f"model.pretrained: '{spec}' is neither an existing file nor a torchvision weights name "
                        f"for '{arch}' (e.g. IMAGENET1K_V1 or ResNet50_Weights.IMAGENET1K_V1)") from None
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def resnet_layer_of(trunk: nn.Module) -> dict[str, int]:
    """Layer index per parameter: 0 for the stem, then one per residual block from input to output."""
    blocks = sorted({tuple(map(int, m.groups())) for m in map(BLOCK.match, dict(trunk.named_parameters())) if m})
    index = {block: i + 1 for i, block in enumerate(blocks)}
    return {name: index[tuple(map(int, m.groups()))] if (m := BLOCK.match(name)) else 0
            for name, _ in trunk.named_parameters()}


@register_family("")
class TorchvisionFamily:
    """`model.arch: NAME` for torchvision's ResNet, ResNeXt and Wide ResNet models."""

    prefix = ""

    def names(self) -> list[str]:
        return sorted(n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith(FAMILIES))

    def check_name(self, name: str) -> None:
        if name in self.names():
            return
        close = difflib.get_close_matches(name, self.names(), n=2)
        if importlib.util.find_spec("timm") is not None:
            import timm
            close = [f"timm/{name}"] if timm.is_model(name) else close
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(f"model.arch: '{name}' is not a torchvision ResNet/ResNeXt/Wide ResNet backbone; {hint}"
                        f"other networks are built as timm/NAME (`unidml models` lists what can be built)")

    def build(self, name: str, model_cfg: DictConfig, image_size: int, load_weights: bool) -> Backbone:
        self.check_name(name)
        try:
            net = torchvision.models.get_model(name, weights=None, **dict(model_cfg.kwargs))
        except TypeError as exc:
            raise UserError(f"model.kwargs: not accepted by torchvision '{name}' ({exc})") from None
        spec = str(model_cfg.pretrained)
        if load_weights and spec not in NO_WEIGHTS:
            load_file_into(net, resolve_weights_file(spec, name), spec, name, model_cfg.pretrained_required,
                           ignore=("fc",))
        feature_dim = net.fc.in_features
        trunk = nn.Sequential(OrderedDict((n, m) for n, m in net.named_children() if n not in ("avgpool", "fc")))
        return Backbone(trunk, "maps", feature_dim, layer_of=resnet_layer_of(trunk))
