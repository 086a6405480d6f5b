"""Pairwise cross-entropy (PCE, Boudiaf et al. 2020) through class means in O(n·K·d).

L_PCE = -(1/(2λn²)) Σ_i Σ_{j:y_j=y_i} z_iᵀz_j + (1/n) Σ_i log Σ_k exp((1/(λn)) Σ_j p_jk z_iᵀz_j - ‖c^s_k‖²/(2λ))
with p the softmax of the loss's own linear classifier, c_k = (1/n) Σ_{j:y_j=k} z_j (hard means) and
c^s_k = (1/n) Σ_j p_jk z_j (soft means). Both sums factor through the means:
  tightness = -(1/(2λ)) Σ_k ‖c_k‖² = -(1/(2λn)) Σ_i z_iᵀ c_{y_i},
  contrast  = (1/n) Σ_i LSE_k( (z_iᵀ c^s_k − ‖c^s_k‖²/2) / λ ).
With references (cross-rank or a memory), the means are taken over the references (n → m).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from unidml.kernels.base import DecomposedLoss
from unidml.kernels.center import class_sums
from unidml.kernels.distributed import cross_rank_active, gather_references
from unidml.kernels.registry import register_loss


def pce_terms(z: Tensor, y: Tensor, ref_z: Tensor, ref_y: Tensor, ref_probs: Tensor,
              lam: float) -> tuple[Tensor, Tensor]:
    """(tightness, contrast) of PCE for anchors z against references with class probabilities."""
    m, k = ref_z.shape[0], ref_probs.shape[1]
    hard = class_sums(ref_z, ref_y, k)[0] / m  # c_k, with the 1/n (not 1/n_k) of DESIGN §4
    soft = ref_probs.T @ ref_z / m  # c^s_k
    tight = -(z * hard[y]).sum(1).mean() / (2.0 * lam)
    logits = (z @ soft.T - 0.5 * (soft * soft).sum(1)[None, :]) / lam
    return tight, torch.logsumexp(logits, dim=1).mean()


@register_loss("pce")
class PairwiseCrossEntropyLoss(DecomposedLoss):
    """PCE with its own linear classifier (p = softmax(Wz)); λ > 0 is the MM step's curvature."""

    def __init__(self, num_classes: int, embedding_dim: int, lam: float = 1.0, zero_init: bool = True,
                 cross_rank: bool = False) -> None:
        super().__init__()
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.num_classes, self.lam, self.cross_rank = num_classes, float(lam), cross_rank
        self.head = nn.Linear(embedding_dim, num_classes, bias=False)
        if zero_init:
            nn.init.zeros_(self.head.weight)

    def compute(self, z: Tensor, y: Tensor, ref_z: Tensor | None,
                ref_y: Tensor | None) -> tuple[Tensor, Tensor]:
        x, y = z.float(), y.long()
        r, r_y = (x, y) if ref_z is None else (ref_z.float(), ref_y.long())
        if self.cross_rank and cross_rank_active():
            r, r_y, _ = gather_references(r, r_y)
        for labels in (y, r_y):
            if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes})")
        probs = torch.softmax(r @ self.head.weight.float().T, dim=1)
        return pce_terms(x, y, r, r_y, probs, self.lam)
