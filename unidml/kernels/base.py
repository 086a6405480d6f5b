"""Common shell of every loss: input checks, fp32 compute outside autocast, logged terms."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class DecomposedLoss(nn.Module):
    """A loss equal to tightness + contrast (the paper's Table 1 decomposition).

    Subclasses implement `compute(z, y, ref_z, ref_y) -> (tightness, contrast)` on fp32 inputs; the
    loss is their sum and `self.terms` holds both, detached, after each forward for logging.
    """

    def __init__(self) -> None:
        super().__init__()
        self.terms: dict[str, Tensor] = {}

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor | None = None,
                ref_labels: Tensor | None = None) -> Tensor:
        check_batch(embeddings, labels, "embeddings", "labels")
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("ref_emb and ref_labels must be given together")
        if ref_emb is not None:
            check_batch(ref_emb, ref_labels, "ref_emb", "ref_labels")
            if ref_emb.shape[1] != embeddings.shape[1]:
                raise ValueError(f"ref_emb has dim {ref_emb.shape[1]}, embeddings {embeddings.shape[1]}")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            tightness, contrast = self.compute(embeddings, labels, ref_emb, ref_labels)
            loss = tightness + contrast
        self.terms = {"tightness": tightness.detach(), "contrast": contrast.detach()}
        return loss

    def compute(self, z: Tensor, y: Tensor, ref_z: Tensor | None,
                ref_y: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def check_batch(emb: Tensor, labels: Tensor | None, emb_name: str, label_name: str) -> None:
    """Raise ValueError unless `emb` is (n, d) floating and `labels` is (n,) integer."""
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"{emb_name} must be a 2-d floating tensor, got {tuple(emb.shape)} {emb.dtype}")
    if emb.shape[0] == 0:
        raise ValueError(f"{emb_name} is empty (0 rows)")
    if labels is None or labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
        shape = None if labels is None else tuple(labels.shape)
        raise ValueError(f"{label_name} must have shape ({emb.shape[0]},), got {shape}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{label_name} must be integer class ids, got {labels.dtype}")
