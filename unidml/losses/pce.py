"""Pairwise cross-entropy (PCE, Boudiaf et al. 2020) through class means in O(n·K·d).

L_PCE = -(1/(2λn²)) Σ_i Σ_{j:y_j=y_i} z_iᵀz_j
        + (1/n) Σ_i log Σ_k exp((1/(λn)) Σ_j p_jk z_iᵀz_j - ‖c^s_k‖²/(2λ))
with p the softmax of the loss's own linear classifier, c_k = (1/n) Σ_{j:y_j=k} z_j (hard means) and
c^s_k = (1/n) Σ_j p_jk z_j (soft means). Both sums factor through the means:
  tightness = -(1/(2λ)) Σ_k ‖c_k‖² = -(1/(2λn)) Σ_i z_iᵀ c_{y_i},
  contrast  = (1/n) Σ_i LSE_k( (z_iᵀ c^s_k − ‖c^s_k‖²/2) / λ ).
With references (cross-rank or a memory), the means are taken over the references (n → m).

As a training objective PCE is unbounded below in the embedding norm (scaling Z by s scales both
terms by s², and the tightness term wins wherever the classifier is still uninformative), so by
default (`normalize=True`) it is applied to L2-normalised embeddings and references, where
L_PCE ≥ log K − (1 + 3/K)/(2λ), and λ ≥ ½ makes its quadratic majorizer valid for every batch
(docs/theory.md, "PCE as a training objective"). `normalize=False` is the raw form of the analysis.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unidml.losses.base import DecomposedLoss, LossInputs
from unidml.losses.center import class_sums
from unidml.losses.registry import register_loss
from unidml.runtime.collectives import gather_references, world_size


def pce_terms(z: Tensor, y: Tensor, ref_z: Tensor, ref_y: Tensor, ref_probs: Tensor,
              lam: float) -> tuple[Tensor, Tensor]:
    """(tightness, contrast) of PCE for anchors z against references with class probabilities."""
    m, k = ref_z.shape[0], ref_probs.shape[1]
    hard = class_sums(ref_z, ref_y, k)[0] / m  # c_k, with the 1/n (not 1/n_k) of the definition above
    soft = ref_probs.T @ ref_z / m  # c^s_k
    tight = -(z * hard[y]).sum(1).mean() / (2.0 * lam)
    logits = (z @ soft.T - 0.5 * (soft * soft).sum(1)[None, :]) / lam
    return tight, torch.logsumexp(logits, dim=1).mean()


@register_loss("pce")
class PairwiseCrossEntropyLoss(DecomposedLoss):
    """PCE with its own linear classifier (p = softmax(Wz)); λ > 0 is the MM step's curvature; with
    `normalize` (default) on unit-norm embeddings, the bounded training objective."""

    def __init__(self, num_classes: int, embedding_dim: int, lam: float = 1.0, zero_init: bool = True,
                 normalize: bool = True, cross_rank: bool = False) -> None:
        super().__init__()
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.num_classes, self.lam, self.normalize, self.cross_rank = num_classes, float(lam), normalize, cross_rank
        self.head = nn.Linear(embedding_dim, num_classes, bias=False)
        if zero_init:
            nn.init.zeros_(self.head.weight)

    def compute(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        x, y = inputs.embeddings.float(), inputs.labels.long()
        if self.normalize:
            x = F.normalize(x, dim=1)
        r, r_y = (inputs.ref_emb.float(), inputs.ref_labels.long()) if inputs.has_references else (x, y)
        if self.normalize and inputs.has_references:
            r = F.normalize(r, dim=1)
        if self.cross_rank and world_size() > 1:
            r, r_y, _ = gather_references(r, r_y)
        for labels in (y, r_y):
            if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes})")
        probs = torch.softmax(r @ self.head.weight.float().T, dim=1)
        return pce_terms(x, y, r, r_y, probs, self.lam)
