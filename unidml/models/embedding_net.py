"""The embedding network: backbone -> global pooling -> [projection] -> [BatchNorm1d] = embedding.

Retrieval uses this network's output directly (the paper's "embedding before dropout"); the
classifier of the cross-entropy loss lives in the loss module, so the same network serves every
loss. BatchNorm2d layers of the backbone can be frozen (the paper's recipe for CNNs): they stay in
eval mode after every `.train()` call while their affine parameters keep training. LayerNorm (ViTs)
is never frozen. The backbone's layer index of each parameter (`layer_of`) drives layer-wise
learning-rate decay (see `unidml.engine.optim`).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class EmbeddingNet(nn.Module):
    """backbone -> pool -> [linear projection] -> [BatchNorm1d(affine=False)] = embedding."""

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int = 0,
                 feature_bn: bool = True, freeze_bn: bool = True, pool: nn.Module | None = None,
                 layer_of: dict[str, int] | None = None, no_weight_decay: Iterable[str] = ()) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool if pool is not None else nn.Identity()
        self.feature_dim = feature_dim
        self.projection = nn.Linear(feature_dim, embedding_dim) if embedding_dim else nn.Identity()
        self.embedding_dim = embedding_dim or feature_dim
        self.feature_bn = nn.BatchNorm1d(self.embedding_dim, affine=False) if feature_bn else nn.Identity()
        self.freeze_bn = freeze_bn
        # Parameter names relative to the backbone: layer index (0 = input side) and names exempt from weight decay.
        self.layer_of = dict(layer_of or {})
        self.backbone_no_weight_decay = frozenset(no_weight_decay)
        self.train()

    def train(self, mode: bool = True) -> "EmbeddingNet":
        super().train(mode)
        if mode and self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The explicit (batch, width) shape keeps the width static for exporters (ONNX shape inference
        # loses it through token slicing) and fails loudly if a backbone's output is not that wide.
        features = self.pool(self.backbone(images)).reshape(images.shape[0], self.feature_dim)
        return self.feature_bn(self.projection(features))
