"""Center loss: squared distance of each embedding to its class center (a pure tightness term)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unidml.losses.base import DecomposedLoss, LossInputs, choice
from unidml.losses.registry import register_loss
from unidml.runtime.checks import check_range


def class_sums(emb: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(per-class sums of embeddings (K, d), per-class counts (K,)) in O(n·d)."""
    counts = torch.bincount(labels, minlength=num_classes).to(emb.dtype)
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, labels, emb)
    return sums, counts


@register_loss("center")
class CenterLoss(DecomposedLoss):
    """½ Σ_i ‖z_i − c_{y_i}‖², divided by n for `reduction=mean` (docs/design.md gives the `sum` form).

    centers: `batch` (means of the references' — by default the batch's own — class members,
    differentiated through; labels may be any integers, remapped to the classes present) or `learned`
    (a (num_classes, embedding_dim) parameter; labels must lie in [0, num_classes)).
    Anchors whose class has no reference contribute 0. contrast is identically 0.
    """

    def __init__(self, num_classes: int, embedding_dim: int, centers: str = "batch",
                 reduction: str = "mean") -> None:
        super().__init__()
        choice(centers, ("batch", "learned"), "centers")
        self.num_classes, self.reduction = num_classes, choice(reduction, ("mean", "sum"), "reduction")
        self.centers = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01) if centers == "learned" else None

    def compute(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        x, y = inputs.embeddings.float(), inputs.labels.long()
        if self.centers is not None:
            if inputs.has_references:
                raise ValueError("center loss with learned centers takes no reference embeddings")
            check_range(y, 0, self.num_classes, "labels")
            centers, present = self.centers.float(), torch.ones(self.num_classes, dtype=torch.bool, device=x.device)
        else:
            r, r_y = (inputs.ref_emb.float(), inputs.ref_labels.long()) if inputs.has_references else (x, y)
            # Buffers sized by the classes present, not by the largest label (any integer ids work).
            classes, ids = torch.unique(torch.cat([y, r_y]), return_inverse=True)
            y, r_y = ids[:y.shape[0]], ids[y.shape[0]:]
            sums, counts = class_sums(r, r_y, classes.numel())
            centers = sums / counts.clamp(min=1)[:, None]
            present = counts > 0
        sq = ((x - centers[y]) ** 2).sum(1) * present[y]
        tight = 0.5 * (sq.mean() if self.reduction == "mean" else sq.sum())
        return tight, torch.zeros_like(tight)
