"""The embedding network: a torchvision backbone, global pooling, optional projection and BN1d.

Retrieval uses this network's output directly (the paper's "embedding before dropout"); the
classifier of the cross-entropy loss lives in the loss module, so the same network serves every
loss. BatchNorm2d layers can be frozen (the paper's recipe): they stay in eval mode after every
`.train()` call while their affine parameters keep training.
"""
from __future__ import annotations

import torch
import torchvision
from omegaconf import DictConfig
from torch import nn

from unidml.engine.pretrained import load_pretrained
from unidml.errors import UserError


class EmbeddingNet(nn.Module):
    """backbone features -> [linear projection] -> [BatchNorm1d(affine=False)] = embedding."""

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int = 0,
                 feature_bn: bool = True, freeze_bn: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Linear(feature_dim, embedding_dim) if embedding_dim else nn.Identity()
        self.embedding_dim = embedding_dim or feature_dim
        self.feature_bn = nn.BatchNorm1d(self.embedding_dim, affine=False) if feature_bn else nn.Identity()
        self.freeze_bn = freeze_bn
        self.train()

    def train(self, mode: bool = True) -> "EmbeddingNet":
        super().train(mode)
        if mode and self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_bn(self.projection(self.backbone(images)))


def _strip_head(backbone: nn.Module, arch: str) -> int:
    """Replace the ImageNet classifier by identity; return the pooled feature dimension."""
    head = getattr(backbone, "fc", None)
    if not isinstance(head, nn.Linear):
        raise UserError(f"model.arch: '{arch}' is not supported (needs a torchvision model with an `fc` head, "
                        f"e.g. resnet18/resnet50/resnext50_32x4d/wide_resnet50_2)")
    backbone.fc = nn.Identity()
    return head.in_features


def _small_input_stem(backbone: nn.Module) -> None:
    """3x3 stride-1 first convolution and no max-pool: keeps spatial detail on 32-64 px images."""
    width = backbone.conv1.out_channels
    backbone.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()


def build_model(model_cfg: DictConfig) -> EmbeddingNet:
    """Build the embedding network described by the config's `model` section."""
    try:
        backbone = torchvision.models.get_model(model_cfg.arch, weights=None)
    except ValueError:
        raise UserError(f"model.arch: unknown torchvision model '{model_cfg.arch}'") from None
    load_pretrained(backbone, model_cfg.pretrained, model_cfg.arch, required=model_cfg.pretrained_required)
    feature_dim = _strip_head(backbone, model_cfg.arch)
    if model_cfg.small_input_stem:
        _small_input_stem(backbone)
    return EmbeddingNet(backbone, feature_dim, model_cfg.embedding_dim, model_cfg.feature_bn, model_cfg.freeze_bn)
