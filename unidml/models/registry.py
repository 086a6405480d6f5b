"""Backbone registry and the factory of the embedding network (`build_model`, `check_model_config`).

A backbone family registers under an arch prefix (`""` for torchvision, `"timm/"` for timm) and
builds a `Backbone`: the module, what it outputs (pooled vectors, feature maps or tokens), the
feature width and the layer index of each parameter. `build_model` adds the pooling, the optional
projection to `model.embedding_dim` and the embedding BatchNorm1d, and applies the per-family
policies (frozen BatchNorm2d for CNNs with `model.freeze_bn`, the small-image stem for ResNets).
`check_model_config` builds the network on the meta device (no memory, no weights) and runs one
forward pass, so an arch that cannot produce an embedding is refused when the config is loaded, and so
is an image smaller than the backbone's downsampling (`downsampling`): below it every image collapses
to one feature-map cell computed mostly from padding.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from unidml.errors import UserError
from unidml.models.embedding_net import EmbeddingNet
from unidml.models.pooling import build_pooling
from unidml.registry import BACKBONE_FAMILIES

FAMILY_MODULES = ("unidml.models.torchvision_backbones", "unidml.models.timm_backbones")


@dataclass
class Backbone:
    """A built backbone: `module(images)` gives `output` ("pooled" (B, F), "maps" (B, F, H, W) or
    "tokens" (B, N, F))."""

    module: nn.Module
    output: str
    feature_dim: int
    num_prefix_tokens: int = 0
    layer_of: dict[str, int] = field(default_factory=dict)  # parameter name -> layer index (0 = input side)
    no_weight_decay: tuple[str, ...] = ()  # parameter names exempt from weight decay (position embeddings, ...)


class Family(Protocol):
    prefix: str

    def names(self) -> list[str]: ...

    def check_name(self, name: str) -> object: ...

    def build(self, name: str, model_cfg: DictConfig, image_size: int, load_weights: bool) -> Backbone: ...


def register_family(prefix: str) -> Callable[[type], type]:
    """Class decorator: register a backbone family (an instance of the class) for arch names starting with
    `prefix`, in `unidml.registry.BACKBONE_FAMILIES`."""
    def decorate(cls: type) -> type:
        BACKBONE_FAMILIES.add(prefix, cls())
        return cls
    return decorate


def families() -> dict[str, Family]:
    """The registered families (the built-in ones are imported on first use)."""
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    return dict(BACKBONE_FAMILIES.items())


def resolve_arch(arch: str) -> tuple[Family, str]:
    """(family, name within the family) of a `model.arch` value; the longest matching prefix wins."""
    registered = families()
    prefix = max((p for p in registered if arch.startswith(p)), key=len)
    return registered[prefix], arch[len(prefix):]


def _small_input_stem(backbone: nn.Module, arch: str) -> None:
    """3x3 stride-1 first convolution and no max-pool: keeps spatial detail on 32-64 px images (ResNets)."""
    conv, pool = getattr(backbone, "conv1", None), getattr(backbone, "maxpool", None)
    if not isinstance(conv, nn.Conv2d) or pool is None:
        raise UserError(f"model.small_input_stem: '{arch}' has no ResNet stem (conv1 + maxpool) to replace")
    backbone.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()


def build_model(model_cfg: DictConfig, image_size: int = 224, load_weights: bool = True) -> EmbeddingNet:
    """Build the embedding network described by the config's `model` section for `image_size` px inputs."""
    family, name = resolve_arch(str(model_cfg.arch))
    backbone = family.build(name, model_cfg, image_size, load_weights)
    if model_cfg.small_input_stem:
        _small_input_stem(backbone.module, str(model_cfg.arch))
    pool = build_pooling(str(model_cfg.pooling), backbone.output, str(model_cfg.arch), backbone.num_prefix_tokens,
                         float(model_cfg.gem_p))
    return EmbeddingNet(backbone.module, backbone.feature_dim, model_cfg.embedding_dim, model_cfg.feature_bn,
                        model_cfg.freeze_bn, pool=pool, layer_of=backbone.layer_of,
                        no_weight_decay=backbone.no_weight_decay)


PROBE_SIZE = 256  # px of the meta-device probe that measures a CNN's downsampling


def downsampling(backbone: nn.Module) -> int | None:
    """How many input pixels one cell of the backbone's last feature map spans (32 for a ResNet, 8 with
    the small-input stem, the patch size of a ViT): timm's `feature_info` where the model has it, else
    measured with a meta-device forward pass; None when the backbone outputs no feature map."""
    info = getattr(backbone, "feature_info", None)
    if info is not None:
        try:
            return int(info[-1]["reduction"])
        except (TypeError, KeyError, IndexError, ValueError):
            pass
    with torch.device("meta"):
        try:
            out = backbone(torch.empty(1, 3, PROBE_SIZE, PROBE_SIZE))
        except Exception:  # a fixed-size model (a ViT built for one size): nothing to measure
            return None
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[-1] == 0:
        return None
    return max(1, PROBE_SIZE // int(out.shape[-1]))


@functools.lru_cache(maxsize=64)
def _check(model_yaml: str, image_size: int) -> int:
    model_cfg = OmegaConf.create(model_yaml)
    arch = str(model_cfg.arch)
    family, name = resolve_arch(arch)
    family.check_name(name)  # outside the meta context: imports the family's package normally
    try:
        with torch.device("meta"):
            net = build_model(model_cfg, image_size, load_weights=False)
            stride = downsampling(net.backbone)
            if stride is not None and image_size < stride:
                raise UserError(f"data.image_size: {image_size} px is smaller than the {stride} px the backbone "
                                f"'{arch}' downsamples to one feature-map cell; use data.image_size >= {stride}")
            out = net.train()(torch.empty(2, 3, image_size, image_size))
    except UserError:
        raise
    except Exception as exc:  # any failure to build or run is a config problem of this arch
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"model.arch: '{arch}' cannot produce an embedding for {image_size} px images "
                        f"({type(exc).__name__}: {detail})") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model.arch: '{arch}' does not produce one embedding vector per image (got {shape})")
    return int(out.shape[1])


def check_model_config(model_cfg: DictConfig, image_size: int) -> int:
    """Refuse (one line) a `model` section that cannot produce an embedding; return the embedding width."""
    return _check(OmegaConf.to_yaml(model_cfg, resolve=True), int(image_size))


def list_models(pattern: str = "") -> list[str]:
    """Every buildable `model.arch` value matching the shell-style `pattern` (all when empty)."""
    import fnmatch

    names = []
    for family in families().values():
        try:
            names += family.names()
        except UserError:  # an optional family whose package is not installed
            continue
    return [n for n in names if not pattern or fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n, "timm/" + pattern)]
