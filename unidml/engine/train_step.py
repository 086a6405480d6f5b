"""The module a backend trains: the embedding network and the loss (with its own parameters) as one."""
from __future__ import annotations

import torch
from torch import nn

from unidml.engine.embed_chunks import CachedGradients


class TrainStep(nn.Module):
    """`forward(images, labels)` returns the loss of the batch.

    Holding the loss inside the module lets the backend reduce, step and checkpoint the loss's own
    parameters (a classifier, proxies, centers) with the network's. With `cached` (the replay pass
    of `engine.embed_chunks`) it returns instead the surrogate scalar whose gradient is the cached
    full-batch gradient.
    """

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None,
                cached: CachedGradients | None = None) -> torch.Tensor:
        embeddings = self.model(images)
        if cached is not None:
            return cached.surrogate(embeddings)
        return self.loss(embeddings, labels)
